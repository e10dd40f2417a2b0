//! From the bundle containerd wrote (`config.json`) to the warren sandbox it stands for, and
//! where the warren server is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    #[error("config.json {key}: {value:?}: {reason}")]
    Spec {
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

/// CRI's annotation naming the pod sandbox a container belongs to.
pub const ANNOTATION_CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's annotation telling a pod's sandbox (`sandbox`) from its containers (`container`).
pub const ANNOTATION_CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Set on a pod's warren sandbox: the containers containerd runs in it, comma-separated.
pub const ANNOTATION_CONTAINERS: &str = "warren.dev/containers";

/// What a containerd task becomes in warren.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: SandboxSpec,
    pub server: Address,
    /// Set for a CRI container (not the pod's sandbox): the pod whose warren sandbox it
    /// joins. Nothing is created for it in warren.
    pub pod: Option<String>,
}

/// What the OCI spec's `process`, `root`, `hostname` and `mounts` say: the workload of a
/// `linux` task. (A `slot` task runs nothing and ignores it.)
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workload {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub terminal: bool,
    pub hostname: Option<String>,
    /// The root filesystem: the bundle's `rootfs`, where the shim mounts containerd's snapshot.
    pub root: PathBuf,
    pub readonly_root: bool,
    /// Bind mounts beyond the standard ones (`/proc`, `/dev`, `/sys`...), which warren makes
    /// itself: (destination, source, read-only).
    pub binds: Vec<(String, String, bool)>,
}

/// Reads `<bundle>/config.json` and builds the sandbox for container `id`.
pub fn load(bundle: &Path, id: &str, namespace: &str) -> Result<Plan, BundleError> {
    let oci = read_spec(bundle)?;
    let annotations: BTreeMap<String, String> = oci
        .annotations()
        .as_ref()
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let resources = oci.linux().as_ref().and_then(|l| l.resources().clone());
    let env_server = std::env::var(ENV_SERVER).ok();
    let workload = workload(bundle, &oci);
    plan(
        id,
        namespace,
        annotations,
        resources,
        workload,
        env_server.as_deref(),
    )
}

fn read_spec(bundle: &Path) -> Result<oci_spec::runtime::Spec, BundleError> {
    let path = bundle.join("config.json");
    oci_spec::runtime::Spec::load(&path).map_err(|source| BundleError::Load {
        path: path.display().to_string(),
        source,
    })
}

/// The pod a bundle's container belongs to, for grouping the pod's tasks into one shim: the
/// CRI sandbox id, or `None` outside CRI (and for an unreadable bundle).
pub fn group_of(bundle: &Path) -> Option<String> {
    let oci = read_spec(bundle).ok()?;
    oci.annotations()
        .as_ref()?
        .get(ANNOTATION_CRI_SANDBOX_ID)
        .filter(|v| !v.is_empty())
        .cloned()
}

fn workload(bundle: &Path, oci: &oci_spec::runtime::Spec) -> Workload {
    let mut w = Workload::default();
    if let Some(p) = oci.process() {
        w.args = p.args().clone().unwrap_or_default();
        w.env = p.env().clone().unwrap_or_default();
        w.cwd = p.cwd().display().to_string();
        w.uid = p.user().uid();
        w.gid = p.user().gid();
        w.terminal = p.terminal().unwrap_or(false);
    }
    w.hostname = oci.hostname().clone().filter(|h| !h.is_empty());
    let root = oci.root().as_ref();
    w.root = bundle.join(root.map_or(Path::new("rootfs"), |r| r.path().as_path()));
    w.readonly_root = root.and_then(|r| r.readonly()).unwrap_or(false);
    for m in oci.mounts().iter().flatten() {
        let options = m.options().clone().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        let dest = m.destination().display().to_string();
        let standard = ["/proc", "/dev", "/sys", "/run", "/tmp"]
            .iter()
            .any(|s| dest == *s || dest.starts_with(&format!("{s}/")));
        if let (true, false, Some(src)) = (is_bind, standard, m.source()) {
            w.binds.push((
                dest,
                src.display().to_string(),
                options.iter().any(|o| o == "ro"),
            ));
        }
    }
    w
}

