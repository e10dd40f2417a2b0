//! The node agent: runs sandboxes on one node through its backends.
//!
//! The agent owns the node-local side of a sandbox's life: it routes each call to the backend
//! the spec names, refuses backends this node cannot run (with the probe's reason), and turns
//! a create into `create` + `start` with a rollback when the start fails. It keeps no state of
//! its own beyond the backends: the control plane's store is the truth, and after a restart the
//! control plane hands sandboxes back through [`Agent::adopt`] and removes orphans the agent
//! reports through [`Agent::list`].
//!
//! `warren server` embeds one agent in-process (the default, one machine). `warren agent` runs
//! one as its own process ([`node::NodeAgent`]) behind seed 004's HTTP API ([`http`], port
//! 5758), which the control plane calls through [`remote::RemoteAgent`]; the wire types are in
//! [`api`]. Every agent, in-process or not, runs a [`janitor`] that removes what the control
//! plane does not know.

pub mod api;
pub mod backends;
pub mod exec;
pub mod http;
pub mod janitor;
pub mod node;
pub mod remote;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use warren_runtime::{Backend, BackendError, BackendStatus, SandboxConfig};
use warren_spec::{BackendKind, ResourceInfo};

pub use warren_runtime::BackendInfo;

/// A backend as this node found it at start-up.
#[derive(Debug, Clone)]
pub struct BackendReport {
    pub kind: BackendKind,
    /// `Err(reason)` when the backend cannot run here.
    pub available: Result<(), String>,
    /// The backend's own summary now ([`Backend::describe`]), when it runs here.
    pub detail: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    node: String,
    backends: BTreeMap<BackendKind, Arc<dyn Backend>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("backend {kind} is not available on node {node}: {reason}")]
    Unavailable {
        kind: BackendKind,
        node: String,
        reason: String,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The agent holds as many sandboxes as it may (`--capacity`).
    #[error("agent {node} is full: it holds {capacity} sandboxes, its capacity")]
    Full { node: String, capacity: u32 },
    /// A remote agent answered with an error.
    #[error("agent {node}: {message}")]
    Remote {
        node: String,
        kind: api::ErrorKind,
        message: String,
    },
    /// A remote agent could not be reached (or its reply could not be read).
    #[error("agent {node} at {address} cannot be reached: {message}")]
    Unreachable {
        node: String,
        address: String,
        message: String,
    },
    /// A request the agent cannot take (bad base64, a policy that does not compile).
    #[error("{0}")]
    Invalid(String),
}

impl AgentError {
    /// The kind of error, as the HTTP API and the control plane's gRPC codes see it.
    pub fn kind(&self) -> api::ErrorKind {
        use api::ErrorKind as K;
        match self {
            AgentError::Unavailable { .. } | AgentError::Unreachable { .. } => K::Unavailable,
            AgentError::Full { .. } => K::Capacity,
            AgentError::Remote { kind, .. } => *kind,
            AgentError::Invalid(_) => K::Invalid,
            AgentError::Backend(b) => match b {
                BackendError::Capacity { .. } => K::Capacity,
                BackendError::Unsupported { .. } => K::Unsupported,
                BackendError::NotFound { .. } => K::NotFound,
                BackendError::AlreadyExists { .. } => K::AlreadyExists,
                BackendError::Invalid(_) => K::Invalid,
                BackendError::Io { .. } | BackendError::Other(_) => K::Internal,
            },
        }
    }

    /// True when the sandbox is not there (a delete of it has nothing left to do).
    pub fn is_not_found(&self) -> bool {
        self.kind() == api::ErrorKind::NotFound
    }
}

