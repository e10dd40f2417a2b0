//! [`WasmBackend`]: sandboxes' lifecycle, their files, and the `Backend` implementation.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};
use warren_image::{ImageError, ImageStore};
use warren_runtime::logs::LogWriter;
use warren_runtime::{
    Backend, BackendError, BackendEvent, BackendInfo, BackendStatus, EventSink, SandboxConfig,
    Stdin,
};
use warren_spec::{BackendKind, PathAccess, Policy, ResourceInfo, SandboxSpec, format_bytes};

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
pub(crate) const REASON_LOST: &str =
    "lost: the process running it (the server or its node agent) restarted while it ran";

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
    files: FileWorker,
    events: EventSink,
    images: Option<ImageStore>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

struct Sandbox {
    /// `None` for a sandbox adopted after its module went away: it cannot start again.
    program: Option<Program>,
    spec: SandboxSpec,
    module: ModuleSource,
    memory_limit: usize,
    /// Given with the create; every start of this sandbox reads it.
    stdin: Option<Stdin>,
    /// What the workload may reach: preopens, sockets, env (docs/policy.md).
    policy: Option<Arc<Policy>>,
    /// Deferred: its file is made by the first start's file job, off the start-to-exit path
    /// (until then records wait in memory). A log file on disk marks a sandbox that ran.
    log: Arc<LogWriter>,
    /// Turns true once the last start's file job (directory, log file, stale status) is
    /// done; `None` when none is due.
    files: Option<watch::Receiver<bool>>,
    info: BackendInfo,
    status: BackendStatus,
    /// Bumped by every start, so a finished run never overwrites a newer one's status.
    run: u64,
    current: Option<Current>,
}

/// The run in progress, or the last one.
struct Current {
    stop: Arc<Notify>,
    /// The run's guest waits at its next epoch tick while this is true (`warren pause`).
    paused: watch::Sender<bool>,
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
        Self::with_images(dir, config, events, None)
    }

    /// [`WasmBackend::new`], also running modules stored in `images` by name (Wasm OCI
    /// artifacts, and images whose entrypoint is a `.wasm` file).
    pub fn with_images(
        dir: PathBuf,
        config: WasmConfig,
        events: EventSink,
        images: Option<ImageStore>,
    ) -> Result<Self, BackendError> {
        std::fs::create_dir_all(&dir).map_err(|source| BackendError::io("create", &dir, source))?;
        let inner = Self::build(&dir, config, events, images);
        if let Err(reason) = &inner {
            warn!(dir = %dir.display(), "wasm: backend unavailable: {reason}");
        }
        Ok(WasmBackend { dir, inner })
    }

    fn build(
        dir: &Path,
        config: WasmConfig,
        events: EventSink,
        images: Option<ImageStore>,
    ) -> Result<Arc<Inner>, String> {
        let engine = build_engine(&config).map_err(|e| format!("wasmtime engine: {e:#}"))?;
        let linkers = run::linkers(&engine).map_err(|e| format!("WASI linker: {e:#}"))?;
        let ticker = Ticker::start(engine.clone()).map_err(|e| format!("epoch thread: {e}"))?;
        Ok(Arc::new(Inner {
            dir: dir.to_path_buf(),
            cache: ModuleCache::new(
                engine,
                linkers,
                dir.join(CACHE_DIR),
                config.cache_modules,
                config.cache_max_bytes,
            ),
            config,
            ticker,
            files: FileWorker::start().map_err(|e| format!("file thread: {e}"))?,
            events,
            images,
            sandboxes: Mutex::new(HashMap::new()),
        }))
    }

    /// Pauses (`paused`) or resumes a running sandbox's guest.
    fn set_paused(&self, id: &str, paused: bool) -> Result<(), BackendError> {
        let inner = self.inner()?;
        let sandboxes = inner.lock();
        let sandbox = sandboxes.get(id).ok_or_else(|| not_found(id))?;
        match (&sandbox.status, &sandbox.current) {
            (BackendStatus::Running, Some(current)) => {
                current.paused.send_replace(paused);
                Ok(())
            }
            (status, _) => Err(BackendError::Other(format!(
                "sandbox {id} is {status:?}: there is no guest to pause or unpause"
            ))),
        }
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
            argv: argv(
                &SandboxSpec::default(),
                &ModuleSource {
                    path: module.clone(),
                    name: module_path.to_string(),
                    ..ModuleSource::default()
                },
            ),
            env: Vec::new(),
            mounts: Vec::new(),
            stdin: None,
            policy: None,
            memory_limit: usize::try_from(inner.config.max_memory_bytes).unwrap_or(usize::MAX),
            fuel: inner.config.fuel,
            timeout: None,
            log: None,
            stop: Arc::new(Notify::new()),
            paused: watch::channel(false).1,
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
            // Files written behind are on disk once the backend is gone, and nothing writes
            // into its directory after (a server stopping, a test removing its temp dir).
            inner.files.flush(Duration::from_secs(5));
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
        // After the event, on the file thread (after the start's file job): a crash in
        // between leaves a log without a status, which adopt reports as lost (the control
        // plane has usually stored the end already). Readers and delete wait for it.
        let dir = inner.sandbox_dir(&id);
        let ended = status.clone();
        let files = inner.files.submit(move || write_status(&dir, &ended));
        if let Some(sandbox) = inner.lock().get_mut(&id)
            && sandbox.run == run
        {
            sandbox.files = Some(files);
        }
    }
    let _ = done.send(true);
}

