//! The control plane's core: the sandbox registry and every state change.
//!
//! All mutations of a sandbox go through here, and each holds the sandbox's `busy` mark from
//! start to end, so two operations on one name never interleave (the second is refused with
//! `Busy`, which callers may retry). The registry lock is held only for map updates, never
//! across an await. The slow part of a mutation (backend, store) runs in a spawned task, so a
//! client that hangs up mid-call cannot leave a sandbox half-made or forever busy.
//!
//! Order of a create: validate -> reserve the name -> place it on a node (the scheduler,
//! `nodes.rs`) -> backend create + start on that node's agent -> persist (group commit) ->
//! acknowledge. A crash before the commit leaves at most backend state without a record,
//! which the start-up reconcile (local agent) or the agent's janitor (every agent) removes
//! as an orphan; an acknowledged create is always in the store.
//!
//! What happens when a node or a sandbox fails (Lost, AutoRecreate) is in `plane/failure.rs`,
//! heartbeats and the janitor's questions in `plane/cluster.rs`, pools in `plane/pools.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};
use warren_agent::{Agent, AgentError};
use warren_runtime::{BackendEvent, BackendStatus, SandboxConfig};
use warren_spec::{
    BackendKind, Consistency, FailurePolicy, Phase, ResourceInfo, ResourceRequirements, SandboxSpec,
};

use crate::metrics::Metrics;
use crate::nodes::{NodeHandle, Nodes};
use crate::record::{self, SandboxRecord, now_ms};
use crate::scheduler::HostPort;
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
    /// The busy operation is a pause, an unpause or a checkpoint: a signal or an exec would
    /// race the freeze (a signal thaws, an exec would join a workload being frozen, or be
    /// left out of the checkpoint), so they wait.
    pausing: bool,
}

impl Entry {
    /// Moves the record to `next` in memory (a step of a busy operation, stored at its
    /// end); returns the new record, for the caller to emit.
    fn step(&mut self, next: Phase) -> Arc<SandboxRecord> {
        let mut changed = (*self.record).clone();
        changed.status = next;
        // Each step is a stop, a delete or a create: the workload is no longer paused (the
        // backends resume a paused one before they stop it).
        changed.paused = false;
        self.record = Arc::new(changed);
        self.record.clone()
    }
}

/// Runs the slow part of an operation in a task of its own, so that a client hanging up
/// mid-call cannot leave a sandbox half made or forever busy.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ControlError>> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))?
}

#[derive(Debug, Default)]
struct Registry {
    sandboxes: HashMap<String, Entry>,
    /// Sandbox id -> name, for backend events (backends know ids, not names).
    ids: HashMap<String, String>,
    /// Backend events that arrived while their sandbox was busy; applied when it is released.
    deferred: HashMap<String, BackendStatus>,
    /// AutoRecreate sandboxes waiting to be created again (Lost or Failed), by name.
    recovering: HashMap<String, failure::Recovery>,
    /// Callers of [`ControlPlane::wait`], by sandbox name: answered by the next terminal
    /// record of that name (so each end wakes its own waiters, not every waiter).
    waiters: HashMap<String, Vec<oneshot::Sender<Arc<SandboxRecord>>>>,
    sequence: u64,
}

impl Registry {
    fn insert(&mut self, record: Arc<SandboxRecord>, busy: bool) {
        self.ids.insert(record.id.clone(), record.spec.name.clone());
        self.sandboxes.insert(
            record.spec.name.clone(),
            Entry {
                record,
                busy,
                pausing: false,
            },
        );
    }

    fn remove(&mut self, name: &str) {
        if let Some(entry) = self.sandboxes.remove(name) {
            self.ids.remove(&entry.record.id);
            self.deferred.remove(&entry.record.id);
        }
        self.recovering.remove(name);
    }

