//! The `warren.v1.Nodes` and `warren.v1.Pools` gRPC services, and the wire conversions of
//! their messages (both sides: the agent's link uses them too).

use tonic::{Request, Response, Status};
use warren_agent::api::{BackendState, WarmState};
use warren_proto::v1::{self, nodes_server::Nodes as NodesApi, pools_server::Pools as PoolsApi};
use warren_runtime::{BackendEvent, BackendStatus};
use warren_spec::BackendKind;

use crate::grpc::status_of;
use crate::nodes::{Heartbeat, NodeInfo};
use crate::plane::{ControlPlane, PoolEntry, PoolSpec};

/// The heartbeat interval the server asks agents for: a quarter of the agent timeout, so
/// a lost heartbeat or two never makes an agent lost.
fn interval_ms(plane: &ControlPlane) -> u32 {
    u32::try_from(plane.nodes().timeout().as_millis() / 4)
        .unwrap_or(u32::MAX)
        .clamp(50, 10_000)
}

fn backend(field: &str, name: &str) -> Result<BackendKind, Status> {
    name.parse::<BackendKind>()
        .map_err(|e| Status::invalid_argument(e.in_field(field).to_string()))
}

pub fn backend_state_to_pb(b: &BackendState) -> v1::BackendInfo {
    v1::BackendInfo {
        name: b.kind.to_string(),
        available: b.available,
        reason: b.reason.clone(),
        sandboxes: 0,
        // How a backend runs (e.g. KVM or TCG) is reported by the server's own node only.
        detail: String::new(),
    }
}

pub fn warm_to_pb(w: &WarmState) -> v1::WarmImage {
    v1::WarmImage {
        backend: w.backend.to_string(),
        image: w.image.clone(),
        ready: w.ready,
        target: w.target,
    }
}

/// A sandbox status change as the agent reports it.
pub fn change_to_pb(ev: &BackendEvent) -> v1::SandboxStatusChange {
    let (state, exit_code, reason) = match &ev.status {
        BackendStatus::Created => ("Created", None, String::new()),
        BackendStatus::Running => ("Running", None, String::new()),
        BackendStatus::Stopped => ("Stopped", None, String::new()),
        BackendStatus::Exited { code } => ("Exited", Some(*code), String::new()),
        BackendStatus::Failed { reason } => ("Failed", None, reason.clone()),
    };
    v1::SandboxStatusChange {
        id: ev.id.clone(),
        state: state.to_string(),
        exit_code,
        reason,
    }
}

fn change_from_pb(c: v1::SandboxStatusChange) -> Result<BackendEvent, Status> {
    let status = match c.state.as_str() {
        "Created" => BackendStatus::Created,
        "Running" => BackendStatus::Running,
        "Stopped" => BackendStatus::Stopped,
        "Exited" => BackendStatus::Exited {
            code: c.exit_code.unwrap_or(0),
        },
        "Failed" => BackendStatus::Failed { reason: c.reason },
        other => {
            return Err(Status::invalid_argument(format!(
                "changes[].state: {other:?} is not a status (Running, Stopped, Exited, Failed)"
            )));
        }
    };
    Ok(BackendEvent { id: c.id, status })
}

fn node_to_pb(n: &NodeInfo) -> v1::Node {
    v1::Node {
        name: n.name.clone(),
        address: n.address.clone(),
        state: n.state.as_str().to_string(),
        local: n.local,
        capacity: n.capacity,
        sandboxes: n.sandboxes,
        backends: n.backends.iter().map(backend_state_to_pb).collect(),
        images: n.images.clone(),
        warm: n.warm.iter().map(warm_to_pb).collect(),
        labels: n.labels.clone().into_iter().collect(),
        last_seen_ms: n.last_seen_ms,
        host_ports: n.host_ports.iter().map(ToString::to_string).collect(),
        boot_id: n.boot_id.clone(),
    }
}

/// The bearer token a call came with (the agent's: the plane calls it back with it).
fn bearer<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

#[derive(Debug, Clone)]
pub struct NodesService {
    plane: ControlPlane,
    /// On etcd: the server's role (only the leader serves) and the agents' registrations.
    roles: Option<tokio::sync::watch::Receiver<crate::leader::Role>>,
    registrations: Option<std::sync::Arc<crate::registrations::Registrations>>,
}

impl NodesService {
    pub fn new(plane: ControlPlane) -> Self {
        NodesService {
            plane,
            roles: None,
            registrations: None,
        }
    }

    /// On etcd: calls pass only on the leader (the service gates them itself, rather than
    /// an interceptor, so that a refused heartbeat still renews its agent's lease).
    pub fn with_leader(
        mut self,
        roles: Option<tokio::sync::watch::Receiver<crate::leader::Role>>,
        registrations: Option<std::sync::Arc<crate::registrations::Registrations>>,
    ) -> Self {
        self.roles = roles;
        self.registrations = registrations;
        self
    }

