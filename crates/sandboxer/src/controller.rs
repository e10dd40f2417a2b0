//! containerd's `containerd.services.sandbox.v1.Controller` over a warren control plane.
//!
//! Each containerd sandbox (a pod) is one warren sandbox of the same name on the `slot`
//! backend, so it is accounted, written to `<slot dir>/<id>/resources.json`, listed by
//! `warren ls` and removed like any other. What warren has no notion of (containerd's
//! created/ready/stopped states, the containers appended to the pod) is kept here and mirrored
//! into the warren sandbox's annotations (`warren.dev/sandboxer-*`), so a restarted sandboxer
//! finds its pods again from warren's store.
//!
//! Mutations of pods are serialized by one lock held across the control plane call: slot
//! operations take microseconds, and it keeps a pod and its warren sandbox in step (a failed
//! call changes neither). `Wait` holds no lock: it waits on the pod's own exit channel.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, MutexGuard, watch};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use warren_control::grpc::status_of;
use warren_control::{ControlError, ControlPlane, SandboxUpdate};
use warren_spec::{BackendKind, Consistency, ResourceInfo, SandboxSpec};

use crate::api::services::sandbox::v1::controller_server::Controller;
use crate::api::services::sandbox::v1::*;
use crate::api::types::Platform;
use crate::resources::{self, TASKS_EXTENSION, TASKS_FIELD};

/// Label on every warren sandbox this sandboxer made; its value is the sandboxer's name.
pub const LABEL_SANDBOXER: &str = "warren.dev/sandboxer";
/// containerd's view of the pod: `created`, `ready` or `stopped`.
pub const ANNOTATION_STATE: &str = "warren.dev/sandboxer-state";
/// The pod's own resources (before its containers), as resources.json-style JSON.
pub const ANNOTATION_POD_RESOURCES: &str = "warren.dev/sandboxer-pod-resources";
/// What the pod declared its containers hold together (CRI `linux.resources`), the same way;
/// absent when it declared nothing.
pub const ANNOTATION_POD_DECLARED: &str = "warren.dev/sandboxer-pod-declared";
/// The pod's overhead (CRI `linux.overhead`), the same way; absent when it has none.
pub const ANNOTATION_POD_OVERHEAD: &str = "warren.dev/sandboxer-pod-overhead";
/// The containers appended to the pod and what each holds: JSON `{"id": {...}}`.
pub const ANNOTATION_CONTAINERS: &str = "warren.dev/sandboxer-containers";

/// containerd's sandbox states, as its CRI plugin names them.
pub const STATE_READY: &str = "SANDBOX_READY";
pub const STATE_NOT_READY: &str = "SANDBOX_NOTREADY";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Ready,
    Stopped,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Ready => "ready",
            State::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Option<State> {
        [State::Created, State::Ready, State::Stopped]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

/// How a pod ended: what `Wait` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    status: u32,
    at: SystemTime,
}

#[derive(Debug)]
struct Pod {
    /// The warren sandbox's id: tells this pod from a later one of the same name.
    warren_id: String,
    state: State,
    created_at: SystemTime,
    own: resources::Pod,
    containers: Vec<(String, ResourceInfo)>,
    ended: watch::Sender<Option<Exit>>,
}

impl Pod {
    fn new(warren_id: String, state: State, created_at: SystemTime, own: resources::Pod) -> Self {
        Pod {
            warren_id,
            state,
            created_at,
            own,
            containers: Vec::new(),
            ended: watch::channel(None).0,
        }
    }

    fn total(&self) -> ResourceInfo {
        resources::total(&self.own, self.containers.iter().map(|(_, r)| r))
    }

    fn exit(&self) -> Option<Exit> {
        *self.ended.borrow()
    }

    /// Ends the pod (once) with `status`.
    fn end(&mut self, status: u32) {
        self.state = State::Stopped;
        if self.exit().is_none() {
            self.ended.send_replace(Some(Exit {
                status,
                at: SystemTime::now(),
            }));
        }
    }
}

