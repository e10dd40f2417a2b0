//! The node set: the control plane's agents behind one seam, their registrations, their
//! liveness, and the scheduler that places sandboxes on them.
//!
//! [`NodeHandle`] is the seam the plane calls for everything that happens on a node: the
//! in-process [`Agent`] of `warren server` (the embedded default, called directly, no copy
//! of anything) or a [`RemoteAgent`] reached over seed 004's HTTP API. Remote agents
//! register and stay registered by heartbeating (`warren.v1.Nodes/Heartbeat`); whether one is
//! alive is decided in one place, [`Nodes::is_alive`]: on the embedded store from its last
//! heartbeat and the server's `--agent-timeout`; on etcd from its registration's key, which
//! lives under a lease its heartbeats renew ([`crate::registrations`]): lost = lease expired.
//!
//! A node can be known before it registers: records loaded at start-up name the nodes their
//! sandboxes run on, and those nodes wait, unschedulable, for their agent to heartbeat
//! (then the plane hands the sandboxes back) or to time out (then they are Lost).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use warren_agent::api::{BackendState, WarmState};
use warren_agent::remote::RemoteAgent;
use warren_agent::{Agent, AgentError};
use warren_runtime::{BackendInfo, BackendStatus, ExecProcess, ExecRequest, SandboxConfig};
use warren_spec::{BackendKind, ResourceInfo};

use crate::record::now_ms;
use crate::scheduler::{Demand, HostPort, Placement, ScheduleError, Scheduler};
use crate::selector::Selector;

/// How long an agent may go without a heartbeat before it is lost, unless
/// `warren server --agent-timeout` says.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long after a warm hand-out to an agent its reports may only lower the count of that
/// image's pre-warmed sandboxes: a report sent before the agent took the one handed out
/// (a heartbeat crossing the create) would count it again, and the next create would be
/// placed on a sandbox that is gone and start cold. Longer than a create takes to reach the
/// agent; a refill reported meanwhile is counted from the first report after it.
pub const HANDOUT_SETTLE: Duration = Duration::from_secs(1);

/// The name image affinity compares: the image store's normal form (`busybox` and
/// `docker.io/library/busybox` are `busybox:latest`), or the name as given when it is not
/// an image reference (a Wasm module path).
pub fn image_key(name: &str) -> String {
    warren_image::normalize_name(name).unwrap_or_else(|_| name.to_string())
}

/// The backends among `backends` a node can run now.
fn available(backends: &[BackendState]) -> Vec<BackendKind> {
    backends
        .iter()
        .filter(|b| b.available)
        .map(|b| b.kind)
        .collect()
}

/// Where the plane sends a node's work.
#[derive(Debug, Clone)]
pub enum NodeHandle {
    Local(Agent),
    Remote(Arc<RemoteAgent>),
    /// Known from records, never heard from since this server started.
    Unregistered(String),
}

fn not_registered(node: &str) -> AgentError {
    AgentError::Unreachable {
        node: node.to_string(),
        address: "-".into(),
        message: "its agent has not registered with this server".into(),
    }
}

