//! The per-sandbox supervisor: a small single-threaded process (the `warren-supervise`
//! binary, or `warren __supervise`) that starts one container and stays with it until it ends.
//!
//! Why a process per sandbox rather than the server doing it: the workload must outlive the
//! server (a `kill -9` of the server or an upgrade must not take every sandbox down), its
//! output must keep flowing to its log while no server runs, and its end must be recorded even
//! if nobody is watching. conmon and containerd's shims exist for the same reasons. The
//! supervisor is `setsid`, so it survives the server's death and its signals, and it is a
//! child subreaper that reaps at once (this machine's PID 1 reaps orphans a second late).
//!
//! Protocol with the backend, all through the bundle directory and one pipe:
//! - reads `container.json`;
//! - prints one line on stdout: `ok PID` once the workload has `execve`d, or `error MESSAGE`
//!   (then exits 1, leaving nothing behind); after `ok`, one more when the workload has
//!   ended, `exit JSON` (what `exit.json` will hold), before the clean-up below, and then
//!   closes stdout;
//! - writes `state.json` (its own pid and start time, the workload's pid) before `ok`;
//! - copies the workload's stdout/stderr into `container.log` (CRI format, size-capped);
//! - on SIGTERM, sends the workload SIGTERM and SIGKILLs the cgroup after the grace period
//!   (from the `stop` file the backend writes first, else `container.json`'s default);
//! - kills the workload with reason `Timeout` when its timeout passes;
//! - when the workload has ended: notes an OOM kill from the cgroup, kills what is left,
//!   removes the cgroup, writes `exit.json` and exits 0.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use warren_runtime::logs::{LogWriter, Stream};

use crate::cgroup::{Cgroup, CgroupLayout};
use crate::config::{self, ContainerConfig, Exit, State};
use crate::container::{ChildPlan, child_main};
use crate::execgate::{self, Gate};
use crate::fork::Forked;

/// How long output may still drain after the workload's end (its pid namespace is gone by
/// then, so only a descriptor passed outside could keep a pipe open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Runs the supervisor for the bundle; returns the process exit code.
pub fn main(bundle: &Path) -> i32 {
    run(bundle, start)
}

/// A supervisor's life: its own session, a subreaper; `start` the workload, report `ok PID`
/// (or the error), then supervise it.
pub(crate) fn run(bundle: &Path, start: fn(&Path) -> Result<Running, String>) -> i32 {
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_child_subreaper(true);
    match start(bundle) {
        Ok(running) => {
            report(&format!("ok {}", running.pid));
            supervise(bundle, running);
            0
        }
        Err(message) => {
            report(&format!("error {}", message.replace('\n', " ")));
            1
        }
    }
}

fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Points stdout at /dev/null once the last report is made, so nothing later depends on the
/// server's end of the pipe.
fn silence_stdout() {
    if let Ok(null) = nix::fcntl::open("/dev/null", OFlag::O_WRONLY, nix::sys::stat::Mode::empty())
    {
        let _ = nix::unistd::dup2_stdout(&null);
    }
}

/// A workload being supervised: what [`supervise`] needs, from a cold start, a warm shell's
/// claim or a restore.
pub(crate) struct Running {
    pub(crate) config: ContainerConfig,
    pub(crate) pid: Pid,
    pub(crate) cgroup: Cgroup,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) signals: SignalFd,
    pub(crate) started: Instant,
    /// The exec gate, when the policy has an exec list.
    pub(crate) gate: Option<Gate>,
}

