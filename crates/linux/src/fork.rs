//! Forking a container's init straight into its cgroup.
//!
//! A process moved into a cgroup by a write to `cgroup.procs` is *migrated*: the kernel takes
//! the cgroup threadgroup lock for writing, which on most kernels waits for an RCU grace period
//! (milliseconds on a busy host; the p99 of a cold start, docs/PERFORMANCE.md). On a cgroup v2
//! host `clone3(CLONE_INTO_CGROUP)` (Linux 5.7) makes the child in its cgroup instead: nothing
//! to migrate. runc (Go's `UseCgroupFD`) and crun do the same.
//!
//! v1 hierarchies have no such flag: there the child joins by writing `cgroup.procs`, as it
//! always did, and so it does on v2 when `clone3` is refused (a kernel before 5.7, a seccomp
//! profile around the server that denies it).

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::unistd::{ForkResult, Pid};

/// `CLONE_INTO_CGROUP` (libc's constant overflows its `c_int`).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What [`fork_into`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// This is the child; `in_cgroup`: it was born in the cgroup and must not join it again.
    Child {
        in_cgroup: bool,
    },
    Parent {
        child: Pid,
    },
}

/// Forks, the child in the cgroup v2 directory `cgroup` if one is given and the kernel
/// allows it (else as `fork`: the child joins by itself).
///
/// # Safety
///
/// As `fork(2)`: in a multi-threaded process the child may only call async-signal-safe
/// functions until it `execve`s or `_exit`s. Unlike glibc's `fork` no `pthread_atfork`
/// handlers run; the callers (the supervisor) register none and are single-threaded.
#[allow(unsafe_code)]
pub unsafe fn fork_into(cgroup: Option<BorrowedFd<'_>>) -> Result<Forked, Errno> {
    if let Some(dir) = cgroup
        && let Some(forked) = clone_into(dir)
    {
        return Ok(forked);
    }
    // SAFETY: the caller's contract, as above.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => Ok(Forked::Child { in_cgroup: false }),
        ForkResult::Parent { child } => Ok(Forked::Parent { child }),
    }
}

/// `clone3` with `CLONE_INTO_CGROUP`; `None` when the kernel refused it (the caller forks).
#[cfg(all(
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[allow(unsafe_code)]
fn clone_into(dir: BorrowedFd<'_>) -> Option<Forked> {
    // SAFETY: clone_args is plain integers; all zero is "no flags, no stack" (a fork).
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = dir.as_raw_fd() as u64;
    // SAFETY: without CLONE_VM the child gets a copy of the address space and returns here
    // with 0, as from fork; `args` outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match ret {
        0 => Some(Forked::Child { in_cgroup: true }),
        pid if pid > 0 => Some(Forked::Parent {
            child: Pid::from_raw(pid as i32),
        }),
        _ => None,
    }
}

#[cfg(not(all(
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn clone_into(_dir: BorrowedFd<'_>) -> Option<Forked> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupLayout;
    use std::os::fd::AsFd;

    #[test]
    fn a_child_is_born_in_the_v2_cgroup_it_is_given() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: making a cgroup needs root");
            return;
        }
        let Some(mount) = CgroupLayout::cgroup2_mount() else {
            eprintln!("SKIP: no cgroup2 hierarchy is mounted here");
            return;
        };
        let name = format!("warren-fork-test-{}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).unwrap();
        struct Remove(std::path::PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                // The child ends once the pipe's last writer is gone (on a panic too).
                for _ in 0..100 {
                    if std::fs::remove_dir(&self.0).is_ok() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        let _remove = Remove(dir.clone());
        let fd = std::fs::File::open(&dir).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child (of a multi-threaded test process) only reads a pipe and _exits.
        #[allow(unsafe_code)]
        let forked = unsafe { fork_into(Some(fd.as_fd())) }.unwrap();
        let child = match forked {
            Forked::Child { in_cgroup } => {
                let mut byte = [0u8; 1];
                // SAFETY: async-signal-safe calls only.
                #[allow(unsafe_code)]
                unsafe {
                    libc::close(w.as_raw_fd());
                    libc::read(r.as_raw_fd(), byte.as_mut_ptr().cast(), 1);
                    libc::_exit(if in_cgroup { 0 } else { 3 })
                }
            }
            Forked::Parent { child } => child,
        };
        drop(r);
        let cgroup = std::fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        drop(w);
        let status = nix::sys::wait::waitpid(child, None).unwrap();
        assert!(
            cgroup.lines().any(|l| l == format!("0::/{name}")),
            "{cgroup}"
        );
        assert_eq!(procs.trim(), child.to_string());
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(child, 0),
            "exit 3: the child was forked, not cloned into the cgroup"
        );
    }

    #[test]
    fn without_a_cgroup_it_is_a_fork() {
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let forked = unsafe { fork_into(None) }.unwrap();
        match forked {
            Forked::Child { in_cgroup } => {
                // SAFETY: _exit is async-signal-safe.
                #[allow(unsafe_code)]
                unsafe {
                    libc::_exit(if in_cgroup { 3 } else { 0 })
                }
            }
            Forked::Parent { child } => {
                drop((r, w));
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
