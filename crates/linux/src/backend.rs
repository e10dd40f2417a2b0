//! [`LinuxBackend`]: the server's side of the linux backend. It turns a validated spec and an
//! image into a bundle directory (`container.json` plus the overlay's `upper`/`work`), starts
//! a supervisor per sandbox, and follows it: through its child handle while this server
//! started it, through a pidfd after a restart (the supervisor is then no longer our child).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;
use tracing::{debug, warn};
use warren_image::ImageStore;
use warren_runtime::{
    Backend, BackendError, BackendEvent, BackendInfo, BackendStatus, EventSink, ExecProcess,
    ExecRequest, SandboxConfig, Stdin,
};
use warren_spec::{BackendKind, NetworkMode, ResourceInfo, SandboxSpec, parse_user};

use crate::config::{self, BindMount, ContainerConfig, Exit, Limits, State};
use crate::exec::ExecSpec;

mod checkpoint;
mod network;
mod ports;
mod pty;
mod spec;
mod warm;

use pty::*;
use spec::*;
pub use warm::WARM_LABEL;
use warm::*;

/// The reason a sandbox failed when the kernel OOM-killed it.
pub const REASON_OOM: &str = "OOMKilled";
pub const REASON_TIMEOUT: &str = "Timeout";
/// How long CRIU may take to restore a checkpoint by default: minutes, as a large memory
/// image takes a while to read back, but not for ever.
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `stop` waits past the grace period for the supervisor to report the end.
const STOP_SLACK: Duration = Duration::from_secs(5);

/// Settings of the linux backend.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// Bundles live in `<dir>/<id>`.
    pub dir: PathBuf,
    pub images: ImageStore,
    /// The supervisor command: a program and its leading arguments; the bundle path is added.
    pub supervisor: Vec<OsString>,
    /// Parent cgroup of every sandbox's cgroup (`<hierarchy>/<parent>/<id>`).
    pub cgroup_parent: String,
    pub log_max_bytes: Option<u64>,
    /// SIGTERM to SIGKILL when neither the stop request nor the spec says.
    pub default_stop_grace: Duration,
    /// Warm shells kept ready per image name (`--warm linux:busybox=4`).
    pub warm: Vec<(String, usize)>,
    /// The CRIU binary for checkpoints (`--criu`); `None` finds one ([`crate::criu`]).
    pub criu: Option<PathBuf>,
    /// How long CRIU may take to restore a checkpoint before it is killed and the restore
    /// fails ([`DEFAULT_RESTORE_TIMEOUT`] unless configured).
    pub restore_timeout: Duration,
    /// Where `network.mode: egress` sandboxes get their addresses (a `/30` each).
    pub egress_range: ipnet::Ipv4Net,
}

impl LinuxConfig {
    /// The supervisor next to the running executable: `warren-supervise` when it is there
    /// and was built from the same sources as this executable (its `--build-id` matches;
    /// a stale one left by a partial rebuild would speak an older protocol), else the
    /// executable itself with `__supervise` (the `warren` binary carries both; the small one
    /// only starts faster).
    pub fn default_supervisor() -> Vec<OsString> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("warren"));
        let sibling = exe.with_file_name("warren-supervise");
        let fresh = sibling.is_file()
            && std::process::Command::new(&sibling)
                .arg("--build-id")
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| {
                    o.status.success() && o.stdout.trim_ascii() == crate::BUILD_ID.as_bytes()
                });
        if !fresh && sibling.is_file() {
            warn!(
                supervisor = %sibling.display(),
                "linux: warren-supervise is from another build; using `warren __supervise`"
            );
        }
        if fresh {
            vec![sibling.into_os_string()]
        } else {
            vec![exe.into_os_string(), "__supervise".into()]
        }
    }
}

#[derive(Debug, Clone)]
pub struct LinuxBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: LinuxConfig,
    events: EventSink,
    /// The node's cgroup layout, or why this backend cannot run here.
    available: Result<crate::cgroup::CgroupLayout, String>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    shells: Mutex<Vec<Shell>>,
    /// Warm shells to keep per image name: `--warm`, then what pools set.
    targets: Mutex<Vec<(String, usize)>>,
    /// The refill task runs.
    refilling: std::sync::atomic::AtomicBool,
    /// Wakes the refill task when a shell was taken.
    refill: Arc<tokio::sync::Notify>,
    /// The CRIU binary, found at the first checkpoint or restore.
    criu: std::sync::OnceLock<crate::criu::Criu>,
    /// Addresses and tables of egress sandboxes.
    network: network::Network,
}

/// Where warm shells wait (hidden: not a sandbox of [`Backend::list`]).
const WARM_DIR: &str = ".warm";

#[derive(Debug)]
struct Sandbox {
    resources: ResourceInfo,
    info: BackendInfo,
    status: BackendStatus,
    supervisor: Option<i32>,
    /// Flips to true once the supervisor has ended (its clean-up done). `status` holds the
    /// workload's outcome from the moment the supervisor reports it, which is earlier.
    done: Option<watch::Receiver<bool>>,
    /// What `start` needs, between create and start.
    pending: Option<Pending>,
    /// The relays of its published ports, while its workload runs.
    published: Option<ports::Published>,
}

#[derive(Debug)]
struct Pending {
    container: ContainerConfig,
    image_id: String,
    stdin: Option<Stdin>,
    /// Its published ports, bound at create (a taken one fails the create).
    ports: ports::Bound,
}

fn not_found(id: &str) -> BackendError {
    BackendError::not_found(BackendKind::Linux, id)
}

impl LinuxBackend {
    /// A Running sandbox's cgroup (pause, unpause).
    fn running_cgroup(&self, id: &str) -> Result<crate::cgroup::Cgroup, BackendError> {
        let status = self
            .inner
            .lock()
            .get(id)
            .map(|sb| sb.status.clone())
            .ok_or_else(|| not_found(id))?;
        if status != BackendStatus::Running {
            return Err(BackendError::Other(format!(
                "sandbox {id} is {status:?}: its workload is not running"
            )));
        }
        self.inner
            .cgroup(&cgroup_name(&self.bundle(id), id))
            .ok_or_else(|| BackendError::Other("linux: the backend is not available".into()))
    }

