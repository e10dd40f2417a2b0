//! The shim v2 Task service: containerd's view of a warren sandbox.
//!
//! The shim runs nothing itself; the warren server stays the source of truth.
//!
//! - **slot** (the default): `Create` creates the sandbox in warren (which validates it and
//!   writes its resources.json), `Start` reports it running with the shim's own pid, `Kill`
//!   with a terminating signal ends the task with status 128 + signal, `Delete` removes the
//!   sandbox. A sandbox removed behind containerd's back (`warren rm`) ends the task too.
//! - **linux**: `Create` mounts containerd's snapshot on the bundle's rootfs (as runc's shim
//!   does); `Start` creates the sandbox in warren with the OCI process on that rootfs, so it
//!   runs from `Start`, as under runc; its output is copied from warren's log to the FIFOs
//!   containerd handed over, and its exit code is the task's. `Kill` signals the workload.
//! - **CRI pods**: containerd groups a pod's tasks into one shim (see `bootstrap`). The pod's
//!   sandbox task is the warren sandbox; its containers are recorded on it
//!   (`warren.dev/containers`) and create nothing of their own.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api::{self, Status};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code, r#async::TtrpcContext};
use containerd_shim::publisher::RemotePublisher;
use tokio::sync::watch;
use warren_control::Address;
use warren_proto::v1;
use warren_spec::{BackendKind, SandboxSpec};

use crate::bundle;
use crate::rootfs::{mount_rootfs, unmount_rootfs};
use crate::warren::{copy_logs, remove_sandbox, wait_exit};

/// Longest any call to the warren server may take: containerd must never hang on us.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) type TtrpcResult<T> = ttrpc::Result<T>;

pub(crate) fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// A warren gRPC status as the ttrpc status containerd maps to its errdefs.
pub(crate) fn from_grpc(what: &str, s: &tonic::Status) -> ttrpc::Error {
    use tonic::Code as G;
    let code = match s.code() {
        G::InvalidArgument | G::OutOfRange => Code::INVALID_ARGUMENT,
        G::NotFound => Code::NOT_FOUND,
        G::AlreadyExists => Code::ALREADY_EXISTS,
        G::FailedPrecondition => Code::FAILED_PRECONDITION,
        G::Aborted => Code::ABORTED,
        G::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
        G::Unimplemented => Code::UNIMPLEMENTED,
        G::Unavailable => Code::UNAVAILABLE,
        G::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        G::Unauthenticated => Code::UNAUTHENTICATED,
        G::PermissionDenied => Code::PERMISSION_DENIED,
        _ => Code::UNKNOWN,
    };
    err(code, format!("warren server: {what}: {}", s.message()))
}

/// Exit status of a process ended by `signal`, as a shell reports it.
pub fn signal_status(signal: u32) -> u32 {
    128 + signal
}

/// Whether a signal's default action ends a process. A slot task runs nothing, so it ends
/// on exactly these; stop/continue/ignored signals and 0 (a liveness probe) leave it running.
pub fn terminates(signal: u32) -> bool {
    // 0 probe, 17 SIGCHLD, 18 SIGCONT, 19 SIGSTOP, 20 SIGTSTP, 21 SIGTTIN, 22 SIGTTOU,
    // 23 SIGURG, 28 SIGWINCH.
    !matches!(signal, 0 | 17..=23 | 28) && signal <= 64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    /// Running, its workload paused in warren (`ctr task pause`).
    Paused,
    Stopped,
}

#[derive(Debug)]
struct Container {
    bundle: String,
    server: Address,
    backend: BackendKind,
    /// A CRI container's pod: the warren sandbox it is recorded on.
    pod: Option<String>,
    /// A linux task's sandbox, created in warren at `Start`.
    pending: Option<SandboxSpec>,
    /// Whether a sandbox named after this task exists in warren (to delete).
    in_warren: bool,
    /// Where the shim mounted containerd's snapshot, to unmount at delete.
    mounted: Option<PathBuf>,
    pid: u32,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    state: State,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// The FIFOs containerd's client reads, held open so it sees end-of-file at exit.
    fifos: Vec<File>,
    /// A linux task's stdout and stderr FIFOs, handed to the output copier at `Start`.
    outputs: [Option<File>; 2],
    exited: watch::Sender<bool>,
}