/// How long the file thread, once woken, waits for more jobs before doing them.
const GATHER: Duration = Duration::from_micros(200);

/// Sandboxes' file work, off the path from create to exit: one thread doing jobs in the
/// order they were given (a sandbox's directory before its log file). Each job's completion
/// is a watch that turns true; the thread ends with the backend.
struct FileWorker {
    jobs: Mutex<std::sync::mpsc::Sender<FileJob>>,
}

type FileJob = Box<dyn FnOnce() + Send>;

impl FileWorker {
    fn start() -> std::io::Result<FileWorker> {
        let (tx, rx) = std::sync::mpsc::channel::<FileJob>();
        std::thread::Builder::new()
            .name("wasm-files".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A create's job is followed by its start's within microseconds: let it
                    // come, so that it is queued to a running thread rather than waking one.
                    std::thread::sleep(GATHER);
                    job();
                    while let Ok(job) = rx.try_recv() {
                        job();
                    }
                }
            })?;
        Ok(FileWorker {
            jobs: Mutex::new(tx),
        })
    }

    /// Queues `job`; the receiver turns true once it has run. If the thread is gone (it
    /// cannot be while the backend lives) the job runs here.
    fn submit(&self, job: impl FnOnce() + Send + 'static) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let job: FileJob = Box::new(move || {
            job();
            let _ = tx.send(true);
        });
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(std::sync::mpsc::SendError(job)) = jobs.send(job) {
            job();
        }
        rx
    }

    /// Waits (blocking, at most `patience`) until the jobs queued so far are done.
    fn flush(&self, patience: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        drop(self.submit(move || {
            let _ = tx.send(());
        }));
        let _ = rx.recv_timeout(patience);
    }
}

/// A create's file work: the sandbox's directory; one left by an earlier sandbox of the same
/// id loses its status and log. Errors are logged: the sandbox runs on, its output then held
/// in memory up to the log's limit.
fn create_files(dir: &Path) {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            for file in [STATUS_FILE, LOG_FILE] {
                let _ = std::fs::remove_file(dir.join(file));
            }
        }
        Err(e) => warn!(dir = %dir.display(), "wasm: cannot create the sandbox directory: {e}"),
    }
}

