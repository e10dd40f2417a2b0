//! Agent registrations in etcd under leases: agent lost = lease expired.
//!
//! On etcd, the leader keeps one key per registered agent, `warren/nodes/NAME`, holding its
//! [`Registration`] (address, labels, boot id, capacity, backends, images; never its token)
//! under a lease of its own whose TTL is the agent timeout (whole seconds, rounded up; etcd
//! makes it at least its minimum, 2 s with its default election timeout). Nothing keeps
//! that lease alive but the agent's heartbeats: each one the leader takes renews it once
//! ([`Registrations::beat`]), and so does each one a standby (or a server still recovering)
//! refuses ([`Registrations::renew`]), so an agent that keeps heartbeating through a
//! fail-over keeps its key. An agent whose heartbeats stop loses its key when etcd expires
//! the lease; the leader's watch on `nodes/` sees the delete and tells [`Nodes`], whose
//! liveness decision ([`Nodes::is_alive`](crate::nodes)) then says lost.
//!
//! A server that wins the election loads every key before it recovers its records
//! ([`Registrations::lead`]): the agents alive at fail-over are Up at once (called with the
//! cluster's token, the one every agent presents), so their sandboxes are neither Lost nor
//! created again; their next heartbeat hands the sandboxes back as after any fail-over.
//!
//! Heartbeats never wait for etcd: the leader queues them to one task that renews (or
//! grants and writes, when the registration is new, changed, or its lease expired), keeping
//! only the newest heartbeat per agent when etcd is slow. On the embedded store none of
//! this exists and liveness is the heartbeat's age.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use warren_agent::api::BackendState;

use crate::nodes::Heartbeat;
use crate::plane::ControlPlane;
use crate::store::{EtcdStore, StoreError, WatchEvent};

/// Prefix of the agents' keys, under the store's root.
pub const PREFIX: &str = "nodes/";

/// What the key of a registered agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub node: String,
    pub address: String,
    pub boot_id: String,
    pub capacity: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub backends: Vec<BackendState>,
    #[serde(default)]
    pub images: Vec<String>,
    /// The lease the key is under (hex in etcdctl's output), for a new leader to renew.
    #[serde(default)]
    pub lease: i64,
}

impl Registration {
    pub fn of(hb: &Heartbeat) -> Self {
        Registration {
            node: hb.node.clone(),
            address: hb.address.clone(),
            boot_id: hb.boot_id.clone(),
            capacity: hb.capacity,
            labels: hb.labels.clone(),
            backends: hb.backends.clone(),
            images: hb.images.clone(),
            lease: 0,
        }
    }
}

