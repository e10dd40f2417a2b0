//! The host's end of the guest's channel: a tonic client over one of the VM's channels
//! ([`Address`]).
//!
//! On the virtio-serial port, qemu accepts one connection on its unix socket at a time, so a
//! VM has one `Channel` (HTTP/2 multiplexes every call over it). Bytes written before the
//! guest opened its port wait in the socket, so the client can connect as soon as qemu runs
//! and the first answer comes when the guest is up. Over vsock each connection is the
//! guest's own, and one that the guest does not listen for yet is refused (and tried again).
//! If the connection breaks, tonic reconnects on the next call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint, Uri};
use warren_guest::proto::guest_client::GuestClient;

pub type Client = GuestClient<Channel>;

/// Where the host reaches a VM's guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Address {
    /// qemu's unix socket for the virtio-serial port (greeted: see [`warren_guest::hello`]).
    Serial { path: PathBuf },
    /// The vhost-user vsock device's unix socket: `CONNECT <port>\n`, answered `OK ...\n`,
    /// then the byte stream to the guest's port (Firecracker's hybrid vsock).
    HybridVsock { path: PathBuf, port: u32 },
    /// The guest's CID and port over the host kernel's vsock.
    Vsock { cid: u32, port: u32 },
}

impl Address {
    /// The address of the guest of the VM in `dir` whose qemu command line has `channel`.
    pub fn of(dir: &Path, channel: crate::config::ChannelKind, cid: u32) -> Address {
        use crate::config::ChannelKind;
        match channel {
            ChannelKind::Serial => Address::Serial {
                path: dir.join(crate::qemu::CHANNEL_SOCKET),
            },
            ChannelKind::VhostUserVsock => Address::HybridVsock {
                path: dir.join(crate::qemu::VSOCK_SOCKET),
                port: warren_guest::VSOCK_PORT,
            },
            ChannelKind::Vsock => Address::Vsock {
                cid,
                port: warren_guest::VSOCK_PORT,
            },
        }
    }

    /// The unix socket to connect to, if the address is one.
    fn socket(&self) -> Option<&Path> {
        match self {
            Address::Serial { path } | Address::HybridVsock { path, .. } => Some(path),
            Address::Vsock { .. } => None,
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Serial { path } => write!(f, "{}", path.display()),
            Address::HybridVsock { path, port } => write!(f, "{} port {port}", path.display()),
            Address::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("connect to the guest at {path}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the guest at {path} did not answer within {patience:?}{}", if last.is_empty() { String::new() } else { format!(" (last: {last})") })]
    NoAnswer {
        path: String,
        patience: Duration,
        last: String,
    },
    #[error(
        "the guest at {path} runs warren-guest {found}, this server needs {wanted}: rebuild the initramfs (scripts/vm-assets.sh)"
    )]
    Version {
        path: String,
        found: String,
        wanted: String,
    },
}

/// Where a client's connections go: shared with the client, so that a VM whose directory
/// moved (a pool clone handed out to its sandbox) is reconnected at its new place.
#[derive(Debug, Clone)]
pub struct Target(std::sync::Arc<std::sync::RwLock<Address>>);

impl Target {
    pub fn new(address: Address) -> Target {
        Target(std::sync::Arc::new(std::sync::RwLock::new(address)))
    }

    pub fn get(&self) -> Address {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The next connection (the client's connection, once it breaks) goes to `address`.
    pub fn set(&self, address: Address) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = address;
    }
}

/// A client whose calls go to `address` (connected lazily, reconnected when broken).
pub fn client(address: &Address) -> Result<Client, ChannelError> {
    Ok(client_to(Target::new(address.clone())))
}

/// A client whose calls go to wherever `target` says when it connects.
pub fn client_to(target: Target) -> Client {
    let connector = tower::service_fn(move |_: Uri| {
        let address = target.get();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(connect(address).await?)) }
    });
    let channel = Endpoint::from_static("http://guest").connect_with_connector_lazy(connector);
    GuestClient::new(channel).max_decoding_message_size(64 << 20)
}

/// One connection to the guest at `address`, past its greeting or `CONNECT`.
async fn connect(address: Address) -> std::io::Result<Io> {
    Ok(match address {
        Address::Serial { path } => {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Io::Unix(greet(stream).await?)
        }
        Address::HybridVsock { path, port } => {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Io::Unix(hybrid_connect(stream, port).await?)
        }
        Address::Vsock { cid, port } => Io::Vsock(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, port)).await?,
        ),
    })
}

/// Asks the vhost-user vsock device for a connection to the guest's `port`
/// (`CONNECT <port>\n`); the device answers `OK <host port>\n` once the guest accepted.
/// Bytes after that line are the guest's and are kept.
async fn hybrid_connect(mut stream: tokio::net::UnixStream, port: u32) -> std::io::Result<Greeted> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // The device closes the connection when the guest does not listen (yet).
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("the guest refused vsock port {port}"),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            if !line.starts_with("OK ") {
                return Err(std::io::Error::other(format!(
                    "the vsock device answered {:?} to CONNECT {port}",
                    line.chars().take(80).collect::<String>()
                )));
            }
            return Ok(Greeted {
                leftover: buf.split_off(end + 1),
                stream,
            });
        }
        if buf.len() > 128 {
            return Err(std::io::Error::other(
                "the vsock device's answer to CONNECT has no end of line",
            ));
        }
    }
}

