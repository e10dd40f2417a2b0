//! The guest's raw system calls: starting a process (what runs between clone and exec),
//! terminal ioctls, the kernel's entropy ioctls and the final reboot. Every `unsafe` block
//! of the guest is here.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// What a child does before exec, all async-signal-safe (no allocation, no lock): a new
/// session (and the terminal as its controlling one), the cgroup, the root, the directory,
/// the user.
#[derive(Debug, Clone)]
pub struct Enter {
    pub cgroup_procs: Option<CString>,
    pub root: Option<CString>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub tty: bool,
}

/// A process ready to start: every string the child needs, made before it exists.
#[derive(Debug)]
pub struct Program {
    /// The paths exec tries in order: the program itself when it names a path, else the
    /// program in each directory of the `PATH` it is given (as `execvp` does).
    pub paths: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub enter: Enter,
}

/// The pid of a child between its clone and its exec (0: none). The child stores it
/// (it shares this memory until it execs), so [`watch_spawns`] can say where a start that
/// never finishes is stuck: the parent thread waits inside `clone` until then.
static SPAWNING: AtomicI32 = AtomicI32::new(0);

/// How long a child may stay between clone and exec before [`watch_spawns`] reports it.
const SPAWN_STUCK: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts a thread that prints, on the console, where a child that has not exec'd after
/// [`SPAWN_STUCK`] is in the kernel (`/proc/PID/stack` of it and of PID 1), once per child.
/// Only diagnostics: starts in a guest (about one in a hundred under TCG) once hung there
/// for reasons not found yet.
pub fn watch_spawns() {
    let spawned = std::thread::Builder::new()
        .name("spawn-watch".into())
        .spawn(|| {
            let (mut seen, mut since, mut told) = (0, std::time::Instant::now(), 0);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let pid = SPAWNING.load(Ordering::SeqCst);
                if pid != seen {
                    (seen, since) = (pid, std::time::Instant::now());
                    continue;
                }
                if pid == 0 || told == pid || since.elapsed() < SPAWN_STUCK {
                    continue;
                }
                told = pid;
                let stack = |p: &str| {
                    std::fs::read_to_string(format!("/proc/{p}/stack"))
                        .unwrap_or_else(|e| format!("({e})"))
                        .lines()
                        .map(|l| l.split_whitespace().last().unwrap_or(l).to_string())
                        .collect::<Vec<_>>()
                        .join(" < ")
                };
                eprintln!(
                    "warren-guest: child {pid} has not exec'd after {:?}; it is in: {}; PID 1 is in: {}",
                    since.elapsed(),
                    stack(&pid.to_string()),
                    stack("1")
                );
            }
        });
    if let Err(e) = spawned {
        eprintln!("warren-guest: no spawn watch: {e}");
    }
}

/// The child's stack: it only makes system calls.
const CHILD_STACK: usize = 64 << 10;

/// Set in the child's errno when `chdir` failed, not a later step: a missing working
/// directory is not a missing program. (errno values are far below it.)
const IN_CHDIR: libc::c_int = 1 << 24;

/// A process could not start because its working directory could not be entered.
#[derive(Debug, thiserror::Error)]
#[error("working directory {dir:?}: {source}")]
pub struct WorkdirError {
    pub dir: String,
    #[source]
    pub source: std::io::Error,
}

/// What the child reads (and writes its error to): it lives in the parent's frame, which
/// the child shares until it execs.
struct ChildArgs<'a> {
    program: &'a Program,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    stdio: [RawFd; 3],
    /// The parent's signal mask, restored once the child has exec'd.
    mask: libc::sigset_t,
    /// The errno that stopped the child before or at exec; 0 if it exec'd.
    error: AtomicI32,
}

