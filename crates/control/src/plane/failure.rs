//! The failure policy: what happens when a node is lost or a sandbox fails.
//!
//! Every tick of the server's supervision loop (`ControlPlane::supervise`):
//! 1. nodes whose agent missed its heartbeats for `--agent-timeout` are marked lost
//!    (`Nodes::check`, the one liveness decision), and every sandbox on them that was
//!    running becomes `Lost` (seed 004's phase), written behind;
//! 2. sandboxes with `failurePolicy: AutoRecreate` that are Lost (for their
//!    `recoveryTimeoutSeconds`, default 0) or Failed (after a back-off of 1, 2, 4... up to
//!    60 s by how often they were re-created) are created again: `Pending` while the
//!    scheduler looks for room (another node if any has it), `Creating` (seed 004's Bound)
//!    on the chosen node, then `Running`, under a new id. The old id is then unknown, so
//!    the old node's janitor removes the old sandbox if that node ever comes back.
//!
//! `Manual` sandboxes are only reported: Lost stays Lost until the agent comes back with the
//! sandbox (then it is Running again, see `plane/cluster.rs`) or someone deletes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use warren_spec::{FailurePolicy, Phase};

use super::{ControlError, ControlPlane, EventKind, Registry, phase_of};
use crate::record::{self, SandboxRecord, now_ms};
use crate::store::Write;

/// An AutoRecreate sandbox waiting to be created again.
#[derive(Debug, Clone)]
pub(crate) struct Recovery {
    /// When it became Lost or Failed.
    since: Instant,
    /// Its node was lost (wait `recoveryTimeoutSeconds`), rather than it failing (back off).
    lost: bool,
}

/// Longest wait between re-creates of a sandbox that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long a failed sandbox waits before its next re-create: none the first time, then
/// 1, 2, 4... seconds, at most [`MAX_BACKOFF`].
fn backoff(recreations: u32) -> Duration {
    match recreations {
        0 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 1).min(6)).min(MAX_BACKOFF),
    }
}

impl ControlPlane {
    /// Queues an AutoRecreate sandbox that is now Lost or Failed for re-creation. Called
    /// with the registry locked, for each status change that may end one.
    pub(super) fn note_failure(&self, reg: &mut Registry, rec: &SandboxRecord) {
        if rec.spec.failure_policy != FailurePolicy::AutoRecreate {
            return;
        }
        let lost = match rec.status {
            Phase::Lost { .. } => true,
            Phase::Failed { .. } => false,
            _ => return,
        };
        reg.recovering
            .entry(rec.spec.name.clone())
            .or_insert(Recovery {
                since: Instant::now(),
                lost,
            });
    }

    /// One tick: marks lost nodes and their sandboxes, then re-creates the AutoRecreate
    /// sandboxes that are due. Returns how many were re-created.
    pub async fn supervise(&self) -> usize {
        for node in self.inner.nodes.check() {
            self.node_lost(&node, true);
        }
        // A sandbox busy when its node was lost (a stop or an update waiting on the agent)
        // was left as it was: once that call has ended, it is Lost too.
        for node in self.inner.nodes.lost() {
            self.node_lost(&node, false);
        }
        self.recreate_due().await
    }

    /// Every sandbox on a lost node that was running (or being stopped) is Lost. `newly`:
    /// the node was found lost just now (else only sandboxes not yet Lost are looked at,
    /// those that were busy then).
    fn node_lost(&self, node: &str, newly: bool) {
        let why = self.inner.nodes.lost_why(node);
        if newly {
            warn!(node, "agent lost: {why}");
            self.inner.metrics.error("agent_lost");
        }
        let reason = format!("agent {node} stopped answering ({why})");
        let mut reg = self.lock();
        let names: Vec<String> = reg
            .sandboxes
            .values()
            .filter(|e| !e.busy && e.record.node == node)
            .filter(|e| {
                newly
                    || (!matches!(e.record.status, Phase::Lost { .. })
                        && e.record.status.can_transition_to(&Phase::Lost {
                            reason: String::new(),
                        }))
            })
            .map(|e| e.record.spec.name.clone())
            .collect();
        if !newly && names.is_empty() {
            return;
        }
        let mut n = 0;
        for name in names {
            let Some(entry) = reg.sandboxes.get_mut(&name) else {
                continue;
            };
            let lost = Phase::Lost {
                reason: reason.clone(),
            };
            let rec = if entry.record.status.can_transition_to(&lost) {
                let mut rec = (*entry.record).clone();
                rec.status = lost;
                rec.revision += 1;
                rec.updated_at_ms = now_ms();
                self.write_behind(&rec);
                let rec = Arc::new(rec);
                entry.record = rec.clone();
                self.emit(&mut reg, EventKind::Modified, rec.clone());
                n += 1;
                rec
            } else if newly {
                entry.record.clone()
            } else {
                // Ended meanwhile (Exited, Failed...): nothing of it runs there.
                continue;
            };
            // Lost now, or already (a record loaded at start-up whose node never came back).
            self.note_failure(&mut reg, &rec);
        }
        if newly || n > 0 {
            info!(node, sandboxes = n, "sandboxes of a lost agent are Lost");
        }
    }

