//! The parts of the OCI image spec (and Docker's v2 schema 2) the store reads.
//!
//! Deliberately small and lenient: unknown fields are ignored and `null` is accepted wherever
//! real-world configs put it, so images from Docker, buildah, skopeo and registries all parse.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::reference::Digest;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The config of a Wasm OCI artifact (CNCF TAG-Runtime "Wasm OCI Artifact" layout).
pub(crate) const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The one layer of a Wasm OCI artifact: the module (or component) bytes, not a tar.
pub(crate) const WASM_LAYER: &str = "application/wasm";
/// The layer media type of the older `wasm-to-oci` tool.
pub(crate) const WASM_LAYER_LEGACY: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Every Wasm binary starts with these four bytes, then a four-byte version.
pub(crate) const WASM_MAGIC: &[u8; 4] = b"\0asm";

pub(crate) fn is_wasm_layer(media_type: &str) -> bool {
    media_type == WASM_LAYER || media_type == WASM_LAYER_LEGACY
}

/// Manifest media types accepted from a registry.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] =
    &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest, ImageError> {
        Digest::parse(&self.digest)
    }

    /// The declared size, if it is a usable one.
    pub fn declared_size(&self) -> Option<u64> {
        u64::try_from(self.size).ok().filter(|&s| s > 0)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The image config blob (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct ContainerConfig {
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The `created` time of a Wasm artifact's config. The config (`WASM_CONFIG`, or whatever
/// older tools wrote, often `{}` or nothing) carries nothing else the store needs, so any JSON
/// is accepted and an empty blob means no config.
pub(crate) fn wasm_config_created(bytes: &[u8], what: &str) -> Result<Option<String>, ImageError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ImageError::json(what, e))?;
    Ok(value
        .get("created")
        .and_then(|c| c.as_str())
        .map(str::to_string))
}

/// What a JSON document at a manifest position turned out to be.
pub(crate) enum AnyManifest {
    Index(Index),
    Image(Manifest),
}

/// Parses a manifest or an index, telling them apart by `mediaType` or, when that is absent
/// (it is optional in OCI), by which of `manifests` / `config` is present.
pub(crate) fn parse_any_manifest(bytes: &[u8], what: &str) -> Result<AnyManifest, ImageError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ImageError::json(what, e))?;
    let media_type = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" => value.get("manifests").is_some(),
        other => {
            return Err(ImageError::Unsupported(format!(
                "{what}: media type \"{other}\" is not an image manifest or index"
            )));
        }
    };
    if let Some(version) = value.get("schemaVersion").and_then(|v| v.as_u64())
        && version != 2
    {
        return Err(ImageError::InvalidManifest {
            what: what.to_string(),
            reason: format!("schemaVersion {version} is not supported (expected 2)"),
        });
    }
    if is_index {
        serde_json::from_value(value)
            .map(AnyManifest::Index)
            .map_err(|e| ImageError::json(what, e))
    } else {
        serde_json::from_value(value)
            .map(AnyManifest::Image)
            .map_err(|e| ImageError::json(what, e))
    }
}

/// Picks the linux/amd64 entry of an index (or its only entry, if that has no platform).
pub(crate) fn pick_platform<'a>(
    index: &'a Index,
    reference: &str,
) -> Result<&'a Descriptor, ImageError> {
    let found = index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(found) = found {
        return Ok(found);
    }
    if let [only] = index.manifests.as_slice()
        && only.platform.is_none()
    {
        return Ok(only);
    }
    let offered: Vec<String> = index
        .manifests
        .iter()
        .map(|d| match &d.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown".to_string(),
        })
        .collect();
    Err(ImageError::NoMatchingPlatform {
        reference: reference.to_string(),
        offered: if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        },
    })
}

impl Manifest {
    /// The module layer, if this is a Wasm artifact: exactly one layer, of a Wasm media type.
    /// A Wasm layer among others, or a Wasm config with tar layers, is refused: such an image
    /// is neither a module nor a root filesystem.
    pub fn wasm_layer(&self, what: &str) -> Result<Option<&Descriptor>, ImageError> {
        let invalid = |reason: String| ImageError::InvalidManifest {
            what: what.to_string(),
            reason,
        };
        let Some(wasm) = self.layers.iter().find(|l| is_wasm_layer(&l.media_type)) else {
            if self.config.media_type == WASM_CONFIG {
                return Err(invalid(format!(
                    "its config has media type \"{WASM_CONFIG}\" but no layer is a Wasm module \
                     (\"{WASM_LAYER}\")"
                )));
            }
            return Ok(None);
        };
        if let Some(other) = self.layers.iter().find(|l| !is_wasm_layer(&l.media_type)) {
            return Err(invalid(format!(
                "it mixes a Wasm module layer (\"{}\") with a layer of media type \"{}\"; \
                 a Wasm artifact has exactly one layer, the module",
                wasm.media_type, other.media_type
            )));
        }
        if self.layers.len() != 1 {
            return Err(invalid(format!(
                "it has {} layers of media type \"{}\"; a Wasm artifact has exactly one",
                self.layers.len(),
                wasm.media_type
            )));
        }
        wasm.digest()?;
        Ok(Some(wasm))
    }

    /// Checks what the store relies on: a config descriptor and one diff_id per layer.
    pub fn validate(&self, config: &ConfigFile, what: &str) -> Result<(), ImageError> {
        if self.layers.len() != config.rootfs.diff_ids.len() {
            return Err(ImageError::InvalidManifest {
                what: what.to_string(),
                reason: format!(
                    "{} layers but the config's rootfs.diff_ids has {} entries",
                    self.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            });
        }
        for layer in &self.layers {
            layer.digest()?;
        }
        Ok(())
    }
}