fn start(bundle: &Path) -> Result<Running, String> {
    let (config, signals, cgroup) = set_up(bundle)?;
    let seccomp =
        match crate::seccomp::compiled_with(&config.deny_syscalls, config.policy_syscalls.as_ref())
        {
            Ok(program) => program,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(crate::error_chain(&e));
            }
        };
    let mut gate = match config.exec_allow.as_deref().map(Gate::new).transpose() {
        Ok(gate) => gate,
        Err(e) => {
            let _ = cgroup.remove();
            return Err(e);
        }
    };
    let result = fork_container(bundle, &config, &cgroup, &seccomp, gate.as_mut());
    if result.is_err()
        && let Some(e) = &config.egress
    {
        let _ = crate::egress::teardown(e);
    }
    match result {
        Ok((pid, stdout, stderr)) => Ok(Running {
            config,
            pid,
            cgroup,
            stdout,
            stderr,
            signals,
            started: Instant::now(),
            gate,
        }),
        Err(e) => {
            let _ = cgroup.kill_all();
            let _ = cgroup.remove();
            Err(e)
        }
    }
}

/// What both kinds of start do first: read the bundle's config, take over the signals the
/// supervisor handles, and make the sandbox's cgroup with the config's limits.
fn set_up(bundle: &Path) -> Result<(ContainerConfig, SignalFd, Cgroup), String> {
    let config: ContainerConfig = config::read_json(bundle, config::CONFIG_FILE)
        .map_err(|e| format!("read {}: {e}", config::CONFIG_FILE))?;
    let layout = CgroupLayout::detect().map_err(|e| crate::error_chain(&e))?;
    let signals = block_signals()?;
    let cgroup = Cgroup::create(
        &layout,
        &config.cgroup_parent,
        &config.id,
        &(&config.limits).into(),
    )
    .map_err(|e| crate::error_chain(&e))?;
    Ok((config, signals, cgroup))
}

/// Blocks the signals the supervisor handles and returns a descriptor that reads them.
pub(crate) fn block_signals() -> Result<SignalFd, String> {
    let mut mask = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(sig);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .map_err(|e| format!("sigprocmask: {e}"))?;
    SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| format!("signalfd: {e}"))
}

fn fork_container(
    bundle: &Path,
    config: &ContainerConfig,
    cgroup: &Cgroup,
    seccomp: &seccompiler::BpfProgram,
    mut gate: Option<&mut Gate>,
) -> Result<(Pid, OwnedFd, OwnedFd), String> {
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (fail_r, fail_w) = pipe()?;
    let (gate_keep, gate_child) = match gate {
        Some(_) => {
            let (keep, child) = execgate::socketpair()?;
            (Some(keep), Some(child))
        }
        None => (None, None),
    };
    let (net_parent, net_child) = match config.egress {
        Some(_) => {
            let (ready_r, ready_w) = pipe()?;
            let (go_r, go_w) = pipe()?;
            (Some((ready_r, go_w)), Some((ready_w, go_r)))
        }
        None => (None, None),
    };
    let given = bundle.join(config::STDIN_FILE);
    let stdin_path = if given.exists() {
        given.as_path()
    } else {
        Path::new("/dev/null")
    };
    let stdin = open_input(stdin_path)?;
    let cgroup_dir = v2_dir(cgroup);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("unshare pid namespace: {e}"))?;

    // SAFETY: the supervisor is single-threaded (it is its own process and starts no
    // threads), so the child may run ordinary code after the fork; it ends in execve or _exit.
    #[allow(unsafe_code)]
    let forked = unsafe { crate::fork::fork_into(cgroup_dir.as_ref().map(|d| d.as_fd())) }
        .map_err(|e| format!("fork: {e}"))?;
    match forked {
        Forked::Child { in_cgroup } => {
            drop((out_r, err_r, fail_r, cgroup_dir));
            let message = child_main(ChildPlan {
                config,
                bundle,
                cgroup_procs: if in_cgroup {
                    Vec::new()
                } else {
                    cgroup.procs_files()
                },
                seccomp,
                stdin,
                stdout: out_w,
                stderr: err_w,
                gate: gate_child,
                network: net_child,
            });
            let _ = nix::unistd::write(&fail_w, message.as_bytes());
            // SAFETY: _exit ends the process at once, skipping the parent's atexit handlers
            // and buffered output, which belong to the supervisor, not to this child.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(127)
            }
        }
        Forked::Parent { child } => {
            drop((
                out_w, err_w, fail_w, stdin, gate_child, net_child, cgroup_dir,
            ));
            if let (Some(e), Some((ready, go))) = (&config.egress, net_parent) {
                set_up_network(e, child, ready, go)?;
            }
            // With a gate, the child's own execve waits for the gate's answer.
            let message = match (gate.as_deref_mut(), gate_keep) {
                (Some(gate), Some(inbox)) => {
                    gate.add_inbox(inbox);
                    execgate::wait_started(&fail_r, gate)
                }
                _ => read_to_end(&fail_r),
            };
            if !message.is_empty() {
                let _ = waitpid(child, None);
                return Err(message);
            }
            if let Some(gate) = gate
                && let Err(e) = gate.started(bundle)
            {
                // `warren exec` then fails closed: its helper finds no gate to hand over to.
                eprintln!("supervisor: exec gate: {e}");
            }
            let state = State::new(child.as_raw(), &config.id);
            if let Err(e) = config::write_json(bundle, config::STATE_FILE, &state) {
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(format!("write {}: {e}", config::STATE_FILE));
            }
            Ok((child, out_r, err_r))
        }
    }
}

