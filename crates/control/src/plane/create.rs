//! A create: validation, admission, the name, placement on a node, the agent's work and
//! the record, in the sandbox's consistency mode (see `ControlPlane::finish_create`).

use std::sync::Arc;

use tracing::warn;
use warren_agent::AgentError;
use warren_runtime::{AppliedPolicy, SandboxConfig, Stdin};
use warren_spec::{BackendKind, Consistency, Phase, SandboxSpec};

use super::{ControlError, ControlPlane, EventKind, host_ports};
use crate::record::{self, SandboxRecord, now_ms};
use crate::scheduler::{Demand, ScheduleError};
use crate::store::{StoreError, Write};

impl ControlPlane {
    /// Creates and starts a sandbox. Returns the record and whether this call created it
    /// (false when an identical sandbox already existed: a retried create).
    pub async fn create(
        &self,
        spec: SandboxSpec,
    ) -> Result<(Arc<SandboxRecord>, bool), ControlError> {
        self.create_with(spec, None).await
    }

    /// [`Plane::create`], the workload reading `stdin` (not stored: a restart reads none).
    pub async fn create_with(
        &self,
        mut spec: SandboxSpec,
        stdin: Option<Stdin>,
    ) -> Result<(Arc<SandboxRecord>, bool), ControlError> {
        self.fill_from_pool(&mut spec)?;
        let resources = spec
            .validate()
            .map_err(|e| ControlError::InvalidSpec(e.to_string()))?;
        // The slot backend runs no image, but schedules by it (affinity, warm pools): a
        // name no registry could serve is a mistake, said now rather than never.
        if spec.backend == BackendKind::Slot
            && let Some(image) = &spec.image
        {
            warren_image::normalize_name(image)
                .map_err(|e| ControlError::InvalidSpec(format!("spec.image: {e}")))?;
        }
        let applied = self.admit(&spec, &resources)?;
        let mut pending = SandboxRecord::creating(spec, resources, String::new(), applied.as_ref());
        {
            let _registering = self.registering().await;
            let mut reg = self.lock();
            if let Some(entry) = reg.sandboxes.get(&pending.spec.name) {
                if entry.busy {
                    return Err(ControlError::Busy {
                        name: pending.spec.name,
                    });
                }
                if entry.record.spec == pending.spec && entry.record.status == Phase::Running {
                    return Ok((entry.record.clone(), false));
                }
                return Err(ControlError::AlreadyExists {
                    name: pending.spec.name,
                });
            }
            // After the lookup: a retried create of a sandbox that exists answers it, even
            // a second after its expiry was computed.
            refuse_past_expiry(pending.spec.expire_time)?;
            reg.insert(Arc::new(pending.clone()), true);
        }
        match self.place(&pending.spec, None) {
            Ok(node) => pending.node = node,
            Err(e) => {
                self.lock().remove(&pending.spec.name);
                return Err(e);
            }
        }
        let this = self.clone();
        let record =
            super::detached(async move { this.finish_create(pending, stdin, applied).await })
                .await?;
        Ok((record, true))
    }

    /// Picks the node for a sandbox and reserves its slot and host ports there (released
    /// by [`ControlPlane::unplace`]); `avoid` is a node to pass over if another has room.
    pub(super) fn place(
        &self,
        spec: &SandboxSpec,
        avoid: Option<&str>,
    ) -> Result<String, ControlError> {
        let ports = host_ports(spec);
        let image = spec.image.as_deref().map(crate::nodes::image_key);
        let demand = Demand {
            backend: spec.backend,
            image: image.as_deref(),
            ports: &ports,
            pool: spec.pool.as_deref(),
            avoid: avoid.and_then(|n| self.inner.nodes.index(n)),
        };
        let started = std::time::Instant::now();
        let placed = self.inner.nodes.allocate(&demand);
        let metrics = &self.inner.metrics;
        metrics.scheduled(started.elapsed());
        match placed {
            Ok((node, _)) => Ok(node),
            Err(e) => {
                metrics.error(e.reason());
                // No agent runs the backend: say why the server's own cannot (its probe's
                // reason, "no /dev/kvm"), as a one-machine server always did.
                if let ScheduleError::NoAgent {
                    backend,
                    pool: None,
                } = &e
                    && let Some(Err(reason)) = self
                        .agent()
                        .report()
                        .into_iter()
                        .find(|r| r.kind == *backend)
                        .map(|r| r.available)
                {
                    return Err(ControlError::Agent(AgentError::Unavailable {
                        kind: *backend,
                        node: self.agent().node().to_string(),
                        reason,
                    }));
                }
                Err(ControlError::Schedule(e))
            }
        }
    }

    /// Gives back what [`ControlPlane::place`] reserved.
    pub(super) fn unplace(&self, rec: &SandboxRecord) {
        self.inner.nodes.release(&rec.node, &host_ports(&rec.spec));
    }

