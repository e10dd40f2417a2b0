//! The control plane's core: the sandbox registry and every state change.
//!
//! All mutations of a sandbox go through here, and each holds the sandbox's `busy` mark from
//! start to end, so two operations on one name never interleave (the second is refused with
//! `Busy`, which callers may retry). The registry lock is held only for map updates, never
//! across an await. The slow part of a mutation (backend, store) runs in a spawned task, so a
//! client that hangs up mid-call cannot leave a sandbox half-made or forever busy.
//!
//! Order of a create (one machine): validate -> reserve the name -> backend create + start ->
//! persist (group commit) -> acknowledge. A crash before the commit leaves at most backend
//! state without a record, which the start-up reconcile removes as an orphan; an
//! acknowledged create is always in the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};
use warren_agent::{Agent, AgentError};
use warren_runtime::{
    AppliedPolicy, BackendError, BackendEvent, BackendStatus, SandboxConfig, Stdin,
};
use warren_spec::{
    BackendKind, Consistency, FailurePolicy, Phase, ResourceInfo, ResourceRequirements, SandboxSpec,
};

use crate::metrics::Metrics;
use crate::record::{self, PolicyRecord, SandboxRecord, now_ms};
use crate::selector::Selector;
use crate::store::{Store, StoreError, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub record: Arc<SandboxRecord>,
    pub sequence: u64,
}

/// The changes `UpdateSandbox` can make; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SandboxUpdate {
    pub resources: Option<ResourceRequirements>,
    pub set_labels: BTreeMap<String, String>,
    pub remove_labels: Vec<String>,
    pub set_annotations: BTreeMap<String, String>,
    pub remove_annotations: Vec<String>,
    /// `Some(None)` clears the expiry.
    pub expire_time: Option<Option<i64>>,
    pub failure_policy: Option<FailurePolicy>,
    pub expected_revision: Option<u64>,
    /// A new value re-creates the sandbox.
    pub reset_revision: Option<String>,
}

#[derive(Debug)]
struct Entry {
    record: Arc<SandboxRecord>,
    busy: bool,
}

#[derive(Debug, Default)]
struct Registry {
    sandboxes: HashMap<String, Entry>,
    /// Sandbox id -> name, for backend events (backends know ids, not names).
    ids: HashMap<String, String>,
    /// Backend events that arrived while their sandbox was busy; applied when it is released.
    deferred: HashMap<String, BackendStatus>,
    /// Callers of [`ControlPlane::wait`], by sandbox name: answered by the next terminal
    /// record of that name (so each end wakes its own waiters, not every waiter).
    waiters: HashMap<String, Vec<oneshot::Sender<Arc<SandboxRecord>>>>,
    sequence: u64,
}

impl Registry {
    fn insert(&mut self, record: Arc<SandboxRecord>, busy: bool) {
        self.ids.insert(record.id.clone(), record.spec.name.clone());
        self.sandboxes
            .insert(record.spec.name.clone(), Entry { record, busy });
    }

    fn remove(&mut self, name: &str) {
        if let Some(entry) = self.sandboxes.remove(name) {
            self.ids.remove(&entry.record.id);
            self.deferred.remove(&entry.record.id);
        }
    }

    /// The sandbox, if it exists and no other operation holds it.
    fn idle_entry(&mut self, name: &str) -> Result<&mut Entry, ControlError> {
        let entry = self
            .sandboxes
            .get_mut(name)
            .ok_or_else(|| ControlError::NotFound { name: name.into() })?;
        if entry.busy {
            return Err(ControlError::Busy { name: name.into() });
        }
        Ok(entry)
    }

    /// Clears the busy mark; returns a deferred backend event to apply now.
    fn release(&mut self, name: &str) -> Option<BackendEvent> {
        let entry = self.sandboxes.get_mut(name)?;
        entry.busy = false;
        let id = entry.record.id.clone();
        self.deferred
            .remove(&id)
            .map(|status| BackendEvent { id, status })
    }
}

#[derive(Debug)]
struct Inner {
    agent: Agent,
    store: Arc<dyn Store>,
    registry: Mutex<Registry>,
    events: broadcast::Sender<Event>,
    default_grace: Duration,
    metrics: Metrics,
    policies: policy::Policies,
    checkpoints: checkpoint::Checkpointing,
}

/// Cheap to clone; every clone is the same control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

/// A watch: the selector, the matching sandboxes now, and every change after them.
pub type Watch = (
    Selector,
    Vec<Arc<SandboxRecord>>,
    broadcast::Receiver<Event>,
);

