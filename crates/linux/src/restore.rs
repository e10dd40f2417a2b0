//! The supervisor's restore mode, `warren-supervise --restore BUNDLE`: brings a checkpointed
//! container back to life with CRIU and supervises it like one it started.
//!
//! The backend prepares the bundle as for a cold start (`container.json`, the overlay's
//! `upper` already holding the checkpoint's root filesystem changes) plus `restore.json`
//! ([`RestoreSpec`]). The supervisor then, in order:
//!
//! 1. makes the sandbox's cgroup, without limits for now (CRIU runs inside it and must not be
//!    the one a small memory limit kills);
//! 2. unshares a mount namespace of its own and mounts the new sandbox's overlay on the
//!    bundle's `rootfs` there: CRIU binds it as the restored container's root (`--root`), as
//!    runc does with its bundle. The mount exists only in the supervisor's namespace and the
//!    container's, so nothing is left on the host whatever happens, and the supervisor
//!    detaches its own copy once the container has its root;
//! 3. makes new pipes for the workload's stdout and stderr and hands their write ends to CRIU
//!    in place of the dumped pipes (`--inherit-fd fd[N]:pipe:[INODE]`, as runc does), so the
//!    output keeps reaching this sandbox's log; the same for stdin (a host file);
//! 4. forks CRIU into the cgroup and a cgroup namespace rooted there (`--manage-cgroups=ignore`:
//!    the restored tree stays where CRIU runs, under the new name's cgroup, and sees the same
//!    cgroup namespace layout as before), with `--restore-detached`: when CRIU exits, the
//!    restored tree is reparented to this supervisor, a child subreaper;
//! 5. applies the sandbox's limits, writes `state.json`, reports `ok PID` and supervises.
//!
//! Any failure kills what CRIU may have left in the cgroup, removes the cgroup, and reports
//! `error MESSAGE` with the reason from CRIU's log: nothing half-restored remains.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use rustix::process::PidfdFlags;
use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, CgroupLayout, CgroupLimits};
use crate::config::{self, ContainerConfig, State};
use crate::criu;
use crate::supervisor::{Running, block_signals};

/// The restore's instructions in the bundle, written by the backend.
pub const SPEC_FILE: &str = "restore.json";
/// Where CRIU writes the restored init's pid (in the host's pid namespace).
pub const PID_FILE: &str = "restored.pid";

/// Descriptors CRIU finds the new stdio on (high, so they clash with nothing CRIU opens).
const STDOUT_FD: i32 = 100;
const STDERR_FD: i32 = 101;
const STDIN_FD: i32 = 102;

/// What the supervisor needs beyond `container.json` to restore a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreSpec {
    pub criu: PathBuf,
    /// CRIU's images (read only: the checkpoint can be restored again).
    pub images: PathBuf,
    /// How CRIU saw the workload's stdout, stderr and stdin at the dump (`pipe:[INODE]`,
    /// `file[MNT_ID:INODE]`); `None` for a descriptor that was not the supervisor's.
    #[serde(default)]
    pub stdout: Option<String>,
    #[serde(default)]
    pub stderr: Option<String>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// (cookie, host directory) of each bind mount from the host.
    #[serde(default)]
    pub mounts: Vec<(String, PathBuf)>,
    /// How long CRIU may take; past it CRIU is killed and the restore fails. `None`: no
    /// limit.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Runs the restore mode for the bundle; returns the process exit code.
pub fn main(bundle: &Path) -> i32 {
    crate::supervisor::run(bundle, restore)
}

fn restore(bundle: &Path) -> Result<Running, String> {
    let config: ContainerConfig = config::read_json(bundle, config::CONFIG_FILE)
        .map_err(|e| format!("read {}: {e}", config::CONFIG_FILE))?;
    let spec: RestoreSpec =
        config::read_json(bundle, SPEC_FILE).map_err(|e| format!("read {SPEC_FILE}: {e}"))?;
    let layout = CgroupLayout::detect().map_err(|e| crate::error_chain(&e))?;
    let signals = block_signals()?;
    let cgroup = Cgroup::create(
        &layout,
        &config.cgroup_parent,
        &config.id,
        &CgroupLimits::default(),
    )
    .map_err(|e| crate::error_chain(&e))?;
    let restored = restore_in(bundle, &config, &spec, &cgroup).and_then(|(pid, out, err)| {
        cgroup
            .update(&(&config.limits).into())
            .map_err(|e| {
                format!(
                    "apply the sandbox's limits to the restored workload: {}",
                    crate::error_chain(&e)
                )
            })
            .and_then(|()| {
                config::write_json(
                    bundle,
                    config::STATE_FILE,
                    &State::new(pid.as_raw(), &config.id),
                )
                .map_err(|e| format!("write {}: {e}", config::STATE_FILE))
            })
            .map(|()| (pid, out, err))
    });
    match restored {
        Ok((pid, stdout, stderr)) => Ok(Running {
            config,
            pid,
            cgroup,
            stdout,
            stderr,
            signals,
            started: Instant::now(),
            // A checkpoint of a gated or egress sandbox is refused (backend/checkpoint.rs).
            gate: None,
        }),
        Err(e) => {
            let _ = cgroup.kill_all();
            reap_all();
            let _ = cgroup.remove();
            Err(e)
        }
    }
}

