//! Connecting to a warren server over a unix socket or TCP, with the bearer token, and to
//! the leader among several servers on one etcd ([`connect_leader`], [`Failover`]): a
//! standby answers UNAVAILABLE with the leader's address in `warren-leader` metadata, which
//! the client follows; idempotent calls are retried on the new leader after a fail-over.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use warren_proto::v1::sandboxes_client::SandboxesClient;

use crate::address::Address;
use crate::socket::ClientStream;

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = SandboxesClient<InterceptedService<Channel, Bearer>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "cannot reach the warren server at {address} (is `warren server` running? set --server or WARREN_SERVER)"
    )]
    Unreachable {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token is not a valid header value (printable ASCII, spaces only between words)")]
    BadToken,
    #[error("no warren server leads among {tried}")]
    NoLeader { tried: String },
}

/// Opens one HTTP/2 connection to the server; calls on it are multiplexed.
pub async fn connect(address: &Address, token: Option<&str>) -> Result<Client, ConnectError> {
    let (channel, bearer) = connect_channel(address, token).await?;
    Ok(SandboxesClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20))
}

pub type ImagesClient =
    warren_proto::v1::images_client::ImagesClient<InterceptedService<Channel, Bearer>>;

/// A client of the server's image store.
pub async fn connect_images(
    address: &Address,
    token: Option<&str>,
) -> Result<ImagesClient, ConnectError> {
    let (channel, bearer) = connect_channel(address, token).await?;
    Ok(warren_proto::v1::images_client::ImagesClient::with_interceptor(channel, bearer))
}

pub type PoliciesClient =
    warren_proto::v1::policies_client::PoliciesClient<InterceptedService<Channel, Bearer>>;

/// A client of the server's policies.
pub async fn connect_policies(
    address: &Address,
    token: Option<&str>,
) -> Result<PoliciesClient, ConnectError> {
    let (channel, bearer) = connect_channel(address, token).await?;
    Ok(warren_proto::v1::policies_client::PoliciesClient::with_interceptor(channel, bearer))
}

pub type CheckpointsClient =
    warren_proto::v1::checkpoints_client::CheckpointsClient<InterceptedService<Channel, Bearer>>;

/// A client of the server's checkpoints.
pub async fn connect_checkpoints(
    address: &Address,
    token: Option<&str>,
) -> Result<CheckpointsClient, ConnectError> {
    let (channel, bearer) = connect_channel(address, token).await?;
    Ok(warren_proto::v1::checkpoints_client::CheckpointsClient::with_interceptor(channel, bearer))
}

async fn connect_channel(
    address: &Address,
    token: Option<&str>,
) -> Result<(Channel, Bearer), ConnectError> {
    let unreachable = |source| ConnectError::Unreachable {
        address: address.to_string(),
        source,
    };
    // Both kinds through a connector of warren's, whose writes raise no SIGPIPE
    // (crate::socket). The URI names the server in requests; the connector dials it.
    let (uri, address) = match address {
        Address::Tcp(hp) => (format!("http://{hp}"), address.clone()),
        Address::Unix(_) => ("http://warren.local".to_string(), address.clone()),
    };
    let channel = Endpoint::from_shared(uri)
        .map_err(unreachable)?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let address = address.clone();
            async move {
                let stream = match address {
                    Address::Tcp(hp) => {
                        let stream = tokio::net::TcpStream::connect(hp.as_str()).await?;
                        stream.set_nodelay(true)?;
                        ClientStream::Tcp(stream)
                    }
                    Address::Unix(path) => {
                        ClientStream::Unix(tokio::net::UnixStream::connect(path).await?)
                    }
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(unreachable)?;
    // An empty token (`WARREN_TOKEN=` in a unit file) is no token, as it always was.
    let bearer = match token.filter(|t| !t.is_empty()) {
        // A header takes bytes above ASCII too, but the server would never match them.
        Some(t) if !valid_token(t) => return Err(ConnectError::BadToken),
        Some(t) => Bearer(Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ConnectError::BadToken)?,
        )),
        None => Bearer(None),
    };
    Ok((channel, bearer))
}