fn key(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// The lease TTL for an agent timeout: whole seconds, rounded up.
pub fn lease_ttl(agent_timeout: Duration) -> Duration {
    let secs = agent_timeout.as_secs() + u64::from(agent_timeout.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

/// One server's side of the registrations; see the module docs.
#[derive(Debug)]
pub struct Registrations {
    store: Arc<EtcdStore>,
    ttl: Duration,
    /// Set while this server leads: heartbeats to renew or write.
    queue: Mutex<Option<mpsc::UnboundedSender<Registration>>>,
}

impl Registrations {
    pub fn new(store: Arc<EtcdStore>, agent_timeout: Duration) -> Arc<Self> {
        Arc::new(Registrations {
            store,
            ttl: lease_ttl(agent_timeout),
            queue: Mutex::new(None),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<Registration>>> {
        // A single assignment; after a panic elsewhere the state is intact.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader took a heartbeat: renew the agent's lease (or write its key). Never waits.
    pub fn beat(&self, hb: &Heartbeat) {
        if let Some(tx) = self.queue().as_ref() {
            let _ = tx.send(Registration::of(hb));
        }
    }

    /// A server that does not lead refused a heartbeat: it still proves the agent alive, so
    /// its lease is renewed (a fail-over must not expire every agent). Never waits.
    pub fn renew(&self, node: &str) {
        let store = self.store.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            match store.get_leased(&key(&node)).await {
                Ok(Some((_, lease))) if lease != 0 => {
                    if let Err(e) = store.renew_lease(lease).await {
                        debug!(node, error = %e, "could not renew an agent's lease");
                    }
                }
                Ok(_) => {}
                Err(e) => debug!(node, error = %e, "could not read an agent's registration"),
            }
        });
    }

    /// Called once this server has won the election, before it recovers its records: loads
    /// every registration into the node set (the agents are Up, called with `token`), then
    /// follows the keys (a delete, i.e. an expired lease, makes the agent lost) and takes
    /// heartbeats until the returned task is aborted.
    pub async fn lead(
        self: &Arc<Self>,
        plane: ControlPlane,
        token: Option<String>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let watch = self.store.watch_prefix(PREFIX).await?;
        let mut leases = HashMap::new();
        let mut loaded = 0;
        for (k, value) in &watch.initial {
            match serde_json::from_slice::<Registration>(value) {
                Ok(reg) => {
                    if plane.nodes().load_registration(&reg, token.as_deref()) {
                        loaded += 1;
                    }
                    leases.insert(reg.node.clone(), reg);
                }
                Err(e) => {
                    warn!(key = %k, error = %e, "unreadable agent registration left as it is")
                }
            }
        }
        info!(
            agents = loaded,
            "agent registrations loaded from etcd: those agents are up"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        *self.queue() = Some(tx);
        let this = self.clone();
        Ok(tokio::spawn(async move {
            let nodes = plane.clone();
            let follow = this.clone().follow(nodes, watch);
            let write = this.write(rx, leases);
            tokio::join!(follow, write);
        }))
    }

    /// Tells the node set which agents' keys exist; a broken watch is started again (and
    /// what it reads then replaces what was known).
    async fn follow(self: Arc<Self>, plane: ControlPlane, mut watch: crate::store::Watch) {
        loop {
            loop {
                match watch.next().await {
                    Ok(WatchEvent::Put { key, .. }) => {
                        if let Some(node) = key.strip_prefix(PREFIX) {
                            plane.nodes().set_lease(node, true);
                        }
                    }
                    Ok(WatchEvent::Delete { key }) => {
                        if let Some(node) = key.strip_prefix(PREFIX) {
                            info!(node, "agent's registration expired (its lease ran out)");
                            plane.nodes().set_lease(node, false);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "watch on agent registrations broke; starting it again");
                        break;
                    }
                }
            }
            watch = loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match self.store.watch_prefix(PREFIX).await {
                    Ok(w) => break w,
                    Err(e) => debug!(error = %e, "watch on agent registrations: retrying"),
                }
            };
            let present: Vec<String> = watch
                .initial
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(PREFIX).map(str::to_string))
                .collect();
            plane.nodes().set_leases_present(&present);
        }
    }

    /// Renews or writes each agent's key as its heartbeats come, the newest per agent.
    async fn write(
        &self,
        mut rx: mpsc::UnboundedReceiver<Registration>,
        mut known: HashMap<String, Registration>,
    ) {
        let mut batch: Vec<Registration> = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while let Ok(next) = rx.try_recv() {
                match batch.iter_mut().find(|r| r.node == next.node) {
                    Some(old) => *old = next,
                    None => batch.push(next),
                }
            }
            for mut reg in batch.drain(..) {
                let node = reg.node.clone();
                let held = known.get(&node).map(|k| k.lease).unwrap_or(0);
                match self.refresh(&mut reg, known.get(&node), held).await {
                    Ok(()) => {
                        known.insert(node, reg);
                    }
                    Err(e) => {
                        debug!(node, error = %e, "could not renew an agent's registration");
                    }
                }
            }
        }
    }

    /// Renews `held` (when set); writes the key again under a new lease when the old one
    /// expired (or there was none), and under the same one when the registration changed.
    async fn refresh(
        &self,
        reg: &mut Registration,
        before: Option<&Registration>,
        held: i64,
    ) -> Result<(), StoreError> {
        if held != 0 && self.store.renew_lease(held).await? {
            reg.lease = held;
            if before != Some(reg) {
                let value = serde_json::to_vec(reg).map_err(|e| StoreError::Failed {
                    operation: "encode a registration",
                    message: e.to_string(),
                })?;
                self.store.put_leased(&key(&reg.node), value, held).await?;
            }
            return Ok(());
        }
        reg.lease = self.store.grant_bare_lease(self.ttl).await?;
        let value = serde_json::to_vec(reg).map_err(|e| StoreError::Failed {
            operation: "encode a registration",
            message: e.to_string(),
        })?;
        self.store
            .put_leased(&key(&reg.node), value, reg.lease)
            .await?;
        info!(node = %reg.node, lease = format!("{:x}", reg.lease), ttl = ?self.ttl, "agent registered in etcd");
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Instant;

    use warren_agent::Agent;
    use warren_runtime::{Backend, SlotBackend, SlotCapacity};
    use warren_spec::BackendKind;

    use super::*;
    use crate::nodes::NodeState;
    use crate::plane::PlaneOptions;
    use crate::store::testing::EtcdServer;

    fn plane(dir: &std::path::Path, store: Arc<EtcdStore>, timeout: Duration) -> ControlPlane {
        let slot = SlotBackend::new(dir, SlotCapacity::default()).unwrap();
        let agent = Agent::new("server", [Arc::new(slot) as Arc<dyn Backend>]);
        ControlPlane::with_options(
            agent,
            store,
            PlaneOptions {
                local_capacity: Some(0),
                agent_timeout: timeout,
                ..PlaneOptions::default()
            },
        )
    }

    fn hb(node: &str) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            address: "127.0.0.1:5758".into(),
            boot_id: "boot-1".into(),
            capacity: 4,
            backends: vec![BackendState {
                kind: BackendKind::Slot,
                available: true,
                reason: String::new(),
            }],
            images: vec!["busybox:latest".into()],
            ..Default::default()
        }
    }

    fn state(plane: &ControlPlane, node: &str) -> Option<NodeState> {
        plane
            .nodes()
            .list()
            .into_iter()
            .find(|n| n.name == node)
            .map(|n| n.state)
    }

    async fn wait_for(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f().await {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(
            lease_ttl(Duration::from_millis(1500)),
            Duration::from_secs(2)
        );
        assert_eq!(lease_ttl(Duration::from_secs(3)), Duration::from_secs(3));
        assert_eq!(lease_ttl(Duration::from_millis(10)), Duration::from_secs(1));
    }

    /// One leader writes an agent's key from its heartbeats; a second one (after a
    /// fail-over) loads it and has the agent Up with no heartbeat; a standby's renewals keep
    /// the key; once nothing renews it, etcd expires it and the leader calls the agent lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_live_under_leases_renewed_by_heartbeats() {
        let Some(etcd) = EtcdServer::start() else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(EtcdStore::open(&[etcd.endpoint()]).await.unwrap());
        let timeout = Duration::from_secs(2);
        let first = plane(&tmp.path().join("a"), store.clone(), timeout);
        let regs = Registrations::new(store.clone(), timeout);
        let task = regs.lead(first.clone(), Some("t".into())).await.unwrap();
        first.heartbeat(hb("edge"), Vec::new(), "t").unwrap();
        regs.beat(&hb("edge"));
        wait_for(
            "the key is written",
            Duration::from_secs(5),
            async || matches!(store.get_leased("nodes/edge").await, Ok(Some((_, l))) if l != 0),
        )
        .await;
        let (value, lease) = store.get_leased("nodes/edge").await.unwrap().unwrap();
        let reg: Registration = serde_json::from_slice(&value).unwrap();
        assert_eq!((reg.lease, reg.capacity), (lease, 4));
        assert_eq!(reg.address, "127.0.0.1:5758");
        let text = String::from_utf8_lossy(&value);
        assert!(!text.contains("\"t\""), "no token in the key: {text}");
        // The first leader dies (its tasks stop); the agent keeps heartbeating to whoever
        // answers: a standby renews its lease without taking the heartbeat.
        task.abort();
        drop(regs);
        let standby = Registrations::new(store.clone(), timeout);
        for _ in 0..8 {
            standby.renew("edge");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            store.get_leased("nodes/edge").await.unwrap().is_some(),
            "renewed by a standby for twice its TTL"
        );
        // The standby wins: the agent is Up from its key, before any heartbeat.
        let second = plane(&tmp.path().join("b"), store.clone(), timeout);
        assert_eq!(state(&second, "edge"), None);
        let task = standby
            .lead(second.clone(), Some("t".into()))
            .await
            .unwrap();
        assert_eq!(state(&second, "edge"), Some(NodeState::Up));
        assert!(
            second.nodes().check().is_empty(),
            "not lost: {:?}",
            second.nodes().list()
        );
        // Its heartbeats renew the same lease.
        let mut last_beat = Instant::now();
        for _ in 0..6 {
            last_beat = Instant::now();
            second.heartbeat(hb("edge"), Vec::new(), "t").unwrap();
            standby.beat(&hb("edge"));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (_, still) = store.get_leased("nodes/edge").await.unwrap().unwrap();
        assert_eq!(still, lease, "the same lease, renewed");
        assert!(second.nodes().check().is_empty());
        // The agent stops: the lease expires, the key goes, and the agent is lost; not
        // before its 2 s TTL from the last renewal (counted from the last beat, however
        // late the sleep after it woke).
        wait_for("the agent is lost", Duration::from_secs(6), async || {
            second.nodes().check() == vec!["edge".to_string()]
        })
        .await;
        let took = last_beat.elapsed();
        assert!(store.get_leased("nodes/edge").await.unwrap().is_none());
        assert!(
            took >= Duration::from_millis(1900),
            "lost before its TTL: {took:?} after the last heartbeat"
        );
        // It comes back: Up again, and a new key under a new lease.
        second.heartbeat(hb("edge"), Vec::new(), "t").unwrap();
        standby.beat(&hb("edge"));
        wait_for("a new key", Duration::from_secs(5), async || {
            matches!(store.get_leased("nodes/edge").await, Ok(Some((_, l))) if l != lease && l != 0)
        })
        .await;
        assert_eq!(state(&second, "edge"), Some(NodeState::Up));
        task.abort();
    }
}
