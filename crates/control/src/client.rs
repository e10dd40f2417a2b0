//! Connecting to a warren server over a unix socket or TCP, with the bearer token.

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use warren_proto::v1::sandboxes_client::SandboxesClient;

use crate::address::Address;

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
    #[error("the token is not a valid header value (printable ASCII only)")]
    BadToken,
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

async fn connect_channel(
    address: &Address,
    token: Option<&str>,
) -> Result<(Channel, Bearer), ConnectError> {
    let unreachable = |source| ConnectError::Unreachable {
        address: address.to_string(),
        source,
    };
    let channel = match address {
        Address::Tcp(hp) => {
            let endpoint = Endpoint::from_shared(format!("http://{hp}"))
                .map_err(unreachable)?
                .tcp_nodelay(true);
            endpoint.connect().await.map_err(unreachable)?
        }
        Address::Unix(path) => {
            let path = path.clone();
            // The URI is unused: the connector below always dials the socket.
            Endpoint::from_static("http://warren.local")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(unreachable)?
        }
    };
    let bearer = match token {
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
