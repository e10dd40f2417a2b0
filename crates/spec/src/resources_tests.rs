use super::*;

const SEED_PRETTY: &str = r#"{
  "cpu_limit": 2.0,
  "cpu_request": 1.0,
  "memory_limit": 2147483648,
  "memory_request": 1073741824,
  "pid_limit": 1000,
  "storage_limit": null,
  "network_bandwidth": null
}"#;

fn seed_info() -> ResourceInfo {
    ResourceInfo {
        cpu_limit: Some(2.0),
        cpu_request: Some(1.0),
        memory_limit: Some(2 << 30),
        memory_request: Some(1 << 30),
        pid_limit: Some(1000),
        storage_limit: None,
        network_bandwidth: None,
    }
}

fn full_info() -> ResourceInfo {
    ResourceInfo {
        cpu_limit: Some(0.1),
        cpu_request: Some(1e-3),
        memory_limit: Some(u64::MAX),
        memory_request: Some(0),
        pid_limit: Some(1),
        storage_limit: Some(10 << 30),
        network_bandwidth: Some(100_000_000),
    }
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn oci(
    quota: i64,
    period: u64,
    shares: u64,
    limit: i64,
    reservation: i64,
    pids: i64,
) -> LinuxResources {
    let mut cpu = LinuxCpu::default();
    cpu.set_quota(Some(quota))
        .set_period(Some(period))
        .set_shares(Some(shares));
    let mut memory = LinuxMemory::default();
    memory
        .set_limit(Some(limit))
        .set_reservation(Some(reservation));
    let mut pid = LinuxPids::default();
    pid.set_limit(pids);
    let mut r = LinuxResources::default();
    r.set_cpu(Some(cpu))
        .set_memory(Some(memory))
        .set_pids(Some(pid));
    r
}

fn list(cpu: &str, memory: &str) -> ResourceList {
    ResourceList {
        cpu: Some(cpu.into()),
        memory: Some(memory.into()),
        ..ResourceList::default()
    }
}

#[test]
fn seed_json_is_byte_exact() {
    assert_eq!(seed_info().to_json_pretty(), SEED_PRETTY);
    assert_eq!(
        serde_json::from_str::<ResourceInfo>(SEED_PRETTY).unwrap(),
        seed_info()
    );
    assert_eq!(
        seed_info().to_json(),
        r#"{"cpu_limit":2.0,"cpu_request":1.0,"memory_limit":2147483648,"memory_request":1073741824,"pid_limit":1000,"storage_limit":null,"network_bandwidth":null}"#
    );
}

#[test]
fn all_null() {
    let none = ResourceInfo::default();
    assert_eq!(
        none.to_json_pretty(),
        "{\n  \"cpu_limit\": null,\n  \"cpu_request\": null,\n  \"memory_limit\": null,\n  \
         \"memory_request\": null,\n  \"pid_limit\": null,\n  \"storage_limit\": null,\n  \
         \"network_bandwidth\": null\n}"
    );
    assert_eq!(serde_json::from_str::<ResourceInfo>("{}").unwrap(), none);
}

#[test]
fn hand_written_json_matches_serde_json() {
    for info in [seed_info(), full_info(), ResourceInfo::default()] {
        assert_eq!(info.to_json(), serde_json::to_string(&info).unwrap());
        assert_eq!(
            info.to_json_pretty(),
            serde_json::to_string_pretty(&info).unwrap()
        );
        assert_eq!(
            serde_json::from_str::<ResourceInfo>(&info.to_json()).unwrap(),
            info
        );
    }
    // Readers are lenient about keys they do not know.
    let extra = r#"{"cpu_limit": 1.5, "gpu": 1}"#;
    assert_eq!(
        serde_json::from_str::<ResourceInfo>(extra)
            .unwrap()
            .cpu_limit,
        Some(1.5)
    );
}

#[test]
fn annotations_alone() {
    let a = annotations(&[
        (ANNOTATION_CPU_LIMIT, "2"),
        (ANNOTATION_CPU_REQUEST, "1"),
        (ANNOTATION_MEMORY_LIMIT, "2Gi"),
        (ANNOTATION_MEMORY_REQUEST, "1Gi"),
        (ANNOTATION_PID_LIMIT, "1000"),
        (ANNOTATION_EPHEMERAL_STORAGE_LIMIT, "10Gi"),
        (ANNOTATION_NETWORK_BANDWIDTH, "100M"),
        ("io.kubernetes.cri.sandbox-id", "abc"),
    ]);
    let info = extract_resources(&a, None, &ResourceRequirements::default()).unwrap();
    let want = ResourceInfo {
        storage_limit: Some(10 << 30),
        network_bandwidth: Some(100_000_000),
        ..seed_info()
    };
    assert_eq!(info, want);
}

#[test]
fn oci_alone() {
    let r = oci(150_000, 100_000, 512, 1 << 30, 512 << 20, 100);
    let info = extract_resources(&BTreeMap::new(), Some(&r), &ResourceRequirements::default());
    let want = ResourceInfo {
        cpu_limit: Some(1.5),
        cpu_request: Some(0.5),
        memory_limit: Some(1 << 30),
        memory_request: Some(512 << 20),
        pid_limit: Some(100),
        ..ResourceInfo::default()
    };
    assert_eq!(info.unwrap(), want);
}

#[test]
fn oci_unlimited_and_unset_values_are_ignored() {
    let r = oci(-1, 100_000, 0, -1, 0, 0);
    let info = extract_resources(&BTreeMap::new(), Some(&r), &ResourceRequirements::default());
    assert_eq!(info.unwrap(), ResourceInfo::default());
    // runc and the kernel read any negative quota as no limit, -1 as no memory limit or
    // reservation, and a negative pids limit as none.
    let r = oci(-5, 0, 0, 0, -1, -7);
    let info = extract_resources(&BTreeMap::new(), Some(&r), &ResourceRequirements::default());
    assert_eq!(info.unwrap(), ResourceInfo::default());
    let info = extract_resources(
        &BTreeMap::new(),
        Some(&LinuxResources::default()),
        &Default::default(),
    );
    assert_eq!(info.unwrap(), ResourceInfo::default());
}

#[test]
fn spec_alone() {
    let spec = ResourceRequirements {
        requests: list("500m", "256Mi"),
        limits: ResourceList {
            pids: Some("1k".into()),
            storage: Some("1G".into()),
            network_bandwidth: Some("1G".into()),
            ..list("1.5", "1Gi")
        },
    };
    let info = extract_resources(&BTreeMap::new(), None, &spec).unwrap();
    let want = ResourceInfo {
        cpu_limit: Some(1.5),
        cpu_request: Some(0.5),
        memory_limit: Some(1 << 30),
        memory_request: Some(256 << 20),
        pid_limit: Some(1000),
        storage_limit: Some(1_000_000_000),
        network_bandwidth: Some(1_000_000_000),
    };
    assert_eq!(info, want);
}

#[test]
fn precedence_is_per_field() {
    // Annotations set cpu limit and memory request; OCI sets cpu limit, cpu request, memory
    // limit; the spec sets everything.
    let a = annotations(&[
        (ANNOTATION_CPU_LIMIT, "4"),
        (ANNOTATION_MEMORY_REQUEST, "100Mi"),
    ]);
    let r = oci(300_000, 100_000, 2048, 3 << 30, -1, -1);
    let spec = ResourceRequirements {
        requests: list("1", "1Gi"),
        limits: ResourceList {
            pids: Some("7".into()),
            ..list("1", "1Gi")
        },
    };
    let info = extract_resources(&a, Some(&r), &spec).unwrap();
    let want = ResourceInfo {
        cpu_limit: Some(4.0),            // annotation beats OCI and spec
        cpu_request: Some(2.0),          // OCI beats spec
        memory_limit: Some(3 << 30),     // OCI beats spec
        memory_request: Some(100 << 20), // annotation
        pid_limit: Some(7),              // spec only (OCI -1 is unlimited)
        ..ResourceInfo::default()
    };
    assert_eq!(info, want);
}

#[test]
fn storage_beats_ephemeral_storage() {
    let a = annotations(&[
        (ANNOTATION_STORAGE_LIMIT, "1Gi"),
        (ANNOTATION_EPHEMERAL_STORAGE_LIMIT, "2Gi"),
    ]);
    let info = extract_resources(&a, None, &ResourceRequirements::default()).unwrap();
    assert_eq!(info.storage_limit, Some(1 << 30));
}

#[test]
fn errors_name_the_source() {
    let a = annotations(&[(ANNOTATION_MEMORY_LIMIT, "2Gx")]);
    let err = extract_resources(&a, None, &ResourceRequirements::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"annotations["resources.limits.memory"]: "2Gx" is not a quantity (expected e.g. "512Mi", "2G")"#
    );
    let spec = ResourceRequirements {
        limits: list("1", "2Gx"),
        ..Default::default()
    };
    let err = extract_resources(&BTreeMap::new(), None, &spec).unwrap_err();
    assert_eq!(err.field(), "spec.resources.limits.memory");
    assert!(err.to_string().contains(r#""2Gx""#));

    // An overridden value is still checked.
    let a = annotations(&[(ANNOTATION_MEMORY_LIMIT, "1Gi")]);
    let err = extract_resources(&a, None, &spec).unwrap_err();
    assert_eq!(err.field(), "spec.resources.limits.memory");
}

#[test]
fn request_above_limit_is_rejected() {
    let a = annotations(&[(ANNOTATION_CPU_REQUEST, "2")]);
    let spec = ResourceRequirements {
        limits: list("1", "1Gi"),
        ..Default::default()
    };
    let err = extract_resources(&a, None, &spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"annotations["resources.requests.cpu"]: request 2 is more than the limit 1 set by spec.resources.limits.cpu"#
    );
    let spec = ResourceRequirements {
        requests: list("1", "2Gi"),
        limits: list("1", "1Gi"),
    };
    let err = extract_resources(&BTreeMap::new(), None, &spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.resources.requests.memory: request 2Gi is more than the limit 1Gi set by \
         spec.resources.limits.memory"
    );
    // Both from OCI: shares are a weight, so a high one next to a small quota is legal.
    let r = oci(50_000, 100_000, 2048, -1, -1, -1);
    assert!(extract_resources(&BTreeMap::new(), Some(&r), &Default::default()).is_ok());
    // Equal is fine.
    let spec = ResourceRequirements {
        requests: list("1", "1Gi"),
        limits: list("1000m", "1Gi"),
    };
    assert!(extract_resources(&BTreeMap::new(), None, &spec).is_ok());
}

#[test]
fn zero_pid_limit_is_rejected() {
    let a = annotations(&[(ANNOTATION_PID_LIMIT, "0")]);
    let err = extract_resources(&a, None, &ResourceRequirements::default()).unwrap_err();
    assert_eq!(err.field(), r#"annotations["resources.limits.pid"]"#);
    let a = annotations(&[(ANNOTATION_PID_LIMIT, "1.5")]);
    let err = extract_resources(&a, None, &ResourceRequirements::default()).unwrap_err();
    assert!(err.to_string().contains("whole number"), "{err}");
}

#[test]
fn resource_list_accepts_numbers_and_strings() {
    let json =
        r#"{"cpu": 2, "memory": "1Gi", "pids": 100, "storage": null, "networkBandwidth": 0.5}"#;
    let l: ResourceList = serde_json::from_str(json).unwrap();
    assert_eq!(l.cpu.as_deref(), Some("2"));
    assert_eq!(l.memory.as_deref(), Some("1Gi"));
    assert_eq!(l.pids.as_deref(), Some("100"));
    assert_eq!(l.storage, None);
    assert_eq!(l.network_bandwidth.as_deref(), Some("0.5"));
    let l: ResourceList = serde_json::from_str(r#"{"cpu": -1}"#).unwrap();
    assert_eq!(l.cpu.as_deref(), Some("-1"));

    let err = serde_json::from_str::<ResourceList>(r#"{"cpu": true}"#).unwrap_err();
    assert!(
        err.to_string()
            .contains("a quantity as a string or a number"),
        "{err}"
    );
    let err = serde_json::from_str::<ResourceList>(r#"{"gpu": "1"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `gpu`"), "{err}");

    let r = ResourceRequirements {
        limits: list("1", "1Gi"),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        r#"{"limits":{"cpu":"1","memory":"1Gi"}}"#
    );
    assert!(ResourceRequirements::default().is_empty());
}

#[test]
fn oci_round_trip() {
    let info = ResourceInfo {
        storage_limit: None,
        network_bandwidth: None,
        ..full_info()
    };
    let info = ResourceInfo {
        memory_request: Some(1),
        cpu_request: Some(0.25),
        cpu_limit: Some(0.5),
        ..info
    };
    let back = extract_resources(
        &BTreeMap::new(),
        Some(&resources_to_oci(&info)),
        &Default::default(),
    );
    let want = ResourceInfo {
        memory_limit: Some(i64::MAX as u64),
        ..info
    };
    assert_eq!(back.unwrap(), want);

    // The kubelet's floor(millis * 1024 / 1000) shares come back as the same millicores.
    for millis in [2u64, 10, 100, 250, 999, 1000, 1001, 3333, 64_000] {
        let info = ResourceInfo {
            cpu_request: Some(millis as f64 / 1000.0),
            ..Default::default()
        };
        let oci = resources_to_oci(&info);
        let back = extract_resources(&BTreeMap::new(), Some(&oci), &Default::default()).unwrap();
        assert_eq!(back, info, "{millis}m");
    }
    assert_eq!(
        resources_to_oci(&ResourceInfo::default()),
        LinuxResources::default()
    );
    let tiny = resources_to_oci(&ResourceInfo {
        cpu_limit: Some(0.001),
        ..Default::default()
    });
    assert_eq!(tiny.cpu().as_ref().and_then(|c| c.quota()), Some(1000));
}

fn cpu(quota: Option<i64>, period: Option<u64>, shares: Option<u64>) -> LinuxResources {
    let mut cpu = LinuxCpu::default();
    cpu.set_quota(quota).set_period(period).set_shares(shares);
    let mut r = LinuxResources::default();
    r.set_cpu(Some(cpu));
    r
}

fn memory(limit: Option<i64>, reservation: Option<i64>) -> LinuxResources {
    let mut memory = LinuxMemory::default();
    memory.set_limit(limit).set_reservation(reservation);
    let mut r = LinuxResources::default();
    r.set_memory(Some(memory));
    r
}

fn from_oci(r: &LinuxResources) -> Result<ResourceInfo, SpecError> {
    extract_resources(&BTreeMap::new(), Some(r), &ResourceRequirements::default())
}

/// runc writes a quota without a period alone, and the cgroup keeps the kernel's default
/// period of 100 ms: the quota is a limit, not nothing.
#[test]
fn oci_quota_without_a_period_uses_the_default_period() {
    for period in [None, Some(0)] {
        let info = from_oci(&cpu(Some(50_000), period, None)).unwrap();
        assert_eq!(info.cpu_limit, Some(0.5), "period {period:?}");
    }
    let info = from_oci(&cpu(Some(50_000), Some(200_000), None)).unwrap();
    assert_eq!(info.cpu_limit, Some(0.25));
    // A period alone sets no limit.
    let info = from_oci(&cpu(None, Some(100_000), None)).unwrap();
    assert_eq!(info.cpu_limit, None);
}

#[test]
fn bad_oci_values_name_the_field_and_value() {
    let cases = [
        (
            memory(Some(-5), None),
            r#"linux.resources.memory.limit: "-5" is not a byte count (-1 means no limit)"#,
        ),
        (
            memory(None, Some(-2)),
            r#"linux.resources.memory.reservation: "-2" is not a byte count (-1 means none)"#,
        ),
        (
            cpu(Some(500), Some(100_000), None),
            r#"linux.resources.cpu.quota: "500" is below the kernel's minimum of 1000 µs (-1 or 0 means no limit)"#,
        ),
        (
            cpu(Some(50_000), Some(999), None),
            r#"linux.resources.cpu.period: "999" is not a CFS period (expected 1000 to 1000000 µs, or 0 for the default)"#,
        ),
        (
            cpu(None, Some(1_000_001), None),
            r#"linux.resources.cpu.period: "1000001" is not a CFS period (expected 1000 to 1000000 µs, or 0 for the default)"#,
        ),
        (
            cpu(Some(i64::MAX), Some(1000), None),
            r#"linux.resources.cpu.quota: "9223372036854775807" over a period of 1000 µs is more than 1000000000 cores"#,
        ),
        (
            cpu(None, None, Some(1)),
            r#"linux.resources.cpu.shares: "1" is not a CPU weight runc accepts (expected 2 to 262144, or 0 for none)"#,
        ),
        (
            cpu(None, None, Some(u64::MAX)),
            r#"linux.resources.cpu.shares: "18446744073709551615" is not a CPU weight runc accepts (expected 2 to 262144, or 0 for none)"#,
        ),
    ];
    for (r, want) in cases {
        assert_eq!(from_oci(&r).unwrap_err().to_string(), want);
    }
    // The largest legal values are taken as they are.
    let info = from_oci(&cpu(Some(1_000_000_000_000), Some(1000), Some(262_144))).unwrap();
    assert_eq!(info.cpu_limit, Some(1_000_000_000.0));
    assert_eq!(info.cpu_request, Some(256.0));
    let info = from_oci(&memory(Some(i64::MAX), Some(1))).unwrap();
    assert_eq!(
        (info.memory_limit, info.memory_request),
        (Some(i64::MAX as u64), Some(1))
    );
    // An overridden OCI value is still checked, as every other source is.
    let a = annotations(&[(ANNOTATION_MEMORY_LIMIT, "1Gi")]);
    let err = extract_resources(&a, Some(&memory(Some(-3), None)), &Default::default());
    assert_eq!(err.unwrap_err().field(), "linux.resources.memory.limit");
}
