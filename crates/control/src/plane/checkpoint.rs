//! Checkpoints on the control plane: taking one of a running sandbox through its backend,
//! sealing it with a manifest and storing (or writing out) it, and restoring one as a new
//! sandbox (docs/checkpoint.md).
//!
//! A checkpoint holds the sandbox for its whole length (its `busy` mark), like any other
//! mutation. A restore verifies every byte of the checkpoint against its manifest first,
//! then reserves the name and runs the backend's restore; a failure at any step leaves no
//! record, and the backend promises to leave nothing of its own.
//!
//! The backends are reached directly, not through the agent: checkpoints are node-local
//! files, and the agent's seam is being reworked for several nodes (a remote agent would
//! carry these two calls the same way it carries `create`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tracing::{info, warn};
use warren_agent::AgentError;
use warren_runtime::{Backend, SandboxConfig};
use warren_spec::{BackendKind, Phase};

use super::{ControlError, ControlPlane, EventKind, host_ports};
use crate::checkpoints::store::{
    self as ckpt, CheckpointError, CheckpointStore, Manifest, ManifestBase,
};
use crate::record::{SandboxRecord, now_ms};

/// Where a new checkpoint goes.
#[derive(Debug, Clone)]
pub enum CheckpointTarget {
    /// Stored by the server under this name; `None`: `<sandbox>-<unix ms>`.
    Store(Option<String>),
    /// Written to this absolute path on the server's host (a new or empty directory, or a
    /// new `.tar` / `.tar.gz`), not stored.
    Output(PathBuf),
}

/// Where a restore reads a checkpoint from.
#[derive(Debug, Clone)]
pub enum CheckpointSource {
    Stored(String),
    /// A checkpoint directory or tar on the server's host (absolute).
    Path(PathBuf),
}

impl CheckpointSource {
    /// A stored checkpoint's name, or an absolute path (names never hold `/`).
    pub fn parse(s: &str) -> CheckpointSource {
        if s.starts_with('/') {
            CheckpointSource::Path(PathBuf::from(s))
        } else {
            CheckpointSource::Stored(s.to_string())
        }
    }
}

/// A checkpoint taken: its manifest, where it is, and whether the server keeps it.
#[derive(Debug, Clone)]
pub struct Taken {
    pub manifest: Manifest,
    pub path: PathBuf,
    pub stored: bool,
}

/// What checkpoints need of the server, set once at start-up.
#[derive(Debug, Default)]
pub(crate) struct Checkpointing {
    cell: OnceLock<Enabled>,
}

#[derive(Debug)]
struct Enabled {
    store: Arc<CheckpointStore>,
    backends: BTreeMap<BackendKind, Arc<dyn Backend>>,
}

impl ControlPlane {
    /// Turns checkpoints on: stored in `store`, taken and restored by `backends` (this
    /// node's). Called once, before serving.
    pub fn enable_checkpoints(
        &self,
        store: CheckpointStore,
        backends: impl IntoIterator<Item = Arc<dyn Backend>>,
    ) {
        let enabled = Enabled {
            store: Arc::new(store),
            backends: backends.into_iter().map(|b| (b.kind(), b)).collect(),
        };
        if self.inner.checkpoints.cell.set(enabled).is_err() {
            warn!("checkpoints were enabled twice; the first setting stays");
        }
    }

    fn enabled(&self) -> Result<&Enabled, ControlError> {
        self.inner.checkpoints.cell.get().ok_or_else(|| {
            ControlError::Internal("checkpoints are not enabled on this server".into())
        })
    }

    pub fn checkpoint_store(&self) -> Result<Arc<CheckpointStore>, ControlError> {
        Ok(Arc::clone(&self.enabled()?.store))
    }