/// What `ServerInfo` reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub node: String,
    pub store: String,
    pub sandboxes: usize,
    pub by_backend: BTreeMap<BackendKind, usize>,
    pub allocated: ResourceInfo,
}

const EVENT_BUFFER: usize = 4096;

impl ControlPlane {
    pub fn new(agent: Agent, store: Arc<dyn Store>, default_grace: Duration) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        ControlPlane {
            inner: Arc::new(Inner {
                agent,
                store,
                registry: Mutex::default(),
                events,
                default_grace,
                metrics: Metrics::default(),
                policies: policy::Policies::default(),
                checkpoints: checkpoint::Checkpointing::default(),
            }),
        }
    }

    pub fn agent(&self) -> &Agent {
        &self.inner.agent
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Sandboxes by backend and phase name (`Running`, `Exited`...).
    pub fn count_by_phase(&self) -> BTreeMap<(BackendKind, String), usize> {
        let reg = self.lock();
        let mut counts = BTreeMap::new();
        for e in reg.sandboxes.values() {
            let key = (e.record.spec.backend, e.record.status.name().to_string());
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }

    /// Whether the store answers and takes this server's writes (see `Store::ready`).
    pub fn store_ready(&self) -> Result<(), StoreError> {
        self.inner.store.ready()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Registry updates are single assignments; after a panic elsewhere the map is intact.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new state of a sandbox and tells watchers. Call with the registry locked, so
    /// sequence numbers follow the order of the changes.
    fn emit(&self, registry: &mut Registry, kind: EventKind, record: Arc<SandboxRecord>) {
        registry.sequence += 1;
        if record.status.is_terminal()
            && let Some(waiters) = registry.waiters.remove(&record.spec.name)
        {
            for waiter in waiters {
                let _ = waiter.send(record.clone());
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.inner.events.send(Event {
            kind,
            record,
            sequence: registry.sequence,
        });
    }

    /// Loads every record from the store and reconciles it with the node's backends: what
    /// the store has is adopted; what the backends have beyond it is removed as an orphan.
    pub async fn recover(&self) -> Result<usize, ControlError> {
        let policies = self.recover_policies(self.inner.store.as_ref())?;
        info!(policies, "policies loaded");
        let rows = self.inner.store.scan(record::PREFIX)?;
        let mut known = HashSet::new();
        let mut loaded = Vec::new();
        for (key, value) in rows {
            match serde_json::from_slice::<SandboxRecord>(&value) {
                Ok(rec) => loaded.push(rec),
                // Keep the row: a newer warren may read it. Never delete what we cannot parse.
                Err(e) => warn!(key, error = %e, "store: unreadable sandbox record left as it is"),
            }
        }
        for mut rec in loaded {
            known.insert((rec.spec.backend, rec.id.clone()));
            let config = SandboxConfig {
                id: rec.id.clone(),
                spec: rec.spec.clone(),
                resources: rec.resources.clone(),
                stdin: None,
                policy: self.applied_of(&rec),
            };
            let was = rec.status.clone();
            match self.inner.agent.adopt(&config).await {
                Ok((status, info)) => {
                    rec.status = phase_of(&status);
                    rec.backend_info = info;
                }
                Err(AgentError::Backend(BackendError::NotFound { .. })) => {
                    rec.status = Phase::Failed {
                        reason: "lost: the backend no longer has it".into(),
                    };
                }
                Err(e) => {
                    rec.status = Phase::Failed {
                        reason: e.to_string(),
                    }
                }
            }
            if rec.status != was {
                info!(sandbox = %rec.spec.name, from = %was, to = %rec.status, "recovered with a new status");
                rec.revision += 1;
                rec.updated_at_ms = now_ms();
                self.persist(&rec).await?;
            }
            self.lock().insert(Arc::new(rec), false);
        }
        let held = self.inner.agent.list().await?;
        for (kind, id) in held {
            if known.contains(&(kind, id.clone())) {
                continue;
            }
            match self.inner.agent.delete(kind, &id).await {
                Ok(()) => info!(backend = %kind, id, "removed an orphan the store does not know"),
                Err(e) => warn!(backend = %kind, id, error = %e, "could not remove an orphan"),
            }
        }
        Ok(self.lock().sandboxes.len())
    }

    async fn persist(&self, rec: &SandboxRecord) -> Result<(), ControlError> {
        let value = serde_json::to_vec(rec).map_err(|e| ControlError::Internal(e.to_string()))?;
        self.inner
            .store
            .write(Write::Put {
                key: record::key(&rec.spec.name),
                value,
            })
            .await?;
        Ok(())
    }

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
        spec: SandboxSpec,
        stdin: Option<Stdin>,
    ) -> Result<(Arc<SandboxRecord>, bool), ControlError> {
        let resources = spec
            .validate()
            .map_err(|e| ControlError::InvalidSpec(e.to_string()))?;
        let applied = self.admit(&spec, &resources)?;
        let now = now_ms();
        let pending = SandboxRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            spec,
            status: Phase::Creating,
            resources,
            node: self.inner.agent.node().to_string(),
            backend_info: BTreeMap::new(),
            revision: 0,
            created_at_ms: now,
            updated_at_ms: now,
            policy: applied.as_ref().map(|a| PolicyRecord {
                spec: a.policy.spec().clone(),
                decision: a.decision.clone(),
            }),
        };
        {
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
            reg.insert(Arc::new(pending.clone()), true);
        }
        let this = self.clone();
        let done = tokio::spawn(async move { this.finish_create(pending, stdin, applied).await });
        let record = done
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))??;
        Ok((record, true))
    }

    /// Runs the sandbox and records it, in the spec's consistency mode:
    /// - **Strong**: the record is durable as `Creating` before the agent runs anything, and
    ///   as `Running` before the reply; a failed run removes the record again. A sandbox
    ///   the caller was told about always survives a crash of the server.
    /// - **Fast**: the agent runs first and the reply does not wait for the disk: the
    ///   `Running` record is queued to the store (in order with later changes) and written
    ///   behind. If that write fails, the sandbox is removed again (it is an orphan no
    ///   record describes), as the start-up reconcile would after a crash.
    async fn finish_create(
        &self,
        mut rec: SandboxRecord,
        stdin: Option<Stdin>,
        policy: Option<AppliedPolicy>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = rec.spec.name.clone();
        let strong = rec.spec.consistency == Consistency::Strong;
        if strong && let Err(e) = self.persist(&rec).await {
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
        let info = match self.inner.agent.run(&config).await {
            Ok(info) => info,
            Err(e) => {
                self.forget_create(&name, strong).await;
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
                tokio::spawn(async move {
                    if let Ok(Ok(())) = ack.await {
                        return;
                    }
                    warn!(sandbox = %name, "a fast create could not be persisted; removing it");
                    if let Err(e) = this.inner.agent.delete(kind, &id).await {
                        warn!(sandbox = %name, error = %e, "removing an unpersisted sandbox failed");
                    }
                    let mut reg = this.lock();
                    if let Some(entry) = reg.sandboxes.get(&name)
                        && entry.record.id == id
                    {
                        let mut gone = (*entry.record).clone();
                        gone.status = Phase::Deleted;
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
            if let Err(undo) = self.inner.agent.delete(rec.spec.backend, &rec.id).await {
                warn!(sandbox = %name, error = %undo, "rollback after a failed persist failed");
            }
            self.forget_create(&name, strong).await;
            return Err(e);
        }
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

    /// Makes a new state of a busy sandbox current: stores it, releases the sandbox, tells
    /// watchers, and applies any backend event that waited for the release.
    fn publish(&self, rec: SandboxRecord, kind: EventKind) -> Arc<SandboxRecord> {
        let name = rec.spec.name.clone();
        let rec = Arc::new(rec);
        let mut reg = self.lock();
        if let Some(entry) = reg.sandboxes.get_mut(&name) {
            entry.record = rec.clone();
        }
        let deferred = reg.release(&name);
        self.emit(&mut reg, kind, rec.clone());
        drop(reg);
        self.apply_later(deferred);
        rec
    }

    pub fn get(&self, name: &str) -> Result<Arc<SandboxRecord>, ControlError> {
        let reg = self.lock();
        reg.sandboxes
            .get(name)
            .map(|e| e.record.clone())
            .ok_or_else(|| ControlError::NotFound { name: name.into() })
    }

    /// Sandboxes matching the selector (and backends, if any), sorted by name.
    pub fn list(
        &self,
        selector: &str,
        backends: &[BackendKind],
    ) -> Result<Vec<Arc<SandboxRecord>>, ControlError> {
        let selector = Selector::parse(selector)?;
        let reg = self.lock();
        let mut out: Vec<_> = reg
            .sandboxes
            .values()
            .filter(|e| backends.is_empty() || backends.contains(&e.record.spec.backend))
            .filter(|e| selector.matches(&e.record.spec.labels))
            .map(|e| e.record.clone())
            .collect();
        drop(reg);
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    /// Stops and removes a sandbox; returns its last record (phase Deleted).
    pub async fn delete(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let rec = {
            let mut reg = self.lock();
            let entry = reg.idle_entry(name)?;
            entry.busy = true;
            if entry.record.status.can_transition_to(&Phase::Stopping) {
                let mut stopping = (*entry.record).clone();
                stopping.status = Phase::Stopping;
                entry.record = Arc::new(stopping);
                let rec = entry.record.clone();
                self.emit(&mut reg, EventKind::Modified, rec.clone());
                rec
            } else {
                entry.record.clone()
            }
        };
        let grace = grace
            .or_else(|| {
                rec.spec
                    .stop_grace_period_seconds
                    .map(Duration::from_secs_f64)
            })
            .unwrap_or(self.inner.default_grace);
        let this = self.clone();
        let done = tokio::spawn(async move { this.finish_delete(rec, grace).await });
        done.await
            .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    async fn finish_delete(
        &self,
        rec: Arc<SandboxRecord>,
        grace: Duration,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = rec.spec.name.clone();
        let kind = rec.spec.backend;
        let fail = |this: &Self, reason: String| {
            let mut reg = this.lock();
            if let Some(entry) = reg.sandboxes.get_mut(&name) {
                let mut failed = (*entry.record).clone();
                failed.status = Phase::Failed { reason };
                entry.record = Arc::new(failed);
                let r = entry.record.clone();
                // The delete failed: whatever the backend reported meanwhile is stale.
                let _ = reg.release(&name);
                this.emit(&mut reg, EventKind::Modified, r);
            }
        };
        let mut last = rec.status.clone();
        if rec.status == Phase::Stopping {
            match self.inner.agent.stop(kind, &rec.id, grace).await {
                Ok(status) => last = phase_of(&status),
                Err(AgentError::Backend(BackendError::NotFound { .. })) => {}
                // Still try to delete: a backend that cannot stop gracefully must free anyway.
                Err(e) => warn!(sandbox = %name, error = %e, "stop failed; deleting anyway"),
            }
        }
        match self.inner.agent.delete(kind, &rec.id).await {
            Ok(()) | Err(AgentError::Backend(BackendError::NotFound { .. })) => {}
            Err(e) => {
                fail(self, format!("delete failed: {e}"));
                return Err(e.into());
            }
        }
        if let Err(e) = self
            .inner
            .store
            .write(Write::Delete {
                key: record::key(&name),
            })
            .await
        {
            fail(
                self,
                format!("removed from the node but not from the store: {e}"),
            );
            return Err(e.into());
        }
        let mut gone = (*rec).clone();
        gone.status = Phase::Deleted;
        gone.revision += 1;
        gone.updated_at_ms = now_ms();
        let gone = Arc::new(gone);
        let mut reg = self.lock();
        reg.remove(&name);
        self.emit(&mut reg, EventKind::Deleted, gone.clone());
        drop(reg);
        self.inner.metrics.observe(kind, &Phase::Deleted);
        info!(sandbox = %name, last = %last, "deleted");
        Ok(gone)
    }

    /// Current matching sandboxes and a receiver for every later change, with no gap between.
    pub fn watch(&self, selector: &str) -> Result<Watch, ControlError> {
        let selector = Selector::parse(selector)?;
        let reg = self.lock();
        let rx = self.inner.events.subscribe();
        let mut now: Vec<_> = reg
            .sandboxes
            .values()
            .filter(|e| selector.matches(&e.record.spec.labels))
            .map(|e| e.record.clone())
            .collect();
        drop(reg);
        now.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok((selector, now, rx))
    }

    /// Deletes every sandbox whose expiry has passed. Returns how many were deleted.
    pub async fn expire(&self) -> usize {
        let now_s = now_ms() / 1000;
        let due: Vec<String> = {
            let reg = self.lock();
            reg.sandboxes
                .values()
                .filter(|e| !e.busy && e.record.spec.expire_time.is_some_and(|t| t <= now_s))
                .map(|e| e.record.spec.name.clone())
                .collect()
        };
        let mut n = 0;
        for name in due {
            match self.delete(&name, None).await {
                Ok(_) => {
                    info!(sandbox = %name, "expired and deleted");
                    n += 1;
                }
                Err(ControlError::Busy { .. } | ControlError::NotFound { .. }) => {}
                Err(e) => warn!(sandbox = %name, error = %e, "could not delete an expired sandbox"),
            }
        }
        n
    }

    /// Applies the status changes backends report (a workload exited) until the sender goes.
    ///
    /// The loop holds the plane weakly: the backends own the senders and the plane owns the
    /// backends, so a strong reference here would keep the plane (and its store) alive forever.
    pub fn spawn_event_loop(&self, mut events: mpsc::UnboundedReceiver<BackendEvent>) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                ControlPlane { inner }.on_backend_event(ev).await;
            }
        });
    }

    fn apply_later(&self, event: Option<BackendEvent>) {
        if let Some(ev) = event {
            let this = self.clone();
            tokio::spawn(async move { this.on_backend_event(ev).await });
        }
    }

    /// A status the backend noticed (a workload ended). It is published at once and its
    /// record written behind it: the write is queued before the sandbox is released, so no
    /// later write to it can overtake this one, and if the server dies before the commit the
    /// backend reports the same end again when it adopts the sandbox.
    async fn on_backend_event(&self, ev: BackendEvent) {
        let next = phase_of(&ev.status);
        let mut reg = self.lock();
        let Some(name) = reg.ids.get(&ev.id).cloned() else {
            return;
        };
        let Some(entry) = reg.sandboxes.get_mut(&name) else {
            return;
        };
        if entry.busy {
            // Mid-operation (e.g. the create that started it is still persisting): apply
            // once the operation releases the sandbox.
            reg.deferred.insert(ev.id, ev.status);
            return;
        }
        if entry.record.status == next || !entry.record.status.can_transition_to(&next) {
            return;
        }
        let mut rec = (*entry.record).clone();
        rec.status = next;
        rec.revision += 1;
        rec.updated_at_ms = now_ms();
        let durable = serde_json::to_vec(&rec)
            .map_err(|e| ControlError::Internal(e.to_string()))
            .and_then(|value| {
                Ok(self.inner.store.submit_behind(Write::Put {
                    key: record::key(&name),
                    value,
                })?)
            });
        self.inner.metrics.observe(rec.spec.backend, &rec.status);
        let rec = Arc::new(rec);
        entry.record = rec.clone();
        self.emit(&mut reg, EventKind::Modified, rec);
        drop(reg);
        match durable {
            Ok(ack) => {
                tokio::spawn(async move {
                    if let Ok(Err(e)) = ack.await {
                        warn!(sandbox = %name, error = %e, "could not persist a status change");
                    }
                });
            }
            Err(e) => warn!(sandbox = %name, error = %e, "could not persist a status change"),
        }
    }

    /// Waits until the sandbox has finished (Stopped, Exited, Failed) or is deleted.
    pub async fn wait(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let ended = {
            let mut reg = self.lock();
            let entry = reg
                .sandboxes
                .get(name)
                .ok_or_else(|| ControlError::NotFound { name: name.into() })?;
            if entry.record.status.is_terminal() && !entry.busy {
                return Ok(entry.record.clone());
            }
            let (tx, rx) = oneshot::channel();
            let waiters = reg.waiters.entry(name.to_string()).or_default();
            // Callers that gave up (a timeout, a closed connection) leave closed senders.
            waiters.retain(|w| !w.is_closed());
            waiters.push(tx);
            rx
        };
        let ended = async {
            ended
                .await
                .map_err(|_| ControlError::Internal("the server is shutting down".into()))
        };
        match timeout {
            None => ended.await,
            Some(t) => {
                tokio::time::timeout(t, ended)
                    .await
                    .map_err(|_| ControlError::WaitTimeout {
                        name: name.into(),
                        waited: t,
                    })?
            }
        }
    }

    /// The sandbox's log file, and a flag that turns true once it has finished (so a
    /// follower knows when to stop).
    /// Starts a process inside a running sandbox.
    pub async fn exec(
        &self,
        name: &str,
        request: warren_runtime::ExecRequest,
    ) -> Result<warren_runtime::ExecProcess, ControlError> {
        let rec = self.running(name)?;
        Ok(self
            .inner
            .agent
            .exec(rec.spec.backend, &rec.id, request)
            .await?)
    }

    /// Sends a signal to a running sandbox's workload (`warren kill`, containerd's Kill).
    pub async fn signal(&self, name: &str, signal: i32) -> Result<(), ControlError> {
        if !(1..=64).contains(&signal) {
            return Err(ControlError::InvalidArgument(format!(
                "signal: {signal} is not a signal number (1-64)"
            )));
        }
        let rec = self.running(name)?;
        let kind = rec.spec.backend;
        self.inner.agent.signal(kind, &rec.id, signal).await?;
        // Backends without a process (slot, wasm) stop at once and send no event of their
        // own: the record follows here. A linux workload's end arrives as an event.
        // Such a sandbox ended by a signal, as a process would: exit code 128 + signal.
        if let Ok(status) = self.inner.agent.status(kind, &rec.id).await
            && phase_of(&status).is_terminal()
        {
            let status = match status {
                BackendStatus::Stopped => BackendStatus::Exited { code: 128 + signal },
                other => other,
            };
            self.on_backend_event(BackendEvent {
                id: rec.id.clone(),
                status,
            })
            .await;
        }
        Ok(())
    }

    /// The sandbox's record, if it is Running.
    fn running(&self, name: &str) -> Result<Arc<SandboxRecord>, ControlError> {
        let rec = self.get(name)?;
        if rec.status != Phase::Running {
            return Err(ControlError::NotRunning {
                name: name.into(),
                phase: rec.status.name().to_string(),
            });
        }
        Ok(rec)
    }

    pub async fn log_source(
        &self,
        name: &str,
    ) -> Result<(std::path::PathBuf, watch::Receiver<bool>), ControlError> {
        let (rec, mut rx) = {
            let reg = self.lock();
            let entry = reg
                .sandboxes
                .get(name)
                .ok_or_else(|| ControlError::NotFound { name: name.into() })?;
            (entry.record.clone(), self.inner.events.subscribe())
        };
        let kind = rec.spec.backend;
        let path =
            self.inner
                .agent
                .log_path(kind, &rec.id)
                .ok_or_else(|| ControlError::NoLogs {
                    name: name.into(),
                    backend: kind,
                })?;
        if rec.status.is_terminal() {
            self.inner.agent.logs_settled(kind, &rec.id).await;
        }
        let (done_tx, done_rx) = watch::channel(rec.status.is_terminal());
        if !rec.status.is_terminal() {
            let name = name.to_string();
            let this = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        ev = rx.recv() => match ev {
                            Ok(ev) if ev.record.spec.name == name && ev.record.status.is_terminal() => break,
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => break,
                        },
                        // Nobody follows any more.
                        _ = done_tx.closed() => return,
                    }
                }
                this.inner.agent.logs_settled(kind, &rec.id).await;
                let _ = done_tx.send(true);
            });
        }
        Ok((path, done_rx))
    }

    pub fn summary(&self) -> Summary {
        let reg = self.lock();
        let mut by_backend = BTreeMap::new();
        for e in reg.sandboxes.values() {
            *by_backend.entry(e.record.spec.backend).or_insert(0) += 1;
        }
        let sandboxes = reg.sandboxes.len();
        drop(reg);
        let mut allocated = ResourceInfo::default();
        for r in self.inner.agent.allocated().values() {
            add(&mut allocated, r);
        }
        Summary {
            node: self.inner.agent.node().to_string(),
            store: self.inner.store.describe(),
            sandboxes,
            by_backend,
            allocated,
        }
    }
}

