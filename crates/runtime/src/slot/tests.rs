use super::*;
use warren_spec::SandboxSpec;

fn config(id: &str, r: ResourceInfo) -> SandboxConfig {
    SandboxConfig {
        id: id.into(),
        spec: SandboxSpec {
            name: id.into(),
            ..Default::default()
        },
        resources: r,
        stdin: None,
        policy: None,
    }
}

fn res(cpu: f64, mem: u64) -> ResourceInfo {
    ResourceInfo {
        cpu_limit: Some(cpu),
        memory_limit: Some(mem),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_writes_the_seed_json_and_delete_removes_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let slot = SlotBackend::new(tmp.path(), SlotCapacity::default()).expect("backend");
    let r = ResourceInfo {
        cpu_limit: Some(2.0),
        cpu_request: Some(1.0),
        memory_limit: Some(2147483648),
        memory_request: Some(1073741824),
        pid_limit: Some(1000),
        ..Default::default()
    };
    let info = slot.create(&config("a1", r)).await.expect("create");
    let path = tmp.path().join("a1").join("resources.json");
    assert_eq!(
        info.get("resources_path").map(String::as_str),
        Some(path.to_str().expect("utf8"))
    );
    let text = std::fs::read_to_string(&path).expect("json written");
    assert_eq!(
        text,
        "{\n  \"cpu_limit\": 2.0,\n  \"cpu_request\": 1.0,\n  \"memory_limit\": 2147483648,\n  \
         \"memory_request\": 1073741824,\n  \"pid_limit\": 1000,\n  \"storage_limit\": null,\n  \
         \"network_bandwidth\": null\n}\n"
    );
    assert_eq!(
        slot.status("a1").await.expect("status"),
        BackendStatus::Created
    );
    slot.start("a1").await.expect("start");
    assert_eq!(
        slot.status("a1").await.expect("status"),
        BackendStatus::Running
    );
    assert_eq!(
        slot.stop("a1", Duration::ZERO).await.expect("stop"),
        BackendStatus::Stopped
    );
    slot.delete("a1").await.expect("delete");
    assert!(!tmp.path().join("a1").exists());
    assert!(matches!(
        slot.delete("a1").await,
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        slot.status("a1").await,
        Err(BackendError::NotFound { .. })
    ));
}

#[tokio::test]
async fn capacity_is_enforced_and_released() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cap: SlotCapacity = "cpu=2,memory=1Gi,sandboxes=3".parse().expect("capacity");
    let slot = SlotBackend::new(tmp.path(), cap).expect("backend");
    slot.create(&config("a", res(1.5, 512 << 20)))
        .await
        .expect("fits");
    let err = slot
        .create(&config("b", res(1.0, 1 << 20)))
        .await
        .expect_err("cpu exhausted");
    assert_eq!(
        err.to_string(),
        "not enough cpu: 1 requested, 500m of 2 available"
    );
    assert!(
        !tmp.path().join("b").exists(),
        "a refused create leaves no files"
    );
    let err = slot
        .create(&config("b", res(0.5, 600 << 20)))
        .await
        .expect_err("memory exhausted");
    assert!(err.to_string().starts_with("not enough memory"), "{err}");
    slot.create(&config("b", res(0.5, 512 << 20)))
        .await
        .expect("exact fit is allowed");
    // Update within the freed amount only.
    slot.delete("a").await.expect("delete");
    slot.update("b", &res(2.0, 1 << 30))
        .await
        .expect("grow into freed capacity");
    assert!(slot.update("b", &res(2.5, 1 << 30)).await.is_err());
    let allocated = slot.allocated();
    assert_eq!(allocated.cpu_request, Some(2.0));
    assert_eq!(allocated.memory_request, Some(1 << 30));
    let json: ResourceInfo =
        serde_json::from_slice(&std::fs::read(slot.resources_path("b")).expect("read"))
            .expect("json");
    assert_eq!(json.cpu_limit, Some(2.0), "update rewrites the JSON");
}

/// Sandboxes each holding near `u64::MAX` bytes or pids add up without overflowing (a
/// panic there left the second create busy for good), with and without a capacity.
#[tokio::test]
async fn huge_holdings_add_up_without_overflow() {
    let huge = ResourceInfo {
        memory_limit: Some(10 << 60),
        pid_limit: Some(u64::MAX),
        ..Default::default()
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let slot = SlotBackend::new(tmp.path(), SlotCapacity::default()).expect("backend");
    for id in ["a", "b", "c"] {
        slot.create(&config(id, huge.clone())).await.expect(id);
    }
    let allocated = slot.allocated();
    assert_eq!(allocated.memory_request, Some(u64::MAX), "{allocated:?}");
    assert_eq!(allocated.pid_limit, Some(u64::MAX), "{allocated:?}");
    slot.update("a", &huge).await.expect("update");
    for id in ["a", "b"] {
        slot.delete(id).await.expect(id);
    }
    assert_eq!(slot.allocated().memory_request, Some(10 << 60));

    let tmp = tempfile::tempdir().expect("tempdir");
    let slot = SlotBackend::new(tmp.path(), "memory=15Ei".parse().expect("cap")).expect("backend");
    slot.create(&config("a", huge.clone()))
        .await
        .expect("a fits");
    let err = slot
        .create(&config("b", huge.clone()))
        .await
        .expect_err("b does not");
    assert!(err.to_string().starts_with("not enough memory"), "{err}");
}

#[tokio::test]
async fn sandbox_count_capacity() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let slot = SlotBackend::new(tmp.path(), "sandboxes=1".parse().expect("cap")).expect("backend");
    slot.create(&config("a", ResourceInfo::default()))
        .await
        .expect("first");
    let err = slot
        .create(&config("b", ResourceInfo::default()))
        .await
        .expect_err("second");
    assert!(err.to_string().contains("sandboxes"), "{err}");
    assert!(matches!(
        slot.create(&config("a", ResourceInfo::default())).await,
        Err(BackendError::AlreadyExists { .. })
    ));
}