/// The pure part of [`load`]: annotations, `linux.resources` and the workload to a sandbox
/// spec.
pub fn plan(
    id: &str,
    namespace: &str,
    annotations: BTreeMap<String, String>,
    oci: Option<warren_spec::LinuxResources>,
    workload: Workload,
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
    if !matches!(backend, BackendKind::Slot | BackendKind::Linux) {
        return Err(BundleError::Annotation {
            key: ANNOTATION_BACKEND,
            value: backend.as_str().to_string(),
            reason: "containerd-shim-warren-v1 runs the \"slot\" and \"linux\" backends".into(),
        });
    }
    let server = server_address(
        annotations.get(ANNOTATION_SERVER).map(String::as_str),
        env_server,
    )?;
    let pod = match (
        annotations
            .get(ANNOTATION_CRI_CONTAINER_TYPE)
            .map(String::as_str),
        annotations.get(ANNOTATION_CRI_SANDBOX_ID),
    ) {
        (Some("container"), Some(pod)) if pod != id => Some(pod.clone()),
        _ => None,
    };
    if pod.is_some() && backend == BackendKind::Linux {
        return Err(BundleError::Annotation {
            key: ANNOTATION_BACKEND,
            value: backend.as_str().to_string(),
            reason: "CRI pods run on the \"slot\" backend only so far (a linux pod's \
                     containers would have to share its namespaces)"
                .into(),
        });
    }
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_NAMESPACE.to_string(), namespace.to_string());
    let mut spec = SandboxSpec {
        name: id.to_string(),
        labels,
        annotations,
        backend,
        oci,
        // containerd is told the task exists only once warren has it on disk.
        consistency: Some(Consistency::Strong),
        ..SandboxSpec::default()
    };
    if backend == BackendKind::Linux {
        apply_workload(&mut spec, workload)?;
    }
    Ok(Plan { spec, server, pod })
}

/// A linux task's process, root and mounts into the spec: the workload runs on the rootfs
/// containerd prepared, as runc would run it.
fn apply_workload(spec: &mut SandboxSpec, w: Workload) -> Result<(), BundleError> {
    let field = |key: &'static str, value: String, reason: &str| BundleError::Spec {
        key,
        value,
        reason: reason.to_string(),
    };
    if w.terminal {
        return Err(field(
            "process.terminal",
            "true".into(),
            "a terminal is not supported through the shim yet; use `warren exec -it` \
             into the running sandbox",
        ));
    }
    if w.args.is_empty() {
        return Err(field(
            "process.args",
            "[]".into(),
            "a linux task needs a command",
        ));
    }
    let root = w.root.display().to_string();
    if !w.root.is_absolute() {
        return Err(field("root.path", root, "the bundle path must be absolute"));
    }
    for e in &w.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| field("process.env", e.clone(), "is not KEY=VALUE"))?;
        spec.env.insert(k.to_string(), v.to_string());
    }
    spec.image = Some(root);
    spec.command = w.args;
    spec.working_dir = Some(if w.cwd.is_empty() { "/".into() } else { w.cwd });
    spec.user = Some(format!("{}:{}", w.uid, w.gid));
    spec.hostname = w.hostname;
    spec.read_only_rootfs = w.readonly_root;
    spec.mounts = w
        .binds
        .into_iter()
        .map(|(guest, host, read_only)| warren_spec::Mount {
            guest,
            host,
            read_only,
        })
        .collect();
    Ok(())
}

/// The bearer token (`WARREN_TOKEN`) for `server`: only the server the shim's own
/// configuration names (`WARREN_SERVER`, else the default socket) gets it. A
/// `warren.dev/server` annotation is the pod author's to write: a server it names elsewhere
/// is called without the token, so no pod can send the node's token to a host it chose.
pub fn token_for(server: &Address) -> Option<String> {
    let env = |key| std::env::var(key).ok();
    token_given(server, env(ENV_SERVER).as_deref(), env(ENV_TOKEN))
}

