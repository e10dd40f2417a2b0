//! [`NodeAgent`]: an [`Agent`] as its own process (`warren agent`), serving the control plane
//! over HTTP.
//!
//! On top of the agent it owns what a process on its own must: a capacity (`--capacity`,
//! seed 004's `AGENT_CAPACITY`, enforced here too so that no control plane, stale or not, can
//! put more on the node), which backend holds each sandbox (requests may omit it), an id for
//! this run of the process (so the control plane notices a restart and hands sandboxes back
//! through `adopt`), and the images the node has (image affinity).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use tracing::warn;
use warren_image::ImageStore;
use warren_runtime::{AppliedPolicy, BackendStatus, SandboxConfig, Stdin};
use warren_spec::{BackendKind, Policy};

use crate::api::{
    AgentStatus, BackendState, CreateRequest, CreateResponse, DeleteRequest, PauseRequest,
    SandboxState, SignalRequest, UpdateRequest, WarmState, WireStatus,
};
use crate::{Agent, AgentError};

/// The node agent process's state.
#[derive(Debug)]
pub struct NodeAgent {
    agent: Agent,
    boot_id: String,
    capacity: u32,
    images: Option<ImageStore>,
    default_grace: Duration,
    /// Every sandbox this process holds, by id: its backend. A slot is taken here before
    /// the backend runs anything and given back when the sandbox is removed.
    held: Mutex<HashMap<String, BackendKind>>,
    /// Images pools keep warm here (so a pool that goes away takes its warm ones along).
    pooled: Mutex<std::collections::HashSet<(BackendKind, String)>>,
}

impl NodeAgent {
    pub fn new(
        agent: Agent,
        capacity: u32,
        images: Option<ImageStore>,
        default_grace: Duration,
    ) -> Self {
        NodeAgent {
            agent,
            boot_id: uuid::Uuid::new_v4().simple().to_string(),
            capacity,
            images,
            default_grace,
            held: Mutex::new(HashMap::new()),
            pooled: Mutex::default(),
        }
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn node(&self) -> &str {
        self.agent.node()
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BackendKind>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes stock of what the backends hold from an earlier run of the process: those count
    /// against the capacity until the control plane adopts them or the janitor removes them.
    pub async fn load(&self) -> Result<usize, AgentError> {
        let found = self.agent.list().await?;
        let mut held = self.lock();
        for (kind, id) in found {
            held.insert(id, kind);
        }
        Ok(held.len())
    }

    /// How many sandboxes the agent holds.
    pub fn load_count(&self) -> usize {
        self.lock().len()
    }

    /// The backend holding `id`, from the request or what the agent recorded.
    /// The id is checked first: every request that names a sandbox comes through here, and
    /// backends make paths of ids.
    fn backend_of(&self, id: &str, given: Option<BackendKind>) -> Result<BackendKind, AgentError> {
        check_id(id)?;
        if let Some(kind) = given {
            return Ok(kind);
        }
        self.lock().get(id).copied().ok_or_else(|| {
            AgentError::Backend(warren_runtime::BackendError::NotFound {
                backend: BackendKind::Slot,
                id: id.to_string(),
            })
        })
    }

    /// The sandbox's config from the wire: the policy compiled, stdin decoded.
    fn config(req: CreateRequest) -> Result<SandboxConfig, AgentError> {
        check_id(&req.id)?;
        // Checked again here: the agent holds its node to what a spec may ask, whoever sent it.
        req.spec
            .validate()
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        check_resources(&req.resources)?;
        let policy = match req.policy {
            None => None,
            Some(p) => {
                let policy = Policy::compile(&p.name, p.spec).map_err(|errors| {
                    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    AgentError::Invalid(format!("policy: {}", lines.join("; ")))
                })?;
                Some(AppliedPolicy {
                    policy: std::sync::Arc::new(policy),
                    decision: p.decision,
                })
            }
        };
        let stdin = match req.stdin {
            None => None,
            Some(b64) => Some(Stdin::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| AgentError::Invalid(format!("stdin: not base64: {e}")))?,
            )),
        };
        Ok(SandboxConfig {
            id: req.id,
            spec: req.spec,
            resources: req.resources,
            stdin,
            policy,
        })
    }

