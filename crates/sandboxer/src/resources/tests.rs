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

/// A pod with only its own entry.
fn own(resources: &ResourceInfo) -> Pod {
    Pod {
        resources: resources.clone(),
        ..Pod::default()
    }
}

/// CRI resources as the kubelet writes them for `millis` of CPU (request and limit; 0 for
/// none) and `memory` bytes (0 for none).
fn cri(millis: i64, memory: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: millis * 100,
        cpu_shares: (millis * 1024 / 1000).max(2),
        memory_limit_in_bytes: memory,
    }
}

fn config(
    resources: Option<LinuxContainerResources>,
    overhead: Option<LinuxContainerResources>,
) -> Option<prost_types::Any> {
    let config = PodSandboxConfig {
        linux: Some(LinuxPodSandboxConfig {
            resources,
            overhead,
            ..LinuxPodSandboxConfig::default()
        }),
        ..PodSandboxConfig::default()
    };
    Some(any(
        "type.googleapis.com/runtime.v1.PodSandboxConfig",
        config.encode_to_vec(),
    ))
}

/// The pause container's spec as containerd writes it.
fn pause() -> Option<serde_json::Value> {
    Some(serde_json::json!({"linux": {"resources": {"cpu": {"shares": 2}}}}))
}

fn limited(cpu: f64, memory: u64) -> ResourceInfo {
    ResourceInfo {
        cpu_limit: Some(cpu),
        cpu_request: Some(cpu),
        memory_limit: Some(memory),
        ..ResourceInfo::default()
    }
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
    let pod = pod(&req).unwrap();
    let want = ResourceInfo {
        cpu_limit: Some(1.5),
        cpu_request: Some(0.5),
        memory_limit: Some(256 << 20),
        ..ResourceInfo::default()
    };
    assert_eq!(
        pod.declared,
        Some(want),
        "linux.resources declares the containers"
    );
    assert_eq!(
        pod.resources,
        ResourceInfo {
            pid_limit: Some(50),
            ..ResourceInfo::default()
        },
        "the pod's own entry is its annotations"
    );
    assert_eq!(pod.overhead, ResourceInfo::default());
}

/// The CRI pod-level `linux.resources` is the containers' sum, declared: counted once, as the
/// larger of it and the containers' own sum, whether or not the pause spec has resources.
#[test]
fn cri_pod_level_resources_are_not_counted_twice() {
    let c1 = limited(0.5, 256 << 20);
    let c2 = limited(0.5, 256 << 20);
    for spec in [None, pause()] {
        let req = create(&[], config(Some(cri(1000, 512 << 20)), None), spec.clone());
        let p = pod(&req).unwrap();
        let pause_request = spec.as_ref().map(|_| 0.002);
        assert_eq!(p.resources.cpu_request, pause_request, "{spec:?}");
        // Before the containers: the declared size.
        let t = total(&p, []);
        assert_eq!((t.cpu_limit, t.memory_limit), (Some(1.0), Some(512 << 20)));
        // With them: still 1 CPU and 512Mi, not 2 and 1Gi.
        let t = total(&p, [&c1, &c2]);
        assert_eq!(
            (t.cpu_limit, t.cpu_request, t.memory_limit),
            (Some(1.0), Some(1.0), Some(512 << 20)),
            "{spec:?}"
        );
    }
}

