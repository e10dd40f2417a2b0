//! The vm backend's raw system calls: watching a qemu this server did not start (after a
//! restart) through a pidfd.

use std::os::fd::{FromRawFd, OwnedFd};

/// A descriptor that polls readable once process `pid` has ended.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd registered with tokio's reactor: it polls readable once the process ended.
pub fn watch_pidfd(pidfd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the pidfd, so nothing else can close or replace it while it is
    // registered.
    #[allow(unsafe_code)]
    unsafe {
        tokio::io::unix::AsyncFd::register(pidfd).map_err(std::io::Error::from)
    }
}

/// Starts `cmd`'s process with transparent huge pages off (`PR_SET_THP_DISABLE`, kept across
/// exec). qemu asks for huge pages on its TCG translation buffer (64 MiB here), so every
/// 2 MiB of it a clone touches would be resident in full: 2–3 MB more per clone, measured.
/// Best effort: a kernel that refuses leaves the process as it was.
pub fn without_huge_pages(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and makes one prctl
    // system call on plain integers: no allocation, no lock.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
            Ok(())
        });
    }
}
