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

/// The input side of a terminal's master. Its shutdown (the client closed stdin) is the
/// terminal's end of file: the EOF character (`c_cc[VEOF]`, ^D unless changed), written
/// twice when the last line sent is unfinished (the first only hands that line over), as a
/// user ends input at a terminal. A pipe would give end of file; a terminal has no such
/// state, and without this `cat` on a terminal would wait for ever.
pub(super) struct PtyInput {
    file: tokio::fs::File,
    /// The master, for the terminal's settings.
    master: OwnedFd,
    /// The last byte written, to tell an unfinished line.
    last: Option<u8>,
    /// EOF characters still to write once shutdown begins (`None`: not begun).
    eof_left: Option<Vec<u8>>,
}

impl PtyInput {
    pub(super) fn new(file: tokio::fs::File, master: OwnedFd) -> PtyInput {
        PtyInput {
            file,
            master,
            last: None,
            eof_left: None,
        }
    }

    /// What ends input now: VEOF once, or twice after an unfinished line.
    fn eof_bytes(&self) -> Vec<u8> {
        let eof = nix::sys::termios::tcgetattr(&self.master)
            .map(|t| t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize])
            .ok()
            .filter(|&c| c != 0)
            .unwrap_or(4);
        let unfinished = self
            .last
            .is_some_and(|b| b != b'\n' && b != b'\r' && b != eof);
        vec![eof; if unfinished { 2 } else { 1 }]
    }
}

impl tokio::io::AsyncWrite for PtyInput {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.file).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &written
            && *n > 0
        {
            this.last = Some(buf[*n - 1]);
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.eof_left.is_none() {
            // What was written reaches the terminal before its end.
            std::task::ready!(std::pin::Pin::new(&mut this.file).poll_flush(cx))?;
            this.eof_left = Some(this.eof_bytes());
        }
        while let Some(left) = this.eof_left.as_mut().filter(|l| !l.is_empty()) {
            let n = std::task::ready!(std::pin::Pin::new(&mut this.file).poll_write(cx, left))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            left.drain(..n);
        }
        std::pin::Pin::new(&mut this.file).poll_flush(cx)
    }
}