    /// Stored checkpoints of sandboxes made from the image `id`, by name: restoring one
    /// needs the image (its root's layers). Reads every manifest.
    pub fn checkpoints_of_image(&self, id: &str) -> Vec<String> {
        let Ok(store) = self.checkpoint_store() else {
            return Vec::new();
        };
        store
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, m)| m.engine.get("image").is_some_and(|i| i == id))
            .map(|(_, m)| m.name)
            .collect()
    }

    fn checkpoint_backend(&self, kind: BackendKind) -> Result<Arc<dyn Backend>, ControlError> {
        let unavailable = |reason: String| {
            ControlError::Agent(AgentError::Unavailable {
                kind,
                node: self.agent().node().to_string(),
                reason,
            })
        };
        let backend = self
            .enabled()?
            .backends
            .get(&kind)
            .ok_or_else(|| unavailable("not built into this server yet".into()))?;
        backend.is_available().map_err(unavailable)?;
        Ok(Arc::clone(backend))
    }

    /// Checkpoints the Running sandbox `name`. Unless `leave_running`, it is Stopped after.
    pub async fn checkpoint(
        &self,
        name: &str,
        target: CheckpointTarget,
        leave_running: bool,
    ) -> Result<(Taken, Arc<SandboxRecord>), ControlError> {
        let store = self.checkpoint_store()?;
        let rec = {
            let mut reg = self.lock();
            let entry = reg.idle_running_entry(name)?;
            if entry.record.paused {
                return Err(ControlError::Paused { name: name.into() });
            }
            // Checkpoints go through this server's own backends, not the node seam: a
            // sandbox on a `warren agent` cannot be checkpointed yet.
            if entry.record.node != self.agent().node() {
                return Err(ControlError::Agent(AgentError::Remote {
                    node: entry.record.node.clone(),
                    kind: warren_agent::api::ErrorKind::Unsupported,
                    message: format!(
                        "sandbox {name:?} runs on agent {:?}; checkpoints are taken only on the server's own node for now",
                        entry.record.node
                    ),
                }));
            }
            entry.busy = true;
            // An exec now would start a process outside the tree CRIU dumps (dropped by
            // it), and a signal would race the freeze: both wait, as for a pause.
            entry.pausing = true;
            entry.record.clone()
        };
        let this = self.clone();
        let done = tokio::spawn(async move {
            let taken = this
                .take(&store, &rec, target, leave_running)
                .await
                .inspect_err(|e| warn!(sandbox = %rec.spec.name, error = %e, "checkpoint failed"));
            let after = this.after_checkpoint(&rec, leave_running).await;
            taken.map(|t| (t, after))
        });
        done.await
            .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    async fn take(
        &self,
        store: &CheckpointStore,
        rec: &SandboxRecord,
        target: CheckpointTarget,
        leave_running: bool,
    ) -> Result<Taken, ControlError> {
        let kind = rec.spec.backend;
        let backend = self.checkpoint_backend(kind)?;
        let created_at_ms = now_ms();
        let name = match &target {
            CheckpointTarget::Store(Some(n)) => n.clone(),
            _ => format!("{}-{created_at_ms}", rec.spec.name),
        };
        match &target {
            CheckpointTarget::Store(_) => store.check_free(&name)?,
            CheckpointTarget::Output(path) => ckpt::check_output(path)?,
        }
        // Written in the store's own hidden directory first, so a failure leaves nothing
        // under a name or at the output path.
        let scratch = store.scratch()?;
        let config = SandboxConfig {
            id: rec.id.clone(),
            spec: rec.spec.clone(),
            resources: rec.resources.clone(),
            stdin: None,
            policy: self.applied_of(rec),
        };
        let engine = backend
            .checkpoint(&config, &scratch.path, leave_running)
            .await
            .map_err(|e| ControlError::Agent(AgentError::Backend(e)))?;
        let base = ManifestBase {
            name: name.clone(),
            sandbox: rec.spec.name.clone(),
            sandbox_id: rec.id.clone(),
            backend: kind,
            spec: rec.spec.clone(),
            resources: rec.resources.clone(),
            created_at_ms,
            leave_running,
            engine,
        };
        let dir = scratch.path.clone();
        let key = store.key().clone();
        let manifest = blocking(move || Manifest::seal(&dir, base, &key)).await?;
        let (path, stored) = match target {
            CheckpointTarget::Store(_) => (store.publish(scratch, &name)?, true),
            CheckpointTarget::Output(path) => {
                let dir = scratch.path.clone();
                let to = path.clone();
                match blocking(move || ckpt::export(&dir, &to)).await {
                    Ok(_) => {}
                    Err(e) if leave_running => return Err(e),
                    Err(e) => {
                        // The dump stopped the sandbox: this checkpoint is all that is left
                        // of its state, so it is stored rather than thrown away.
                        let reason = warren_runtime::error_chain(&e);
                        return Err(
                            match store
                                .check_free(&name)
                                .and_then(|()| store.publish(scratch, &name))
                            {
                                Ok(_) => {
                                    warn!(sandbox = %rec.spec.name, checkpoint = %name, "output failed; checkpoint stored instead");
                                    CheckpointError::Kept { name, reason }.into()
                                }
                                Err(kept) => ControlError::Internal(format!(
                                    "{reason}; the sandbox stopped at the checkpoint, and storing the checkpoint as {name:?} failed too: {}",
                                    warren_runtime::error_chain(&kept)
                                )),
                            },
                        );
                    }
                }
                drop(scratch);
                (path, false)
            }
        };
        info!(sandbox = %rec.spec.name, checkpoint = %manifest.name, size = manifest.size, path = %path.display(), "checkpoint taken");
        Ok(Taken {
            manifest,
            path,
            stored,
        })
    }

    /// Releases the sandbox after a checkpoint; one that was not left running takes the
    /// status its backend now reports (Stopped, or whatever a failure left).
    async fn after_checkpoint(
        &self,
        rec: &SandboxRecord,
        leave_running: bool,
    ) -> Arc<SandboxRecord> {
        let name = rec.spec.name.clone();
        let status = if leave_running {
            None
        } else {
            match self.checkpoint_backend(rec.spec.backend) {
                Ok(b) => b.status(&rec.id).await.ok(),
                Err(_) => None,
            }
        };
        let next = status
            .map(|s| super::phase_of(&s))
            .filter(|p| p.is_terminal());
        let Some(next) = next else {
            let current = self.get(&name).ok();
            let deferred = self.lock().release(&name);
            self.apply_later(deferred);
            return current.unwrap_or_else(|| Arc::new(rec.clone()));
        };
        let mut stopped = rec.clone();
        if next == Phase::Stopped {
            // Running -> Stopping -> Stopped, as a stop goes; watchers see both.
            stopped.status = Phase::Stopping;
            stopped.revision += 1;
            stopped.updated_at_ms = now_ms();
            let stopping = Arc::new(stopped.clone());
            let mut reg = self.lock();
            if let Some(entry) = reg.sandboxes.get_mut(&name) {
                entry.record = stopping.clone();
            }
            self.emit(&mut reg, EventKind::Modified, stopping);
        }
        stopped.status = next;
        stopped.revision += 1;
        stopped.updated_at_ms = now_ms();
        if let Err(e) = self.persist(&stopped).await {
            warn!(sandbox = %name, error = %e, "could not persist the end of a checkpointed sandbox");
        }
        self.inner
            .metrics
            .observe(stopped.spec.backend, &stopped.status);
        self.publish(stopped, EventKind::Modified)
    }

    /// Creates a sandbox from a checkpoint, named `new_name` or as the checkpointed one was.
    pub async fn restore(
        &self,
        source: CheckpointSource,
        new_name: Option<String>,
    ) -> Result<(Arc<SandboxRecord>, Taken), ControlError> {
        let store = self.checkpoint_store()?;
        // What a restore holds until the backend is done reading the checkpoint.
        let (dir, what, stored, hold) = match &source {
            CheckpointSource::Stored(name) => {
                let lease = store.lease(name)?;
                let dir = lease.dir.clone();
                (dir, format!("{name:?}"), true, Hold::Lease(lease))
            }
            CheckpointSource::Path(path) => {
                let what = format!("{:?}", path.display().to_string());
                // Copied into the store's own directory first, so what is verified is what
                // the backend reads, whoever can write the path meanwhile.
                // Nothing is copied before the seal is checked: a path that is not a
                // checkpoint of a server with the key fills no disk.
                if path.is_dir() || path.is_file() {
                    let scratch = store.scratch()?;
                    let (from, into) = (path.clone(), scratch.path.clone());
                    let key = store.key().clone();
                    if path.is_dir() {
                        blocking(move || ckpt::copy_in(&from, &into, &key)).await?;
                    } else {
                        blocking(move || ckpt::import(&from, &into, &key)).await?;
                    }
                    (scratch.path.clone(), what, false, Hold::Scratch(scratch))
                } else {
                    return Err(CheckpointError::Invalid(format!(
                        "checkpoint: {what} is not a checkpoint directory or archive on the server's host"
                    ))
                    .into());
                }
            }
        };
        let verify_dir = dir.clone();
        let verify_store = Arc::clone(&store);
        let manifest =
            blocking(move || Manifest::verify(&verify_dir, &what, verify_store.key())).await?;
        let mut spec = manifest.spec.clone();
        if spec.backend != manifest.backend {
            return Err(CheckpointError::Corrupt {
                what: manifest.name.clone(),
                reason: format!(
                    "its manifest says backend {} but its spec {}",
                    manifest.backend, spec.backend
                ),
            }
            .into());
        }
        if let Some(name) = new_name {
            spec.name = name;
        }
        let resources = spec
            .validate()
            .map_err(|e| ControlError::InvalidSpec(e.to_string()))?;
        // A checkpoint kept past its sandbox's expiry would be restored only to be deleted.
        super::create::refuse_past_expiry(spec.expire_time)?;
        let applied = self.admit(&spec, &resources)?;
        let backend = self.checkpoint_backend(spec.backend)?;
        let mut rec = SandboxRecord::creating(
            spec,
            resources,
            self.agent().node().to_string(),
            applied.as_ref(),
        );
        // What would fail at once fails before a finished sandbox of the name is replaced
        // (after the cheap refusal of a name still in use, which make_room repeats).
        self.refuse_unfinished(&rec.spec.name)?;
        let check = SandboxConfig {
            id: rec.id.clone(),
            spec: rec.spec.clone(),
            resources: rec.resources.clone(),
            stdin: None,
            policy: applied.clone(),
        };
        backend
            .check_restore(&check, &dir)
            .await
            .map_err(|e| ControlError::Agent(AgentError::Backend(e)))?;
        self.make_room(&rec.spec.name).await?;
        {
            let _registering = self.registering().await;
            let mut reg = self.lock();
            if reg.sandboxes.contains_key(&rec.spec.name) {
                return Err(ControlError::AlreadyExists {
                    name: rec.spec.name,
                });
            }
            reg.insert(Arc::new(rec.clone()), true);
        }
        // Restores run on this server's own node (its backends, not the scheduler's
        // choice); counted there so the node's load stays right, given back on failure.
        self.inner.nodes.take(&rec.node, &host_ports(&rec.spec));
        let this = self.clone();
        let taken = Taken {
            manifest,
            path: dir.clone(),
            stored,
        };
        let done = tokio::spawn(async move {
            let name = rec.spec.name.clone();
            let config = SandboxConfig {
                id: rec.id.clone(),
                spec: rec.spec.clone(),
                resources: rec.resources.clone(),
                stdin: None,
                policy: applied,
            };
            let restored = backend.restore(&config, &dir).await;
            drop(hold);
            let info = match restored {
                Ok(info) => info,
                Err(e) => {
                    this.lock().remove(&name);
                    this.unplace(&rec);
                    return Err(ControlError::Agent(AgentError::Backend(e)));
                }
            };
            rec.status = Phase::Running;
            rec.backend_info = info;
            rec.backend_info
                .insert("checkpoint".into(), taken.manifest.name.clone());
            rec.revision = 1;
            rec.updated_at_ms = now_ms();
            if let Err(e) = this.persist(&rec).await {
                if let Err(undo) = backend.delete(&rec.id).await {
                    warn!(sandbox = %name, error = %undo, "rollback of a restore failed");
                }
                this.lock().remove(&name);
                this.unplace(&rec);
                return Err(e);
            }
            this.inner.metrics.observe(rec.spec.backend, &rec.status);
            info!(sandbox = %name, checkpoint = %taken.manifest.name, "restored");
            Ok((this.publish(rec, EventKind::Added), taken))
        });
        done.await
            .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    /// Refuses a restore to `name` while a sandbox of that name is busy or not finished;
    /// returns whether a finished one is there (to be replaced).
    fn refuse_unfinished(&self, name: &str) -> Result<bool, ControlError> {
        let reg = self.lock();
        match reg.sandboxes.get(name) {
            None => Ok(false),
            Some(e) if e.busy => Err(ControlError::Busy { name: name.into() }),
            Some(e) if !e.record.status.is_terminal() => {
                Err(CheckpointError::NameTaken { name: name.into() }.into())
            }
            Some(_) => Ok(true),
        }
    }

    /// Frees `name` for a restore: a finished sandbox of that name is deleted (the restore
    /// continues it); a running one is kept and the restore refused.
    async fn make_room(&self, name: &str) -> Result<(), ControlError> {
        if !self.refuse_unfinished(name)? {
            return Ok(());
        }
        info!(sandbox = %name, "replacing a finished sandbox with its restore");
        self.delete(name, None).await.map(|_| ())
    }
}

/// What keeps a checkpoint's files in place during a restore.
#[allow(dead_code)] // held, never read
enum Hold {
    Lease(ckpt::Lease),
    Scratch(ckpt::Scratch),
}

/// Runs file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CheckpointError> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))?
        .map_err(ControlError::from)
}
