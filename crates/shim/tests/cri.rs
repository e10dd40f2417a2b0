//! containerd's CRI plugin, driven as the kubelet drives it (a CRI client generated from
//! Kubernetes' cri-api proto), with warren as the runtime: a host-network pod whose
//! annotations carry resources gives the seed's exact resources.json, its containers are
//! recorded on the pod's one warren sandbox, and stop/remove clean everything up.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::Env;

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
mod cri {
    include!(concat!(env!("OUT_DIR"), "/runtime.v1.rs"));
}

use cri::runtime_service_client::RuntimeServiceClient;

const IMAGE: &str = "docker.io/library/busybox:latest";

async fn connect(env: &Env) -> RuntimeServiceClient<tonic::transport::Channel> {
    let socket = env.path("ctd/containerd.sock");
    let channel = tonic::transport::Endpoint::from_static("http://containerd")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

/// containerd with CRI on, the busybox image in `k8s.io`, and a CRI client.
async fn start() -> (Env, RuntimeServiceClient<tonic::transport::Channel>) {
    let env = tokio::task::block_in_place(|| {
        let env = Env::start_cri(IMAGE);
        env.import_busybox_into("k8s.io");
        std::fs::create_dir_all(env.path("pod-logs")).unwrap();
        env
    });
    let client = connect(&env).await;
    (env, client)
}

fn pod_config(env: &Env, annotations: &[(&str, &str)]) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "web".into(),
            uid: "uid-web-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web".into(),
        log_directory: env.path("pod-logs").display().to_string(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    // Host network: no CNI needed.
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Pod as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn resources_json(env: &Env, pod: &str) -> (PathBuf, serde_json::Value) {
    let sb = env.sandbox(pod);
    let path = PathBuf::from(
        sb["status"]["backendInfo"]["resources_path"]
            .as_str()
            .unwrap_or_else(|| panic!("no resources_path: {sb}")),
    );
    let json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (path, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_gets_the_seed_resources_and_its_containers_join_it() {
    require_containerd!();
    let (env, mut client) = start().await;
    let version = client
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "containerd", "{version:?}");

    let config = pod_config(
        &env,
        &[
            ("resources.limits.cpu", "2"),
            ("resources.limits.memory", "2Gi"),
            ("resources.requests.cpu", "1"),
            ("resources.requests.memory", "1Gi"),
            ("resources.limits.pid", "1000"),
        ],
    );
    let pod = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("RunPodSandbox: {s}\n{}", env.containerd_log()))
        .into_inner()
        .pod_sandbox_id;

    // The seed's exact resource JSON, from the pod's annotations.
    let (resources, json) = resources_json(&env, &pod);
    assert_eq!(
        json,
        serde_json::json!({
            "cpu_limit": 2.0,
            "cpu_request": 1.0,
            "memory_limit": 2147483648u64,
            "memory_request": 1073741824u64,
            "pid_limit": 1000,
            "storage_limit": null,
            "network_bandwidth": null
        })
    );
    let sb = env.sandbox(&pod);
    assert_eq!(sb["status"]["phase"], "Running", "{sb}");
    assert_eq!(
        sb["metadata"]["labels"]["containerd.io/namespace"],
        "k8s.io"
    );

    // Two containers in the pod: one warren sandbox still, both recorded on it, one shim.
    let mut containers = Vec::new();
    for name in ["app", "sidecar"] {
        let id = client
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: IMAGE.into(),
                        ..Default::default()
                    }),
                    command: vec!["sleep".into(), "600".into()],
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap_or_else(|s| panic!("CreateContainer {name}: {s}\n{}", env.containerd_log()))
            .into_inner()
            .container_id;
        client
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("StartContainer {name}: {s}"));
        containers.push(id);
    }
    assert_eq!(env.sandbox_names(), vec![pod.clone()]);
    let members = |env: &Env| -> Vec<String> {
        let sb = env.sandbox(&pod);
        let mut m: Vec<String> = sb["metadata"]["annotations"]["warren.dev/containers"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        m.sort();
        m
    };
    let mut want = containers.clone();
    want.sort();
    assert_eq!(members(&env), want);
    assert_eq!(env.shim_pids().len(), 1, "one shim per pod");
    let status = client
        .container_status(cri::ContainerStatusRequest {
            container_id: containers[0].clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    // Resources are the pod's: the containers changed nothing.
    assert_eq!(resources_json(&env, &pod).1, json);

    // A container stopped and removed leaves the pod.
    client
        .stop_container(cri::StopContainerRequest {
            container_id: containers[0].clone(),
            timeout: 1,
        })
        .await
        .unwrap();
    client
        .remove_container(cri::RemoveContainerRequest {
            container_id: containers[0].clone(),
        })
        .await
        .unwrap();
    assert_eq!(members(&env), vec![containers[1].clone()]);

    // Stopping the pod stops its containers; removing it removes the warren sandbox.
    client
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("StopPodSandbox: {s}\n{}", env.containerd_log()));
    client
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("RemovePodSandbox: {s}\n{}", env.containerd_log()));
    assert!(env.sandbox_names().is_empty(), "{:?}", env.sandbox_names());
    assert!(!resources.exists(), "{} left", resources.display());
    tokio::task::block_in_place(|| env.wait_no_shims());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_with_a_malformed_annotation_fails_naming_it() {
    require_containerd!();
    let (env, mut client) = start().await;
    let err = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(&env, &[("resources.limits.memory", "2Gx")])),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("a malformed annotation must fail the pod");
    let msg = err.message();
    assert!(
        msg.contains("resources.limits.memory") && msg.contains("2Gx"),
        "{msg}"
    );
    eprintln!("RunPodSandbox with a malformed annotation: {msg}");
    assert!(env.sandbox_names().is_empty(), "{:?}", env.sandbox_names());
    let pods = client
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
}
