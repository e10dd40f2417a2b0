//! `warren server`: the control plane with its in-process agent, serving gRPC.
//!
//! Start-up order: state dir -> store (locks the dir against a second server) -> backends ->
//! recover every record and reconcile with the backends -> bind -> serve. Nothing is served
//! before recovery ends, so no client sees a half-loaded registry.
//!
//! On etcd (`--store etcd://...`) several servers share the state and elect a leader
//! ([`crate::leader`]): each binds and serves at once, but a gate in front of every service
//! answers UNAVAILABLE (naming the leader) until this server has won the election and
//! recovered every record from etcd. A leader that loses its leadership stops serving and
//! `run` returns [`ServerError::Deposed`].

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server as TonicServer;
use tonic::{Request, Status};
use tracing::{info, warn};
use warren_agent::Agent;
use warren_image::ImageStore;
use warren_linux::{LinuxBackend, LinuxConfig};
use warren_proto::v1::checkpoints_server::CheckpointsServer;
use warren_proto::v1::images_server::ImagesServer;
use warren_proto::v1::nodes_server::NodesServer;
use warren_proto::v1::policies_server::PoliciesServer;
use warren_proto::v1::pools_server::PoolsServer;
use warren_proto::v1::sandboxes_server::SandboxesServer;
use warren_runtime::{Backend, SlotBackend, SlotCapacity};
use warren_vm::{VmBackend, VmBackendConfig, VmConfig};
use warren_wasm::{WasmBackend, WasmConfig};

use crate::address::Address;
use crate::grpc::SandboxService;
use crate::leader::{Election, Role};
use crate::plane::{ControlError, ControlPlane};
use crate::store::{EtcdStore, RedbStore, Store, StoreError, StoreUrl};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub dir: PathBuf,
    pub listen: Address,
    /// Required for TCP; checked on every call when set.
    pub token: Option<String>,
    pub node: String,
    pub slot_capacity: SlotCapacity,
    /// Where the slot backend writes `<id>/resources.json`; `<dir>/slot` when `None`.
    pub slot_dir: Option<PathBuf>,
    /// Where the linux backend keeps its sandboxes (bundles, logs, overlay upper layers);
    /// `<dir>/linux` when `None`.
    pub linux_dir: Option<PathBuf>,
    pub wasm: WasmConfig,
    /// SIGTERM-to-SIGKILL time for deletes that do not give one.
    pub default_grace: Duration,
    /// How the linux backend starts its per-sandbox supervisor (program and leading
    /// arguments); [`LinuxConfig::default_supervisor`] finds the one beside this executable.
    pub linux_supervisor: Vec<std::ffi::OsString>,
    /// Parent of every linux sandbox's cgroup.
    pub cgroup_parent: String,
    /// Warm shells kept ready per image for the linux backend.
    pub linux_warm: Vec<(String, usize)>,
    /// Clones kept ready per image for the vm backend.
    pub vm_warm: Vec<(String, usize)>,
    /// The CRIU binary for checkpoints; `None` finds one (`warren_linux::criu`).
    pub criu: Option<PathBuf>,
    /// How long CRIU may take to restore a linux checkpoint before it is killed.
    pub restore_timeout: Duration,
    /// The key checkpoints are sealed with; `None`: `<dir>/checkpoint.key`, made if absent.
    pub checkpoint_key: Option<PathBuf>,
    /// The IPv4 range `network.mode: egress` linux sandboxes take their addresses from
    /// (a `/30` each); [`DEFAULT_EGRESS_RANGE`] unless configured.
    pub linux_egress_range: String,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (HTTP); `None`: nowhere.
    pub metrics_listen: Option<String>,
    /// A metrics address that cannot be bound fails the start (else: a warning, no metrics).
    pub metrics_required: bool,
    /// `--default-policy`: the policy for sandboxes that name none, which must then exist.
    /// `None`: a policy named `default` if one is stored, else none (docs/policy.md).
    pub default_policy: Option<String>,
    /// Agents, consistency default and failure handling (`--local-capacity`,
    /// `--agent-timeout`, `--consistency`, `--orphan-timeout`).
    pub cluster: ClusterConfig,
    /// The vm backend's configuration (`--vm-config`), or why it could not be read (then
    /// the backend is unavailable with that reason).
    pub vm: Result<VmConfig, String>,
}