/// The warren sandbox's annotations for a pod in `state` with `containers`.
fn annotations(
    own: &resources::Pod,
    containers: &[(String, ResourceInfo)],
    state: State,
) -> BTreeMap<String, String> {
    let total = resources::total(own, containers.iter().map(|(_, r)| r));
    let mut a = own.annotations.clone();
    a.extend(resources::as_annotations(&total));
    a.insert(ANNOTATION_STATE.into(), state.as_str().into());
    a.insert(ANNOTATION_POD_RESOURCES.into(), own.resources.to_json());
    if let Some(declared) = &own.declared {
        a.insert(ANNOTATION_POD_DECLARED.into(), declared.to_json());
    }
    if own.overhead != ResourceInfo::default() {
        a.insert(ANNOTATION_POD_OVERHEAD.into(), own.overhead.to_json());
    }
    let containers: serde_json::Map<String, serde_json::Value> = containers
        .iter()
        .map(|(id, r)| {
            let v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
            (id.clone(), v)
        })
        .collect();
    a.insert(
        ANNOTATION_CONTAINERS.into(),
        serde_json::Value::Object(containers).to_string(),
    );
    a
}

/// A pod as [`annotations`] recorded it: its state, what it asked for and its containers. An
/// annotation a record lacks (one written before it existed) reads as none.
fn recorded(a: &BTreeMap<String, String>) -> (State, resources::Pod, Vec<(String, ResourceInfo)>) {
    let state = a
        .get(ANNOTATION_STATE)
        .and_then(|s| State::parse(s))
        .unwrap_or(State::Ready);
    let info = |key: &str| {
        a.get(key)
            .and_then(|j| serde_json::from_str::<ResourceInfo>(j).ok())
    };
    let containers: Vec<(String, ResourceInfo)> = a
        .get(ANNOTATION_CONTAINERS)
        .and_then(|j| serde_json::from_str::<BTreeMap<String, ResourceInfo>>(j).ok())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    let mut annotations = a.clone();
    annotations.retain(|k, _| {
        !resources::RESOURCE_ANNOTATIONS.contains(&k.as_str())
            && ![
                ANNOTATION_STATE,
                ANNOTATION_POD_RESOURCES,
                ANNOTATION_POD_DECLARED,
                ANNOTATION_POD_OVERHEAD,
                ANNOTATION_CONTAINERS,
            ]
            .contains(&k.as_str())
    });
    let own = resources::Pod {
        annotations,
        resources: info(ANNOTATION_POD_RESOURCES).unwrap_or_default(),
        declared: info(ANNOTATION_POD_DECLARED),
        overhead: info(ANNOTATION_POD_OVERHEAD).unwrap_or_default(),
    };
    (state, own, containers)
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// The host's architecture as containerd (Go's GOARCH) names it.
pub fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "sandbox_id: sandbox {id:?} is not known to this sandboxer"
    ))
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("sandbox_id: must not be empty"));
    }
    warren_spec::validate_name("sandbox_id", id)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn invalid(e: &resources::ResourceError) -> Status {
    Status::invalid_argument(warren_runtime::error_chain(e))
}

/// The Controller service. Cheap to clone; clones share the pods.
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    plane: ControlPlane,
    pods: Arc<Mutex<HashMap<String, Pod>>>,
    shutdown: watch::Receiver<bool>,
}

