//! `PauseSandbox` / `UnpauseSandbox`: a Running sandbox's workload frozen where it is and
//! let run on (`warren pause`, `warren unpause`, containerd's Pause and Resume). The phase
//! stays Running; the record says `paused`. While paused, exec and checkpoint are refused;
//! stop, kill and delete resume it first (each backend does) so that their signal lands.

use std::sync::Arc;

use tracing::warn;

use super::{ControlError, ControlPlane, EventKind};
use crate::record::{SandboxRecord, now_ms};

impl ControlPlane {
    /// Pauses (`pause`) or resumes a Running sandbox; returns its record. Asking for the
    /// state the record says it is in still asks the backend (every backend's pause and
    /// resume can be repeated), and changes no record: a workload the record does not call
    /// paused but that is frozen (a server killed between the freeze and its record) is
    /// thawed by an unpause.
    pub async fn pause(&self, name: &str, pause: bool) -> Result<Arc<SandboxRecord>, ControlError> {
        let old = {
            let mut reg = self.lock();
            let entry = reg.idle_running_entry(name)?;
            entry.busy = true;
            entry.pausing = true;
            entry.record.clone()
        };
        let this = self.clone();
        super::detached(async move { this.finish_pause(old, pause).await }).await
    }

    async fn finish_pause(
        &self,
        old: Arc<SandboxRecord>,
        pause: bool,
    ) -> Result<Arc<SandboxRecord>, ControlError> {
        let name = old.spec.name.clone();
        let kind = old.spec.backend;
        let node = self.node(&old);
        if let Err(e) = node.pause(kind, &old.id, pause).await {
            let deferred = self.lock().release(&name);
            self.apply_later(deferred);
            return Err(e.into());
        }
        if old.paused == pause {
            let deferred = self.lock().release(&name);
            self.apply_later(deferred);
            return Ok(old);
        }
        let mut rec = (*old).clone();
        rec.paused = pause;
        rec.revision += 1;
        rec.updated_at_ms = now_ms();
        // Durable before the reply, as an update is: a restarted server shows what the
        // caller was told (the workload stays frozen across it, in its cgroup or its VM).
        if let Err(e) = self.persist(&rec).await {
            if let Err(undo) = node.pause(kind, &old.id, !pause).await {
                warn!(sandbox = %name, error = %undo, "undoing a pause that was not stored failed");
            }
            let deferred = self.lock().release(&name);
            self.apply_later(deferred);
            return Err(e);
        }
        Ok(self.publish(rec, EventKind::Modified))
    }

    /// The record of a Running sandbox that is not paused (exec, checkpoint).
    pub(super) fn running_unpaused(&self, name: &str) -> Result<Arc<SandboxRecord>, ControlError> {
        let rec = self.running_as(name, true, false)?;
        if rec.paused {
            return Err(ControlError::Paused { name: name.into() });
        }
        Ok(rec)
    }

    /// A backend resumed `rec`'s paused workload by itself (to deliver a signal): the
    /// record follows, unless another operation has the sandbox by now.
    pub(super) fn note_resumed(&self, rec: &SandboxRecord) {
        let mut reg = self.lock();
        let Some(entry) = reg.sandboxes.get_mut(&rec.spec.name) else {
            return;
        };
        if entry.busy || entry.record.id != rec.id || !entry.record.paused {
            return;
        }
        let mut changed = (*entry.record).clone();
        changed.paused = false;
        changed.revision += 1;
        changed.updated_at_ms = now_ms();
        self.write_behind(&changed);
        let changed = Arc::new(changed);
        entry.record = changed.clone();
        self.emit(&mut reg, EventKind::Modified, changed);
    }
}
