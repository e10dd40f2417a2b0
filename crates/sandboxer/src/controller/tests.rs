use super::*;

fn info(cpu_limit: f64, memory_limit: u64) -> ResourceInfo {
    ResourceInfo {
        cpu_limit: Some(cpu_limit),
        cpu_request: Some(cpu_limit),
        memory_limit: Some(memory_limit),
        ..ResourceInfo::default()
    }
}

/// What a restarted sandboxer reads back is what it wrote: the pod's own entry, its
/// declaration and its overhead, its containers, its state and its other annotations.
#[test]
fn a_pod_is_read_back_as_recorded() {
    let own = resources::Pod {
        annotations: [("team".to_string(), "x".to_string())].into(),
        resources: ResourceInfo {
            cpu_request: Some(0.002),
            ..ResourceInfo::default()
        },
        declared: Some(info(1.0, 512 << 20)),
        overhead: info(0.25, 64 << 20),
    };
    let containers = vec![("c1".to_string(), info(0.5, 256 << 20))];
    let a = annotations(&own, &containers, State::Stopped);
    assert_eq!(
        a.get(ANNOTATION_POD_DECLARED).map(String::as_str),
        Some(info(1.0, 512 << 20).to_json().as_str())
    );
    let (state, back, back_containers) = recorded(&a);
    assert_eq!(state, State::Stopped);
    assert_eq!(back, own);
    assert_eq!(back_containers, containers);
    assert_eq!(
        resources::total(&back, back_containers.iter().map(|(_, r)| r)),
        resources::total(&own, containers.iter().map(|(_, r)| r))
    );

    // Nothing declared and no overhead: neither is written, and both read back as none.
    let plain = resources::Pod {
        declared: None,
        overhead: ResourceInfo::default(),
        ..own
    };
    let a = annotations(&plain, &[], State::Ready);
    assert!(!a.contains_key(ANNOTATION_POD_DECLARED), "{a:?}");
    assert!(!a.contains_key(ANNOTATION_POD_OVERHEAD), "{a:?}");
    assert_eq!(recorded(&a).1, plain);
}

/// A record written before the declaration and the overhead were kept reads as a pod with
/// neither: its own entry and containers as they were.
#[test]
fn a_record_from_before_declarations_reads_as_none() {
    let a: BTreeMap<String, String> = [
        (ANNOTATION_STATE, "ready"),
        (
            ANNOTATION_POD_RESOURCES,
            r#"{"cpu_limit":0.25,"cpu_request":null,"memory_limit":null,"memory_request":null,"pid_limit":null,"storage_limit":null,"network_bandwidth":null}"#,
        ),
        (ANNOTATION_CONTAINERS, r#"{"c1":{"cpu_limit":0.75}}"#),
        ("resources.limits.cpu", "1000m"),
        ("team", "x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (state, own, containers) = recorded(&a);
    assert_eq!(state, State::Ready);
    assert_eq!(own.declared, None);
    assert_eq!(own.overhead, ResourceInfo::default());
    assert_eq!(own.resources.cpu_limit, Some(0.25));
    assert_eq!(
        own.annotations.keys().collect::<Vec<_>>(),
        ["team"],
        "warren's own keys and the total are not the pod's annotations"
    );
    assert_eq!(containers.len(), 1);
    let total = resources::total(&own, containers.iter().map(|(_, r)| r));
    assert_eq!(total.cpu_limit, Some(1.0));
}