impl Service {
    /// A service named `name` (the value of [`LABEL_SANDBOXER`]) that answers its waiters
    /// with `UNAVAILABLE` once `shutdown` turns true. Takes back the pods the plane already
    /// holds under that name (a restart).
    pub fn new(name: &str, plane: ControlPlane, shutdown: watch::Receiver<bool>) -> Self {
        let mut pods = HashMap::new();
        let selector = format!("{LABEL_SANDBOXER}={name}");
        // The selector holds the name, checked as a label value by `Args::config`.
        let listed = plane
            .list(&selector, &[BackendKind::Slot])
            .inspect_err(|e| warn!(selector, error = %e, "sandboxer: cannot list its pods"))
            .unwrap_or_default();
        for rec in listed {
            let (state, own, containers) = recorded(&rec.spec.annotations);
            let created = SystemTime::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(rec.created_at_ms).unwrap_or(0));
            let mut pod = Pod::new(rec.id.clone(), state, created, own);
            pod.containers = containers;
            if state == State::Stopped {
                pod.end(0);
            }
            info!(sandbox = %rec.spec.name, state = state.as_str(), "sandboxer: pod taken back from the store");
            pods.insert(rec.spec.name.clone(), pod);
        }
        let watched: Vec<(String, String)> = pods
            .iter()
            .map(|(id, p)| (id.clone(), p.warren_id.clone()))
            .collect();
        let service = Service {
            name: name.to_string(),
            plane,
            pods: Arc::new(Mutex::new(pods)),
            shutdown,
        };
        for (id, warren_id) in watched {
            service.watch(id, warren_id);
        }
        service
    }

    /// Ends the pod when its warren sandbox is deleted behind containerd's back
    /// (`warren rm`): 137, as for a killed process, and its waiters are answered.
    fn watch(&self, id: String, warren_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(rec) = this.plane.wait(&id, None).await else {
                return;
            };
            if rec.status != warren_spec::Phase::Deleted || rec.id != warren_id {
                return;
            }
            let mut pods = this.lock().await;
            if let Some(pod) = pods.get_mut(&id).filter(|p| p.warren_id == warren_id)
                && pod.exit().is_none()
            {
                warn!(sandbox = %id, "sandboxer: the warren sandbox was deleted; the pod ends");
                pod.end(128 + 9);
            }
        });
    }

    async fn lock(&self) -> MutexGuard<'_, HashMap<String, Pod>> {
        self.pods.lock().await
    }

    /// Makes the warren sandbox's annotations `want`: sets what differs, removes what is gone.
    async fn sync(&self, id: &str, want: BTreeMap<String, String>) -> Result<(), ControlError> {
        let rec = self.plane.get(id)?;
        let have = &rec.spec.annotations;
        let remove_annotations = have
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        let set_annotations = want
            .into_iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .collect();
        self.plane
            .update(
                id,
                SandboxUpdate {
                    set_annotations,
                    remove_annotations,
                    ..SandboxUpdate::default()
                },
            )
            .await?;
        Ok(())
    }

    /// Records a new state in warren. The pod changes state even if warren's copy cannot
    /// follow (e.g. the sandbox was removed with `warren rm`): containerd's call must not fail
    /// for a label.
    async fn set_state(&self, id: &str, pod: &mut Pod, state: State) {
        let want = annotations(&pod.own, &pod.containers, state);
        if let Err(e) = self.sync(id, want).await {
            warn!(sandbox = id, error = %warren_runtime::error_chain(&e), "sandboxer: could not record the state in warren");
        }
        pod.state = state;
    }
}