    /// The sandbox, if it exists and no other operation holds it.
    fn idle_entry(&mut self, name: &str) -> Result<&mut Entry, ControlError> {
        let entry = self
            .sandboxes
            .get_mut(name)
            .ok_or_else(|| ControlError::NotFound { name: name.into() })?;
        if entry.busy {
            if entry.record.status == Phase::Stopping {
                return Err(ControlError::Stopping { name: name.into() });
            }
            return Err(ControlError::Busy { name: name.into() });
        }
        Ok(entry)
    }

    /// [`Registry::idle_entry`], Running.
    fn idle_running_entry(&mut self, name: &str) -> Result<&mut Entry, ControlError> {
        let entry = self.idle_entry(name)?;
        if entry.record.status != Phase::Running {
            return Err(ControlError::NotRunning {
                name: name.into(),
                phase: entry.record.status.name().to_string(),
            });
        }
        Ok(entry)
    }

    /// Clears the busy mark; returns a deferred backend event to apply now.
    fn release(&mut self, name: &str) -> Option<BackendEvent> {
        let entry = self.sandboxes.get_mut(name)?;
        entry.busy = false;
        entry.pausing = false;
        let id = entry.record.id.clone();
        self.deferred
            .remove(&id)
            .map(|status| BackendEvent { id, status })
    }
}

#[derive(Debug)]
struct Inner {
    nodes: Nodes,
    store: Arc<dyn Store>,
    registry: Mutex<Registry>,
    events: broadcast::Sender<Event>,
    default_grace: Duration,
    /// For creates whose spec names no consistency (`warren server --consistency`).
    default_consistency: Consistency,
    metrics: Metrics,
    policies: policy::Policies,
    pools: pools::Pools,
    checkpoints: checkpoint::Checkpointing,
    /// Orders `warren image rm` against new sandboxes. A create or restore registers its
    /// sandbox holding a read guard; a removal holds the write guard from its check of the
    /// image's users to the deletion of its layers. So a new sandbox is either seen by the
    /// check (the removal is refused) or finds the image gone (its create fails cleanly);
    /// never a root whose layers are deleted under it.
    images: tokio::sync::RwLock<()>,
}

/// How a control plane is set up beyond its agent and store.
#[derive(Debug, Clone)]
pub struct PlaneOptions {
    pub default_grace: Duration,
    /// Most sandboxes the in-process agent holds (`None`: no limit but the backends'; 0: it
    /// runs nothing, the server only controls remote agents).
    pub local_capacity: Option<u32>,
    /// A remote agent silent for this long is lost.
    pub agent_timeout: Duration,
    pub default_consistency: Consistency,
}

impl Default for PlaneOptions {
    fn default() -> Self {
        PlaneOptions {
            default_grace: Duration::from_secs(10),
            local_capacity: None,
            agent_timeout: crate::nodes::DEFAULT_AGENT_TIMEOUT,
            default_consistency: Consistency::Fast,
        }
    }
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

/// Expired sandboxes deleted at once by one sweep.
const EXPIRE_AT_ONCE: usize = 64;

impl ControlPlane {
    pub fn new(agent: Agent, store: Arc<dyn Store>, default_grace: Duration) -> Self {
        Self::with_options(
            agent,
            store,
            PlaneOptions {
                default_grace,
                ..PlaneOptions::default()
            },
        )
    }

    pub fn with_options(agent: Agent, store: Arc<dyn Store>, options: PlaneOptions) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        ControlPlane {
            inner: Arc::new(Inner {
                nodes: Nodes::new(agent, options.local_capacity, options.agent_timeout),
                store,
                registry: Mutex::default(),
                events,
                default_grace: options.default_grace,
                default_consistency: options.default_consistency,
                metrics: Metrics::default(),
                policies: policy::Policies::default(),
                pools: pools::Pools::default(),
                checkpoints: checkpoint::Checkpointing::default(),
                images: tokio::sync::RwLock::new(()),
            }),
        }
    }

    /// The server's in-process agent.
    pub fn agent(&self) -> &Agent {
        self.inner.nodes.local()
    }

    pub fn nodes(&self) -> &Nodes {
        &self.inner.nodes
    }

