//! The plane's side of its remote agents: heartbeats (registration, status changes of
//! sandboxes), handing a node its sandboxes back when it (re)appears, and the janitor's
//! question "which of these ids do you not know?".

use std::sync::Arc;

use tracing::{info, warn};
use warren_runtime::BackendEvent;
use warren_spec::Phase;

use super::{ControlError, ControlPlane, EventKind};
use crate::nodes::{Heartbeat, HeartbeatOutcome};
use crate::record::now_ms;

impl ControlPlane {
    /// Takes an agent's heartbeat: registers or refreshes its node, applies the status
    /// changes it reports (in order), and, when the node is new to this server, came back
    /// after being lost or restarted, hands it its sandboxes back. `token` is the bearer
    /// token the agent authenticated with: the plane calls the agent with it.
    pub fn heartbeat(
        &self,
        hb: Heartbeat,
        changes: Vec<BackendEvent>,
        token: &str,
    ) -> Result<HeartbeatOutcome, ControlError> {
        let node = hb.node.clone();
        let outcome = self.inner.nodes.heartbeat(hb, token)?;
        if outcome.reconcile {
            info!(node, "agent registered");
            let this = self.clone();
            let node = node.clone();
            tokio::spawn(async move { this.reconcile_node(&node).await });
        }
        if !changes.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                for ev in changes {
                    this.on_backend_event(ev).await;
                }
            });
        }
        Ok(outcome)
    }

    /// Hands a node the sandboxes the store says it runs (`adopt`), and takes the status it
    /// reports: a Lost sandbox whose agent still has it runs again; one it no longer has
    /// is Failed (and AutoRecreate creates it again).
    async fn reconcile_node(&self, node: &str) {
        let records: Vec<Arc<crate::record::SandboxRecord>> = {
            let reg = self.lock();
            reg.sandboxes
                .values()
                .filter(|e| !e.busy && e.record.node == node && e.record.status != Phase::Deleted)
                .map(|e| e.record.clone())
                .collect()
        };
        if records.is_empty() {
            return;
        }
        let handle = self.inner.nodes.handle(node);
        let mut changed = 0;
        for rec in records {
            let config = self.config_of(&rec);
            let adopted = handle.adopt(&config).await;
            if let Err(e) = &adopted
                && !e.is_not_found()
                && matches!(e, warren_agent::AgentError::Unreachable { .. })
            {
                warn!(node, error = %e, "handing sandboxes back: the agent cannot be reached");
                return;
            }
            let next = Self::status_from_node(&rec, adopted.as_ref().map(|(s, _)| s.clone()));
            let mut reg = self.lock();
            let Some(entry) = reg.sandboxes.get_mut(&rec.spec.name) else {
                continue;
            };
            // Changed meanwhile (deleted, re-created elsewhere, busy): leave it.
            if entry.busy || entry.record.id != rec.id {
                continue;
            }
            let mut updated = (*entry.record).clone();
            if let Ok((_, info)) = &adopted {
                updated.backend_info = info.clone();
            }
            let status_changes = updated.status != next && updated.status.can_transition_to(&next);
            if !status_changes {
                continue;
            }
            info!(sandbox = %updated.spec.name, node, from = %updated.status, to = %next, "status from its agent");
            updated.status = next;
            // A Lost sandbox found Running again keeps its pause; any other phase ends it.
            updated.paused &= updated.status == Phase::Running;
            updated.revision += 1;
            updated.updated_at_ms = now_ms();
            self.write_behind(&updated);
            self.inner
                .metrics
                .observe(updated.spec.backend, &updated.status);
            let updated = Arc::new(updated);
            entry.record = updated.clone();
            if updated.status == Phase::Running {
                reg.recovering.remove(&updated.spec.name);
            }
            self.note_failure(&mut reg, &updated);
            self.emit(&mut reg, EventKind::Modified, updated);
            changed += 1;
        }
        info!(node, changed, "sandboxes handed back to their agent");
    }

    /// The ids among `ids` this control plane does not know (the janitor's question).
    pub fn unknown_ids(&self, ids: Vec<String>) -> Vec<String> {
        let reg = self.lock();
        ids.into_iter()
            .filter(|id| !reg.ids.contains_key(id))
            .collect()
    }
}