    #[allow(clippy::result_large_err)] // tonic's Status.
    fn admit(&self) -> Result<(), Status> {
        match crate::server::refusal(&self.roles) {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl NodesApi for NodesService {
    async fn heartbeat(
        &self,
        req: Request<v1::AgentHeartbeat>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        let token = bearer(&req);
        let hb = req.into_inner();
        warren_spec::validate_name("node", &hb.node)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Err(refused) = self.admit() {
            // Not the leader (a standby, or one still recovering): the agent is alive all
            // the same, and its key must outlive a fail-over.
            if let Some(r) = &self.registrations {
                r.renew(&hb.node);
            }
            return Err(refused);
        }
        warren_agent::remote::base_url(&hb.address)
            .map_err(|e| Status::invalid_argument(format!("address: {e}")))?;
        let backends = hb
            .backends
            .iter()
            .map(|b| {
                Ok(BackendState {
                    kind: backend("backends[].name", &b.name)?,
                    available: b.available,
                    reason: b.reason.clone(),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let warm = hb
            .warm
            .iter()
            .map(|w| {
                Ok(WarmState {
                    backend: backend("warm[].backend", &w.backend)?,
                    image: w.image.clone(),
                    ready: w.ready,
                    target: w.target,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let changes = hb
            .changes
            .into_iter()
            .map(change_from_pb)
            .collect::<Result<Vec<_>, Status>>()?;
        let heartbeat = Heartbeat {
            node: hb.node,
            address: hb.address,
            boot_id: hb.boot_id,
            capacity: hb.capacity,
            labels: hb.labels.into_iter().collect(),
            backends,
            images: hb.images,
            warm,
        };
        let registration = self.registrations.as_ref().map(|r| (r, heartbeat.clone()));
        let outcome = self
            .plane
            .heartbeat(heartbeat, changes, &token)
            .map_err(status_of)?;
        if let Some((r, hb)) = registration {
            r.beat(&hb);
        }
        Ok(Response::new(v1::HeartbeatReply {
            interval_ms: interval_ms(&self.plane),
            warm_targets: outcome
                .warm_targets
                .iter()
                .map(|(b, image, n)| v1::WarmImage {
                    backend: b.to_string(),
                    image: image.clone(),
                    ready: 0,
                    target: *n,
                })
                .collect(),
        }))
    }

    async fn reconcile(
        &self,
        req: Request<v1::ReconcileRequest>,
    ) -> Result<Response<v1::ReconcileReply>, Status> {
        self.admit()?;
        let req = req.into_inner();
        Ok(Response::new(v1::ReconcileReply {
            unknown: self.plane.unknown_ids(req.ids),
        }))
    }

    async fn list_nodes(
        &self,
        _req: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.admit()?;
        Ok(Response::new(v1::ListNodesResponse {
            nodes: self.plane.nodes().list().iter().map(node_to_pb).collect(),
        }))
    }
}

pub fn pool_spec_to_pb(s: &PoolSpec) -> v1::PoolSpec {
    v1::PoolSpec {
        backend: s.backend.to_string(),
        image: s.image.clone(),
        min: s.min,
        max: s.max,
        buffer_min: s.buffer_min,
        buffer_max: s.buffer_max,
        node_selector: s.node_selector.clone(),
    }
}

pub fn pool_spec_from_pb(s: v1::PoolSpec) -> Result<PoolSpec, Status> {
    Ok(PoolSpec {
        backend: if s.backend.is_empty() {
            BackendKind::Linux
        } else {
            backend("spec.backend", &s.backend)?
        },
        image: s.image,
        min: s.min,
        max: s.max,
        buffer_min: s.buffer_min,
        buffer_max: s.buffer_max,
        node_selector: s.node_selector,
    })
}

#[derive(Debug, Clone)]
pub struct PoolsService {
    plane: ControlPlane,
}

impl PoolsService {
    pub fn new(plane: ControlPlane) -> Self {
        PoolsService { plane }
    }

    fn to_pb(&self, e: &PoolEntry) -> v1::Pool {
        let st = self.plane.pool_status(e);
        v1::Pool {
            name: e.name.clone(),
            spec: Some(pool_spec_to_pb(&e.spec)),
            status: Some(v1::PoolStatus {
                in_use: st.in_use,
                ready: st.ready,
                target: st.target,
                nodes: st.nodes,
                hits: st.hits,
                misses: st.misses,
            }),
            revision: e.revision,
            created_at_ms: e.created_at_ms,
            updated_at_ms: e.updated_at_ms,
        }
    }
}

#[tonic::async_trait]
impl PoolsApi for PoolsService {
    async fn apply_pool(
        &self,
        req: Request<v1::ApplyPoolRequest>,
    ) -> Result<Response<v1::ApplyPoolResponse>, Status> {
        let req = req.into_inner();
        let spec = pool_spec_from_pb(
            req.spec
                .ok_or_else(|| Status::invalid_argument("invalid pool: spec: missing"))?,
        )
        .map_err(|s| Status::invalid_argument(format!("invalid pool: {}", s.message())))?;
        let (entry, created, changed) = self
            .plane
            .apply_pool(&req.name, spec)
            .await
            .map_err(status_of)?;
        Ok(Response::new(v1::ApplyPoolResponse {
            pool: Some(self.to_pb(&entry)),
            created,
            changed,
        }))
    }

    async fn get_pool(
        &self,
        req: Request<v1::GetPoolRequest>,
    ) -> Result<Response<v1::Pool>, Status> {
        let entry = self
            .plane
            .get_pool(&req.into_inner().name)
            .map_err(status_of)?;
        Ok(Response::new(self.to_pb(&entry)))
    }

    async fn list_pools(
        &self,
        _req: Request<v1::ListPoolsRequest>,
    ) -> Result<Response<v1::ListPoolsResponse>, Status> {
        Ok(Response::new(v1::ListPoolsResponse {
            pools: self
                .plane
                .list_pools()
                .iter()
                .map(|e| self.to_pb(e))
                .collect(),
        }))
    }

    async fn delete_pool(
        &self,
        req: Request<v1::DeletePoolRequest>,
    ) -> Result<Response<v1::Pool>, Status> {
        let entry = self
            .plane
            .delete_pool(&req.into_inner().name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(self.to_pb(&entry)))
    }
}