/// Starts `program` with `stdio` as its descriptors 0, 1 and 2 (each must be above 2); returns
/// its pid, or why it could not start (a failed step before exec, or exec itself).
///
/// `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does: the child runs in the parent's
/// memory until it execs, so nothing is copied, neither page tables nor, after the fork,
/// every page the parent writes. `fork` did both, which under TCG (software CPU) made a start
/// cost tens of milliseconds. std's `Command` would spawn this way too, but not with the
/// cgroup, chroot and user steps.
pub fn spawn(program: &Program, stdio: [RawFd; 3]) -> std::io::Result<i32> {
    let nul = || std::iter::once(std::ptr::null());
    let mut args = ChildArgs {
        program,
        argv: program
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(nul())
            .collect(),
        envp: program
            .envp
            .iter()
            .map(|e| e.as_ptr())
            .chain(nul())
            .collect(),
        stdio,
        // SAFETY: an all-zero sigset_t is a valid (empty) set; it is overwritten below.
        #[allow(unsafe_code)]
        mask: unsafe { std::mem::zeroed() },
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its 16-byte-aligned top.
    let top = {
        let end = stack.as_mut_ptr() as usize + CHILD_STACK;
        (end & !15) as *mut libc::c_void
    };
    // SAFETY: every signal is blocked around the clone so that no handler of this process
    // runs in the child (which shares its memory) before it has reset them; the old mask is
    // restored after. `all` is initialized by sigfillset before use.
    #[allow(unsafe_code)]
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.mask);
    }
    // SAFETY: `child` only makes system calls on data prepared above (no allocation, no
    // lock), on its own stack (`stack`, alive until the clone returns: CLONE_VFORK suspends
    // this thread until the child has exec'd or exited), and reports through an atomic.
    #[allow(unsafe_code)]
    let pid = unsafe {
        libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_mut(&mut args).cast(),
        )
    };
    let clone_error = std::io::Error::last_os_error();
    SPAWNING.store(0, Ordering::SeqCst);
    // SAFETY: restores the mask saved above.
    #[allow(unsafe_code)]
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &args.mask, std::ptr::null_mut());
    }
    drop(stack);
    if pid == -1 {
        return Err(clone_error);
    }
    match args.error.load(Ordering::SeqCst) {
        0 => Ok(pid),
        // The child has exited (127); the reaper collects it.
        errno if errno & IN_CHDIR != 0 => {
            let os = std::io::Error::from_raw_os_error(errno & !IN_CHDIR);
            Err(std::io::Error::new(
                os.kind(),
                WorkdirError {
                    dir: program.enter.cwd.to_string_lossy().into_owned(),
                    source: os,
                },
            ))
        }
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn`, alive while the parent waits for us.
    #[allow(unsafe_code)]
    let args = unsafe { &*arg.cast::<ChildArgs<'_>>() };
    // SAFETY: a plain system call.
    #[allow(unsafe_code)]
    let pid = unsafe { libc::syscall(libc::SYS_getpid) };
    SPAWNING.store(pid as i32, Ordering::SeqCst);
    let errno = enter_and_exec(args);
    args.error.store(errno, Ordering::SeqCst);
    // SAFETY: `_exit` ends this process without running any of the parent's exit handlers.
    #[allow(unsafe_code)]
    unsafe {
        libc::_exit(127)
    }
}

/// The child's steps; returns the errno that stopped them (exec returns only on failure).
/// Raw system calls only: glibc's `setuid` and friends would signal every thread of the
/// process they think they are in (the parent's).
#[allow(unsafe_code)]
fn enter_and_exec(a: &ChildArgs<'_>) -> libc::c_int {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    let e = &a.program.enter;
    // SAFETY: every call below is a plain system call on descriptors this child owns and
    // on NUL-terminated strings and pointer arrays prepared by the parent; `sigaction`
    // reads and writes `action`, a local.
    unsafe {
        // The parent's signal handlers must not run here, nor survive into the program;
        // SIGPIPE is ignored by Rust programs, and is the default again for the workload.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut action) == 0
                && (action.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && action.sa_sigaction != libc::SIG_DFL
            {
                action.sa_sigaction = libc::SIG_DFL;
                action.sa_flags = 0;
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
        // The program starts with no signal blocked, as std's `Command` starts it.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return libc::EINVAL;
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            if libc::dup2(fd, target as libc::c_int) == -1 {
                return errno();
            }
        }
        if libc::setsid() == -1 {
            return errno();
        }
        if e.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
            return errno();
        }
        if let Some(procs) = &e.cgroup_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd == -1 {
                return errno();
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = errno();
            libc::close(fd);
            if written != 1 {
                return err;
            }
        }
        if let Some(root) = &e.root
            && libc::chroot(root.as_ptr()) == -1
        {
            return errno();
        }
        if libc::chdir(e.cwd.as_ptr()) == -1 {
            return errno() | IN_CHDIR;
        }
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == -1
            || libc::syscall(libc::SYS_setgid, e.gid) == -1
            || libc::syscall(libc::SYS_setuid, e.uid) == -1
        {
            return errno();
        }
        // As execvp: the next directory of PATH after ENOENT, ENOTDIR or EACCES; EACCES
        // is what is reported if nothing else was found.
        let mut failed = libc::ENOENT;
        for path in &a.program.paths {
            libc::execve(path.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => failed = libc::EACCES,
                other => return other,
            }
        }
        failed
    }
}

/// Registers a descriptor with tokio's reactor.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, so nothing else can close or replace it while
    // it is registered.
    #[allow(unsafe_code)]
    unsafe {
        tokio::io::unix::AsyncFd::register(fd).map_err(std::io::Error::from)
    }
}

/// Sets a terminal's window size.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives across the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel's input pool, credited as entropy, and forces the CRNG to
/// reseed from it: after a snapshot restore every clone holds the template's CRNG state, and
/// only a reseed makes their random numbers differ at once (a plain write to /dev/urandom
/// would wait for the next scheduled reseed).
pub fn reseed(random: RawFd, seed: &[u8]) -> std::io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = seed.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (seed.len() * 8) as u32;
    info[1] = seed.len() as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: the kernel reads `8 + buf_size` bytes from the pointer; `info` holds that many
    // (two ints, then `words * 4 >= seed.len()` bytes) and lives across the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(random, RNDADDENTROPY, info.as_ptr()) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(random, RNDRESEEDCRNG) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Loads a kernel module from a file.
pub fn load_module(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Ends the VM: the kernel runs with `reboot=t` under qemu's `-no-reboot`, so a reboot
/// makes qemu exit at once (no ACPI power-off dance).
pub fn reboot() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached when not allowed to reboot (not PID 1 in a VM): stop here.
    std::process::exit(1)
}