    /// Queues a record's new state to the store without waiting for it.
    pub(super) fn write_behind(&self, rec: &SandboxRecord) {
        let name = rec.spec.name.clone();
        let queued = serde_json::to_vec(rec)
            .map_err(|e| ControlError::Internal(e.to_string()))
            .and_then(|value| {
                Ok(self.inner.store.submit_behind(Write::Put {
                    key: record::key(&name),
                    value,
                })?)
            });
        match queued {
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

    /// Re-creates every AutoRecreate sandbox whose wait is over.
    async fn recreate_due(&self) -> usize {
        let now = Instant::now();
        let due: Vec<String> = {
            let reg = self.lock();
            reg.recovering
                .iter()
                .filter(|(name, r)| {
                    let Some(entry) = reg.sandboxes.get(*name) else {
                        return false;
                    };
                    let wait = if r.lost {
                        let s = entry.record.spec.recovery_timeout_seconds.unwrap_or(0.0);
                        Duration::from_secs_f64(s.clamp(0.0, 86400.0))
                    } else {
                        backoff(entry.record.recreations)
                    };
                    !entry.busy && now >= r.since + wait
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        let mut n = 0;
        for name in due {
            match self.recreate_elsewhere(&name).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => warn!(sandbox = %name, error = %e, "AutoRecreate: not created again yet"),
            }
        }
        n
    }

    /// Creates a Lost or Failed sandbox again, on another node if one has room. `Ok(false)`:
    /// nothing to do (deleted, or no longer Lost or Failed).
    async fn recreate_elsewhere(&self, name: &str) -> Result<bool, ControlError> {
        let (old, lost) = {
            let mut reg = self.lock();
            let lost = reg.recovering.get(name).is_some_and(|r| r.lost);
            let entry = match reg.idle_entry(name) {
                Ok(e) => e,
                Err(ControlError::NotFound { .. }) => {
                    reg.recovering.remove(name);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            if !matches!(
                entry.record.status,
                Phase::Lost { .. } | Phase::Failed { .. } | Phase::Pending
            ) {
                reg.recovering.remove(name);
                return Ok(false);
            }
            entry.busy = true;
            let old = entry.record.clone();
            if old.status.can_transition_to(&Phase::Pending) {
                // Seed 004's Pending: accepted again, no agent has it yet.
                let mut pending = (*old).clone();
                pending.status = Phase::Pending;
                let pending = Arc::new(pending);
                entry.record = pending.clone();
                self.emit(&mut reg, EventKind::Modified, pending);
            }
            (old, lost)
        };
        let release = |this: &Self| {
            let deferred = this.lock().release(name);
            this.apply_later(deferred);
        };
        let node = match self.place(&old.spec, Some(&old.node)) {
            Ok(node) => node,
            Err(e) => {
                release(self);
                return Err(e);
            }
        };
        // A failed sandbox's node is up: remove what is left of it there first. A lost
        // node's sandbox is left to that node's janitor.
        if !lost && self.inner.nodes.is_up(&old.node) {
            let handle = self.node(&old);
            if let Err(e) = handle.delete(old.spec.backend, &old.id).await
                && !e.is_not_found()
            {
                warn!(sandbox = %name, error = %e, "AutoRecreate: could not remove the failed sandbox");
            }
        }
        self.unplace(&old);
        let mut rec = (*old).clone();
        rec.id = uuid::Uuid::new_v4().simple().to_string();
        rec.node = node;
        rec.status = Phase::Creating;
        rec.paused = false;
        rec.recreations += 1;
        rec.revision += 1;
        rec.updated_at_ms = now_ms();
        rec.backend_info.clear();
        {
            let mut reg = self.lock();
            reg.ids.remove(&old.id);
            reg.ids.insert(rec.id.clone(), name.to_string());
            if let Some(entry) = reg.sandboxes.get_mut(name) {
                let creating = Arc::new(rec.clone());
                entry.record = creating.clone();
                self.emit(&mut reg, EventKind::Modified, creating);
            }
        }
        let config = self.config_of(&rec);
        let handle = self.node(&rec);
        let started = handle.run(&config).await;
        let cause = if lost { "lost" } else { "failed" };
        match &started {
            Ok(info) => {
                rec.status = Phase::Running;
                rec.backend_info = info.clone();
                info!(sandbox = %name, from = %old.node, to = %rec.node, cause, "AutoRecreate: created again");
                self.inner.metrics.recreated(rec.spec.backend, cause);
            }
            Err(e) => {
                // It keeps the slot it was given, as every Failed sandbox does until it is
                // removed or re-created (each of which releases it, once).
                rec.status = Phase::Failed {
                    reason: format!("re-create on {} failed: {e}", rec.node),
                };
                self.inner.metrics.error("recreate_failed");
            }
        }
        if let Err(e) = self.persist(&rec).await {
            warn!(sandbox = %name, error = %e, "AutoRecreate: the new record could not be written");
        }
        let ok = started.is_ok();
        {
            let mut reg = self.lock();
            reg.recovering.remove(name);
        }
        let rec = self.publish(rec, EventKind::Modified);
        if !ok {
            // Failed again: queued with a longer back-off.
            let mut reg = self.lock();
            self.note_failure(&mut reg, &rec);
        }
        Ok(ok)
    }

    /// A record's status as its node now reports it, after the node came back or this
    /// server restarted (`plane/cluster.rs`).
    pub(super) fn status_from_node(
        rec: &SandboxRecord,
        found: Result<warren_runtime::BackendStatus, &warren_agent::AgentError>,
    ) -> Phase {
        match found {
            Ok(status) => phase_of(&status),
            Err(e) if e.is_not_found() => Phase::Failed {
                reason: format!("lost: agent {} no longer has it", rec.node),
            },
            Err(e) => Phase::Failed {
                reason: format!("lost: {e}"),
            },
        }
    }
}

/// "3s", "500ms": a timeout as a person writes it.
/// A duration as a user reads it: `3s`, `1500ms`.
pub(crate) fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_a_minute() {
        let secs: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [0, 1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