impl NodeHandle {
    pub async fn run(&self, config: &SandboxConfig) -> Result<BackendInfo, AgentError> {
        match self {
            NodeHandle::Local(a) => a.run(config).await,
            NodeHandle::Remote(r) => r.run(config).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), AgentError> {
        match self {
            NodeHandle::Local(a) => a.adopt(config).await,
            NodeHandle::Remote(r) => r.adopt(config).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn stop(
        &self,
        kind: BackendKind,
        id: &str,
        grace: Duration,
    ) -> Result<BackendStatus, AgentError> {
        match self {
            NodeHandle::Local(a) => a.stop(kind, id, grace).await,
            NodeHandle::Remote(r) => r.stop(kind, id, grace).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn delete(&self, kind: BackendKind, id: &str) -> Result<(), AgentError> {
        match self {
            NodeHandle::Local(a) => a.delete(kind, id).await,
            NodeHandle::Remote(r) => r.delete(kind, id).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn status(&self, kind: BackendKind, id: &str) -> Result<BackendStatus, AgentError> {
        match self {
            NodeHandle::Local(a) => a.status(kind, id).await,
            NodeHandle::Remote(r) => r.status(kind, id).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn processes(
        &self,
        kind: BackendKind,
        id: &str,
    ) -> Result<Vec<warren_runtime::ProcessInfo>, AgentError> {
        match self {
            NodeHandle::Local(a) => a.processes(kind, id).await,
            NodeHandle::Remote(r) => r.processes(kind, id).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn usage(
        &self,
        kind: BackendKind,
        id: &str,
    ) -> Result<Option<warren_runtime::Usage>, AgentError> {
        match self {
            NodeHandle::Local(a) => Ok(a.usage(kind, id)),
            NodeHandle::Remote(r) => r.usage(kind, id).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn update(
        &self,
        kind: BackendKind,
        id: &str,
        resources: &ResourceInfo,
    ) -> Result<(), AgentError> {
        match self {
            NodeHandle::Local(a) => a.update(kind, id, resources).await,
            NodeHandle::Remote(r) => r.update(kind, id, resources).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn signal(&self, kind: BackendKind, id: &str, signal: i32) -> Result<(), AgentError> {
        match self {
            NodeHandle::Local(a) => a.signal(kind, id, signal).await,
            NodeHandle::Remote(r) => r.signal(kind, id, signal).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub async fn pause(&self, kind: BackendKind, id: &str, pause: bool) -> Result<(), AgentError> {
        match self {
            NodeHandle::Local(a) => a.pause(kind, id, pause).await,
            NodeHandle::Remote(r) => r.pause(kind, id, pause).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    /// On a remote agent, over a WebSocket of its HTTP API.
    pub async fn exec(
        &self,
        kind: BackendKind,
        id: &str,
        request: ExecRequest,
    ) -> Result<ExecProcess, AgentError> {
        match self {
            NodeHandle::Local(a) => a.exec(kind, id, request).await,
            NodeHandle::Remote(r) => r.exec(kind, id, request).await,
            NodeHandle::Unregistered(n) => Err(not_registered(n)),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, NodeHandle::Local(_))
    }
}

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Heartbeating (or the in-process agent): schedulable.
    Up,
    /// Missed its heartbeats: its sandboxes are Lost.
    Lost,
    /// Named by records, not heard from since this server started.
    Waiting,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "Up",
            NodeState::Lost => "Lost",
            NodeState::Waiting => "Waiting",
        }
    }
}

/// One heartbeat, as the plane hands it to the node set.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    pub node: String,
    pub address: String,
    pub boot_id: String,
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub backends: Vec<BackendState>,
    pub images: Vec<String>,
    pub warm: Vec<WarmState>,
}

/// What a node looks like, for `warren nodes`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub state: NodeState,
    pub local: bool,
    pub capacity: u32,
    pub sandboxes: u32,
    pub backends: Vec<BackendState>,
    pub images: Vec<String>,
    pub warm: Vec<WarmState>,
    pub labels: BTreeMap<String, String>,
    pub last_seen_ms: i64,
    pub host_ports: Vec<HostPort>,
    pub boot_id: String,
}

#[derive(Debug)]
struct Entry {
    handle: NodeHandle,
    address: String,
    labels: BTreeMap<String, String>,
    boot_id: String,
    last_seen: Instant,
    last_seen_ms: i64,
    state: NodeState,
    backends: Vec<BackendState>,
    images: Vec<String>,
    warm: Vec<WarmState>,
    /// What the pools want pre-warmed here: (backend, image, count).
    warm_targets: Vec<(BackendKind, String, u32)>,
    /// Whether its registration's key exists in etcd (the liveness decision there).
    lease: Lease,
    /// Heartbeated to this server (false for one only loaded from its registration).
    heard: bool,
    /// When a pre-warmed sandbox of each image (its key) was last handed out here.
    handed_out: HashMap<String, Instant>,
}

/// What decides an agent's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// No key known (the embedded store, or not written yet): its heartbeats' age.
    None,
    /// Its key exists: alive until etcd expires the lease.
    Held,
    /// Its key is gone: the lease expired.
    Expired,
}

#[derive(Debug, Default)]
struct Inner {
    sched: Scheduler,
    /// Parallel to the scheduler's indices.
    entries: Vec<Entry>,
    /// Pools' node selectors and backends, to recompute membership when agents register.
    pools: HashMap<String, (Selector, BackendKind)>,
}

/// What a heartbeat changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatOutcome {
    /// The plane should hand the node its sandboxes back: it is new to this server, came
    /// back after being lost, or its agent restarted.
    pub reconcile: bool,
    pub warm_targets: Vec<(BackendKind, String, u32)>,
}

/// Every node the plane knows; see the module docs.
#[derive(Debug)]
pub struct Nodes {
    local: Agent,
    inner: Mutex<Inner>,
    timeout: Duration,
}

impl Nodes {
    /// The node set with the in-process agent, holding at most `local_capacity` sandboxes
    /// (`None`: no limit but the backends' own; 0: nothing is scheduled on it).
    pub fn new(local: Agent, local_capacity: Option<u32>, timeout: Duration) -> Self {
        let mut inner = Inner {
            sched: Scheduler::new(),
            ..Default::default()
        };
        let i = inner.sched.agent(local.node());
        let backends = local.backend_states();
        let kinds: Vec<BackendKind> = backends
            .iter()
            .filter(|b| b.available)
            .map(|b| b.kind)
            .collect();
        inner
            .sched
            .configure(i, local_capacity.unwrap_or(u32::MAX), &kinds);
        inner.sched.set_up(i, true);
        inner.entries.push(Entry {
            handle: NodeHandle::Local(local.clone()),
            address: "in-process".into(),
            labels: BTreeMap::new(),
            boot_id: String::new(),
            last_seen: Instant::now(),
            last_seen_ms: now_ms(),
            state: NodeState::Up,
            backends,
            images: Vec::new(),
            warm: Vec::new(),
            warm_targets: Vec::new(),
            lease: Lease::None,
            heard: true,
            handed_out: HashMap::new(),
        });
        Nodes {
            local,
            inner: Mutex::new(inner),
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Updates are single assignments; after a panic elsewhere the state is intact.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn local(&self) -> &Agent {
        &self.local
    }

    pub fn local_name(&self) -> &str {
        self.local.node()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether a node is alive: the one decision every "is it lost" question goes through.
    /// The in-process agent always is; a remote one while its registration's key exists
    /// (etcd: until its lease expires), or, with no key, while its last heartbeat is
    /// younger than the agent timeout.
    fn is_alive(&self, entry: &Entry, now: Instant) -> bool {
        if entry.handle.is_local() {
            return true;
        }
        match entry.lease {
            Lease::Held => true,
            Lease::Expired => false,
            Lease::None => now.duration_since(entry.last_seen) <= self.timeout,
        }
    }

    /// The handle of `node` (an unregistered one fails every call, naming the node).
    pub fn handle(&self, node: &str) -> NodeHandle {
        let inner = self.lock();
        match inner.sched.find(node) {
            Some(i) => inner.entries[i].handle.clone(),
            None => NodeHandle::Unregistered(node.to_string()),
        }
    }

    /// Places a sandbox; returns the node's name and how it was chosen.
    pub fn allocate(&self, demand: &Demand<'_>) -> Result<(String, Placement), ScheduleError> {
        let mut inner = self.lock();
        let p = inner.sched.allocate(demand)?;
        if p.affinity == crate::scheduler::Affinity::Warm
            && let Some(image) = demand.image
        {
            inner.entries[p.agent]
                .handed_out
                .insert(image.to_string(), Instant::now());
        }
        Ok((inner.sched.name(p.agent).to_string(), p))
    }

    /// The warm counts an agent reported, as the scheduler should take them: within
    /// [`HANDOUT_SETTLE`] of a hand-out of an image, no more than it counts now.
    fn settled_warm(
        inner: &mut Inner,
        i: usize,
        reported: Vec<(String, u32)>,
    ) -> Vec<(String, u32)> {
        let now = Instant::now();
        let entry = &mut inner.entries[i];
        entry
            .handed_out
            .retain(|_, at| now.duration_since(*at) < HANDOUT_SETTLE);
        if entry.handed_out.is_empty() {
            return reported;
        }
        reported
            .into_iter()
            .map(|(image, ready)| {
                let ready = if inner.entries[i].handed_out.contains_key(&image) {
                    ready.min(inner.sched.warm_of(i, &image))
                } else {
                    ready
                };
                (image, ready)
            })
            .collect()
    }

    /// The index of `node` for [`Demand::avoid`].
    pub fn index(&self, node: &str) -> Option<usize> {
        self.lock().sched.find(node)
    }

    /// Counts a sandbox the node already runs (recovery), registering the node as waiting
    /// if it is new.
    pub fn take(&self, node: &str, ports: &[HostPort]) {
        let mut inner = self.lock();
        let i = Self::entry(&mut inner, node);
        inner.sched.take(i, ports);
    }

    pub fn release(&self, node: &str, ports: &[HostPort]) {
        let mut inner = self.lock();
        if let Some(i) = inner.sched.find(node) {
            inner.sched.release(i, ports);
        }
    }

    /// The node's index, adding it as Waiting if it is new.
    fn entry(inner: &mut Inner, node: &str) -> usize {
        let i = inner.sched.agent(node);
        if i == inner.entries.len() {
            inner.entries.push(Entry {
                handle: NodeHandle::Unregistered(node.to_string()),
                address: String::new(),
                labels: BTreeMap::new(),
                boot_id: String::new(),
                last_seen: Instant::now(),
                last_seen_ms: 0,
                state: NodeState::Waiting,
                backends: Vec::new(),
                images: Vec::new(),
                warm: Vec::new(),
                warm_targets: Vec::new(),
                lease: Lease::None,
                heard: false,
                handed_out: HashMap::new(),
            });
        }
        i
    }

    /// Takes a heartbeat: registers the node or refreshes it. `token` is the bearer token
    /// the agent authenticated with, which the plane then uses to call it.
    pub fn heartbeat(&self, hb: Heartbeat, token: &str) -> Result<HeartbeatOutcome, AgentError> {
        let mut inner = self.lock();
        if hb.node == self.local.node() {
            return Err(AgentError::Invalid(format!(
                "node: {:?} is the name of the server's own agent (give the agent another --node)",
                hb.node
            )));
        }
        // Names are unique among the agents: another agent (another boot, elsewhere) taking
        // the name of one that still heartbeats would have its sandboxes handed over, and
        // run twice. The same address with a new boot is that agent restarted; a new address
        // is taken once the old one has been silent for half the agent timeout (two of its
        // heartbeats missed), so an agent restarted elsewhere is never lost meanwhile.
        let quiet = self.timeout / 2;
        if let Some(i) = inner.sched.find(&hb.node) {
            let e = &inner.entries[i];
            let since = e.last_seen.elapsed();
            if e.heard && e.boot_id != hb.boot_id && e.address != hb.address && since < quiet {
                return Err(AgentError::Invalid(format!(
                    "node: {:?} is the name of the agent at {}, which is alive (its last \
                     heartbeat {} ago): give this agent another --node, or stop that one (its \
                     name is free {} after its last heartbeat)",
                    hb.node,
                    e.address,
                    crate::plane::duration_text(since),
                    crate::plane::duration_text(quiet)
                )));
            }
        }
        let i = Self::entry(&mut inner, &hb.node);
        // A node loaded from its registration was given the cluster's token: take the one
        // its agent presents.
        let fresh_handle = match &inner.entries[i].handle {
            NodeHandle::Remote(r) => {
                !inner.entries[i].heard
                    || r.base() != warren_agent::remote::base_url(&hb.address).unwrap_or_default()
            }
            _ => true,
        };
        let handle = if fresh_handle {
            Some(NodeHandle::Remote(Arc::new(RemoteAgent::new(
                &hb.node,
                &hb.address,
                token,
            )?)))
        } else {
            None
        };
        let entry = &mut inner.entries[i];
        let reconcile = entry.state != NodeState::Up || entry.boot_id != hb.boot_id || !entry.heard;
        entry.heard = true;
        if entry.lease == Lease::Expired {
            // Alive after all: its key is written again; until then its heartbeats decide.
            entry.lease = Lease::None;
        }
        if let Some(h) = handle {
            entry.handle = h;
        }
        entry.address = hb.address;
        entry.boot_id = hb.boot_id;
        entry.last_seen = Instant::now();
        entry.last_seen_ms = now_ms();
        entry.state = NodeState::Up;
        if let NodeHandle::Remote(r) = &entry.handle {
            r.set_lost(false);
        }
        let labels_changed = entry.labels != hb.labels;
        entry.labels = hb.labels;
        let kinds = available(&hb.backends);
        entry.backends = hb.backends;
        entry.images = hb.images.clone();
        let warm: Vec<(String, u32)> = hb
            .warm
            .iter()
            .map(|w| (image_key(&w.image), w.ready))
            .collect();
        let images: Vec<String> = hb.images.iter().map(|i| image_key(i)).collect();
        entry.warm = hb.warm;
        let warm_targets = entry.warm_targets.clone();
        let warm = Self::settled_warm(&mut inner, i, warm);
        inner.sched.configure(i, hb.capacity, &kinds);
        inner.sched.set_images(i, &images);
        inner.sched.set_warm(i, &warm);
        inner.sched.set_up(i, true);
        if labels_changed || reconcile {
            Self::refresh_pools(&mut inner);
        }
        Ok(HeartbeatOutcome {
            reconcile,
            warm_targets,
        })
    }

    /// Adds (or refreshes) a node from its registration in etcd, as a new leader does before
    /// it recovers: Up, called with the cluster's `token` until its agent heartbeats (with
    /// no token the node takes no new sandboxes until then). Returns whether the node is up.
    pub fn load_registration(
        &self,
        reg: &crate::registrations::Registration,
        token: Option<&str>,
    ) -> bool {
        if reg.node == self.local.node() {
            return false;
        }
        let handle = match RemoteAgent::new(&reg.node, &reg.address, token.unwrap_or_default()) {
            Ok(r) => NodeHandle::Remote(Arc::new(r)),
            Err(e) => {
                tracing::warn!(node = %reg.node, error = %e, "registration with a bad address ignored");
                return false;
            }
        };
        let mut inner = self.lock();
        let i = Self::entry(&mut inner, &reg.node);
        let entry = &mut inner.entries[i];
        if entry.heard {
            return entry.state == NodeState::Up;
        }
        entry.handle = handle;
        entry.address = reg.address.clone();
        entry.boot_id = reg.boot_id.clone();
        entry.labels = reg.labels.clone();
        entry.backends = reg.backends.clone();
        entry.images = reg.images.clone();
        entry.last_seen = Instant::now();
        entry.last_seen_ms = now_ms();
        entry.state = NodeState::Up;
        entry.lease = Lease::Held;
        let kinds = available(&reg.backends);
        let images: Vec<String> = reg.images.iter().map(|i| image_key(i)).collect();
        inner.sched.configure(i, reg.capacity, &kinds);
        inner.sched.set_images(i, &images);
        inner.sched.set_up(i, token.is_some());
        Self::refresh_pools(&mut inner);
        true
    }

    /// Whether `node`'s registration key exists (a watch on the keys says).
    pub fn set_lease(&self, node: &str, held: bool) {
        let mut inner = self.lock();
        if let Some(i) = inner.sched.find(node) {
            let entry = &mut inner.entries[i];
            if !entry.handle.is_local() {
                entry.lease = if held { Lease::Held } else { Lease::Expired };
            }
        }
    }

    /// After a watch on the keys started again: the nodes named have keys, the others that
    /// had one have lost it.
    pub fn set_leases_present(&self, present: &[String]) {
        let mut inner = self.lock();
        for i in 0..inner.entries.len() {
            let has = present.iter().any(|n| n == inner.sched.name(i));
            let entry = &mut inner.entries[i];
            if entry.handle.is_local() {
                continue;
            }
            entry.lease = match (entry.lease, has) {
                (_, true) => Lease::Held,
                (Lease::Held, false) => Lease::Expired,
                (other, false) => other,
            };
        }
    }

    /// Marks nodes whose agent is no longer alive as Lost; returns their names. A node that
    /// waited since start-up without registering is lost too, after the same timeout.
    pub fn check(&self) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut lost = Vec::new();
        for i in 0..inner.entries.len() {
            let entry = &inner.entries[i];
            if entry.state == NodeState::Lost || self.is_alive(entry, now) {
                continue;
            }
            inner.entries[i].state = NodeState::Lost;
            let silent = inner.entries[i].last_seen.elapsed() >= self.timeout;
            if let NodeHandle::Remote(r) = &inner.entries[i].handle
                && silent
            {
                // Calls waiting on it (a create, a stop) end now, not at their deadlines:
                // it stopped answering. (One whose lease alone expired, its heartbeats still
                // arriving, is slow to reach etcd, not gone: its calls go on.)
                r.set_lost(true);
            }
            inner.sched.set_up(i, false);
            lost.push(inner.sched.name(i).to_string());
        }
        lost
    }

    /// The nodes now Lost.
    pub fn lost(&self) -> Vec<String> {
        let inner = self.lock();
        (0..inner.entries.len())
            .filter(|&i| inner.entries[i].state == NodeState::Lost)
            .map(|i| inner.sched.name(i).to_string())
            .collect()
    }

    /// Why `node` counts as lost, for its sandboxes' reason: its registration's lease
    /// expired, or (with no lease) it sent no heartbeat within the agent timeout.
    pub fn lost_why(&self, node: &str) -> String {
        let inner = self.lock();
        let lease = inner.sched.find(node).map(|i| inner.entries[i].lease);
        match lease {
            Some(Lease::Expired) => format!(
                "its registration's lease expired (no heartbeat renewed it for {})",
                crate::plane::duration_text(self.timeout)
            ),
            _ => format!(
                "no heartbeat for {}",
                crate::plane::duration_text(self.timeout)
            ),
        }
    }

    /// Whether `node` is up (schedulable).
    pub fn is_up(&self, node: &str) -> bool {
        let inner = self.lock();
        inner
            .sched
            .find(node)
            .is_some_and(|i| inner.entries[i].state == NodeState::Up)
    }

    /// Nodes that are up, the in-process one included.
    pub fn up_count(&self) -> usize {
        self.lock()
            .entries
            .iter()
            .filter(|e| e.state == NodeState::Up)
            .count()
    }

    pub fn list(&self) -> Vec<NodeInfo> {
        let inner = self.lock();
        let mut out: Vec<NodeInfo> = inner
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (used, capacity) = inner.sched.load(i);
                NodeInfo {
                    name: inner.sched.name(i).to_string(),
                    address: e.address.clone(),
                    state: e.state,
                    local: e.handle.is_local(),
                    capacity,
                    sandboxes: used,
                    backends: e.backends.clone(),
                    images: e.images.clone(),
                    warm: e.warm.clone(),
                    labels: e.labels.clone(),
                    last_seen_ms: e.last_seen_ms,
                    host_ports: inner.sched.ports(i),
                    boot_id: e.boot_id.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Refreshes the in-process agent's pre-warmed sandboxes in the scheduler.
    pub fn refresh_local_warm(&self) {
        let warm: Vec<WarmState> = self
            .local
            .warm()
            .into_iter()
            .map(|(backend, image, ready, target)| WarmState {
                backend,
                image,
                ready: ready as u32,
                target: target as u32,
            })
            .collect();
        let pairs: Vec<(String, u32)> = warm
            .iter()
            .map(|w| (image_key(&w.image), w.ready))
            .collect();
        let mut inner = self.lock();
        if let Some(i) = inner.sched.find(self.local.node()) {
            let pairs = Self::settled_warm(&mut inner, i, pairs);
            inner.sched.set_warm(i, &pairs);
            inner.entries[i].warm = warm;
        }
    }

    /// Sets a pool's members (up or not) from its node selector and backend; `None`
    /// removes the pool.
    pub fn set_pool(&self, pool: &str, rule: Option<(Selector, BackendKind)>) {
        let mut inner = self.lock();
        match rule {
            Some(rule) => {
                inner.pools.insert(pool.to_string(), rule);
            }
            None => {
                inner.pools.remove(pool);
                inner.sched.set_pool(pool, None);
            }
        }
        Self::refresh_pools(&mut inner);
    }

    fn refresh_pools(inner: &mut Inner) {
        let pools: Vec<(String, Vec<usize>)> = inner
            .pools
            .iter()
            .map(|(name, (selector, backend))| {
                let members = inner
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| {
                        selector.matches(&e.labels)
                            && e.backends.iter().any(|b| b.kind == *backend && b.available)
                    })
                    .map(|(i, _)| i)
                    .collect();
                (name.clone(), members)
            })
            .collect();
        for (name, members) in pools {
            inner.sched.set_pool(&name, Some(&members));
        }
    }

    /// Members of a pool that are up and can take sandboxes, by name: a node of capacity 0
    /// (the server's own under `--local-capacity 0`) gets no share of the pool's pre-warmed
    /// sandboxes, which could never be handed out there.
    pub fn pool_members(&self, pool: &str) -> Vec<String> {
        let inner = self.lock();
        let Some((selector, backend)) = inner.pools.get(pool) else {
            return Vec::new();
        };
        let mut names: Vec<String> = inner
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                e.state == NodeState::Up
                    && selector.matches(&e.labels)
                    && e.backends.iter().any(|b| b.kind == *backend && b.available)
                    && inner.sched.load(*i).1 > 0
            })
            .map(|(i, _)| inner.sched.name(i).to_string())
            .collect();
        names.sort();
        names
    }

    /// What each node should keep pre-warmed; returns the in-process agent's share (the
    /// plane applies it; remote agents get theirs with their next heartbeat reply).
    pub fn set_warm_targets(
        &self,
        targets: &HashMap<String, Vec<(BackendKind, String, u32)>>,
    ) -> Vec<(BackendKind, String, u32)> {
        let mut inner = self.lock();
        let local = self.local.node().to_string();
        let mut mine = Vec::new();
        for i in 0..inner.entries.len() {
            let name = inner.sched.name(i).to_string();
            let t = targets.get(&name).cloned().unwrap_or_default();
            if name == local {
                mine = t.clone();
            }
            inner.entries[i].warm_targets = t;
        }
        mine
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use warren_runtime::{Backend, SlotBackend, SlotCapacity};

    use super::*;

    fn nodes(dir: &std::path::Path, local_capacity: Option<u32>, timeout: Duration) -> Nodes {
        let slot = SlotBackend::new(dir, SlotCapacity::default()).unwrap();
        let agent = Agent::new("local", [Arc::new(slot) as Arc<dyn Backend>]);
        Nodes::new(agent, local_capacity, timeout)
    }

    fn hb(name: &str, capacity: u32) -> Heartbeat {
        Heartbeat {
            node: name.into(),
            address: "127.0.0.1:1".into(),
            boot_id: "b1".into(),
            capacity,
            backends: vec![BackendState {
                kind: BackendKind::Slot,
                available: true,
                reason: String::new(),
            }],
            ..Default::default()
        }
    }

    fn slot() -> Demand<'static> {
        Demand {
            backend: BackendKind::Slot,
            image: None,
            ports: &[],
            pool: None,
            avoid: None,
        }
    }

    /// A second agent under the name of one that still heartbeats is refused, naming the
    /// first; the first restarted (same address, new boot) is not, and once the first has
    /// been silent for half the timeout, its name is free.
    #[test]
    fn a_name_held_by_a_live_agent_is_refused_to_another() {
        let tmp = tempfile::tempdir().unwrap();
        let n = nodes(tmp.path(), Some(0), Duration::from_millis(1000));
        n.heartbeat(hb("a", 2), "t").unwrap();
        let mut other = hb("a", 2);
        other.boot_id = "b9".into();
        other.address = "127.0.0.1:2".into();
        let err = n.heartbeat(other.clone(), "t").unwrap_err().to_string();
        assert!(
            err.starts_with("node: \"a\" is the name of the agent at 127.0.0.1:1, which is alive"),
            "{err}"
        );
        let mut restarted = hb("a", 2);
        restarted.boot_id = "b2".into();
        assert!(n.heartbeat(restarted, "t").unwrap().reconcile);
        // Silent for half the timeout: the name is taken by the newcomer (an agent restarted
        // at a new address) before the node would be lost.
        std::thread::sleep(Duration::from_millis(600));
        assert!(n.heartbeat(other, "t").unwrap().reconcile);
        assert_eq!(n.up_count(), 2, "the local node and a");
    }

    #[test]
    fn agents_register_heartbeat_and_get_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let n = nodes(tmp.path(), Some(0), Duration::from_millis(100));
        assert!(n.allocate(&slot()).is_err(), "local capacity 0");
        let out = n.heartbeat(hb("a", 2), "t").unwrap();
        assert!(out.reconcile, "a new node is handed its sandboxes");
        assert!(!n.heartbeat(hb("a", 2), "t").unwrap().reconcile);
        let mut restarted = hb("a", 2);
        restarted.boot_id = "b2".into();
        assert!(n.heartbeat(restarted, "t").unwrap().reconcile);
        assert_eq!(n.allocate(&slot()).unwrap().0, "a");
        assert!(matches!(n.handle("a"), NodeHandle::Remote(_)));
        assert_eq!(n.up_count(), 2);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(n.check(), vec!["a".to_string()]);
        assert!(n.check().is_empty(), "lost once");
        assert!(!n.is_up("a"));
        assert!(n.allocate(&slot()).is_err(), "a lost node gets nothing");
        assert!(n.heartbeat(hb("a", 2), "t").unwrap().reconcile, "came back");
        let e = n.heartbeat(hb("local", 1), "t").unwrap_err();
        assert!(e.to_string().contains("server's own agent"), "{e}");
    }

    /// A heartbeat sent before the agent took a handed-out warm sandbox does not count it
    /// again: the next create is not placed on a pool that is already empty.
    #[test]
    fn stale_warm_reports_do_not_undo_a_hand_out() {
        let tmp = tempfile::tempdir().unwrap();
        let n = nodes(tmp.path(), Some(0), Duration::from_secs(60));
        let with_warm = |ready: u32| {
            let mut h = hb("a", 10);
            h.images = vec!["busybox".into()];
            h.warm = vec![WarmState {
                backend: BackendKind::Slot,
                image: "busybox".into(),
                ready,
                target: 1,
            }];
            h
        };
        n.heartbeat(with_warm(1), "t").unwrap();
        let image = image_key("busybox");
        let d = Demand {
            image: Some(&image),
            ..slot()
        };
        let warm = crate::scheduler::Affinity::Warm;
        assert_eq!(n.allocate(&d).unwrap().1.affinity, warm);
        // The agent's report crossed the create: it still says 1 ready.
        n.heartbeat(with_warm(1), "t").unwrap();
        assert_ne!(
            n.allocate(&d).unwrap().1.affinity,
            warm,
            "the pool is empty"
        );
        // It may say fewer at once...
        n.heartbeat(with_warm(0), "t").unwrap();
        assert_ne!(n.allocate(&d).unwrap().1.affinity, warm);
        // ...and more once the hand-out has settled (a refill).
        std::thread::sleep(HANDOUT_SETTLE + Duration::from_millis(50));
        n.heartbeat(with_warm(1), "t").unwrap();
        assert_eq!(n.allocate(&d).unwrap().1.affinity, warm);
    }

    /// Pools spread their pre-warmed sandboxes over the nodes that can take sandboxes.
    #[test]
    fn nodes_without_capacity_get_no_share_of_a_pool() {
        let tmp = tempfile::tempdir().unwrap();
        let n = nodes(tmp.path(), Some(0), Duration::from_secs(60));
        n.heartbeat(hb("a", 2), "t").unwrap();
        n.heartbeat(hb("full", 0), "t").unwrap();
        let every = Selector::parse("").unwrap();
        n.set_pool("p", Some((every, BackendKind::Slot)));
        assert_eq!(n.pool_members("p"), vec!["a".to_string()]);
    }

    #[test]
    fn recovered_sandboxes_wait_for_their_node() {
        let tmp = tempfile::tempdir().unwrap();
        let n = nodes(tmp.path(), Some(0), Duration::from_millis(50));
        n.take("gone", &[]);
        let list = n.list();
        let gone = list.iter().find(|i| i.name == "gone").unwrap();
        assert_eq!((gone.state, gone.sandboxes), (NodeState::Waiting, 1));
        assert!(matches!(n.handle("gone"), NodeHandle::Unregistered(_)));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(n.check(), vec!["gone".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_allocations_never_double_book() {
        let tmp = tempfile::tempdir().unwrap();
        let n = Arc::new(nodes(tmp.path(), Some(0), Duration::from_secs(60)));
        for k in 0..20 {
            n.heartbeat(hb(&format!("a{k}"), 25), "t").unwrap();
        }
        let port = [HostPort {
            protocol: warren_spec::Protocol::Tcp,
            port: 9000,
        }];
        let mut tasks = Vec::new();
        for t in 0..64 {
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for k in 0..10 {
                    // Every 4th asks for the same host port.
                    let ports: &[HostPort] = if (t + k) % 4 == 0 { &port } else { &[] };
                    let d = Demand { ports, ..slot() };
                    if let Ok((name, _)) = n.allocate(&d) {
                        got.push((name, !ports.is_empty()));
                    }
                    tokio::task::yield_now().await;
                }
                got
            }));
        }
        let mut per_node: HashMap<String, (u32, u32)> = HashMap::new();
        for t in tasks {
            for (name, with_port) in t.await.unwrap() {
                let e = per_node.entry(name).or_default();
                e.0 += 1;
                e.1 += u32::from(with_port);
            }
        }
        let total: u32 = per_node.values().map(|v| v.0).sum();
        let with_port: u32 = per_node.values().map(|v| v.1).sum();
        // 640 asked for 500 slots: the 480 without a port all fit; of the 160 wanting port
        // 9000, at most one per agent can have it.
        assert_eq!(total - with_port, 480, "{per_node:?}");
        assert!((1..=20).contains(&with_port), "{per_node:?}");
        for (name, (used, ports)) in &per_node {
            assert!(*used <= 25, "{name} over capacity: {used}");
            assert!(*ports <= 1, "{name} gave port 9000 {ports} times");
        }
        for info in n.list().iter().filter(|i| !i.local) {
            assert_eq!(info.sandboxes, per_node[&info.name].0);
        }
    }
}