/// Opens the workload's stdin: never through a symlink, yet without `O_NOFOLLOW` in the
/// open file's flags (CRIU reopens an external file with its flags, and `O_NOFOLLOW` on a
/// `/proc/PID/fd` link fails): the path is opened `O_PATH | O_NOFOLLOW` first, then reopened
/// through that descriptor.
pub(crate) fn open_input(path: &Path) -> Result<OwnedFd, String> {
    let fail = |e: nix::errno::Errno| format!("open {}: {e}", path.display());
    let pinned = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(fail)?;
    let kind = nix::sys::stat::fstat(&pinned).map_err(fail)?.st_mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Err(format!("open {}: it is a symbolic link", path.display()));
    }
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pinned));
    nix::fcntl::open(
        via.as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(fail)
}

/// Waits for the child's network namespace, gives it its veth pair and allow-list, and lets
/// the child go on. If the child died first, returns quietly: its message follows on the
/// error pipe.
fn set_up_network(
    e: &crate::egress::Egress,
    child: Pid,
    ready: OwnedFd,
    go: OwnedFd,
) -> Result<(), String> {
    if crate::container::read_byte(&ready) != Ok(1) {
        return Ok(());
    }
    if let Err(err) = crate::egress::setup(e, child.as_raw()) {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(format!("policy network.mode egress: {err}"));
    }
    let _ = nix::unistd::write(&go, b"g");
    Ok(())
}

