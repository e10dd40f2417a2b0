//! The exec gate: a policy's `exec.allow` enforced in the kernel. A process in a sandbox whose
//! policy lists commands cannot `execve`/`execveat` anything else — not through a shell in the
//! sandbox, not through `warren exec`, not from a warm-pool shell — while listed files run.
//!
//! # Mechanism: seccomp user notification
//!
//! Besides the sandbox's seccomp filter ([`crate::seccomp`], unchanged and still cached by
//! the policy's hash), every process of such a sandbox gets a second, constant filter of eight
//! instructions that sends `execve` and `execveat` to a *listener* (`SECCOMP_RET_USER_NOTIF`,
//! Linux 5.5+) and allows everything else. The child installs it just before its own
//! `execve` and hands the listener to the sandbox's supervisor over a unix socket
//! ([`arm`]); `warren exec` helpers do the same through `<bundle>/gate.sock`. Children
//! inherit the filter, so the whole process tree is covered. The supervisor ([`Gate`])
//! polls its listeners with the rest of its work; for each notification it:
//!
//! 1. reads the path from the caller's memory (`/proc/TID/mem`, at most `PATH_MAX` bytes);
//! 2. resolves it as the kernel would, inside the caller's root (`/proc/TID/root`, with
//!    `openat2(RESOLVE_IN_ROOT)` for every component, so a symlink or `..` never leaves the
//!    sandbox), relative paths from its cwd or from `execveat`'s directory descriptor, and
//!    `fexecve` (`AT_EMPTY_PATH`) from the descriptor's path ([`resolve`]);
//! 3. checks with `SECCOMP_IOCTL_NOTIF_ID_VALID` that the caller is still the task that
//!    asked (so nothing read came from a recycled pid);
//! 4. answers `CONTINUE` when the policy's globs match the resolved file or its name (the
//!    directories resolved, the last name as given: listing `/bin/sh` works in an image
//!    where it is a symlink to `busybox`), else fails the call: `EPERM` for an existing file
//!    (a shell prints `sh: /tmp/x: Operation not permitted` and sets `$?` to 126), `ENOENT`
//!    for a missing one (so `$PATH` searches go on as usual).
//!
//! The work per notification is bounded: one path of at most `PATH_MAX`, at most 40 symlinks
//! and [`resolve::MAX_LOOKUPS`] lookups, no blocking opens (`O_PATH` only). A dead supervisor
//! cannot leave the sandbox stuck: when the last listener descriptor closes, the kernel fails
//! every pending and later `execve` with `ENOSYS` — the gate fails closed.
//!
//! Sandboxes whose policy has no exec list get no second filter, no socket and no
//! supervisor work at all (a warm shell carries one unused socketpair until it is claimed).
//!
//! # Why not Landlock (this kernel has it, ABI 7)
//!
//! Landlock's `LANDLOCK_ACCESS_FS_EXECUTE` checks the opened file in the kernel, with no race
//! and no per-exec cost. But it grants inodes, not names: the globs would be expanded once,
//! at start (files created later never run, a directory walk per start), and a dynamically
//! linked program needs its ELF interpreter (`ld.so`) granted too — after which
//! `ld.so /any/binary` runs anything. User notification decides on every exec, by name.
//!
//! # Known limits
//!
//! - **The `CONTINUE` race.** After `CONTINUE` the kernel reads the path again. Another
//!   thread of the caller, a process sharing its memory (a `vfork`/`posix_spawn` child shares
//!   its parent's, and the parent's other threads run on), or one writing `/proc/TID/mem`
//!   could change the string between the check and the kernel's read; a rename or a swapped
//!   symlink in a directory the workload can write can change what the path names. The kernel
//!   documents this: user notification cannot be a complete security boundary on its own.
//!   Refusing multi-threaded callers would not close it (a `posix_spawn` child has one thread
//!   but shares memory) and would break ordinary programs (Go, Java). What makes the list a
//!   boundary is the file system: keep listed files and their directories read-only for the
//!   workload (`filesystem.writable` makes everything else read-only; `readOnly` paths,
//!   `readOnlyRootfs`). A writable listed path is no protection anyway: the workload can
//!   copy any program there.
//! - **Names, not contents.** A multi-call binary (busybox) is one file for all its applets
//!   and chooses the applet by `argv[0]`: listing it allows every applet. Interpreters
//!   (`sh`, `python3`) run whatever they read; listing one allows what it can do.
//! - **`#!` scripts and ELF interpreters** are loaded by the kernel, not through `execve`:
//!   a listed script runs with its `#!` interpreter and a listed program with its `ld.so`,
//!   neither of which needs listing; executing the interpreter directly does.
//! - **Non-UTF-8 paths** are refused (`EPERM`): globs match text.
//! - **Cost**: two context switches and ~20 syscalls in the supervisor per exec, ~0.2 ms on
//!   a busy 2-core machine (docs/PERFORMANCE.md, `scripts/bench-execgate.sh`); nothing on
//!   other syscalls. The supervisor logs its own time per decision when the sandbox ends.