/// The server's settings for several nodes.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Most sandboxes the in-process agent holds (`None`: no limit but the backends'; 0:
    /// the server only controls `warren agent` processes).
    pub local_capacity: Option<u32>,
    /// A remote agent silent this long is lost (its sandboxes too).
    pub agent_timeout: Duration,
    /// Consistency of creates whose spec names none.
    pub consistency: warren_spec::Consistency,
    /// The in-process agent's janitor removes sandboxes the plane does not know after
    /// this long.
    pub orphan_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            local_capacity: None,
            agent_timeout: crate::nodes::DEFAULT_AGENT_TIMEOUT,
            consistency: warren_spec::Consistency::Fast,
            orphan_timeout: warren_agent::janitor::DEFAULT_ORPHAN_TIMEOUT,
        }
    }
}

/// Which store a server keeps its state in, and (etcd) how it takes part in the election.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    pub url: StoreUrl,
    /// etcd: the address standbys name to clients; default: the bound listen address.
    pub advertise: Option<String>,
    /// etcd: the leader lease's TTL ([`crate::leader::DEFAULT_TTL`] when `None`).
    pub leader_ttl: Option<Duration>,
}

/// Where a server on `dir` (its `--dir`) keeps its image store.
pub fn images_dir(dir: &Path) -> PathBuf {
    dir.join("images")
}

/// The vm backend's directory of a server on `dir` (its `--dir`).
pub fn vm_dir(dir: &Path) -> PathBuf {
    dir.join("vm")
}

/// The metrics address when none is given: loopback only (metrics describe the node's
/// workload; expose them wider on purpose, with `--metrics-listen 0.0.0.0:9091`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9091";

/// The linux backend's egress range when none is given: RFC 2544's benchmarking block,
/// which clashes with no LAN or public address (see crates/linux/src/egress.rs).
pub const DEFAULT_EGRESS_RANGE: &str = warren_linux::egress::DEFAULT_RANGE;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "listening on {0} needs a token: pass --token or set WARREN_TOKEN (TCP is reachable by anyone who can connect)"
    )]
    TcpWithoutToken(Address),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another warren server is already listening on {0}")]
    InUse(Address),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot set up the {backend} backend: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    /// The checkpoint key or store cannot be used; the message is the whole cause.
    #[error("checkpoints: {0}")]
    Checkpoints(String),
    #[error("recovery failed")]
    Recover(#[source] ControlError),
    #[error("serving gRPC failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("this server lost its leadership ({reason}); it stopped serving")]
    Deposed { reason: String },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A server that has recovered its state and bound its address, ready to [`Server::run`].
pub struct Server {
    plane: ControlPlane,
    images: ImageStore,
    listener: Listener,
    address: Address,
    token: Option<Arc<str>>,
    metrics: Option<(TcpListener, std::net::SocketAddr)>,
    orphan_timeout: Duration,
    /// On etcd: this server's part in the leader election.
    election: Option<Arc<Election>>,
    /// On etcd: the agents' registrations under leases.
    registrations: Option<Arc<crate::registrations::Registrations>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("address", &self.address)
            .finish()
    }
}