/// A start's file work, done while the guest already runs: a restart drops the previous
/// run's status; then the log file is made (or reopened) with what the guest wrote meanwhile.
fn start_files(dir: &Path, restart: bool, log: &LogWriter) {
    if restart {
        let _ = std::fs::remove_file(dir.join(STATUS_FILE));
    }
    if let Err(e) = log.open() {
        warn!(dir = %dir.display(), "wasm: cannot open the sandbox log: {e}");
    }
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

/// Writes `status.json` in one file operation (no temp file and rename: each metadata
/// operation costs 20–50 µs on a slow disk, and the next create waits behind it). A failure
/// is logged, not fatal (the control plane's store holds the truth while the server runs);
/// a file torn by a crash reads back as lost, like a run the crash interrupted.
fn write_status(dir: &Path, status: &BackendStatus) {
    let Ok(json) = serde_json::to_vec(&Persisted::from(status)) else {
        return;
    };
    let path = dir.join(STATUS_FILE);
    if let Err(e) = std::fs::write(&path, json) {
        warn!(path = %path.display(), "wasm: cannot record status: {e}");
    }
}

/// How a sandbox's files say it ended: its `status.json`; without one, a log file means it
/// started and never recorded an end (the server died while it ran: lost), and no log file
/// means it never started (`None`). A status file that does not parse (torn by a crash)
/// counts as lost too.
fn read_status(dir: &Path) -> Option<BackendStatus> {
    let Ok(bytes) = std::fs::read(dir.join(STATUS_FILE)) else {
        return dir.join(LOG_FILE).exists().then(|| BackendStatus::Failed {
            reason: REASON_LOST.into(),
        });
    };
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

fn not_found(id: &str) -> BackendError {
    BackendError::not_found(BackendKind::Wasm, id)
}

fn load_error(e: LoadError) -> BackendError {
    match e {
        LoadError::Read { path, source } => BackendError::Io {
            action: "read wasm module",
            path,
            source,
        },
        LoadError::Invalid(message) => BackendError::Other(message),
        LoadError::Refused(message) => BackendError::Invalid(message),
    }
}

/// Where a sandbox's module comes from: a file, or an image in the store (whose config may
/// add an entrypoint, a command and environment, as a container image's does).
#[derive(Debug, Clone, Default)]
struct ModuleSource {
    /// The module's bytes on this node.
    path: PathBuf,
    /// argv\[0\] when neither the spec nor the image gives a program name.
    name: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    /// A module file, opened when it was checked: the load reads this very file (taken
    /// from here then, so no sandbox holds it after).
    held: Option<Arc<std::fs::File>>,
}

/// Opens the module file `image` for reading once it is known to be a regular file allowed
/// where it is. It is first opened as a path only (`O_PATH`: nothing behind it is opened,
/// so a device or FIFO planted under an allowed directory is never opened by the server),
/// its type read, and where it is, as the kernel names that handle, checked under the
/// policy: against `hostPaths` by [`warren_runtime::check_resolved_host_path`] and, with an
/// exec list, listed there. The file read is then reopened through that handle, so it is
/// the very file checked.
fn open_module(
    image: &str,
    policy: Option<&warren_runtime::AppliedPolicy>,
) -> Result<(std::fs::File, PathBuf), BackendError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let refused = |reason: String| BackendError::Invalid(format!("spec.image: {image:?} {reason}"));
    let pinned = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(image)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => refused("does not exist".into()),
            _ => refused(format!("cannot be opened on this node: {e}")),
        })?;
    let meta = pinned
        .metadata()
        .map_err(|e| refused(format!("cannot be read on this node: {e}")))?;
    if !meta.is_file() {
        return Err(refused(
            "is not a regular file (a module is read from one)".into(),
        ));
    }
    let Some(at) = run::opened_path(&pinned) else {
        return Err(refused(
            "cannot be placed: where the opened file is cannot be read from /proc".into(),
        ));
    };
    warren_runtime::check_resolved_host_path("spec.image", image, &at, policy)?;
    if let Some(applied) = policy
        && !applied.policy.resolved_exec_allowed(&at.to_string_lossy())
    {
        applied.finding(format!(
            "spec.image: {image:?} resolves to {:?}, which the policy's exec.allow does not \
             list",
            at.display().to_string()
        ))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", pinned.as_raw_fd()))
        .map_err(|e| refused(format!("cannot be opened on this node: {e}")))?;
    Ok((file, at))
}