pub type NodesClient =
    warren_proto::v1::nodes_client::NodesClient<InterceptedService<Channel, Bearer>>;

/// A client of the server's node registry (agents heartbeat through it; `warren nodes`).
pub async fn connect_nodes(
    address: &Address,
    token: Option<&str>,
) -> Result<NodesClient, ConnectError> {
    let (channel, bearer) = connect_channel(address, token).await?;
    Ok(warren_proto::v1::nodes_client::NodesClient::with_interceptor(channel, bearer))
}

pub type PoolsClient =
    warren_proto::v1::pools_client::PoolsClient<InterceptedService<Channel, Bearer>>;

/// A client of the server's pools.
pub async fn connect_pools(
    address: &Address,
    token: Option<&str>,
) -> Result<PoolsClient, ConnectError> {
    let (channel, bearer) = connect_channel(address, token).await?;
    Ok(warren_proto::v1::pools_client::PoolsClient::with_interceptor(channel, bearer))
}

/// `--server` / `WARREN_SERVER`: one address or several, comma-separated (replicas on one
/// etcd; the leader among them is found by [`connect_leader`]).
pub fn parse_servers(s: &str) -> Result<Vec<Address>, String> {
    let list: Vec<Address> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(format!("{s:?} names no server"));
    }
    Ok(list)
}

/// The leader's address a standby named in its refusal, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<Address> {
    status
        .metadata()
        .get(crate::server::LEADER_METADATA)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Connects to the server that leads among `addresses`: each in order is asked for its
/// info; a standby's answer names the leader, which is tried next. A server that answers
/// anything but UNAVAILABLE is taken (its answer to the real call says the rest, e.g. a
/// wrong token).
pub async fn connect_leader(
    addresses: &[Address],
    token: Option<&str>,
) -> Result<(Client, Address), ConnectError> {
    let mut queue: VecDeque<Address> = addresses.iter().cloned().collect();
    let mut tried: Vec<Address> = Vec::new();
    let mut why = Vec::new();
    while let Some(address) = queue.pop_front() {
        if tried.contains(&address) {
            continue;
        }
        tried.push(address.clone());
        let mut client = match connect(&address, token).await {
            Ok(c) => c,
            Err(e) => {
                why.push(format!("{address}: unreachable"));
                if tried.len() == 1 && addresses.len() == 1 {
                    return Err(e);
                }
                continue;
            }
        };
        match client
            .get_server_info(warren_proto::v1::GetServerInfoRequest {})
            .await
        {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                if let Some(leader) = leader_hint(&s) {
                    queue.push_front(leader);
                }
                why.push(format!("{address}: {}", s.message()));
            }
            _ => return Ok((client, address)),
        }
    }
    Err(ConnectError::NoLeader {
        tried: format!("{} ({})", join(&tried), why.join("; ")),
    })
}

fn join(addresses: &[Address]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a failed call may be sent again to the (new) leader: the server was a standby,
/// starting or stepping down (its refusal says so in `warren-role`), or it could not be
/// reached or the connection broke mid-call (an error made by the client: no server
/// answered, so the status carries no response headers). An UNAVAILABLE the leader itself
/// answered (e.g. its store is unreachable) is final: sending it again would not help.
pub fn retryable(status: &tonic::Status) -> bool {
    let meta = status.metadata();
    if meta.get(crate::server::ROLE_METADATA).is_some()
        || meta.get(crate::server::LEADER_METADATA).is_some()
    {
        return true;
    }
    if meta.get("content-type").is_some() {
        return false;
    }
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Cancelled => {
            let m = status.message();
            m.contains("transport") || m.contains("connection") || m.contains("h2")
        }
        _ => false,
    }
}