#[test]
fn total_counts_the_larger_of_the_declaration_and_the_sum_then_the_overhead() {
    let pod = Pod {
        resources: ResourceInfo {
            cpu_request: Some(0.002),
            ..ResourceInfo::default()
        },
        declared: Some(limited(1.0, 512 << 20)),
        overhead: limited(0.25, 64 << 20),
        ..Pod::default()
    };
    let declared = (Some(1.25), Some(1.25), Some((512 + 64) << 20));
    let cpu_mem = |t: ResourceInfo| (t.cpu_limit, t.cpu_request, t.memory_limit);
    assert_eq!(cpu_mem(total(&pod, [])), declared);
    let half = limited(0.5, 256 << 20);
    assert_eq!(cpu_mem(total(&pod, [&half])), declared);
    assert_eq!(cpu_mem(total(&pod, [&half, &half])), declared);
    let big = limited(1.0, 128 << 20);
    assert_eq!(
        cpu_mem(total(&pod, [&half, &big])),
        (Some(1.75), Some(1.75), Some((512 + 64) << 20)),
        "CPU beyond the declaration counts; memory within it does not"
    );
    // Fields the declaration leaves out are the containers' sum.
    let pids = ResourceInfo {
        pid_limit: Some(10),
        ..half.clone()
    };
    assert_eq!(total(&pod, [&pids, &pids]).pid_limit, Some(20));

    // A container without a CPU limit leaves the pod without one, declaration and overhead
    // notwithstanding; the requests still count.
    let burstable = ResourceInfo {
        cpu_request: Some(0.1),
        memory_limit: Some(1 << 20),
        ..ResourceInfo::default()
    };
    let t = total(&pod, [&half, &burstable]);
    assert_eq!(
        (t.cpu_limit, t.cpu_request, t.memory_limit),
        (None, Some(1.252), Some((512 + 64) << 20))
    );
    // So does a declaration without one (no container of a kubelet pod has a limit), even
    // before the containers arrive.
    let unlimited = Pod {
        declared: Some(ResourceInfo {
            cpu_request: Some(0.5),
            ..ResourceInfo::default()
        }),
        ..pod.clone()
    };
    let t = total(&unlimited, []);
    assert_eq!((t.cpu_limit, t.memory_limit), (None, None));
    assert_eq!(t.cpu_request, Some(0.752));
    let t = total(&unlimited, [&half]);
    assert_eq!((t.cpu_limit, t.memory_limit), (None, None));
    assert_eq!(t.cpu_request, Some(0.752));
    let back =
        extract_resources(&as_annotations(&t), None, &ResourceRequirements::default()).unwrap();
    assert_eq!(back, t);
}

#[test]
fn overhead_comes_from_the_cri_config_and_is_added_on_top() {
    let req = create(
        &[],
        config(Some(cri(500, 256 << 20)), Some(cri(250, 64 << 20))),
        pause(),
    );
    let p = pod(&req).unwrap();
    assert_eq!(p.overhead, limited(0.25, 64 << 20));
    let t = total(&p, [&limited(0.5, 256 << 20)]);
    // 500m + 250m, and the pause container's 2m request counted as the limit.
    assert_eq!(
        (t.cpu_limit, t.cpu_request, t.memory_limit),
        (Some(0.75), Some(0.75), Some(320 << 20))
    );
    // The kubelet sends an empty overhead when the RuntimeClass has none.
    let req = create(
        &[],
        config(None, Some(LinuxContainerResources::default())),
        None,
    );
    let p = pod(&req).unwrap();
    assert_eq!((p.declared, p.overhead), (None, ResourceInfo::default()));
}

/// containerd copies the pod-level resources into the pause spec's annotations: they declare
/// the containers when the CRI config does not, and are one declaration with it otherwise.
#[test]
fn sandbox_annotations_declare_what_the_config_does_not() {
    let spec = |a: serde_json::Value| {
        Some(serde_json::json!({"annotations": a,
            "linux": {"resources": {"cpu": {"shares": 2}}}}))
    };
    let annotated = spec(serde_json::json!({
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-cpu-quota": "150000",
        "io.kubernetes.cri.sandbox-cpu-shares": "1536",
        "io.kubernetes.cri.sandbox-memory": "268435456",
    }));
    let p = pod(&create(&[], None, annotated.clone())).unwrap();
    assert_eq!(p.declared, Some(limited(1.5, 256 << 20)));
    assert_eq!(p.resources.cpu_request, Some(0.002));
    assert_eq!(
        total(&p, [&limited(0.5, 1 << 20)]).cpu_limit,
        Some(1.5),
        "declared, not added"
    );
    // The config's declaration wins over containerd's copy.
    let p = pod(&create(&[], config(Some(cri(1000, 0)), None), annotated)).unwrap();
    assert_eq!(
        p.declared.map(|d| (d.cpu_limit, d.memory_limit)),
        Some((Some(1.0), None))
    );
    // All zeros (containerd's copy of an empty message) declare nothing.
    let zeros = spec(serde_json::json!({
        "io.kubernetes.cri.sandbox-cpu-period": "0",
        "io.kubernetes.cri.sandbox-cpu-quota": "0",
        "io.kubernetes.cri.sandbox-cpu-shares": "0",
        "io.kubernetes.cri.sandbox-memory": "0",
    }));
    assert_eq!(pod(&create(&[], None, zeros)).unwrap().declared, None);
    // A value that is not a number is an error naming the annotation.
    let bad = spec(serde_json::json!({"io.kubernetes.cri.sandbox-memory": "1Gi"}));
    let msg = warren_runtime::error_chain(&pod(&create(&[], None, bad)).unwrap_err());
    assert_eq!(
        msg,
        r#"sandbox.spec: annotations["io.kubernetes.cri.sandbox-memory"]: "1Gi" is not a whole number (containerd writes the CRI value in decimal)"#
    );
    // The same key among the pod's own annotations is the pod's, not containerd's copy:
    // neither read nor kept on the sandbox.
    let p = pod(&create(
        &[("io.kubernetes.cri.sandbox-memory", "1Gi")],
        None,
        None,
    ))
    .unwrap();
    assert_eq!(p.declared, None);
    assert!(
        !p.annotations
            .contains_key("io.kubernetes.cri.sandbox-memory")
    );
    // A negative quota is no limit, as runc reads it.
    let negative = spec(serde_json::json!({
        "io.kubernetes.cri.sandbox-cpu-quota": "-7",
        "io.kubernetes.cri.sandbox-cpu-shares": "1024",
    }));
    let p = pod(&create(&[], None, negative)).unwrap();
    assert_eq!(
        p.declared.map(|d| (d.cpu_limit, d.cpu_request)),
        Some((None, Some(1.0)))
    );
}

