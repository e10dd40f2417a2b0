//! The agent process's link to its control plane (`warren agent --server URL`): the
//! heartbeat that registers it and keeps it registered, carrying the status changes of its
//! sandboxes (a workload's exit reaches the control plane with the next heartbeat, which is
//! sent as soon as there is one), and the janitor's [`Oracle`].
//!
//! A heartbeat carries the agent's whole state (capacity, load, backends, images, warm
//! sandboxes), so a server that restarted, or a standby that took over, learns everything
//! from the first one. Changes that could not be sent are kept (the newest per sandbox) and
//! sent with the next heartbeat that gets through.
//!
//! `--server` may name several servers (replicas on one etcd): the agent talks to the one
//! that leads. A standby refuses and names the leader, which is asked next; a server that
//! cannot be reached passes the turn to the next one ([`Servers`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use warren_agent::janitor::Oracle;
use warren_agent::node::NodeAgent;
use warren_proto::v1;
use warren_runtime::BackendEvent;
use warren_spec::BackendKind;

use crate::address::Address;
use crate::client::{self, NodesClient};
use crate::cluster_grpc::{backend_state_to_pb, change_to_pb, warm_to_pb};

/// Heartbeat interval until the server says otherwise.
const FIRST_INTERVAL: Duration = Duration::from_millis(500);
/// How often the image list is read again.
const IMAGES_EVERY: Duration = Duration::from_secs(5);
/// Most changes kept while the server cannot be reached (the newest per sandbox).
const MAX_PENDING: usize = 100_000;

/// The servers an agent may talk to, the one to ask first at the front.
#[derive(Debug)]
pub struct Servers {
    list: std::sync::Mutex<Vec<Address>>,
}

impl Servers {
    /// `list` must not be empty ([`client::parse_servers`] never returns an empty one).
    pub fn new(list: Vec<Address>) -> Self {
        Servers {
            list: std::sync::Mutex::new(list),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Address>> {
        // Updates are single reorders; after a panic elsewhere the list is intact.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server to ask now.
    pub fn current(&self) -> Option<Address> {
        self.lock().first().cloned()
    }

    /// After a failed call to [`Servers::current`]: the leader a standby named goes first;
    /// otherwise, if the failure was about leadership or reaching the server, the next
    /// server's turn comes (an answer such as a wrong token keeps the same server).
    pub fn failed(&self, status: &tonic::Status) {
        let mut list = self.lock();
        if let Some(leader) = client::leader_hint(status) {
            list.retain(|a| *a != leader);
            list.insert(0, leader);
        } else if client::retryable(status) && list.len() > 1 {
            list.rotate_left(1);
        }
    }
}

impl std::fmt::Display for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.lock();
        let names: Vec<String> = list.iter().map(ToString::to_string).collect();
        f.write_str(&names.join(","))
    }
}

/// Connects to the server [`Servers`] names first; a failure passes the turn on.
async fn connect(servers: &Servers, token: &str) -> Result<NodesClient, tonic::Status> {
    let Some(server) = servers.current() else {
        return Err(tonic::Status::invalid_argument("--server names no server"));
    };
    match client::connect_nodes(&server, Some(token)).await {
        Ok(c) => Ok(c),
        Err(e) => {
            let status = tonic::Status::unavailable(format!(
                "cannot connect to {server}: {}",
                warren_runtime::error_chain(&e)
            ));
            servers.failed(&status);
            Err(status)
        }
    }
}

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub servers: Arc<Servers>,
    pub token: String,
    /// Where the server reaches this agent's HTTP API (host:port).
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
}

