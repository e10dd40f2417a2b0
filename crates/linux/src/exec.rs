//! `warren exec`: a process started inside a running container.
//!
//! The backend starts the supervisor binary in exec mode (`--exec BUNDLE`, the spec's JSON in [`SPEC_ENV`]) with the
//! caller's stdio (pipes, or a pseudo-terminal's slave side). That helper joins the sandbox's
//! cgroup, enters its namespaces through `/proc/PID/ns/*` (the mount namespace last: it
//! brings the container's root and `/proc`), forks (entering a pid namespace applies to
//! children only) and the child drops to the sandbox's capabilities, user and seccomp
//! filter before `execve` — and, under a policy's exec list, the exec gate, whose listener it
//! hands to the sandbox's supervisor through `<bundle>/gate.sock` ([`crate::execgate`]). The
//! helper waits and exits with the process's status, so the backend sees an ordinary child
//! process; the process gets SIGKILL if the helper dies (the backend kills it when the
//! exec's caller goes away).

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sched::{CloneFlags, setns};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid, chdir, setresgid, setresuid};
use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, CgroupLayout};
use crate::config::{self, ContainerConfig, State};

/// What the exec helper runs; computed by the backend from the request and the container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// stdin is a terminal that becomes the process's controlling terminal.
    pub tty: bool,
}

/// Runs the exec helper; returns its exit code (the process's, or 126/127 when it could not
/// be started, with the reason on stderr).
/// The environment variable that carries the exec's spec to the helper: not its arguments,
/// which any user of the host can read (`ps`, `/proc/PID/cmdline`), and the spec holds the
/// process's environment. The helper's own environment is readable by its owner only, and
/// the process it starts gets the spec's environment, not the helper's.
pub const SPEC_ENV: &str = "WARREN_EXEC_SPEC";

pub fn main(bundle: &Path, spec_json: &str) -> i32 {
    match run(bundle, spec_json) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("warren exec: {message}");
            126
        }
    }
}

fn run(bundle: &Path, spec_json: &str) -> Result<i32, String> {
    let spec: ExecSpec =
        serde_json::from_str(spec_json).map_err(|e| format!("bad exec spec: {e}"))?;
    let container: ContainerConfig = config::read_json(bundle, config::CONFIG_FILE)
        .map_err(|e| format!("read {}: {e}", config::CONFIG_FILE))?;
    let state: State = config::read_json(bundle, config::STATE_FILE)
        .map_err(|e| format!("the sandbox is not running ({e})"))?;
    // The sandbox's own filter, policy included: an exec'd process must not escape it.
    let seccomp =
        crate::seccomp::compiled_with(&container.deny_syscalls, container.policy_syscalls.as_ref())
            .map_err(|e| crate::error_chain(&e))?;
    // Under an exec list, the process's execs go to the sandbox's gate: connect while the
    // bundle (a host path) is still reachable.
    let gate = match &container.exec_allow {
        Some(_) => Some(crate::execgate::connect(bundle)?),
        None => None,
    };
    let pid = state.pid;
    let mut namespaces = Vec::new();
    for (name, flag) in [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let path = format!("/proc/{pid}/ns/{name}");
        let fd = std::fs::File::open(&path)
            .map_err(|e| format!("open {path} (is the sandbox running?): {e}"))?;
        namespaces.push((name, flag, fd));
    }
    // Still the same workload: the supervisor that started it is alive.
    if config::process_start_time(state.supervisor_pid) != Some(state.supervisor_start) {
        return Err("the sandbox is not running".to_string());
    }
    let layout = CgroupLayout::detect().map_err(|e| crate::error_chain(&e))?;
    let cgroup = Cgroup::open(&layout, &container.cgroup_parent, &state.cgroup);
    for procs in cgroup.procs_files() {
        std::fs::write(&procs, "0").map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    for (name, flag, fd) in &namespaces {
        setns(fd, *flag).map_err(|e| format!("enter the {name} namespace: {e}"))?;
    }
    drop(namespaces);
    // The process dies with this helper, which the backend kills when its caller goes away
    // (a client that hung up): see [`die_with`].
    let helper = config::pidfd_open(std::process::id() as i32)
        .map_err(|e| format!("pidfd_open of the exec helper: {e}"))?;

    // SIGUSR1 from the backend (its caller went away): the process group is killed, and the
    // process reaped here, so no zombie is left to the sandbox's pid 1, which may reap
    // nothing. Handled from before the fork, so one sent meanwhile is not lost.
    let end = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(end_child),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only touches atomics and calls kill(2), which is async-signal-safe.
    #[allow(unsafe_code)]
    unsafe { nix::sys::signal::sigaction(END_SIGNAL, &end) }
        .map_err(|e| format!("sigaction: {e}"))?;

    // SAFETY: the helper is single-threaded; the child runs ordinary code and ends in execve
    // or _exit.
    #[allow(unsafe_code)]
    let forked = unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))?;
    match forked {
        ForkResult::Child => {
            let (code, message) = child(&spec, &seccomp, gate.as_ref(), &helper);
            eprintln!("warren exec: {message}");
            // SAFETY: ends the child at once without running the helper's exit handlers.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(code)
            }
        }
        ForkResult::Parent { child } => {
            CHILD.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
            if ENDED.load(std::sync::atomic::Ordering::SeqCst) {
                end_child(0);
            }
            // The caller's signals are for the process, not for the helper.
            for sig in [
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::Signal::SIGHUP,
            ] {
                // SAFETY: SIG_IGN installs no handler.
                #[allow(unsafe_code)]
                let _ =
                    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
            }
            let ended = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => break Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => break Ok(128 + sig as i32),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => break Err(format!("wait: {e}")),
                }
            };
            // Reaped: its pid may be another process's now.
            CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
            ended
        }
    }
}

