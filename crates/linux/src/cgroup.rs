//! A thin cgroup v1 + v2 driver: create a cgroup, write its limits, move processes in, read
//! usage, kill everything in it, remove it.
//!
//! # Why not youki's `libcgroups`
//!
//! It pulls several `nix` versions and `rust-criu`, and its full feature set wants systemd and
//! D-Bus pieces; its generality (every OCI resource, device rules, systemd-managed slices) is
//! not what warren needs. warren needs four limits (memory, pids, CPU quota, CPU weight), a few
//! counters, and teardown; that is a few hundred lines of file writes, done here.
//!
//! # Layout detection
//!
//! [`CgroupLayout::detect`] reads `/proc/self/mountinfo` once. If `/sys/fs/cgroup` itself is a
//! `cgroup2` mount the host is in *unified* mode and everything goes through v2. Otherwise each
//! controller warren uses (`memory`, `pids`, `cpu`, plus `cpuacct` for usage and `freezer` for
//! race-free kills, both optional) is looked up among the v1 mounts, so a *hybrid* host (v1
//! controllers plus a mostly empty `cgroup2` at `/sys/fs/cgroup/unified`) uses v1. Co-mounted
//! controllers (`cpu,cpuacct`) are one hierarchy and get one directory.
//!
//! # Testing seam
//!
//! Every operation is a read, write, `mkdir` or `rmdir` below the mount points in the layout,
//! so unit tests point a layout into a temporary directory pre-populated with the control files
//! the kernel would create, and check what was written by reading the files back.
//!
//! Errors name the file and the value written; the OS error is the `source`, so print the
//! whole chain (`{:#}` with anyhow) to see it.
//!
//! # Not handled
//!
//! systemd-managed slices (warren writes to cgroupfs directly, as runc's `cgroupfs` driver
//! does), and v2's no-internal-processes rule: if the v2 root given is a delegated cgroup that
//! itself holds processes (warren running inside it), enabling controllers fails with `EBUSY`
//! on its `cgroup.subtree_control`; the caller must move itself into a leaf first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The CFS period warren uses for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel rejects quotas below 1 ms.
const MIN_CPU_QUOTA_US: u64 = 1_000;
/// Range of v1 `cpu.shares` (kernel MIN_SHARES/MAX_SHARES); 1024 is one CPU.
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;
/// v1 controllers warren puts a sandbox into.
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct", "freezer"];
/// v1 controllers that carry limits; one of them must be mounted to use v1.
const V1_LIMIT_CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];
/// v2 controllers enabled down the `cgroup.subtree_control` chain.
const V2_CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// How long [`Cgroup::kill_all`] waits for the cgroup to empty.
const KILL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long [`Cgroup::pause`] waits for the kernel to freeze every task.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Cgroup::remove`] retries `EBUSY` (tasks that were just killed still exiting).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_POLL_PAUSE: Duration = Duration::from_millis(20);

/// Errors from cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading a file or directory failed.
    #[error("read {path}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a control file failed.
    #[error("write {value:?} to {path}")]
    Write {
        /// The control file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a cgroup directory failed.
    #[error("create cgroup directory {path}")]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Removing a cgroup directory failed.
    #[error("remove cgroup directory {path}")]
    Rmdir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A control file held something unexpected.
    #[error("{path}: cannot parse {content:?}: {reason}")]
    Parse {
        /// The control file.
        path: PathBuf,
        /// The offending text.
        content: String,
        /// What was expected.
        reason: &'static str,
    },
    /// Neither a v2 mount at /sys/fs/cgroup nor a v1 memory, pids or cpu hierarchy.
    #[error(
        "no usable cgroup hierarchy in {MOUNTINFO}: /sys/fs/cgroup is not cgroup2 and no cgroup v1 \
         memory, pids or cpu hierarchy is mounted"
    )]
    NoHierarchy,
    /// A cgroup name or parent path that could escape its directory or is not a valid name.
    #[error("cgroup {what} {value:?} is invalid: {reason}")]
    InvalidName {
        /// `"name"` or `"parent"`.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A limit was requested for a controller this host does not provide to the cgroup.
    #[error(
        "cgroup controller {controller} is not available at {path} (v1: hierarchy not mounted; \
         v2: not enabled in the parent's cgroup.subtree_control)"
    )]
    ControllerUnavailable {
        /// The controller.
        controller: &'static str,
        /// The directory or control file where it was expected.
        path: PathBuf,
    },
    /// A limit value the kernel cannot represent.
    #[error("cgroup limit {field} = {value} is invalid: {reason}")]
    InvalidLimit {
        /// The [`CgroupLimits`] field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Sending SIGKILL failed for a reason other than the process being gone.
    #[error("send SIGKILL to pid {pid} of cgroup {path}")]
    Kill {
        /// The process.
        pid: i32,
        /// The cgroup directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// [`Cgroup::pause`] needs a freezer: v1's `freezer` hierarchy, or v2's `cgroup.freeze`
    /// (Linux 5.2+).
    #[error(
        "no freezer for cgroup {path} (v1: the freezer hierarchy is not mounted; v2: no cgroup.freeze)"
    )]
    NoFreezer {
        /// The cgroup directory.
        path: PathBuf,
    },
    /// The kernel did not report the cgroup frozen in time (a task in an uninterruptible
    /// sleep holds it up); it was thawed again.
    #[error("cgroup {path} was not frozen after {waited:?}")]
    NotFrozen {
        /// The cgroup directory.
        path: PathBuf,
        /// How long it waited.
        waited: Duration,
    },
    /// Processes were still in the cgroup when [`Cgroup::kill_all`] gave up.
    #[error("processes {pids:?} still in cgroup {path} after {waited:?}")]
    StillPopulated {
        /// A cgroup directory.
        path: PathBuf,
        /// What is left.
        pids: Vec<i32>,
        /// How long it waited.
        waited: Duration,
    },
}

/// Where the cgroup hierarchies warren uses are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Per-controller v1 hierarchies: controller name -> mount point. Co-mounted controllers
    /// share a mount point.
    V1 {
        /// Controller name (`memory`, `pids`, `cpu`, `cpuacct`, `freezer`) -> mount point.
        mounts: BTreeMap<String, PathBuf>,
    },
    /// The unified hierarchy.
    V2 {
        /// Its mount point, normally `/sys/fs/cgroup`.
        root: PathBuf,
    },
}

impl CgroupLayout {
    /// Detects the layout of this host from `/proc/self/mountinfo`.
    pub fn detect() -> Result<CgroupLayout, CgroupError> {
        let text = fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Read {
            path: MOUNTINFO.into(),
            source,
        })?;
        Self::from_mountinfo(&text)
    }

    /// Derives the layout from the text of a `mountinfo` file (see proc(5)).
    pub fn from_mountinfo(text: &str) -> Result<CgroupLayout, CgroupError> {
        let mut v1 = BTreeMap::new();
        let mut v2_mounts = Vec::new();
        let mut root_is_v2 = false;
        for mount in text.lines().filter_map(MountInfo::parse) {
            if mount.mount_point == Path::new(CGROUP_ROOT) {
                // A later line over-mounts an earlier one.
                root_is_v2 = mount.fs_type == "cgroup2";
            }
            match mount.fs_type {
                "cgroup2" => v2_mounts.push(mount.mount_point),
                "cgroup" => {
                    for option in mount.super_options.split(',') {
                        if V1_CONTROLLERS.contains(&option) {
                            v1.entry(option.to_owned())
                                .or_insert_with(|| mount.mount_point.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        if root_is_v2 {
            return Ok(CgroupLayout::V2 {
                root: CGROUP_ROOT.into(),
            });
        }
        if V1_LIMIT_CONTROLLERS.iter().any(|c| v1.contains_key(*c)) {
            return Ok(CgroupLayout::V1 { mounts: v1 });
        }
        // No v1 controllers at all: a unified hierarchy mounted elsewhere is all there is.
        match v2_mounts.into_iter().next() {
            Some(root) => Ok(CgroupLayout::V2 { root }),
            None => Err(CgroupError::NoHierarchy),
        }
    }

    /// The first `cgroup2` mount of this host, whatever the layout (a hybrid host's
    /// `unified` one included): where a v2 cgroup can be made even when warren uses v1.
    pub fn cgroup2_mount() -> Option<PathBuf> {
        let text = fs::read_to_string(MOUNTINFO).ok()?;
        text.lines()
            .filter_map(MountInfo::parse)
            .find(|m| m.fs_type == "cgroup2")
            .map(|m| m.mount_point)
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        match self {
            CgroupLayout::V1 { .. } => 1,
            CgroupLayout::V2 { .. } => 2,
        }
    }
}

/// The fields of one `mountinfo` line that matter here.
struct MountInfo<'a> {
    mount_point: PathBuf,
    fs_type: &'a str,
    super_options: &'a str,
}

impl<'a> MountInfo<'a> {
    /// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
    /// the mount point is field 5; after the optional fields and `-` come the type, the
    /// source and the super options.
    fn parse(line: &'a str) -> Option<MountInfo<'a>> {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
        Some(MountInfo {
            mount_point: PathBuf::from(unescape_octal(fields.get(4)?)),
            fs_type: fields.get(separator + 1)?,
            super_options: fields.get(separator + 3)?,
        })
    }
}

/// Undoes mountinfo's `\ooo` escaping of space, tab, newline and backslash.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Limits for a cgroup; `None` leaves the kernel default (on create) or the current value (on
/// update).
#[derive(Default, Clone, Debug, PartialEq)]
pub struct CgroupLimits {
    /// Memory limit; swap is capped to the same total so it cannot bypass the limit.
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u64>,
    /// CPU limit in millicores: 200 = 0.2 CPU = quota 20000 per 100000 µs period.
    pub cpu_limit_millis: Option<u64>,
    /// CPU request in millicores, as a relative weight: v1 `cpu.shares` (1024 per CPU, at least
    /// 2), v2 `cpu.weight` (Kubernetes' shares-to-weight conversion).
    pub cpu_request_millis: Option<u64>,
}

/// Usage counters; a field is `None` when its controller is not available to the cgroup.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct CgroupStats {
    /// Current memory use (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory_bytes: Option<u64>,
    /// Peak memory use (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`, Linux 5.19+).
    pub memory_peak_bytes: Option<u64>,
    /// CPU time consumed (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`).
    pub cpu_usage_ns: Option<u64>,
    /// Tasks in the cgroup (`pids.current`).
    pub pids: Option<u64>,
}

