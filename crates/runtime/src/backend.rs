//! The trait and the types that cross it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use warren_spec::{BackendKind, Decision, Policy, ResourceInfo, SandboxSpec};

/// Everything a backend needs to create one sandbox. The spec is already validated and the
/// resources extracted; backends never re-parse user input.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// Stable, unique, filesystem-safe identifier chosen by the control plane.
    pub id: String,
    pub spec: SandboxSpec,
    pub resources: ResourceInfo,
    /// What the workload reads on its standard input, then end of file; `None`: an empty
    /// stdin. Given with the create call and not stored, so a restart reads none.
    pub stdin: Option<Stdin>,
    /// The policy the sandbox was admitted under, with the decision; `None`: no policy
    /// applies. Backends narrow what the workload can reach by it (wasm: preopens, sockets,
    /// env) and the slot backend records the decision (`policy.json`).
    pub policy: Option<AppliedPolicy>,
}

/// A compiled policy and what it decided about one sandbox.
#[derive(Debug, Clone)]
pub struct AppliedPolicy {
    pub policy: std::sync::Arc<Policy>,
    pub decision: Decision,
}

/// Bytes for a workload's standard input. Shared, not copied, between the control plane and
/// the backend; `Debug` shows the length only (input may be a secret).
#[derive(Clone, PartialEq, Eq)]
pub struct Stdin(pub std::sync::Arc<[u8]>);