pub mod resolve;
mod sys;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use warren_spec::GlobList;

use resolve::{Lookup, Node, PATH_MAX, resolve};

/// The socket in a bundle where `warren exec` helpers hand over their listeners.
pub const GATE_SOCKET: &str = "gate.sock";
/// Listeners one supervisor keeps (one per `warren exec` while its processes live); past
/// this a new one is closed at once, so that exec's processes fail closed (`ENOSYS`).
const MAX_LISTENERS: usize = 256;
/// Denials written to the supervisor's log before it goes quiet (a workload can trigger them
/// in a loop); the total is logged at the end.
const LOGGED_DENIALS: u64 = 16;

/// The child's side: installs the gate's filter on the calling thread and hands its
/// listener to the supervisor over `sock` (a connected datagram socket). Runs in a
/// single-threaded child just before `execve`.
pub fn arm(sock: BorrowedFd<'_>) -> Result<(), String> {
    let listener = sys::install_listener(&sys::gate_program()).map_err(|e| {
        format!(
            "policy exec.allow: install the exec gate (seccomp user notification, Linux 5.5+): {}",
            e.desc()
        )
    })?;
    sys::send_fd(sock, listener.as_fd()).map_err(|e| {
        format!(
            "policy exec.allow: hand the exec gate to the sandbox's supervisor: {}",
            e.desc()
        )
    })
}

/// A datagram socket connected to a running sandbox's gate (for `warren exec`).
pub fn connect(bundle: &Path) -> Result<OwnedFd, String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let path = bundle.join(GATE_SOCKET);
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let addr = UnixAddr::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    connect(sock.as_raw_fd(), &addr).map_err(|e| {
        format!(
            "the sandbox's exec gate ({}) does not answer: {} (exec.allow needs its supervisor)",
            path.display(),
            e.desc()
        )
    })?;
    Ok(sock)
}

/// A connected pair of datagram sockets: the supervisor keeps the first, the container's
/// child sends its listener on the second.
pub fn socketpair() -> Result<(OwnedFd, OwnedFd), String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))
}

/// The supervisor's side: the allow-list, where listeners arrive, and the listeners.
#[derive(Debug)]
pub struct Gate {
    allow: GlobList,
    inboxes: Vec<OwnedFd>,
    listeners: Vec<OwnedFd>,
    allowed: u64,
    denied: u64,
    /// Time spent deciding (from the notification's receipt to the answer), in total and
    /// the longest, for the supervisor's log.
    busy: std::time::Duration,
    slowest: std::time::Duration,
}

/// What to answer a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny(Errno),
    /// The caller died while we looked: nothing to answer.
    Gone,
}

impl Gate {
    pub fn new(allow: &[String]) -> Result<Gate, String> {
        let allow = GlobList::new("policy.exec.allow", allow).map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(Gate {
            allow,
            inboxes: Vec::new(),
            listeners: Vec::new(),
            allowed: 0,
            denied: 0,
            busy: std::time::Duration::ZERO,
            slowest: std::time::Duration::ZERO,
        })
    }

    /// Listens for listeners on `fd` (the supervisor's end of [`socketpair`]).
    pub fn add_inbox(&mut self, fd: OwnedFd) {
        self.inboxes.push(fd);
    }

