use prost::Message as _;

use super::*;
use crate::api::types::Sandbox;
use crate::cri::{LinuxContainerResources, LinuxPodSandboxConfig, PodSandboxConfig};

fn any(type_url: &str, value: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.into(),
        value,
    }
}

fn create(
    annotations: &[(&str, &str)],
    options: Option<prost_types::Any>,
    spec: Option<serde_json::Value>,
) -> ControllerCreateRequest {
    ControllerCreateRequest {
        sandbox_id: "pod1".into(),
        options,
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        sandbox: Some(Sandbox {
            sandbox_id: "pod1".into(),
            spec: spec.map(|s| {
                any(
                    "types.containerd.io/opencontainers/runtime-spec/1/Spec",
                    s.to_string().into_bytes(),
                )
            }),
            ..Sandbox::default()
        }),
        ..ControllerCreateRequest::default()
    }
}

fn tasks(json: serde_json::Value) -> prost_types::Any {
    any("tasks", json.to_string().into_bytes())
}

#[test]
fn pod_resources_from_request_annotations_and_oci_spec() {
    let req = create(
        &[("resources.limits.cpu", "2"), ("io.kubernetes.pod", "x")],
        None,
        Some(serde_json::json!({
            "ociVersion": "1.1.0",
            "annotations": {"resources.requests.memory": "1Gi"},
            "linux": {"resources": {
                "memory": {"limit": 2147483648i64},
                "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
                "pids": {"limit": 1000}
            }}
        })),
    );
    let pod = pod(&req).unwrap();
    let r = &pod.resources;
    assert_eq!(r.cpu_limit, Some(2.0), "the annotation beats OCI's quota");
    assert_eq!(r.cpu_request, Some(1.0));
    assert_eq!(r.memory_limit, Some(2 << 30));
    assert_eq!(r.memory_request, Some(1 << 30));
    assert_eq!(r.pid_limit, Some(1000));
    assert_eq!(r.storage_limit, None);
    assert_eq!(
        pod.annotations.get("io.kubernetes.pod").map(String::as_str),
        Some("x")
    );
    assert!(
        !pod.annotations.contains_key("resources.limits.cpu"),
        "resource keys are carried as the total, not as the pod's own"
    );
}

#[test]
fn pod_resources_from_the_cri_pod_sandbox_config() {
    let config = PodSandboxConfig {
        annotations: [("resources.limits.pid".to_string(), "50".to_string())].into(),
        linux: Some(LinuxPodSandboxConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 150_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 256 << 20,
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        ..PodSandboxConfig::default()
    };
    let req = create(
        &[],
        Some(any(
            "type.googleapis.com/runtime.v1.PodSandboxConfig",
            config.encode_to_vec(),
        )),
        None,
    );
    let r = pod(&req).unwrap().resources;
    assert_eq!(r.cpu_limit, Some(1.5));
    assert_eq!(r.cpu_request, Some(0.5));
    assert_eq!(r.memory_limit, Some(256 << 20));
    assert_eq!(r.pid_limit, Some(50));
}

#[test]
fn bad_pod_input_names_the_field_and_value() {
    let e = pod(&create(&[("resources.limits.memory", "2Gx")], None, None)).unwrap_err();
    let msg = warren_runtime::error_chain(&e);
    assert!(
        msg.contains("resources.limits.memory") && msg.contains("2Gx"),
        "{msg}"
    );
    let bad = create(
        &[],
        Some(any(
            "type.googleapis.com/runtime.v1.PodSandboxConfig",
            vec![0xff, 0xff],
        )),
        None,
    );
    let msg = pod(&bad).unwrap_err().to_string();
    assert!(
        msg.starts_with("options:") && msg.contains("PodSandboxConfig"),
        "{msg}"
    );
    let mut bad = create(&[], None, None);
    if let Some(sb) = bad.sandbox.as_mut() {
        sb.spec = Some(any("x", b"{not json".to_vec()));
    }
    let msg = pod(&bad).unwrap_err().to_string();
    assert!(msg.starts_with("sandbox.spec:"), "{msg}");
}

#[test]
fn containers_from_kuasar_tasks() {
    let list = containers(&tasks(serde_json::json!({"tasks": [
        {"task_id": "c1", "spec": {"annotations": {"resources.limits.cpu": "500m"},
            "linux": {"resources": {"memory": {"limit": 268435456}}}}, "stdin": "", "processes": []},
        {"task_id": "c2"},
    ]})))
    .unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].0, "c1");
    assert_eq!(list[0].1.cpu_limit, Some(0.5));
    assert_eq!(list[0].1.memory_limit, Some(256 << 20));
    assert_eq!(list[1].1, ResourceInfo::default());
}