/// Adds `r` to `total` field by field; a field set in neither stays unset.
pub fn add(total: &mut ResourceInfo, r: &ResourceInfo) {
    fn sum<T: std::ops::Add<Output = T> + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        }
    }
    total.cpu_limit = sum(total.cpu_limit, r.cpu_limit);
    total.cpu_request = sum(total.cpu_request, r.cpu_request);
    total.memory_limit = sum(total.memory_limit, r.memory_limit);
    total.memory_request = sum(total.memory_request, r.memory_request);
    total.pid_limit = sum(total.pid_limit, r.pid_limit);
    total.storage_limit = sum(total.storage_limit, r.storage_limit);
    total.network_bandwidth = sum(total.network_bandwidth, r.network_bandwidth);
}

fn phase_of(status: &BackendStatus) -> Phase {
    match status {
        BackendStatus::Created | BackendStatus::Running => Phase::Running,
        BackendStatus::Stopped => Phase::Stopped,
        BackendStatus::Exited { code } => Phase::Exited { code: *code },
        BackendStatus::Failed { reason } => Phase::Failed {
            reason: reason.clone(),
        },
    }
}

mod checkpoint;
mod error;
mod policy;
mod update;

pub use checkpoint::{CheckpointSource, CheckpointTarget, Taken};
pub use error::ControlError;
pub use policy::{DEFAULT_POLICY, PolicyEntry};

#[cfg(test)]
mod tests;