    /// Resumes a paused sandbox, so that a signal or a stop reaches its workload (a frozen
    /// process acts on neither, and a v1 freezer holds even SIGKILL back).
    fn thaw(&self, id: &str) {
        if let Some(cg) = self.inner.cgroup(&cgroup_name(&self.bundle(id), id))
            && cg.paused().unwrap_or(false)
            && let Err(e) = cg.resume()
        {
            warn!(id, error = %crate::error_chain(&e), "linux: unpause before a stop or signal");
        }
    }

    /// Waits until the sandbox's supervisor has finished its clean-up (it reports the
    /// workload's end first); one that does not within the stop slack is killed.
    async fn supervisor_gone(&self, id: &str, bundle: &Path) {
        let (done, supervisor) = match self.inner.lock().get(id) {
            Some(sb) => (sb.done.clone(), sb.supervisor),
            None => return,
        };
        let (Some(mut done), Some(pid)) = (done, supervisor) else {
            return;
        };
        if tokio::time::timeout(STOP_SLACK, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            warn!(
                id,
                "linux: supervisor still cleaning up after the stop slack; killing it"
            );
            self.inner.kill_everything(&cgroup_name(bundle, id), pid);
            let _ = tokio::time::timeout(STOP_SLACK, done.wait_for(|d| *d)).await;
        }
    }

    pub fn new(config: LinuxConfig, events: EventSink) -> Result<Self, BackendError> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| BackendError::io("create", &config.dir, e))?;
        // Bundles hold sandboxes' writable layers, set-id files a sandbox made among them:
        // root's alone, as the server's own dir is.
        std::fs::set_permissions(
            &config.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| BackendError::io("restrict", &config.dir, e))?;
        let available = probe();
        let warm_dir = config.dir.join(WARM_DIR);
        if let Ok(layout) = &available {
            clean_warm_dir(&warm_dir, layout, &config.cgroup_parent);
        }
        std::fs::create_dir_all(&warm_dir).map_err(|e| BackendError::io("create", &warm_dir, e))?;
        let warm = config.warm.clone();
        let network = network::Network::new(&config.dir, config.egress_range);
        let backend = LinuxBackend {
            inner: Arc::new(Inner {
                network,
                config,
                events,
                available,
                sandboxes: Mutex::new(HashMap::new()),
                shells: Mutex::new(Vec::new()),
                refill: Arc::new(tokio::sync::Notify::new()),
                targets: Mutex::new(warm),
                refilling: std::sync::atomic::AtomicBool::new(false),
                criu: std::sync::OnceLock::new(),
            }),
        };
        if !backend.inner.config.warm.is_empty()
            && backend.inner.available.is_ok()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            backend
                .inner
                .refilling
                .store(true, std::sync::atomic::Ordering::SeqCst);
            runtime.spawn(refill_loop(Arc::downgrade(&backend.inner)));
        }
        Ok(backend)
    }

    pub fn images(&self) -> &ImageStore {
        &self.inner.config.images
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.inner.config.dir.join(id)
    }
}

/// What the node must have: root (namespaces, mounts, cgroups) and a cgroup layout we know;
/// the layout, found once.
fn probe() -> Result<crate::cgroup::CgroupLayout, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (namespaces, overlay mounts and cgroups)".to_string());
    }
    crate::cgroup::CgroupLayout::detect()
        .map_err(|e| format!("cgroups: {}", crate::error_chain(&e)))
}

impl Inner {
    /// The sandbox's cgroup by its name under the parent (`None` where the backend cannot
    /// run: then it made none).
    fn cgroup(&self, name: &str) -> Option<crate::cgroup::Cgroup> {
        let layout = self.available.as_ref().ok()?;
        Some(crate::cgroup::Cgroup::open(
            layout,
            &self.config.cgroup_parent,
            name,
        ))
    }

    /// The last resort of a stop: SIGKILL every process in the sandbox's cgroup and the
    /// supervisor itself.
    fn kill_everything(&self, cgroup: &str, supervisor: i32) {
        if let Some(cg) = self.cgroup(cgroup) {
            let _ = cg.kill_all();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the end of a sandbox's supervisor (and of its workload, when the supervisor
    /// did not report that before).
    fn finished(&self, id: &str, bundle: &Path) {
        let reported = {
            let mut sandboxes = self.lock();
            let Some(sb) = sandboxes.get_mut(id) else {
                return;
            };
            sb.supervisor = None;
            sb.status != BackendStatus::Running
        };
        if !reported {
            self.ended(id, self.status_after_supervisor(id, bundle));
        }
    }

    /// The status of a sandbox whose supervisor has ended, from what it recorded. One that
    /// ended without recording the workload's end (killed: by hand, by the OOM killer) left
    /// its workload unwatched, its output unread and its time limit unenforced: what runs
    /// in the sandbox's cgroup is killed, so a Failed sandbox runs nothing.
    fn status_after_supervisor(&self, id: &str, bundle: &Path) -> BackendStatus {
        let status = exit_status(bundle);
        if !bundle.join(config::EXIT_FILE).exists()
            && let Some(cg) = self.cgroup(&cgroup_name(bundle, id))
            && let Err(e) = cg.kill_all()
        {
            warn!(id, error = %crate::error_chain(&e), "linux: kill what the sandbox's supervisor left");
        }
        status
    }

    /// Records the end of a sandbox's workload and tells the control plane.
    fn ended(&self, id: &str, status: BackendStatus) {
        debug!(id, ?status, "linux: sandbox ended");
        {
            let mut sandboxes = self.lock();
            let Some(sb) = sandboxes.get_mut(id) else {
                return;
            };
            sb.status = status.clone();
            // Its ports are free again, as docker frees a stopped container's.
            sb.published = None;
        }
        if status != BackendStatus::Stopped {
            let _ = self.events.send(BackendEvent {
                id: id.to_string(),
                status,
            });
        }
    }
}

/// The bundle directory of a container: its config and the overlay's directories.
fn make_bundle(bundle: &Path, container: &ContainerConfig) -> Result<(), BackendError> {
    let make = || -> std::io::Result<()> {
        std::fs::create_dir(bundle)?;
        for d in [config::ROOTFS_DIR, config::UPPER_DIR, config::WORK_DIR] {
            std::fs::create_dir(bundle.join(d))?;
        }
        config::write_json(bundle, config::CONFIG_FILE, container)
    };
    make().map_err(|e| {
        let _ = std::fs::remove_dir_all(bundle);
        BackendError::io("create bundle", bundle, e)
    })
}

/// The writable layer's own file system for a storage limit: a sparse file of `bytes` in
/// the bundle, made ext4 (no journal: the layer goes with the sandbox; no blocks reserved
/// for root: the sandbox gets all of it). The container mounts it ([`config::STORAGE_DIR`]).
async fn make_storage(bundle: &Path, bytes: u64) -> Result<(), BackendError> {
    let file = bundle.join(config::STORAGE_FILE);
    let dir = bundle.join(config::STORAGE_DIR);
    std::fs::create_dir(&dir).map_err(|e| BackendError::io("create", &dir, e))?;
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| BackendError::io("create", &file, e))?;
    let mut mkfs = tokio::process::Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-m",
        "0",
        "-O",
        "^has_journal",
        "-E",
        "root_owner=0:0",
    ])
    .arg(&file);
    run_tool(mkfs, ("run mkfs.ext4 (e2fsprogs) on", &file), || {
        format!("mkfs.ext4 {}", file.display())
    })
    .await
}