    /// Creates and starts a sandbox, if the agent has room.
    pub async fn create(&self, req: CreateRequest) -> Result<CreateResponse, AgentError> {
        let config = Self::config(req)?;
        {
            let mut held = self.lock();
            if held.contains_key(&config.id) {
                return Err(AgentError::Backend(
                    warren_runtime::BackendError::AlreadyExists {
                        backend: config.spec.backend,
                        id: config.id,
                    },
                ));
            }
            if held.len() >= self.capacity as usize {
                return Err(AgentError::Full {
                    node: self.node().to_string(),
                    capacity: self.capacity,
                });
            }
            held.insert(config.id.clone(), config.spec.backend);
        }
        match self.agent.run(&config).await {
            Ok(info) => Ok(CreateResponse {
                id: config.id,
                status: WireStatus::Running,
                info,
            }),
            Err(e) => {
                self.lock().remove(&config.id);
                Err(e)
            }
        }
    }

    /// Takes back a sandbox the control plane knows (after this process or the control
    /// plane restarted). One the agent already runs answers with its status.
    pub async fn adopt(&self, req: CreateRequest) -> Result<CreateResponse, AgentError> {
        let config = Self::config(req)?;
        let kind = config.spec.backend;
        if self.lock().get(&config.id) == Some(&kind)
            && let Ok(status) = self.agent.status(kind, &config.id).await
        {
            return Ok(CreateResponse {
                id: config.id.clone(),
                status: WireStatus::from(&status),
                info: self.agent.info(kind, &config.id).unwrap_or_default(),
            });
        }
        let (status, info) = self.agent.adopt(&config).await?;
        self.lock().insert(config.id.clone(), kind);
        Ok(CreateResponse {
            id: config.id,
            status: WireStatus::from(&status),
            info,
        })
    }