#[test]
fn bad_tasks_name_the_field() {
    let msg = containers(&any("tasks", b"[1,2]".to_vec()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("sandbox.extensions[\"tasks\"]"), "{msg}");
    let msg = containers(&tasks(serde_json::json!({"tasks": [{"task_id": ""}]})))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tasks[0].task_id"), "{msg}");
    let msg = containers(&tasks(
        serde_json::json!({"tasks": [{"task_id": "a"}, {"task_id": "a"}]}),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("tasks[1].task_id") && msg.contains("\"a\""),
        "{msg}"
    );
    let e = containers(&tasks(serde_json::json!({"tasks": [{"task_id": "c9",
        "spec": {"annotations": {"resources.limits.cpu": "abc"}}}]})))
    .unwrap_err();
    let msg = warren_runtime::error_chain(&e);
    assert!(
        msg.contains("task \"c9\"") && msg.contains("resources.limits.cpu") && msg.contains("abc"),
        "{msg}"
    );
}

#[test]
fn total_adds_field_by_field_and_annotations_round_trip() {
    let pod = ResourceInfo {
        memory_request: Some(100),
        ..ResourceInfo::default()
    };
    let c1 = ResourceInfo {
        cpu_limit: Some(0.1),
        pid_limit: Some(10),
        network_bandwidth: Some(1_000_000),
        ..ResourceInfo::default()
    };
    let c2 = ResourceInfo {
        cpu_limit: Some(0.2),
        memory_request: Some(50),
        memory_limit: Some(200),
        storage_limit: Some(1 << 30),
        ..ResourceInfo::default()
    };
    let t = total(&pod, [&c1, &c2]);
    assert_eq!(t.cpu_limit, Some(0.3), "whole millicores, no float drift");
    assert_eq!(t.memory_limit, None, "c1 has no memory limit");
    assert_eq!(t.memory_request, Some(150));
    assert_eq!(t.pid_limit, Some(10));
    assert_eq!(t.storage_limit, Some(1 << 30));
    assert_eq!(t.network_bandwidth, Some(1_000_000));
    assert_eq!(t.cpu_request, None);
    let back =
        extract_resources(&as_annotations(&t), None, &ResourceRequirements::default()).unwrap();
    assert_eq!(back, t);
}

/// Kubernetes' common Burstable pod: c1 limited, c2 with only a request. The pod can use
/// any amount, and the total passes the checks every sandbox's resources pass.
#[test]
fn a_member_without_a_limit_leaves_the_pod_unlimited_and_the_total_valid() {
    let c1 = ResourceInfo {
        cpu_limit: Some(1.0),
        cpu_request: Some(1.0),
        memory_limit: Some(1 << 30),
        memory_request: Some(1 << 30),
        ..ResourceInfo::default()
    };
    let c2 = ResourceInfo {
        cpu_request: Some(0.5),
        memory_limit: Some(1 << 20),
        memory_request: Some(1 << 20),
        ..ResourceInfo::default()
    };
    // The pause container's shares (a request of 2m, no limit) change nothing.
    let pause = ResourceInfo {
        cpu_request: Some(0.002),
        ..ResourceInfo::default()
    };
    let guaranteed = total(&pause, [&c1]);
    assert_eq!(
        (guaranteed.cpu_request, guaranteed.cpu_limit),
        (Some(1.0), Some(1.0)),
        "the request 1.002 counted as the limit"
    );
    let t = total(&ResourceInfo::default(), [&c1, &c2]);
    assert_eq!((t.cpu_request, t.cpu_limit), (Some(1.5), None));
    assert_eq!(
        (t.memory_request, t.memory_limit),
        (Some((1 << 30) + (1 << 20)), Some((1 << 30) + (1 << 20)))
    );
    let back =
        extract_resources(&as_annotations(&t), None, &ResourceRequirements::default()).unwrap();
    assert_eq!(back, t);

    // OCI shares above the quota (a weight, not a request) count as the limit.
    let shares = ResourceInfo {
        cpu_limit: Some(1.0),
        cpu_request: Some(2.0),
        ..ResourceInfo::default()
    };
    let t = total(&shares, []);
    assert_eq!((t.cpu_request, t.cpu_limit), (Some(1.0), Some(1.0)));
    assert!(extract_resources(&as_annotations(&t), None, &ResourceRequirements::default()).is_ok());

    // Totals past u64 stop at its maximum instead of overflowing.
    let huge = ResourceInfo {
        memory_limit: Some(u64::MAX / 2 + 1),
        pid_limit: Some(u64::MAX),
        ..ResourceInfo::default()
    };
    let t = total(&huge, [&huge]);
    assert_eq!(
        (t.memory_limit, t.pid_limit),
        (Some(u64::MAX), Some(u64::MAX))
    );
}
