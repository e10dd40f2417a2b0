//! The virtio-serial port to the host as a sequence of connections.
//!
//! The port is one byte stream that outlives any one host: qemu's side is a unix socket,
//! and the host (warren's server) connects, disconnects when it stops, and connects again
//! after a restart. The guest sees that as `POLLHUP` on the port while no host is connected
//! (reads then return end of file). So the guest keeps the port open for its whole life and
//! hands tonic one [`Connection`] per host connection: it waits until no hang-up is
//! reported, serves until end of file, and waits for the next host.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// How often a guest without a host looks for one. A clone restored from a snapshot waits in
/// this loop, so this is the most its first answer can be late.
const HOST_POLL: Duration = Duration::from_millis(2);

/// The port's device node, by its name in sysfs (`/sys/class/virtio-ports/vportNpM/name`).
pub fn find(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if named.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Opens the port, retrying while the device is not there yet or answers ENXIO (both happen
/// while the virtio drivers are still probing at boot).
pub async fn open(name: &str, patience: Duration) -> std::io::Result<Port> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let attempt = match find(name) {
            Some(path) => nix::fcntl::open(
                &path,
                nix::fcntl::OFlag::O_RDWR
                    | nix::fcntl::OFlag::O_NONBLOCK
                    | nix::fcntl::OFlag::O_CLOEXEC
                    | nix::fcntl::OFlag::O_NOCTTY,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(std::io::Error::from),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        match attempt {
            Ok(fd) => {
                return Ok(Port {
                    fd: Arc::new(crate::sys::async_fd(fd)?),
                });
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("virtio-serial port {name}: {e}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Port {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl Port {
    /// Returns once a host is connected to the other end.
    pub async fn host_connected(&self) {
        loop {
            let mut fds = [nix::poll::PollFd::new(
                self.fd.get_ref().as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let hung_up = match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
                Ok(_) => fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP)),
                Err(_) => true,
            };
            if !hung_up {
                return;
            }
            tokio::time::sleep(HOST_POLL).await;
        }
    }

    /// One host connection over the port; `closed` fires when tonic is done with it. Each
    /// connection registers its own duplicate of the port with the reactor: a registration
    /// that saw a host hang up keeps reporting "closed", which must not leak into the next.
    pub fn connection(&self) -> std::io::Result<(Connection, oneshot::Receiver<()>)> {
        let (tx, rx) = oneshot::channel();
        let fd = self.fd.get_ref().try_clone()?;
        Ok((
            Connection {
                io: Fd(Arc::new(crate::sys::async_fd(fd)?)),
                _closed: tx,
            },
            rx,
        ))
    }
}

/// Waits for the host's greeting on a new connection (skipping what an earlier host left in
/// the stream) and answers it; then the connection is HTTP/2's.
pub async fn greet(conn: &mut Connection) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let mut skipped = 0usize;
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((_, nonce)) = warren_guest::find_hello(&buf, warren_guest::HOST_HELLO) {
            let mut reply = warren_guest::GUEST_HELLO.to_vec();
            reply.extend_from_slice(nonce);
            reply.push(b'\n');
            return conn.write_all(&reply).await;
        }
        let drop = warren_guest::droppable(&buf, warren_guest::HOST_HELLO);
        buf.drain(..drop);
        skipped += drop;
        if skipped > warren_guest::MAX_STALE {
            return Err(std::io::Error::other("no greeting in 16 MiB"));
        }
    }
}

/// The port as tonic's IO for one connection.
#[derive(Debug)]
pub struct Connection {
    io: Fd,
    /// Dropped with the connection, which tells the accept loop to wait for the next host.
    _closed: oneshot::Sender<()>,
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A non-blocking descriptor (the port, a terminal's master side) as tokio IO. Shared, so a
/// reader and a writer can hold the same descriptor. `EIO` reads as end of file: a
/// terminal's master reports it once the last process on the slave side is gone.
#[derive(Debug, Clone)]
pub struct Fd(pub Arc<AsyncFd<OwnedFd>>);

impl Fd {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> std::io::Result<Fd> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Fd(Arc::new(crate::sys::async_fd(fd)?)))
    }
}

impl AsyncRead for Fd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            // A hang-up stays in the readiness: nothing to read now then means the end (else
            // this would spin on EAGAIN).
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), unfilled).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Fd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) if closed => {
                    return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