/// [`token_for`] with the environment's `WARREN_SERVER` and `WARREN_TOKEN` given.
fn token_given(
    server: &Address,
    env_server: Option<&str>,
    token: Option<String>,
) -> Option<String> {
    let configured = server_address(None, env_server).ok()?;
    (*server == configured)
        .then_some(token?)
        .filter(|t| !t.is_empty())
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

    #[test]
    fn only_the_configured_server_gets_the_token() {
        let token = || Some("secret".to_string());
        let configured = "tcp://127.0.0.1:9090";
        let from_annotation = |a: &str| server_address(Some(a), Some(configured)).unwrap();
        assert_eq!(
            token_given(&from_annotation(configured), Some(configured), token()),
            token()
        );
        assert_eq!(
            token_given(
                &from_annotation("tcp://attacker.example:1"),
                Some(configured),
                token()
            ),
            None,
            "a server a pod's annotation names elsewhere"
        );
        let default = server_address(None, None).unwrap();
        assert_eq!(token_given(&default, None, token()), token());
        assert_eq!(token_given(&default, Some(configured), token()), None);
        assert_eq!(token_given(&default, None, Some(String::new())), None);
    }

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
            Workload::default(),
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
            Workload::default(),
            Some("unix:///tmp/w.sock"),
        )
        .unwrap();
        assert_eq!(p.server, Address::Tcp("127.0.0.1:9090".into()));
    }

    fn plan_of(annotations: &[(&str, &str)], w: Workload) -> Result<Plan, String> {
        plan("c1", "default", ann(annotations), None, w, None).map_err(|e| e.to_string())
    }

    fn echo() -> Workload {
        Workload {
            args: vec!["echo".into(), "hi".into()],
            env: vec!["PATH=/bin".into(), "A=b=c".into()],
            cwd: "/work".into(),
            uid: 1000,
            gid: 100,
            root: "/bundles/c1/rootfs".into(),
            hostname: Some("h1".into()),
            binds: vec![("/data".into(), "/srv/data".into(), true)],
            ..Workload::default()
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = plan_of(&[(ANNOTATION_BACKEND, "qemu")], echo()).unwrap_err();
        assert!(
            e.contains("warren.dev/backend") && e.contains("qemu"),
            "{e}"
        );
        let e = plan_of(&[(ANNOTATION_BACKEND, "wasm")], echo()).unwrap_err();
        assert!(e.contains("\"slot\" and \"linux\""), "{e}");
        let e = plan_of(&[(ANNOTATION_SERVER, "ftp://x")], echo()).unwrap_err();
        assert!(
            e.contains("warren.dev/server") && e.contains("ftp://x"),
            "{e}"
        );
        let e = plan("c1", "default", ann(&[]), None, echo(), Some("ftp://x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WARREN_SERVER"), "{e}");
    }

    #[test]
    fn a_linux_task_runs_the_oci_process_on_its_bundle_rootfs() {
        let p = plan_of(&[(ANNOTATION_BACKEND, "linux")], echo()).unwrap();
        let s = &p.spec;
        assert_eq!(s.backend, BackendKind::Linux);
        assert_eq!(s.image.as_deref(), Some("/bundles/c1/rootfs"));
        assert_eq!(s.command, ["echo", "hi"]);
        assert_eq!(s.env["PATH"], "/bin");
        assert_eq!(s.env["A"], "b=c");
        assert_eq!(s.working_dir.as_deref(), Some("/work"));
        assert_eq!(s.user.as_deref(), Some("1000:100"));
        assert_eq!(s.hostname.as_deref(), Some("h1"));
        assert_eq!(s.mounts.len(), 1);
        assert_eq!(
            (
                s.mounts[0].guest.as_str(),
                s.mounts[0].host.as_str(),
                s.mounts[0].read_only
            ),
            ("/data", "/srv/data", true)
        );
        // A slot task ignores the process entirely.
        let p = plan_of(&[], echo()).unwrap();
        assert!(p.spec.image.is_none() && p.spec.command.is_empty());
    }

    #[test]
    fn a_linux_task_refuses_what_it_cannot_run() {
        let linux = [(ANNOTATION_BACKEND, "linux")];
        let e = plan_of(
            &linux,
            Workload {
                terminal: true,
                ..echo()
            },
        )
        .unwrap_err();
        assert!(e.contains("process.terminal"), "{e}");
        let e = plan_of(
            &linux,
            Workload {
                args: vec![],
                ..echo()
            },
        )
        .unwrap_err();
        assert!(e.contains("process.args"), "{e}");
        let e = plan_of(
            &linux,
            Workload {
                env: vec!["NOEQUALS".into()],
                ..echo()
            },
        )
        .unwrap_err();
        assert!(e.contains("process.env") && e.contains("NOEQUALS"), "{e}");
    }

    #[test]
    fn cri_containers_join_their_pod() {
        let pod = [
            (ANNOTATION_CRI_CONTAINER_TYPE, "sandbox"),
            (ANNOTATION_CRI_SANDBOX_ID, "c1"),
        ];
        assert_eq!(plan_of(&pod, echo()).unwrap().pod, None);
        let member = [
            (ANNOTATION_CRI_CONTAINER_TYPE, "container"),
            (ANNOTATION_CRI_SANDBOX_ID, "pod1"),
        ];
        assert_eq!(
            plan_of(&member, echo()).unwrap().pod.as_deref(),
            Some("pod1")
        );
        let linux_member = [
            (ANNOTATION_CRI_CONTAINER_TYPE, "container"),
            (ANNOTATION_CRI_SANDBOX_ID, "pod1"),
            (ANNOTATION_BACKEND, "linux"),
        ];
        let e = plan_of(&linux_member, echo()).unwrap_err();
        assert!(e.contains("CRI pods"), "{e}");
    }

    #[test]
    fn workload_from_an_oci_spec() {
        let dir = tempfile::tempdir().unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh", "-c", "exit 3"], "env": ["X=1"], "cwd": "/",
                        "user": {"uid": 5, "gid": 6}, "terminal": false},
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "box",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]},
                {"destination": "/data", "type": "none", "source": "/srv", "options": ["rbind", "ro"]}
            ]
        }))
        .unwrap();
        let w = workload(dir.path(), &spec);
        assert_eq!(w.args, ["sh", "-c", "exit 3"]);
        assert_eq!((w.uid, w.gid), (5, 6));
        assert_eq!(w.root, dir.path().join("rootfs"));
        assert!(w.readonly_root);
        assert_eq!(w.hostname.as_deref(), Some("box"));
        assert_eq!(w.binds, [("/data".to_string(), "/srv".to_string(), true)]);
    }

    #[test]
    fn a_missing_bundle_names_the_path() {
        let e = load(Path::new("/nonexistent-bundle"), "c1", "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent-bundle/config.json"), "{e}");
    }
}