/// The exec'd process (the leader of its process group) until reaped, for [`end_child`].
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// [`END_SIGNAL`] came, maybe before the fork: the parent ends the child once it has one.
static ENDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The helper's [`END_SIGNAL`] handler: kills the exec'd process's group (what it started
/// in the background too, unless that left the group).
extern "C" fn end_child(_: libc::c_int) {
    ENDED.store(true, std::sync::atomic::Ordering::SeqCst);
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The signal that makes the helper kill the exec'd process (and reap it, and exit).
pub const END_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR1;

/// Makes the calling process get SIGKILL when the helper (its parent) ends, and checks the
/// helper did not end already. After the last credential change: one clears the setting.
fn die_with(helper: &std::os::fd::OwnedFd) -> Result<(), String> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number.
    #[allow(unsafe_code)]
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(format!(
            "set the parent-death signal: {}",
            std::io::Error::last_os_error()
        ));
    }
    // A pidfd polls readable once its process has ended.
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(helper),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) => Ok(()),
        Ok(_) => Err("the exec's caller went away".into()),
        Err(e) => Err(format!("poll the exec helper: {e}")),
    }
}

fn child(
    spec: &ExecSpec,
    seccomp: &seccompiler::BpfProgram,
    gate: Option<&std::os::fd::OwnedFd>,
    helper: &std::os::fd::OwnedFd,
) -> (i32, String) {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in [
        Signal::SIGPIPE,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        END_SIGNAL,
    ] {
        // SAFETY: SIG_DFL installs no handler.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
    if !spec.tty {
        // A group of its own, which the helper kills whole (a terminal's session is one).
        let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    }
    if spec.tty {
        let _ = nix::unistd::setsid();
        // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the terminal we were given.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::ioctl(std::io::stdin().as_raw_fd(), libc::TIOCSCTTY, 0) };
        if rc < 0 {
            return (
                126,
                format!(
                    "set the controlling terminal: {}",
                    std::io::Error::last_os_error()
                ),
            );
        }
    }
    let gid = Gid::from_raw(spec.gid);
    let uid = Uid::from_raw(spec.uid);
    if let Err(e) = nix::unistd::setgroups(&[gid]) {
        return (126, format!("setgroups: {e}"));
    }
    if let Err(e) = setresgid(gid, gid, gid) {
        return (126, format!("setgid {}: {e}", spec.gid));
    }
    if let Err(e) = crate::container::drop_capabilities() {
        return (126, e);
    }
    if let Err(e) = setresuid(uid, uid, uid) {
        return (126, format!("setuid {}: {e}", spec.uid));
    }
    if let Err(e) = die_with(helper) {
        return (126, e);
    }
    if let Err(e) = chdir(spec.cwd.as_str()) {
        return (126, format!("chdir {}: {e}", spec.cwd));
    }
    // 127 when there is no such program, 126 when it cannot be run: the shell's codes.
    let program = match crate::container::find_program(&spec.argv, &spec.env) {
        Ok(p) => p,
        Err(e) => return (127, e),
    };
    let to_c = |items: &[String]| -> Result<Vec<CString>, String> {
        items
            .iter()
            .map(|s| CString::new(s.as_str()).map_err(|e| format!("{s:?}: {e}")))
            .collect()
    };
    let (argv, env) = match (to_c(&spec.argv), to_c(&spec.env)) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return (126, e),
    };
    crate::container::close_other_fds();
    if let Some(gate) = gate
        && let Err(e) = crate::execgate::arm(std::os::fd::AsFd::as_fd(gate))
    {
        return (126, e);
    }
    if let Err(e) = crate::seccomp::install(seccomp) {
        return (126, format!("install seccomp filter: {e}"));
    }
    let e = nix::unistd::execve(&program, &argv, &env).unwrap_err();
    let code = if e == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    };
    (code, format!("exec {:?}: {}", spec.argv[0], e.desc()))
}