    fn grace(&self, req: &DeleteRequest) -> Duration {
        req.grace_period_seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)))
            .unwrap_or(self.default_grace)
    }

    pub async fn stop(&self, req: &DeleteRequest) -> Result<SandboxState, AgentError> {
        let kind = self.backend_of(&req.id, req.backend)?;
        let status = self.agent.stop(kind, &req.id, self.grace(req)).await?;
        Ok(SandboxState {
            id: req.id.clone(),
            backend: kind,
            status: WireStatus::from(&status),
            usage: None,
        })
    }

    /// Stops a sandbox (if it runs) and removes it with its files.
    pub async fn delete(&self, req: &DeleteRequest) -> Result<SandboxState, AgentError> {
        let kind = self.backend_of(&req.id, req.backend)?;
        let mut last = self.agent.status(kind, &req.id).await.ok();
        if matches!(last, Some(BackendStatus::Running | BackendStatus::Created)) {
            match self.agent.stop(kind, &req.id, self.grace(req)).await {
                Ok(status) => last = Some(status),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    warn!(id = %req.id, error = %e, "stop before delete failed; deleting anyway")
                }
            }
        }
        let deleted = self.agent.delete(kind, &req.id).await;
        let held = self.lock().remove(&req.id).is_some();
        match deleted {
            Ok(()) => {}
            // Held but without files (never made, or already removed): gone all the same.
            Err(e) if e.is_not_found() && held => {}
            Err(e) => return Err(e),
        }
        Ok(SandboxState {
            id: req.id.clone(),
            backend: kind,
            status: WireStatus::from(&last.unwrap_or(BackendStatus::Stopped)),
            usage: None,
        })
    }

    pub async fn update(&self, req: &UpdateRequest) -> Result<(), AgentError> {
        let kind = self.backend_of(&req.id, req.backend)?;
        check_resources(&req.resources)?;
        self.agent.update(kind, &req.id, &req.resources).await
    }

    pub async fn signal(&self, req: &SignalRequest) -> Result<(), AgentError> {
        if !(1..=64).contains(&req.signal) {
            return Err(AgentError::Invalid(format!(
                "signal: {} is not a signal number (1-64)",
                req.signal
            )));
        }
        let kind = self.backend_of(&req.id, req.backend)?;
        self.agent.signal(kind, &req.id, req.signal).await
    }

    /// Pauses (`pause`) or resumes a sandbox this agent holds.
    pub async fn pause(&self, req: &PauseRequest, pause: bool) -> Result<(), AgentError> {
        let kind = self.backend_of(&req.id, req.backend)?;
        self.agent.pause(kind, &req.id, pause).await
    }

    /// Starts a process in a sandbox this agent holds (`warren exec`).
    pub async fn exec(
        &self,
        id: &str,
        backend: Option<BackendKind>,
        request: warren_runtime::ExecRequest,
    ) -> Result<warren_runtime::ExecProcess, AgentError> {
        if request.argv.is_empty() {
            return Err(AgentError::Invalid(
                "argv: empty (give the program to run)".into(),
            ));
        }
        let kind = self.backend_of(id, backend)?;
        self.agent.exec(kind, id, request).await
    }

    /// Whether this agent holds the sandbox `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// One sandbox's status.
    pub async fn sandbox(&self, id: &str) -> Result<SandboxState, AgentError> {
        let kind = self.backend_of(id, None)?;
        let status = self.agent.status(kind, id).await?;
        Ok(SandboxState {
            id: id.to_string(),
            backend: kind,
            status: WireStatus::from(&status),
            usage: self.agent.usage(kind, id),
        })
    }

    /// The processes of a sandbox this agent holds (`warren top`).
    pub async fn processes(
        &self,
        id: &str,
    ) -> Result<Vec<warren_runtime::ProcessInfo>, AgentError> {
        let kind = self.backend_of(id, None)?;
        self.agent.processes(kind, id).await
    }

    /// The sandbox's log file and its backend.
    pub fn log_path(&self, id: &str) -> Result<(BackendKind, PathBuf), AgentError> {
        let kind = self.backend_of(id, None)?;
        let path = self.agent.log_path(kind, id).ok_or(AgentError::Backend(
            warren_runtime::BackendError::Unsupported {
                backend: kind,
                operation: "logs",
            },
        ))?;
        Ok((kind, path))
    }

    /// Everything the control plane learns from a heartbeat or `GET /status`.
    pub async fn status(&self) -> AgentStatus {
        let held: Vec<(String, BackendKind)> =
            self.lock().iter().map(|(id, k)| (id.clone(), *k)).collect();
        let mut sandboxes = Vec::with_capacity(held.len());
        for (id, kind) in held {
            // A sandbox whose files the backend lost is reported Failed, not hidden.
            let status = match self.agent.status(kind, &id).await {
                Ok(s) => WireStatus::from(&s),
                Err(e) => WireStatus::Failed {
                    reason: format!("lost: {e}"),
                },
            };
            sandboxes.push(SandboxState {
                id,
                backend: kind,
                status,
                usage: None,
            });
        }
        sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
        AgentStatus {
            node: self.node().to_string(),
            boot_id: self.boot_id.clone(),
            capacity: self.capacity,
            sandboxes,
            backends: self.backends(),
            images: self.images(),
            warm: self.warm(),
        }
    }

    pub fn backends(&self) -> Vec<BackendState> {
        self.agent.backend_states()
    }

    /// Names of the images in the node's store.
    pub fn images(&self) -> Vec<String> {
        let Some(store) = &self.images else {
            return Vec::new();
        };
        match store.list() {
            Ok(list) => {
                let mut names: Vec<String> = list.into_iter().flat_map(|i| i.names).collect();
                names.sort();
                names
            }
            Err(e) => {
                warn!(error = %e, "cannot list the node's images");
                Vec::new()
            }
        }
    }

    pub fn warm(&self) -> Vec<WarmState> {
        self.agent
            .warm()
            .into_iter()
            .map(|(backend, image, ready, target)| WarmState {
                backend,
                image,
                ready: u32::try_from(ready).unwrap_or(u32::MAX),
                target: u32::try_from(target).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// Sets what the node keeps pre-warmed for the control plane's pools
    /// ([`Agent::apply_warm_targets`]).
    pub fn set_warm(&self, targets: &[(BackendKind, String, u32)]) {
        self.agent.apply_warm_targets(targets, &self.pooled);
    }

    /// Ids the agent holds, with their backends.
    pub fn held(&self) -> Vec<(BackendKind, String)> {
        self.lock().iter().map(|(id, k)| (*k, id.clone())).collect()
    }

    /// Forgets a sandbox the janitor removed.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// CPU amounts are counts of CPUs: finite and not negative (the byte and count fields are
/// unsigned on the wire already).
fn check_resources(r: &warren_spec::ResourceInfo) -> Result<(), AgentError> {
    for (field, value) in [
        ("resources.cpu_limit", r.cpu_limit),
        ("resources.cpu_request", r.cpu_request),
    ] {
        if let Some(v) = value
            && !(v.is_finite() && v >= 0.0)
        {
            return Err(AgentError::Invalid(format!(
                "{field}: {v} is not a number of CPUs (finite, 0 or more)"
            )));
        }
    }
    Ok(())
}

/// Ids the control plane makes are uuids; anything reaching a path must stay a plain name.
fn check_id(id: &str) -> Result<(), AgentError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "id: {id:?} is not a sandbox id (1 to 128 letters, digits, '-' or '_')"
        )))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use warren_runtime::{Backend, SlotBackend, SlotCapacity};
    use warren_spec::SandboxSpec;

    use super::*;

    fn node(dir: &std::path::Path, capacity: u32) -> NodeAgent {
        let slot = SlotBackend::new(dir, SlotCapacity::default()).unwrap();
        let agent = Agent::new("n1", [Arc::new(slot) as Arc<dyn Backend>]);
        NodeAgent::new(agent, capacity, None, Duration::from_secs(1))
    }

    fn create(id: &str) -> CreateRequest {
        CreateRequest {
            id: id.into(),
            spec: SandboxSpec {
                name: format!("s-{id}"),
                ..Default::default()
            },
            resources: Default::default(),
            policy: None,
            stdin: None,
        }
    }

    #[tokio::test]
    async fn capacity_is_enforced_and_freed_by_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let n = node(tmp.path(), 2);
        n.create(create("a")).await.unwrap();
        n.create(create("b")).await.unwrap();
        let full = n.create(create("c")).await.unwrap_err();
        assert!(
            matches!(full, AgentError::Full { capacity: 2, .. }),
            "{full}"
        );
        assert_eq!(full.kind(), crate::api::ErrorKind::Capacity);
        let del = DeleteRequest {
            id: "a".into(),
            backend: None,
            grace_period_seconds: None,
        };
        let last = n.delete(&del).await.unwrap();
        assert_eq!(last.status, WireStatus::Stopped);
        n.create(create("c")).await.unwrap();
        let again = n.delete(&del).await.unwrap_err();
        assert!(again.is_not_found(), "{again}");
        let status = n.status().await;
        let ids: Vec<&str> = status.sandboxes.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(status.capacity, 2);
    }

    #[tokio::test]
    async fn bad_ids_and_stdin_are_refused_naming_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let n = node(tmp.path(), 5);
        let e = n.create(create("../x")).await.unwrap_err();
        assert!(e.to_string().starts_with("id: \"../x\""), "{e}");
        let mut req = create("ok");
        req.stdin = Some("%%%".into());
        let e = n.create(req).await.unwrap_err();
        assert!(e.to_string().starts_with("stdin:"), "{e}");
        assert_eq!(n.load_count(), 0, "a refused create holds nothing");
    }

    #[tokio::test]
    async fn a_restarted_agent_counts_what_it_finds() {
        let tmp = tempfile::tempdir().unwrap();
        node(tmp.path(), 5).create(create("old")).await.unwrap();
        let n = node(tmp.path(), 5);
        assert_eq!(n.load().await.unwrap(), 1);
        assert_eq!(n.held(), vec![(BackendKind::Slot, "old".to_string())]);
        let adopted = n.adopt(create("old")).await.unwrap();
        assert_eq!(adopted.status, WireStatus::Running);
    }

    /// A request's id names a sandbox, never a path: one that climbs out of the backend's
    /// directory (or is empty, naming the directory itself) is refused before any backend
    /// sees it, whatever the call.
    #[tokio::test]
    async fn an_id_that_is_a_path_reaches_no_backend() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        let n = node(&dir.path().join("slot"), 4);
        n.create(create("a")).await.unwrap();
        for id in ["../victim", "", "a/../../victim", "."] {
            let del = DeleteRequest {
                id: id.into(),
                backend: Some(BackendKind::Slot),
                grace_period_seconds: None,
            };
            let err = n.delete(&del).await.unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("id: {id:?} is not a sandbox id")),
                "{err}"
            );
            let refused = |e: AgentError| e.to_string().starts_with("id: ");
            assert!(refused(n.sandbox(id).await.unwrap_err()));
            assert!(refused(n.log_path(id).unwrap_err()));
        }
        assert!(victim.join("sub").is_dir());
        assert!(dir.path().join("slot").is_dir());
        assert_eq!(n.load_count(), 1);
    }

    /// What a spec may ask is checked on the agent too: an invalid spec or a negative CPU
    /// amount is refused naming the field, at create and at update.
    #[tokio::test]
    async fn invalid_specs_and_negative_cpus_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path(), 4);
        let mut bad = create("b");
        bad.resources.cpu_limit = Some(-1.0);
        let err = n.create(bad).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "resources.cpu_limit: -1 is not a number of CPUs (finite, 0 or more)"
        );
        let mut bad = create("c");
        bad.spec.hostname = Some("-bad".into());
        let err = n.create(bad).await.unwrap_err().to_string();
        assert!(err.starts_with("spec.hostname"), "{err}");
        assert_eq!(n.load_count(), 0);
        n.create(create("a")).await.unwrap();
        let update = UpdateRequest {
            id: "a".into(),
            backend: None,
            resources: warren_spec::ResourceInfo {
                cpu_request: Some(f64::NAN),
                ..Default::default()
            },
        };
        let err = n.update(&update).await.unwrap_err().to_string();
        assert!(err.starts_with("resources.cpu_request: NaN"), "{err}");
    }
}