impl Stdin {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Stdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stdin({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Stdin {
    fn from(bytes: Vec<u8>) -> Self {
        Stdin(bytes.into())
    }
}

/// What a backend knows of one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendStatus {
    Created,
    Running,
    /// Stopped on request.
    Stopped,
    Exited {
        code: i32,
    },
    Failed {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend {backend} does not support {operation}")]
    Unsupported {
        backend: BackendKind,
        operation: &'static str,
    },
    #[error("sandbox {id} is not known to backend {backend}")]
    NotFound { backend: BackendKind, id: String },
    #[error("sandbox {id} already exists in backend {backend}")]
    AlreadyExists { backend: BackendKind, id: String },
    /// The node cannot hold the sandbox: names what ran out and by how much.
    #[error("not enough {resource}: {requested} requested, {available} of {capacity} available")]
    Capacity {
        resource: &'static str,
        requested: String,
        available: String,
        capacity: String,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The spec asks for something this backend cannot do or find (an image that is not
    /// there, a command that does not exist); the message names the field and value.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// An I/O error on `path`, naming what was being done to it.
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        BackendError::Io {
            action,
            path: path.display().to_string(),
            source,
        }
    }

    pub fn not_found(backend: BackendKind, id: &str) -> Self {
        BackendError::NotFound {
            backend,
            id: id.to_string(),
        }
    }
}

/// Refuses a spec that asks `kind`, a backend that publishes no ports, to publish one
/// (`spec.ports[].hostPort`), naming the first: a port the user expects to reach would
/// silently not answer.
pub fn no_published_ports(kind: BackendKind, spec: &SandboxSpec) -> Result<(), BackendError> {
    match spec
        .ports
        .iter()
        .enumerate()
        .find_map(|(i, p)| p.host_port.map(|h| (i, h, p.protocol)))
    {
        Some((i, host, protocol)) => Err(BackendError::Invalid(format!(
            "spec.ports[{i}].hostPort: {host}/{protocol}: the {kind} backend publishes no ports \
             (the linux backend does); leave hostPort out"
        ))),
        None => Ok(()),
    }
}

impl AppliedPolicy {
    /// What the policy makes of `finding`, something it does not allow: an enforce-mode
    /// policy refuses it (the error is the finding); an audit-mode one admits it and only
    /// logs it.
    pub fn finding(&self, finding: String) -> Result<(), BackendError> {
        if self.decision.mode == warren_spec::PolicyMode::Audit {
            tracing::warn!(policy = %self.decision.policy, "audit: {finding}");
            Ok(())
        } else {
            Err(BackendError::Invalid(finding))
        }
    }
}

/// `host`, the host path of `field` (a bind mount's source, a root filesystem), resolved on
/// this node with its symlinks followed: what a mount of it reaches, checked by
/// [`check_resolved_host_path`].
pub fn resolve_host_path(
    field: &str,
    host: &str,
    policy: Option<&AppliedPolicy>,
) -> Result<std::path::PathBuf, BackendError> {
    let resolved = std::fs::canonicalize(host).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".to_string(),
            _ => format!("cannot be resolved on this node: {e}"),
        };
        BackendError::Invalid(format!("{field}: {host:?} {reason}"))
    })?;
    check_resolved_host_path(field, host, &resolved, policy)?;
    Ok(resolved)
}

/// Checks `resolved`, where `field`'s host path `host` leads on this node (its symlinks
/// followed, or where a file opened by it is), against a policy's `hostPaths` again, against
/// its entries as written and as they resolve here (`/srv` may be a link to `/var/srv`): a
/// symlink under an allowed directory (one a sandbox may have made in a writable mount of
/// its own) must not lead a later sandbox elsewhere. A path the policy did not allow as
/// written was admitted on purpose (audit mode) and is not checked again.
pub fn check_resolved_host_path(
    field: &str,
    host: &str,
    resolved: &Path,
    policy: Option<&AppliedPolicy>,
) -> Result<(), BackendError> {
    let Some(applied) = policy else {
        return Ok(());
    };
    if !applied.policy.host_path_allowed(host) {
        return Ok(());
    }
    let shown = resolved.to_string_lossy();
    if applied.policy.resolved_host_path_allowed(&shown) {
        return Ok(());
    }
    applied.finding(format!(
        "{field}: {host:?} resolves to {shown:?}, outside the policy's filesystem.hostPaths"
    ))
}

/// Refuses what only the linux backend does, for backend `kind`: a read-only root
/// (`spec.readOnlyRootfs`), extra denied syscalls (`spec.denySyscalls`), and, unless the
/// backend maps host directories, `spec.mounts`. Ignored, each would leave the user
/// believing in a limit that is not there.
pub fn linux_only_fields(
    kind: BackendKind,
    spec: &SandboxSpec,
    maps_host_dirs: bool,
) -> Result<(), BackendError> {
    let refuse = |field: String, value: &str, what: &str| {
        Err(BackendError::Invalid(format!(
            "{field}: {value:?}: the {kind} backend {what}; the linux backend does"
        )))
    };
    if !maps_host_dirs && let Some(m) = spec.mounts.first() {
        return refuse(
            "spec.mounts[0].host".to_string(),
            &m.host,
            "maps no host directory into a sandbox (warren cp copies files in)",
        );
    }
    if spec.read_only_rootfs {
        return refuse(
            "spec.readOnlyRootfs".to_string(),
            "true",
            "has no read-only root",
        );
    }
    if let Some(name) = spec.deny_syscalls.first() {
        return refuse(
            "spec.denySyscalls[0]".to_string(),
            name,
            "filters no syscalls of its own",
        );
    }
    Ok(())
}

/// Removes a sandbox's directory tree; `Ok(false)` when it was already gone. It blocks:
/// async callers run it on the blocking pool.
pub fn remove_tree(dir: &Path) -> Result<bool, BackendError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(BackendError::io("remove", dir, source)),
    }
}

/// What a running sandbox uses now, as its backend measures it (a cgroup: the container's,
/// or qemu's for a VM); a field is `None` when that is not measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// CPU time consumed since the start, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    /// Processes (tasks) in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// One process in a sandbox, as `warren top` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessInfo {
    /// Its pid on the node (the host, or the VM's guest).
    pub pid: u32,
    /// Its pid as the sandbox sees it (in its pid namespace), where that differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_pid: Option<u32>,
    pub ppid: u32,
    /// Real user id, as the node numbers it.
    pub uid: u32,
    /// The kernel's state letter: R running, S sleeping, D disk wait, T stopped, Z zombie...
    pub state: String,
    /// User and system CPU time since it started, in nanoseconds.
    pub cpu_ns: u64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
    /// Its command line (untrusted: the sandbox sets it), or `[name]` without one.
    pub command: String,
}

/// A status change a backend noticed on its own (a workload exited, hit its timeout, was
/// OOM-killed). Backends whose workloads end by themselves send these; the control plane
/// turns them into record updates and watch events.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendEvent {
    pub id: String,
    pub status: BackendStatus,
}

