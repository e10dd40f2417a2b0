//! The `slot` backend: accounting only.
//!
//! It allocates nothing and runs nothing (seeds 000/001, the ResourceSlot sandboxer). For
//! every sandbox it logs the extracted resources, writes `<dir>/<id>/resources.json` in the
//! seed's exact format, and keeps a running total so that a node's capacity can be enforced.
//! A sandbox holds its request, or its limit where it gave no request (Kubernetes defaults
//! requests to limits the same way).
//!
//! The JSON files are derived state: the control plane's store is the truth and re-writes
//! them through [`Backend::adopt`] after a restart, so they are written atomically (temp
//! file + rename) but not fsynced.
//!
//! File writes run inline on the async worker. Measured here, moving them to tokio's blocking
//! pool made creates slower on tmpfs (thread hand-offs) and no faster on ext4, where the
//! filesystem serializes directory operations anyway (docs/PERFORMANCE.md).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tracing::info;
use warren_spec::{BackendKind, ResourceInfo, format_bytes, format_cpu, parse_bytes, parse_cpu};

use crate::backend::{Backend, BackendError, BackendInfo, BackendStatus, SandboxConfig};

pub const RESOURCES_FILE: &str = "resources.json";
/// Beside `resources.json`: the policy decision (admitted, or denied with the violations,
/// for a policy in audit mode), the "policy simulation" of seed 001. Absent when no policy
/// applies.
pub const POLICY_FILE: &str = "policy.json";

/// Upper bounds for what the slot backend hands out on this node; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SlotCapacity {
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub sandboxes: Option<u64>,
}

impl FromStr for SlotCapacity {
    type Err = String;

    /// `cpu=64,memory=256Gi,pids=100000,sandboxes=5000`; any subset.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut cap = SlotCapacity::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("{part:?} is not KEY=VALUE (keys: cpu, memory, pids, sandboxes)")
            })?;
            let bad = |e: String| format!("{key}: {e}");
            match key {
                "cpu" => cap.cpu = Some(parse_cpu(value).map_err(|e| bad(e.to_string()))?),
                "memory" => cap.memory = Some(parse_bytes(value).map_err(|e| bad(e.to_string()))?),
                "pids" => cap.pids = Some(parse_bytes(value).map_err(|e| bad(e.to_string()))?),
                "sandboxes" => {
                    cap.sandboxes = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("{value:?} is not a count")))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "{key:?} is not a capacity key (keys: cpu, memory, pids, sandboxes)"
                    ));
                }
            }
        }
        Ok(cap)
    }
}

/// What one sandbox holds, as counted against the capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Held {
    cpu: f64,
    memory: u64,
    pids: u64,
}

impl Held {
    fn of(r: &ResourceInfo) -> Self {
        Held {
            cpu: r.cpu_request.or(r.cpu_limit).unwrap_or(0.0),
            memory: r.memory_request.or(r.memory_limit).unwrap_or(0),
            pids: r.pid_limit.unwrap_or(0),
        }
    }
}

#[derive(Debug)]
struct Entry {
    resources: ResourceInfo,
    held: Held,
    status: BackendStatus,
}

/// What all sandboxes hold together: wider than one sandbox's [`Held`], so no number of
/// sandboxes each near `u64::MAX` bytes or pids can overflow the sum.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    cpu: f64,
    memory: u128,
    pids: u128,
}

impl Totals {
    fn add(&mut self, h: Held) {
        self.cpu += h.cpu;
        self.memory += u128::from(h.memory);
        self.pids += u128::from(h.pids);
    }

    fn sub(&mut self, h: Held) {
        self.cpu -= h.cpu;
        self.memory -= u128::from(h.memory);
        self.pids -= u128::from(h.pids);
    }

    fn without(mut self, h: Held) -> Totals {
        self.sub(h);
        self
    }
}

