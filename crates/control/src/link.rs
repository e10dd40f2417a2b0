//! The agent process's link to its control plane (`warren agent --server URL`): the
//! heartbeat that registers it and keeps it registered, carrying the status changes of its
//! sandboxes (a workload's exit reaches the control plane with the next heartbeat, which is
//! sent as soon as there is one), and the janitor's [`Oracle`].
//!
//! A heartbeat carries the agent's whole state (capacity, load, backends, images, warm
//! sandboxes), so a server that restarted, or a standby that took over, learns everything
//! from the first one. Changes that could not be sent are kept (the newest per sandbox) and
//! sent with the next heartbeat that gets through.

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

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub server: Address,
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
        if client.is_none() {
            client = client::connect_nodes(&config.server, Some(&config.token))
                .await
                .ok();
        }
        let sent = match client.as_mut() {
            Some(c) => send(c, &node, &config, &images.0, &pending).await,
            None => Err(format!("cannot connect to {}", config.server)),
        };
        match sent {
            Ok(reply) => {
                if !connected {
                    info!(server = %config.server, node = node.node(), "registered with the control plane");
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
            Err(e) => {
                if connected {
                    warn!(server = %config.server, error = %e, "heartbeat failed; retrying");
                    connected = false;
                }
                client = None;
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
) -> Result<v1::HeartbeatReply, String> {
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
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// The janitor's question, asked of the control plane over `Nodes/Reconcile`.
#[derive(Debug)]
pub struct LinkOracle {
    node: String,
    server: Address,
    token: String,
    client: tokio::sync::Mutex<Option<NodesClient>>,
}

impl LinkOracle {
    pub fn new(node: &str, server: Address, token: &str) -> Self {
        LinkOracle {
            node: node.to_string(),
            server,
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
                client::connect_nodes(&self.server, Some(&self.token))
                    .await
                    .map_err(|e| e.to_string())?,
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
                Err(status.message().to_string())
            }
            Err(_) => {
                *guard = None;
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