/// `spec.image` names a file (rather than an image) when it is a path: absolute or `./`
/// relative (as the server sees it), or ending in `.wasm` or `.wat`.
fn is_module_file(image: &str) -> bool {
    image.starts_with('/')
        || image.starts_with("./")
        || image.starts_with("../")
        || image.ends_with(".wasm")
        || image.ends_with(".wat")
}

impl Inner {
    /// Resolves `spec.image` to a module file; every failure names the field. A module
    /// file's path must be absolute (the server's working directory is nobody's); it is
    /// opened here and checked under the policy where that open file is on this node (its
    /// symlinks followed): under the policy's `hostPaths` and, with an exec list, listed
    /// there. The load then reads through that handle (`held`), so a path swapped after the
    /// check reaches nothing.
    fn module_source(
        &self,
        spec: &SandboxSpec,
        policy: Option<&warren_runtime::AppliedPolicy>,
    ) -> Result<ModuleSource, BackendError> {
        let image = match spec.image.as_deref() {
            Some(image) if !image.is_empty() => image,
            _ => {
                return Err(BackendError::Invalid(
                    "spec.image: a wasm sandbox needs a module: a .wasm or .wat file, or the \
                     name of a Wasm image in the store"
                        .into(),
                ));
            }
        };
        if is_module_file(image) {
            if !image.starts_with('/') {
                return Err(BackendError::Invalid(format!(
                    "spec.image: {image:?} is a relative module path, which the server does not \
                     read from its own working directory: give an absolute path (`warren run \
                     --module` makes one) or the name of an image in the store"
                )));
            }
            let (file, path) = open_module(image, policy)?;
            let name = Path::new(image)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(ModuleSource {
                path,
                name,
                held: Some(Arc::new(file)),
                ..ModuleSource::default()
            });
        }
        let Some(store) = &self.images else {
            return Err(BackendError::Invalid(format!(
                "spec.image: {image:?} is not a module file (an absolute path, or a name ending \
                 in .wasm or .wat) and this server has no image store"
            )));
        };
        let found = store.resolve(image).map_err(|e| match e {
            ImageError::NotFound(_) => BackendError::Invalid(format!(
                "spec.image: {image:?} is neither a module file (an absolute path, or a name \
                 ending in .wasm or .wat) nor an image in the store"
            )),
            e => BackendError::Invalid(format!("spec.image: {}", warren_runtime::error_chain(&e))),
        })?;
        let path = found
            .wasm_module()
            .map_err(|e| {
                BackendError::Invalid(format!("spec.image: {}", warren_runtime::error_chain(&e)))
            })?
            .ok_or_else(|| {
                BackendError::Invalid(format!(
                    "spec.image: image {image:?} holds no Wasm module: it is neither a Wasm \
                     artifact nor an image whose entrypoint is a .wasm file"
                ))
            })?;
        let env = found
            .config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(ModuleSource {
            path,
            name: image.to_string(),
            entrypoint: found.config.entrypoint.clone(),
            cmd: found.config.cmd.clone(),
            env,
            // The store's own file, under its directory: no one else's to swap.
            held: None,
        })
    }
}

/// argv as `docker run` builds it: the spec's `command ++ args` when it has a command, else
/// the image's entrypoint followed by the spec's `args` or, when there are none, the image's
/// cmd. A module with neither gets its file (or image) name as argv\[0\].
fn argv(spec: &SandboxSpec, module: &ModuleSource) -> Vec<String> {
    if !spec.command.is_empty() {
        return spec.command.iter().chain(&spec.args).cloned().collect();
    }
    let args = if spec.args.is_empty() {
        &module.cmd
    } else {
        &spec.args
    };
    let mut argv: Vec<String> = module.entrypoint.iter().chain(args).cloned().collect();
    if module.entrypoint.is_empty() && (!spec.args.is_empty() || module.cmd.is_empty()) {
        argv.insert(0, module.name.clone());
    }
    argv
}