/// Runs a tool to its end with no input; a failure to start it is `spawn` (the action
/// and the path it was for), an exit other than 0 is `failed()` and what it wrote on stderr.
async fn run_tool(
    mut cmd: tokio::process::Command,
    spawn: (&'static str, &Path),
    failed: impl FnOnce() -> String,
) -> Result<(), BackendError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| BackendError::io(spawn.0, spawn.1, e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(BackendError::Other(format!(
        "{}: {}",
        failed(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// A supervisor that reported `ok PID`.
#[derive(Debug)]
struct Started {
    child: tokio::process::Child,
    /// Its stdout after the `ok` line, where it reports the workload's end (`exit JSON`)
    /// before its own clean-up: the sandbox's end is known without waiting for that.
    reports: Option<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// The workload's pid.
    pid: i32,
}

/// Starts a supervisor on `bundle` and waits for its `ok PID` (or its error).
async fn spawn_supervisor(
    inner: &Inner,
    bundle: &Path,
    mode: Option<&str>,
) -> Result<Started, BackendError> {
    let log_path = bundle.join(config::SUPERVISOR_LOG_FILE);
    let log =
        std::fs::File::create(&log_path).map_err(|e| BackendError::io("create", &log_path, e))?;
    let (program, args) = inner
        .config
        .supervisor
        .split_first()
        .ok_or_else(|| BackendError::Other("no supervisor command configured".into()))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .args(mode)
        .arg(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| BackendError::io("start supervisor", Path::new(program), e))?;
    let mut line = String::new();
    let mut reports = child.stdout.take().map(tokio::io::BufReader::new);
    if let Some(reader) = &mut reports {
        reader
            .read_line(&mut line)
            .await
            .map_err(|e| BackendError::io("read from supervisor", bundle, e))?;
    }
    let line = line.trim_end();
    match line.strip_prefix("ok ").map(str::parse::<i32>) {
        Some(Ok(pid)) => Ok(Started {
            child,
            reports,
            pid,
        }),
        _ => {
            let _ = child.wait().await;
            Err(start_error(line))
        }
    }
}

/// A supervisor's `error MESSAGE` as the backend's error.
fn start_error(line: &str) -> BackendError {
    let reason = line.strip_prefix("error ").unwrap_or(if line.is_empty() {
        "the supervisor exited without a word; see supervisor.log"
    } else {
        line
    });
    // What the workload's own settings got wrong (a missing program) is the caller's input.
    if reason.starts_with("exec ") || reason.starts_with("chdir ") {
        BackendError::Invalid(format!("start: {reason}"))
    } else {
        BackendError::Other(format!("start: {reason}"))
    }
}

async fn cold_start(
    inner: &Inner,
    bundle: &Path,
    container: &ContainerConfig,
    stdin: Option<&Stdin>,
) -> Result<Started, BackendError> {
    make_bundle(bundle, container)?;
    if let Some(bytes) = container.storage_bytes
        && let Err(e) = make_storage(bundle, bytes).await
    {
        let _ = std::fs::remove_dir_all(bundle);
        return Err(e);
    }
    if let Some(stdin) = stdin {
        let path = bundle.join(config::STDIN_FILE);
        std::fs::write(&path, stdin.bytes()).map_err(|e| BackendError::io("write", &path, e))?;
    }
    spawn_supervisor(inner, bundle, None).await
}

/// What a sandbox's info says from the start: its image, bundle and command.
fn base_info(image_id: &str, bundle: &Path, container: &ContainerConfig) -> BackendInfo {
    let mut info = BackendInfo::new();
    info.insert("image".into(), image_id.to_string());
    info.insert("bundle".into(), bundle.display().to_string());
    info.insert("command".into(), container.argv.join(" "));
    info
}

/// Marks the sandbox Running under its supervisor, records the workload's end as soon as the
/// supervisor reports it, and flips `done` once the supervisor itself has ended.
fn supervise_child(
    inner: &Arc<Inner>,
    id: &str,
    bundle: PathBuf,
    started: Started,
    ports: ports::Bound,
) {
    let Started {
        mut child,
        reports,
        pid,
    } = started;
    let supervisor = child.id().map(|p| p as i32);
    let (done_tx, done_rx) = watch::channel(false);
    let published = publish(id, ports, pid);
    if let Some(sb) = inner.lock().get_mut(id) {
        sb.status = BackendStatus::Running;
        sb.supervisor = supervisor;
        sb.done = Some(done_rx);
        sb.info.insert("pid".into(), pid.to_string());
        if let Some((published, shown)) = published {
            sb.published = Some(published);
            sb.info.insert("ports".into(), shown);
        }
    }
    let inner = Arc::clone(inner);
    let id = id.to_string();
    tokio::spawn(async move {
        if let Some(reports) = reports
            && let Some(exit) = read_exit(reports).await
        {
            inner.ended(&id, exit_status_of(&bundle, Ok(exit)));
        }
        let _ = child.wait().await;
        inner.finished(&id, &bundle);
        let _ = done_tx.send(true);
    });
}

/// Starts relaying the sandbox's bound ports into the namespace of its workload `pid`;
/// `None` when it has none, or its workload is gone already.
fn publish(id: &str, bound: ports::Bound, pid: i32) -> Option<(ports::Published, String)> {
    if bound.is_empty() {
        return None;
    }
    let shown = ports::shown(&bound);
    match ports::serve(bound, Path::new(&format!("/proc/{pid}/ns/net"))) {
        Ok(published) => Some((published, shown)),
        Err(e) => {
            warn!(id, error = %e, "linux: the sandbox's ports are not published");
            None
        }
    }
}

/// The supervisor's `exit JSON` line; `None` when it ended without one (then `exit.json`
/// says, or nothing does).
async fn read_exit(mut reports: impl tokio::io::AsyncBufRead + Unpin) -> Option<Exit> {
    let mut line = String::new();
    reports.read_line(&mut line).await.ok()?;
    serde_json::from_str(line.trim_end().strip_prefix("exit ")?).ok()
}

/// The outcome the supervisor recorded in `exit.json`.
fn exit_status(bundle: &Path) -> BackendStatus {
    exit_status_of(bundle, config::read_json::<Exit>(bundle, config::EXIT_FILE))
}

/// The sandbox's status from the workload's end as the supervisor reported or recorded it.
fn exit_status_of(bundle: &Path, exit: std::io::Result<Exit>) -> BackendStatus {
    if exit.is_ok() && bundle.join(checkpoint::CHECKPOINTED_MARK).exists() {
        // CRIU killed the workload after dumping it: the sandbox was stopped, not killed.
        return BackendStatus::Stopped;
    }
    match exit {
        Ok(exit) if exit.oom_killed => BackendStatus::Failed {
            reason: REASON_OOM.to_string(),
        },
        Ok(exit) if exit.timed_out => BackendStatus::Failed {
            reason: REASON_TIMEOUT.to_string(),
        },
        Ok(exit) if exit.stopped => BackendStatus::Stopped,
        Ok(exit) => BackendStatus::Exited { code: exit.code },
        Err(e) => BackendStatus::Failed {
            reason: format!(
                "the supervisor ended without recording the workload's end ({e}), so its processes were killed; see {}",
                bundle.join(config::SUPERVISOR_LOG_FILE).display()
            ),
        },
    }
}

/// The exec helper, told to end its process if `wait` is dropped before it ended (the
/// caller went away); the helper reaps the process and exits, and is reaped here at once,
/// not when tokio next looks at orphans: a zombie counts against the sandbox's pids limit.
struct EndOnDrop(Option<tokio::process::Child>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    crate::exec::END_SIGNAL,
                );
            }
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = child.wait().await;
                });
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for LinuxBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Linux
    }

    fn is_available(&self) -> Result<(), String> {
        self.inner
            .available
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
    }

    async fn create(&self, config: &SandboxConfig) -> Result<BackendInfo, BackendError> {
        let inner = &self.inner;
        let id = &config.id;
        if inner.lock().contains_key(id) {
            return Err(BackendError::AlreadyExists {
                backend: BackendKind::Linux,
                id: id.clone(),
            });
        }
        let (container, image_id) = container_config(inner, config)?;
        if let Err(e) = crate::seccomp::compiled_with(
            &container.deny_syscalls,
            container.policy_syscalls.as_ref(),
        ) {
            if container.egress.is_some() {
                inner.network.release(id);
            }
            return Err(BackendError::Invalid(crate::error_chain(&e)));
        }
        let ports = match ports::bind(&config.spec.ports) {
            Ok(ports) => ports,
            Err(e) => {
                if container.egress.is_some() {
                    inner.network.release(id);
                }
                return Err(e);
            }
        };
        let bundle = self.bundle(id);
        let info = base_info(&image_id, &bundle, &container);
        inner.lock().insert(
            id.clone(),
            Sandbox {
                resources: config.resources.clone(),
                info: info.clone(),
                status: BackendStatus::Created,
                supervisor: None,
                done: None,
                pending: Some(Pending {
                    container,
                    image_id,
                    stdin: config.stdin.clone(),
                    ports,
                }),
                published: None,
            },
        );
        Ok(info)
    }

    async fn start(&self, id: &str) -> Result<(), BackendError> {
        let inner = Arc::clone(&self.inner);
        let Pending {
            container,
            image_id,
            stdin,
            ports,
        } = {
            let mut sandboxes = inner.lock();
            let sb = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            match (&sb.status, sb.pending.take()) {
                (BackendStatus::Created, Some(pending)) => pending,
                (status, _) => {
                    return Err(BackendError::Other(format!(
                        "sandbox {id} cannot start: it is {status:?}"
                    )));
                }
            }
        };
        let bundle = self.bundle(id);
        // A warm shell's stdin is set when it is made: input needs a cold start.
        let (shell, dead) = if container.mounts.is_empty()
            && stdin.is_none()
            && container.storage_bytes.is_none()
        {
            inner.take_shell(&image_id)
        } else {
            (None, Vec::new())
        };
        end_dead_shells(&inner, dead);
        let claimed = match shell {
            Some(shell) => {
                let claimed = claim(&inner, shell, &bundle, &container).await;
                // Refilled after the hand-out, not during it: a new shell's supervisor start
                // competed with the claim for the CPUs.
                inner.refill.notify_one();
                match claimed {
                    Ok(started) => Some(started),
                    Err(ClaimError::Gone(e)) => {
                        warn!(id, error = %e, "linux: the warm shell was gone at its claim; starting cold");
                        None
                    }
                    Err(ClaimError::Failed(e)) => return Err(e),
                }
            }
            None => None,
        };
        let warm = claimed.is_some();
        let started = match claimed {
            Some(started) => started,
            None => {
                let started = cold_start(&inner, &bundle, &container, stdin.as_ref()).await;
                // A pool without a shell of this image may hold shells of the image its name
                // stood for before an import: the refill renews it now, not in 5 s.
                if inner.has_warm_targets() {
                    inner.refill.notify_one();
                }
                started?
            }
        };
        if let Some(sb) = inner.lock().get_mut(id) {
            // Pools count a create that took a warm shell as a hit.
            sb.info.insert("warm".into(), warm.to_string());
        }
        supervise_child(&inner, id, bundle, started, ports);
        Ok(())
    }

    fn info(&self, id: &str) -> Option<BackendInfo> {
        self.inner.lock().get(id).map(|sb| sb.info.clone())
    }

    /// Freezes the workload's cgroup (every process in it, execs included); the
    /// supervisor, outside it, keeps watching.
    async fn pause(&self, id: &str) -> Result<(), BackendError> {
        let cgroup = self.running_cgroup(id)?;
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            cgroup.pause().map_err(|e| {
                BackendError::Other(format!("pause sandbox {id}: {}", crate::error_chain(&e)))
            })
        })
        .await
        .map_err(|e| BackendError::Other(format!("pause: {e}")))?
    }

    async fn processes(&self, id: &str) -> Result<Vec<warren_runtime::ProcessInfo>, BackendError> {
        let cgroup = self.running_cgroup(id)?;
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let pids = cgroup.pids().map_err(|e| {
                BackendError::Other(format!(
                    "list the processes of sandbox {id}: {}",
                    crate::error_chain(&e)
                ))
            })?;
            // A process that ends meanwhile is left out, and so are warren's own exec
            // helpers: in the cgroup, but outside the sandbox's pid namespace.
            Ok(pids
                .into_iter()
                .filter_map(process_info)
                .filter(|p| p.sandbox_pid.is_some())
                .collect())
        })
        .await
        .map_err(|e| BackendError::Other(format!("list processes: {e}")))?
    }

    async fn paused(&self, id: &str) -> Option<bool> {
        // Frozen or being frozen (without a freezer nothing is).
        self.running_cgroup(id).ok()?.paused().ok()
    }

    async fn resume(&self, id: &str) -> Result<(), BackendError> {
        let cgroup = self.running_cgroup(id)?;
        cgroup.resume().map_err(|e| {
            BackendError::Other(format!("unpause sandbox {id}: {}", crate::error_chain(&e)))
        })
    }

    async fn signal(&self, id: &str, signal: i32) -> Result<(), BackendError> {
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(|_| {
            BackendError::Invalid(format!(
                "signal: {signal} is not a standard signal (real-time signals are not sent)"
            ))
        })?;
        let pid = {
            let sandboxes = self.inner.lock();
            let sb = sandboxes.get(id).ok_or_else(|| not_found(id))?;
            match (
                &sb.status,
                sb.info.get("pid").and_then(|p| p.parse::<i32>().ok()),
            ) {
                (BackendStatus::Running, Some(pid)) => pid,
                (status, _) => {
                    return Err(BackendError::Other(format!(
                        "sandbox {id} is {status:?}: there is no process to signal"
                    )));
                }
            }
        };
        // A paused workload gets the signal once it runs again: it is resumed first.
        self.thaw(id);
        // The workload is the container's init: its supervisor reaps it, so the pid stays
        // its own while the sandbox is Running. Like `docker kill`, a signal the workload
        // has no handler for is ignored by the kernel, except SIGKILL and SIGSTOP.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).or_else(|e| match e {
            nix::errno::Errno::ESRCH => Ok(()),
            e => Err(BackendError::Other(format!(
                "send {sig} to sandbox {id} (pid {pid}): {}",
                e.desc()
            ))),
        })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<BackendStatus, BackendError> {
        let bundle = self.bundle(id);
        let (supervisor, done) = {
            let mut sandboxes = self.inner.lock();
            let sb = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            match (&sb.status, sb.supervisor, &sb.done) {
                (BackendStatus::Running, Some(pid), Some(done)) => (pid, done.clone()),
                (BackendStatus::Created, _, _) => {
                    sb.status = BackendStatus::Stopped;
                    return Ok(BackendStatus::Stopped);
                }
                (status, _, _) => return Ok(status.clone()),
            }
        };
        self.thaw(id);
        std::fs::write(
            bundle.join(config::STOP_FILE),
            grace.as_millis().to_string(),
        )
        .map_err(|e| BackendError::io("write", &bundle.join(config::STOP_FILE), e))?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor),
            nix::sys::signal::Signal::SIGTERM,
        );
        let mut done = done;
        if tokio::time::timeout(grace + STOP_SLACK, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            warn!(
                id,
                "linux: supervisor did not end after the grace period; killing it"
            );
            self.inner
                .kill_everything(&cgroup_name(&bundle, id), supervisor);
            let _ = tokio::time::timeout(STOP_SLACK, done.wait_for(|d| *d)).await;
        }
        self.status(id).await
    }

    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let known = self.inner.lock().contains_key(id);
        let bundle = self.bundle(id);
        if known {
            let status = self.stop(id, Duration::ZERO).await?;
            if status == BackendStatus::Running {
                return Err(BackendError::Other(format!(
                    "sandbox {id} is still running after a forced stop"
                )));
            }
            self.supervisor_gone(id, &bundle).await;
        } else if !bundle.is_dir() {
            return Err(not_found(id));
        } else if let Ok(state) = config::read_json::<State>(&bundle, config::STATE_FILE) {
            // An orphan from an earlier run: make sure nothing of it is left running.
            if state.supervisor_alive() {
                self.inner
                    .kill_everything(&state.cgroup, state.supervisor_pid);
            }
        }
        let name = cgroup_name(&bundle, id);
        if let Some(cg) = self.inner.cgroup(&name)
            && cg.exists()
        {
            let _ = cg.kill_all();
            if let Err(e) = cg.remove() {
                warn!(id, "linux: remove cgroup: {e}");
            }
        }
        self.inner.lock().remove(id);
        if self.inner.network.holds(id) {
            let inner = Arc::clone(&self.inner);
            let id = id.to_string();
            let _ = tokio::task::spawn_blocking(move || inner.network.release(&id)).await;
        }
        tokio::task::spawn_blocking(move || warren_runtime::remove_tree(&bundle))
            .await
            .map_err(|e| BackendError::Other(format!("remove bundle: {e}")))?
            .map(drop)
    }

    async fn status(&self, id: &str) -> Result<BackendStatus, BackendError> {
        self.inner
            .lock()
            .get(id)
            .map(|s| s.status.clone())
            .ok_or_else(|| not_found(id))
    }

    async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), BackendError> {
        let inner = Arc::clone(&self.inner);
        let id = config.id.clone();
        if let Some(sb) = inner.lock().get(&id) {
            return Ok((sb.status.clone(), sb.info.clone()));
        }
        let bundle = self.bundle(&id);
        let container: ContainerConfig =
            config::read_json(&bundle, config::CONFIG_FILE).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => not_found(&id),
                _ => BackendError::io("read", &bundle.join(config::CONFIG_FILE), e),
            })?;
        let mut info = BackendInfo::new();
        info.insert("bundle".into(), bundle.display().to_string());
        info.insert("command".into(), container.argv.join(" "));
        let state = config::read_json::<State>(&bundle, config::STATE_FILE).ok();
        let mut watch_pid = None;
        let status = match &state {
            None => BackendStatus::Created,
            Some(_) if bundle.join(config::EXIT_FILE).exists() => exit_status(&bundle),
            Some(state) => {
                info.insert("pid".into(), state.pid.to_string());
                if state.supervisor_alive() {
                    watch_pid = Some(state.supervisor_pid);
                    BackendStatus::Running
                } else {
                    inner.status_after_supervisor(&id, &bundle)
                }
            }
        };
        let mut sandbox = Sandbox {
            resources: config.resources.clone(),
            info: info.clone(),
            status: status.clone(),
            supervisor: None,
            done: None,
            pending: None,
            published: None,
        };
        // A running sandbox's ports are bound again (this server's predecessor held them).
        if let (Some(_), Some(state)) = (watch_pid, &state) {
            match ports::bind(&config.spec.ports) {
                Ok(bound) => {
                    if let Some((published, shown)) = publish(&id, bound, state.pid) {
                        sandbox.published = Some(published);
                        sandbox.info.insert("ports".into(), shown.clone());
                        info.insert("ports".into(), shown);
                    }
                }
                Err(e) => {
                    warn!(id, error = %e, "linux: an adopted sandbox's ports are not published")
                }
            }
        }
        if let Some(pid) = watch_pid {
            let pidfd =
                config::pidfd_open(pid).map_err(|e| BackendError::io("pidfd_open", &bundle, e))?;
            // SAFETY: the AsyncFd owns the pidfd and nothing else closes or replaces it while
            // it is registered.
            #[allow(unsafe_code)]
            let afd = unsafe { tokio::io::unix::AsyncFd::register(pidfd) }
                .map_err(|e| BackendError::io("watch supervisor", &bundle, e.into()))?;
            let (done_tx, done_rx) = watch::channel(false);
            sandbox.supervisor = Some(pid);
            sandbox.done = Some(done_rx);
            let inner2 = Arc::clone(&inner);
            let id2 = id.clone();
            tokio::spawn(async move {
                // A pidfd polls readable once the process has ended.
                let _ = afd.readable().await;
                inner2.finished(&id2, &bundle);
                let _ = done_tx.send(true);
            });
        }
        inner.lock().insert(id, sandbox);
        Ok((status, info))
    }

    async fn list(&self) -> Result<Vec<String>, BackendError> {
        warren_runtime::sandbox_dirs(&self.inner.config.dir, &[])
    }

    /// Resizes a running sandbox: the new limits are written to its cgroup (a memory limit
    /// below what it uses now is refused by the kernel, and reported), and an egress
    /// sandbox's bandwidth to its veth pair's queues. Its storage limit is the size of a file
    /// system made at its start: changed only before.
    async fn update(&self, id: &str, resources: &ResourceInfo) -> Result<(), BackendError> {
        let bundle = self.bundle(id);
        let limits = limits_of(resources)?;
        // What the sandbox started with (none before its start).
        let started = config::read_json::<ContainerConfig>(&bundle, config::CONFIG_FILE).ok();
        let running = {
            let mut sandboxes = self.inner.lock();
            let sb = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            if let Some(pending) = &mut sb.pending {
                let dir = pending.container.rootfs.is_some();
                pending.container.storage_bytes = spec::storage_of(resources, dir)?;
                pending.container.limits = limits.clone();
                if let Some(e) = &mut pending.container.egress {
                    e.bandwidth = resources.network_bandwidth;
                }
            } else if let Some(started) = &started
                && spec::storage_of(resources, started.rootfs.is_some())? != started.storage_bytes
            {
                return Err(BackendError::Invalid(format!(
                    "spec.resources.limits.storage: sandbox {id} has started: its writable \
                     layer's size is set (re-create it with --reset-revision for another)"
                )));
            }
            sb.resources = resources.clone();
            sb.status == BackendStatus::Running
        };
        if !running {
            return Ok(());
        }
        let cgroup = self
            .inner
            .cgroup(&cgroup_name(&bundle, id))
            .ok_or_else(|| BackendError::Other("no cgroup layout on this node".into()))?;
        cgroup
            .update(&(&limits).into())
            .map_err(|e| BackendError::Invalid(format!("resize: {}", crate::error_chain(&e))))?;
        // Keep container.json in step, so an adopting server and `exec` see the new limits.
        if let Some(mut container) = started {
            let bandwidth = resources.network_bandwidth;
            if let Some(e) = &mut container.egress
                && e.bandwidth != bandwidth
            {
                let state =
                    config::read_json::<State>(&bundle, config::STATE_FILE).map_err(|err| {
                        BackendError::io("read", &bundle.join(config::STATE_FILE), err)
                    })?;
                let egress = e.clone();
                tokio::task::spawn_blocking(move || {
                    crate::egress::shape(&egress, state.pid, bandwidth)
                })
                .await
                .map_err(|err| BackendError::Other(format!("network bandwidth: {err}")))?
                .map_err(|err| {
                    BackendError::Other(format!("spec.resources.limits.network-bandwidth: {err}"))
                })?;
                e.bandwidth = bandwidth;
            }
            container.limits = limits;
            let _ = config::write_json(&bundle, config::CONFIG_FILE, &container);
        }
        Ok(())
    }

    async fn exec(&self, id: &str, request: ExecRequest) -> Result<ExecProcess, BackendError> {
        let bundle = self.bundle(id);
        {
            let sandboxes = self.inner.lock();
            let sb = sandboxes.get(id).ok_or_else(|| not_found(id))?;
            if sb.status != BackendStatus::Running {
                return Err(BackendError::Invalid(format!(
                    "sandbox {id} is not running ({:?})",
                    sb.status
                )));
            }
        }
        let container: ContainerConfig = config::read_json(&bundle, config::CONFIG_FILE)
            .map_err(|e| BackendError::io("read", &bundle.join(config::CONFIG_FILE), e))?;
        let mut env = container.env.clone();
        for (k, v) in &request.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(BackendError::Invalid(format!(
                    "exec env: {k:?} is not a variable name"
                )));
            }
            env.retain(|e| e.split_once('=').map_or(e.as_str(), |(key, _)| key) != k);
            env.push(format!("{k}={v}"));
        }
        let (uid, gid) = match &request.user {
            Some(u) => {
                parse_user(u).map_err(|e| BackendError::Invalid(format!("exec user: {e}")))?
            }
            None => (container.uid, container.gid),
        };
        let spec = ExecSpec {
            argv: request.argv.clone(),
            env,
            cwd: request.cwd.clone().unwrap_or_else(|| container.cwd.clone()),
            uid,
            gid,
            tty: request.tty.is_some(),
        };
        let json = serde_json::to_string(&spec)
            .map_err(|e| BackendError::Other(format!("exec spec: {e}")))?;
        let (program, args) = self
            .inner
            .config
            .supervisor
            .split_first()
            .ok_or_else(|| BackendError::Other("no supervisor command configured".into()))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .arg("--exec")
            .arg(&bundle)
            .env(crate::exec::SPEC_ENV, json);
        let spawn_error = |e| BackendError::io("start exec helper", Path::new(program), e);
        let (child, stdin, stdout, stderr, resize): (_, BoxWrite, BoxRead, Option<BoxRead>, _) =
            match request.tty {
                Some((rows, cols)) => {
                    let size = nix::pty::Winsize {
                        ws_row: rows,
                        ws_col: cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    let state: State =
                        config::read_json(&bundle, config::STATE_FILE).map_err(|e| {
                            BackendError::io("read", &bundle.join(config::STATE_FILE), e)
                        })?;
                    let pty = container_pty(state.pid, &size)
                        .map_err(|e| BackendError::io("open a terminal in", &bundle, e))?;
                    let dup = |fd: &OwnedFd| {
                        fd.try_clone()
                            .map_err(|e| BackendError::io("dup", &bundle, e))
                    };
                    cmd.stdin(Stdio::from(dup(&pty.slave)?))
                        .stdout(Stdio::from(dup(&pty.slave)?))
                        .stderr(Stdio::from(pty.slave));
                    let child = cmd.spawn().map_err(spawn_error)?;
                    drop(cmd);
                    let reader = tokio::fs::File::from_std(std::fs::File::from(dup(&pty.master)?));
                    let writer = PtyInput::new(
                        tokio::fs::File::from_std(std::fs::File::from(dup(&pty.master)?)),
                        dup(&pty.master)?,
                    );
                    let master = pty.master;
                    let resize: Box<dyn Fn(u16, u16) -> std::io::Result<()> + Send + Sync> =
                        Box::new(move |rows, cols| set_window_size(&master, rows, cols));
                    (
                        child,
                        Box::new(writer),
                        Box::new(reader),
                        None,
                        Some(resize),
                    )
                }
                None => {
                    cmd.stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped());
                    let mut child = cmd.spawn().map_err(spawn_error)?;
                    let missing = || BackendError::Other("exec helper without stdio".into());
                    let stdin = child.stdin.take().ok_or_else(missing)?;
                    let stdout = child.stdout.take().ok_or_else(missing)?;
                    let stderr = child.stderr.take().ok_or_else(missing)?;
                    (
                        child,
                        Box::new(stdin),
                        Box::new(stdout),
                        Some(Box::new(stderr)),
                        None,
                    )
                }
            };
        let mut child = EndOnDrop(Some(child));
        let wait = Box::pin(async move {
            use std::os::unix::process::ExitStatusExt;
            let status = match child.0.as_mut() {
                Some(c) => c.wait().await?,
                None => return Err(std::io::Error::other("exec: no helper")),
            };
            let _ = child.0.take();
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(libc::SIGKILL)))
        });
        Ok(ExecProcess {
            stdin,
            stdout,
            stderr,
            resize,
            wait,
        })
    }

    /// The sandbox's cgroup counters while it runs.
    fn usage(&self, id: &str) -> Option<warren_runtime::Usage> {
        if self.inner.lock().get(id)?.status != BackendStatus::Running {
            return None;
        }
        let cgroup = self.inner.cgroup(&cgroup_name(&self.bundle(id), id))?;
        cgroup.stats().ok().map(Into::into)
    }

    fn log_path(&self, id: &str) -> Option<PathBuf> {
        Some(self.bundle(id).join(config::LOG_FILE))
    }

    fn set_warm(&self, image: &str, count: usize) -> Result<(), BackendError> {
        self.set_warm_target(image, count)
    }

    fn warm(&self) -> Vec<(String, usize, usize)> {
        self.warm_state()
    }

    fn describe(&self) -> Option<String> {
        let pools = self.warm_state();
        (!pools.is_empty()).then(|| format!("{WARM_LABEL}{}", warren_runtime::format_warm(&pools)))
    }

    async fn checkpoint(
        &self,
        config: &SandboxConfig,
        dir: &Path,
        leave_running: bool,
    ) -> Result<warren_runtime::CheckpointInfo, BackendError> {
        checkpoint::checkpoint(self, config, dir, leave_running).await
    }

    async fn check_restore(&self, config: &SandboxConfig, dir: &Path) -> Result<(), BackendError> {
        let (this, config, dir) = (self.clone(), config.clone(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || checkpoint::check_restore(&this, &config, &dir))
            .await
            .map_err(|e| BackendError::Other(format!("check restore: {e}")))?
    }

    async fn restore(
        &self,
        config: &SandboxConfig,
        dir: &Path,
    ) -> Result<BackendInfo, BackendError> {
        checkpoint::restore(self, config, dir).await
    }

    fn allocated(&self) -> ResourceInfo {
        let mut total = ResourceInfo::default();
        let add_f = |a: Option<f64>, b: Option<f64>| b.map(|b| a.unwrap_or(0.0) + b).or(a);
        let add_u = |a: Option<u64>, b: Option<u64>| b.map(|b| a.unwrap_or(0) + b).or(a);
        for sb in self.inner.lock().values() {
            if matches!(sb.status, BackendStatus::Running | BackendStatus::Created) {
                let r = &sb.resources;
                total.cpu_limit = add_f(total.cpu_limit, r.cpu_limit);
                total.cpu_request = add_f(total.cpu_request, r.cpu_request);
                total.memory_limit = add_u(total.memory_limit, r.memory_limit);
                total.memory_request = add_u(total.memory_request, r.memory_request);
                total.pid_limit = add_u(total.pid_limit, r.pid_limit);
            }
        }
        total
    }
}