/// Where backends send [`BackendEvent`]s. Unbounded: a send never blocks a workload's exit
/// path, and the receiver (the control plane) drains it continuously.
pub type EventSink = tokio::sync::mpsc::UnboundedSender<BackendEvent>;

/// Facts a backend records about a checkpoint it wrote (the engine and its version, the image
/// the sandbox runs), kept in the checkpoint's manifest.
pub type CheckpointInfo = BTreeMap<String, String>;

/// Information a backend reports about a sandbox it created, shown to users
/// (`status.backend_info`), e.g. where the slot backend wrote `resources.json`.
pub type BackendInfo = BTreeMap<String, String>;

#[async_trait::async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// `Ok` when this node can run the backend, else why not ("no /dev/kvm").
    fn is_available(&self) -> Result<(), String>;

    /// How an available backend runs here now, for `warren info` (the vm backend: "tcg: ...",
    /// and its clone pool). Asked on every `GetServerInfo`: keep it cheap.
    fn describe(&self) -> Option<String> {
        None
    }

    /// Prepares the sandbox without starting its workload.
    async fn create(&self, config: &SandboxConfig) -> Result<BackendInfo, BackendError>;

    async fn start(&self, id: &str) -> Result<(), BackendError>;

    /// Asks the workload to stop, and forces it after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<BackendStatus, BackendError>;

    /// Frees everything the sandbox holds. Deleting an unknown id is `NotFound`.
    async fn delete(&self, id: &str) -> Result<(), BackendError>;

    async fn status(&self, id: &str) -> Result<BackendStatus, BackendError>;

    /// Applies new resources to a running sandbox.
    async fn update(&self, id: &str, resources: &ResourceInfo) -> Result<(), BackendError> {
        let _ = (id, resources);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "update",
        })
    }

    /// Takes back a sandbox the control plane knows after a restart, returning its status and
    /// info. A backend that cannot find it answers `NotFound`.
    async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), BackendError> {
        Err(BackendError::NotFound {
            backend: self.kind(),
            id: config.id.clone(),
        })
    }

    /// Ids of every sandbox this backend holds on the node, including ones left from a
    /// previous run (what the control plane does not know is an orphan).
    async fn list(&self) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }

    /// What the sandbox uses now; `None` when it is not running or this backend measures
    /// nothing. Reads a few counters: cheap.
    fn usage(&self, id: &str) -> Option<Usage> {
        let _ = id;
        None
    }

    /// The sandbox's log file (CRI log format, see [`crate::logs`]), when it has one.
    fn log_path(&self, id: &str) -> Option<std::path::PathBuf> {
        let _ = id;
        None
    }

    /// Returns once everything the sandbox has written so far is in its log file: backends
    /// that create and fill log files behind the workload (off the start-to-exit path) wait
    /// for that here; readers call it before reading an ended sandbox's log.
    async fn logs_settled(&self, id: &str) {
        let _ = id;
    }

    /// The sandbox's info as it is now, for backends that learn more at start (the linux
    /// backend's workload pid); `None` keeps what `create` returned.
    fn info(&self, id: &str) -> Option<BackendInfo> {
        let _ = id;
        None
    }

    /// Sends `signal` (a Linux signal number) to the sandbox's workload. Backends without
    /// processes to signal treat SIGHUP, SIGINT, SIGKILL and SIGTERM as an immediate stop and
    /// refuse the rest.
    async fn signal(&self, id: &str, signal: i32) -> Result<(), BackendError> {
        if matches!(signal, 1 | 2 | 9 | 15) {
            self.stop(id, Duration::ZERO).await.map(|_| ())
        } else {
            Err(BackendError::Unsupported {
                backend: self.kind(),
                operation: "signals other than SIGHUP, SIGINT, SIGKILL and SIGTERM",
            })
        }
    }

    /// Freezes a running sandbox's workload where it is (`warren pause`, containerd's
    /// Pause): it keeps its memory and gets no CPU until [`Backend::resume`]. A paused
    /// sandbox is resumed by `stop`, `signal` and `delete` before they act, so that what
    /// they send reaches it.
    async fn pause(&self, id: &str) -> Result<(), BackendError> {
        let _ = id;
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "pause",
        })
    }

    /// Lets a paused sandbox run on; resuming one that is not paused changes nothing.
    async fn resume(&self, id: &str) -> Result<(), BackendError> {
        let _ = id;
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "unpause",
        })
    }

    /// The processes of a running sandbox, by pid (`warren top`).
    async fn processes(&self, id: &str) -> Result<Vec<ProcessInfo>, BackendError> {
        let _ = id;
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "listing processes (top)",
        })
    }

    /// Whether a running sandbox's workload is paused, as the backend itself sees it (its
    /// cgroup's freezer, its VM's run state); `None` where the backend keeps no such state
    /// of its own. Asked after an adoption, so that the record follows a workload frozen or
    /// thawed while no server watched.
    async fn paused(&self, id: &str) -> Option<bool> {
        let _ = id;
        None
    }

    /// Starts a process inside a running sandbox.
    async fn exec(&self, id: &str, request: ExecRequest) -> Result<ExecProcess, BackendError> {
        let _ = (id, request);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "exec",
        })
    }

    /// Saves a running sandbox's state into `dir` (an empty directory the caller owns, which
    /// becomes the checkpoint's payload) so that [`Backend::restore`] can continue it later,
    /// under another id, on this server or another. With `leave_running` the sandbox runs
    /// on; else it is stopped (status `Stopped`) when this returns. On failure the sandbox
    /// runs on as before.
    async fn checkpoint(
        &self,
        config: &SandboxConfig,
        dir: &std::path::Path,
        leave_running: bool,
    ) -> Result<CheckpointInfo, BackendError> {
        let _ = (config, dir, leave_running);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "checkpoint",
        })
    }

    /// Checks, changing nothing, what would make [`Backend::restore`] of the checkpoint in
    /// `dir` fail at once (a missing image or host directory, no restore at all): a restore
    /// that replaces a finished sandbox of the same name deletes it only once this passed.
    async fn check_restore(
        &self,
        config: &SandboxConfig,
        dir: &std::path::Path,
    ) -> Result<(), BackendError> {
        let _ = (config, dir);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "restore",
        })
    }

    /// Creates a sandbox from a checkpoint's payload `dir` (written by [`Backend::checkpoint`]
    /// and verified by the caller) and runs it from where it was saved. On failure nothing
    /// of the new sandbox remains.
    async fn restore(
        &self,
        config: &SandboxConfig,
        dir: &std::path::Path,
    ) -> Result<BackendInfo, BackendError> {
        let _ = (config, dir);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "restore",
        })
    }

    /// Resources held by this backend's sandboxes on this node.
    fn allocated(&self) -> ResourceInfo {
        ResourceInfo::default()
    }

    /// Keeps `count` pre-warmed sandboxes of `image` ready, so a create of that image takes
    /// one instead of starting cold (pools); 0 ends them. Backends without warm sandboxes
    /// refuse.
    fn set_warm(&self, image: &str, count: usize) -> Result<(), BackendError> {
        let _ = (image, count);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "pre-warmed sandboxes (pools)",
        })
    }

    /// Pre-warmed sandboxes by image: (image, ready now, target).
    fn warm(&self) -> Vec<(String, usize, usize)> {
        Vec::new()
    }

    /// An image was deleted from the node's image store: a backend that keeps things made
    /// from images (the vm backend's image disks and templates) drops those of images the
    /// store no longer has.
    fn images_removed(&self) {}
}