    /// The workload has started: the start's socketpair is done with, and `warren exec`
    /// helpers reach the gate through `<bundle>/gate.sock` from now on.
    pub fn started(&mut self, bundle: &Path) -> Result<(), String> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
        self.inboxes.clear();
        let path = bundle.join(GATE_SOCKET);
        let _ = std::fs::remove_file(&path);
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        let addr = UnixAddr::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        bind(sock.as_raw_fd(), &addr).map_err(|e| format!("bind {}: {e}", path.display()))?;
        self.inboxes.push(sock);
        Ok(())
    }

    /// What to poll: the inboxes, then the listeners (read with [`Gate::handle`]).
    pub fn poll_fds(&self) -> impl Iterator<Item = PollFd<'_>> {
        self.inboxes
            .iter()
            .chain(&self.listeners)
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
    }

    /// Handles what polled ready; `revents` in the order of [`Gate::poll_fds`].
    pub fn handle(&mut self, revents: &[Option<PollFlags>]) {
        let inboxes = self.inboxes.len();
        let mut dead_inboxes = Vec::new();
        let mut dead = Vec::new();
        for (i, r) in revents.iter().enumerate() {
            let Some(r) = r.filter(|r| !r.is_empty()) else {
                continue;
            };
            if i < inboxes {
                if !self.take_listeners(i) {
                    dead_inboxes.push(i);
                }
            } else if r.contains(PollFlags::POLLIN) {
                self.serve(i - inboxes);
            } else {
                // POLLHUP: no process uses this filter any more.
                dead.push(i - inboxes);
            }
        }
        for j in dead.into_iter().rev() {
            self.listeners.swap_remove(j);
        }
        for i in dead_inboxes.into_iter().rev() {
            self.inboxes.swap_remove(i);
        }
    }

    /// Takes the listeners waiting on inbox `i`; false when the inbox is broken.
    fn take_listeners(&mut self, i: usize) -> bool {
        // Bounded: a few datagrams per wake-up, the rest on the next.
        for _ in 0..8 {
            match sys::receive_fds(self.inboxes[i].as_fd()) {
                Ok(fds) => {
                    for fd in fds {
                        if is_listener(&fd) && self.listeners.len() < MAX_LISTENERS {
                            self.listeners.push(fd);
                        } else {
                            eprintln!(
                                "supervisor: exec gate: a descriptor that is not a listener, or too many; closed"
                            );
                        }
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return true,
                Err(e) => {
                    eprintln!("supervisor: exec gate: receive: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Answers one notification of listener `j`.
    fn serve(&mut self, j: usize) {
        let began = std::time::Instant::now();
        let n = match sys::receive(self.listeners[j].as_fd()) {
            Ok(n) => n,
            // ENOENT: the caller died since the poll.
            Err(Errno::ENOENT | Errno::EINTR) => return,
            Err(e) => {
                eprintln!("supervisor: exec gate: receive a notification: {e}");
                return;
            }
        };
        let verdict = self.decide(self.listeners[j].as_fd(), &n);
        let error = match verdict {
            Verdict::Gone => return,
            Verdict::Allow => {
                self.allowed += 1;
                None
            }
            Verdict::Deny(errno) => {
                self.denied += 1;
                Some(errno)
            }
        };
        if let Err(e) = sys::answer(self.listeners[j].as_fd(), n.id, error)
            && e != Errno::ENOENT
        {
            eprintln!("supervisor: exec gate: answer: {e}");
        }
        let took = began.elapsed();
        self.busy += took;
        self.slowest = self.slowest.max(took);
    }

    fn decide(&self, listener: BorrowedFd<'_>, n: &sys::Notification) -> Verdict {
        let verdict = match self.check(n) {
            Ok(verdict) => verdict,
            Err(errno) => Verdict::Deny(errno),
        };
        // Everything read above came from /proc/TID: it is the caller's only if the caller
        // is still there, waiting for this answer.
        if !sys::still_valid(listener, n.id) {
            return Verdict::Gone;
        }
        if let (Verdict::Deny(errno), true) = (verdict, self.denied < LOGGED_DENIALS) {
            eprintln!(
                "supervisor: exec gate: denied an exec by task {} ({})",
                n.tid,
                errno.desc()
            );
        }
        verdict
    }

    fn check(&self, n: &sys::Notification) -> Result<Verdict, Errno> {
        let proc = format!("/proc/{}", n.tid);
        let (dirfd, address, flags) = if n.nr == libc::SYS_execve {
            (libc::AT_FDCWD, n.args[0], 0)
        } else if n.nr == libc::SYS_execveat {
            (n.args[0] as i32, n.args[1], n.args[4] as i32)
        } else {
            return Err(Errno::ENOSYS);
        };
        let mem = std::fs::File::open(format!("{proc}/mem")).map_err(io_errno)?;
        let root = nix::fcntl::open(
            format!("{proc}/root").as_str(),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // The caller's root inside the sandbox ("/" unless it chrooted): /proc links name
        // paths from the sandbox's root, the walk runs from the caller's.
        let prefix = link(&format!("{proc}/root"))?;
        let prefix = prefix.trim_end_matches('/');
        let raw = read_path(&mem, address)?;
        let (base, path) = if flags & libc::AT_EMPTY_PATH != 0 && raw.is_empty() {
            // fexecve: the descriptor's file. A deleted or anonymous one (memfd) has no
            // name a policy could list.
            let target = link(&format!("{proc}/fd/{dirfd}"))?;
            if !target.starts_with('/') || target.ends_with(" (deleted)") {
                return Ok(Verdict::Deny(Errno::EPERM));
            }
            ("/".to_string(), within(prefix, &target)?)
        } else if raw.starts_with('/') {
            ("/".to_string(), raw)
        } else if dirfd == libc::AT_FDCWD {
            (within(prefix, &link(&format!("{proc}/cwd"))?)?, raw)
        } else {
            (within(prefix, &link(&format!("{proc}/fd/{dirfd}"))?)?, raw)
        };
        let mut fs = ProcRoot {
            root: &root,
            tid: n.tid,
            ns: None,
        };
        let resolved = resolve(&mut fs, &base, &path)?;
        let full = |p: &str| format!("{prefix}{p}");
        if self.allow.is_match(&full(&resolved.path)) || self.allow.is_match(&full(&resolved.named))
        {
            Ok(Verdict::Allow)
        } else if resolved.exists {
            Ok(Verdict::Deny(Errno::EPERM))
        } else {
            Ok(Verdict::Deny(Errno::ENOENT))
        }
    }

    /// What the gate did, for the supervisor's log: execs allowed and denied, the mean and
    /// longest time a decision took.
    pub fn summary(&self) -> String {
        let n = (self.allowed + self.denied).max(1);
        format!(
            "{} execs allowed, {} denied; a decision took {:.1} µs on average, {:.1} µs at most",
            self.allowed,
            self.denied,
            self.busy.as_secs_f64() * 1e6 / n as f64,
            self.slowest.as_secs_f64() * 1e6
        )
    }
}

/// Waits until the container's child has `execve`d (its error pipe closes with nothing
/// written) or failed (the message), serving the gate meanwhile: the child's own `execve`
/// is the first exec the gate decides.
pub fn wait_started(fail: &OwnedFd, gate: &mut Gate) -> String {
    let mut message = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = vec![PollFd::new(fail.as_fd(), PollFlags::POLLIN)];
        fds.extend(gate.poll_fds());
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return format!("poll: {e}"),
        }
        let revents: Vec<Option<PollFlags>> = fds.iter().map(PollFd::revents).collect();
        drop(fds);
        gate.handle(&revents[1..]);
        if revents[0].is_some_and(|r| !r.is_empty()) {
            match nix::unistd::read(fail, &mut buf) {
                Ok(0) => break,
                Ok(n) => message.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return format!("read the start result: {e}"),
            }
        }
    }
    String::from_utf8_lossy(&message).into_owned()
}

/// Whether `fd` is a seccomp listener (what `warren exec` helpers may hand over).
fn is_listener(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:seccomp notify")
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A `/proc` link's target as UTF-8.
fn link(path: &str) -> Result<String, Errno> {
    let target = std::fs::read_link(path).map_err(io_errno)?;
    target
        .into_os_string()
        .into_string()
        .map_err(|_| Errno::EPERM)
}

/// `path` (from a `/proc` link, relative to the sandbox's root) as seen from a caller whose
/// root is `prefix`; a path outside it cannot be named by the caller.
fn within(prefix: &str, path: &str) -> Result<String, Errno> {
    if prefix.is_empty() {
        return Ok(path.to_string());
    }
    match path.strip_prefix(prefix) {
        Some("") => Ok("/".to_string()),
        Some(rest) if rest.starts_with('/') => Ok(rest.to_string()),
        _ => Err(Errno::EPERM),
    }
}

/// Reads the NUL-terminated path at `address` of the caller's memory, page by page (a path
/// may end just before an unmapped page).
fn read_path(mem: &std::fs::File, address: u64) -> Result<String, Errno> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = address;
    while out.len() < PATH_MAX {
        let chunk = (PAGE - at % PAGE).min((PATH_MAX - out.len()) as u64) as usize;
        let mut buf = [0u8; PAGE as usize];
        let n = match mem.read_at(&mut buf[..chunk], at) {
            Ok(0) | Err(_) => return Err(Errno::EFAULT),
            Ok(n) => n,
        };
        if let Some(end) = buf[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..end]);
            return String::from_utf8(out).map_err(|_| Errno::EPERM);
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    Err(Errno::ENAMETOOLONG)
}

/// The caller's root, through `/proc/TID/root`.
struct ProcRoot<'a> {
    root: &'a OwnedFd,
    tid: i32,
    /// The caller's thread-group id and thread id in its own pid namespace, read once.
    ns: Option<(String, String)>,
}

impl ProcRoot<'_> {
    /// `NStgid` and `NSpid`, innermost: the ids the sandbox's `/proc` shows.
    fn ns_ids(&mut self) -> Result<(String, String), Errno> {
        if let Some(ids) = &self.ns {
            return Ok(ids.clone());
        }
        let mut status = String::new();
        std::fs::File::open(format!("/proc/{}/status", self.tid))
            .and_then(|mut f| f.read_to_string(&mut status))
            .map_err(io_errno)?;
        let last = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().last())
                .map(str::to_string)
        };
        let ids = last("NStgid:").zip(last("NSpid:")).ok_or(Errno::EPERM)?;
        self.ns = Some(ids.clone());
        Ok(ids)
    }
}

impl Lookup for ProcRoot<'_> {
    fn node(&mut self, path: &str) -> Result<Node, Errno> {
        let fd = match sys::open_in_root(self.root.as_fd(), path.trim_start_matches('/')) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Node::Missing),
            Err(e) => return Err(e),
        };
        let st = nix::sys::stat::fstat(&fd)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Ok(Node::Dir),
            libc::S_IFLNK => {
                // /proc/self and /proc/thread-self answer for whoever reads them, and the
                // supervisor is outside the sandbox's pid namespace: use the caller's ids.
                let name = path.rsplit('/').next().unwrap_or_default();
                if (name == "self" || name == "thread-self")
                    && nix::sys::statfs::fstatfs(&fd)
                        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC)
                {
                    let (tgid, tid) = self.ns_ids()?;
                    return Ok(Node::Link(if name == "self" {
                        tgid
                    } else {
                        format!("{tgid}/task/{tid}")
                    }));
                }
                let target = nix::fcntl::readlinkat(&fd, "")?;
                target
                    .into_string()
                    .map(Node::Link)
                    .map_err(|_| Errno::EPERM)
            }
            _ => Ok(Node::File),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_are_taken_into_a_chrooted_callers_root() {
        assert_eq!(within("", "/tmp/x").unwrap(), "/tmp/x");
        assert_eq!(within("/jail", "/jail/bin").unwrap(), "/bin");
        assert_eq!(within("/jail", "/jail").unwrap(), "/");
        // Outside the caller's root, or a sibling that only shares the prefix's letters.
        assert_eq!(within("/jail", "/tmp"), Err(Errno::EPERM));
        assert_eq!(within("/jail", "/jailbreak/x"), Err(Errno::EPERM));
    }

    #[test]
    fn bad_globs_are_refused_naming_the_field() {
        let e = Gate::new(&["/bin/*".to_string(), "[x".to_string()]).unwrap_err();
        assert!(e.contains("policy.exec.allow[1]"), "{e}");
    }
}
