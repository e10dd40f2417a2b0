//! [`WasmBackend`]: sandboxes' lifecycle, their files, and the `Backend` implementation.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};
use warren_runtime::logs::LogWriter;
use warren_runtime::{
    Backend, BackendError, BackendEvent, BackendInfo, BackendStatus, EventSink, SandboxConfig,
};
use warren_spec::{BackendKind, ResourceInfo, SandboxSpec, format_bytes};

use crate::WasmConfig;
use crate::bench::{self, InstantiateBench};
use crate::cache::{CacheStats, LoadError, ModuleCache};
use crate::engine::{Ticker, build_engine};
use crate::run::{self, Job, Program};

pub const LOG_FILE: &str = "output.log";
pub const STATUS_FILE: &str = "status.json";
const CACHE_DIR: &str = "cache";
/// How long `stop` waits for the guest's next yield before cancelling its task outright.
const STOP_WAIT: Duration = Duration::from_millis(100);
pub(crate) const REASON_LOST: &str = "lost: the server restarted while it ran";

/// Runs WebAssembly modules; see the crate docs.
pub struct WasmBackend {
    dir: PathBuf,
    /// `Err` holds why the engine could not be built; every call then reports it.
    inner: Result<Arc<Inner>, String>,
}

struct Inner {
    dir: PathBuf,
    config: WasmConfig,
    cache: ModuleCache,
    ticker: Ticker,
    events: EventSink,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

struct Sandbox {
    /// `None` for a sandbox adopted after its module went away: it cannot start again.
    program: Option<Program>,
    spec: SandboxSpec,
    module: PathBuf,
    memory_limit: usize,
    log: Arc<LogWriter>,
    info: BackendInfo,
    status: BackendStatus,
    /// Bumped by every start, so a finished run never overwrites a newer one's status.
    run: u64,
    current: Option<Current>,
}

/// The run in progress, or the last one.
struct Current {
    stop: Arc<Notify>,
    /// Turns true once the run's status is recorded; closed if its task was cancelled.
    done: watch::Receiver<bool>,
    task: tokio::task::AbortHandle,
}

impl fmt::Debug for WasmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("WasmBackend");
        d.field("dir", &self.dir);
        match &self.inner {
            Ok(inner) => d
                .field("config", &inner.config)
                .field("cache", &inner.cache)
                .finish(),
            Err(reason) => d.field("unavailable", reason).finish(),
        }
    }
}

impl WasmBackend {
    /// A backend keeping its files under `dir` (created if missing). Fails only if `dir`
    /// cannot be created; an engine that cannot be built (e.g. the pool's address space
    /// refused) leaves the backend unavailable, as [`Backend::is_available`] then says.
    pub fn new(dir: PathBuf, config: WasmConfig, events: EventSink) -> Result<Self, BackendError> {
        std::fs::create_dir_all(&dir).map_err(|source| io("create", &dir, source))?;
        let inner = Self::build(&dir, config, events);
        if let Err(reason) = &inner {
            warn!(dir = %dir.display(), "wasm: backend unavailable: {reason}");
        }
        Ok(WasmBackend { dir, inner })
    }

    fn build(dir: &Path, config: WasmConfig, events: EventSink) -> Result<Arc<Inner>, String> {
        let engine = build_engine(&config).map_err(|e| format!("wasmtime engine: {e:#}"))?;
        let linkers = run::linkers(&engine).map_err(|e| format!("WASI linker: {e:#}"))?;
        let ticker = Ticker::start(engine.clone()).map_err(|e| format!("epoch thread: {e}"))?;
        Ok(Arc::new(Inner {
            dir: dir.to_path_buf(),
            cache: ModuleCache::new(engine, linkers, dir.join(CACHE_DIR)),
            config,
            ticker,
            events,
            sandboxes: Mutex::new(HashMap::new()),
        }))
    }

    fn inner(&self) -> Result<&Arc<Inner>, BackendError> {
        self.inner.as_ref().map_err(|reason| {
            BackendError::Other(format!("the wasm backend is unavailable: {reason}"))
        })
    }

    /// Where modules came from so far.
    pub fn cache_stats(&self) -> CacheStats {
        match &self.inner {
            Ok(inner) => inner.cache.stats(),
            Err(_) => CacheStats::default(),
        }
    }