/// Pre-warmed sandboxes as a backend's `warren info` detail lists them, after its own
/// label: "busybox 3/4 ready, alpine 0/2 ready" (image as named in `--warm` or the pool;
/// ready of target). [`parse_warm`] reads it back.
pub fn format_warm(pools: &[(String, usize, usize)]) -> String {
    let pools: Vec<String> = pools
        .iter()
        .map(|(image, ready, target)| format!("{image} {ready}/{target} ready"))
        .collect();
    pools.join(", ")
}

/// `(ready, target)` of `image` from a detail whose [`format_warm`] list follows `label`
/// (the linux backend's "warm shells: ", the vm backend's "warm: "), for clients that wait
/// for a pool (`warren bench run`); `None` when the image has none.
pub fn parse_warm(detail: &str, label: &str, image: &str) -> Option<(usize, usize)> {
    let (_, pools) = detail.split_once(label)?;
    pools.split(", ").find_map(|pool| {
        let (name, rest) = pool.split_once(' ')?;
        let (ready, target) = rest.strip_suffix(" ready")?.split_once('/')?;
        (name == image).then_some((ready.parse().ok()?, target.parse().ok()?))
    })
}

/// Names of the sandbox directories directly under `dir`: every subdirectory except hidden
/// ones and those in `skip` (a backend's own, such as its cache), sorted. Backends keep one directory
/// per sandbox, named by its id, so this is what [`Backend::list`] reports.
pub fn sandbox_dirs(dir: &std::path::Path, skip: &[&str]) -> Result<Vec<String>, BackendError> {
    let read_error = |source| BackendError::Io {
        action: "read",
        path: dir.display().to_string(),
        source,
    };
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if let Some(name) = entry
            .file_name()
            .to_str()
            .filter(|n| is_dir && !n.starts_with('.') && !skip.contains(n))
        {
            ids.push(name.to_string());
        }
    }
    ids.sort();
    Ok(ids)
}