/// The shim's task service; one shim serves the containers containerd groups into it.
#[derive(Clone)]
pub struct Service {
    namespace: String,
    containers: Arc<Mutex<HashMap<String, Container>>>,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Service {
            namespace,
            containers: Arc::default(),
            publisher: Arc::new(publisher),
            exit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.containers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn client(&self, server: &Address) -> TtrpcResult<warren_control::client::Client> {
        match tokio::time::timeout(
            CALL_TIMEOUT,
            warren_control::client::connect(server, bundle::token_for(server).as_deref()),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(err(Code::UNAVAILABLE, error_chain(&e))),
            Err(_) => Err(err(
                Code::DEADLINE_EXCEEDED,
                format!("warren server at {server} did not answer within {CALL_TIMEOUT:?}"),
            )),
        }
    }

    /// Pauses (`pause`) or resumes a running task's sandbox in warren, and tells containerd.
    async fn pause_in_warren(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let (state, server, in_warren, pod) = self
            .lock()
            .get(id)
            .map(|c| (c.state, c.server.clone(), c.in_warren, c.pod.clone()))
            .ok_or_else(|| not_found(id))?;
        let (from, to) = if pause {
            (State::Running, State::Paused)
        } else {
            (State::Paused, State::Running)
        };
        if state == to {
            return Ok(api::Empty::default());
        }
        if state != from {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("task {id:?} is {state:?}, not {from:?}"),
            ));
        }
        if !in_warren {
            // A pod's container is recorded on the pod's sandbox: warren freezes whole
            // sandboxes, not one container among others.
            let pod = pod.unwrap_or_default();
            return Err(err(
                Code::UNIMPLEMENTED,
                format!(
                    "task {id:?} is a container of pod sandbox {pod:?}: warren pauses whole sandboxes"
                ),
            ));
        }
        let mut client = self.client(&server).await?;
        let req = v1::PauseSandboxRequest {
            name: id.to_string(),
        };
        let what = if pause { "pause" } else { "resume" };
        let call = async {
            if pause {
                client.pause_sandbox(req).await
            } else {
                client.unpause_sandbox(req).await
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => return Err(from_grpc(&format!("{what} sandbox {id:?}"), &s)),
            Err(_) => {
                return Err(err(
                    Code::DEADLINE_EXCEEDED,
                    format!("warren server at {server} did not answer within {CALL_TIMEOUT:?}"),
                ));
            }
        }
        if let Some(c) = self.lock().get_mut(id)
            && c.state == from
        {
            c.state = to;
        }
        log::info!("task {id}: {what}d");
        let topic = if pause {
            topics::TASK_PAUSED_EVENT_TOPIC
        } else {
            topics::TASK_RESUMED_EVENT_TOPIC
        };
        let event: Box<dyn MessageDyn> = if pause {
            Box::new(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            })
        } else {
            Box::new(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            })
        };
        self.publish(topic, event).await;
        Ok(api::Empty::default())
    }

    /// A paused task that warren resumed to deliver a signal runs again.
    async fn resumed(&self, id: &str) {
        let was_paused = {
            let mut map = self.lock();
            match map.get_mut(id) {
                Some(c) if c.state == State::Paused => {
                    c.state = State::Running;
                    true
                }
                _ => false,
            }
        };
        if was_paused {
            let event = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
                .await;
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Default::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("publish {topic}: {e}");
        }
    }

    /// Ends the task with `status` (once) and tells containerd.
    async fn finish(&self, id: &str, status: u32) {
        let event = {
            let mut map = self.lock();
            let Some(c) = map.get_mut(id) else { return };
            if c.state == State::Stopped {
                return;
            }
            c.state = State::Stopped;
            c.exit_status = status;
            let now = Timestamp::now();
            c.exited_at = Some(now.clone());
            c.fifos.clear();
            c.exited.send_replace(true);
            TaskExit {
                container_id: id.to_string(),
                id: id.to_string(),
                pid: c.pid,
                exit_status: status,
                exited_at: Some(now).into(),
                ..Default::default()
            }
        };
        log::info!("task {id} exited with status {status}");
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
    }

    /// Creates the sandbox in warren and returns it; every failure is the containerd call's.
    async fn create_in_warren(
        &self,
        server: &Address,
        spec: &SandboxSpec,
    ) -> TtrpcResult<v1::Sandbox> {
        let id = &spec.name;
        let mut client = self.client(server).await?;
        let call = client.create_sandbox(v1::CreateSandboxRequest {
            spec: Some(warren_proto::spec_to_pb(spec)),
            ..Default::default()
        });
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().sandbox.unwrap_or_default()),
            Ok(Err(s)) => Err(from_grpc(&format!("create sandbox {id:?}"), &s)),
            Err(_) => Err(err(
                Code::DEADLINE_EXCEEDED,
                format!("warren server: create sandbox {id:?}: no answer within {CALL_TIMEOUT:?}"),
            )),
        }
    }

    /// The workload's host pid, which the linux backend reports once it started; the create
    /// reply may predate it, so ask once more then.
    async fn workload_pid(&self, server: &Address, created: v1::Sandbox) -> Option<u32> {
        let pid_of = |sb: &v1::Sandbox| {
            sb.status
                .as_ref()
                .and_then(|s| s.backend_info.get("pid"))
                .and_then(|p| p.parse().ok())
        };
        if let Some(pid) = pid_of(&created) {
            return Some(pid);
        }
        let name = created.spec.map(|s| s.name).unwrap_or_default();
        let mut client = self.client(server).await.ok()?;
        let call = client.get_sandbox(v1::GetSandboxRequest { name });
        let sb = tokio::time::timeout(CALL_TIMEOUT, call).await.ok()?.ok()?;
        pid_of(&sb.into_inner())
    }

    /// Sends `signal` to sandbox `name` in warren. One that has ended meanwhile (or was
    /// removed) is fine: containerd learns the end from the exit event.
    async fn signal_in_warren(&self, name: &str, signal: u32) -> TtrpcResult<api::Empty> {
        let server = self.lock().get(name).map(|c| c.server.clone());
        let Some(server) = server else {
            return Err(not_found(name));
        };
        let mut client = self.client(&server).await?;
        let call = client.signal_sandbox(v1::SignalSandboxRequest {
            name: name.to_string(),
            signal: i32::try_from(signal).unwrap_or(i32::MAX),
        });
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => Ok(api::Empty::default()),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                Ok(api::Empty::default())
            }
            Ok(Err(s)) => Err(from_grpc(&format!("signal sandbox {name:?}"), &s)),
            Err(_) => Err(err(
                Code::DEADLINE_EXCEEDED,
                format!("warren server: signal {name:?}: no answer within {CALL_TIMEOUT:?}"),
            )),
        }
    }

    /// Ends task `id` when warren sandbox `name` (its own, or its pod's) finishes or
    /// disappears.
    fn watch_sandbox(&self, id: String, name: String, server: Address) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(mut client) = this.client(&server).await else {
                return;
            };
            if let Some(status) = wait_exit(&mut client, &name).await {
                this.finish(&id, status).await;
            }
        });
    }

    /// A linux task from `Start` on: its output copied to containerd's FIFOs until the
    /// sandbox ends, then its exit status.
    fn forward(&self, id: String, server: Address, outputs: [Option<File>; 2]) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(mut client) = this.client(&server).await else {
                return;
            };
            let [out, err] = outputs.map(|f| f.map(tokio::fs::File::from_std));
            if let Err(e) = copy_logs(&mut client, &id, out, err).await {
                log::warn!("task {id}: output not copied: {e}");
            }
            if let Some(status) = wait_exit(&mut client, &id).await {
                this.finish(&id, status).await;
            }
        });
    }

    /// Adds `id` to (or removes it from) the containers recorded on a pod's sandbox.
    async fn record_member(
        &self,
        server: &Address,
        pod: &str,
        id: &str,
        add: bool,
    ) -> TtrpcResult<()> {
        let mut client = self.client(server).await?;
        // Optimistic concurrency: the pod's other containers are recorded at the same time.
        for _ in 0..20 {
            let sb = match client
                .get_sandbox(v1::GetSandboxRequest {
                    name: pod.to_string(),
                })
                .await
            {
                Ok(sb) => sb.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound && !add => return Ok(()),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(err(
                        Code::NOT_FOUND,
                        format!("container {id:?}: its pod sandbox {pod:?} is not in warren"),
                    ));
                }
                Err(s) => return Err(from_grpc(&format!("get pod sandbox {pod:?}"), &s)),
            };
            let current = sb
                .spec
                .as_ref()
                .and_then(|s| s.annotations.get(bundle::ANNOTATION_CONTAINERS))
                .cloned()
                .unwrap_or_default();
            let mut members: Vec<&str> = current
                .split(',')
                .filter(|m| !m.is_empty() && *m != id)
                .collect();
            if add {
                members.push(id);
            }
            let mut req = v1::UpdateSandboxRequest {
                name: pod.to_string(),
                expected_revision: Some(sb.revision),
                ..Default::default()
            };
            if members.is_empty() {
                req.remove_annotations
                    .push(bundle::ANNOTATION_CONTAINERS.to_string());
            } else {
                req.set_annotations
                    .insert(bundle::ANNOTATION_CONTAINERS.to_string(), members.join(","));
            }
            match client.update_sandbox(req).await {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                Err(s) if s.code() == tonic::Code::NotFound && !add => return Ok(()),
                Err(s) => {
                    return Err(from_grpc(
                        &format!("record container {id:?} on pod {pod:?}"),
                        &s,
                    ));
                }
            }
        }
        Err(err(
            Code::ABORTED,
            format!("container {id:?}: pod sandbox {pod:?} kept changing; retry"),
        ))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn no_exec(exec_id: &str) -> TtrpcResult<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(err(
            Code::NOT_FOUND,
            format!("exec {exec_id:?}: the warren shim runs no exec processes"),
        ))
    }
}