#[tokio::test]
async fn adopt_rewrites_stale_json_and_list_finds_orphans() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let slot = SlotBackend::new(tmp.path(), SlotCapacity::default()).expect("backend");
        slot.create(&config("kept", res(1.0, 1 << 20)))
            .await
            .expect("create");
        slot.create(&config("orphan", res(1.0, 1 << 20)))
            .await
            .expect("create");
    }
    std::fs::write(tmp.path().join("kept").join("resources.json"), "garbage").expect("corrupt");
    let slot = SlotBackend::new(tmp.path(), SlotCapacity::default()).expect("restart");
    let mut ids = slot.list().await.expect("list");
    ids.sort();
    assert_eq!(ids, vec!["kept".to_string(), "orphan".to_string()]);
    let (status, _) = slot
        .adopt(&config("kept", res(1.0, 1 << 20)))
        .await
        .expect("adopt");
    assert_eq!(status, BackendStatus::Running);
    let json: ResourceInfo =
        serde_json::from_slice(&std::fs::read(slot.resources_path("kept")).expect("read"))
            .expect("json");
    assert_eq!(json, res(1.0, 1 << 20));
    assert_eq!(
        slot.allocated().cpu_request,
        Some(1.0),
        "only the adopted one is accounted"
    );
    slot.delete("orphan").await.expect("orphan files removed");
    assert!(!tmp.path().join("orphan").exists());
}

#[test]
fn capacity_parse_errors_name_the_key() {
    assert!(
        "cpu=x"
            .parse::<SlotCapacity>()
            .expect_err("bad")
            .starts_with("cpu:")
    );
    assert!(
        "gpu=1"
            .parse::<SlotCapacity>()
            .expect_err("bad")
            .contains("\"gpu\"")
    );
    assert!(
        "cpu"
            .parse::<SlotCapacity>()
            .expect_err("bad")
            .contains("KEY=VALUE")
    );
    assert_eq!(
        "cpu=500m,memory=1Gi,pids=10,sandboxes=7"
            .parse::<SlotCapacity>()
            .expect("ok"),
        SlotCapacity {
            cpu: Some(0.5),
            memory: Some(1 << 30),
            pids: Some(10),
            sandboxes: Some(7)
        }
    );
}

#[tokio::test]
async fn the_policy_decision_is_written_beside_resources_json() {
    use std::sync::Arc;
    use warren_spec::{Policy, PolicyMode, PolicySpec};

    let tmp = tempfile::tempdir().expect("tempdir");
    let slot = SlotBackend::new(tmp.path(), SlotCapacity::default()).expect("backend");
    let policy = Policy::compile(
        "audit-me",
        PolicySpec {
            mode: PolicyMode::Audit,
            max_lifetime_seconds: Some(60.0),
            ..Default::default()
        },
    )
    .expect("policy");
    let mut c = config("p1", res(1.0, 1 << 20));
    let decision = policy.evaluate(&c.spec, &c.resources);
    assert!(!decision.admitted);
    c.policy = Some(crate::AppliedPolicy {
        policy: Arc::new(policy),
        decision,
    });
    let info = slot.create(&c).await.expect("create");
    assert_eq!(info["policy_decision"], "denied (audit)");
    let path = tmp.path().join("p1").join(POLICY_FILE);
    assert_eq!(info["policy_path"], path.display().to_string());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("policy.json")).expect("json");
    assert_eq!(json["policy"], "audit-me");
    assert_eq!(json["mode"], "audit");
    assert_eq!(json["admitted"], false);
    assert_eq!(json["violations"][0]["field"], "spec.timeoutSeconds");
    assert_eq!(json["violations"][0]["value"], "<unset>");
    assert!(json["hash"].as_str().expect("hash").starts_with("sha256:"));

    // Re-written by adopt when missing (the store is the truth).
    std::fs::remove_file(&path).expect("rm");
    slot.adopt(&c).await.expect("adopt");
    assert!(path.exists());

    // No policy: no file, no keys.
    let plain = config("p2", res(1.0, 1 << 20));
    let info = slot.create(&plain).await.expect("create");
    assert!(!info.contains_key("policy_path"));
    assert!(!tmp.path().join("p2").join(POLICY_FILE).exists());
}
