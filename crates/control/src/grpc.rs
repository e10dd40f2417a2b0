//! The `warren.v1.Sandboxes` gRPC service: wire conversion and the one place where control
//! plane errors become gRPC status codes.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::debug;
use warren_agent::AgentError;
use warren_agent::api::ErrorKind;
use warren_proto::v1::sandboxes_server::Sandboxes;
use warren_proto::v1::{self, sandbox_event};
use warren_proto::{failure_policy_from_pb, resource_info_to_pb, resources_from_pb, spec_from_pb};
use warren_runtime::{ExecProcess, ExecRequest, Stdin, logs};
use warren_spec::BackendKind;

use crate::plane::{ControlError, ControlPlane, EventKind, LogSource, SandboxUpdate};

/// Maps every control plane error to the gRPC code a client can act on.
pub fn status_of(e: ControlError) -> Status {
    // The whole cause chain, once: "read wasm module /x.wasm: No such file or directory".
    let msg = warren_runtime::error_chain(&e);
    match e {
        ControlError::InvalidSpec(_)
        | ControlError::InvalidArgument(_)
        | ControlError::Selector(_) => Status::invalid_argument(msg),
        ControlError::NotFound { .. } => Status::not_found(msg),
        ControlError::AlreadyExists { .. } => Status::already_exists(msg),
        ControlError::Busy { .. }
        | ControlError::Stopping { .. }
        | ControlError::RevisionMismatch { .. } => Status::aborted(msg),
        ControlError::Agent(AgentError::Unavailable { .. }) => Status::failed_precondition(msg),
        ControlError::Agent(AgentError::Unreachable { .. }) => Status::unavailable(msg),
        ControlError::Agent(a) => match a.kind() {
            ErrorKind::Capacity => Status::resource_exhausted(msg),
            ErrorKind::Unsupported => Status::unimplemented(msg),
            ErrorKind::NotFound => Status::not_found(msg),
            ErrorKind::AlreadyExists => Status::already_exists(msg),
            ErrorKind::Invalid => Status::invalid_argument(msg),
            ErrorKind::Unavailable => Status::failed_precondition(msg),
            ErrorKind::Unauthorized => Status::permission_denied(msg),
            ErrorKind::Internal => Status::internal(msg),
        },
        ControlError::Schedule(_) | ControlError::PoolFull { .. } => {
            Status::resource_exhausted(msg)
        }
        ControlError::InvalidPool(_) => Status::invalid_argument(msg),
        ControlError::PoolNotFound { .. } => Status::not_found(msg),
        ControlError::PoolMissing { .. } | ControlError::PoolInUse { .. } => {
            Status::failed_precondition(msg)
        }
        ControlError::Store(_) => Status::unavailable(msg),
        ControlError::NoLogs { .. } | ControlError::IdMismatch { .. } => {
            Status::failed_precondition(msg)
        }
        ControlError::WaitTimeout { .. } => Status::deadline_exceeded(msg),
        ControlError::NotRunning { .. } | ControlError::Paused { .. } => {
            Status::failed_precondition(msg)
        }
        ControlError::Internal(_) => Status::internal(msg),
        ControlError::InvalidPolicy(_) => Status::invalid_argument(msg),
        ControlError::PolicyNotFound { .. } => Status::not_found(msg),
        ControlError::PolicyMissing { .. }
        | ControlError::PolicyInUse { .. }
        | ControlError::PolicyViolation { .. } => Status::failed_precondition(msg),
        ControlError::Checkpoint(c) => crate::checkpoints::status_of(&c, msg),
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid sandbox spec: {e}"))
}

/// What `run` checks in a spec, checked in an exec too: a NUL cannot cross `execve` (the
/// string would be cut short), a variable name has no `=`, and the working directory is
/// absolute (the sandbox's root is the only place it could be relative to).
fn check_exec_start(start: &v1::ExecStart) -> Result<(), Status> {
    let bad = |field: String, value: &str, reason: &str| {
        Err(Status::invalid_argument(format!(
            "exec: {field}: {value:?} {reason}"
        )))
    };
    for (i, arg) in start.command.iter().enumerate() {
        if arg.contains('\0') {
            return bad(format!("command[{i}]"), arg, "contains a NUL character");
        }
    }
    for (key, value) in &start.env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return bad(
                "env".into(),
                key,
                "is not a variable name (empty, or with '=' or NUL)",
            );
        }
        if value.contains('\0') {
            return bad(format!("env[{key:?}]"), value, "contains a NUL character");
        }
    }
    if let Some(dir) = start.working_dir.as_deref().filter(|d| !d.is_empty())
        && (!dir.starts_with('/') || dir.contains('\0'))
    {
        return bad(
            "workingDir".into(),
            dir,
            "must be an absolute path (without NUL)",
        );
    }
    Ok(())
}

