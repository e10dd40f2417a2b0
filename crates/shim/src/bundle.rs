//! From the bundle containerd wrote (`config.json`) to the warren sandbox it stands for, and
//! where the warren server is.

use std::collections::BTreeMap;
use std::path::Path;

use warren_control::Address;
use warren_spec::{BackendKind, Consistency, SandboxSpec};

/// Annotation naming the warren server (`unix:///run/warren/warren.sock`, `tcp://host:port`).
pub const ANNOTATION_SERVER: &str = "warren.dev/server";
/// Annotation choosing the backend (`slot`, the default).
pub const ANNOTATION_BACKEND: &str = "warren.dev/backend";
/// Environment variable naming the warren server; containerd passes its environment to shims.
pub const ENV_SERVER: &str = "WARREN_SERVER";
/// Environment variable holding the server's bearer token, if it wants one.
pub const ENV_TOKEN: &str = "WARREN_TOKEN";
/// Label set on every sandbox made through containerd: its containerd namespace.
pub const LABEL_NAMESPACE: &str = "containerd.io/namespace";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: cannot read the OCI runtime spec")]
    Load {
        path: String,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("annotations[{key:?}]: {value:?}: {reason}")]
    Annotation {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("{env}: {value:?}: {reason}")]
    Env {
        env: &'static str,
        value: String,
        reason: String,
    },
}

/// What a containerd task becomes in warren.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: SandboxSpec,
    pub server: Address,
}

/// Reads `<bundle>/config.json` and builds the sandbox for container `id`.
pub fn load(bundle: &Path, id: &str, namespace: &str) -> Result<Plan, BundleError> {
    let path = bundle.join("config.json");
    let oci = oci_spec::runtime::Spec::load(&path).map_err(|source| BundleError::Load {
        path: path.display().to_string(),
        source,
    })?;
    let annotations: BTreeMap<String, String> = oci
        .annotations()
        .as_ref()
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let resources = oci.linux().as_ref().and_then(|l| l.resources().clone());
    let env_server = std::env::var(ENV_SERVER).ok();
    plan(id, namespace, annotations, resources, env_server.as_deref())
}

/// The pure part of [`load`]: annotations and `linux.resources` to a sandbox spec.
pub fn plan(
    id: &str,
    namespace: &str,
    annotations: BTreeMap<String, String>,
    oci: Option<warren_spec::LinuxResources>,
    env_server: Option<&str>,
) -> Result<Plan, BundleError> {
    let backend = match annotations.get(ANNOTATION_BACKEND) {
        None => BackendKind::Slot,
        Some(v) => v
            .parse()
            .map_err(|e: warren_spec::SpecError| BundleError::Annotation {
                key: ANNOTATION_BACKEND,
                value: v.clone(),
                reason: e.to_string(),
            })?,
    };
    if backend != BackendKind::Slot {
        return Err(BundleError::Annotation {
            key: ANNOTATION_BACKEND,
            value: backend.as_str().to_string(),
            reason: "containerd-shim-warren-v1 supports only the \"slot\" backend so far".into(),
        });
    }
    let server = server_address(
        annotations.get(ANNOTATION_SERVER).map(String::as_str),
        env_server,
    )?;
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_NAMESPACE.to_string(), namespace.to_string());
    let spec = SandboxSpec {
        name: id.to_string(),
        labels,
        annotations,
        backend,
        oci,
        // containerd is told the task exists only once warren has it on disk.
        consistency: Consistency::Strong,
        ..SandboxSpec::default()
    };
    Ok(Plan { spec, server })
}

/// The annotation wins over the environment, which wins over the default socket.
pub fn server_address(annotation: Option<&str>, env: Option<&str>) -> Result<Address, BundleError> {
    if let Some(v) = annotation {
        return v.parse().map_err(|reason| BundleError::Annotation {
            key: ANNOTATION_SERVER,
            value: v.to_string(),
            reason,
        });
    }
    match env.filter(|v| !v.is_empty()) {
        Some(v) => v.parse().map_err(|reason| BundleError::Env {
            env: ENV_SERVER,
            value: v.to_string(),
            reason,
        }),
        None => Ok(Address::Unix(warren_control::address::default_socket())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_to_slot_and_the_env_server() {
        let p = plan(
            "c1",
            "default",
            ann(&[("a", "b")]),
            None,
            Some("unix:///tmp/w.sock"),
        )
        .unwrap();
        assert_eq!(p.spec.name, "c1");
        assert_eq!(p.spec.backend, BackendKind::Slot);
        assert_eq!(p.spec.annotations["a"], "b");
        assert_eq!(p.spec.labels[LABEL_NAMESPACE], "default");
        assert_eq!(p.server, Address::Unix("/tmp/w.sock".into()));
    }

    #[test]
    fn annotation_server_wins_over_env() {
        let p = plan(
            "c1",
            "k8s.io",
            ann(&[(ANNOTATION_SERVER, "tcp://127.0.0.1:9090")]),
            None,
            Some("unix:///tmp/w.sock"),
        )
        .unwrap();
        assert_eq!(p.server, Address::Tcp("127.0.0.1:9090".into()));
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = plan(
            "c1",
            "default",
            ann(&[(ANNOTATION_BACKEND, "qemu")]),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("warren.dev/backend") && e.contains("qemu"),
            "{e}"
        );
        let e = plan(
            "c1",
            "default",
            ann(&[(ANNOTATION_BACKEND, "linux")]),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("only the \"slot\" backend"), "{e}");
        let e = plan(
            "c1",
            "default",
            ann(&[(ANNOTATION_SERVER, "ftp://x")]),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("warren.dev/server") && e.contains("ftp://x"),
            "{e}"
        );
        let e = plan("c1", "default", ann(&[]), None, Some("ftp://x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WARREN_SERVER"), "{e}");
    }

    #[test]
    fn a_missing_bundle_names_the_path() {
        let e = load(Path::new("/nonexistent-bundle"), "c1", "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent-bundle/config.json"), "{e}");
    }
}