impl Server {
    /// A server on the embedded store (`<dir>/state.redb`).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        Self::bind_with(config, StoreConfig::default()).await
    }

    /// A server on the store `store` names.
    pub async fn bind_with(config: ServerConfig, store: StoreConfig) -> Result<Self, ServerError> {
        if matches!(config.listen, Address::Tcp(_)) && config.token.is_none() {
            return Err(ServerError::TcpWithoutToken(config.listen));
        }
        std::fs::create_dir_all(&config.dir).map_err(io("create", &config.dir))?;
        std::fs::set_permissions(&config.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restrict", &config.dir))?;
        let store_config = store;
        let (store, etcd): (Arc<dyn Store>, Option<Arc<EtcdStore>>) = match &store_config.url {
            StoreUrl::Redb => (
                Arc::new(RedbStore::open(config.dir.join("state.redb"))?),
                None,
            ),
            StoreUrl::RedbAt(path) => (Arc::new(RedbStore::open(path)?), None),
            StoreUrl::Etcd(endpoints) => {
                let etcd = Arc::new(EtcdStore::open(endpoints).await?);
                // A standby until elected: nothing this server does may write before.
                etcd.set_fence(crate::store::Fence::Standby { leader: None });
                (etcd.clone(), Some(etcd))
            }
        };
        let slot_dir = config
            .slot_dir
            .clone()
            .unwrap_or_else(|| config.dir.join("slot"));
        let slot =
            SlotBackend::new(slot_dir, config.slot_capacity).map_err(|e| ServerError::Backend {
                backend: "slot",
                message: e.to_string(),
            })?;
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let images =
            ImageStore::open(&images_dir(&config.dir)).map_err(|e| ServerError::Backend {
                backend: "image store",
                message: crate::images::error_chain(&e),
            })?;
        let wasm = WasmBackend::with_images(
            config.dir.join("wasm"),
            config.wasm.clone(),
            events.clone(),
            Some(images.clone()),
        )
        .map_err(|e| ServerError::Backend {
            backend: "wasm",
            message: e.to_string(),
        })?;
        let linux = LinuxBackend::new(
            LinuxConfig {
                dir: config
                    .linux_dir
                    .clone()
                    .unwrap_or_else(|| config.dir.join("linux")),
                images: images.clone(),
                supervisor: config.linux_supervisor.clone(),
                cgroup_parent: config.cgroup_parent.clone(),
                log_max_bytes: config.wasm.log_max_bytes,
                default_stop_grace: config.default_grace,
                warm: config.linux_warm.clone(),
                criu: config.criu.clone(),
                restore_timeout: config.restore_timeout,
                egress_range: warren_linux::egress::parse_range(&config.linux_egress_range)
                    .map_err(|e| ServerError::Backend {
                        backend: "linux",
                        message: e.to_string(),
                    })?,
            },
            events.clone(),
        )
        .map_err(|e| ServerError::Backend {
            backend: "linux",
            message: e.to_string(),
        })?;
        let (vm_config, config_error) = match &config.vm {
            Ok(c) => (c.clone(), None),
            Err(e) => (VmConfig::default(), Some(e.clone())),
        };
        let vm = VmBackend::new(
            VmBackendConfig {
                dir: vm_dir(&config.dir),
                vm: vm_config,
                config_error,
                images: Some(images.clone()),
                cgroup_parent: config.cgroup_parent.clone(),
                log_max_bytes: config.wasm.log_max_bytes,
                default_stop_grace: config.default_grace,
                warm: config.vm_warm.clone(),
            },
            events.clone(),
        )
        .map_err(|e| ServerError::Backend {
            backend: "vm",
            message: e.to_string(),
        })?;
        let backends: Vec<Arc<dyn Backend>> = vec![
            Arc::new(slot),
            Arc::new(wasm),
            Arc::new(linux),
            Arc::new(vm),
        ];
        let agent = Agent::new(config.node.clone(), backends.iter().cloned());
        for report in agent.report() {
            match &report.available {
                Ok(()) => info!(backend = %report.kind, "backend available"),
                Err(reason) => {
                    info!(backend = %report.kind, reason = %reason, "backend unavailable")
                }
            }
        }
        let plane = ControlPlane::with_options(
            agent,
            store,
            crate::plane::PlaneOptions {
                default_grace: config.default_grace,
                local_capacity: config.cluster.local_capacity,
                agent_timeout: config.cluster.agent_timeout,
                default_consistency: config.cluster.consistency,
            },
        );
        plane.set_default_policy(config.default_policy.clone());
        let checkpoints = {
            use crate::checkpoints::store::{CheckpointError, CheckpointKey, CheckpointStore};
            // A key file named in the config must exist (a typo must not make a new key
            // that other servers do not share); the server's own default is made.
            let key = match &config.checkpoint_key {
                Some(path) => CheckpointKey::load(path).map_err(|e| match e {
                    CheckpointError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        CheckpointError::Key {
                            path: path.display().to_string(),
                            reason: "no such file: --checkpoint-key names an existing key (make \
                                     one with `openssl rand -hex 32 > FILE; chmod 600 FILE`)"
                                .into(),
                        }
                    }
                    other => other,
                }),
                None => CheckpointKey::load_or_create(&config.dir.join("checkpoint.key")),
            };
            key.and_then(|key| CheckpointStore::open(&config.dir.join("checkpoints"), key))
                .map_err(|e| ServerError::Checkpoints(warren_runtime::error_chain(&e)))?
        };
        plane.enable_checkpoints(checkpoints, backends);
        // Events are consumed from before recovery, so exits noticed while adopting count.
        plane.spawn_event_loop(events_rx);
        if etcd.is_none() {
            let n = plane.recover().await.map_err(ServerError::Recover)?;
            info!(sandboxes = n, dir = %config.dir.display(), "state recovered");
        }

        let (listener, address) = match &config.listen {
            Address::Unix(path) => {
                let l = bind_unix(path, &config.listen).await?;
                (Listener::Unix(l, path.clone()), config.listen.clone())
            }
            Address::Tcp(hp) => {
                let l = TcpListener::bind(hp.as_str())
                    .await
                    .map_err(io("listen on", Path::new(hp)))?;
                let local = l.local_addr().map_err(io("listen on", Path::new(hp)))?;
                (Listener::Tcp(l), Address::Tcp(local.to_string()))
            }
        };
        let metrics = match &config.metrics_listen {
            None => None,
            Some(addr) => match bind_tcp(addr).await {
                Ok(bound) => Some(bound),
                Err(e) if !config.metrics_required => {
                    warn!(address = %addr, error = %e, "no metrics: cannot listen");
                    None
                }
                Err(e) => return Err(io("serve metrics on", Path::new(addr))(e)),
            },
        };
        let registrations = etcd.as_ref().map(|etcd| {
            crate::registrations::Registrations::new(etcd.clone(), config.cluster.agent_timeout)
        });
        let election = etcd.map(|etcd| {
            let advertise = store_config
                .advertise
                .clone()
                .unwrap_or_else(|| address.to_string());
            Arc::new(Election::new(
                etcd,
                advertise,
                store_config
                    .leader_ttl
                    .unwrap_or(crate::leader::DEFAULT_TTL),
            ))
        });
        Ok(Server {
            plane,
            images,
            listener,
            address,
            token: config.token.map(Arc::from),
            metrics,
            orphan_timeout: config.cluster.orphan_timeout,
            election,
            registrations,
        })
    }

    /// This server's part in the leader election, on etcd.
    pub fn election(&self) -> Option<&Arc<Election>> {
        self.election.as_ref()
    }

    /// Where `/metrics` is served (with the real port when the config asked for port 0).
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    /// The bound address (with the real port when the config asked for port 0).
    pub fn address(&self) -> &Address {
        &self.address
    }

    pub fn plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish,
    /// ends watch streams, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let service = SandboxService::new(self.plane.clone(), stop_rx.clone());
        let roles = self.election.as_ref().map(|e| e.roles());
        let (token, gate) = (self.token.clone(), roles.clone());
        let sandboxes = InterceptedService::new(
            SandboxesServer::new(service).max_decoding_message_size(16 << 20),
            move |req: Request<()>| admit(&gate, authorize(&token, req)?),
        );
        let (token, gate) = (self.token.clone(), roles.clone());
        let images = InterceptedService::new(
            ImagesServer::new(crate::images::ImagesService::new(
                self.images.clone(),
                self.plane.clone(),
            )),
            move |req: Request<()>| admit(&gate, authorize(&token, req)?),
        );
        let (token, gate) = (self.token.clone(), roles.clone());
        let policies = InterceptedService::new(
            PoliciesServer::new(crate::policies::PolicyService::new(self.plane.clone())),
            move |req: Request<()>| admit(&gate, authorize(&token, req)?),
        );
        let (token, gate) = (self.token.clone(), roles.clone());
        let checkpoints = InterceptedService::new(
            CheckpointsServer::new(crate::checkpoints::CheckpointService::new(
                self.plane.clone(),
            )),
            move |req: Request<()>| admit(&gate, authorize(&token, req)?),
        );
        // Agents register and heartbeat with the leader only (a standby's refusal names it);
        // the service applies the gate itself (a refused heartbeat still renews a lease).
        let token = self.token.clone();
        let nodes = InterceptedService::new(
            NodesServer::new(
                crate::cluster_grpc::NodesService::new(self.plane.clone())
                    .with_leader(roles.clone(), self.registrations.clone()),
            ),
            move |req: Request<()>| authorize(&token, req),
        );
        let (token, gate) = (self.token.clone(), roles.clone());
        let pools = InterceptedService::new(
            PoolsServer::new(crate::cluster_grpc::PoolsService::new(self.plane.clone())),
            move |req: Request<()>| admit(&gate, authorize(&token, req)?),
        );
        // Failure handling and the janitor act only while this server leads: a standby's
        // plane knows no sandbox, and one still recovering has not adopted its own yet.
        let supervision = tokio::spawn(supervise_loop(
            self.plane.clone(),
            roles.clone(),
            stop_rx.clone(),
        ));
        let janitor = tokio::spawn(
            warren_agent::janitor::Janitor::new(
                self.plane.agent().clone(),
                Arc::new(crate::link::PlaneOracle {
                    plane: self.plane.clone(),
                    roles: roles.clone(),
                }),
                self.orphan_timeout,
            )
            .run(stop_rx.clone()),
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        let (deposed_tx, deposed_rx) = tokio::sync::oneshot::channel::<String>();
        let lead = match &self.election {
            None => {
                health
                    .set_serving::<SandboxesServer<SandboxService>>()
                    .await;
                drop(deposed_tx);
                None
            }
            Some(election) => {
                health
                    .set_not_serving::<SandboxesServer<SandboxService>>()
                    .await;
                let registrations = self
                    .registrations
                    .clone()
                    .map(|r| (r, self.token.as_deref().map(str::to_string)));
                Some(tokio::spawn(lead(
                    election.clone(),
                    self.plane.clone(),
                    registrations,
                    health.clone(),
                    stop_rx.clone(),
                    deposed_tx,
                )))
            }
        };
        let deposed = Arc::new(std::sync::Mutex::new(None::<String>));
        let deposed_reason = deposed.clone();

        let expiry = tokio::spawn(expiry_loop(self.plane.clone(), stop_rx.clone()));
        let metrics = self.metrics.map(|(listener, _)| {
            let mut stop = stop_rx;
            let app = crate::metrics::router(self.plane.clone());
            tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    warn!(error = %e, "serving metrics failed");
                }
            })
        });
        let signal = async move {
            tokio::select! {
                _ = shutdown => info!("shutting down: finishing in-flight calls"),
                Ok(reason) = deposed_rx => {
                    warn!(reason = %reason, "stopping: this server no longer leads");
                    *deposed_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                }
            }
            let _ = stop_tx.send(true);
        };
        let router = TonicServer::builder()
            .concurrency_limit_per_connection(1024)
            .add_service(health_service)
            .add_service(sandboxes)
            .add_service(images)
            .add_service(policies)
            .add_service(checkpoints)
            .add_service(nodes)
            .add_service(pools);
        let result = match self.listener {
            Listener::Unix(l, path) => {
                let served = router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), signal)
                    .await;
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "could not remove the socket");
                }
                served
            }
            Listener::Tcp(l) => {
                let incoming = TcpListenerStream::new(l).map(|s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                    }
                    s
                });
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
        };
        expiry.abort();
        supervision.abort();
        janitor.abort();
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        if let Some(lead) = lead {
            // It resigns (revokes the lease) on the stop signal; bounded by etcd's timeouts.
            let _ = tokio::time::timeout(crate::store::WRITE_DEADLINE, lead).await;
        }
        result.map_err(ServerError::Serve)?;
        let deposed = deposed.lock().unwrap_or_else(|p| p.into_inner()).take();
        match deposed {
            Some(reason) => Err(ServerError::Deposed { reason }),
            None => Ok(()),
        }
    }
}