/// One process as `/proc` shows it; `None` once it is gone.
fn process_info(pid: i32) -> Option<warren_runtime::ProcessInfo> {
    let process = procfs::process::Process::new(pid).ok()?;
    let stat = process.stat().ok()?;
    let status = process.status().ok()?;
    let ticks = procfs::ticks_per_second().max(1);
    let page = procfs::page_size();
    // Read as bytes: arguments need not be UTF-8, and a process whose are not must not pass
    // for a kernel thread (`[sh]`).
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let command = match args.is_empty() {
        false => args.join(" "),
        true => format!("[{}]", stat.comm),
    };
    // NSpid lists its pid in each namespace, outermost first: the last is the sandbox's.
    let sandbox_pid = status
        .nspid
        .as_ref()
        .and_then(|ns| (ns.len() > 1).then(|| ns.last().copied()).flatten())
        .and_then(|p| u32::try_from(p).ok());
    Some(warren_runtime::ProcessInfo {
        pid: pid as u32,
        sandbox_pid,
        ppid: stat.ppid as u32,
        uid: status.ruid,
        state: stat.state.to_string(),
        cpu_ns: (stat.utime + stat.stime).saturating_mul(1_000_000_000) / ticks,
        rss_bytes: stat.rss.saturating_mul(page),
        command,
    })
}