    /// Instantiation cost, for `warren bench`: loads `module_path` through the cache once,
    /// then takes `n` samples of instantiating it on a fresh store (the WASI context of a
    /// real run, argv\[0\] only, no env, output discarded), then `n` samples of the same
    /// plus running it to completion. Holds one pool slot while it runs. Fails if a run does
    /// not exit 0.
    pub async fn bench_instantiate(
        &self,
        module_path: &str,
        n: usize,
    ) -> Result<InstantiateBench, BackendError> {
        let inner = self.inner()?;
        let module = PathBuf::from(module_path);
        let (program, _) = inner.cache.load(&module).await.map_err(load_error)?;
        let pool = inner.config.pool_instances;
        let Some(_running) = inner.ticker.try_enter(pool as usize) else {
            return Err(BackendError::Capacity {
                resource: "wasm instances",
                requested: "1".into(),
                available: "0".into(),
                capacity: pool.to_string(),
            });
        };
        let job = Job {
            program,
            argv: argv(&SandboxSpec::default(), &module),
            env: Vec::new(),
            mounts: Vec::new(),
            memory_limit: usize::try_from(inner.config.max_memory_bytes).unwrap_or(usize::MAX),
            fuel: inner.config.fuel,
            timeout: None,
            log: None,
            stop: Arc::new(Notify::new()),
        };
        bench::instantiate(&job, n)
            .await
            .map_err(|e| BackendError::Other(format!("bench of {module_path}: {e}")))
    }

    /// Turns true when the sandbox's current run has ended and its status is recorded (or
    /// closes if the run was cancelled): what a log follower waits for. `None` if the sandbox
    /// is unknown or was never started.
    pub fn done_signal(&self, id: &str) -> Option<watch::Receiver<bool>> {
        let inner = self.inner.as_ref().ok()?;
        let sandboxes = inner.lock();
        sandboxes.get(id)?.current.as_ref().map(|c| c.done.clone())
    }
}

