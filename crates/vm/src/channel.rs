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
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_static("http://guest").connect_with_connector_lazy(connector);
    Ok(GuestClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Connects and waits until the guest answers a ping, for at most `patience`; `alive` says
/// whether the VM still runs (a VM that died ends the wait at once).
pub async fn ready(
    path: &Path,
    patience: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<Client, ChannelError> {
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
                return Ok(c);
            }
            Ok(Err(status)) => {
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