impl From<CgroupStats> for warren_runtime::Usage {
    fn from(s: CgroupStats) -> Self {
        warren_runtime::Usage {
            cpu_ns: s.cpu_usage_ns,
            memory_bytes: s.memory_bytes,
            memory_peak_bytes: s.memory_peak_bytes,
            pids: s.pids,
        }
    }
}

/// One cgroup, present in one directory per hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: u8,
    /// `parent/name`, relative to every hierarchy's mount point.
    relative: PathBuf,
    hierarchies: Vec<Hierarchy>,
    /// Set by [`Cgroup::open`] for a name that failed validation; every operation reports it.
    invalid: Option<InvalidName>,
}

#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    dir: PathBuf,
    /// v1: the controllers of this hierarchy that warren uses; v2: [`V2_CONTROLLERS`].
    controllers: Vec<String>,
}

#[derive(Debug, Clone)]
struct InvalidName {
    what: &'static str,
    value: String,
    reason: &'static str,
}

impl From<InvalidName> for CgroupError {
    fn from(invalid: InvalidName) -> Self {
        CgroupError::InvalidName {
            what: invalid.what,
            value: invalid.value,
            reason: invalid.reason,
        }
    }
}

impl Cgroup {
    /// Creates `<mount>/<parent>/<name>` in every v1 hierarchy, or `<root>/<parent>/<name>` in
    /// v2 after enabling `memory`, `pids` and `cpu` (those available) down the
    /// `cgroup.subtree_control` chain, then writes `limits`. `parent` may be empty or several
    /// `/`-separated components; missing parents are created. An existing cgroup of the same
    /// name is reused. If any step fails, the directories this call created are removed.
    pub fn create(
        layout: &CgroupLayout,
        parent: &str,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Cgroup, CgroupError> {
        let cgroup = Self::try_open(layout, parent, name)?;
        let mut created = Vec::new();
        let result = cgroup
            .make_dirs(&mut created)
            .and_then(|()| cgroup.apply(limits));
        if let Err(err) = result {
            for dir in created.iter().rev() {
                // Best effort: a parent another cgroup now lives in stays.
                let _ = fs::remove_dir(dir);
            }
            return Err(err);
        }
        Ok(cgroup)
    }

    /// A handle for an existing cgroup (e.g. after a restart); does not touch the filesystem.
    /// An invalid `parent` or `name` makes every operation fail with
    /// [`CgroupError::InvalidName`] (see [`Cgroup::try_open`] to get the error here).
    pub fn open(layout: &CgroupLayout, parent: &str, name: &str) -> Cgroup {
        match relative_path(parent, name) {
            Ok(relative) => Self::at(layout, relative),
            Err(invalid) => Cgroup {
                version: layout.version(),
                relative: PathBuf::new(),
                hierarchies: Vec::new(),
                invalid: Some(invalid),
            },
        }
    }

    /// Like [`Cgroup::open`], but reports an invalid name.
    pub fn try_open(
        layout: &CgroupLayout,
        parent: &str,
        name: &str,
    ) -> Result<Cgroup, CgroupError> {
        Ok(Self::at(layout, relative_path(parent, name)?))
    }

    fn at(layout: &CgroupLayout, relative: PathBuf) -> Cgroup {
        let hierarchies = match layout {
            CgroupLayout::V1 { mounts } => {
                let mut by_mount: BTreeMap<&PathBuf, Vec<String>> = BTreeMap::new();
                for (controller, mount) in mounts {
                    by_mount.entry(mount).or_default().push(controller.clone());
                }
                by_mount
                    .into_iter()
                    .map(|(mount, controllers)| Hierarchy {
                        mount: mount.clone(),
                        dir: mount.join(&relative),
                        controllers,
                    })
                    .collect()
            }
            CgroupLayout::V2 { root } => vec![Hierarchy {
                mount: root.clone(),
                dir: root.join(&relative),
                controllers: V2_CONTROLLERS.iter().map(|c| (*c).to_owned()).collect(),
            }],
        };
        Cgroup {
            version: layout.version(),
            relative,
            hierarchies,
            invalid: None,
        }
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The cgroup's directories, one per hierarchy.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.dir.clone()).collect()
    }

    /// Moves `pid` into the cgroup in every hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.check_valid()?;
        let value = pid.to_string();
        for path in self.procs_files() {
            write_file(&path, &value)?;
        }
        Ok(())
    }