fn supervise(bundle: &Path, running: Running) {
    let Running {
        config,
        pid,
        cgroup,
        stdout,
        stderr,
        signals,
        started,
        mut gate,
    } = running;
    // The workload's mount namespace, held so that its end does not wait for the namespace's
    // teardown (unmounting the overlay and the rest): that happens when this is dropped,
    // after the end is reported. A workload already gone leaves nothing to hold.
    let mount_ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok();
    let log = match LogWriter::with_limit(bundle.join(config::LOG_FILE), config.log_max_bytes) {
        Ok(log) => Some(log),
        Err(e) => {
            eprintln!(
                "supervisor: cannot open the log: {}",
                crate::error_chain(&e)
            );
            None
        }
    };
    let timeout = config
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let mut kill_at: Option<Instant> = None;
    let mut stopped = false;
    let mut timed_out = false;
    let mut status: Option<WaitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    let mut open = [Some(stdout), Some(stderr)];
    let mut buf = vec![0u8; 64 * 1024];

    loop {
        if status.is_some() && open.iter().all(Option::is_none) {
            break;
        }
        let now = Instant::now();
        if let Some(at) = kill_at
            && now >= at
        {
            let _ = cgroup.kill_all();
            let _ = kill(pid, Signal::SIGKILL);
            kill_at = None;
        }
        if let Some(at) = timeout
            && now >= at
            && status.is_none()
            && !timed_out
        {
            timed_out = true;
            let _ = kill(pid, Signal::SIGKILL);
            let _ = cgroup.kill_all();
        }
        if let Some(at) = drain_until
            && now >= at
        {
            break;
        }
        let next = [kill_at, if timed_out { None } else { timeout }, drain_until]
            .into_iter()
            .flatten()
            .min();
        let wait = match next {
            Some(at) => {
                let ms = at.saturating_duration_since(now).as_millis().min(60_000) as u16;
                PollTimeout::from(ms.max(1))
            }
            None => PollTimeout::NONE,
        };

        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let mut which = Vec::new();
        for (i, fd) in open.iter().enumerate() {
            if let Some(fd) = fd {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        let gate_at = fds.len();
        if let Some(gate) = &gate {
            fds.extend(gate.poll_fds());
        }
        match poll(&mut fds, wait) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                eprintln!("supervisor: poll: {e}");
                break;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        let gate_ready: Vec<Option<PollFlags>> =
            fds[gate_at..].iter().map(PollFd::revents).collect();
        drop(fds);
        if let Some(gate) = &mut gate {
            gate.handle(&gate_ready);
        }

        for (slot, i) in which.iter().enumerate() {
            if !ready[slot + 1] {
                continue;
            }
            let Some(fd) = &open[*i] else { continue };
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) | Err(_) => open[*i] = None,
                Ok(n) => {
                    if let Some(log) = &log {
                        let stream = if *i == 0 {
                            Stream::Stdout
                        } else {
                            Stream::Stderr
                        };
                        if let Err(e) = log.write(stream, &buf[..n]) {
                            eprintln!("supervisor: log write: {}", crate::error_chain(&e));
                        }
                    }
                }
            }
        }
        if ready[0] {
            while let Ok(Some(info)) = signals.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => {}
                    Ok(Signal::SIGTERM | Signal::SIGINT) if status.is_none() => {
                        stopped = true;
                        let grace = stop_grace(bundle, &config);
                        let _ = kill(pid, Signal::SIGTERM);
                        let at = Instant::now() + grace;
                        kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                    }
                    _ => {}
                }
            }
            reap(pid, &mut status);
            if status.is_some() && drain_until.is_none() {
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                kill_at = None;
            }
        }
    }
    if status.is_none() {
        // Only reached when poll itself failed: make sure the workload is gone.
        let _ = cgroup.kill_all();
        let _ = kill(pid, Signal::SIGKILL);
        if let Ok(s) = waitpid(pid, None) {
            status = Some(s);
        }
    }
    let oom_killed = cgroup.oom_killed().unwrap_or(false);
    let (code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (code, None),
        Some(WaitStatus::Signaled(_, sig, _)) => (128 + sig as i32, Some(sig as i32)),
        _ => (128 + libc::SIGKILL, Some(libc::SIGKILL)),
    };
    let exit = Exit {
        code,
        signal,
        oom_killed,
        stopped,
        timed_out,
    };
    // The log is complete before the end is known: a reader after the end sees all of it.
    if let Some(log) = &log {
        let _ = log.close();
    }
    // The server learns the end now; the clean-up below is off its path (it waits for this
    // process to end only before deleting the bundle).
    if let Ok(json) = serde_json::to_string(&exit) {
        report(&format!("exit {json}"));
    }
    silence_stdout();
    drop(mount_ns);
    if let Err(e) = cgroup.kill_all() {
        eprintln!(
            "supervisor: kill what is left in the cgroup: {}",
            crate::error_chain(&e)
        );
    }
    if let Err(e) = cgroup.remove() {
        eprintln!("supervisor: remove the cgroup: {}", crate::error_chain(&e));
    }
    if let Some(e) = &config.egress
        && let Err(err) = crate::egress::teardown(e)
    {
        eprintln!("supervisor: egress teardown: {err}");
    }
    if let Some(gate) = gate {
        eprintln!("supervisor: exec gate: {}", gate.summary());
    }
    if let Err(e) = config::write_json(bundle, config::EXIT_FILE, &exit) {
        eprintln!("supervisor: write {}: {e}", config::EXIT_FILE);
    }
}

