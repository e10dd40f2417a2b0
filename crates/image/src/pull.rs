//! Pulling an image from an OCI/Docker registry with `oci-client`.
//!
//! The client fetches; the store verifies and writes. Manifests are fetched raw so the exact
//! bytes (whose digest is the image id) are kept, and parsed by [`crate::oci`] like an imported
//! layout's. Layers stream to a temp file with progress reports and are hashed on the way. A
//! Wasm artifact's one layer is fetched the same way and kept as a blob, not unpacked. Only
//! blobs are fetched by digest, so oci-client's list of layer media types does not apply.

use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::ImageError;
use crate::oci::{self, AnyManifest};
use crate::reference::{Digest, Reference};
use crate::store::{
    ImageRecord, ImageStore, MAX_JSON_BLOB, sha256_hex, verify_digest, verify_size,
};
use crate::{ImageSummary, PullOptions, PullProgress};

/// reqwest is built with rustls but without a crypto provider (the default one, aws-lc-rs, is
/// a slow C build); ring is installed as the process default the first time one is needed.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means another part of the process installed one first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl ImageStore {
    /// Pulls `reference` (`busybox`, `quay.io/org/app:v1`, `127.0.0.1:5000/busybox:latest`, or
    /// `name@sha256:...`) anonymously from its registry; from an index or manifest list the
    /// linux/amd64 image is taken. `options.insecure` uses plain HTTP. `progress` is called
    /// with byte counts as layers download. The image is stored under the normalized name.
    /// A Wasm OCI artifact is pulled like an image; its module is one "layer" that is never
    /// unpacked (see the crate docs).
    pub async fn pull(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<ImageSummary, ImageError> {
        let parsed = Reference::parse(reference)?;
        let full = parsed.full();
        let registry_err =
            |action: &str, source: Box<dyn std::error::Error + Send + Sync>| ImageError::Registry {
                reference: full.clone(),
                action: action.to_string(),
                source,
            };
        let image_ref: oci_client::Reference =
            full.parse()
                .map_err(|e: oci_client::ParseError| ImageError::InvalidName {
                    name: reference.to_string(),
                    reason: e.to_string(),
                })?;

        install_crypto_provider();
        let config = ClientConfig {
            protocol: if options.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| registry_err("creating the HTTP client", e.into()))?;
        let auth = RegistryAuth::Anonymous;

        let (mut manifest_bytes, mut manifest_digest) = client
            .pull_manifest_raw(&image_ref, &auth, oci::ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| registry_err("fetching the manifest", e.into()))?;
        let mut manifest = None;
        for _ in 0..3 {
            let digest = Digest::parse(&manifest_digest)?;
            verify_digest("manifest", &digest, &sha256_hex(&manifest_bytes))?;
            match oci::parse_any_manifest(&manifest_bytes, &format!("manifest {digest}"))? {
                AnyManifest::Image(m) => {
                    manifest = Some((digest, m));
                    break;
                }
                AnyManifest::Index(index) => {
                    let chosen = oci::pick_platform(&index, &full)?.digest()?;
                    let by_digest = image_ref.clone_with_digest(chosen.to_string());
                    let (bytes, _) = client
                        .pull_manifest_raw(&by_digest, &auth, oci::ACCEPTED_MANIFESTS)
                        .await
                        .map_err(|e| registry_err("fetching the platform manifest", e.into()))?;
                    manifest_bytes = bytes;
                    manifest_digest = chosen.to_string();
                }
            }
        }
        let Some((id, manifest)) = manifest else {
            return Err(ImageError::InvalidManifest {
                what: full.clone(),
                reason: "indexes nest too deep".to_string(),
            });
        };
        let what = format!("manifest {id}");
        progress(PullProgress::Resolved {
            reference: full.clone(),
            layers: manifest.layers.len(),
            total_bytes: manifest
                .layers
                .iter()
                .filter_map(|l| l.declared_size())
                .fold(0, u64::saturating_add),
        });

        // From the first write until the image is registered, garbage collection must wait.
        let store = self.clone();
        let _gc = tokio::task::spawn_blocking(move || store.lock_gc_shared())
            .await
            .map_err(|e| ImageError::Worker(e.to_string()))??;

        let config_digest = manifest.config.digest()?;
        let config_size = declared_size(&manifest.config, "config", MAX_JSON_BLOB)?;
        // Every size is checked before anything is stored.
        let layer_sizes = manifest
            .layers
            .iter()
            .map(|l| declared_size(l, "layer", crate::unpack::MAX_LAYER_BYTES))
            .collect::<Result<Vec<u64>, ImageError>>()?;
        let mut config_bytes = Vec::new();
        let mut stream = client
            .pull_blob_stream(&image_ref, config_digest.as_str())
            .await
            .map_err(|e| registry_err("fetching the config", e.into()))?;
        // Read no further than the size declared: a registry could send without end.
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| registry_err("fetching the config", e.into()))?;
            config_bytes.extend_from_slice(&chunk);
            if config_bytes.len() as u64 > config_size {
                break;
            }
        }
        verify_size(&config_digest, Some(config_size), config_bytes.len() as u64)?;
        let record = ImageRecord::new(&manifest, &config_bytes, &what)?;
        self.put_blob_bytes(&id, &manifest_bytes)?;
        self.put_blob_bytes(&config_digest, &config_bytes)?;

        for (descriptor, &total) in manifest.layers.iter().zip(&layer_sizes) {
            let digest = descriptor.digest()?;
            if self.has_blob_of_size(&digest, descriptor.declared_size())? {
                progress(PullProgress::Layer {
                    digest: digest.to_string(),
                    done: total,
                    total,
                });
                continue;
            }
            self.download_layer(&client, &image_ref, &digest, total, progress)
                .await
                .map_err(|e| match e {
                    DownloadError::Store(e) => e,
                    DownloadError::Registry(source) => {
                        registry_err(&format!("fetching layer {digest}"), source)
                    }
                })?;
        }
        if let Some(module) = &record.wasm {
            self.check_wasm_blob(module)?;
        }
        for layer in &record.layers {
            let diff_id = Digest::parse(&layer.diff_id)?;
            if self.has_layer(&diff_id) {
                continue;
            }
            progress(PullProgress::Unpacking {
                digest: layer.digest.clone(),
            });
            let store = self.clone();
            let layer = layer.clone();
            tokio::task::spawn_blocking(move || store.ensure_layer(&layer))
                .await
                .map_err(|e| ImageError::Worker(e.to_string()))??;
        }
        let store = self.clone();
        let names = [parsed.familiar()];
        let summary = tokio::task::spawn_blocking(move || store.register(&id, record, &names))
            .await
            .map_err(|e| ImageError::Worker(e.to_string()))??;
        tracing::info!(id = %summary.id, reference = %full, "pulled image");
        progress(PullProgress::Done {
            id: summary.id.clone(),
        });
        Ok(summary)
    }

    async fn download_layer(
        &self,
        client: &oci_client::Client,
        image_ref: &oci_client::Reference,
        digest: &Digest,
        declared: u64,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), DownloadError> {
        let mut stream = client
            .pull_blob_stream(image_ref, digest.as_str())
            .await
            .map_err(|e| DownloadError::Registry(e.into()))?;
        let total = declared;
        progress(PullProgress::Layer {
            digest: digest.to_string(),
            done: 0,
            total,
        });
        let tmp = self.temp_path("pull");
        let result = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| ImageError::io("creating", &tmp, e))?;
            let mut hasher = Sha256::new();
            let mut done = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| DownloadError::Registry(e.into()))?;
                hasher.update(&chunk);
                done += chunk.len() as u64;
                // Stopped as soon as it is longer than declared: a registry could send
                // without end.
                if done > declared {
                    break;
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| ImageError::io("writing", &tmp, e))?;
                progress(PullProgress::Layer {
                    digest: digest.to_string(),
                    done,
                    total,
                });
            }
            file.sync_all()
                .await
                .map_err(|e| ImageError::io("writing", &tmp, e))?;
            verify_size(digest, Some(declared), done)?;
            verify_digest("blob", digest, &format!("{:x}", hasher.finalize()))?;
            self.commit_blob(&tmp, digest)?;
            Ok::<(), DownloadError>(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

/// The size a manifest declares for its config or a layer: required when pulling (a download
/// stops at it), and at most `max`.
fn declared_size(
    descriptor: &crate::oci::Descriptor,
    what: &str,
    max: u64,
) -> Result<u64, ImageError> {
    let invalid = |reason: String| ImageError::InvalidManifest {
        what: format!("{what} {}", descriptor.digest),
        reason,
    };
    match descriptor.declared_size() {
        None => Err(invalid(format!(
            "its size is {}, not a positive number of bytes",
            descriptor.size
        ))),
        Some(size) if size > max => Err(invalid(format!(
            "it is {size} bytes, more than the {max} bytes a {what} may have"
        ))),
        Some(size) => Ok(size),
    }
}

enum DownloadError {
    Store(ImageError),
    Registry(Box<dyn std::error::Error + Send + Sync>),
}

impl From<ImageError> for DownloadError {
    fn from(e: ImageError) -> Self {
        DownloadError::Store(e)
    }
}