    /// The cgroup's directory on a v2 host (what `clone3(CLONE_INTO_CGROUP)` takes, see
    /// [`crate::fork`]); `None` on v1.
    pub fn v2_dir(&self) -> Option<&Path> {
        match (self.version, self.hierarchies.as_slice(), &self.invalid) {
            (2, [only], None) => Some(&only.dir),
            _ => None,
        }
    }

    /// The `cgroup.procs` files, one per hierarchy, so a forked child can move itself in with
    /// `open` + `write` and no allocation. Empty for an invalid handle.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.dir.join("cgroup.procs"))
            .collect()
    }

    /// Processes in the cgroup (the union over hierarchies), sorted.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        self.check_valid()?;
        self.collect_pids(false)
    }

    /// Writes the limits that are `Some`; the others keep their current values.
    pub fn update(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        self.check_valid()?;
        self.apply(limits)
    }

    /// True if the kernel OOM-killed a process in the cgroup (`oom_kill` > 0 in v1
    /// `memory.oom_control` or v2 `memory.events`). False without a memory controller.
    pub fn oom_killed(&self) -> Result<bool, CgroupError> {
        self.check_valid()?;
        let Some(dir) = self.dir_of("memory") else {
            return Ok(false);
        };
        let file = if self.version == 1 {
            "memory.oom_control"
        } else {
            "memory.events"
        };
        let path = dir.join(file);
        let text = read_file(&path)?;
        Ok(keyed_value(&path, &text, "oom_kill")?.is_some_and(|n| n > 0))
    }

    /// Memory, CPU and task counters.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.check_valid()?;
        if self.version == 1 {
            return Ok(CgroupStats {
                memory_bytes: self.read_number("memory", "memory.usage_in_bytes")?,
                memory_peak_bytes: self.read_number("memory", "memory.max_usage_in_bytes")?,
                cpu_usage_ns: self.read_number("cpuacct", "cpuacct.usage")?,
                pids: self.read_number("pids", "pids.current")?,
            });
        }
        let cpu_usage_ns = match self.read_optional("cpu", "cpu.stat")? {
            Some((path, text)) => {
                keyed_value(&path, &text, "usage_usec")?.map(|usec| usec.saturating_mul(1000))
            }
            None => None,
        };
        Ok(CgroupStats {
            memory_bytes: self.read_number("memory", "memory.current")?,
            memory_peak_bytes: self.read_number("memory", "memory.peak")?,
            cpu_usage_ns,
            pids: self.read_number("pids", "pids.current")?,
        })
    }

    /// Freezes every process in the cgroup (a paused sandbox: its memory kept, no CPU) and
    /// returns once the kernel reports it frozen: v1 `freezer.state` `FROZEN`, v2
    /// `cgroup.events` `frozen 1`. Gives up after [`FREEZE_TIMEOUT`] and thaws it again.
    pub fn pause(&self) -> Result<(), CgroupError> {
        self.pause_within(FREEZE_TIMEOUT)
    }

    fn pause_within(&self, patience: Duration) -> Result<(), CgroupError> {
        self.check_valid()?;
        let Some((path, frozen, _)) = self.freezer() else {
            return Err(CgroupError::NoFreezer {
                path: self.primary_dir(),
            });
        };
        write_file(&path, frozen)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        while !self.frozen()? {
            if started.elapsed() >= patience {
                let _ = self.thaw();
                return Err(CgroupError::NotFrozen {
                    path: self.primary_dir(),
                    waited: started.elapsed(),
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL_PAUSE);
            if self.version == 1 {
                // v1 can stay FREEZING while tasks fork or sleep uninterruptibly; asking again
                // retries the tasks that were missed (runc does the same).
                write_file(&path, frozen)?;
            }
        }
        Ok(())
    }

    /// Thaws a paused cgroup; one that is not frozen (or has no freezer) is left as it is.
    pub fn resume(&self) -> Result<(), CgroupError> {
        self.check_valid()?;
        if self.paused()? {
            self.thaw()?;
        }
        Ok(())
    }

    /// Whether the cgroup is frozen or being frozen (asked to freeze: the state a `pause`
    /// leaves, which survives a restart of the server). False without a freezer.
    pub fn paused(&self) -> Result<bool, CgroupError> {
        self.check_valid()?;
        let Some((path, frozen, _)) = self.freezer() else {
            return Ok(false);
        };
        if !self.exists() {
            return Ok(false);
        }
        let text = read_file(&path)?;
        Ok(if self.version == 1 {
            // FREEZING or FROZEN.
            text.trim() != "THAWED"
        } else {
            text.trim() == frozen
        })
    }

    /// Whether the kernel reports every task frozen.
    fn frozen(&self) -> Result<bool, CgroupError> {
        if self.version == 1 {
            let path = self.dir_of("freezer").map(|d| d.join("freezer.state"));
            return match path {
                Some(path) => Ok(read_file(&path)?.trim() == "FROZEN"),
                None => Ok(false),
            };
        }
        let path = self.primary_dir().join("cgroup.events");
        let text = read_file(&path)?;
        Ok(keyed_value(&path, &text, "frozen")? == Some(1))
    }

    /// SIGKILLs every process in the cgroup and waits (up to ~1 s) until it is empty.
    ///
    /// v2 with `cgroup.kill` (Linux 5.14+) lets the kernel do it atomically. Otherwise the
    /// cgroup is frozen if a freezer is available (so nothing forks or exits, and no pid is
    /// reused, between reading `cgroup.procs` and the kill), each pid is killed, the cgroup is
    /// thawed so the kills are delivered, and this repeats until it is empty. A missing cgroup
    /// is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.check_valid()?;
        if !self.exists() {
            return Ok(());
        }
        let started = Instant::now();
        if self.version == 2 {
            let kill_file = self.primary_dir().join("cgroup.kill");
            if kill_file.exists() {
                write_file(&kill_file, "1")?;
                return self.wait_empty(started);
            }
        }
        let own_pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let mut pause = Duration::from_millis(1);
        loop {
            let pids = self.collect_pids(true)?;
            if pids.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= KILL_TIMEOUT {
                return Err(self.still_populated(pids, started));
            }
            let frozen = self.freeze();
            let mut failure = None;
            // pid 0 is how a task outside our pid namespace may be listed; killing it would
            // signal our own process group. Never kill ourselves either.
            for pid in pids.into_iter().filter(|&p| p > 0 && p != own_pid) {
                match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(source) => {
                        failure.get_or_insert(CgroupError::Kill {
                            pid,
                            path: self.primary_dir(),
                            source,
                        });
                    }
                }
            }
            if frozen {
                self.thaw()?;
            }
            if let Some(err) = failure {
                return Err(err);
            }
            thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }

    /// Removes the cgroup (and any child cgroups its processes made) in every hierarchy,
    /// retrying `EBUSY` for a short while. Removing a missing cgroup is Ok.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.check_valid()?;
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut first_error = None;
        for hierarchy in &self.hierarchies {
            if let Err(err) = remove_tree(&hierarchy.dir, deadline) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// True while the cgroup's directory exists in any hierarchy.
    pub fn exists(&self) -> bool {
        self.hierarchies.iter().any(|h| h.dir.is_dir())
    }

    fn check_valid(&self) -> Result<(), CgroupError> {
        match &self.invalid {
            Some(invalid) => Err(invalid.clone().into()),
            None => Ok(()),
        }
    }

    /// The cgroup's directory in the hierarchy that has `controller`.
    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
            .map(|h| h.dir.as_path())
    }

    /// The directory of `controller`, or why there is none.
    fn controller_dir(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.dir_of(controller)
            .ok_or_else(|| CgroupError::ControllerUnavailable {
                controller,
                path: self.primary_dir(),
            })
    }

    /// The directory named in errors (v2: the only one).
    fn primary_dir(&self) -> PathBuf {
        self.hierarchies
            .first()
            .map_or_else(|| self.relative.clone(), |h| h.dir.clone())
    }

    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        for hierarchy in &self.hierarchies {
            let mut dir = hierarchy.mount.clone();
            for component in self.relative.components() {
                if self.version == 2 {
                    enable_controllers(&dir)?;
                }
                dir.push(component);
                match fs::create_dir(&dir) {
                    Ok(()) => created.push(dir.clone()),
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError::Mkdir { path: dir, source }),
                }
            }
        }
        Ok(())
    }

    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let v1 = self.version == 1;
        if let Some(bytes) = limits.memory_bytes {
            self.set_memory(bytes)?;
        }
        if let Some(pids) = limits.pids {
            self.write_limit("pids", "pids.max", &pids.to_string())?;
        }
        if let Some(millis) = limits.cpu_limit_millis {
            let quota = cpu_quota_us(millis)?;
            if v1 {
                self.write_limit("cpu", "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                self.write_limit("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
            } else {
                self.write_limit("cpu", "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            }
        }
        if let Some(millis) = limits.cpu_request_millis {
            let shares = cpu_shares(millis);
            if v1 {
                self.write_limit("cpu", "cpu.shares", &shares.to_string())?;
            } else {
                self.write_limit("cpu", "cpu.weight", &cpu_weight(shares).to_string())?;
            }
        }
        Ok(())
    }

    fn set_memory(&self, bytes: u64) -> Result<(), CgroupError> {
        let value = bytes.to_string();
        let dir = self.controller_dir("memory")?;
        if self.version == 2 {
            self.write_limit("memory", "memory.max", &value)?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write_file(&swap, "0")?;
            }
            return Ok(());
        }
        // v1 requires memory.limit_in_bytes <= memory.memsw.limit_in_bytes at every step, so
        // lowering writes the memory limit first and raising writes memsw first.
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if !memsw.exists() {
            return self.write_limit("memory", "memory.limit_in_bytes", &value);
        }
        match self.write_limit("memory", "memory.limit_in_bytes", &value) {
            Ok(()) => write_file(&memsw, &value),
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                write_file(&memsw, &value)?;
                self.write_limit("memory", "memory.limit_in_bytes", &value)
            }
            Err(err) => Err(err),
        }
    }

    /// Writes a limit file, telling a missing controller apart from a missing cgroup.
    fn write_limit(
        &self,
        controller: &'static str,
        file: &str,
        value: &str,
    ) -> Result<(), CgroupError> {
        let path = self.controller_dir(controller)?.join(file);
        match write_file(&path, value) {
            Err(CgroupError::Write { source, .. })
                if source.kind() == io::ErrorKind::NotFound
                    && path.parent().is_some_and(Path::is_dir) =>
            {
                Err(CgroupError::ControllerUnavailable { controller, path })
            }
            other => other,
        }
    }

    /// Reads a control file: `None` when its controller is not available, an error when the
    /// cgroup itself is gone.
    fn read_optional(
        &self,
        controller: &str,
        file: &str,
    ) -> Result<Option<(PathBuf, String)>, CgroupError> {
        let Some(dir) = self.dir_of(controller) else {
            return Ok(None);
        };
        let path = dir.join(file);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some((path, text))),
            Err(err) if err.kind() == io::ErrorKind::NotFound && dir.is_dir() => Ok(None),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    fn read_number(&self, controller: &str, file: &str) -> Result<Option<u64>, CgroupError> {
        let Some((path, text)) = self.read_optional(controller, file)? else {
            return Ok(None);
        };
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| CgroupError::Parse {
                path,
                content: text.trim().to_owned(),
                reason: "expected a non-negative integer",
            })
    }

    /// The union of `cgroup.procs` over hierarchies; with `skip_missing`, a hierarchy where the
    /// cgroup is gone counts as empty.
    fn collect_pids(&self, skip_missing: bool) -> Result<Vec<i32>, CgroupError> {
        let mut pids = BTreeSet::new();
        for path in self.procs_files() {
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(err) if skip_missing && err.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::Read { path, source }),
            };
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let pid = line.parse().map_err(|_| CgroupError::Parse {
                    path: path.clone(),
                    content: line.to_owned(),
                    reason: "expected a pid",
                })?;
                pids.insert(pid);
            }
        }
        Ok(pids.into_iter().collect())
    }

    fn wait_empty(&self, started: Instant) -> Result<(), CgroupError> {
        let mut pause = Duration::from_millis(1);
        loop {
            let pids = self.collect_pids(true)?;
            if pids.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= KILL_TIMEOUT {
                return Err(self.still_populated(pids, started));
            }
            thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }

    fn still_populated(&self, pids: Vec<i32>, started: Instant) -> CgroupError {
        CgroupError::StillPopulated {
            path: self.primary_dir(),
            pids,
            waited: started.elapsed(),
        }
    }

    /// The freezer control file and its (frozen, thawed) values, if there is a freezer.
    fn freezer(&self) -> Option<(PathBuf, &'static str, &'static str)> {
        if self.version == 2 {
            let path = self.primary_dir().join("cgroup.freeze");
            path.exists().then_some((path, "1", "0"))
        } else {
            self.dir_of("freezer")
                .map(|dir| (dir.join("freezer.state"), "FROZEN", "THAWED"))
        }
    }

    /// Best effort: true if the cgroup is now (being) frozen and must be thawed.
    fn freeze(&self) -> bool {
        self.freezer()
            .is_some_and(|(path, frozen, _)| write_file(&path, frozen).is_ok())
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        match self.freezer() {
            Some((path, _, thawed)) => write_file(&path, thawed),
            None => Ok(()),
        }
    }
}

