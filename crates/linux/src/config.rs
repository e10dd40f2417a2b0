//! What the backend hands the supervisor: one JSON file per sandbox, `container.json` in its
//! bundle directory, and the files the supervisor writes back (`state.json`, `exit.json`).
//!
//! The files are the whole interface between the server and a supervisor, so a server that
//! restarts finds everything it needs on disk: which supervisor owns the sandbox, and how the
//! workload ended if it ended while nobody was watching.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupLimits;

/// File names inside a bundle directory.
pub const CONFIG_FILE: &str = "container.json";
pub const STATE_FILE: &str = "state.json";
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "container.log";
pub const SUPERVISOR_LOG_FILE: &str = "supervisor.log";
/// The workload's standard input, when the create gave one (else it reads `/dev/null`).
pub const STDIN_FILE: &str = "stdin";
/// Written by the backend before it signals a stop: the grace period in milliseconds.
pub const STOP_FILE: &str = "stop";
pub const ROOTFS_DIR: &str = "rootfs";
pub const UPPER_DIR: &str = "upper";
pub const WORK_DIR: &str = "work";
/// With a storage limit: the writable layer's own ext4 file system, a file of the limit's
/// size in the bundle ...
pub const STORAGE_FILE: &str = "storage.ext4";
/// ... loop-mounted here in the container's mount namespace only (the overlay's `upper`
/// and `work` are in it), so nothing is mounted on the host.
pub const STORAGE_DIR: &str = "storage";

/// Everything the supervisor needs to start one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerConfig {
    pub id: String,
    /// Unpacked image layers, bottom to top: the overlay's lower directories.
    pub layers: Vec<PathBuf>,
    /// A prepared root filesystem (containerd's mounted snapshot, or any directory a
    /// client names): bind-mounted as the rootfs, written in place, instead of `layers`.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// argv; `argv[0]` is looked up in the container's `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, image env first, then the spec's.
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub read_only_rootfs: bool,
    #[serde(default)]
    pub mounts: Vec<BindMount>,
    #[serde(default)]
    pub deny_syscalls: Vec<String>,
    /// The applied policy's syscall list, compiled into the seccomp filter with the above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_syscalls: Option<PolicySyscalls>,
    /// `false` leaves the network namespace's `lo` down (a policy's `network.mode: none`).
    #[serde(default = "yes")]
    pub loopback: bool,
    /// A policy's `network.mode: egress`: the sandbox's veth pair and allow-list
    /// ([`crate::egress`]), set up by its supervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::egress::Egress>,
    /// Guest paths a policy makes read-only (bind remounts; missing paths are skipped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_only_paths: Vec<String>,
    /// Guest paths a policy masks: an empty read-only tmpfs on a directory, `/dev/null` on
    /// anything else (missing paths are skipped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    /// A policy's `filesystem.writable`: when given, the rest of the rootfs is read-only and
    /// only these paths (made when missing) are writable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable_paths: Vec<String>,
    /// A policy's `exec.allow` globs: every `execve` in the sandbox is checked against them
    /// by its supervisor ([`crate::execgate`]). `None`: no check, no gate at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_allow: Option<Vec<String>>,
    pub cgroup_parent: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log_max_bytes: Option<u64>,
    /// Default grace between SIGTERM and SIGKILL when a stop names none.
    pub stop_grace_ms: u64,
    /// The workload is killed this long after it started, with reason `Timeout`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// A storage limit: the size of the writable layer's own file system
    /// ([`STORAGE_FILE`]); without, the writable layer is a directory of the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
}

/// A host directory visible inside the container.
fn yes() -> bool {
    true
}

/// A policy's syscall list and the policy's hash, which keys the compiled-filter cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySyscalls {
    pub hash: String,
    pub syscalls: warren_spec::SyscallPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BindMount {
    /// The host directory, resolved (symlinks followed) when the sandbox was created.
    pub host: PathBuf,
    pub guest: String,
    #[serde(default)]
    pub read_only: bool,
}

/// The cgroup limits, in the file's own encoding (the cgroup module's type is plain data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub pids: Option<u64>,
    #[serde(default)]
    pub cpu_limit_millis: Option<u64>,
    #[serde(default)]
    pub cpu_request_millis: Option<u64>,
}

impl From<&Limits> for CgroupLimits {
    fn from(l: &Limits) -> Self {
        CgroupLimits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_limit_millis: l.cpu_limit_millis,
            cpu_request_millis: l.cpu_request_millis,
        }
    }
}

/// Written by the supervisor once the workload runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub supervisor_pid: i32,
    /// The supervisor's start time in clock ticks since boot (`/proc/PID/stat` field 22), so a
    /// recycled pid is not mistaken for it.
    pub supervisor_start: u64,
    /// The workload's pid in the host's pid namespace.
    pub pid: i32,
    /// The sandbox's cgroup name under the parent: its id, or the warm shell's it came from.
    pub cgroup: String,
}

impl State {
    /// This process as a supervisor of `pid` in cgroup `cgroup`.
    pub fn new(pid: i32, cgroup: &str) -> State {
        let me = std::process::id() as i32;
        State {
            supervisor_pid: me,
            supervisor_start: process_start_time(me).unwrap_or(0),
            pid,
            cgroup: cgroup.to_string(),
        }
    }

    /// The supervisor that wrote this is still running (not a recycled pid, nor a zombie
    /// waiting for a reaper: an orphan's reaper on this kind of machine is a second late).
    pub fn supervisor_alive(&self) -> bool {
        process_start_time(self.supervisor_pid) == Some(self.supervisor_start)
            && !process_is_zombie(self.supervisor_pid)
    }
}

/// The message that hands a warm shell to a sandbox, sent as one JSON line on the shell's
/// `ctl.sock`; the answer is one line, `ok PID` or `error MESSAGE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Claim {
    /// The bundle's directory now (the backend renamed the shell's to the sandbox's).
    pub bundle: PathBuf,
    pub config: ContainerConfig,
}

/// The warm shell's control socket in its bundle.
pub const CONTROL_SOCKET: &str = "ctl.sock";

/// Written by the supervisor when the workload has ended, before it exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    /// The exit status, or 128 + the signal that killed it.
    pub code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    /// The stop was asked for (a stop request), not the workload's own end.
    #[serde(default)]
    pub stopped: bool,
    #[serde(default)]
    pub timed_out: bool,
}

/// Writes `value` as JSON to `dir/name` through a temporary file and a rename, so a reader
/// never sees half a file.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> std::io::Result<T> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// A process's start time (`/proc/PID/stat` field 22), `None` when it is gone.
/// A pidfd for process `pid` (close-on-exec, as pidfds always are).
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether a process has ended and waits to be reaped (`/proc/PID/stat` field 3 is `Z`).
pub fn process_is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state == "Z" || state == "X")
    })
}