/// Reaps every child that has ended; records the workload's status.
fn reap(pid: Pid, status: &mut Option<WaitStatus>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(s) => {
                if s.pid() == Some(pid) {
                    *status = Some(s);
                }
            }
        }
    }
}

fn stop_grace(bundle: &Path, config: &ContainerConfig) -> Duration {
    let ms = std::fs::read_to_string(bundle.join(config::STOP_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(config.stop_grace_ms);
    Duration::from_millis(ms)
}

/// The command line of the supervisor binary (after the program name): `BUNDLE` supervises a
/// new container; `--restore BUNDLE` restores one from a checkpoint (see [`crate::restore`])
/// and supervises it; `--exec BUNDLE` runs a process inside a running one (its spec in
/// [`crate::exec::SPEC_ENV`]).
pub fn cli(args: &[std::ffi::OsString]) -> i32 {
    match args {
        [flag] if flag == "--build-id" => {
            println!("{}", crate::BUILD_ID);
            0
        }
        [bundle] => main(Path::new(bundle)),
        [flag, bundle] if flag == "--warm" => warm_main(Path::new(bundle)),
        [flag, bundle] if flag == "--restore" => crate::restore::main(Path::new(bundle)),
        [flag, bundle] if flag == "--exec" => match std::env::var(crate::exec::SPEC_ENV) {
            Ok(spec) => crate::exec::main(Path::new(bundle), &spec),
            Err(e) => {
                eprintln!("warren-supervise: --exec: {}: {e}", crate::exec::SPEC_ENV);
                2
            }
        },
        _ => {
            eprintln!(
                "usage: warren-supervise [--warm|--restore] BUNDLE | warren-supervise --exec BUNDLE (the spec in $WARREN_EXEC_SPEC)"
            );
            2
        }
    }
}

/// A warm shell: a container prepared from an image's template (namespaces, rootfs, `/proc`,
/// `/dev`) whose pid 1 waits for a sandbox to claim it. Claiming only sets the sandbox's own
/// settings and `execve`s, which is what makes a create from the pool fast.
struct WarmShell {
    template: ContainerConfig,
    pid: Pid,
    cgroup: Cgroup,
    stdout: OwnedFd,
    stderr: OwnedFd,
    fail: OwnedFd,
    claim: OwnedFd,
    listener: std::os::unix::net::UnixListener,
    signals: SignalFd,
    /// The supervisor's end of the exec gate's socketpair, used if the claim has an exec list.
    gate_inbox: OwnedFd,
}

/// `warren-supervise --warm BUNDLE`: prepares a warm shell, reports `ok PID` once it is
/// ready, waits for a claim on `ctl.sock` (or SIGTERM), then supervises the claimed sandbox
/// like a cold one.
pub fn warm_main(bundle: &Path) -> i32 {
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let shell = match warm_start(bundle) {
        Ok(shell) => shell,
        Err(message) => {
            report(&format!("error {}", message.replace('\n', " ")));
            return 1;
        }
    };
    report(&format!("ok {}", shell.pid));
    match wait_for_claim(shell) {
        Ok((bundle, running)) => {
            supervise(&bundle, running);
            0
        }
        Err(message) => {
            eprintln!("supervisor: warm shell ended: {message}");
            1
        }
    }
}

fn warm_start(bundle: &Path) -> Result<WarmShell, String> {
    let (template, signals, cgroup) = set_up(bundle)?;
    warm_fork(bundle, &template, &cgroup, signals).inspect_err(|_| {
        let _ = cgroup.kill_all();
        let _ = cgroup.remove();
    })
}

fn warm_fork(
    bundle: &Path,
    template: &ContainerConfig,
    cgroup: &Cgroup,
    signals: SignalFd,
) -> Result<WarmShell, String> {
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (fail_r, fail_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let (claim_r, claim_w) = pipe()?;
    let (gate_keep, gate_child) = execgate::socketpair()?;
    let stdin = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open /dev/null: {e}"))?;
    let socket = bundle.join(config::CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| format!("listen on {}: {e}", socket.display()))?;
    let cgroup_dir = v2_dir(cgroup);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("unshare pid namespace: {e}"))?;
    // SAFETY: the supervisor is single-threaded; the child ends in execve or _exit.
    #[allow(unsafe_code)]
    let forked = unsafe { crate::fork::fork_into(cgroup_dir.as_ref().map(|d| d.as_fd())) }
        .map_err(|e| format!("fork: {e}"))?;
    match forked {
        Forked::Child { in_cgroup } => {
            drop((out_r, err_r, fail_r, ready_r, claim_w, listener, gate_keep));
            drop(cgroup_dir);
            let message = crate::container::warm_child_main(
                template,
                bundle,
                &if in_cgroup {
                    Vec::new()
                } else {
                    cgroup.procs_files()
                },
                ready_w,
                claim_r,
                [stdin, out_w, err_w],
                gate_child,
            );
            let _ = nix::unistd::write(&fail_w, message.as_bytes());
            // SAFETY: ends the child at once, without the supervisor's exit handlers.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(127)
            }
        }
        Forked::Parent { child } => {
            drop((
                out_w, err_w, fail_w, ready_w, claim_r, stdin, gate_child, cgroup_dir,
            ));
            if crate::container::read_byte(&ready_r) != Ok(1) {
                let message = read_to_end(&fail_r);
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(if message.is_empty() {
                    "the warm shell died while preparing".to_string()
                } else {
                    message
                });
            }
            let state = State::new(child.as_raw(), &template.id);
            if let Err(e) = config::write_json(bundle, config::STATE_FILE, &state) {
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(format!("write {}: {e}", config::STATE_FILE));
            }
            Ok(WarmShell {
                template: template.clone(),
                pid: child,
                cgroup: cgroup.clone(),
                stdout: out_r,
                stderr: err_r,
                fail: fail_r,
                claim: claim_w,
                listener,
                signals,
                gate_inbox: gate_keep,
            })
        }
    }
}

/// The cgroup's directory on a v2 host, open for `clone3(CLONE_INTO_CGROUP)`
/// ([`crate::fork`]); `None` on v1, or if it cannot be opened (the child then joins by
/// writing `cgroup.procs`, which reports the error if there is one).
fn v2_dir(cgroup: &Cgroup) -> Option<std::fs::File> {
    cgroup
        .v2_dir()
        .and_then(|dir| std::fs::File::open(dir).ok())
}

fn read_to_end(fd: &OwnedFd) -> String {
    let mut message = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => message.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&message).into_owned()
}