/// `parent/name` after checking that neither can leave the hierarchy.
fn relative_path(parent: &str, name: &str) -> Result<PathBuf, InvalidName> {
    check_component("name", name, name)?;
    let mut relative = PathBuf::new();
    if !parent.is_empty() {
        for component in parent.split('/') {
            check_component("parent", parent, component)?;
            relative.push(component);
        }
    }
    relative.push(name);
    Ok(relative)
}

fn check_component(what: &'static str, value: &str, component: &str) -> Result<(), InvalidName> {
    let reason = if component.is_empty() {
        "empty path component"
    } else if component == "." || component == ".." {
        "\".\" and \"..\" are not allowed"
    } else if component.contains('/') {
        "contains '/'"
    } else if component.contains(['\0', '\n']) {
        "contains a NUL or newline"
    } else if component.len() > 255 {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(InvalidName {
        what,
        value: value.to_owned(),
        reason,
    })
}

/// Enables the v2 controllers `dir` offers to its children that are not enabled yet.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = read_if_exists(&dir.join("cgroup.controllers"))?;
    let subtree_control = dir.join("cgroup.subtree_control");
    let enabled = read_if_exists(&subtree_control)?;
    let missing: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write_file(&subtree_control, &missing.join(" "))
}

/// v1 `cpu.cfs_quota_us` / v2 `cpu.max` quota for a period of [`CPU_PERIOD_US`].
fn cpu_quota_us(millis: u64) -> Result<u64, CgroupError> {
    if millis == 0 {
        return Err(CgroupError::InvalidLimit {
            field: "cpu_limit_millis",
            value: 0,
            reason: "a CPU limit must be at least 1 millicore",
        });
    }
    Ok((millis.saturating_mul(CPU_PERIOD_US) / 1000).max(MIN_CPU_QUOTA_US))
}

