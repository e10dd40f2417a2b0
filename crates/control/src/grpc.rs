//! The `warren.v1.Sandboxes` gRPC service: wire conversion and the one place where control
//! plane errors become gRPC status codes.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::debug;
use warren_agent::AgentError;
use warren_proto::v1::sandboxes_server::Sandboxes;
use warren_proto::v1::{self, sandbox_event};
use warren_proto::{failure_policy_from_pb, resource_info_to_pb, resources_from_pb, spec_from_pb};
use warren_runtime::{BackendError, logs};
use warren_spec::BackendKind;

use crate::plane::{ControlError, ControlPlane, EventKind, SandboxUpdate};

/// Maps every control plane error to the gRPC code a client can act on.
pub fn status_of(e: ControlError) -> Status {
    // The whole cause chain, once: "read wasm module /x.wasm: No such file or directory".
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    match e {
        ControlError::InvalidSpec(_) | ControlError::Selector(_) => Status::invalid_argument(msg),
        ControlError::NotFound { .. } => Status::not_found(msg),
        ControlError::AlreadyExists { .. } => Status::already_exists(msg),
        ControlError::Busy { .. } | ControlError::RevisionMismatch { .. } => Status::aborted(msg),
        ControlError::Agent(AgentError::Unavailable { .. }) => Status::failed_precondition(msg),
        ControlError::Agent(AgentError::Backend(b)) => match b {
            BackendError::Capacity { .. } => Status::resource_exhausted(msg),
            BackendError::Unsupported { .. } => Status::unimplemented(msg),
            BackendError::NotFound { .. } => Status::not_found(msg),
            BackendError::AlreadyExists { .. } => Status::already_exists(msg),
            BackendError::Io { .. } | BackendError::Other(_) => Status::internal(msg),
        },
        ControlError::Store(_) => Status::unavailable(msg),
        ControlError::NoLogs { .. } => Status::failed_precondition(msg),
        ControlError::WaitTimeout { .. } => Status::deadline_exceeded(msg),
        ControlError::Internal(_) => Status::internal(msg),
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid sandbox spec: {e}"))
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

#[tonic::async_trait]
impl Sandboxes for SandboxService {
    async fn create_sandbox(
        &self,
        req: Request<v1::CreateSandboxRequest>,
    ) -> Result<Response<v1::CreateSandboxResponse>, Status> {
        let pb = req
            .into_inner()
            .spec
            .ok_or_else(|| invalid("spec: missing"))?;
        let spec = spec_from_pb(pb).map_err(invalid)?;
        let (rec, created) = self.plane.create(spec).await.map_err(status_of)?;
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
        let grace = req
            .grace_period_seconds
            .map(|s| Duration::from_secs(u64::from(s)));
        let rec = self
            .plane
            .delete(&req.name, grace)
            .await
            .map_err(status_of)?;
        Ok(Response::new(v1::DeleteSandboxResponse {
            sandbox: Some(rec.to_pb()),
        }))
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
                    // Only ever set to true: any change (or the sender gone) means stop.
                    _ = shutdown.changed() => return,
                };
                match ev {
                    Ok(ev) => {
                        if !selector.matches(&ev.record.spec.labels) {
                            continue;
                        }
                        let out = v1::SandboxEvent {
                            r#type: event_type(ev.kind) as i32,
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
        let rec = self
            .plane
            .wait(&req.name, timeout)
            .await
            .map_err(status_of)?;
        Ok(Response::new(rec.to_pb()))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        req: Request<v1::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = req.into_inner();
        let (path, done) = self.plane.log_source(&req.name).map_err(status_of)?;
        let since = req.since_ms.map(|ms| {
            std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        });
        let tail = req.tail.map(|t| t as usize);
        // A sandbox that has not written anything yet has no file: that is an empty log.
        let (records, offset) = match logs::read_logs_from(&path, tail, since) {
            Ok(found) => found,
            Err(_) if !path.exists() => (Vec::new(), 0),
            Err(e) => {
                return Err(Status::internal(format!(
                    "reading the log of {:?}: {e}",
                    req.name
                )));
            }
        };
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            for r in records {
                if tx.send(Ok(log_entry(r))).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            let mut follower = logs::LogFollower::new(path, offset, done);
            loop {
                let next = tokio::select! {
                    next = follower.next() => next,
                    _ = shutdown.changed() => return,
                };
                match next {
                    Ok(Some(r)) if since.is_none_or(|s| r.time >= s) => {
                        if tx.send(Ok(log_entry(r))).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("following the log: {e}"))))
                            .await;
                        return;
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
}

/// A stream fed by a task; the task ends when the client goes away (send fails).
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
