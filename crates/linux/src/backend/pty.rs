//! Terminals for `warren exec -t`, made inside the container.

use super::*;

/// A pseudo-terminal from the container's own devpts (`/proc/PID/root/dev/pts/ptmx`), so
/// the process inside sees `/dev/pts/N` of its own `/dev` (`tty` and `ttyname` work); the
/// slave side comes from the master with TIOCGPTPEER, never through a path.
pub(super) struct Pty {
    pub(super) master: OwnedFd,
    pub(super) slave: OwnedFd,
}

pub(super) fn container_pty(pid: i32, size: &nix::pty::Winsize) -> std::io::Result<Pty> {
    use std::os::fd::AsRawFd;
    let ptmx = format!("/proc/{pid}/root/dev/pts/ptmx");
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&ptmx)?
        .into();
    let fd = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int we own; TIOCSWINSZ reads a winsize we own;
    // TIOCGPTPEER returns a new descriptor (or -1) that we take ownership of below.
    #[allow(unsafe_code)]
    let peer = unsafe {
        if libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) < 0
            || libc::ioctl(fd, libc::TIOCSWINSZ, size) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        libc::ioctl(
            fd,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if peer < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    let slave = unsafe { OwnedFd::from_raw_fd(peer) };
    Ok(Pty { master, slave })
}

pub(super) type BoxRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub(super) type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

pub(super) fn set_window_size(master: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own from a descriptor we own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(master),
            libc::TIOCSWINSZ,
            &size,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