/// A connection to whichever of several servers leads, for idempotent calls: a call that
/// fails because its server died, is a standby or is stepping down is sent again to the
/// leader (found again, following standbys' hints) until `patience` has passed.
///
/// Creates are idempotent by name (the same spec again answers the existing sandbox), so a
/// create whose reply was lost in a fail-over is retried safely, also across leaders.
#[derive(Debug)]
pub struct Failover {
    addresses: Vec<Address>,
    token: Option<String>,
    client: Option<Client>,
    /// How long a call keeps trying; default 30 s.
    pub patience: Duration,
    /// Calls sent again after a retryable failure (for reports and tests).
    pub retries: u64,
}

impl Failover {
    pub fn new(addresses: Vec<Address>, token: Option<String>) -> Self {
        Failover {
            addresses,
            token,
            client: None,
            patience: Duration::from_secs(30),
            retries: 0,
        }
    }

    /// The leader's client (connected on first use, and again after a fail-over).
    pub async fn client(&mut self) -> Result<Client, ConnectError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let (client, _) = match self.addresses.as_slice() {
            [one] => (connect(one, self.token.as_deref()).await?, one.clone()),
            many => connect_leader(many, self.token.as_deref()).await?,
        };
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Runs `call` (which must be idempotent) on the leader, again after each retryable
    /// failure, until it answers or `patience` passes; the last error is returned then.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(50);
        loop {
            let result = match self.client().await {
                Ok(client) => call(client).await,
                // One server that cannot be reached: say so now (nothing to fail over to).
                Err(e) if self.addresses.len() == 1 => {
                    return Err(tonic::Status::unavailable(warren_runtime::error_chain(&e)));
                }
                Err(e) => Err(tonic::Status::unavailable(warren_runtime::error_chain(&e))),
            };
            match result {
                Err(s) if retryable(&s) && Instant::now() + pause < deadline => {
                    self.retries += 1;
                    self.client = None;
                    if let Some(leader) = leader_hint(&s) {
                        // Ask the named leader first next time.
                        self.addresses.retain(|a| *a != leader);
                        self.addresses.insert(0, leader);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }
}

/// Whether `token` can be sent as a bearer token and matched as given: printable ASCII,
/// spaces only between words (a header value's ends are trimmed), not empty.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && !token.starts_with(' ')
        && !token.ends_with(' ')
        && token.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists() {
        let list = parse_servers("tcp://127.0.0.1:1, 127.0.0.1:2,unix:///s.sock").expect("ok");
        assert_eq!(list.len(), 3);
        assert_eq!(list[1], Address::Tcp("127.0.0.1:2".into()));
        assert!(parse_servers(",").expect_err("empty").contains("\",\""));
        assert!(
            parse_servers("tcp://a:1,nohost")
                .expect_err("bad")
                .contains("nohost")
        );
    }

    #[test]
    fn hints_and_retryable_codes() {
        let mut s = tonic::Status::unavailable("standby");
        s.metadata_mut().insert(
            crate::server::LEADER_METADATA,
            "tcp://127.0.0.1:7".parse().expect("ascii"),
        );
        assert_eq!(leader_hint(&s), Some(Address::Tcp("127.0.0.1:7".into())));
        assert!(retryable(&s));
        assert!(!retryable(&tonic::Status::already_exists("x")));
        assert!(retryable(&tonic::Status::unknown("h2 protocol error")));
        assert!(!retryable(&tonic::Status::unknown("bad spec")));
        // The leader's own UNAVAILABLE (its store is down) is an answer, not a fail-over.
        let mut answered = tonic::Status::unavailable("the etcd store at x:1 is unreachable");
        answered
            .metadata_mut()
            .insert("content-type", "application/grpc".parse().expect("ascii"));
        assert!(!retryable(&answered));
        assert!(retryable(&tonic::Status::unavailable("tcp connect error")));
    }
}
