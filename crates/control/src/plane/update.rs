//! `UpdateSandbox`: the mutable parts of a sandbox, a live resize, and `resetRevision`'s
//! re-create.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use warren_spec::{Phase, ResourceInfo, SandboxSpec};

use super::{ControlError, ControlPlane, EventKind, SandboxUpdate};
use crate::record::{PolicyRecord, SandboxRecord, now_ms};

impl ControlPlane {
    pub async fn update(
        &self,
        name: &str,
        update: SandboxUpdate,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let (old, spec, resources) = {
            let mut reg = self.lock();
            let entry = reg.idle_entry(name)?;
            if let Some(expected) = update
                .expected_revision
                .filter(|&e| e != entry.record.revision)
            {
                let actual = entry.record.revision;
                return Err(ControlError::RevisionMismatch {
                    name: name.into(),
                    expected,
                    actual,
                });
            }
            if let Some(expire) = update.expire_time {
                super::create::refuse_past_expiry(expire)?;
            }
            let mut spec = entry.record.spec.clone();
            apply_update(&mut spec, &update);
            if spec == entry.record.spec {
                return Ok(entry.record.clone());
            }
            let resources = spec
                .validate()
                .map_err(|e| ControlError::InvalidSpec(e.to_string()))?;
            let policy = self.readmit(&entry.record, &spec, &resources)?;
            entry.busy = true;
            (entry.record.clone(), spec, (resources, policy))
        };
        let this = self.clone();
        super::detached(async move { this.finish_update(old, spec, resources).await }).await
    }

    async fn finish_update(
        &self,
        old: Arc<SandboxRecord>,
        spec: SandboxSpec,
        (resources, policy): (ResourceInfo, Option<PolicyRecord>),
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = old.spec.name.clone();
        let release = |this: &Self| {
            let deferred = this.lock().release(&name);
            this.apply_later(deferred);
        };
        let kind = old.spec.backend;
        if spec.reset_revision != old.spec.reset_revision {
            let result = self.recreate(&old, spec, resources, policy).await;
            release(self);
            return result;
        }
        let resized = resources != old.resources && old.status == Phase::Running;
        let node = self.node(&old);
        if resized && let Err(e) = node.update(kind, &old.id, &resources).await {
            release(self);
            return Err(e.into());
        }
        let mut rec = (*old).clone();
        rec.spec = spec;
        rec.resources = resources;
        rec.policy = policy;
        rec.revision += 1;
        rec.updated_at_ms = now_ms();
        if let Err(e) = self.persist(&rec).await {
            if resized && let Err(undo) = node.update(kind, &old.id, &old.resources).await {
                warn!(sandbox = %name, error = %undo, "rollback of a resize failed");
            }
            release(self);
            return Err(e);
        }
        Ok(self.publish(rec, EventKind::Modified))
    }

    /// `resetRevision` changed: the sandbox is removed from its backend and created again
    /// from the new spec under a new id (events of the old one then match nothing). The
    /// record keeps its name; on failure it says so (Failed) rather than vanish.
    async fn recreate(
        &self,
        old: &SandboxRecord,
        spec: SandboxSpec,
        resources: ResourceInfo,
        policy: Option<PolicyRecord>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = old.spec.name.clone();
        let kind = old.spec.backend;
        let node = self.node(old);
        if old.status == Phase::Running {
            let grace = spec
                .stop_grace_period_seconds
                .map(Duration::from_secs_f64)
                .unwrap_or(self.inner.default_grace);
            if let Err(e) = node.stop(kind, &old.id, grace).await {
                warn!(sandbox = %name, error = %e, "stop before a re-create failed");
            }
        }
        match node.delete(kind, &old.id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let mut rec = old.clone();
        rec.id = uuid::Uuid::new_v4().simple().to_string();
        // A new workload, not paused (the old one was resumed by its stop).
        rec.paused = false;
        rec.spec = spec;
        rec.resources = resources;
        rec.policy = policy;
        rec.revision += 1;
        rec.updated_at_ms = now_ms();
        {
            let mut reg = self.lock();
            reg.ids.remove(&old.id);
            reg.ids.insert(rec.id.clone(), name.clone());
        }
        let config = self.config_of(&rec);
        let started = node.run(&config).await;
        match &started {
            Ok(info) => {
                rec.status = Phase::Running;
                rec.backend_info = info.clone();
            }
            Err(e) => {
                rec.status = Phase::Failed {
                    reason: format!("re-create failed: {e}"),
                };
                rec.backend_info = BTreeMap::new();
            }
        }
        if let Err(e) = self.persist(&rec).await {
            // Not kept: the new sandbox goes too, and the name maps to the old record again.
            if started.is_ok()
                && let Err(undo) = node.delete(kind, &rec.id).await
            {
                warn!(sandbox = %name, error = %undo, "rollback of a re-create failed");
            }
            let mut reg = self.lock();
            reg.ids.remove(&rec.id);
            reg.ids.insert(old.id.clone(), name);
            return Err(e);
        }
        let rec = self.publish(rec, EventKind::Modified);
        started.map(|_| rec).map_err(ControlError::from)
    }
}

fn apply_update(spec: &mut SandboxSpec, u: &SandboxUpdate) {
    if let Some(r) = &u.resources {
        spec.resources = r.clone();
    }
    for (k, v) in &u.set_labels {
        spec.labels.insert(k.clone(), v.clone());
    }
    for k in &u.remove_labels {
        spec.labels.remove(k);
    }
    for (k, v) in &u.set_annotations {
        spec.annotations.insert(k.clone(), v.clone());
    }
    for k in &u.remove_annotations {
        spec.annotations.remove(k);
    }
    if let Some(expire) = u.expire_time {
        spec.expire_time = expire;
    }
    if let Some(p) = u.failure_policy {
        spec.failure_policy = p;
    }
    if let Some(r) = &u.reset_revision {
        spec.reset_revision = Some(r.clone());
    }
}
