//! The host's end of the guest's channel: a tonic client over the unix socket qemu bound
//! for the VM's virtio-serial port.
//!
//! qemu accepts one connection on that socket at a time, so a VM has one `Channel` (HTTP/2
//! multiplexes every call over it). Bytes written before the guest opened its port wait in
//! the socket, so the client can connect as soon as qemu runs and the first answer comes
//! when the guest is up. If the connection breaks, tonic reconnects on the next call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint, Uri};
use warren_guest::proto::guest_client::GuestClient;

pub type Client = GuestClient<Channel>;

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

/// A client whose calls go over the socket at `path` (connected lazily, reconnected when
/// broken).
pub fn client(path: &Path) -> Result<Client, ChannelError> {
    let socket: PathBuf = path.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let socket = socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(socket).await?;
            let stream = greet(stream).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_static("http://guest").connect_with_connector_lazy(connector);
    Ok(GuestClient::new(channel).max_decoding_message_size(64 << 20))
}

/// A guest that answered its first ping.
#[derive(Debug)]
pub struct Ready {
    pub client: Client,
    /// It takes a seed in `Start` ([`warren_guest::FEATURE_START_SEEDS`]): a clone's
    /// `Prepare` can be folded into its `Start`.
    pub start_seeds: bool,
    /// It applies `Start`'s `storage_bytes` ([`warren_guest::FEATURE_STORAGE_LIMIT`]).
    pub storage_limit: bool,
}

/// Connects and waits until the guest answers a ping, for at most `patience`; `alive` says
/// whether the VM still runs (a VM that died ends the wait at once).
pub async fn ready(
    path: &Path,
    patience: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<Ready, ChannelError> {
    let display = path.display().to_string();
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline && alive() {
        if !path.exists() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let mut c = client(path)?;
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
                    start_seeds: has(warren_guest::FEATURE_START_SEEDS),
                    storage_limit: has(warren_guest::FEATURE_STORAGE_LIMIT),
                });
            }
            Ok(Err(status)) => {
                tracing::debug!(
                    "vm: the guest at {} did not answer yet: {status}",
                    path.display()
                );
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