/// v1 `cpu.shares`: 1024 per CPU, clamped to the kernel's range (Kubernetes' MilliCPUToShares).
fn cpu_shares(millis: u64) -> u64 {
    (millis.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES)
}

/// v2 `cpu.weight` (1..=10000) from v1 shares, as Kubernetes and runc convert it.
fn cpu_weight(shares: u64) -> u64 {
    1 + ((shares.clamp(MIN_SHARES, MAX_SHARES) - 2) * 9999) / (MAX_SHARES - 2)
}

/// The number after `key` in a `key value` per line file (`memory.events`, `cpu.stat`, ...).
fn keyed_value(path: &Path, text: &str, key: &str) -> Result<Option<u64>, CgroupError> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some(key) {
            continue;
        }
        let value = words.next().unwrap_or_default();
        return value.parse().map(Some).map_err(|_| CgroupError::Parse {
            path: path.to_owned(),
            content: line.to_owned(),
            reason: "expected `KEY N`",
        });
    }
    Ok(None)
}

/// Writes a control file. Control files are never created (`O_CREAT` would mask a missing
/// controller); `O_TRUNC` is accepted and ignored by cgroupfs.
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The file's text, or "" if it does not exist.
fn read_if_exists(path: &Path) -> Result<String, CgroupError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(CgroupError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `rmdir`s `dir` after its child cgroups, retrying `EBUSY` until `deadline`.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    let read_error = |source| CgroupError::Read {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(read_error(source)),
    };
    for entry in entries {
        let entry = entry.map_err(read_error)?;
        if entry.file_type().map_err(read_error)?.is_dir() {
            remove_tree(&entry.path(), deadline)?;
        }
    }
    let mut pause = Duration::from_millis(1);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(MAX_POLL_PAUSE);
            }
            Err(source) => {
                return Err(CgroupError::Rmdir {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