impl Agent {
    pub fn new(
        node: impl Into<String>,
        backends: impl IntoIterator<Item = Arc<dyn Backend>>,
    ) -> Self {
        let backends = backends.into_iter().map(|b| (b.kind(), b)).collect();
        Agent {
            node: node.into(),
            backends,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every backend kind, with whether this node can run it and why not.
    pub fn report(&self) -> Vec<BackendReport> {
        BackendKind::ALL
            .iter()
            .map(|&kind| match self.backends.get(&kind) {
                Some(b) => {
                    let available = b.is_available();
                    BackendReport {
                        kind,
                        detail: available.is_ok().then(|| b.describe()).flatten(),
                        available,
                    }
                }
                None => BackendReport {
                    kind,
                    available: Err("not built into this server yet".to_string()),
                    detail: None,
                },
            })
            .collect()
    }

    fn backend(&self, kind: BackendKind) -> Result<&Arc<dyn Backend>, AgentError> {
        let unavailable = |reason: String| AgentError::Unavailable {
            kind,
            node: self.node.clone(),
            reason,
        };
        let backend = self
            .backends
            .get(&kind)
            .ok_or_else(|| unavailable("not built into this server yet".into()))?;
        backend.is_available().map_err(unavailable)?;
        Ok(backend)
    }

    /// Creates and starts a sandbox; a failed start deletes what the create made.
    pub async fn run(&self, config: &SandboxConfig) -> Result<BackendInfo, AgentError> {
        let backend = self.backend(config.spec.backend)?;
        let info = backend.create(config).await?;
        if let Err(e) = backend.start(&config.id).await {
            if let Err(cleanup) = backend.delete(&config.id).await {
                warn!(id = %config.id, error = %cleanup, "cleanup after a failed start failed");
            }
            return Err(e.into());
        }
        Ok(backend.info(&config.id).unwrap_or(info))
    }

    pub async fn stop(
        &self,
        kind: BackendKind,
        id: &str,
        grace: Duration,
    ) -> Result<BackendStatus, AgentError> {
        Ok(self.backend(kind)?.stop(id, grace).await?)
    }

    pub async fn delete(&self, kind: BackendKind, id: &str) -> Result<(), AgentError> {
        Ok(self.backend(kind)?.delete(id).await?)
    }

    pub async fn exec(
        &self,
        kind: BackendKind,
        id: &str,
        request: warren_runtime::ExecRequest,
    ) -> Result<warren_runtime::ExecProcess, AgentError> {
        Ok(self.backend(kind)?.exec(id, request).await?)
    }

    pub async fn signal(&self, kind: BackendKind, id: &str, signal: i32) -> Result<(), AgentError> {
        Ok(self.backend(kind)?.signal(id, signal).await?)
    }

    /// Pauses (`pause`) or resumes a sandbox's workload.
    pub async fn pause(&self, kind: BackendKind, id: &str, pause: bool) -> Result<(), AgentError> {
        let backend = self.backend(kind)?;
        if pause {
            backend.pause(id).await?;
        } else {
            backend.resume(id).await?;
        }
        Ok(())
    }

    /// The processes of a running sandbox (`warren top`).
    pub async fn processes(
        &self,
        kind: BackendKind,
        id: &str,
    ) -> Result<Vec<warren_runtime::ProcessInfo>, AgentError> {
        Ok(self.backend(kind)?.processes(id).await?)
    }

    /// Whether the sandbox's workload is paused, as its backend sees it (`None`: it keeps
    /// no such state, or has no such sandbox running).
    pub async fn paused(&self, kind: BackendKind, id: &str) -> Option<bool> {
        self.backend(kind).ok()?.paused(id).await
    }

    pub async fn status(&self, kind: BackendKind, id: &str) -> Result<BackendStatus, AgentError> {
        Ok(self.backend(kind)?.status(id).await?)
    }

    pub async fn update(
        &self,
        kind: BackendKind,
        id: &str,
        resources: &ResourceInfo,
    ) -> Result<(), AgentError> {
        Ok(self.backend(kind)?.update(id, resources).await?)
    }

    pub async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), AgentError> {
        Ok(self.backend(config.spec.backend)?.adopt(config).await?)
    }

    /// The sandbox's info as its backend knows it now.
    pub fn info(&self, kind: BackendKind, id: &str) -> Option<BackendInfo> {
        self.backends.get(&kind)?.info(id)
    }

    /// What the sandbox uses now, when its backend measures it (see [`Backend::usage`]).
    pub fn usage(&self, kind: BackendKind, id: &str) -> Option<warren_runtime::Usage> {
        self.backends.get(&kind)?.usage(id)
    }

    /// The sandbox's log file, when its backend keeps one.
    pub fn log_path(&self, kind: BackendKind, id: &str) -> Option<std::path::PathBuf> {
        self.backends.get(&kind)?.log_path(id)
    }

    /// See [`Backend::logs_settled`].
    pub async fn logs_settled(&self, kind: BackendKind, id: &str) {
        if let Some(backend) = self.backends.get(&kind) {
            backend.logs_settled(id).await;
        }
    }

    /// Ids held by each available backend on this node.
    pub async fn list(&self) -> Result<Vec<(BackendKind, String)>, AgentError> {
        let mut all = Vec::new();
        for (&kind, backend) in &self.backends {
            if backend.is_available().is_err() {
                continue;
            }
            all.extend(backend.list().await?.into_iter().map(|id| (kind, id)));
        }
        Ok(all)
    }

    /// Keeps `count` pre-warmed sandboxes of `image` ready on `kind` (pools).
    pub fn set_warm(&self, kind: BackendKind, image: &str, count: usize) -> Result<(), AgentError> {
        Ok(self.backend(kind)?.set_warm(image, count)?)
    }

    /// Every backend kind as the API reports it: available or not, and why.
    pub fn backend_states(&self) -> Vec<api::BackendState> {
        self.report()
            .into_iter()
            .map(|r| api::BackendState {
                kind: r.kind,
                available: r.available.is_ok(),
                reason: r.available.err().unwrap_or_default(),
            })
            .collect()
    }

    /// Sets what pools keep pre-warmed here. `pooled` holds the images pools asked for
    /// before: one no longer listed goes to zero; warm sandboxes of `--warm` that no pool
    /// names stay as they are.
    pub fn apply_warm_targets(
        &self,
        targets: &[(BackendKind, String, u32)],
        pooled: &std::sync::Mutex<std::collections::HashSet<(BackendKind, String)>>,
    ) {
        let current: std::collections::HashMap<(BackendKind, String), usize> = self
            .warm()
            .into_iter()
            .map(|(k, i, _, t)| ((k, i), t))
            .collect();
        let mut wanted: std::collections::HashMap<(BackendKind, String), usize> = targets
            .iter()
            .map(|(k, i, n)| ((*k, i.clone()), *n as usize))
            .collect();
        {
            let mut pooled = pooled.lock().unwrap_or_else(|p| p.into_inner());
            for key in pooled.iter() {
                wanted.entry(key.clone()).or_insert(0);
            }
            *pooled = wanted
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, _)| k.clone())
                .collect();
        }
        for ((kind, image), count) in wanted {
            if current.get(&(kind, image.clone())).copied().unwrap_or(0) == count {
                continue;
            }
            match self.set_warm(kind, &image, count) {
                Ok(()) => {
                    tracing::info!(backend = %kind, image, count, "pool: keeping pre-warmed sandboxes")
                }
                Err(e) => {
                    warn!(backend = %kind, image, error = %e, "pool: cannot keep pre-warmed sandboxes")
                }
            }
        }
    }

    /// Tells every backend an image was deleted from the node's store
    /// ([`Backend::images_removed`]).
    pub fn images_removed(&self) {
        for backend in self.backends.values() {
            backend.images_removed();
        }
    }

    /// Pre-warmed sandboxes per backend and image: (backend, image, ready, target).
    pub fn warm(&self) -> Vec<(BackendKind, String, usize, usize)> {
        let mut all = Vec::new();
        for (&kind, backend) in &self.backends {
            all.extend(
                backend
                    .warm()
                    .into_iter()
                    .map(|(image, ready, target)| (kind, image, ready, target)),
            );
        }
        all
    }

    /// Resources held per backend.
    pub fn allocated(&self) -> BTreeMap<BackendKind, ResourceInfo> {
        self.backends
            .iter()
            .map(|(&k, b)| (k, b.allocated()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_runtime::{SlotBackend, SlotCapacity};
    use warren_spec::SandboxSpec;

    fn agent(dir: &std::path::Path) -> Agent {
        let slot = SlotBackend::new(dir, SlotCapacity::default()).expect("slot");
        Agent::new("node-a", [Arc::new(slot) as Arc<dyn Backend>])
    }

    #[tokio::test]
    async fn run_routes_to_the_spec_backend() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let agent = agent(tmp.path());
        let config = SandboxConfig {
            id: "id1".into(),
            spec: SandboxSpec {
                name: "s".into(),
                ..Default::default()
            },
            resources: ResourceInfo::default(),
            stdin: None,
            policy: None,
        };
        let info = agent.run(&config).await.expect("run");
        assert!(info["resources_path"].ends_with("id1/resources.json"));
        assert_eq!(
            agent
                .status(BackendKind::Slot, "id1")
                .await
                .expect("status"),
            BackendStatus::Running
        );
        assert_eq!(
            agent.list().await.expect("list"),
            vec![(BackendKind::Slot, "id1".to_string())]
        );
    }

    #[tokio::test]
    async fn missing_backend_is_refused_with_the_reason() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let agent = agent(tmp.path());
        let config = SandboxConfig {
            id: "id1".into(),
            spec: SandboxSpec {
                name: "s".into(),
                backend: BackendKind::Vm,
                ..Default::default()
            },
            resources: ResourceInfo::default(),
            stdin: None,
            policy: None,
        };
        let err = agent.run(&config).await.expect_err("no vm backend");
        assert!(
            err.to_string()
                .starts_with("backend vm is not available on node node-a"),
            "{err}"
        );
        let report = agent.report();
        assert!(
            report
                .iter()
                .any(|r| r.kind == BackendKind::Slot && r.available.is_ok())
        );
        assert!(
            report
                .iter()
                .any(|r| r.kind == BackendKind::Vm && r.available.is_err())
        );
    }
}