    /// Runs the sandbox and records it, in its consistency mode (the spec's, else the
    /// server's default):
    /// - **Strong**: the record is durable as `Creating` before the agent runs anything, and
    ///   as `Running` before the reply; a failed run removes the record again. A sandbox
    ///   the caller was told about always survives a crash of the server.
    /// - **Fast**: the agent runs first and the reply does not wait for the disk: the
    ///   `Running` record is queued to the store (in order with later changes) and written
    ///   behind. If that write fails, the sandbox is removed again (it is an orphan no
    ///   record describes), as the start-up reconcile or the agent's janitor would after a
    ///   crash.
    async fn finish_create(
        &self,
        mut rec: SandboxRecord,
        stdin: Option<Stdin>,
        policy: Option<AppliedPolicy>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = rec.spec.name.clone();
        let strong = self.consistency_of(&rec.spec) == Consistency::Strong;
        if strong && let Err(e) = self.persist(&rec).await {
            self.unplace(&rec);
            self.lock().remove(&name);
            return Err(e);
        }
        let config = SandboxConfig {
            id: rec.id.clone(),
            spec: rec.spec.clone(),
            resources: rec.resources.clone(),
            stdin,
            policy,
        };
        let node = self.node(&rec);
        let info = match node.run(&config).await {
            Ok(info) => info,
            Err(e) => {
                self.unplace(&rec);
                self.forget_create(&name, strong).await;
                if matches!(e, AgentError::Unreachable { .. }) {
                    self.inner.metrics.error("agent_unreachable");
                }
                return Err(e.into());
            }
        };
        rec.status = Phase::Running;
        rec.backend_info = info;
        rec.revision = 1;
        rec.updated_at_ms = now_ms();
        let name = rec.spec.name.clone();
        let value = serde_json::to_vec(&rec).map_err(|e| ControlError::Internal(e.to_string()));
        let queued = value.and_then(|value| {
            let write = Write::Put {
                key: record::key(&name),
                value,
            };
            Ok(if strong {
                self.inner.store.submit(write)?
            } else {
                self.inner.store.submit_behind(write)?
            })
        });
        let durable = match queued {
            Ok(ack) if strong => ack
                .await
                .map_err(|_| ControlError::Store(StoreError::Closed))
                .and_then(|r| r.map_err(ControlError::from)),
            Ok(ack) => {
                let this = self.clone();
                let (kind, id, name) = (rec.spec.backend, rec.id.clone(), name.clone());
                let node = node.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(())) = ack.await {
                        return;
                    }
                    warn!(sandbox = %name, "a fast create could not be persisted; removing it");
                    this.inner.metrics.error("persist");
                    if let Err(e) = node.delete(kind, &id).await {
                        warn!(sandbox = %name, error = %e, "removing an unpersisted sandbox failed");
                    }
                    let mut reg = this.lock();
                    if let Some(entry) = reg.sandboxes.get(&name)
                        && entry.record.id == id
                    {
                        let mut gone = (*entry.record).clone();
                        gone.status = Phase::Deleted;
                        this.unplace(&gone);
                        reg.remove(&name);
                        this.emit(&mut reg, EventKind::Deleted, Arc::new(gone));
                    }
                });
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = durable {
            // Not acknowledged, so not kept: undo the backend's work.
            if let Err(undo) = node.delete(rec.spec.backend, &rec.id).await {
                warn!(sandbox = %name, error = %undo, "rollback after a failed persist failed");
            }
            self.inner.metrics.error("persist");
            self.unplace(&rec);
            self.forget_create(&name, strong).await;
            return Err(e);
        }
        self.pool_started(&rec);
        Ok(self.publish(rec, EventKind::Added))
    }

    /// Drops the registry entry of a create that failed (and, in strong mode, its record).
    async fn forget_create(&self, name: &str, strong: bool) {
        if strong
            && let Err(e) = self
                .inner
                .store
                .write(Write::Delete {
                    key: record::key(name),
                })
                .await
        {
            warn!(sandbox = %name, error = %e, "could not remove the record of a failed create");
        }
        self.lock().remove(name);
    }
}

/// An expiry already past would delete the sandbox as it is made: refused, naming the
/// field, at create and when an update sets it. (The current second is still accepted.)
pub(super) fn refuse_past_expiry(expire_time: Option<i64>) -> Result<(), ControlError> {
    let now = now_ms() / 1000;
    match expire_time {
        Some(t) if t < now => Err(ControlError::InvalidSpec(format!(
            "spec.expireTime: \"{t}\" is in the past (the server's clock says {now}, in unix \
             seconds): the sandbox would be deleted as soon as it is made"
        ))),
        _ => Ok(()),
    }
}