/// A total as the `u64` a [`ResourceInfo`] holds, `u64::MAX` when it is more.
fn clamp(total: u128) -> u64 {
    u64::try_from(total).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct State {
    sandboxes: HashMap<String, Entry>,
    total: Totals,
}

pub struct SlotBackend {
    dir: PathBuf,
    capacity: SlotCapacity,
    state: Mutex<State>,
}

impl fmt::Debug for SlotBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotBackend")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl SlotBackend {
    /// A slot backend writing under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>, capacity: SlotCapacity) -> Result<Self, BackendError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| BackendError::io("create", &dir, source))?;
        Ok(SlotBackend {
            dir,
            capacity,
            state: Mutex::new(State::default()),
        })
    }

    pub fn resources_path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join(RESOURCES_FILE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update of plain counters; the data is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that `add` fits once `remove` is given back.
    fn check_fits(
        &self,
        state: &State,
        add: Held,
        remove: Held,
        new_sandbox: bool,
    ) -> Result<(), BackendError> {
        let cap = &self.capacity;
        if let Some(max) = cap.sandboxes {
            let n = state.sandboxes.len() as u64;
            if new_sandbox && n >= max {
                return Err(BackendError::Capacity {
                    resource: "sandboxes",
                    requested: "1".into(),
                    available: max.saturating_sub(n).to_string(),
                    capacity: max.to_string(),
                });
            }
        }
        let held = state.total.without(remove);
        if let Some(max) = cap.cpu {
            let free = max - held.cpu;
            // Compare in millicores so float noise never refuses an exact fit.
            if (add.cpu * 1000.0).round() > (free * 1000.0).round() {
                return Err(BackendError::Capacity {
                    resource: "cpu",
                    requested: format_cpu(add.cpu),
                    available: format_cpu(free.max(0.0)),
                    capacity: format_cpu(max),
                });
            }
        }
        let count = |n: u64| n.to_string();
        fits_whole(
            "memory",
            cap.memory,
            clamp(held.memory),
            add.memory,
            format_bytes,
        )?;
        fits_whole("pids", cap.pids, clamp(held.pids), add.pids, count)?;
        Ok(())
    }

    fn info(&self, config: &SandboxConfig) -> BackendInfo {
        let mut info = BackendInfo::new();
        info.insert(
            "resources_path".into(),
            self.resources_path(&config.id).display().to_string(),
        );
        if let Some(applied) = &config.policy {
            let path = self.dir.join(&config.id).join(POLICY_FILE);
            info.insert("policy_path".into(), path.display().to_string());
            info.insert("policy_decision".into(), applied.decision.verdict().into());
        }
        info
    }
}

/// Writes `<dir>/<id>/resources.json` atomically (temp file + rename).
fn write_resources(
    dir: &Path,
    id: &str,
    resources: &ResourceInfo,
) -> Result<PathBuf, BackendError> {
    let dir = dir.join(id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(BackendError::io("create", &dir, source)),
    }
    let mut json = resources.to_json_pretty();
    json.push('\n');
    write_atomic(&dir, RESOURCES_FILE, json.as_bytes())
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, BackendError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|source| BackendError::io("write", &tmp, source))?;
    std::fs::rename(&tmp, &path)
        .map_err(|source| BackendError::io("rename into place", &path, source))?;
    Ok(path)
}

/// Writes `<dir>/<id>/policy.json` (after `resources.json`, which made the directory):
/// `{"policy", "hash", "mode", "admitted", "violations": [{"field", "value", "rule"}],
/// "filtered_env"}`.
fn write_policy(dir: &Path, config: &SandboxConfig) -> Result<(), BackendError> {
    let Some(applied) = &config.policy else {
        return Ok(());
    };
    let mut json = serde_json::to_vec_pretty(&applied.decision)
        .map_err(|e| BackendError::Other(format!("policy decision as JSON: {e}")))?;
    json.push(b'\n');
    write_atomic(&dir.join(&config.id), POLICY_FILE, &json).map(|_| ())
}

/// Checks that `add` more of a whole-numbered resource fits next to `held`, up to `max`.
fn fits_whole(
    resource: &'static str,
    max: Option<u64>,
    held: u64,
    add: u64,
    show: impl Fn(u64) -> String,
) -> Result<(), BackendError> {
    let Some(max) = max else { return Ok(()) };
    let free = max.saturating_sub(held);
    if add > free {
        return Err(BackendError::Capacity {
            resource,
            requested: show(add),
            available: show(free),
            capacity: show(max),
        });
    }
    Ok(())
}

fn log_resources(event: &str, id: &str, name: &str, r: &ResourceInfo) {
    info!(
        sandbox = name,
        id,
        cpu_limit = r.cpu_limit,
        cpu_request = r.cpu_request,
        memory_limit = r.memory_limit,
        memory_request = r.memory_request,
        pid_limit = r.pid_limit,
        storage_limit = r.storage_limit,
        network_bandwidth = r.network_bandwidth,
        "slot: {event}"
    );
}