/// The image's environment, then the spec's (which wins).
fn env(
    spec: &SandboxSpec,
    module: &ModuleSource,
    policy: Option<&Policy>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = module
        .env
        .iter()
        .filter(|(k, _)| !spec.env.contains_key(k))
        .cloned()
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(p) = policy {
        env.retain(|(k, _)| p.env_allowed(k));
    }
    env
}

/// The preopens a run gets: the spec's mounts the policy allows (read-only where it says
/// so); a mount it does not allow is not mapped at all, so the guest finds nothing there.
/// Admission refuses such specs already; this holds for sandboxes adopted or admitted in
/// audit mode.
///
/// Each directory is opened here, once, and the policy is checked against where that open
/// descriptor leads: a symlink to outside the policy's hostPaths (made since the create)
/// maps nothing, and one swapped in after the check changes nothing, as the run preopens
/// the descriptor's directory, not the path again.
fn mounts(spec: &SandboxSpec, policy: Option<&Policy>) -> Vec<run::Mount> {
    spec.mounts
        .iter()
        .filter_map(|m| {
            let dir = run::open_dir(Path::new(&m.host));
            let read_only = match policy {
                None => m.read_only,
                Some(p) if !p.host_path_allowed(&m.host) => return None,
                Some(p) => {
                    // Not opened: nothing is mapped either way, the run reports why.
                    if let Ok(dir) = &dir
                        && !run::opened_path(dir)
                            .is_some_and(|at| p.resolved_host_path_allowed(&at.to_string_lossy()))
                    {
                        return None;
                    }
                    match p.path_access(&m.guest) {
                        // A read-only path inside makes the whole preopen read-only.
                        None | Some(PathAccess::Writable) => {
                            m.read_only || p.read_only_below(&m.guest).is_some()
                        }
                        Some(PathAccess::ReadOnly) => true,
                        Some(PathAccess::Masked | PathAccess::None) => return None,
                    }
                }
            };
            Some(run::Mount {
                dir,
                host: PathBuf::from(&m.host),
                guest: m.guest.clone(),
                read_only,
            })
        })
        .collect()
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

    fn check_mounts(
        spec: &SandboxSpec,
        policy: Option<&warren_runtime::AppliedPolicy>,
    ) -> Result<(), BackendError> {
        for (i, mount) in spec.mounts.iter().enumerate() {
            let host = warren_runtime::resolve_host_path(
                &format!("spec.mounts[{i}].host"),
                &mount.host,
                policy,
            )?;
            if !host.is_dir() {
                return Err(BackendError::Other(format!(
                    "spec.mounts[{i}].host: {:?} is not a directory on this node",
                    mount.host
                )));
            }
        }
        Ok(())
    }

    fn info(&self, id: &str, module: &ModuleSource, cache: &str) -> BackendInfo {
        let mut info = BackendInfo::new();
        info.insert("module".into(), module.path.display().to_string());
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
        warren_runtime::no_published_ports(BackendKind::Wasm, &config.spec)?;
        warren_runtime::linux_only_fields(BackendKind::Wasm, &config.spec, true)?;
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
        let mut module = inner.module_source(&config.spec, config.policy.as_ref())?;
        let memory_limit = inner.memory_limit(&config.resources)?;
        Inner::check_mounts(&config.spec, config.policy.as_ref())?;
        let held = module.held.take();
        let (program, source) = inner
            .cache
            .load_held(&module.path, held.as_deref())
            .await
            .map_err(load_error)?;
        // Made behind (see `create_files`): the create does not wait for the disk.
        let dir = inner.sandbox_dir(id);
        let log = LogWriter::deferred(dir.join(LOG_FILE), inner.config.log_max_bytes);
        let files = inner.files.submit(move || create_files(&dir));
        let info = inner.info(id, &module, source.as_str());
        let sandbox = Sandbox {
            program: Some(program),
            spec: config.spec.clone(),
            module,
            memory_limit,
            stdin: config.stdin.clone(),
            policy: config.policy.as_ref().map(|a| Arc::clone(&a.policy)),
            log: Arc::new(log),
            files: Some(files),
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
                sandbox.module.path.display()
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
        let restart = sandbox.status != BackendStatus::Created;
        sandbox.log.begin();
        let (dir, log) = (inner.sandbox_dir(id), Arc::clone(&sandbox.log));
        let files = inner.files.submit(move || start_files(&dir, restart, &log));
        sandbox.files = Some(files);
        let log = Arc::clone(&sandbox.log);
        let spec = &sandbox.spec;
        let stop = Arc::new(Notify::new());
        let (paused, paused_rx) = watch::channel(false);
        let job = Job {
            program,
            argv: argv(spec, &sandbox.module),
            env: env(spec, &sandbox.module, sandbox.policy.as_deref()),
            mounts: mounts(spec, sandbox.policy.as_deref()),
            stdin: sandbox.stdin.clone(),
            policy: sandbox.policy.clone(),
            memory_limit: sandbox.memory_limit,
            fuel: inner.config.fuel,
            timeout: timeout(spec, &inner.config),
            log: Some(log),
            stop: Arc::clone(&stop),
            paused: paused_rx,
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
            paused,
            done,
            task: task.abort_handle(),
        });
        Ok(())
    }

    /// The guest stops at its next epoch tick (a few ms; one in a host call, a sleep say,
    /// once that returns) and waits there, its memory kept, until `resume`.
    async fn pause(&self, id: &str) -> Result<(), BackendError> {
        self.set_paused(id, true)
    }

    async fn resume(&self, id: &str) -> Result<(), BackendError> {
        self.set_paused(id, false)
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
                    // Never started: it has files only if it was adopted.
                    let dir = inner.sandbox_dir(id);
                    if dir.is_dir() {
                        write_status(&dir, &BackendStatus::Stopped);
                    }
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
        let (status, cancelled) = {
            let mut sandboxes = inner.lock();
            let sandbox = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            let cancelled = sandbox.run == current_run && sandbox.status == BackendStatus::Running;
            if cancelled {
                // The task was cancelled before recording anything.
                sandbox.status = BackendStatus::Stopped;
                let _ = sandbox.log.close();
            }
            (sandbox.status.clone(), cancelled)
        };
        if cancelled {
            self.logs_settled(id).await;
            write_status(&inner.sandbox_dir(id), &BackendStatus::Stopped);
        }
        Ok(status)
    }

    async fn logs_settled(&self, id: &str) {
        let Ok(inner) = self.inner() else {
            return;
        };
        let files = inner.lock().get(id).and_then(|s| s.files.clone());
        if let Some(mut files) = files {
            // Closed without `true`: the job is gone (it panicked); nothing more will come.
            let _ = files.wait_for(|ready| *ready).await;
        }
    }

    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let inner = self.inner()?;
        if id == CACHE_DIR {
            return Err(not_found(id));
        }
        let known = inner.lock().contains_key(id);
        if known {
            self.stop(id, Duration::ZERO).await?;
            // A start's file job still running would make the directory again.
            self.logs_settled(id).await;
        }
        let removed = inner.lock().remove(id);
        let dir = inner.sandbox_dir(id);
        if warren_runtime::remove_tree(&dir)? || removed.is_some() {
            Ok(())
        } else {
            Err(not_found(id))
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
        // Past the create checks already: a limit the config no longer allows gets the cap.
        let cap = usize::try_from(inner.config.max_memory_bytes).unwrap_or(usize::MAX);
        let memory_limit = inner.memory_limit(&config.resources).unwrap_or(cap);
        let mut found = inner.module_source(&config.spec, config.policy.as_ref());
        let held = found.as_mut().ok().and_then(|m| m.held.take());
        let loaded = match &found {
            Ok(module) => inner
                .cache
                .load_held(&module.path, held.as_deref())
                .await
                .map_err(load_error),
            Err(e) => Err(BackendError::Invalid(e.to_string())),
        };
        let module = found.unwrap_or_else(|_| ModuleSource {
            path: PathBuf::from(config.spec.image.clone().unwrap_or_default()),
            ..ModuleSource::default()
        });
        let (program, cache) = match loaded {
            Ok((program, source)) => (Some(program), source.as_str()),
            Err(e) if status == BackendStatus::Created => return Err(e),
            Err(e) => {
                warn!(id, "wasm: adopted sandbox cannot restart: {e}");
                (None, "unavailable")
            }
        };
        // Adopted sandboxes are not running (a wasm guest ends with its server): the log file,
        // if any, is opened again only if the sandbox starts again, its length counted now.
        let log = LogWriter::deferred(dir.join(LOG_FILE), inner.config.log_max_bytes);
        log.count_existing();
        let info = inner.info(id, &module, cache);
        let sandbox = Sandbox {
            program,
            spec: config.spec.clone(),
            module,
            memory_limit,
            stdin: None,
            policy: config.policy.as_ref().map(|a| Arc::clone(&a.policy)),
            log: Arc::new(log),
            files: None,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic is how a test fails

    use super::*;

    fn names(dir: &std::fs::File) -> Vec<String> {
        let at = run::opened_path(dir).unwrap();
        // Listed through the descriptor, as the run preopens it.
        let held = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir));
        assert!(at.is_absolute(), "{}", at.display());
        let mut names: Vec<String> = std::fs::read_dir(held)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A module file is opened once, checked where that open file is, and read through the
    /// handle: a path swapped for a link elsewhere after the check changes nothing.
    #[test]
    fn a_module_is_the_file_checked_not_the_path_again() {
        use std::io::Read as _;
        let root = tempfile::tempdir().unwrap();
        let module = root.path().join("m.wat");
        let elsewhere = root.path().join("evil.wat");
        std::fs::write(&module, "(module)").unwrap();
        std::fs::write(&elsewhere, "(module (func))").unwrap();
        let (file, at) = open_module(&module.display().to_string(), None).unwrap();
        assert_eq!(at, module);
        std::fs::rename(&module, root.path().join("old.wat")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &module).unwrap();
        let mut read = String::new();
        (&file).read_to_string(&mut read).unwrap();
        assert_eq!(read, "(module)");
        // Opened now, through the link: where it leads is what is reported and checked.
        let (_, at) = open_module(&module.display().to_string(), None).unwrap();
        assert_eq!(at, elsewhere);
        let missing = open_module("/no/such/m.wasm", None)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("does not exist"), "{missing}");
    }

    /// The policy is checked against the directory a mount's descriptor holds, and the
    /// run preopens that directory: a symlink swapped in after the check reaches nothing
    /// new, and one there before the check maps nothing.
    #[test]
    fn a_mount_is_the_directory_checked_not_the_path_again() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("data/mine"), "").unwrap();
        std::fs::write(outside.join("secret"), "").unwrap();
        let policy = Policy::compile(
            "p",
            warren_spec::PolicySpec {
                filesystem: Some(warren_spec::FilesystemPolicy {
                    host_paths: Some(vec![allowed.display().to_string()]),
                    read_only: vec!["/data".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let spec = SandboxSpec {
            mounts: vec![warren_spec::Mount {
                guest: "/data".into(),
                host: allowed.join("data").display().to_string(),
                read_only: true,
            }],
            ..Default::default()
        };

        let set_up = mounts(&spec, Some(&policy));
        assert_eq!(set_up.len(), 1);
        std::fs::rename(allowed.join("data"), allowed.join("old")).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("data")).unwrap();
        assert_eq!(names(set_up[0].dir.as_ref().unwrap()), ["mine"]);

        // Set up now, through the symlink: outside the policy's hostPaths, not mapped.
        assert!(mounts(&spec, Some(&policy)).is_empty());
        // Without a policy the path is followed, as a user asked.
        let unchecked = mounts(&spec, None);
        assert_eq!(names(unchecked[0].dir.as_ref().unwrap()), ["secret"]);
    }
}