impl Drop for WasmBackend {
    fn drop(&mut self) {
        // Running tasks hold the engine (and its epoch thread) alive: end them.
        if let Ok(inner) = &self.inner {
            for sandbox in inner.lock().values() {
                if let Some(current) = &sandbox.current {
                    current.task.abort();
                }
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        // A panic mid-update leaves plain data; keep serving.
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Records how a run ended in memory, unless a newer run replaced it. The caller writes
    /// `status.json` after telling the control plane, so the disk is off the critical path.
    fn finish(&self, id: &str, run: u64, status: &BackendStatus) -> bool {
        let mut sandboxes = self.lock();
        match sandboxes.get_mut(id) {
            Some(sandbox) if sandbox.run == run => {
                sandbox.status = status.clone();
                true
            }
            _ => false,
        }
    }
}

/// Runs one start of one sandbox to its end, on the caller's runtime.
async fn run_task(
    inner: Arc<Inner>,
    id: String,
    run: u64,
    job: Job,
    running: crate::engine::Running,
    done: watch::Sender<bool>,
) {
    mark_running(&inner.sandbox_dir(&id));
    let status = run::run(job).await;
    drop(running);
    debug!(id, ?status, "wasm: run ended");
    if inner.finish(&id, run, &status) {
        if status != BackendStatus::Stopped {
            let _ = inner.events.send(BackendEvent {
                id: id.clone(),
                status: status.clone(),
            });
        }
        // After the event: a crash in between leaves the `running` marker, which adopt
        // reports as lost, and the control plane has usually stored the end already.
        write_status(&inner.sandbox_dir(&id), &status);
    }
    let _ = done.send(true);
}

/// The persisted form of a status: what `adopt` reads back after a restart.
#[derive(Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum Persisted {
    Created,
    Running,
    Stopped,
    Exited { code: i32 },
    Failed { reason: String },
}

impl From<&BackendStatus> for Persisted {
    fn from(s: &BackendStatus) -> Self {
        match s {
            BackendStatus::Created => Persisted::Created,
            BackendStatus::Running => Persisted::Running,
            BackendStatus::Stopped => Persisted::Stopped,
            BackendStatus::Exited { code } => Persisted::Exited { code: *code },
            BackendStatus::Failed { reason } => Persisted::Failed {
                reason: reason.clone(),
            },
        }
    }
}

/// Marks a run as started, in one file operation (a create-and-write, not the temp file and
/// rename of [`write_status`]): it sits on the path from start to exit, where each metadata
/// operation costs ~0.3 ms on a slow disk. A torn marker reads back as lost, which is what a
/// run interrupted there is.
fn mark_running(dir: &Path) {
    let Ok(json) = serde_json::to_vec(&Persisted::Running) else {
        return;
    };
    let path = dir.join(STATUS_FILE);
    if let Err(e) = std::fs::write(&path, json) {
        warn!(path = %path.display(), "wasm: cannot record status: {e}");
    }
}

/// Writes `status.json` atomically; a failure is logged, not fatal (the control plane's
/// store holds the truth while the server runs).
fn write_status(dir: &Path, status: &BackendStatus) {
    let Ok(json) = serde_json::to_vec(&Persisted::from(status)) else {
        return;
    };
    let path = dir.join(STATUS_FILE);
    let tmp = dir.join(".status.json.tmp");
    let result = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        warn!(path = %path.display(), "wasm: cannot record status: {e}");
    }
}

/// The recorded status; `None` when there is no file (never started). A file that does not
/// parse (a torn `running` marker) counts as a run that did not end cleanly: lost.
fn read_status(dir: &Path) -> Option<BackendStatus> {
    let bytes = std::fs::read(dir.join(STATUS_FILE)).ok()?;
    let lost = BackendStatus::Failed {
        reason: REASON_LOST.into(),
    };
    let Ok(persisted) = serde_json::from_slice::<Persisted>(&bytes) else {
        return Some(lost);
    };
    Some(match persisted {
        Persisted::Created => BackendStatus::Created,
        Persisted::Running => BackendStatus::Failed {
            reason: REASON_LOST.into(),
        },
        Persisted::Stopped => BackendStatus::Stopped,
        Persisted::Exited { code } => BackendStatus::Exited { code },
        Persisted::Failed { reason } => BackendStatus::Failed { reason },
    })
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> BackendError {
    BackendError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

fn not_found(id: &str) -> BackendError {
    BackendError::NotFound {
        backend: BackendKind::Wasm,
        id: id.to_string(),
    }
}

fn load_error(e: LoadError) -> BackendError {
    match e {
        LoadError::Read { path, source } => BackendError::Io {
            action: "read wasm module",
            path,
            source,
        },
        LoadError::Invalid(message) => BackendError::Other(message),
    }
}

/// The module path from the spec; relative paths are as the server sees them.
fn module_path(spec: &SandboxSpec) -> Result<PathBuf, BackendError> {
    match spec.image.as_deref() {
        Some(image) if !image.is_empty() => Ok(PathBuf::from(image)),
        _ => Err(BackendError::Other(
            "spec.image: a wasm sandbox needs a module (a .wasm or .wat file)".into(),
        )),
    }
}

/// `command ++ args` when a command is given, else the module's file name then `args`.
fn argv(spec: &SandboxSpec, module: &Path) -> Vec<String> {
    if spec.command.is_empty() {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::iter::once(name)
            .chain(spec.args.iter().cloned())
            .collect()
    } else {
        spec.command.iter().chain(&spec.args).cloned().collect()
    }
}

fn timeout(spec: &SandboxSpec, config: &WasmConfig) -> Option<Duration> {
    spec.timeout_seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .or(config.default_timeout)
}

impl Inner {
    /// The sandbox's memory limit in bytes: its `memory_limit`, else the per-instance cap.
    fn memory_limit(&self, resources: &ResourceInfo) -> Result<usize, BackendError> {
        let cap = self.config.max_memory_bytes;
        let limit = resources.memory_limit.unwrap_or(cap);
        if limit > cap {
            return Err(BackendError::Capacity {
                resource: "memory per wasm instance",
                requested: format_bytes(limit),
                available: format_bytes(cap),
                capacity: format_bytes(cap),
            });
        }
        Ok(usize::try_from(limit).unwrap_or(usize::MAX))
    }

    fn check_mounts(spec: &SandboxSpec) -> Result<(), BackendError> {
        for (i, mount) in spec.mounts.iter().enumerate() {
            if !Path::new(&mount.host).is_dir() {
                return Err(BackendError::Other(format!(
                    "spec.mounts[{i}].host: {:?} is not a directory on this node",
                    mount.host
                )));
            }
        }
        Ok(())
    }

    fn info(&self, id: &str, module: &Path, cache: &str) -> BackendInfo {
        let mut info = BackendInfo::new();
        info.insert("module".into(), module.display().to_string());
        info.insert("cache".into(), cache.into());
        info.insert(
            "log_path".into(),
            self.sandbox_dir(id).join(LOG_FILE).display().to_string(),
        );
        info
    }
}

#[async_trait::async_trait]
impl Backend for WasmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wasm
    }

    fn is_available(&self) -> Result<(), String> {
        self.inner.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    async fn create(&self, config: &SandboxConfig) -> Result<BackendInfo, BackendError> {
        let inner = self.inner()?;
        let id = &config.id;
        if id == CACHE_DIR {
            return Err(BackendError::Other(format!(
                "sandbox id {id:?} is reserved by the wasm backend"
            )));
        }
        if inner.lock().contains_key(id) {
            return Err(BackendError::AlreadyExists {
                backend: BackendKind::Wasm,
                id: id.clone(),
            });
        }
        let module = module_path(&config.spec)?;
        let memory_limit = inner.memory_limit(&config.resources)?;
        Inner::check_mounts(&config.spec)?;
        let (program, source) = inner.cache.load(&module).await.map_err(load_error)?;
        let dir = inner.sandbox_dir(id);
        std::fs::create_dir_all(&dir).map_err(|source| io("create", &dir, source))?;
        // A directory left by a previous run of the same id must not leak its status.
        let _ = std::fs::remove_file(dir.join(STATUS_FILE));
        let log = LogWriter::with_limit(dir.join(LOG_FILE), inner.config.log_max_bytes)
            .map_err(|e| BackendError::Other(format!("sandbox log: {e}")))?;
        let info = inner.info(id, &module, source.as_str());
        let sandbox = Sandbox {
            program: Some(program),
            spec: config.spec.clone(),
            module,
            memory_limit,
            log: Arc::new(log),
            info: info.clone(),
            status: BackendStatus::Created,
            run: 0,
            current: None,
        };
        let mut sandboxes = inner.lock();
        if sandboxes.contains_key(id) {
            return Err(BackendError::AlreadyExists {
                backend: BackendKind::Wasm,
                id: id.clone(),
            });
        }
        sandboxes.insert(id.clone(), sandbox);
        debug!(id, module = %info["module"], cache = source.as_str(), "wasm: created");
        Ok(info)
    }

    async fn start(&self, id: &str) -> Result<(), BackendError> {
        let inner = self.inner()?;
        let mut sandboxes = inner.lock();
        let sandbox = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
        if sandbox.status == BackendStatus::Running {
            return Ok(());
        }
        let Some(program) = sandbox.program.clone() else {
            return Err(BackendError::Other(format!(
                "sandbox {id} cannot start: its module {} could not be loaded when it was adopted",
                sandbox.module.display()
            )));
        };
        let pool = inner.config.pool_instances;
        let Some(running) = inner.ticker.try_enter(pool as usize) else {
            return Err(BackendError::Capacity {
                resource: "wasm instances",
                requested: "1".into(),
                available: "0".into(),
                capacity: pool.to_string(),
            });
        };
        let spec = &sandbox.spec;
        let stop = Arc::new(Notify::new());
        let job = Job {
            program,
            argv: argv(spec, &sandbox.module),
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| (PathBuf::from(&m.host), m.guest.clone(), m.read_only))
                .collect(),
            memory_limit: sandbox.memory_limit,
            fuel: inner.config.fuel,
            timeout: timeout(spec, &inner.config),
            log: Some(Arc::clone(&sandbox.log)),
            stop: Arc::clone(&stop),
        };
        sandbox.run += 1;
        sandbox.status = BackendStatus::Running;
        let (done_tx, done) = watch::channel(false);
        let task = tokio::spawn(run_task(
            Arc::clone(inner),
            id.to_string(),
            sandbox.run,
            job,
            running,
            done_tx,
        ));
        sandbox.current = Some(Current {
            stop,
            done,
            task: task.abort_handle(),
        });
        Ok(())
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<BackendStatus, BackendError> {
        // A guest gets no signal to exit cleanly, so there is nothing to wait `grace` for.
        let inner = self.inner()?;
        let (current_run, stop, mut done, task) = {
            let mut sandboxes = inner.lock();
            let sandbox = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            match (&sandbox.status, &sandbox.current) {
                (BackendStatus::Running, Some(c)) => {
                    (sandbox.run, c.stop.clone(), c.done.clone(), c.task.clone())
                }
                (BackendStatus::Created, _) => {
                    sandbox.status = BackendStatus::Stopped;
                    write_status(&inner.sandbox_dir(id), &BackendStatus::Stopped);
                    return Ok(BackendStatus::Stopped);
                }
                (status, _) => return Ok(status.clone()),
            }
        };
        stop.notify_one();
        if tokio::time::timeout(STOP_WAIT, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            // Not yielding (should not happen: every tick yields): cancel the task.
            warn!(id, "wasm: instance did not stop in time; cancelling it");
            task.abort();
            let _ = done.wait_for(|d| *d).await;
        }
        let mut sandboxes = inner.lock();
        let sandbox = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
        if sandbox.run == current_run && sandbox.status == BackendStatus::Running {
            // The task was cancelled before recording anything.
            sandbox.status = BackendStatus::Stopped;
            let _ = sandbox.log.close();
            write_status(&inner.sandbox_dir(id), &BackendStatus::Stopped);
        }
        Ok(sandbox.status.clone())
    }

    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let inner = self.inner()?;
        if id == CACHE_DIR {
            return Err(not_found(id));
        }
        let known = inner.lock().contains_key(id);
        if known {
            self.stop(id, Duration::ZERO).await?;
        }
        let removed = inner.lock().remove(id);
        let dir = inner.sandbox_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if removed.is_some() {
                    Ok(())
                } else {
                    Err(not_found(id))
                }
            }
            Err(source) => Err(io("remove", &dir, source)),
        }
    }

    async fn status(&self, id: &str) -> Result<BackendStatus, BackendError> {
        let inner = self.inner()?;
        inner
            .lock()
            .get(id)
            .map(|s| s.status.clone())
            .ok_or_else(|| not_found(id))
    }

    async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), BackendError> {
        let inner = self.inner()?;
        let id = &config.id;
        if let Some(sandbox) = inner.lock().get(id) {
            return Ok((sandbox.status.clone(), sandbox.info.clone()));
        }
        let dir = inner.sandbox_dir(id);
        if id == CACHE_DIR || !dir.is_dir() {
            return Err(not_found(id));
        }
        // No status file: created but never started, so it can still start.
        let status = read_status(&dir).unwrap_or(BackendStatus::Created);
        if matches!(&status, BackendStatus::Failed { reason } if reason == REASON_LOST) {
            write_status(&dir, &status);
        }
        let module = module_path(&config.spec)?;
        // Past the create checks already: a limit the config no longer allows gets the cap.
        let cap = usize::try_from(inner.config.max_memory_bytes).unwrap_or(usize::MAX);
        let memory_limit = inner.memory_limit(&config.resources).unwrap_or(cap);
        let loaded = inner.cache.load(&module).await;
        let (program, cache) = match loaded {
            Ok((program, source)) => (Some(program), source.as_str()),
            Err(e) if status == BackendStatus::Created => return Err(load_error(e)),
            Err(e) => {
                warn!(id, "wasm: adopted sandbox cannot restart: {e}");
                (None, "unavailable")
            }
        };
        let log = LogWriter::with_limit(dir.join(LOG_FILE), inner.config.log_max_bytes)
            .map_err(|e| BackendError::Other(format!("sandbox log: {e}")))?;
        let info = inner.info(id, &module, cache);
        let sandbox = Sandbox {
            program,
            spec: config.spec.clone(),
            module,
            memory_limit,
            log: Arc::new(log),
            info: info.clone(),
            status: status.clone(),
            run: 0,
            current: None,
        };
        inner.lock().entry(id.clone()).or_insert(sandbox);
        Ok((status, info))
    }

    async fn list(&self) -> Result<Vec<String>, BackendError> {
        warren_runtime::sandbox_dirs(&self.dir, &[CACHE_DIR])
    }

    fn log_path(&self, id: &str) -> Option<PathBuf> {
        (id != CACHE_DIR).then(|| self.dir.join(id).join(LOG_FILE))
    }

    fn allocated(&self) -> ResourceInfo {
        let Ok(inner) = &self.inner else {
            return ResourceInfo::default();
        };
        let sandboxes = inner.lock();
        let memory: u64 = sandboxes
            .values()
            .filter(|s| s.status == BackendStatus::Running)
            .map(|s| s.memory_limit as u64)
            .sum();
        ResourceInfo {
            memory_limit: Some(memory),
            ..ResourceInfo::default()
        }
    }
}