/// Reaps every ended child (what a failed restore left reparented to this subreaper).
fn reap_all() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Steps 2-4 of the module docs: the restored init's pid and the read ends of its output.
fn restore_in(
    bundle: &Path,
    config: &ContainerConfig,
    spec: &RestoreSpec,
    cgroup: &Cgroup,
) -> Result<(Pid, OwnedFd, OwnedFd), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare the mount namespace: {e}"))?;
    // Slave, not private: what the host unmounts later goes from this copy too (it pins
    // nothing), and nothing mounted here reaches the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("make mounts slaves of the host's: {e}"))?;
    let rootfs = bundle.join(config::ROOTFS_DIR);
    crate::container::mount_overlay(config, bundle, &rootfs)?;

    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let given = bundle.join(config::STDIN_FILE);
    let stdin_path = if given.exists() {
        given.as_path()
    } else {
        Path::new("/dev/null")
    };
    let stdin = crate::supervisor::open_input(stdin_path)?;

    // What CRIU inherits. stdout and stderr may have been one pipe (`2>&1` in the init).
    let mut inherit = Vec::new();
    let mut passed: Vec<(i32, &OwnedFd)> = Vec::new();
    if let Some(key) = &spec.stdout {
        inherit.push((STDOUT_FD, key.clone()));
        passed.push((STDOUT_FD, &out_w));
    }
    if let Some(key) = spec
        .stderr
        .as_ref()
        .filter(|k| spec.stdout.as_ref() != Some(*k))
    {
        inherit.push((STDERR_FD, key.clone()));
        passed.push((STDERR_FD, &err_w));
    }
    if let Some(key) = spec
        .stdin
        .as_ref()
        .filter(|k| spec.stdout.as_ref() != Some(*k) && spec.stderr.as_ref() != Some(*k))
    {
        inherit.push((STDIN_FD, key.clone()));
        passed.push((STDIN_FD, &stdin));
    }
    let pidfile = bundle.join(PID_FILE);
    let _ = std::fs::remove_file(&pidfile);
    let args = criu::restore_args(&criu::RestorePlan {
        images: &spec.images,
        work: bundle,
        root: &rootfs,
        pidfile: &pidfile,
        inherit: &inherit,
        mounts: &spec.mounts,
    });
    let program = std::ffi::CString::new(spec.criu.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("criu path {} holds a NUL byte", spec.criu.display()))?;
    let argv: Vec<std::ffi::CString> = std::iter::once(Ok(program.clone()))
        .chain(
            args.iter()
                .map(|a| std::ffi::CString::new(a.as_encoded_bytes())),
        )
        .collect::<Result<_, _>>()
        .map_err(|_| "a criu argument holds a NUL byte".to_string())?;
    let procs = cgroup.procs_files();

    // SAFETY: the supervisor is single-threaded; the child only writes, dups and execs, and
    // ends in execve or _exit.
    #[allow(unsafe_code)]
    let forked = unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))?;
    let criu_pid = match forked {
        ForkResult::Child => {
            let why = criu_child(&procs, &passed, &program, &argv);
            eprintln!("supervisor: start criu: {why}");
            // SAFETY: ends the child at once, without the supervisor's exit handlers.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(127)
            }
        }
        ForkResult::Parent { child } => child,
    };
    drop((out_w, err_w, stdin));
    let status = wait_criu(criu_pid, spec.timeout_ms.map(Duration::from_millis))?;
    let log = std::fs::read_to_string(bundle.join(criu::RESTORE_LOG)).unwrap_or_default();
    let failed = |why: String| criu::CriuError::Failed {
        action: "restore",
        reason: why,
        log: bundle.join(criu::RESTORE_LOG).display().to_string(),
    };
    match status {
        WaitStatus::Exited(_, 0) => {}
        WaitStatus::Exited(_, 127) if log.is_empty() => {
            return Err(format!(
                "cannot start criu ({}); see supervisor.log",
                spec.criu.display()
            ));
        }
        _ => return Err(crate::error_chain(&failed(criu::log_reason(&log)))),
    }
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or_else(|| format!("criu wrote no pid to {}", pidfile.display()))?;
    let pid = Pid::from_raw(pid);
    if parent_of(pid) != Some(std::process::id() as i32) {
        return Err(format!(
            "the restored workload (pid {pid}) is not this supervisor's child"
        ));
    }
    // The container holds its own bind of the root; this namespace's copy is not needed.
    let _ = umount2(&rootfs, MntFlags::MNT_DETACH);
    Ok((pid, out_r, err_r))
}

