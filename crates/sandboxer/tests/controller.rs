//! Drives the real `resource-slot-sandboxer` binary over its unix socket with a client
//! generated from containerd's own sandbox proto, as containerd 2.x would (containerd 2.x is
//! not installed on this machine: Debian 12 has 1.6): create -> start -> containers appended
//! via Update -> status -> stop -> wait -> shutdown, checking resources.json at each step; bad
//! input; SIGTERM.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use prost::Message as _;
use tonic::transport::{Channel, Endpoint, Uri};
use warren_sandboxer::api::services::sandbox::v1::controller_client::ControllerClient;
use warren_sandboxer::api::services::sandbox::v1::*;
use warren_sandboxer::api::types::Sandbox;

/// A running sandboxer; killed (and its socket left to the temp dir) if a test fails.
struct Sandboxer {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Sandboxer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sandboxer {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir)
    }

    fn start_in(dir: tempfile::TempDir) -> Self {
        let sock = dir.path().join("run").join("sandboxer.sock");
        let log = std::fs::File::create(dir.path().join("sandboxer.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_resource-slot-sandboxer"))
            .arg("--listen")
            .arg(&sock)
            .arg("--dir")
            .arg(dir.path().join("state"))
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Sandboxer { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(s.sock.exists() && std::os::unix::net::UnixStream::connect(&s.sock).is_ok()) {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("the sandboxer exited with {status}:\n{}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 30 s:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sandboxer.log")).unwrap_or_default()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Every sandbox directory the slot backend holds.
    fn slot_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state().join("slot"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    async fn client(&self) -> ControllerClient<Channel> {
        let path = self.sock.clone();
        let channel = Endpoint::from_static("http://sandboxer.local")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        ControllerClient::new(channel)
    }

    /// Sends SIGTERM and returns the exit status. Async, so that the test's own clients can
    /// answer the server's GOAWAY while it waits.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit 20 s after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn status(
    c: &mut ControllerClient<Channel>,
    id: &str,
    verbose: bool,
) -> Result<ControllerStatusResponse, tonic::Status> {
    c.status(ControllerStatusRequest {
        sandbox_id: id.into(),
        verbose,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// A Wait running beside the test, as containerd keeps one per pod.
fn spawn_wait(
    c: &ControllerClient<Channel>,
    id: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<ControllerWaitResponse>, tonic::Status>> {
    let mut c = c.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        c.wait(ControllerWaitRequest {
            sandbox_id: id,
            ..Default::default()
        })
        .await
    })
}

/// The Wait's answer, within 10 s.
async fn waited(
    wait: tokio::task::JoinHandle<Result<tonic::Response<ControllerWaitResponse>, tonic::Status>>,
) -> ControllerWaitResponse {
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner()
}

/// Where the pod's resources.json is: warren writes it under the warren sandbox's id
/// (`<dir>/slot/<id>/resources.json`, as `warren server` does), which Status(verbose) reports.
async fn resources_path(c: &mut ControllerClient<Channel>, id: &str) -> PathBuf {
    let st = status(c, id, true).await.unwrap();
    PathBuf::from(&st.info["resources_path"])
}

async fn resources(c: &mut ControllerClient<Channel>, id: &str) -> serde_json::Value {
    let path = resources_path(c, id).await;
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn any(type_url: &str, value: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.into(),
        value,
    }
}

/// A Create as containerd's CRI plugin sends it: the CRI config in `options`, the pod's OCI
/// spec in `sandbox.spec`.
fn create_request(id: &str, annotations: &[(&str, &str)]) -> ControllerCreateRequest {
    let config = warren_sandboxer::PodSandboxConfig {
        metadata: Some(warren_sandboxer::PodSandboxMetadata {
            name: "web".into(),
            uid: "u1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "linux": {"resources": {"memory": {"limit": 1073741824}, "pids": {"limit": 100}}}
    });
    ControllerCreateRequest {
        sandbox_id: id.into(),
        options: Some(any(
            "type.googleapis.com/runtime.v1.PodSandboxConfig",
            config.encode_to_vec(),
        )),
        netns_path: "/var/run/netns/cni-x".into(),
        sandbox: Some(Sandbox {
            sandbox_id: id.into(),
            spec: Some(any(
                "types.containerd.io/opencontainers/runtime-spec/1/Spec",
                spec.to_string().into_bytes(),
            )),
            sandboxer: "warren".into(),
            ..Default::default()
        }),
        sandboxer: "warren".into(),
        ..Default::default()
    }
}

fn update_request(id: &str, tasks: serde_json::Value) -> ControllerUpdateRequest {
    ControllerUpdateRequest {
        sandbox_id: id.into(),
        sandboxer: "warren".into(),
        sandbox: Some(Sandbox {
            sandbox_id: id.into(),
            extensions: [(
                "tasks".to_string(),
                any("tasks", tasks.to_string().into_bytes()),
            )]
            .into(),
            ..Default::default()
        }),
        fields: vec!["extensions.tasks".into()],
    }
}

fn json(
    cpu_limit: f64,
    cpu_request: Option<f64>,
    memory_limit: u64,
    pids: u64,
) -> serde_json::Value {
    serde_json::json!({
        "cpu_limit": cpu_limit, "cpu_request": cpu_request, "memory_limit": memory_limit,
        "memory_request": null, "pid_limit": pids, "storage_limit": null, "network_bandwidth": null
    })
}

#[tokio::test]
async fn create_start_update_status_stop_wait_shutdown() {
    let mut sb = Sandboxer::start();
    let mut c = sb.client().await;
    let id = "pod-a";

    c.create(create_request(
        id,
        &[("resources.limits.cpu", "1"), ("team", "x")],
    ))
    .await
    .unwrap();
    assert_eq!(resources(&mut c, id).await, json(1.0, None, 1 << 30, 100));
    let path = resources_path(&mut c, id).await;
    assert!(
        path.starts_with(sb.state().join("slot")),
        "{}",
        path.display()
    );
    let st = status(&mut c, id, false).await.unwrap();
    assert_eq!(st.state, "SANDBOX_NOTREADY");
    assert!(st.created_at.is_some() && st.exited_at.is_none());

    let started = c
        .start(ControllerStartRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.sandbox_id, id);
    assert_eq!(started.pid, sb.child.id());
    assert!(started.created_at.is_some());

    let platform = c
        .platform(ControllerPlatformRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .platform
        .unwrap();
    assert_eq!(platform.os, "linux");
    assert_eq!(
        platform.architecture,
        warren_sandboxer::controller::goarch()
    );

    // Two containers join: the pod holds its own resources plus theirs.
    let c2 = serde_json::json!({"task_id": "c2", "spec": {"linux": {"resources": {
        "cpu": {"quota": 50000, "period": 100000},
        "memory": {"limit": 268435456}, "pids": {"limit": 50}}}}});
    c.update(update_request(
        id,
        serde_json::json!({"tasks": [
            {"task_id": "c1", "spec": {"annotations": {"resources.limits.cpu": "500m",
                "resources.requests.cpu": "250m", "resources.limits.memory": "256Mi"}},
                "rootfs": [], "stdin": "", "stdout": "", "stderr": "", "processes": []},
            c2.clone(),
        ]}),
    ))
    .await
    .unwrap();
    assert_eq!(
        resources(&mut c, id).await,
        json(2.0, Some(0.25), (1 << 30) + (512 << 20), 150)
    );

    // c1 leaves.
    c.update(update_request(
        id,
        serde_json::json!({"tasks": [c2.clone()]}),
    ))
    .await
    .unwrap();
    assert_eq!(
        resources(&mut c, id).await,
        json(1.5, None, (1 << 30) + (256 << 20), 150)
    );

    // A container without a CPU limit (Burstable) leaves the pod without one.
    c.update(update_request(
        id,
        serde_json::json!({"tasks": [c2.clone(),
            {"task_id": "c3", "spec": {"annotations": {"resources.requests.cpu": "100m",
                "resources.limits.memory": "64Mi"}}},
        ]}),
    ))
    .await
    .unwrap();
    let burstable = resources(&mut c, id).await;
    assert_eq!(
        burstable["cpu_limit"],
        serde_json::Value::Null,
        "{burstable}"
    );
    assert_eq!(burstable["cpu_request"], 0.1, "{burstable}");
    c.update(update_request(id, serde_json::json!({"tasks": [c2]})))
        .await
        .unwrap();

    let st = status(&mut c, id, true).await.unwrap();
    assert_eq!(st.state, "SANDBOX_READY");
    assert_eq!(st.pid, sb.child.id());
    assert_eq!(st.info["containers"], "c2");
    assert_eq!(
        PathBuf::from(&st.info["resources_path"]),
        path,
        "{:?}",
        st.info
    );
    let metrics = c
        .metrics(ControllerMetricsRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(metrics.metrics.is_none());

    // A waiter started before the stop is answered by it.
    let wait = spawn_wait(&c, "pod-a");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!wait.is_finished(), "wait returned before the stop");
    c.stop(ControllerStopRequest {
        sandbox_id: id.into(),
        timeout_secs: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let waited = waited(wait).await;
    assert_eq!(waited.exit_status, 0);
    assert!(waited.exited_at.is_some());
    let st = status(&mut c, id, false).await.unwrap();
    assert_eq!(st.state, "SANDBOX_NOTREADY");
    assert_eq!(st.exited_at, waited.exited_at);
    // Stopped but not shut down: still accounted.
    assert_eq!(
        resources(&mut c, id).await,
        json(1.5, None, (1 << 30) + (256 << 20), 150)
    );
    let e = c
        .start(ControllerStartRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    c.shutdown(ControllerShutdownRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!path.exists());
    assert!(!path.parent().unwrap().exists());
    assert!(sb.slot_dirs().is_empty(), "{:?}", sb.slot_dirs());
    let e = status(&mut c, id, false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // SIGTERM: a clean exit, and the socket is gone.
    drop(c);
    let status = sb.terminate().await;
    assert!(status.success(), "{status}:\n{}", sb.log());
    assert!(!sb.sock.exists());
    assert!(!sb.state().join("warren.sock").exists());
}

#[tokio::test]
async fn bad_input_names_the_field_and_leaves_nothing() {
    let sb = Sandboxer::start();
    let mut c = sb.client().await;

    let e = c.create(create_request("", &[])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("sandbox_id"), "{}", e.message());

    let e = c
        .create(create_request("bad", &[("resources.limits.memory", "2Gx")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("resources.limits.memory") && e.message().contains("2Gx"),
        "{}",
        e.message()
    );
    assert!(sb.slot_dirs().is_empty(), "{:?}", sb.slot_dirs());
    let e = status(&mut c, "bad", false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    for (call, e) in [
        (
            "start",
            c.start(ControllerStartRequest {
                sandbox_id: "nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "stop",
            c.stop(ControllerStopRequest {
                sandbox_id: "nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "wait",
            c.wait(ControllerWaitRequest {
                sandbox_id: "nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "shutdown",
            c.shutdown(ControllerShutdownRequest {
                sandbox_id: "nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "update",
            c.update(update_request("nope", serde_json::json!({"tasks": []})))
                .await
                .map(|_| ()),
        ),
    ] {
        let e = e.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{call}: {e:?}");
        assert!(e.message().contains("\"nope\""), "{call}: {}", e.message());
    }

    // A bad container changes nothing: resources.json keeps the pod's own.
    c.create(create_request("good", &[("resources.limits.cpu", "2")]))
        .await
        .unwrap();
    let before = resources(&mut c, "good").await;
    let e = c
        .update(update_request(
            "good",
            serde_json::json!({"tasks": [
            {"task_id": "c1", "spec": {"annotations": {"resources.limits.cpu": "abc"}}}]}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("task \"c1\"") && e.message().contains("abc"),
        "{}",
        e.message()
    );
    let mut broken = update_request("good", serde_json::json!({}));
    if let Some(sb) = broken.sandbox.as_mut() {
        sb.extensions
            .insert("tasks".into(), any("tasks", b"not json".to_vec()));
    }
    let e = c.update(broken).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("sandbox.extensions[\"tasks\"]"),
        "{}",
        e.message()
    );
    assert_eq!(resources(&mut c, "good").await, before);

    let e = c.create(create_request("good", &[])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
}

#[tokio::test]
async fn warren_sees_the_pods_and_a_restart_keeps_them() {
    let mut sb = Sandboxer::start();
    let mut c = sb.client().await;
    c.create(create_request("pod-r", &[("resources.limits.cpu", "250m")]))
        .await
        .unwrap();
    c.start(ControllerStartRequest {
        sandbox_id: "pod-r".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.update(update_request(
        "pod-r",
        serde_json::json!({"tasks": [
        {"task_id": "c1", "spec": {"annotations": {"resources.limits.cpu": "750m"}}}]}),
    ))
    .await
    .unwrap();

    // warren's own API on <dir>/warren.sock lists it like any sandbox.
    let api = warren_control::Address::Unix(sb.state().join("warren.sock"));
    let mut w = warren_control::client::connect(&api, None).await.unwrap();
    let list = w
        .list_sandboxes(warren_proto::v1::ListSandboxesRequest {
            label_selector: "warren.dev/sandboxer=warren".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list
        .sandboxes
        .iter()
        .filter_map(|s| s.spec.as_ref().map(|s| s.name.clone()))
        .collect();
    assert_eq!(names, ["pod-r"]);
    drop(w);
    drop(c);

    assert!(sb.terminate().await.success(), "{}", sb.log());
    let dir = std::mem::replace(&mut sb.dir, tempfile::tempdir().unwrap());
    drop(sb);
    let sb = Sandboxer::start_in(dir);
    let mut c = sb.client().await;
    assert_eq!(resources(&mut c, "pod-r").await["cpu_limit"], 1.0);
    let st = status(&mut c, "pod-r", true).await.unwrap();
    assert_eq!(st.state, "SANDBOX_READY");
    assert_eq!(st.info["containers"], "c1");
    // The pod's own share survived the restart: removing c1 leaves 250m.
    c.update(update_request("pod-r", serde_json::json!({"tasks": []})))
        .await
        .unwrap();
    assert_eq!(resources(&mut c, "pod-r").await["cpu_limit"], 0.25);

    // `warren rm` behind containerd's back ends the pod: Wait answers 137, as for a kill.
    let wait = spawn_wait(&c, "pod-r");
    let api = warren_control::Address::Unix(sb.state().join("warren.sock"));
    let mut w = warren_control::client::connect(&api, None).await.unwrap();
    w.delete_sandbox(warren_proto::v1::DeleteSandboxRequest {
        name: "pod-r".into(),
        grace_period_seconds: Some(0),
        id: None,
    })
    .await
    .unwrap();
    let waited = waited(wait).await;
    assert_eq!(waited.exit_status, 137);
    let st = status(&mut c, "pod-r", false).await.unwrap();
    assert_eq!(st.state, "SANDBOX_NOTREADY");
    assert!(sb.slot_dirs().is_empty(), "{:?}", sb.slot_dirs());
    // containerd's Shutdown still cleans up, and a new pod of the same name is unaffected.
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: "pod-r".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.create(create_request("pod-r", &[])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = status(&mut c, "pod-r", false).await.unwrap();
    assert!(st.exited_at.is_none(), "{st:?}");
}

/// A Create as containerd's CRI plugin sends it for a kubelet pod: the pause container's spec
/// (`cpu.shares: 2`) in `sandbox.spec`, and in `options` the pod-level `linux.resources` (the
/// sum of its containers, declared by the kubelet) and `linux.overhead` (the RuntimeClass's).
fn kubelet_create_request(id: &str) -> ControllerCreateRequest {
    let cri = |millis: i64, memory: i64| warren_sandboxer::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: millis * 100,
        cpu_shares: millis * 1024 / 1000,
        memory_limit_in_bytes: memory,
    };
    let mut req = create_request(id, &[]);
    let config = warren_sandboxer::PodSandboxConfig {
        linux: Some(warren_sandboxer::LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/pod-k".into(),
            resources: Some(cri(1000, 512 << 20)),
            overhead: Some(cri(250, 64 << 20)),
        }),
        ..Default::default()
    };
    req.options = Some(any(
        "type.googleapis.com/runtime.v1.PodSandboxConfig",
        config.encode_to_vec(),
    ));
    let spec = serde_json::json!({"linux": {"resources": {"cpu": {"shares": 2}}}});
    if let Some(sb) = req.sandbox.as_mut() {
        sb.spec = Some(any(
            "types.containerd.io/opencontainers/runtime-spec/1/Spec",
            spec.to_string().into_bytes(),
        ));
    }
    req
}

/// A container as the kubelet sends it: `millis` of CPU as its request and limit.
fn kubelet_task(id: &str, millis: u64, memory: u64) -> serde_json::Value {
    serde_json::json!({"task_id": id, "spec": {"linux": {"resources": {
        "cpu": {"quota": millis * 100, "period": 100_000, "shares": millis * 1024 / 1000},
        "memory": {"limit": memory}}}}})
}

fn cpu_and_memory(v: &serde_json::Value) -> (f64, f64, u64) {
    (
        v["cpu_limit"].as_f64().unwrap_or(-1.0),
        v["cpu_request"].as_f64().unwrap_or(-1.0),
        v["memory_limit"].as_u64().unwrap_or(0),
    )
}

/// The pod-level `linux.resources` declares what the containers hold together: the pod holds
/// the larger of it and the containers' sum, not both; the overhead comes on top. Both
/// survive a restart.
#[tokio::test]
async fn cri_pod_resources_are_the_containers_aggregate_and_survive_a_restart() {
    let mut sb = Sandboxer::start();
    let mut c = sb.client().await;
    let id = "pod-k";
    c.create(kubelet_create_request(id)).await.unwrap();
    // 1 CPU and 512Mi declared, 250m and 64Mi of overhead, the pause container's 2m request
    // (counted as the limit, 1.25).
    let declared = (1.25, 1.25, (512 + 64) << 20);
    assert_eq!(cpu_and_memory(&resources(&mut c, id).await), declared);

    // Half of the declared containers have arrived: still the declared size.
    let c1 = kubelet_task("c1", 500, 256 << 20);
    c.update(update_request(
        id,
        serde_json::json!({"tasks": [c1.clone()]}),
    ))
    .await
    .unwrap();
    assert_eq!(cpu_and_memory(&resources(&mut c, id).await), declared);
    // All of them: the sum equals the declaration, counted once.
    let c2 = kubelet_task("c2", 500, 256 << 20);
    c.update(update_request(
        id,
        serde_json::json!({"tasks": [c1.clone(), c2.clone()]}),
    ))
    .await
    .unwrap();
    assert_eq!(cpu_and_memory(&resources(&mut c, id).await), declared);
    // More than declared: the sum counts.
    let c3 = kubelet_task("c3", 1000, 256 << 20);
    c.update(update_request(
        id,
        serde_json::json!({"tasks": [c1.clone(), c2, c3]}),
    ))
    .await
    .unwrap();
    assert_eq!(
        cpu_and_memory(&resources(&mut c, id).await),
        (2.25, 2.25, (768 + 64) << 20)
    );
    drop(c);

    assert!(sb.terminate().await.success(), "{}", sb.log());
    let dir = std::mem::replace(&mut sb.dir, tempfile::tempdir().unwrap());
    drop(sb);
    let sb = Sandboxer::start_in(dir);
    let mut c = sb.client().await;
    assert_eq!(
        cpu_and_memory(&resources(&mut c, id).await),
        (2.25, 2.25, (768 + 64) << 20)
    );
    // The declaration and the overhead were kept: with c1 alone the pod is back at its
    // declared size.
    c.update(update_request(id, serde_json::json!({"tasks": [c1]})))
        .await
        .unwrap();
    assert_eq!(cpu_and_memory(&resources(&mut c, id).await), declared);
}

#[test]
fn a_second_sandboxer_on_the_same_socket_is_refused() {
    let sb = Sandboxer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_resource-slot-sandboxer"))
        .arg("--listen")
        .arg(&sb.sock)
        .arg("--dir")
        .arg(sb.dir.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already listening") && err.contains(&*sb.sock.to_string_lossy()),
        "{err}"
    );
    assert!(
        sb.sock.exists(),
        "the first sandboxer's socket must survive"
    );
    assert!(!sb.dir.path().join("other").join("warren.sock").exists());
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_resource-slot-sandboxer"))
        .args([
            "--listen",
            "/tmp/x.sock",
            "--backend",
            "vm",
            "--log-level",
            "info",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--backend") && err.contains("vm"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_resource-slot-sandboxer"))
        .args(["--log-level", "info=[", "--listen", "/tmp/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-level"));
}