/// The sandbox's cgroup name: its id, unless it came from a warm shell (`state.json` says).
fn cgroup_name(bundle: &Path, id: &str) -> String {
    config::read_json::<State>(bundle, config::STATE_FILE)
        .map(|s| s.cgroup)
        .unwrap_or_else(|_| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_supervisors_exit_line_is_read_and_anything_else_is_not() {
        let line = b"exit {\"code\":3,\"signal\":null,\"oomKilled\":true,\"stopped\":false,\"timedOut\":false}\n";
        let exit = read_exit(&line[..]).await.expect("an exit line");
        assert_eq!(exit.code, 3);
        assert!(exit.oom_killed);
        // The supervisor died before reporting (EOF), or wrote something else: `exit.json`
        // decides then.
        assert_eq!(read_exit(&b""[..]).await, None);
        assert_eq!(read_exit(&b"ok 12\n"[..]).await, None);
        assert_eq!(read_exit(&b"exit {\"code\":\n"[..]).await, None);
    }

    #[test]
    fn a_reported_end_becomes_the_status_the_file_would_give() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exit = |code, oom_killed, stopped| Exit {
            code,
            signal: None,
            oom_killed,
            stopped,
            timed_out: false,
        };
        assert_eq!(
            exit_status_of(dir.path(), Ok(exit(7, false, false))),
            BackendStatus::Exited { code: 7 }
        );
        assert_eq!(
            exit_status_of(dir.path(), Ok(exit(137, true, false))),
            BackendStatus::Failed {
                reason: REASON_OOM.into()
            }
        );
        assert_eq!(
            exit_status_of(dir.path(), Ok(exit(143, false, true))),
            BackendStatus::Stopped
        );
        config::write_json(dir.path(), config::EXIT_FILE, &exit(5, false, false))
            .expect("write exit.json");
        assert_eq!(exit_status(dir.path()), BackendStatus::Exited { code: 5 });
    }
}