/// A process to start inside a running sandbox (`warren exec`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (and overriding) the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// The sandbox's working directory when unset.
    pub cwd: Option<String>,
    /// `UID[:GID]`; the sandbox's user when unset.
    pub user: Option<String>,
    /// A pseudo-terminal of this size (rows, columns) instead of pipes.
    pub tty: Option<(u16, u16)>,
}

/// Sets a terminal's size (rows, columns).
pub type Resize = Box<dyn Fn(u16, u16) -> std::io::Result<()> + Send + Sync>;

/// A running exec'd process: its stdio and its end.
pub struct ExecProcess {
    pub stdin: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    /// With a terminal, stdout carries both streams.
    pub stdout: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    pub stderr: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    /// Resizes the terminal (rows, columns); `None` without one.
    pub resize: Option<Resize>,
    /// Resolves to the exit status (128 + signal when killed). Dropped before that (the
    /// caller went away), it ends the process (linux, vm, remote agents).
    pub wait: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<i32>> + Send>>,
}

impl fmt::Debug for ExecProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecProcess")
            .field("tty", &self.resize.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        check_resolved_host_path, format_warm, linux_only_fields, no_published_ports, parse_warm,
        resolve_host_path,
    };
    use warren_spec::{BackendKind, SandboxSpec};

    #[test]
    fn backends_without_publishing_refuse_a_host_port_by_name() {
        let mut spec = SandboxSpec::default();
        for p in ["8080", "53/udp"] {
            spec.ports.push(p.parse().unwrap());
        }
        assert!(no_published_ports(BackendKind::Vm, &spec).is_ok());
        spec.ports.push("5353:53/udp".parse().unwrap());
        let err = no_published_ports(BackendKind::Wasm, &spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.ports[2].hostPort: 5353/udp: the wasm backend publishes no ports (the linux \
             backend does); leave hostPort out"
        );
    }

    #[test]
    fn a_warm_list_reads_back_per_image() {
        let list = format_warm(&[
            ("busybox".into(), 3, 4),
            ("registry.local:5000/app:v1".into(), 0, 2),
        ]);
        assert_eq!(
            list,
            "busybox 3/4 ready, registry.local:5000/app:v1 0/2 ready"
        );
        let detail = format!("templates on; warm: {list}");
        assert_eq!(parse_warm(&detail, "warm: ", "busybox"), Some((3, 4)));
        assert_eq!(
            parse_warm(&detail, "warm: ", "registry.local:5000/app:v1"),
            Some((0, 2))
        );
        assert_eq!(parse_warm(&detail, "warm: ", "alpine"), None);
        assert_eq!(parse_warm(&detail, "warm shells: ", "busybox"), None);
        assert_eq!(parse_warm("", "warm: ", "busybox"), None);
    }

    /// A host path is taken as resolved on the node: a symlink under a directory the policy
    /// allows does not lead a sandbox outside it, a path that is missing is named.
    #[test]
    fn a_host_path_is_checked_where_its_symlinks_lead() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(allowed.join("real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
        // An entry of hostPaths that is itself a link (as `/srv` -> `/var/srv` is on some
        // hosts) allows what is under where it leads.
        std::os::unix::fs::symlink(&allowed, d.path().join("alias")).unwrap();
        let applied = |mode: &str| {
            let spec: warren_spec::PolicySpec = serde_json::from_value(serde_json::json!({
                "filesystem": {"hostPaths": [d.path().join("alias").to_str().unwrap()]}
            }))
            .unwrap();
            let decision: warren_spec::Decision = serde_json::from_value(serde_json::json!({
                "policy": "p", "hash": "", "mode": mode, "admitted": true
            }))
            .unwrap();
            super::AppliedPolicy {
                policy: std::sync::Arc::new(warren_spec::Policy::compile("p", spec).unwrap()),
                decision,
            }
        };
        let enforce = applied("enforce");
        let show = |p: &std::path::Path| p.to_str().unwrap().to_string();

        let real = show(&d.path().join("alias/real"));
        let got = resolve_host_path("spec.mounts[0].host", &real, Some(&enforce)).unwrap();
        assert_eq!(got, std::fs::canonicalize(allowed.join("real")).unwrap());

        let link = show(&d.path().join("alias/link"));
        let err = resolve_host_path("spec.mounts[1].host", &link, Some(&enforce))
            .unwrap_err()
            .to_string();
        let target = show(&std::fs::canonicalize(&outside).unwrap());
        assert_eq!(
            err,
            format!(
                "spec.mounts[1].host: {link:?} resolves to {target:?}, outside the policy's \
                 filesystem.hostPaths"
            )
        );
        // Without a policy, or under one in audit mode (the finding is logged), the
        // resolved path is used as it is.
        let got = resolve_host_path("spec.mounts[1].host", &link, None).unwrap();
        assert_eq!(show(&got), target);
        let got = resolve_host_path("spec.mounts[1].host", &link, Some(&applied("audit")));
        assert_eq!(show(&got.unwrap()), target);
        let missing = show(&allowed.join("missing"));
        let err = resolve_host_path("spec.image", &missing, Some(&enforce))
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("spec.image: {missing:?} does not exist"));

        // Where an opened file is, checked the same way: a path the policy never allowed as
        // written was admitted on purpose (audit) and is not checked again.
        let outside_path = std::fs::canonicalize(&outside).unwrap();
        let err = check_resolved_host_path("spec.image", &link, &outside_path, Some(&enforce))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "spec.image: {link:?} resolves to {target:?}, outside the policy's \
                 filesystem.hostPaths"
            )
        );
        let elsewhere = show(&outside);
        assert!(
            check_resolved_host_path("spec.image", &elsewhere, &outside_path, Some(&enforce))
                .is_ok()
        );
        assert!(check_resolved_host_path("spec.image", &link, &outside_path, None).is_ok());
    }

    /// What only linux does is refused by the others, naming the field, not ignored.
    #[test]
    fn linux_only_fields_are_refused_by_name() {
        let mut spec = SandboxSpec::default();
        assert!(linux_only_fields(BackendKind::Vm, &spec, false).is_ok());
        spec.deny_syscalls.push("mkdir".into());
        let err = linux_only_fields(BackendKind::Wasm, &spec, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.denySyscalls[0]: \"mkdir\": the wasm backend filters no syscalls of its own; \
             the linux backend does"
        );
        spec.read_only_rootfs = true;
        let err = linux_only_fields(BackendKind::Vm, &spec, false).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spec.readOnlyRootfs: \"true\": the vm backend has no read-only root"),
            "{err}"
        );
        spec.mounts.push(warren_spec::Mount {
            host: "/srv/data".into(),
            guest: "/data".into(),
            read_only: false,
        });
        let err = linux_only_fields(BackendKind::Vm, &spec, false).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "spec.mounts[0].host: \"/srv/data\": the vm backend maps no host directory"
            ),
            "{err}"
        );
        // The wasm backend maps them (WASI preopens): the next field is the one named.
        let err = linux_only_fields(BackendKind::Wasm, &spec, true).unwrap_err();
        assert!(err.to_string().starts_with("spec.readOnlyRootfs"), "{err}");
    }
}