#[async_trait::async_trait]
impl Backend for SlotBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Slot
    }

    fn is_available(&self) -> Result<(), String> {
        Ok(())
    }

    async fn create(&self, config: &SandboxConfig) -> Result<BackendInfo, BackendError> {
        if config.stdin.is_some() {
            return Err(BackendError::Invalid(
                "stdin: the slot backend runs no process to read it".into(),
            ));
        }
        let held = Held::of(&config.resources);
        {
            let mut state = self.lock();
            if state.sandboxes.contains_key(&config.id) {
                return Err(BackendError::AlreadyExists {
                    backend: BackendKind::Slot,
                    id: config.id.clone(),
                });
            }
            self.check_fits(&state, held, Held::default(), true)?;
            // Reserve before the file write so two creates cannot both take the last slot.
            state.total.add(held);
            let entry = Entry {
                resources: config.resources.clone(),
                held,
                status: BackendStatus::Created,
            };
            state.sandboxes.insert(config.id.clone(), entry);
        }
        let written = write_resources(&self.dir, &config.id, &config.resources)
            .and_then(|_| write_policy(&self.dir, config));
        if let Err(e) = written {
            self.release(&config.id);
            let _ = crate::remove_tree(&self.dir.join(&config.id));
            return Err(e);
        }
        log_resources(
            "allocated",
            &config.id,
            &config.spec.name,
            &config.resources,
        );
        Ok(self.info(config))
    }

    async fn start(&self, id: &str) -> Result<(), BackendError> {
        let mut state = self.lock();
        let entry = state.sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
        entry.status = BackendStatus::Running;
        Ok(())
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<BackendStatus, BackendError> {
        let mut state = self.lock();
        let entry = state.sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
        entry.status = BackendStatus::Stopped;
        Ok(BackendStatus::Stopped)
    }

    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let entry = self.release(id);
        let existed = crate::remove_tree(&self.dir.join(id))?;
        let Some(entry) = entry else {
            // Not in memory: an orphan left by a previous run, whose files are now gone.
            return if existed { Ok(()) } else { Err(not_found(id)) };
        };
        info!(
            id,
            cpu = entry.held.cpu,
            memory = entry.held.memory,
            "slot: released"
        );
        Ok(())
    }

    async fn status(&self, id: &str) -> Result<BackendStatus, BackendError> {
        let state = self.lock();
        state
            .sandboxes
            .get(id)
            .map(|e| e.status.clone())
            .ok_or_else(|| not_found(id))
    }

    /// A slot sandbox runs nothing: a pause is recorded by the control plane only.
    async fn pause(&self, id: &str) -> Result<(), BackendError> {
        self.status(id).await.map(|_| ())
    }

    async fn resume(&self, id: &str) -> Result<(), BackendError> {
        self.status(id).await.map(|_| ())
    }

    /// A slot sandbox holds no process: its checkpoint is its record and resources, which
    /// the caller's manifest keeps. Nothing is written to `dir`.
    async fn checkpoint(
        &self,
        config: &SandboxConfig,
        _dir: &std::path::Path,
        leave_running: bool,
    ) -> Result<crate::CheckpointInfo, BackendError> {
        let status = self.status(&config.id).await?;
        if status != BackendStatus::Running {
            return Err(BackendError::Invalid(format!(
                "sandbox {} is {status:?}, not Running: there is nothing to checkpoint",
                config.id
            )));
        }
        if !leave_running {
            self.stop(&config.id, Duration::ZERO).await?;
        }
        Ok(crate::CheckpointInfo::new())
    }

    async fn check_restore(
        &self,
        _config: &SandboxConfig,
        _dir: &std::path::Path,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Accounts for the sandbox again, as a create does.
    async fn restore(
        &self,
        config: &SandboxConfig,
        _dir: &std::path::Path,
    ) -> Result<BackendInfo, BackendError> {
        let info = self.create(config).await?;
        if let Err(e) = self.start(&config.id).await {
            let _ = self.delete(&config.id).await;
            return Err(e);
        }
        Ok(info)
    }

    async fn update(&self, id: &str, resources: &ResourceInfo) -> Result<(), BackendError> {
        let held = Held::of(resources);
        {
            let mut state = self.lock();
            let old = state.sandboxes.get(id).ok_or_else(|| not_found(id))?.held;
            self.check_fits(&state, held, old, false)?;
            state.total.sub(old);
            state.total.add(held);
            if let Some(entry) = state.sandboxes.get_mut(id) {
                entry.held = held;
                entry.resources = resources.clone();
            }
        }
        write_resources(&self.dir, id, resources)?;
        log_resources("updated", id, id, resources);
        Ok(())
    }

    async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), BackendError> {
        // The store is the truth: re-account the sandbox and re-write its JSON if it is
        // missing or stale (a crash between the write and the store's commit).
        let path = self.resources_path(&config.id);
        let on_disk = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ResourceInfo>(&b).ok());
        if on_disk.as_ref() != Some(&config.resources) {
            write_resources(&self.dir, &config.id, &config.resources)?;
        }
        write_policy(&self.dir, config)?;
        let held = Held::of(&config.resources);
        let mut state = self.lock();
        if let Some(old) = state.sandboxes.remove(&config.id) {
            state.total.sub(old.held);
        }
        state.total.add(held);
        let entry = Entry {
            resources: config.resources.clone(),
            held,
            status: BackendStatus::Running,
        };
        state.sandboxes.insert(config.id.clone(), entry);
        Ok((BackendStatus::Running, self.info(config)))
    }

    async fn list(&self) -> Result<Vec<String>, BackendError> {
        crate::backend::sandbox_dirs(&self.dir, &[])
    }

    fn allocated(&self) -> ResourceInfo {
        let state = self.lock();
        ResourceInfo {
            cpu_request: Some(state.total.cpu),
            memory_request: Some(clamp(state.total.memory)),
            pid_limit: Some(clamp(state.total.pids)),
            ..ResourceInfo::default()
        }
    }
}

impl SlotBackend {
    fn release(&self, id: &str) -> Option<Entry> {
        let mut state = self.lock();
        let entry = state.sandboxes.remove(id)?;
        state.total.sub(entry.held);
        Some(entry)
    }
}

fn not_found(id: &str) -> BackendError {
    BackendError::not_found(BackendKind::Slot, id)
}

#[cfg(test)]
mod tests;
