//! The `warren.v1.Checkpoints` gRPC service: checkpoints taken of running sandboxes, kept by
//! the server with their manifests ([`store`]), and restored as new sandboxes
//! (docs/checkpoint.md). The plane's `plane/checkpoint.rs` does the work.

pub mod store;

use std::path::PathBuf;

use tonic::{Request, Response, Status};
use warren_proto::v1::{self, checkpoints_server::Checkpoints};
use warren_proto::{resource_info_to_pb, spec_to_pb};

use crate::grpc::status_of as control_status;
use crate::plane::{CheckpointSource, CheckpointTarget, ControlPlane, Taken};
use store::{CheckpointError, Manifest};

/// The gRPC code for a checkpoint error (`msg` is its whole cause chain).
pub fn status_of(e: &CheckpointError, msg: String) -> Status {
    match e {
        CheckpointError::NotFound { .. } => Status::not_found(msg),
        CheckpointError::AlreadyExists { .. } | CheckpointError::NameTaken { .. } => {
            Status::already_exists(msg)
        }
        CheckpointError::InUse { .. } => Status::aborted(msg),
        CheckpointError::Corrupt { .. } => Status::data_loss(msg),
        CheckpointError::Untrusted { .. } => Status::failed_precondition(msg),
        CheckpointError::Key { .. } => Status::internal(msg),
        CheckpointError::Kept { .. } => Status::internal(msg),
        CheckpointError::Invalid(_) => Status::invalid_argument(msg),
        CheckpointError::Io { .. } => Status::internal(msg),
    }
}

fn to_pb(manifest: &Manifest, path: &std::path::Path, stored: bool) -> v1::Checkpoint {
    v1::Checkpoint {
        name: manifest.name.clone(),
        sandbox: manifest.sandbox.clone(),
        sandbox_id: manifest.sandbox_id.clone(),
        backend: manifest.backend.to_string(),
        spec: Some(spec_to_pb(&manifest.spec)),
        resources: Some(resource_info_to_pb(&manifest.resources)),
        created_at_ms: manifest.created_at_ms,
        leave_running: manifest.leave_running,
        engine: manifest.engine.clone().into_iter().collect(),
        criu_version: manifest.criu_version.clone(),
        size: manifest.size,
        digest: manifest.digest.clone(),
        path: path.display().to_string(),
        stored,
    }
}

fn taken_pb(t: &Taken) -> v1::Checkpoint {
    to_pb(&t.manifest, &t.path, t.stored)
}

/// An output path from a request: absolute, as the server's host sees it.
fn output_path(field: &str, value: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field}: {value:?} is not an absolute path on the server's host"
        )));
    }
    Ok(path)
}

#[derive(Debug, Clone)]
pub struct CheckpointService {
    plane: ControlPlane,
}

impl CheckpointService {
    pub fn new(plane: ControlPlane) -> Self {
        CheckpointService { plane }
    }
}

#[tonic::async_trait]
impl Checkpoints for CheckpointService {
    async fn create_checkpoint(
        &self,
        req: Request<v1::CreateCheckpointRequest>,
    ) -> Result<Response<v1::CreateCheckpointResponse>, Status> {
        let req = req.into_inner();
        let target = match (req.output, req.name) {
            (Some(_), Some(_)) => {
                return Err(Status::invalid_argument(
                    "output and name: give one (an output path is not stored, so it has no name)",
                ));
            }
            (Some(out), None) => CheckpointTarget::Output(output_path("output", &out)?),
            (None, name) => CheckpointTarget::Store(name),
        };
        let (taken, sandbox) = self
            .plane
            .checkpoint(&req.sandbox, target, req.leave_running)
            .await
            .map_err(control_status)?;
        Ok(Response::new(v1::CreateCheckpointResponse {
            checkpoint: Some(taken_pb(&taken)),
            sandbox: Some(sandbox.to_pb()),
        }))
    }

    async fn restore_checkpoint(
        &self,
        req: Request<v1::RestoreCheckpointRequest>,
    ) -> Result<Response<v1::RestoreCheckpointResponse>, Status> {
        let req = req.into_inner();
        if req.checkpoint.is_empty() {
            return Err(Status::invalid_argument(
                "checkpoint: empty (give a stored checkpoint's name or an absolute path)",
            ));
        }
        let (sandbox, taken) = self
            .plane
            .restore(CheckpointSource::parse(&req.checkpoint), req.name)
            .await
            .map_err(control_status)?;
        Ok(Response::new(v1::RestoreCheckpointResponse {
            sandbox: Some(sandbox.to_pb()),
            checkpoint: Some(taken_pb(&taken)),
        }))
    }

    async fn list_checkpoints(
        &self,
        _req: Request<v1::ListCheckpointsRequest>,
    ) -> Result<Response<v1::ListCheckpointsResponse>, Status> {
        let store = self.plane.checkpoint_store().map_err(control_status)?;
        let list = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| control_status(e.into()))?;
        Ok(Response::new(v1::ListCheckpointsResponse {
            checkpoints: list.iter().map(|(p, m)| to_pb(m, p, true)).collect(),
        }))
    }

    async fn delete_checkpoint(
        &self,
        req: Request<v1::DeleteCheckpointRequest>,
    ) -> Result<Response<v1::Checkpoint>, Status> {
        let name = req.into_inner().name;
        let store = self.plane.checkpoint_store().map_err(control_status)?;
        let path = store.root().join(&name);
        let gone = tokio::task::spawn_blocking(move || store.delete(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| control_status(e.into()))?;
        Ok(Response::new(match gone {
            Some(m) => to_pb(&m, &path, false),
            None => v1::Checkpoint {
                path: path.display().to_string(),
                ..Default::default()
            },
        }))
    }

    async fn export_checkpoint(
        &self,
        req: Request<v1::ExportCheckpointRequest>,
    ) -> Result<Response<v1::Checkpoint>, Status> {
        let req = req.into_inner();
        let to = output_path("output", &req.output)?;
        let store = self.plane.checkpoint_store().map_err(control_status)?;
        let name = req.name;
        let out = to.clone();
        let manifest = tokio::task::spawn_blocking(move || {
            let lease = store.lease(&name)?;
            let manifest = Manifest::verify(&lease.dir, &format!("{name:?}"), store.key())?;
            store::export(&lease.dir, &out)?;
            Ok::<_, CheckpointError>(manifest)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| control_status(e.into()))?;
        Ok(Response::new(to_pb(&manifest, &to, false)))
    }
}