/// Heartbeats until `stop` turns true.
pub async fn run(
    node: Arc<NodeAgent>,
    mut events: mpsc::UnboundedReceiver<BackendEvent>,
    config: LinkConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<NodesClient> = None;
    let mut interval = FIRST_INTERVAL;
    // Newest change per sandbox, in the order they first came.
    let mut pending: Vec<BackendEvent> = Vec::new();
    let mut images: (Vec<String>, Option<Instant>) = (Vec::new(), None);
    let mut connected = false;
    let mut last_refusal: Option<String> = None;
    let mut next = tokio::time::Instant::now();
    let mut events_open = true;
    loop {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(ev) => {
                    add(&mut pending, ev);
                    while let Ok(ev) = events.try_recv() {
                        add(&mut pending, ev);
                    }
                }
                None => events_open = false,
            },
            () = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if images.1.is_none_or(|t| t.elapsed() >= IMAGES_EVERY) {
            images = (node.images(), Some(Instant::now()));
        }
        let sent = match client.as_mut() {
            Some(c) => send(c, &node, &config, &images.0, &pending).await,
            None => match connect(&config.servers, &config.token).await {
                Ok(c) => send(client.insert(c), &node, &config, &images.0, &pending).await,
                Err(status) => Err(status),
            },
        };
        match sent {
            Ok(reply) => {
                last_refusal = None;
                if !connected {
                    let server = config.servers.current().map(|a| a.to_string());
                    info!(
                        server = server.as_deref().unwrap_or_default(),
                        node = node.node(),
                        "registered with the control plane"
                    );
                    connected = true;
                }
                pending.clear();
                interval = Duration::from_millis(u64::from(reply.interval_ms.max(50)));
                let targets: Vec<(BackendKind, String, u32)> = reply
                    .warm_targets
                    .iter()
                    .filter_map(|w| {
                        w.backend
                            .parse::<BackendKind>()
                            .ok()
                            .map(|b| (b, w.image.clone(), w.target))
                    })
                    .collect();
                node.set_warm(&targets);
            }
            Err(status) => {
                if connected {
                    warn!(servers = %config.servers, error = %status.message(), "heartbeat failed; retrying");
                    connected = false;
                } else if last_refusal.as_deref() != Some(status.message()) {
                    // Never registered yet (a wrong token, a name another agent holds, no
                    // server there): say why once per reason, not on every retry.
                    warn!(servers = %config.servers, error = %status.message(), "cannot register with the control plane; retrying");
                }
                last_refusal = Some(status.message().to_string());
                if client.take().is_some() {
                    config.servers.failed(&status);
                }
                // Retry sooner than a full interval, without spinning.
                interval = interval.min(FIRST_INTERVAL);
            }
        }
        next = tokio::time::Instant::now() + interval;
    }
}

fn add(pending: &mut Vec<BackendEvent>, ev: BackendEvent) {
    if let Some(old) = pending.iter_mut().find(|p| p.id == ev.id) {
        *old = ev;
    } else if pending.len() < MAX_PENDING {
        pending.push(ev);
    }
}

async fn send(
    client: &mut NodesClient,
    node: &NodeAgent,
    config: &LinkConfig,
    images: &[String],
    pending: &[BackendEvent],
) -> Result<v1::HeartbeatReply, tonic::Status> {
    let hb = v1::AgentHeartbeat {
        node: node.node().to_string(),
        address: config.advertise.clone(),
        boot_id: node.boot_id().to_string(),
        capacity: node.capacity(),
        labels: config.labels.clone().into_iter().collect(),
        backends: node.backends().iter().map(backend_state_to_pb).collect(),
        images: images.to_vec(),
        warm: node.warm().iter().map(warm_to_pb).collect(),
        changes: pending.iter().map(change_to_pb).collect(),
        sandboxes: u32::try_from(node.load_count()).unwrap_or(u32::MAX),
    };
    let call = client.heartbeat(hb);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::unavailable("no answer within 5 s")),
    }
}

/// The janitor's question, asked of the control plane over `Nodes/Reconcile`.
#[derive(Debug)]
pub struct LinkOracle {
    node: String,
    servers: Arc<Servers>,
    token: String,
    client: tokio::sync::Mutex<Option<NodesClient>>,
}

impl LinkOracle {
    pub fn new(node: &str, servers: Arc<Servers>, token: &str) -> Self {
        LinkOracle {
            node: node.to_string(),
            servers,
            token: token.to_string(),
            client: tokio::sync::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Oracle for LinkOracle {
    async fn unknown(&self, ids: Vec<String>) -> Result<Vec<String>, String> {
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            *guard = Some(
                connect(&self.servers, &self.token)
                    .await
                    .map_err(|s| s.message().to_string())?,
            );
        }
        let Some(c) = guard.as_mut() else {
            return Err("not connected".into());
        };
        let asked: HashMap<&str, ()> = ids.iter().map(|i| (i.as_str(), ())).collect();
        let req = v1::ReconcileRequest {
            node: self.node.clone(),
            ids: ids.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(10), c.reconcile(req)).await {
            Ok(Ok(reply)) => Ok(reply
                .into_inner()
                .unknown
                .into_iter()
                // Only ever what was asked about.
                .filter(|id| asked.contains_key(id.as_str()))
                .collect()),
            Ok(Err(status)) => {
                *guard = None;
                self.servers.failed(&status);
                Err(status.message().to_string())
            }
            Err(_) => {
                *guard = None;
                self.servers
                    .failed(&tonic::Status::unavailable("no answer within 10 s"));
                Err("no answer within 10 s".into())
            }
        }
    }
}

/// The in-process agent's oracle: the plane itself.
#[derive(Debug, Clone)]
pub struct PlaneOracle {
    pub plane: crate::plane::ControlPlane,
    /// On etcd: the server's role; a server that does not lead (yet) calls nothing unknown.
    pub roles: Option<tokio::sync::watch::Receiver<crate::leader::Role>>,
}

#[async_trait::async_trait]
impl Oracle for PlaneOracle {
    async fn unknown(&self, ids: Vec<String>) -> Result<Vec<String>, String> {
        if !crate::server::leads(&self.roles) {
            return Ok(Vec::new());
        }
        Ok(self.plane.unknown_ids(ids))
    }
}