/// A stop or delete request's grace period, within what a sandbox's own setting may be: a
/// stop holds its sandbox for the whole period.
fn grace_period(seconds: Option<u32>) -> Result<Option<Duration>, Status> {
    match seconds {
        Some(s) if s > warren_spec::MAX_GRACE_SECONDS => Err(Status::invalid_argument(format!(
            "grace_period_seconds: {s} must be from 0 to {}",
            warren_spec::MAX_GRACE_SECONDS
        ))),
        s => Ok(s.map(|s| Duration::from_secs(u64::from(s)))),
    }
}

#[derive(Debug, Clone)]
pub struct SandboxService {
    plane: ControlPlane,
    /// Flips to true on shutdown, ending watch streams so a graceful stop does not wait on them.
    shutdown: watch::Receiver<bool>,
}

impl SandboxService {
    pub fn new(plane: ControlPlane, shutdown: watch::Receiver<bool>) -> Self {
        SandboxService { plane, shutdown }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::SandboxEvent, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<v1::LogEntry, Status>> + Send>>;

fn log_entry(r: logs::LogRecord) -> v1::LogEntry {
    let ns = r
        .time
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    v1::LogEntry {
        time_ns: i64::try_from(ns).unwrap_or(i64::MAX),
        stream: match r.stream {
            logs::Stream::Stdout => v1::log_entry::Stream::Stdout as i32,
            logs::Stream::Stderr => v1::log_entry::Stream::Stderr as i32,
        },
        content: r.content,
        partial: r.partial,
    }
}

fn event_type(kind: EventKind) -> sandbox_event::Type {
    match kind {
        EventKind::Added => sandbox_event::Type::Added,
        EventKind::Modified => sandbox_event::Type::Modified,
        EventKind::Deleted => sandbox_event::Type::Deleted,
    }
}

impl SandboxService {
    /// A sandbox's output streamed from its remote agent (which applies `tail` and `since`
    /// and, with `follow`, ends the stream when the sandbox ends).
    async fn remote_logs(
        &self,
        agent: std::sync::Arc<warren_agent::remote::RemoteAgent>,
        id: String,
        req: v1::StreamLogsRequest,
    ) -> Result<Response<LogStream>, Status> {
        let mut rx = agent
            .logs(&id, req.follow, req.tail.map(|t| t as usize), req.since_ms)
            .await
            .map_err(|e| status_of(ControlError::Agent(e)))?;
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = stream_ended(&tx, &mut shutdown) => return,
                };
                let out = match next {
                    None => return,
                    Some(Ok(r)) => Ok(log_entry(r)),
                    Some(Err(e)) => Err(Status::unavailable(format!("following the log: {e}"))),
                };
                let end = out.is_err();
                if tx.send(out).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl Sandboxes for SandboxService {
    async fn create_sandbox(
        &self,
        req: Request<v1::CreateSandboxRequest>,
    ) -> Result<Response<v1::CreateSandboxResponse>, Status> {
        let started = std::time::Instant::now();
        let req = req.into_inner();
        let pb = req.spec.ok_or_else(|| invalid("spec: missing"))?;
        let spec = spec_from_pb(pb).map_err(invalid)?;
        let (backend, mode) = (spec.backend, self.plane.consistency_of(&spec).as_str());
        let pool = spec.pool.clone();
        let stdin = (!req.stdin.is_empty()).then(|| Stdin::from(req.stdin));
        let metrics = self.plane.metrics();
        let (mut rec, created) = match self.plane.create_with(spec, stdin).await {
            Ok(done) => {
                metrics.create_ok(done.0.spec.backend, mode, started.elapsed());
                done
            }
            Err(e) => {
                let status = status_of(e);
                // A pool's sandbox runs the pool's backend (the spec names none of its own).
                let backend = pool
                    .and_then(|p| self.plane.get_pool(&p).ok())
                    .map_or(backend, |p| p.spec.backend);
                metrics.create_failed(backend, status.code());
                return Err(status);
            }
        };
        if req.wait {
            let timeout = req
                .wait_timeout_ms
                .map(|ms| Duration::from_millis(u64::from(ms)));
            let wait = async {
                self.plane
                    .wait(&rec.spec.name, timeout)
                    .await
                    .map_err(status_of)
            };
            rec = until_shutdown(&self.shutdown, wait).await?;
        }
        Ok(Response::new(v1::CreateSandboxResponse {
            sandbox: Some(rec.to_pb()),
            created,
        }))
    }

    async fn get_sandbox(
        &self,
        req: Request<v1::GetSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let rec = self.plane.get(&req.into_inner().name).map_err(status_of)?;
        Ok(Response::new(rec.to_pb()))
    }

    async fn list_sandboxes(
        &self,
        req: Request<v1::ListSandboxesRequest>,
    ) -> Result<Response<v1::ListSandboxesResponse>, Status> {
        let req = req.into_inner();
        let backends = req
            .backends
            .iter()
            .map(|b| {
                b.parse::<BackendKind>().map_err(|_| {
                    Status::invalid_argument(format!(
                        "backends: {b:?} is not a backend (expected slot, linux, wasm or vm)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let recs = self
            .plane
            .list(&req.label_selector, &backends)
            .map_err(status_of)?;
        Ok(Response::new(v1::ListSandboxesResponse {
            sandboxes: recs.iter().map(|r| r.to_pb()).collect(),
        }))
    }

    async fn update_sandbox(
        &self,
        req: Request<v1::UpdateSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let req = req.into_inner();
        let update = SandboxUpdate {
            resources: req.resources.map(|r| resources_from_pb(Some(r))),
            set_labels: req.set_labels.into_iter().collect(),
            remove_labels: req.remove_labels,
            set_annotations: req.set_annotations.into_iter().collect(),
            remove_annotations: req.remove_annotations,
            expire_time: if req.clear_expire_time {
                Some(None)
            } else {
                req.expire_time.map(Some)
            },
            failure_policy: failure_policy_from_pb("failurePolicy", req.failure_policy)
                .map_err(invalid)?,
            expected_revision: req.expected_revision,
            reset_revision: req.reset_revision,
        };
        let rec = self
            .plane
            .update(&req.name, update)
            .await
            .map_err(status_of)?;
        Ok(Response::new(rec.to_pb()))
    }

    async fn delete_sandbox(
        &self,
        req: Request<v1::DeleteSandboxRequest>,
    ) -> Result<Response<v1::DeleteSandboxResponse>, Status> {
        let req = req.into_inner();
        let grace = grace_period(req.grace_period_seconds)?;
        let rec = self
            .plane
            // An empty id is none, as proto3 optional strings are often sent.
            .delete_id(
                &req.name,
                req.id.as_deref().filter(|id| !id.is_empty()),
                grace,
            )
            .await
            .map_err(status_of)?;
        Ok(Response::new(v1::DeleteSandboxResponse {
            sandbox: Some(rec.to_pb()),
        }))
    }

    async fn stop_sandbox(
        &self,
        req: Request<v1::StopSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let req = req.into_inner();
        let grace = grace_period(req.grace_period_seconds)?;
        let rec = self.plane.stop(&req.name, grace).await.map_err(status_of)?;
        Ok(Response::new(rec.to_pb()))
    }

    type WatchSandboxesStream = EventStream;

    async fn watch_sandboxes(
        &self,
        req: Request<v1::WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        let req = req.into_inner();
        let (selector, initial, mut rx) =
            self.plane.watch(&req.label_selector).map_err(status_of)?;
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            // What matches the selector as this watcher saw it: a sandbox whose labels come
            // to match is ADDED for it, one whose labels stop matching DELETED, as a
            // Kubernetes watch with a label selector says.
            let mut matching: std::collections::HashSet<String> =
                initial.iter().map(|r| r.spec.name.clone()).collect();
            if req.send_initial {
                for rec in initial {
                    let ev = v1::SandboxEvent {
                        r#type: sandbox_event::Type::Added as i32,
                        sandbox: Some(rec.to_pb()),
                        sequence: 0,
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    _ = stream_ended(&tx, &mut shutdown) => return,
                };
                match ev {
                    Ok(ev) => {
                        let name = &ev.record.spec.name;
                        let now = ev.kind != EventKind::Deleted
                            && selector.matches(&ev.record.spec.labels);
                        let kind = match (matching.contains(name), now) {
                            (false, false) => continue,
                            (false, true) => {
                                matching.insert(name.clone());
                                EventKind::Added
                            }
                            (true, true) => ev.kind,
                            (true, false) => {
                                matching.remove(name);
                                EventKind::Deleted
                            }
                        };
                        let out = v1::SandboxEvent {
                            r#type: event_type(kind) as i32,
                            sandbox: Some(ev.record.to_pb()),
                            sequence: ev.sequence,
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        debug!(missed = n, "watcher fell behind");
                        let msg =
                            format!("watch fell behind by {n} events; list again and re-watch");
                        let _ = tx.send(Err(Status::resource_exhausted(msg))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn wait_sandbox(
        &self,
        req: Request<v1::WaitSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let req = req.into_inner();
        let timeout = req
            .timeout_ms
            .map(|ms| Duration::from_millis(u64::from(ms)));
        let wait = async { self.plane.wait(&req.name, timeout).await.map_err(status_of) };
        let rec = until_shutdown(&self.shutdown, wait).await?;
        Ok(Response::new(rec.to_pb()))
    }

    async fn pause_sandbox(
        &self,
        req: Request<v1::PauseSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let rec = self
            .plane
            .pause(&req.into_inner().name, true)
            .await
            .map_err(status_of)?;
        Ok(Response::new(rec.to_pb()))
    }

    async fn unpause_sandbox(
        &self,
        req: Request<v1::PauseSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let rec = self
            .plane
            .pause(&req.into_inner().name, false)
            .await
            .map_err(status_of)?;
        Ok(Response::new(rec.to_pb()))
    }

    async fn signal_sandbox(
        &self,
        req: Request<v1::SignalSandboxRequest>,
    ) -> Result<Response<v1::SignalSandboxResponse>, Status> {
        let req = req.into_inner();
        self.plane
            .signal(&req.name, req.signal)
            .await
            .map_err(status_of)?;
        Ok(Response::new(v1::SignalSandboxResponse {}))
    }

    async fn get_sandbox_usage(
        &self,
        req: Request<v1::GetSandboxUsageRequest>,
    ) -> Result<Response<v1::SandboxUsage>, Status> {
        let name = req.into_inner().name;
        let usage = self.plane.usage(&name).await.map_err(status_of)?;
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let measured = usage.is_some();
        let u = usage.unwrap_or_default();
        Ok(Response::new(v1::SandboxUsage {
            name,
            measured,
            cpu_ns: u.cpu_ns,
            memory_bytes: u.memory_bytes,
            memory_peak_bytes: u.memory_peak_bytes,
            pids: u.pids,
            time_ms,
        }))
    }

    async fn list_processes(
        &self,
        req: Request<v1::ListProcessesRequest>,
    ) -> Result<Response<v1::ListProcessesResponse>, Status> {
        let name = req.into_inner().name;
        let processes = self.plane.processes(&name).await.map_err(status_of)?;
        Ok(Response::new(v1::ListProcessesResponse {
            name,
            processes: processes
                .into_iter()
                .map(|p| v1::Process {
                    pid: p.pid,
                    sandbox_pid: p.sandbox_pid,
                    ppid: p.ppid,
                    uid: p.uid,
                    state: p.state,
                    cpu_ns: p.cpu_ns,
                    rss_bytes: p.rss_bytes,
                    command: p.command,
                })
                .collect(),
        }))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        req: Request<v1::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = req.into_inner();
        let (path, done, next_run) =
            match self.plane.log_source(&req.name).await.map_err(status_of)? {
                LogSource::File {
                    path,
                    done,
                    next_run,
                    ..
                } => (path, done, next_run),
                LogSource::Remote { agent, id } => {
                    return self.remote_logs(agent, id, req).await;
                }
            };
        let since = req.since_ms.map(|ms| {
            std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        });
        let tail = req.tail.map(|t| t as usize);
        // A sandbox that has not written anything yet has no file: that is an empty log.
        let (records, offset) = match logs::read_logs_from(&path, tail, since) {
            Ok(found) => found,
            Err(e) if e.is_not_found() => (Vec::new(), 0),
            Err(e) => {
                return Err(Status::internal(format!(
                    "reading the log of {:?}: {}",
                    req.name,
                    warren_runtime::error_chain(&e)
                )));
            }
        };
        let mut shutdown = self.shutdown.clone();
        let plane = self.plane.clone();
        let stream = async_stream(move |tx| async move {
            // Per stream: the last record sent was partial (its line unfinished).
            let mut mid_line = [false; 2];
            for r in records {
                mid_line[r.stream.index()] = r.partial;
                if tx.send(Ok(log_entry(r))).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            let (mut path, mut offset, mut done, mut next_run) = (path, offset, done, next_run);
            loop {
                let mut follower = logs::LogFollower::new(path, offset, done);
                loop {
                    let next = tokio::select! {
                        next = follower.next() => next,
                        _ = stream_ended(&tx, &mut shutdown) => return,
                    };
                    match next {
                        Ok(Some(r)) if since.is_none_or(|s| r.time >= s) => {
                            mid_line[r.stream.index()] = r.partial;
                            if tx.send(Ok(log_entry(r))).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!("following the log: {e}"))))
                                .await;
                            return;
                        }
                    }
                }
                // This run's log is done. A sandbox run again under a new id (`warren
                // restart`, AutoRecreate) writes another file: followed from its start, as
                // `docker logs -f` follows a restarted container. One that ended, or went
                // (another sandbox made under its name is not its next run), ends the stream.
                let Some(want) = next_run.get().cloned() else {
                    return;
                };
                match plane.log_source(&req.name).await {
                    Ok(LogSource::File {
                        path: next,
                        done: next_done,
                        id,
                        next_run: after,
                    }) if id == want => {
                        (path, offset, done, next_run) = (next, 0, next_done, after);
                    }
                    _ => return,
                }
                // The last run's unfinished line ends here, not glued to the next run's first.
                for stream in [logs::Stream::Stdout, logs::Stream::Stderr] {
                    if std::mem::take(&mut mid_line[stream.index()]) {
                        let end = logs::LogRecord {
                            time: std::time::SystemTime::now(),
                            stream,
                            partial: false,
                            content: Vec::new(),
                        };
                        if tx.send(Ok(log_entry(end))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_server_info(
        &self,
        _req: Request<v1::GetServerInfoRequest>,
    ) -> Result<Response<v1::ServerInfo>, Status> {
        let summary = self.plane.summary();
        let backends = self
            .plane
            .agent()
            .report()
            .into_iter()
            .map(|r| v1::BackendInfo {
                name: r.kind.to_string(),
                available: r.available.is_ok(),
                // Asked now: a backend's summary can change (the vm backend's pool).
                detail: r.detail.unwrap_or_default(),
                reason: r.available.err().unwrap_or_default(),
                sandboxes: summary.by_backend.get(&r.kind).copied().unwrap_or(0) as u64,
            })
            .collect();
        Ok(Response::new(v1::ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node: summary.node,
            backends,
            store: summary.store,
            sandboxes: summary.sandboxes as u64,
            allocated: Some(resource_info_to_pb(&summary.allocated)),
        }))
    }

    type ExecStream = Pin<Box<dyn Stream<Item = Result<v1::ExecOutput, Status>> + Send>>;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<v1::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        use v1::exec_input::Input;
        let mut input = req.into_inner();
        let first = input.message().await?;
        let Some(v1::ExecInput {
            input: Some(Input::Start(start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "exec: the first message must be an ExecStart",
            ));
        };
        if start.command.is_empty() || start.command[0].is_empty() {
            return Err(Status::invalid_argument("exec: command is empty"));
        }
        check_exec_start(&start)?;
        let size = |s: Option<v1::TerminalSize>| {
            let s = s.unwrap_or_default();
            let clamp = |v: u32, d: u16| {
                if v == 0 {
                    d
                } else {
                    v.min(u32::from(u16::MAX)) as u16
                }
            };
            (clamp(s.rows, 24), clamp(s.cols, 80))
        };
        let request = ExecRequest {
            argv: start.command,
            env: start.env.into_iter().collect(),
            cwd: start.working_dir,
            user: start.user,
            tty: start.tty.then(|| size(start.size)),
        };
        let process = self
            .plane
            .exec(&start.name, request)
            .await
            .map_err(status_of)?;
        let ExecProcess {
            stdin,
            stdout,
            stderr,
            resize,
            wait,
        } = process;
        tokio::spawn(async move {
            let mut stdin = Some(stdin);
            while let Ok(Some(msg)) = input.message().await {
                match msg.input {
                    Some(Input::Stdin(bytes)) => {
                        if let Some(w) = &mut stdin
                            && (w.write_all(&bytes).await.is_err() || w.flush().await.is_err())
                        {
                            stdin = None;
                        }
                    }
                    Some(Input::CloseStdin(true)) => {
                        if let Some(mut w) = stdin.take() {
                            let _ = w.shutdown().await;
                        }
                    }
                    Some(Input::Resize(s)) => {
                        if let Some(resize) = &resize {
                            let (rows, cols) = size(Some(s));
                            let _ = resize(rows, cols);
                        }
                    }
                    _ => {}
                }
            }
        });
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            use v1::exec_output::Output;
            let run = async {
                let out = pump(stdout, tx.clone(), Output::Stdout);
                let err = async {
                    if let Some(stderr) = stderr {
                        pump(stderr, tx.clone(), Output::Stderr).await;
                    }
                };
                tokio::join!(out, err);
                match wait.await {
                    Ok(code) => Ok(v1::ExecOutput {
                        output: Some(Output::ExitCode(code)),
                    }),
                    Err(e) => Err(Status::internal(format!(
                        "exec: waiting for the process: {e}"
                    ))),
                }
            };
            // A client gone (or a server stopping) drops `wait`, which ends the process:
            // nobody is left to read its output or its exit (a `docker exec`'s would run on,
            // moby#9098; for sandboxes that run untrusted code, a leak).
            let msg = tokio::select! {
                msg = run => msg,
                _ = stream_ended(&tx, &mut shutdown) => return,
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task; the task ends when the client goes away (send fails).
/// Copies a process's output into the reply until end of file (a terminal's EIO included)
/// or until the client has gone.
async fn pump(
    mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    tx: tokio::sync::mpsc::Sender<Result<v1::ExecOutput, Status>>,
    wrap: fn(Vec<u8>) -> v1::exec_output::Output,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let msg = v1::ExecOutput {
                    output: Some(wrap(buf[..n].to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A call that waits for a sandbox's end, cut short as UNAVAILABLE when the server shuts
/// down: a graceful stop waits for calls in flight, and one such wait would hold it for as
/// long as the sandbox runs.
async fn until_shutdown<T>(
    shutdown: &tokio::sync::watch::Receiver<bool>,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        done = call => done,
        // A dropped sender (no shutdown to come) disables this branch.
        Ok(_) = shutdown.wait_for(|&down| down) => {
            Err(Status::unavailable("the server is shutting down"))
        }
    }
}

/// What ends a long-lived stream early: the client hanging up (its follower would otherwise
/// hold a file and a task until the sandbox next writes), or the server shutting down
/// (`shutdown` only ever turns true), said as UNAVAILABLE: a clean end would read as the
/// sandbox's.
async fn stream_ended<T>(
    tx: &tokio::sync::mpsc::Sender<Result<T, Status>>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        _ = tx.closed() => {}
        _ = shutdown.changed() => {
            let _ = tx
                .send(Err(Status::unavailable("the server is shutting down")))
                .await;
        }
    }
}

fn async_stream<T, F, Fut>(body: F) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
