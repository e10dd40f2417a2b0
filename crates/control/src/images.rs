//! The `warren.v1.Images` gRPC service over the node's image store.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};
use warren_image::{ImageError, ImageStore, ImageSummary, PullOptions, PullProgress};
use warren_proto::v1::{self, images_server::Images, pull_image_progress};

#[derive(Clone)]
pub struct ImagesService {
    store: ImageStore,
    /// What uses the images: the server's sandboxes and warm pools.
    plane: crate::plane::ControlPlane,
}

impl std::fmt::Debug for ImagesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagesService")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Whether removing `name` would delete `image` (its id, or its last name) rather than drop
/// one of its names.
fn deletes(image: &warren_image::Image, name: &str) -> bool {
    let hex = |s: &str| s.strip_prefix("sha256:").unwrap_or(s).to_string();
    image.names.len() <= 1 || hex(&image.id).starts_with(&hex(name))
}

impl ImagesService {
    pub fn new(store: ImageStore, plane: crate::plane::ControlPlane) -> Self {
        ImagesService { store, plane }
    }

    /// What keeps `image` in use on this node, when removing `name` would delete it (not
    /// when it only drops one of its names): its sandboxes, in any phase, the checkpoints
    /// taken of them and the warm pools of its names. A running sandbox's root is made of
    /// the image's layers, and a restore needs them. Reads files: call off the async workers.
    fn users(&self, image: &warren_image::Image, name: &str) -> Vec<String> {
        if !deletes(image, name) {
            return Vec::new();
        }
        let mut users: Vec<String> = self
            .plane
            .sandboxes_of_image(&image.id, |name| {
                self.store.resolve(name).ok().map(|i| i.id)
            })
            .into_iter()
            .map(|n| format!("sandbox {n}"))
            .collect();
        users.extend(
            self.plane
                .checkpoints_of_image(&image.id)
                .into_iter()
                .map(|n| format!("checkpoint {n}")),
        );
        for (backend, warm, _, target) in self.plane.agent().warm() {
            if target > 0 && self.store.resolve(&warm).is_ok_and(|i| i.id == image.id) {
                users.push(format!("the {backend} warm pool of {warm}"));
            }
        }
        users
    }
}

pub use warren_runtime::error_chain;

fn status_of(e: ImageError) -> Status {
    let msg = error_chain(&e);
    match e {
        ImageError::NotFound(_) => Status::not_found(msg),
        ImageError::AmbiguousId { .. }
        | ImageError::InvalidName { .. }
        | ImageError::InvalidDigest { .. }
        | ImageError::DigestMismatch { .. }
        | ImageError::SizeMismatch { .. }
        | ImageError::InvalidLayout { .. }
        | ImageError::InvalidManifest { .. }
        | ImageError::Json { .. }
        | ImageError::UnsafeEntry { .. }
        | ImageError::Unsupported(_)
        | ImageError::NoMatchingPlatform { .. }
        | ImageError::InvalidModule { .. }
        | ImageError::WasmModule { .. } => Status::invalid_argument(msg),
        ImageError::Registry { .. } => Status::unavailable(msg),
        ImageError::Changed { .. } => Status::aborted(msg),
        _ => Status::internal(msg),
    }
}

pub fn image_to_pb(s: &ImageSummary) -> v1::Image {
    v1::Image {
        id: s.id.clone(),
        names: s.names.clone(),
        size: s.size,
        layers: s.layers as u32,
        created: s.created.clone(),
        kind: s.kind.to_string(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("image store worker: {e}")))?
        .map_err(status_of)
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<v1::PullImageProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Images for ImagesService {
    async fn import_image(
        &self,
        req: Request<v1::ImportImageRequest>,
    ) -> Result<Response<v1::ImportImageResponse>, Status> {
        let req = req.into_inner();
        if req.path.is_empty() {
            return Err(Status::invalid_argument("path: empty"));
        }
        let store = self.store.clone();
        let images =
            blocking(move || store.import(std::path::Path::new(&req.path), req.name.as_deref()))
                .await?;
        Ok(Response::new(v1::ImportImageResponse {
            images: images.iter().map(image_to_pb).collect(),
        }))
    }

    type PullImageStream = ProgressStream;

    async fn pull_image(
        &self,
        req: Request<v1::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let req = req.into_inner();
        if req.reference.is_empty() {
            return Err(Status::invalid_argument("reference: empty"));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let store = self.store.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let progress = move |p: PullProgress| {
                let event = match p {
                    PullProgress::Resolved {
                        reference,
                        layers,
                        total_bytes,
                    } => pull_image_progress::Event::Resolved(pull_image_progress::Resolved {
                        reference,
                        layers: layers as u32,
                        total_bytes,
                    }),
                    PullProgress::Layer {
                        digest,
                        done,
                        total,
                    } => pull_image_progress::Event::Layer(pull_image_progress::Layer {
                        digest,
                        done,
                        total,
                    }),
                    PullProgress::Unpacking { digest } => {
                        pull_image_progress::Event::Unpacking(digest)
                    }
                    // The summary below carries the whole image.
                    PullProgress::Done { .. } => return,
                };
                let _ = progress_tx.send(Ok(v1::PullImageProgress { event: Some(event) }));
            };
            let options = PullOptions {
                insecure: req.insecure,
            };
            let result = store.pull(&req.reference, &options, &progress).await;
            let last = match result {
                Ok(summary) => Ok(v1::PullImageProgress {
                    event: Some(pull_image_progress::Event::Done(image_to_pb(&summary))),
                }),
                Err(e) => Err(status_of(e)),
            };
            let _ = tx.send(last);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn list_images(
        &self,
        _req: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        let store = self.store.clone();
        let images = blocking(move || store.list()).await?;
        Ok(Response::new(v1::ListImagesResponse {
            images: images.iter().map(image_to_pb).collect(),
        }))
    }

    async fn remove_image(
        &self,
        req: Request<v1::RemoveImageRequest>,
    ) -> Result<Response<v1::RemoveImageResponse>, Status> {
        let name = req.into_inner().name;
        // No sandbox is registered between the users' check and the deletion.
        let _removing = self.plane.removing_image().await;
        let this = self.clone();
        let asked = name.clone();
        let (found, users) = blocking(move || {
            let found = this.store.resolve(&asked)?;
            let users = this.users(&found, &asked);
            Ok((found, users))
        })
        .await?;
        // What was checked: the removal of this image, as an untag or as a delete.
        let may_delete = deletes(&found, &name);
        if !users.is_empty() {
            let short = found.id.strip_prefix("sha256:").unwrap_or(&found.id);
            return Err(Status::failed_precondition(format!(
                "image {name} ({}) is in use by {}: remove {} first",
                &short[..short.len().min(12)],
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )));
        }
        let store = self.store.clone();
        let id = found.id.clone();
        let (image, deleted) = blocking(move || {
            let image = store.remove_checked(&name, &id, may_delete)?;
            // Untagging one of several names deletes nothing.
            Ok((image, store.resolve(&id).is_err()))
        })
        .await?;
        if deleted {
            self.plane.agent().images_removed();
        }
        Ok(Response::new(v1::RemoveImageResponse {
            image: Some(image_to_pb(&image)),
        }))
    }
}