    /// The node a sandbox lives on.
    fn node(&self, rec: &SandboxRecord) -> NodeHandle {
        self.inner.nodes.handle(&rec.node)
    }

    /// The backend config of a stored sandbox (no stdin: a restart or a re-create reads
    /// none).
    fn config_of(&self, rec: &SandboxRecord) -> SandboxConfig {
        SandboxConfig {
            id: rec.id.clone(),
            spec: rec.spec.clone(),
            resources: rec.resources.clone(),
            stdin: None,
            policy: self.applied_of(rec),
        }
    }

    /// The consistency a create of `spec` gets: its own, else the server's default.
    pub fn consistency_of(&self, spec: &SandboxSpec) -> Consistency {
        spec.consistency.unwrap_or(self.inner.default_consistency)
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

    /// Names of the sandboxes whose record passes `keep`, sorted.
    fn sandbox_names(&self, keep: impl Fn(&SandboxRecord) -> bool) -> Vec<String> {
        let reg = self.lock();
        let mut names: Vec<String> = reg
            .sandboxes
            .values()
            .filter(|e| keep(&e.record))
            .map(|e| e.record.spec.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Held while a new sandbox is registered (see `Inner::images`).
    pub(crate) async fn registering(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.inner.images.read().await
    }

    /// Held by an image removal from its check of the image's users
    /// ([`ControlPlane::sandboxes_of_image`]) to the deletion of its layers: no sandbox is
    /// registered meanwhile.
    pub async fn removing_image(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.inner.images.write().await
    }

    /// Sandboxes on the server's own node made from the image `id`, in any phase, sorted:
    /// what `warren image rm` must not pull the layers from under. The image is the one
    /// their backend recorded, or, for a create still in flight (not placed yet, or not
    /// recorded), the one `resolve` finds for the spec's image name.
    pub fn sandboxes_of_image(
        &self,
        id: &str,
        resolve: impl Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let node = self.agent().node().to_string();
        self.sandbox_names(|r| {
            (r.node == node || r.node.is_empty())
                && match r.backend_info.get("image") {
                    Some(image) => image == id,
                    None => r
                        .spec
                        .image
                        .as_deref()
                        .and_then(&resolve)
                        .is_some_and(|i| i == id),
                }
        })
    }

    /// Records a new state of a sandbox and tells watchers. Call with the registry locked, so
    /// sequence numbers follow the order of the changes.
    fn emit(&self, registry: &mut Registry, kind: EventKind, record: Arc<SandboxRecord>) {
        registry.sequence += 1;
        if ends_a_wait(&record)
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

    /// Loads every record from the store and reconciles it with the in-process agent's
    /// backends: what the store has there is adopted; what the backends have beyond it is
    /// removed as an orphan. Sandboxes on remote agents are counted on their nodes, which
    /// wait for their agents to heartbeat (the plane then hands them back) or to time out
    /// (their sandboxes are then Lost).
    pub async fn recover(&self) -> Result<usize, ControlError> {
        let policies = self.recover_policies(self.inner.store.as_ref())?;
        info!(policies, "policies loaded");
        let pools = self.recover_pools()?;
        info!(pools, "pools loaded");
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
        let local = self.agent().clone();
        let held: HashSet<(BackendKind, String)> = local.list().await?.into_iter().collect();
        for mut rec in loaded {
            // A record from before nodes were named in full (or a renamed server) whose
            // sandbox the local backends hold is local.
            let on_local = rec.node == local.node()
                || rec.node.is_empty()
                || held.contains(&(rec.spec.backend, rec.id.clone()));
            if !on_local {
                self.inner.nodes.take(&rec.node, &host_ports(&rec.spec));
                self.lock().insert(Arc::new(rec), false);
                continue;
            }
            rec.node = local.node().to_string();
            known.insert((rec.spec.backend, rec.id.clone()));
            let config = self.config_of(&rec);
            let was = rec.status.clone();
            let was_paused = rec.paused;
            match local.adopt(&config).await {
                Ok((status, info)) => {
                    rec.status = phase_of(&status);
                    rec.backend_info = info;
                    // An ended workload does not start again by itself; a backend that keeps
                    // no state of its own (slot) reports everything it re-accounts as
                    // Running. The record stays as it ended, and the backend is told.
                    if was.is_terminal() && rec.status == Phase::Running {
                        if let Err(e) = local.stop(rec.spec.backend, &rec.id, Duration::ZERO).await
                        {
                            warn!(sandbox = %rec.spec.name, error = %e, "could not stop an ended sandbox the backend reports running");
                        }
                        rec.status = was.clone();
                    }
                }
                Err(e) if e.is_not_found() => {
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
            if rec.status != Phase::Running {
                // Only a Running workload can be frozen.
                rec.paused = false;
            } else if let Some(paused) = local.paused(rec.spec.backend, &rec.id).await {
                // What the backend sees wins: a workload frozen or thawed while no server
                // watched (killed between a freeze and its record, say).
                if paused != rec.paused {
                    warn!(sandbox = %rec.spec.name, paused, "the record's pause did not match the workload's; the record follows it");
                }
                rec.paused = paused;
            }
            if rec.status != was || rec.paused != was_paused {
                info!(sandbox = %rec.spec.name, from = %was, to = %rec.status, "recovered with a new status");
                rec.revision += 1;
                rec.updated_at_ms = now_ms();
                self.persist(&rec).await?;
            }
            self.inner.nodes.take(&rec.node, &host_ports(&rec.spec));
            self.lock().insert(Arc::new(rec), false);
        }
        for (kind, id) in held {
            if known.contains(&(kind, id.clone())) {
                continue;
            }
            match local.delete(kind, &id).await {
                Ok(()) => info!(backend = %kind, id, "removed an orphan the store does not know"),
                Err(e) => warn!(backend = %kind, id, error = %e, "could not remove an orphan"),
            }
        }
        self.refresh_pools();
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
        self.delete_as(name, None, grace, false).await
    }

    /// [`Plane::delete`], of the sandbox with id `id` only when one is given: a name that now
    /// belongs to another sandbox is [`ControlError::IdMismatch`] and nothing is deleted.
    pub async fn delete_id(
        &self,
        name: &str,
        id: Option<&str>,
        grace: Option<Duration>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        self.delete_as(name, id, grace, false).await
    }

    /// Stops a Running sandbox's workload (SIGTERM, then SIGKILL after `grace`, else the
    /// sandbox's own grace period) and keeps the sandbox: Running -> Stopping -> Stopped, as
    /// `docker stop`. Its placement stays (as an exited sandbox's does) until it is deleted.
    /// A sandbox in any other phase is returned as it is.
    pub async fn stop(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let (before, rec) = {
            let mut reg = self.lock();
            let entry = reg.idle_entry(name)?;
            if !entry.record.status.can_transition_to(&Phase::Stopping) {
                return Ok(entry.record.clone());
            }
            entry.busy = true;
            let before = entry.record.clone();
            let rec = entry.step(Phase::Stopping);
            self.emit(&mut reg, EventKind::Modified, rec.clone());
            (before, rec)
        };
        let grace = self.grace_of(&rec, grace);
        let this = self.clone();
        detached(async move { this.finish_stop(before, rec, grace).await }).await
    }

    async fn finish_stop(
        &self,
        before: Arc<SandboxRecord>,
        rec: Arc<SandboxRecord>,
        grace: Duration,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = rec.spec.name.clone();
        let stopped = match self.node(&rec).stop(rec.spec.backend, &rec.id, grace).await {
            // Failed keeps its reason (an OOM kill during the grace period, say); any other
            // end was asked for.
            Ok(status) => match phase_of(&status) {
                failed @ Phase::Failed { .. } => failed,
                _ => Phase::Stopped,
            },
            Err(e) => {
                // Nothing changed that the plane knows of: it is Running again, and the
                // backend's own report of an end, if any, follows. A backend that got the
                // stop resumed a paused workload first thing; an agent the stop did not
                // reach (or whose answer was lost) may still hold it frozen, so the record
                // keeps its pause then (`unpause` reaches the backend either way).
                let reached = !matches!(e, AgentError::Unreachable { .. });
                if reached && before.paused {
                    let mut running = (*before).clone();
                    running.paused = false;
                    running.revision += 1;
                    running.updated_at_ms = now_ms();
                    self.write_behind(&running);
                    self.publish(running, EventKind::Modified);
                } else {
                    self.publish((*before).clone(), EventKind::Modified);
                }
                return Err(e.into());
            }
        };
        let mut done = (*rec).clone();
        done.status = stopped;
        done.revision += 1;
        done.updated_at_ms = now_ms();
        if let Err(e) = self.persist(&done).await {
            warn!(sandbox = %name, error = %e, "could not persist a stopped sandbox");
            self.publish(done, EventKind::Modified);
            return Err(e);
        }
        self.inner.metrics.observe(done.spec.backend, &done.status);
        info!(sandbox = %name, status = %done.status, "stopped");
        Ok(self.publish(done, EventKind::Modified))
    }

    /// The grace period of a stop: the call's, else the sandbox's, else the server's.
    fn grace_of(&self, rec: &SandboxRecord, grace: Option<Duration>) -> Duration {
        grace
            .or_else(|| {
                rec.spec
                    .stop_grace_period_seconds
                    .map(Duration::from_secs_f64)
            })
            .unwrap_or(self.inner.default_grace)
    }

    /// [`ControlPlane::delete`]; `expired`: its `expireTime` passed, so it goes through
    /// `Expired` (seed 004's phase) instead of `Stopping`.
    async fn delete_as(
        &self,
        name: &str,
        id: Option<&str>,
        grace: Option<Duration>,
        expired: bool,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let (rec, stop) = {
            let mut reg = self.lock();
            let entry = reg.idle_entry(name)?;
            if let Some(expected) = id.filter(|&id| id != entry.record.id) {
                return Err(ControlError::IdMismatch {
                    name: name.into(),
                    expected: expected.into(),
                    actual: entry.record.id.clone(),
                });
            }
            // An expiry looked at the sandbox a moment ago: its expiry may have been moved or
            // cleared since (the id check above covers one made again under its name).
            if expired
                && entry
                    .record
                    .spec
                    .expire_time
                    .is_none_or(|t| t > now_ms() / 1000)
            {
                return Err(ControlError::NotFound { name: name.into() });
            }
            entry.busy = true;
            let stop = entry.record.status.can_transition_to(&Phase::Stopping);
            let next = if expired {
                Phase::Expired
            } else {
                Phase::Stopping
            };
            let rec = if entry.record.status.can_transition_to(&next) {
                let rec = entry.step(next);
                self.emit(&mut reg, EventKind::Modified, rec.clone());
                rec
            } else {
                entry.record.clone()
            };
            (rec, stop)
        };
        let grace = self.grace_of(&rec, grace);
        let this = self.clone();
        detached(async move { this.finish_delete(rec, grace, stop).await }).await
    }

    async fn finish_delete(
        &self,
        rec: Arc<SandboxRecord>,
        grace: Duration,
        stop: bool,
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
        // A sandbox whose node is lost (or never came back) cannot be reached: its record
        // goes now, and the node's janitor removes the sandbox if the agent returns.
        let reachable = self.inner.nodes.is_up(&rec.node);
        let node = self.node(&rec);
        if stop && reachable {
            match node.stop(kind, &rec.id, grace).await {
                Ok(status) => last = phase_of(&status),
                Err(e) if e.is_not_found() => {}
                // Still try to delete: a backend that cannot stop gracefully must free anyway.
                Err(e) => warn!(sandbox = %name, error = %e, "stop failed; deleting anyway"),
            }
        }
        if reachable {
            match node.delete(kind, &rec.id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    fail(self, format!("delete failed: {e}"));
                    return Err(e.into());
                }
            }
        } else {
            info!(sandbox = %name, node = %rec.node, "node unreachable: deleting the record only; its janitor removes the sandbox");
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
        self.unplace(&rec);
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
        // By name and id: a sweep still at work when another starts must never delete a
        // sandbox made again under an expired one's name.
        let due: Vec<(String, String)> = {
            let reg = self.lock();
            reg.sandboxes
                .values()
                .filter(|e| !e.busy && e.record.spec.expire_time.is_some_and(|t| t <= now_s))
                .map(|e| (e.record.spec.name.clone(), e.record.id.clone()))
                .collect()
        };
        // Side by side (up to EXPIRE_AT_ONCE): each delete may wait out its workload's grace
        // period, and one after another every expiry would be late by all the others'.
        use futures::StreamExt as _;
        futures::stream::iter(due)
            .map(|(name, id)| async move {
                match self.delete_as(&name, Some(&id), None, true).await {
                    Ok(_) => {
                        info!(sandbox = %name, "expired and deleted");
                        1
                    }
                    // Busy (a stop waiting out its grace, say): the next sweep deletes it.
                    // Or made again under its name, or its expiry moved: not this one's.
                    Err(
                        ControlError::Busy { .. }
                        | ControlError::Stopping { .. }
                        | ControlError::NotFound { .. }
                        | ControlError::IdMismatch { .. },
                    ) => 0,
                    Err(e) => {
                        warn!(sandbox = %name, error = %e, "could not delete an expired sandbox");
                        0
                    }
                }
            })
            .buffer_unordered(EXPIRE_AT_ONCE)
            .fold(0, |n, one| async move { n + one })
            .await
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
        // An end (or a loss) ends a pause; a Lost sandbox found Running again keeps its own.
        rec.paused &= next == Phase::Running;
        rec.status = next;
        rec.revision += 1;
        rec.updated_at_ms = now_ms();
        self.write_behind(&rec);
        self.inner.metrics.observe(rec.spec.backend, &rec.status);
        let rec = Arc::new(rec);
        entry.record = rec.clone();
        self.note_failure(&mut reg, &rec);
        self.emit(&mut reg, EventKind::Modified, rec);
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
            if ends_a_wait(&entry.record) && !entry.busy {
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

    /// Starts a process inside a running sandbox.
    pub async fn exec(
        &self,
        name: &str,
        request: warren_runtime::ExecRequest,
    ) -> Result<warren_runtime::ExecProcess, ControlError> {
        let rec = self.running_unpaused(name)?;
        Ok(self
            .node(&rec)
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
        // A stop's grace period can be cut short, as `docker kill` does during `docker stop`:
        // the workload's end then ends the stop, which records it.
        let rec = self.running_as(name, true, true)?;
        let kind = rec.spec.backend;
        let node = self.node(&rec);
        node.signal(kind, &rec.id, signal).await?;
        if rec.status == Phase::Stopping {
            return Ok(());
        }
        // The backend resumed a paused workload to deliver the signal.
        if rec.paused {
            self.note_resumed(&rec);
        }
        // Backends without a process (slot, wasm) stop at once and send no event of their
        // own: the record follows here. A linux workload's end arrives as an event.
        // Such a sandbox ended by a signal, as a process would: exit code 128 + signal.
        if let Ok(status) = node.status(kind, &rec.id).await
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

    /// The processes of a running sandbox, from its node (`warren top`).
    pub async fn processes(
        &self,
        name: &str,
    ) -> Result<Vec<warren_runtime::ProcessInfo>, ControlError> {
        let rec = self.running(name)?;
        // A frozen cgroup's processes are still in /proc; a paused VM's guest answers
        // nothing until it runs again.
        if rec.paused && rec.spec.backend == BackendKind::Vm {
            return Err(ControlError::Paused { name: name.into() });
        }
        Ok(self.node(&rec).processes(rec.spec.backend, &rec.id).await?)
    }

    /// What a running sandbox uses now, from its node; `None` where its backend measures
    /// nothing.
    pub async fn usage(&self, name: &str) -> Result<Option<warren_runtime::Usage>, ControlError> {
        let rec = self.running(name)?;
        Ok(self.node(&rec).usage(rec.spec.backend, &rec.id).await?)
    }

    /// The sandbox's record, if it is Running.
    fn running(&self, name: &str) -> Result<Arc<SandboxRecord>, ControlError> {
        self.running_as(name, false, false)
    }

    /// [`ControlPlane::running`]; `settled`: `Busy` while a pause or an unpause is under
    /// way (for a signal or an exec, which would race it).
    /// The record of a Running sandbox (`stopping_too`: or one being stopped); `settled`: not
    /// while a pause or unpause is under way.
    fn running_as(
        &self,
        name: &str,
        settled: bool,
        stopping_too: bool,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let rec = {
            let reg = self.lock();
            let entry = reg
                .sandboxes
                .get(name)
                .ok_or_else(|| ControlError::NotFound { name: name.into() })?;
            if settled && entry.pausing {
                return Err(ControlError::Busy { name: name.into() });
            }
            entry.record.clone()
        };
        if rec.status != Phase::Running && !(stopping_too && rec.status == Phase::Stopping) {
            return Err(ControlError::NotRunning {
                name: name.into(),
                phase: rec.status.name().to_string(),
            });
        }
        Ok(rec)
    }

    /// Where a sandbox's output is: a local log file with a flag that turns true once the
    /// sandbox has finished (so a follower knows when to stop), or its remote agent.
    pub async fn log_source(&self, name: &str) -> Result<LogSource, ControlError> {
        let (rec, mut rx) = {
            let reg = self.lock();
            let entry = reg
                .sandboxes
                .get(name)
                .ok_or_else(|| ControlError::NotFound { name: name.into() })?;
            (entry.record.clone(), self.inner.events.subscribe())
        };
        let kind = rec.spec.backend;
        let agent = match self.node(&rec) {
            NodeHandle::Local(agent) => agent,
            NodeHandle::Remote(remote) => {
                return Ok(LogSource::Remote {
                    agent: remote,
                    id: rec.id.clone(),
                });
            }
            NodeHandle::Unregistered(node) => {
                return Err(ControlError::Agent(AgentError::Unreachable {
                    node,
                    address: "-".into(),
                    message: "its agent has not registered with this server".into(),
                }));
            }
        };
        let path = agent
            .log_path(kind, &rec.id)
            .ok_or_else(|| ControlError::NoLogs {
                name: name.into(),
                backend: kind,
            })?;
        if rec.status.is_terminal() {
            agent.logs_settled(kind, &rec.id).await;
        }
        let (done_tx, done_rx) = watch::channel(rec.status.is_terminal());
        let run = rec.id.clone();
        let next_run = Arc::new(std::sync::OnceLock::new());
        if !rec.status.is_terminal() {
            let name = name.to_string();
            let id = rec.id.clone();
            let created = rec.created_at_ms;
            let next = Arc::clone(&next_run);
            let this = self.clone();
            tokio::spawn(async move {
                // What the name holds now: the same run ended (or is gone), or a new run of
                // the same sandbox replaced it (a restart, AutoRecreate: the record moves to
                // a new id without ending first, keeping its creation time), whose log is
                // another file. Another sandbox made under the name (seen after missed
                // events) is not a next run.
                let seen = |rec: Option<&SandboxRecord>| match rec {
                    None => Some(None),
                    Some(now) if now.id != id && now.created_at_ms == created => {
                        Some(Some(now.id.clone()))
                    }
                    Some(now) if now.id != id || now.status.is_terminal() => Some(None),
                    Some(_) => None,
                };
                let replaced = loop {
                    let found = tokio::select! {
                        ev = rx.recv() => match ev {
                            Ok(ev) if ev.record.spec.name == name => seen(Some(&ev.record)),
                            Ok(_) => None,
                            // Events were missed: the registry says where things stand.
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let now = this.lock().sandboxes.get(&name).map(|e| e.record.clone());
                                seen(now.as_deref())
                            }
                            Err(broadcast::error::RecvError::Closed) => Some(None),
                        },
                        // Nobody follows any more.
                        _ = done_tx.closed() => return,
                    };
                    if let Some(replaced) = found {
                        break replaced;
                    }
                };
                if let Some(new) = replaced {
                    let _ = next.set(new);
                }
                agent.logs_settled(kind, &rec.id).await;
                let _ = done_tx.send(true);
            });
        }
        Ok(LogSource::File {
            path,
            done: done_rx,
            id: run,
            next_run,
        })
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
        for r in self.agent().allocated().values() {
            add(&mut allocated, r);
        }
        Summary {
            node: self.agent().node().to_string(),
            store: self.inner.store.describe(),
            sandboxes,
            by_backend,
            allocated,
        }
    }
}

/// Adds `r` to `total` field by field; a field set in neither stays unset. Whole numbers
/// stop at `u64::MAX` (no overflow, however large the parts).
pub fn add(total: &mut ResourceInfo, r: &ResourceInfo) {
    fn sum<T: Copy>(a: Option<T>, b: Option<T>, plus: impl Fn(T, T) -> T) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some(plus(a, b)),
            (a, b) => a.or(b),
        }
    }
    let cores = |a: f64, b: f64| a + b;
    total.cpu_limit = sum(total.cpu_limit, r.cpu_limit, cores);
    total.cpu_request = sum(total.cpu_request, r.cpu_request, cores);
    total.memory_limit = sum(total.memory_limit, r.memory_limit, u64::saturating_add);
    total.memory_request = sum(total.memory_request, r.memory_request, u64::saturating_add);
    total.pid_limit = sum(total.pid_limit, r.pid_limit, u64::saturating_add);
    total.storage_limit = sum(total.storage_limit, r.storage_limit, u64::saturating_add);
    total.network_bandwidth = sum(
        total.network_bandwidth,
        r.network_bandwidth,
        u64::saturating_add,
    );
}

/// Whether a waiter ([`ControlPlane::wait`]) is answered by this record: its sandbox has
/// finished, or is Lost with nobody to bring it back (Manual).
fn ends_a_wait(rec: &SandboxRecord) -> bool {
    rec.status.is_terminal()
        || (matches!(rec.status, Phase::Lost { .. })
            && rec.spec.failure_policy == FailurePolicy::Manual)
}

/// The host ports a sandbox publishes on its node.
pub fn host_ports(spec: &SandboxSpec) -> Vec<HostPort> {
    spec.ports
        .iter()
        .filter_map(|p| {
            p.host_port.map(|port| HostPort {
                protocol: p.protocol,
                port,
            })
        })
        .collect()
}

/// Where [`ControlPlane::log_source`] finds a sandbox's output.
#[derive(Debug)]
pub enum LogSource {
    /// A log file on this host, and a flag that turns true once the sandbox has finished, or
    /// was replaced by a new run of itself under another id (`id` being this one's): that
    /// run's id is then in `next_run` (set before `done` turns true). A sandbox deleted and
    /// another one made under its name is no next run.
    File {
        path: std::path::PathBuf,
        done: watch::Receiver<bool>,
        id: String,
        next_run: Arc<std::sync::OnceLock<String>>,
    },
    /// The agent holding it.
    Remote {
        agent: Arc<warren_agent::remote::RemoteAgent>,
        id: String,
    },
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
mod cluster;
mod create;
mod error;
mod failure;
mod pause;
pub(crate) use failure::duration_text;
mod policy;
mod pools;
mod update;

pub use checkpoint::{CheckpointSource, CheckpointTarget, Taken};
pub use error::ControlError;
pub use policy::{DEFAULT_POLICY, PolicyEntry};
pub use pools::{PoolEntry, PoolSpec, PoolStatus};

#[cfg(test)]
mod tests;