fn not_found(id: &str) -> ttrpc::Error {
    err(
        Code::NOT_FOUND,
        format!("task {id:?} not found in this shim"),
    )
}

/// Opens a FIFO path for the life of the task without blocking: O_RDWR on a FIFO never
/// waits for the other end. Anything that is not a FIFO path (empty, `file://`, `binary://`)
/// is left alone.
fn hold_fifo(path: &str) -> Option<File> {
    use std::os::unix::fs::FileTypeExt;
    if !path.starts_with('/') {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_fifo() {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| log::warn!("open {path}: {e}"))
        .ok()
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        if self.lock().contains_key(&id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("task {id:?} already exists"),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "checkpoint: the warren shim cannot restore checkpoints",
            ));
        }
        let plan = bundle::load(&PathBuf::from(&req.bundle), &id, &self.namespace)
            .map_err(|e| err(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        if plan.spec.backend == BackendKind::Linux && req.terminal {
            return Err(err(
                Code::UNIMPLEMENTED,
                "terminal: a terminal is not supported through the shim yet; use `warren exec -it`",
            ));
        }
        let backend = plan.spec.backend;
        let mut pending = None;
        let mut mounted = None;
        let mut in_warren = false;
        if let Some(pod) = &plan.pod {
            self.record_member(&plan.server, pod, &id, true).await?;
        } else if backend == BackendKind::Linux {
            let root = PathBuf::from(plan.spec.image.clone().unwrap_or_default());
            if !req.rootfs.is_empty() {
                mount_rootfs(&req.rootfs, &root).await?;
                mounted = Some(root);
            }
            pending = Some(plan.spec.clone());
        } else {
            self.create_in_warren(&plan.server, &plan.spec).await?;
            in_warren = true;
        }
        let held = [&req.stdin, &req.stdout, &req.stderr].map(|p| hold_fifo(p));
        // A linux task's output goes to these; the held ones close at exit.
        let outputs = if backend == BackendKind::Linux {
            [&held[1], &held[2]].map(|f| f.as_ref().and_then(|f| f.try_clone().ok()))
        } else {
            [None, None]
        };
        let fifos = held.into_iter().flatten().collect();
        let (exited, _) = watch::channel(false);
        let pid = std::process::id();
        self.lock().insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                server: plan.server,
                backend,
                pod: plan.pod,
                pending,
                in_warren,
                mounted,
                pid,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                state: State::Created,
                exit_status: 0,
                exited_at: None,
                fifos,
                outputs,
                exited,
            },
        );
        log::info!("task {id}: created ({backend})");
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: Some(TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        no_exec(&req.exec_id)?;
        let (server, pending, pod, outputs) = {
            let mut map = self.lock();
            let c = map.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            match c.state {
                State::Created => {}
                State::Running | State::Paused => {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("task {:?} is already running", req.id),
                    ));
                }
                State::Stopped => {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("task {:?} has already exited", req.id),
                    ));
                }
            }
            let outputs = std::mem::take(&mut c.outputs);
            (c.server.clone(), c.pending.take(), c.pod.clone(), outputs)
        };
        let mut pid = std::process::id();
        match (pending, pod) {
            (Some(spec), _) => {
                let sb = self
                    .create_in_warren(&server, &spec)
                    .await
                    .inspect_err(|_| {
                        // Not started: a retried Start may try again.
                        if let Some(c) = self.lock().get_mut(&req.id) {
                            c.pending = Some(spec.clone());
                        }
                    })?;
                if let Some(p) = self.workload_pid(&server, sb).await {
                    pid = p;
                }
                self.forward(req.id.clone(), server, outputs);
            }
            (None, Some(pod)) => self.watch_sandbox(req.id.clone(), pod, server),
            (None, None) => self.watch_sandbox(req.id.clone(), req.id.clone(), server),
        }
        {
            let mut map = self.lock();
            let c = map.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            c.in_warren |= c.backend == BackendKind::Linux;
            c.pid = pid;
            if c.state == State::Created {
                c.state = State::Running;
            }
        }
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id,
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        no_exec(&req.exec_id)?;
        let map = self.lock();
        let c = map.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid,
            status: match c.state {
                State::Created => Status::CREATED,
                State::Running => Status::RUNNING,
                State::Paused => Status::PAUSED,
                State::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: c.stdin.clone(),
            stdout: c.stdout.clone(),
            stderr: c.stderr.clone(),
            terminal: c.terminal,
            exit_status: c.exit_status,
            exited_at: c.exited_at.clone().into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        no_exec(&req.exec_id)?;
        let (state, linux, in_warren) = self
            .lock()
            .get(&req.id)
            .map(|c| (c.state, c.backend == BackendKind::Linux, c.in_warren))
            .ok_or_else(|| not_found(&req.id))?;
        if state == State::Stopped {
            return Err(err(
                Code::NOT_FOUND,
                format!("task {:?}: process already finished", req.id),
            ));
        }
        if linux && in_warren && matches!(state, State::Running | State::Paused) {
            // The workload decides; the task ends when warren reports it ended.
            if req.signal == 0 {
                return Ok(api::Empty::default());
            }
            // warren resumes a paused workload to deliver the signal.
            self.signal_in_warren(&req.id, req.signal).await?;
            self.resumed(&req.id).await;
            return Ok(api::Empty::default());
        }
        if terminates(req.signal) {
            // The task's status first: warren's end, which its watcher reports too, must not
            // overtake it.
            self.finish(&req.id, signal_status(req.signal)).await;
            // warren's record ends too, exited with 128 + signal; one already gone or ended
            // is fine.
            if in_warren {
                // The ones a process-less backend takes; any other terminating signal ends
                // the slot as SIGKILL would.
                let sig = if matches!(req.signal, 1 | 2 | 9 | 15) {
                    req.signal
                } else {
                    9
                };
                self.signal_in_warren(&req.id, sig).await?;
            }
        }
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        no_exec(&req.exec_id)?;
        let mut rx = self
            .lock()
            .get(&req.id)
            .map(|c| c.exited.subscribe())
            .ok_or_else(|| not_found(&req.id))?;
        // Err: the task was deleted while we waited; its last status is gone with it.
        let _ = rx.wait_for(|done| *done).await;
        let map = self.lock();
        let (status, at) = map
            .get(&req.id)
            .map(|c| (c.exit_status, c.exited_at.clone()))
            .unwrap_or((signal_status(9), None));
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: at.into(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        no_exec(&req.exec_id)?;
        let (state, server, in_warren, pod, mounted) = self
            .lock()
            .get(&req.id)
            .map(|c| {
                (
                    c.state,
                    c.server.clone(),
                    c.in_warren,
                    c.pod.clone(),
                    c.mounted.clone(),
                )
            })
            .ok_or_else(|| not_found(&req.id))?;
        match state {
            State::Running | State::Paused => {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("task {:?} is running: kill it first", req.id),
                ));
            }
            // Never started: it ends here, as runc's delete of a created container does.
            State::Created => self.finish(&req.id, signal_status(9)).await,
            State::Stopped => {}
        }
        if in_warren {
            remove_sandbox(&mut self.client(&server).await?, &req.id).await?;
        }
        if let Some(pod) = &pod {
            self.record_member(&server, pod, &req.id, false).await?;
        }
        if let Some(root) = mounted {
            unmount_rootfs(&root).await?;
        }
        let Some(c) = self.lock().remove(&req.id) else {
            return Err(not_found(&req.id));
        };
        log::info!("task {}: deleted", req.id);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id,
                pid: c.pid,
                exit_status: c.exit_status,
                exited_at: c.exited_at.clone().into(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid: c.pid,
            exit_status: c.exit_status,
            exited_at: c.exited_at.into(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pid = self
            .lock()
            .get(&req.id)
            .map(|c| c.pid)
            .ok_or_else(|| not_found(&req.id))?;
        Ok(api::PidsResponse {
            processes: vec![containerd_shim::protos::api::ProcessInfo {
                pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.lock().is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        // A slot task reads no stdin: there is nothing to close.
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Err(unsupported(
            "stats",
            "`warren get NAME` shows its resources",
        ))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unsupported("update", "use `warren update NAME`"))
    }

    /// Pauses the task's sandbox in warren (its workload frozen: `warren pause`).
    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pause_in_warren(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.pause_in_warren(&req.id, false).await
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unsupported("checkpoint", "not implemented yet"))
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unsupported("exec", "use `warren exec` on linux sandboxes"))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unsupported("resize_pty", "slot tasks have no terminal"))
    }
}

fn unsupported(call: &str, hint: &str) -> ttrpc::Error {
    err(
        Code::UNIMPLEMENTED,
        format!("{call}: not supported by containerd-shim-warren-v1 ({hint})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminating_signals() {
        for s in [1, 2, 9, 15, 6, 34, 64] {
            assert!(terminates(s), "{s}");
        }
        for s in [0, 17, 18, 19, 20, 28, 65] {
            assert!(!terminates(s), "{s}");
        }
        assert_eq!(signal_status(9), 137);
        assert_eq!(signal_status(15), 143);
    }
}