#[tonic::async_trait]
impl Controller for Service {
    async fn create(
        &self,
        request: Request<ControllerCreateRequest>,
    ) -> Result<Response<ControllerCreateResponse>, Status> {
        let req = request.into_inner();
        let id = req.sandbox_id.clone();
        check_id(&id)?;
        let own = resources::pod(&req).map_err(|e| invalid(&e))?;
        let mut pods = self.lock().await;
        if pods.contains_key(&id) {
            return Err(Status::already_exists(format!(
                "sandbox_id: sandbox {id:?} already exists"
            )));
        }
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_SANDBOXER.to_string(), self.name.clone());
        let spec = SandboxSpec {
            name: id.clone(),
            labels,
            annotations: annotations(&own, &[], State::Created),
            backend: BackendKind::Slot,
            // containerd is told the sandbox exists only once warren has it on disk.
            consistency: Some(Consistency::Strong),
            ..SandboxSpec::default()
        };
        let (rec, _) = self.plane.create(spec).await.map_err(status_of)?;
        info!(sandbox = %id, resources = %rec.resources.to_json(), "sandboxer: created");
        let created = SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(rec.created_at_ms).unwrap_or(0));
        pods.insert(
            id.clone(),
            Pod::new(rec.id.clone(), State::Created, created, own),
        );
        drop(pods);
        self.watch(id.clone(), rec.id.clone());
        Ok(Response::new(ControllerCreateResponse { sandbox_id: id }))
    }

    async fn start(
        &self,
        request: Request<ControllerStartRequest>,
    ) -> Result<Response<ControllerStartResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        let mut pods = self.lock().await;
        let pod = pods.get_mut(&id).ok_or_else(|| not_found(&id))?;
        match pod.state {
            State::Created => {
                let want = annotations(&pod.own, &pod.containers, State::Ready);
                self.sync(&id, want).await.map_err(status_of)?;
                pod.state = State::Ready;
                info!(sandbox = %id, "sandboxer: started");
            }
            State::Ready => {}
            State::Stopped => {
                return Err(Status::failed_precondition(format!(
                    "sandbox_id: sandbox {id:?} is stopped; shut it down and create it again"
                )));
            }
        }
        Ok(Response::new(ControllerStartResponse {
            sandbox_id: id,
            pid: std::process::id(),
            created_at: Some(timestamp(pod.created_at)),
            labels: HashMap::new(),
            // No task API of our own: containerd runs the pod's containers through the
            // runtime's shim (`runtime_type`).
            address: String::new(),
            version: 0,
        }))
    }

    async fn platform(
        &self,
        request: Request<ControllerPlatformRequest>,
    ) -> Result<Response<ControllerPlatformResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        if !self.lock().await.contains_key(&id) {
            return Err(not_found(&id));
        }
        Ok(Response::new(ControllerPlatformResponse {
            platform: Some(Platform {
                os: std::env::consts::OS.to_string(),
                architecture: goarch().to_string(),
                variant: String::new(),
                os_version: String::new(),
            }),
        }))
    }

    async fn stop(
        &self,
        request: Request<ControllerStopRequest>,
    ) -> Result<Response<ControllerStopResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        let mut pods = self.lock().await;
        let pod = pods.get_mut(&id).ok_or_else(|| not_found(&id))?;
        if pod.state != State::Stopped {
            self.set_state(&id, pod, State::Stopped).await;
            // A slot pod runs nothing: asked to stop, it stops at once and cleanly.
            pod.end(0);
            info!(sandbox = %id, "sandboxer: stopped");
        }
        Ok(Response::new(ControllerStopResponse {}))
    }

    async fn wait(
        &self,
        request: Request<ControllerWaitRequest>,
    ) -> Result<Response<ControllerWaitResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        let mut ended = self
            .lock()
            .await
            .get(&id)
            .map(|p| p.ended.subscribe())
            .ok_or_else(|| not_found(&id))?;
        let mut shutdown = self.shutdown.clone();
        let exit = tokio::select! {
            r = ended.wait_for(Option::is_some) => match r {
                Ok(exit) => *exit,
                // The pod was dropped without an end: only a shutdown does that.
                Err(_) => None,
            },
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(exit) = exit else {
            return Err(Status::unavailable(
                "the sandboxer is shutting down; wait again after it restarts",
            ));
        };
        Ok(Response::new(ControllerWaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)),
        }))
    }

    async fn status(
        &self,
        request: Request<ControllerStatusRequest>,
    ) -> Result<Response<ControllerStatusResponse>, Status> {
        let req = request.into_inner();
        let id = req.sandbox_id;
        let pods = self.lock().await;
        let pod = pods.get(&id).ok_or_else(|| not_found(&id))?;
        let (state, pid) = match pod.state {
            State::Ready => (STATE_READY, std::process::id()),
            State::Created | State::Stopped => (STATE_NOT_READY, 0),
        };
        let mut info = HashMap::new();
        if req.verbose {
            info.insert("state".into(), pod.state.as_str().into());
            info.insert("resources".into(), pod.total().to_json());
            let ids: Vec<&str> = pod.containers.iter().map(|(c, _)| c.as_str()).collect();
            info.insert("containers".into(), ids.join(","));
            if let Ok(rec) = self.plane.get(&id) {
                info.insert("warren_id".into(), rec.id.clone());
                info.insert("warren_phase".into(), rec.status.name().into());
                info.extend(rec.backend_info.clone());
            }
        }
        Ok(Response::new(ControllerStatusResponse {
            sandbox_id: id,
            pid,
            state: state.into(),
            info,
            created_at: Some(timestamp(pod.created_at)),
            exited_at: pod.exit().map(|e| timestamp(e.at)),
            extra: None,
            address: String::new(),
            version: 0,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ControllerShutdownRequest>,
    ) -> Result<Response<ControllerShutdownResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        let mut pods = self.lock().await;
        if !pods.contains_key(&id) {
            return Err(not_found(&id));
        }
        match self.plane.delete(&id, Some(Duration::ZERO)).await {
            // Gone already (`warren rm`): nothing left to free.
            Ok(_) | Err(ControlError::NotFound { .. }) => {}
            Err(e) => return Err(status_of(e)),
        }
        if let Some(mut pod) = pods.remove(&id) {
            pod.end(0);
        }
        info!(sandbox = %id, "sandboxer: shut down and removed");
        Ok(Response::new(ControllerShutdownResponse {}))
    }

    async fn metrics(
        &self,
        request: Request<ControllerMetricsRequest>,
    ) -> Result<Response<ControllerMetricsResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        if !self.lock().await.contains_key(&id) {
            return Err(not_found(&id));
        }
        // A slot pod uses nothing it could measure; what it holds is in Status(verbose).
        Ok(Response::new(ControllerMetricsResponse { metrics: None }))
    }

    async fn update(
        &self,
        request: Request<ControllerUpdateRequest>,
    ) -> Result<Response<ControllerUpdateResponse>, Status> {
        let req = request.into_inner();
        let id = req.sandbox_id.clone();
        let tasks = req
            .sandbox
            .as_ref()
            .and_then(|s| s.extensions.get(TASKS_EXTENSION));
        let wants_tasks = req.fields.iter().any(|f| f == TASKS_FIELD)
            || (req.fields.is_empty() && tasks.is_some());
        if !wants_tasks {
            if !self.lock().await.contains_key(&id) {
                return Err(not_found(&id));
            }
            debug!(sandbox = %id, fields = ?req.fields, "sandboxer: update of nothing it tracks");
            return Ok(Response::new(ControllerUpdateResponse {}));
        }
        let tasks = tasks.ok_or_else(|| {
            Status::invalid_argument(format!(
                "sandbox.extensions[\"{TASKS_EXTENSION}\"]: missing, but fields names {TASKS_FIELD:?}"
            ))
        })?;
        let containers = resources::containers(tasks).map_err(|e| invalid(&e))?;
        let mut pods = self.lock().await;
        let pod = pods.get_mut(&id).ok_or_else(|| not_found(&id))?;
        let want = annotations(&pod.own, &containers, pod.state);
        self.sync(&id, want).await.map_err(status_of)?;
        pod.containers = containers;
        info!(
            sandbox = %id,
            containers = pod.containers.len(),
            resources = %pod.total().to_json(),
            "sandboxer: containers updated"
        );
        Ok(Response::new(ControllerUpdateResponse {}))
    }
}

#[cfg(test)]
mod tests;