/// CRI values are read as containerd hands them to runc; one runc or the kernel would refuse
/// is an error naming the CRI field and value, not dropped.
#[test]
fn bad_cri_resources_name_the_field_and_value() {
    let cases = [
        (
            config(
                Some(LinuxContainerResources {
                    memory_limit_in_bytes: -5,
                    ..cri(1000, 0)
                }),
                None,
            ),
            r#"options: linux.resources.memory_limit_in_bytes: "-5" is not a byte count (-1 means no limit)"#,
        ),
        (
            config(
                Some(LinuxContainerResources {
                    cpu_quota: 500,
                    ..cri(1000, 0)
                }),
                None,
            ),
            r#"options: linux.resources.cpu_quota: "500" is below the kernel's minimum of 1000 µs (-1 or 0 means no limit)"#,
        ),
        (
            config(
                None,
                Some(LinuxContainerResources {
                    cpu_period: -1,
                    ..cri(250, 0)
                }),
            ),
            r#"options: linux.overhead.cpu_period: "-1" is not a CFS period (expected 1000 to 1000000 µs, or 0 for the default)"#,
        ),
        (
            config(
                None,
                Some(LinuxContainerResources {
                    cpu_shares: 1 << 20,
                    ..cri(250, 0)
                }),
            ),
            r#"options: linux.overhead.cpu_shares: "1048576" is not a CPU weight runc accepts (expected 2 to 262144, or 0 for none)"#,
        ),
    ];
    for (options, want) in cases {
        let e = pod(&create(&[], options, None)).unwrap_err();
        assert_eq!(warren_runtime::error_chain(&e), want);
    }
    // -1 is no limit, for memory as for CPU.
    let unlimited = LinuxContainerResources {
        cpu_quota: -1,
        memory_limit_in_bytes: -1,
        ..cri(1000, 0)
    };
    let p = pod(&create(&[], config(Some(unlimited), None), None)).unwrap();
    assert_eq!(
        p.declared
            .map(|d| (d.cpu_limit, d.cpu_request, d.memory_limit)),
        Some((None, Some(1.0), None))
    );
    // The pause container's own OCI values are checked the same way.
    let spec = serde_json::json!({"linux": {"resources": {"memory": {"limit": -5}}}});
    let e = pod(&create(&[], None, Some(spec))).unwrap_err();
    assert_eq!(
        warren_runtime::error_chain(&e),
        r#"sandbox: linux.resources.memory.limit: "-5" is not a byte count (-1 means no limit)"#
    );
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
    let t = total(&own(&pod), [&c1, &c2]);
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
    let guaranteed = total(&own(&pause), [&c1]);
    assert_eq!(
        (guaranteed.cpu_request, guaranteed.cpu_limit),
        (Some(1.0), Some(1.0)),
        "the request 1.002 counted as the limit"
    );
    let t = total(&Pod::default(), [&c1, &c2]);
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
    let t = total(&own(&shares), []);
    assert_eq!((t.cpu_request, t.cpu_limit), (Some(1.0), Some(1.0)));
    assert!(extract_resources(&as_annotations(&t), None, &ResourceRequirements::default()).is_ok());

    // Totals past u64 stop at its maximum instead of overflowing.
    let huge = ResourceInfo {
        memory_limit: Some(u64::MAX / 2 + 1),
        pid_limit: Some(u64::MAX),
        ..ResourceInfo::default()
    };
    let t = total(&own(&huge), [&huge]);
    assert_eq!(
        (t.memory_limit, t.pid_limit),
        (Some(u64::MAX), Some(u64::MAX))
    );
}