/// A guest that answered its first ping.
#[derive(Debug)]
pub struct Ready {
    pub client: Client,
    /// Where the client connects (see [`Target`]).
    pub target: Target,
    /// It takes a seed in `Start` ([`warren_guest::FEATURE_START_SEEDS`]): a clone's
    /// `Prepare` can be folded into its `Start`.
    pub start_seeds: bool,
    /// It applies `Start`'s `storage_bytes` ([`warren_guest::FEATURE_STORAGE_LIMIT`]).
    pub storage_limit: bool,
}

/// Connects and waits until the guest answers a ping, for at most `patience`; `alive` says
/// whether the VM still runs (a VM that died ends the wait at once).
pub async fn ready(
    address: &Address,
    patience: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<Ready, ChannelError> {
    let display = address.to_string();
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline && alive() {
        if address.socket().is_some_and(|path| !path.exists()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let target = Target::new(address.clone());
        let mut c = client_to(target.clone());
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining, c.ping(warren_guest::proto::PingRequest {})).await {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                if reply.version != warren_guest::VERSION {
                    return Err(ChannelError::Version {
                        path: display,
                        found: reply.version,
                        wanted: warren_guest::VERSION.to_string(),
                    });
                }
                let has = |feature: &str| reply.features.iter().any(|f| f == feature);
                return Ok(Ready {
                    client: c,
                    target,
                    start_seeds: has(warren_guest::FEATURE_START_SEEDS),
                    storage_limit: has(warren_guest::FEATURE_STORAGE_LIMIT),
                });
            }
            Ok(Err(status)) => {
                tracing::debug!("vm: the guest at {address} did not answer yet: {status}");
                last = status.message().to_string();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => break,
        }
    }
    Err(ChannelError::NoAnswer {
        path: display,
        patience,
        last,
    })
}

/// Greets the guest on a new connection (see [`warren_guest::HOST_HELLO`]) and skips what
/// came before its answer: bytes an earlier connection left in the port. What follows the
/// answer (the guest's HTTP/2 preface) is kept for tonic.
async fn greet(mut stream: tokio::net::UnixStream) -> std::io::Result<Greeted> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let nonce: String = {
        let mut bytes = [0u8; warren_guest::NONCE_LEN / 2];
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut hello = warren_guest::HOST_HELLO.to_vec();
    hello.extend_from_slice(nonce.as_bytes());
    hello.push(b'\n');
    stream.write_all(&hello).await?;
    tracing::debug!("vm: greeted the guest");
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut skipped = 0usize;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        // An answer to an earlier greeting (another nonce) is stale too: look past it.
        while let Some((end, found)) = warren_guest::find_hello(&buf, warren_guest::GUEST_HELLO) {
            tracing::debug!(skipped, "vm: a guest greeting");
            if found == nonce.as_bytes() {
                return Ok(Greeted {
                    leftover: buf.split_off(end),
                    stream,
                });
            }
            buf.drain(..end);
        }
        let drop = warren_guest::droppable(&buf, warren_guest::GUEST_HELLO);
        buf.drain(..drop);
        skipped += drop;
        if skipped > warren_guest::MAX_STALE {
            return Err(std::io::Error::other(
                "the guest did not answer the greeting within 16 MiB",
            ));
        }
    }
}

/// A greeted connection: the bytes read past the greeting, then the socket.
#[derive(Debug)]
struct Greeted {
    leftover: Vec<u8>,
    stream: tokio::net::UnixStream,
}

impl tokio::io::AsyncRead for Greeted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.remaining());
            buf.put_slice(&self.leftover[..n]);
            self.leftover.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Greeted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One connection's byte stream: a unix socket's (greeted, or past `CONNECT`) or an
/// `AF_VSOCK` socket's.
#[derive(Debug)]
enum Io {
    Unix(Greeted),
    Vsock(tokio_vsock::VsockStream),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Vsock(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_write(cx, data),
            Io::Vsock(s) => std::pin::Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Vsock(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Vsock(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A stand-in for the vsock device: reads the request line, answers `answer`.
    async fn device(
        answer: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while s.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            s.write_all(answer).await.unwrap();
            String::from_utf8(line).unwrap()
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn hybrid_vsock_connects_and_keeps_what_follows_the_answer() {
        let (_dir, path, task) = device(b"OK 1073741824\nguest bytes").await;
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut greeted = hybrid_connect(stream, 1024).await.unwrap();
        assert_eq!(task.await.unwrap(), "CONNECT 1024");
        let mut rest = Vec::new();
        greeted.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"guest bytes");
    }

    #[tokio::test]
    async fn a_targets_next_connection_goes_where_it_was_moved() {
        let (_dir, path, task) = device(b"OK 5\n").await;
        let target = Target::new(Address::HybridVsock {
            path: path.with_file_name("gone.sock"),
            port: 1024,
        });
        let err = connect(target.get()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        let shared = target.clone();
        shared.set(Address::HybridVsock { path, port: 1024 });
        assert!(connect(target.get()).await.is_ok());
        assert_eq!(task.await.unwrap(), "CONNECT 1024");
    }

    #[tokio::test]
    async fn hybrid_vsock_refusals_are_errors() {
        let (_dir, path, _task) = device(b"").await;
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let err = hybrid_connect(stream, 1024).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(err.to_string().contains("port 1024"), "{err}");

        let (_dir, path, _task) = device(b"NOPE\n").await;
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let err = hybrid_connect(stream, 1024).await.unwrap_err();
        assert!(err.to_string().contains("answered \"NOPE\""), "{err}");
    }
}