/// The etcd server's life: campaign (a standby meanwhile), recover every record, serve as
/// leader until leadership is lost (sent on `deposed`) or the server stops (it resigns).
async fn lead(
    election: Arc<Election>,
    plane: ControlPlane,
    registrations: Option<(Arc<crate::registrations::Registrations>, Option<String>)>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
    deposed: tokio::sync::oneshot::Sender<String>,
) {
    let mut leadership = tokio::select! {
        won = election.campaign() => won,
        _ = stopped(&mut stop) => return,
    };
    let started = std::time::Instant::now();
    // The agents alive now are Up before the records naming them are loaded, so none of
    // their sandboxes is Lost (or re-created) for want of a heartbeat to this server yet.
    let _following = match registrations {
        Some((r, token)) => match r.lead(plane.clone(), token).await {
            Ok(task) => Some(AbortOnDrop(task)),
            Err(e) => {
                let reason = format!("loading agent registrations failed: {e}");
                let _ = deposed.send(reason);
                election.resign(leadership).await;
                return;
            }
        },
        None => None,
    };
    match plane.recover().await {
        Ok(n) => info!(
            sandboxes = n,
            millis = started.elapsed().as_millis() as u64,
            "leader: state recovered from etcd; serving"
        ),
        Err(e) => {
            let reason = format!("recovery failed: {}", warren_runtime::error_chain(&e));
            let _ = deposed.send(reason);
            election.resign(leadership).await;
            return;
        }
    }
    election.serving();
    health
        .set_serving::<SandboxesServer<SandboxService>>()
        .await;
    tokio::select! {
        reason = election.hold(&mut leadership) => {
            let _ = deposed.send(reason);
        }
        _ = stopped(&mut stop) => election.resign(leadership).await,
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the server is told to stop (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Whether this server leads (and has recovered): always without an election.
pub fn leads(roles: &Option<watch::Receiver<Role>>) -> bool {
    roles
        .as_ref()
        .is_none_or(|r| matches!(*r.borrow(), Role::Leader))
}

/// The metadata key a standby names the leader's address in.
pub const LEADER_METADATA: &str = "warren-leader";

/// Lets a call through only on a leader that has recovered (etcd); always without election.
#[allow(clippy::result_large_err)] // tonic's interceptor signature fixes the error type.
fn admit(roles: &Option<watch::Receiver<Role>>, req: Request<()>) -> Result<Request<()>, Status> {
    match refusal(roles) {
        Some(status) => Err(status),
        None => Ok(req),
    }
}

/// The answer of a server that does not lead (or has not recovered yet) to any call; `None`
/// on the leader, and always without an election.
pub(crate) fn refusal(roles: &Option<watch::Receiver<Role>>) -> Option<Status> {
    let roles = roles.as_ref()?;
    let role = roles.borrow().clone();
    let (mut status, role) = match role {
        Role::Leader => return None,
        Role::Standby { leader } => {
            let mut status = Status::unavailable(format!(
                "this warren server is a standby; the leader is {leader}"
            ));
            if let Ok(v) = leader.parse() {
                status.metadata_mut().insert(LEADER_METADATA, v);
            }
            (status, "standby")
        }
        Role::Candidate | Role::Recovering => (
            Status::unavailable(
                "this warren server is starting (electing a leader, loading state); retry",
            ),
            "starting",
        ),
        Role::Deposed { reason } => (
            Status::unavailable(format!(
                "this warren server lost its leadership ({reason}) and is stopping; retry on the new leader"
            )),
            "deposed",
        ),
    };
    // Tells a client this refusal is about leadership (retry elsewhere), not the call.
    status.metadata_mut().insert(
        ROLE_METADATA,
        tonic::metadata::MetadataValue::from_static(role),
    );
    Some(status)
}

/// The metadata key of a refusal by a server that does not lead: standby, starting, deposed.
pub const ROLE_METADATA: &str = "warren-role";

async fn bind_tcp(addr: &str) -> std::io::Result<(TcpListener, std::net::SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    Ok((l, local))
}

/// Binds a unix socket readable and writable by the owner only. Binding happens under a
/// temporary name that is renamed into place after the chmod, so the socket is never
/// reachable with looser permissions.
pub async fn bind_unix(path: &Path, address: &Address) -> Result<UnixListener, ServerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    if path.exists() {
        // A live server answers; a stale socket from a killed one refuses.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(address.clone()));
        }
        std::fs::remove_file(path).map_err(io("remove the stale socket", path))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io("listen on", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restrict", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("move into place", path))?;
    Ok(listener)
}

#[allow(clippy::result_large_err)] // tonic's interceptor signature fixes the error type.
fn authorize(token: &Option<Arc<str>>, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(token) = token else { return Ok(req) };
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(req),
        Some(_) => Err(Status::unauthenticated("the bearer token is wrong")),
        None => Err(Status::unauthenticated(
            "this server needs a bearer token: pass --token or set WARREN_TOKEN",
        )),
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn expiry_loop(plane: ControlPlane, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A sweep may wait out grace periods: the next starts on time all the same (what the
    // earlier one is deleting is busy, so it is not deleted twice). Dropped at stop, as
    // an awaited sweep was.
    let mut sweeps = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                while sweeps.try_join_next().is_some() {}
                let plane = plane.clone();
                sweeps.spawn(async move { plane.expire().await });
            }
            // The sender only ever sends `true`, and dropping it also means stop.
            _ = stop.changed() => return,
        }
    }
}

/// Lost agents, AutoRecreate and pools: every 250 ms (a quarter of the shortest agent
/// timeout a test uses, so a lost agent is noticed soon after its timeout).
async fn supervise_loop(
    plane: ControlPlane,
    roles: Option<watch::Receiver<Role>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !leads(&roles) {
                    continue;
                }
                plane.supervise().await;
                n += 1;
                // Pools follow usage once a second (and right after every change).
                if n.is_multiple_of(4) {
                    plane.refresh_pools();
                }
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        let tok = Some(Arc::<str>::from("s3"));
        assert!(authorize(&tok, Request::new(())).is_err());
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer s3".parse().expect("ascii"));
        assert!(authorize(&tok, req).is_ok());
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer nope".parse().expect("ascii"));
        assert_eq!(
            authorize(&tok, req).expect_err("wrong").code(),
            tonic::Code::Unauthenticated
        );
        assert!(authorize(&None, Request::new(())).is_ok());
    }
}