/// Waits for CRIU to end, for at most `limit`: a CRIU that hangs (on a lock, a stuck
/// device, a page it cannot read) must not hold the restore, its request and the sandbox's
/// name for ever. Past the limit CRIU is killed; what it made in the cgroup goes with the
/// caller's clean-up. The wait is on a pidfd, so the restore's end is seen at once; a kernel
/// without pidfds (before 5.3) is polled every few milliseconds.
fn wait_criu(pid: Pid, limit: Option<Duration>) -> Result<WaitStatus, String> {
    let deadline = limit.map(|l| Instant::now() + l);
    let pidfd = deadline.and_then(|_| {
        rustix::process::Pid::from_raw(pid.as_raw())
            .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok())
    });
    loop {
        let flags = deadline.map(|_| WaitPidFlag::WNOHANG);
        match waitpid(pid, flags) {
            Ok(WaitStatus::StillAlive) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(status) => return Ok(status),
            Err(e) => return Err(format!("wait for criu: {e}")),
        }
        let Some(deadline) = deadline else { continue };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // One in uninterruptible sleep (a stuck device) dies only when that I/O returns:
            // waited for a little, not for ever (the supervisor, a subreaper, reaps it later).
            let killed = Instant::now() + Duration::from_secs(5);
            while Instant::now() < killed {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
            return Err(format!(
                "criu did not finish the restore within {}s (the server's --restore-timeout) \
                 and was killed",
                limit.unwrap_or_default().as_secs_f64()
            ));
        }
        match &pidfd {
            Some(fd) => {
                let ms = left.as_millis().clamp(1, 60_000) as u16;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(ms));
            }
            None => std::thread::sleep(left.min(Duration::from_millis(5))),
        }
    }
}

/// In the forked child: joins the sandbox's cgroup and a cgroup namespace rooted there, puts
/// the inherited descriptors in place and `execve`s CRIU. Returns only with an error.
fn criu_child(
    procs: &[PathBuf],
    passed: &[(i32, &OwnedFd)],
    program: &std::ffi::CString,
    argv: &[std::ffi::CString],
) -> String {
    for file in procs {
        if let Err(e) = std::fs::write(file, "0") {
            return format!("join cgroup {}: {e}", file.display());
        }
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP) {
        return format!("unshare the cgroup namespace: {e}");
    }
    for (target, fd) in passed {
        // dup2 leaves the new descriptor without close-on-exec.
        // SAFETY: dup2 takes two descriptor numbers; `fd` is open and `target` is ours.
        #[allow(unsafe_code)]
        if unsafe { libc::dup2(fd.as_raw_fd(), *target) } < 0 {
            return format!("dup2: {}", std::io::Error::last_os_error());
        }
    }
    // CRIU's own output (and that of the tools it runs) goes to the supervisor's log, not
    // to the pipe the backend reads `ok PID` from.
    let _ = nix::unistd::dup2_stdout(std::io::stderr());
    let env: Vec<std::ffi::CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend_from_slice(&v.into_encoded_bytes());
            std::ffi::CString::new(kv).ok()
        })
        .collect();
    match nix::unistd::execve(program, argv, &env) {
        Ok(never) => match never {},
        Err(e) => format!("exec {}: {}", program.to_string_lossy(), e.desc()),
    }
}

/// A process's parent (`/proc/PID/stat` field 4).
pub(crate) fn parent_of(pid: Pid) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}