/// Kills a warm shell that will never run anything and removes its cgroup.
fn discard(pid: Pid, cgroup: &Cgroup) {
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, None);
    let _ = cgroup.kill_all();
    let _ = cgroup.remove();
}

/// Waits for a claim or the end; on a claim, hands the shell its sandbox and returns what
/// [`supervise`] needs.
fn wait_for_claim(shell: WarmShell) -> Result<(std::path::PathBuf, Running), String> {
    use std::io::{BufRead, Write as _};
    loop {
        let mut fds = [
            PollFd::new(shell.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(shell.listener.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                discard(shell.pid, &shell.cgroup);
                return Err(format!("poll: {e}"));
            }
        }
        let signalled = fds[0].revents().is_some_and(|r| !r.is_empty());
        let claimed = fds[1].revents().is_some_and(|r| !r.is_empty());
        if signalled {
            while let Ok(Some(info)) = shell.signals.read_signal() {
                if let Ok(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP) =
                    Signal::try_from(info.ssi_signo as i32)
                {
                    discard(shell.pid, &shell.cgroup);
                    return Err("stopped while warm".to_string());
                }
            }
            if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                waitpid(shell.pid, Some(WaitPidFlag::WNOHANG))
            {
                let message = read_to_end(&shell.fail);
                discard(shell.pid, &shell.cgroup);
                return Err(format!("the warm shell died: {message}"));
            }
        }
        if !claimed {
            continue;
        }
        let Ok((stream, _)) = shell.listener.accept() else {
            continue;
        };
        let mut line = String::new();
        if std::io::BufReader::new(&stream)
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        let reply = |text: &str| {
            let _ = (&stream).write_all(format!("{text}\n").as_bytes());
        };
        let claim: config::Claim = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                reply(&format!("error bad claim: {e}"));
                continue;
            }
        };
        if claim.config.layers != shell.template.layers
            || claim.config.rootfs.is_some()
            || !claim.config.mounts.is_empty()
            || claim.config.storage_bytes.is_some()
        {
            reply(
                "error the claim does not fit this shell (another image, bind mounts or a storage limit)",
            );
            continue;
        }
        let mut gate = match claim
            .config
            .exec_allow
            .as_deref()
            .map(Gate::new)
            .transpose()
        {
            Ok(gate) => gate,
            Err(e) => {
                reply(&format!("error {e}"));
                continue;
            }
        };
        if let Some(e) = &claim.config.egress
            && let Err(err) = crate::egress::setup(e, shell.pid.as_raw())
        {
            let why = format!("policy network.mode egress: {err}");
            reply(&format!("error {why}"));
            let _ = crate::egress::teardown(e);
            discard(shell.pid, &shell.cgroup);
            return Err(why);
        }
        let undo_network = || {
            if let Some(e) = &claim.config.egress {
                let _ = crate::egress::teardown(e);
            }
        };
        if let Err(e) = shell.cgroup.update(&(&claim.config.limits).into()) {
            let why = crate::error_chain(&e);
            reply(&format!("error {why}"));
            discard(shell.pid, &shell.cgroup);
            undo_network();
            return Err(why);
        }
        let WarmShell {
            template: _,
            pid,
            cgroup,
            stdout,
            stderr,
            fail,
            claim: claim_fd,
            signals,
            gate_inbox,
            ..
        } = shell;
        let written = serde_json::to_vec(&claim.config)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::File::from(claim_fd).write_all(&bytes));
        // Written while the workload's process finishes its setup (the backend only renamed
        // the bundle): `warren exec`, a checkpoint and a restarted server read it.
        let recorded = match &written {
            Ok(()) => config::write_json(&claim.bundle, config::CONFIG_FILE, &claim.config)
                .map_err(|e| format!("write {}: {e}", config::CONFIG_FILE)),
            Err(_) => Ok(()),
        };
        // With a gate, the workload's execve waits for the gate's answer.
        let message = match &mut gate {
            Some(gate) if written.is_ok() => {
                gate.add_inbox(gate_inbox);
                execgate::wait_started(&fail, gate)
            }
            _ => read_to_end(&fail),
        };
        if written.is_err() || !message.is_empty() || recorded.is_err() {
            let why = match recorded {
                _ if !message.is_empty() => message,
                Err(e) => e,
                Ok(()) => "the warm shell died".to_string(),
            };
            reply(&format!("error {}", why.replace('\n', " ")));
            discard(pid, &cgroup);
            undo_network();
            return Err(why);
        }
        // `state.json` stays as the shell wrote it: the same supervisor, workload and cgroup.
        let _ = std::fs::remove_file(claim.bundle.join(config::CONTROL_SOCKET));
        if let Some(gate) = &mut gate
            && let Err(e) = gate.started(&claim.bundle)
        {
            eprintln!("supervisor: exec gate: {e}");
        }
        reply(&format!("ok {pid}"));
        return Ok((
            claim.bundle,
            Running {
                config: claim.config,
                pid,
                cgroup,
                stdout,
                stderr,
                signals,
                started: Instant::now(),
                gate,
            },
        ));
    }
}
