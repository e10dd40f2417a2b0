use super::*;

fn spec(name: &str) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        ..SandboxSpec::default()
    }
}

fn first_error(s: &SandboxSpec) -> String {
    s.validate().unwrap_err().to_string()
}

#[test]
fn deserializes_camel_case_json() {
    let json = r#"{
        "name": "job-1",
        "labels": {"app": "ci", "example.com/team": "infra"},
        "annotations": {"resources.limits.cpu": "2"},
        "backend": "linux",
        "image": "docker.io/library/alpine:3.20",
        "command": ["sh", "-c"],
        "args": ["echo hi"],
        "env": {"PATH": "/bin"},
        "workingDir": "/work",
        "resources": {"requests": {"cpu": 0.5, "memory": "256Mi"}, "limits": {"memory": "1Gi", "pids": 100}},
        "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP", "hostPort": 5353},
                  {"containerPort": 80, "hostPort": 8080, "hostIP": "::1"}],
        "policy": "default",
        "failurePolicy": "AutoRecreate",
        "consistency": "strong",
        "pool": "warm-alpine",
        "expireTime": 1700000000,
        "oci": {"cpu": {"shares": 2048}, "pids": {"limit": 50}}
    }"#;
    let s: SandboxSpec = serde_json::from_str(json).unwrap();
    assert_eq!(s.backend, BackendKind::Linux);
    assert_eq!(s.working_dir.as_deref(), Some("/work"));
    assert_eq!(s.failure_policy, FailurePolicy::AutoRecreate);
    assert_eq!(s.consistency, Some(Consistency::Strong));
    assert_eq!(
        s.ports[1],
        PortSpec {
            container_port: 53,
            protocol: Protocol::Udp,
            host_port: Some(5353),
            host_ip: None,
        }
    );
    assert_eq!(s.ports[2].to_string(), "[::1]:8080:80/tcp");
    // Written back under Kubernetes' name.
    assert!(
        serde_json::to_string(&s.ports[2])
            .unwrap()
            .contains(r#""hostIP":"::1""#)
    );
    assert_eq!(s.resources.limits.pids.as_deref(), Some("100"));

    let info = s.validate().unwrap();
    assert_eq!(info.cpu_limit, Some(2.0)); // annotation
    assert_eq!(info.cpu_request, Some(2.0)); // OCI shares beat spec's 0.5
    assert_eq!(info.memory_limit, Some(1 << 30));
    assert_eq!(info.memory_request, Some(256 << 20));
    assert_eq!(info.pid_limit, Some(50)); // OCI beats spec

    let back: SandboxSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn minimal_spec_serializes_tidily() {
    let s: SandboxSpec = serde_json::from_str(r#"{"name": "a"}"#).unwrap();
    assert_eq!(s, spec("a"));
    assert_eq!(s.validate(), Ok(ResourceInfo::default()));
    assert_eq!(
        serde_json::to_string(&s).unwrap(),
        r#"{"name":"a","backend":"slot","failurePolicy":"Manual"}"#
    );
}

#[test]
fn unknown_fields_are_rejected_by_name() {
    let err = serde_json::from_str::<SandboxSpec>(r#"{"name": "a", "imagee": "x"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `imagee`"), "{err}");
    let err =
        serde_json::from_str::<SandboxSpec>(r#"{"name": "a", "working_dir": "/"}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown field `working_dir`"),
        "{err}"
    );
    let json = r#"{"name": "a", "resources": {"limits": {"cpus": 1}}}"#;
    let err = serde_json::from_str::<SandboxSpec>(json).unwrap_err();
    assert!(err.to_string().contains("unknown field `cpus`"), "{err}");
    let err =
        serde_json::from_str::<SandboxSpec>(r#"{"name": "a", "backend": "docker"}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown variant `docker`"),
        "{err}"
    );
}

#[test]
fn names() {
    let long = "a".repeat(MAX_NAME_LEN);
    for good in [
        "a",
        "A",
        "0",
        "job-1",
        "my_sandbox.v2",
        "a-",
        "9.9",
        long.as_str(),
    ] {
        assert_eq!(validate_name("spec.name", good), Ok(()), "{good}");
    }
    let too_long = "a".repeat(MAX_NAME_LEN + 1);
    let bad = [
        "",
        "-a",
        ".a",
        "_a",
        "a b",
        "a/b",
        "a:b",
        "é",
        "a\0",
        too_long.as_str(),
    ];
    for bad in bad {
        let err = validate_name("spec.pool", bad).unwrap_err();
        assert_eq!(err.field(), "spec.pool");
        let msg = err.to_string();
        if bad.len() <= MAX_NAME_LEN {
            assert!(msg.starts_with(&format!("spec.pool: {bad:?} ")), "{msg}");
        }
        assert!(msg.contains("1 to 128 characters"), "{msg}");
    }
    assert_eq!(
        validate_name("spec.name", "a/b").unwrap_err().to_string(),
        r#"spec.name: "a/b" contains '/' (names are 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', '-', starting with a letter or digit)"#
    );
}

#[test]
fn labels() {
    let mut s = spec("a");
    for key in ["app", "example.com/app", "a.b-c/x_y.z", "A1", "x"] {
        s.labels = [(key.to_string(), "v-1.2_3".to_string())].into();
        assert!(s.validate().is_ok(), "{key}");
    }
    s.labels = [("app".to_string(), String::new())].into();
    assert!(s.validate().is_ok());
    for key in [
        "",
        "-app",
        "app-",
        "a b",
        "Example.com/app",
        "example.com/",
        "/app",
        "a/b/c",
        &"k".repeat(64),
    ] {
        s.labels = [(key.to_string(), "v".to_string())].into();
        let err = s.validate().unwrap_err();
        assert_eq!(err.field(), "spec.labels", "{key}");
    }
    for value in ["-v", "v-", "a b", "ü", &"v".repeat(64)] {
        s.labels = [("app".to_string(), value.to_string())].into();
        let err = s.validate().unwrap_err();
        assert_eq!(err.field(), r#"spec.labels["app"]"#, "{value}");
    }
}

#[test]
fn other_fields() {
    let mut s = spec("a");
    s.annotations.insert(String::new(), "x".into());
    assert!(first_error(&s).starts_with("spec.annotations: \"\" is not an annotation key"));
    s.annotations.clear();
    s.annotations.insert("k\u{1b}[31m".into(), "v".into());
    let e = first_error(&s);
    assert!(
        e.contains("is not an annotation key: it contains '\\u{1b}'") && !e.contains('\u{1b}'),
        "{e}"
    );

    let mut s = spec("a");
    s.annotations.insert("big".into(), "x".repeat(300 * 1024));
    assert!(first_error(&s).contains("bytes allowed in total"));

    let mut s = spec("a");
    s.env.insert("A=B".into(), "x".into());
    assert_eq!(
        first_error(&s),
        r#"spec.env: "A=B" is not a variable name: contains '=' or NUL"#
    );
    let mut s = spec("a");
    s.env.insert(String::new(), "x".into());
    assert!(s.validate().is_err());
    let mut s = spec("a");
    s.env.insert("A".into(), "x\0y".into());
    assert_eq!(s.validate().unwrap_err().field(), r#"spec.env["A"]"#);

    let mut s = spec("a");
    s.args = vec!["ok".into(), "bad\0".into()];
    assert_eq!(s.validate().unwrap_err().field(), "spec.args[1]");
    let mut s = spec("a");
    s.command = vec!["\0".into()];
    assert_eq!(s.validate().unwrap_err().field(), "spec.command[0]");

    let mut s = spec("a");
    s.working_dir = Some("relative".into());
    assert_eq!(
        first_error(&s),
        r#"spec.workingDir: "relative" must be an absolute path"#
    );

    let mut s = spec("a");
    s.image = Some("".into());
    assert_eq!(s.validate().unwrap_err().field(), "spec.image");

    let mut s = spec("a");
    s.expire_time = Some(-1);
    assert_eq!(
        first_error(&s),
        r#"spec.expireTime: "-1" must not be negative"#
    );
    s.expire_time = Some(0);
    assert!(s.validate().is_ok());

    let mut s = spec("a");
    s.policy = Some("bad name".into());
    assert_eq!(s.validate().unwrap_err().field(), "spec.policy");
    s.policy = None;
    s.pool = Some(String::new());
    assert_eq!(s.validate().unwrap_err().field(), "spec.pool");
}

#[test]
fn ports_validation() {
    let p = |container_port, protocol, host_port| PortSpec {
        container_port,
        protocol,
        host_port,
        host_ip: None,
    };
    let mut s = spec("a");
    s.ports = vec![
        p(80, Protocol::Tcp, None),
        p(80, Protocol::Udp, Some(80)),
        p(81, Protocol::Tcp, Some(80)),
    ];
    assert!(s.validate().is_ok());

    s.ports = vec![p(0, Protocol::Tcp, None)];
    assert_eq!(
        first_error(&s),
        r#"spec.ports[0].containerPort: "0" must be 1 to 65535"#
    );
    s.ports = vec![p(80, Protocol::Tcp, Some(0))];
    assert_eq!(s.validate().unwrap_err().field(), "spec.ports[0].hostPort");
    s.ports = vec![p(80, Protocol::Tcp, None), p(80, Protocol::Tcp, None)];
    assert_eq!(
        first_error(&s),
        r#"spec.ports[1].containerPort: "80" is listed twice for tcp"#
    );
    s.ports = vec![
        p(80, Protocol::Tcp, Some(8080)),
        p(81, Protocol::Tcp, Some(8080)),
    ];
    assert_eq!(s.validate().unwrap_err().field(), "spec.ports[1].hostPort");
    // An address only for a published port.
    s.ports = vec![PortSpec {
        host_ip: Some("127.0.0.1".parse().unwrap()),
        ..p(80, Protocol::Tcp, None)
    }];
    assert_eq!(
        first_error(&s),
        r#"spec.ports[0].hostIP: "127.0.0.1" needs a hostPort: only a published port has a node address"#
    );
    s.ports[0].host_port = Some(8080);
    assert!(s.validate().is_ok());
}

#[test]
fn validate_all_collects_everything() {
    let mut s = spec("");
    s.expire_time = Some(-5);
    s.resources.limits.memory = Some("2Gx".into());
    s.annotations
        .insert("resources.limits.cpu".into(), "lots".into());
    let errors = s.validate_all().unwrap_err();
    let fields: Vec<_> = errors.iter().map(SpecError::field).collect();
    assert_eq!(
        fields,
        [
            "spec.name",
            "spec.expireTime",
            r#"annotations["resources.limits.cpu"]"#,
            "spec.resources.limits.memory",
        ]
    );
    assert_eq!(s.validate().unwrap_err(), errors[0]);
}

#[test]
fn port_strings() {
    let p = |s: &str| s.parse::<PortSpec>();
    let want = |container_port, protocol, host_port| {
        Ok(PortSpec {
            container_port,
            protocol,
            host_port,
            host_ip: None,
        })
    };
    let at = |ip: &str, container_port, protocol, host_port| {
        Ok(PortSpec {
            host_ip: Some(ip.parse().unwrap()),
            ..want(container_port, protocol, Some(host_port)).unwrap()
        })
    };
    assert_eq!(p("8080"), want(8080, Protocol::Tcp, None));
    assert_eq!(p("80:8080"), want(8080, Protocol::Tcp, Some(80)));
    assert_eq!(p("8080/udp"), want(8080, Protocol::Udp, None));
    assert_eq!(p("53:5353/UDP"), want(5353, Protocol::Udp, Some(53)));
    assert_eq!(p("80:8080/tcp"), want(8080, Protocol::Tcp, Some(80)));
    assert_eq!(
        p("127.0.0.1:80:8080"),
        at("127.0.0.1", 8080, Protocol::Tcp, 80)
    );
    assert_eq!(p("[::1]:53:5353/udp"), at("::1", 5353, Protocol::Udp, 53));
    assert_eq!(p("[::]:80:8080"), at("::", 8080, Protocol::Tcp, 80));
    for bad in [
        "",
        "0",
        "65536",
        "-1",
        "a",
        "80:",
        ":80",
        "1:2:3",
        "80/",
        "80/sctp",
        " 80",
        "80/udp/tcp",
        "localhost:80:8080",
        "127.0.0.1::8080",
        "127.0.0.1:8080",
        "::1:80:8080",
        "[::1]:8080",
        "[::1:80:8080",
        "[::1]80:8080",
        "[nope]:80:8080",
        "1.2.3.4:1:2:3",
    ] {
        let err = p(bad).unwrap_err();
        assert_eq!(err.field(), "port", "{bad}");
    }
    // A lone number is not a port; a part of a longer form is named.
    assert!(
        p("70000")
            .unwrap_err()
            .to_string()
            .starts_with(r#"port: "70000" is not a port (1-65535) (expected"#)
    );
    assert!(
        p("80:70000")
            .unwrap_err()
            .to_string()
            .starts_with(r#"port: "80:70000" has "70000", which is not a port (1-65535)"#)
    );
    assert_eq!(
        p("80/sctp").unwrap_err().to_string(),
        r#"port: "sctp" is not a protocol (expected one of: tcp, udp)"#
    );
    assert_eq!(
        p("::1:80:8080").unwrap_err().to_string(),
        r#"port: "::1:80:8080" has too many parts (an IPv6 address goes in brackets) (expected "8080", "80:8080" as host:container, "127.0.0.1:80:8080" or "[::1]:80:8080", each with an optional "/udp")"#
    );
    assert_eq!(
        p("localhost:80:8080").unwrap_err().to_string(),
        r#"port: "localhost:80:8080" has "localhost", which is not an IP address (expected "8080", "80:8080" as host:container, "127.0.0.1:80:8080" or "[::1]:80:8080", each with an optional "/udp")"#
    );
    for port in [
        "8080/tcp",
        "80:8080/udp",
        "10.0.0.1:80:8080/tcp",
        "[fe80::1]:53:53/udp",
    ] {
        assert_eq!(p(port).unwrap().to_string(), port);
    }
}

#[test]
fn enums_from_str() {
    for kind in BackendKind::ALL {
        assert_eq!(kind.as_str().parse::<BackendKind>(), Ok(*kind));
        assert_eq!(kind.to_string(), kind.as_str());
    }
    assert_eq!("VM".parse::<BackendKind>(), Ok(BackendKind::Vm));
    assert_eq!(
        "docker".parse::<BackendKind>().unwrap_err().to_string(),
        r#"backend: "docker" is not a backend (expected one of: slot, linux, wasm, vm)"#
    );
    for s in ["Manual", "manual", "MANUAL"] {
        assert_eq!(s.parse::<FailurePolicy>(), Ok(FailurePolicy::Manual));
    }
    for s in [
        "AutoRecreate",
        "auto-recreate",
        "autorecreate",
        "auto_recreate",
    ] {
        assert_eq!(s.parse::<FailurePolicy>(), Ok(FailurePolicy::AutoRecreate));
    }
    assert!(
        "auto"
            .parse::<FailurePolicy>()
            .unwrap_err()
            .to_string()
            .contains("Manual, AutoRecreate")
    );
    assert_eq!("Strong".parse::<Consistency>(), Ok(Consistency::Strong));
    assert_eq!("fast".parse::<Consistency>(), Ok(Consistency::Fast));
    assert!("eventual".parse::<Consistency>().is_err());
    assert_eq!(
        serde_json::to_string(&FailurePolicy::AutoRecreate).unwrap(),
        r#""AutoRecreate""#
    );
    assert_eq!(
        serde_json::to_string(&BackendKind::Wasm).unwrap(),
        r#""wasm""#
    );
}

#[test]
fn mounts_parse_and_validate() {
    let m: Mount = "/data::/srv/data:ro".parse().expect("mount");
    assert_eq!(
        m,
        Mount {
            guest: "/data".into(),
            host: "/srv/data".into(),
            read_only: true
        }
    );
    assert_eq!(m.to_string(), "/data::/srv/data:ro");
    let m: Mount = "/w::/tmp/w".parse().expect("mount");
    assert!(!m.read_only);
    for bad in [
        "/data",
        "data::/srv",
        "/d::srv",
        "/d::/srv/../etc",
        "/a/../b::/srv",
    ] {
        let e = bad.parse::<Mount>().expect_err(bad);
        assert!(e.to_string().starts_with(&format!("mount: {bad:?}")), "{e}");
    }
    let mut spec = SandboxSpec {
        name: "m".into(),
        ..Default::default()
    };
    spec.mounts = vec![m.clone(), m];
    let e = spec.validate().expect_err("twice");
    assert_eq!(e.field(), "spec.mounts[1].guest");
}

#[test]
fn timeout_must_be_positive() {
    let mut spec = SandboxSpec {
        name: "t".into(),
        timeout_seconds: Some(0.0),
        ..Default::default()
    };
    assert_eq!(
        spec.validate().expect_err("zero").field(),
        "spec.timeoutSeconds"
    );
    spec.timeout_seconds = Some(f64::NAN);
    assert!(spec.validate().is_err());
    spec.timeout_seconds = Some(0.25);
    assert!(spec.validate().is_ok());
}

#[test]
fn linux_fields_are_validated_naming_the_field() {
    let mut s = SandboxSpec {
        name: "a".into(),
        ..SandboxSpec::default()
    };
    s.hostname = Some("box-1.example".into());
    s.user = Some("1000:100".into());
    s.stop_grace_period_seconds = Some(2.5);
    s.deny_syscalls = vec!["mkdir".into(), "mkdirat".into()];
    s.read_only_rootfs = true;
    s.validate().expect("valid");
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains(r#""readOnlyRootfs":true"#), "{json}");
    assert!(json.contains(r#""stopGracePeriodSeconds":2.5"#), "{json}");
    assert_eq!(serde_json::from_str::<SandboxSpec>(&json).unwrap(), s);

    let bad = |f: &dyn Fn(&mut SandboxSpec)| {
        let mut t = s.clone();
        f(&mut t);
        t.validate().unwrap_err()
    };
    assert_eq!(
        bad(&|t| t.hostname = Some("-bad".into())).field(),
        "spec.hostname"
    );
    assert_eq!(
        bad(&|t| t.hostname = Some("a..b".into())).field(),
        "spec.hostname"
    );
    assert_eq!(
        bad(&|t| t.hostname = Some("x".repeat(64))).field(),
        "spec.hostname"
    );
    assert_eq!(bad(&|t| t.user = Some("root".into())).field(), "spec.user");
    assert_eq!(bad(&|t| t.user = Some("1:x".into())).field(), "spec.user");
    assert_eq!(
        bad(&|t| t.stop_grace_period_seconds = Some(-1.0)).field(),
        "spec.stopGracePeriodSeconds"
    );
    assert_eq!(
        bad(&|t| t.stop_grace_period_seconds = Some(f64::INFINITY)).field(),
        "spec.stopGracePeriodSeconds"
    );
    assert_eq!(
        bad(&|t| t.deny_syscalls = vec!["Mkdir".into()]).field(),
        "spec.denySyscalls[0]"
    );
    assert_eq!(crate::parse_user("7").unwrap(), (7, 7));
    assert_eq!(crate::parse_user("7:8").unwrap(), (7, 8));
    assert_eq!(crate::parse_user("4294967294:0").unwrap(), (4294967294, 0));
    let err = crate::parse_user("0:99999999999").unwrap_err().to_string();
    assert!(err.contains("spec.user"), "{err}");
    assert!(
        err.contains("\"0:99999999999\" has an ID above 4294967294, the largest"),
        "{err}"
    );
    // (uid_t)-1 means "no change" to setresuid: the process would stay root.
    for minus_one in ["4294967295", "4294967295:0", "0:4294967295"] {
        let err = crate::parse_user(minus_one).unwrap_err().to_string();
        assert!(
            err.contains("spec.user") && err.contains("(uid_t)-1"),
            "{err}"
        );
    }
    for bad in ["+5", "5:+5", "-1", "", ":", "5:", " 5", "0x10"] {
        let err = crate::parse_user(bad).unwrap_err().to_string();
        assert!(err.contains("is not UID or UID:GID"), "{bad:?}: {err}");
    }
    // An image config's User: named after the image config; a name asks for --user.
    assert_eq!(crate::parse_image_user("10:20").unwrap(), (10, 20));
    let err = crate::parse_image_user("4294967295")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("image config User") && err.contains("(uid_t)-1"),
        "{err}"
    );
    let err = crate::parse_image_user("nobody").unwrap_err().to_string();
    assert!(
        err.starts_with("image config User") && err.contains("give --user"),
        "{err}"
    );
    // Hostnames: the kernel takes 64 bytes at most, though RFC 1123 allows 253.
    let long = format!("{}.{}", "a".repeat(40), "b".repeat(23));
    assert_eq!(long.len(), 64);
    crate::validate_hostname(&long).expect("64 characters");
    let err = crate::validate_hostname(&format!("{long}c"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("65 characters long; the kernel takes at most 64"),
        "{err}"
    );
}

#[test]
fn failure_policy_fields_are_validated_naming_the_field() {
    let s: SandboxSpec = serde_json::from_str(
        r#"{"name": "a", "failurePolicy": "AutoRecreate", "recoveryTimeoutSeconds": 1.5}"#,
    )
    .unwrap();
    assert_eq!(s.failure_policy, FailurePolicy::AutoRecreate);
    assert_eq!(s.recovery_timeout_seconds, Some(1.5));
    assert_eq!(s.consistency, None, "unset: the server's default applies");
    s.validate().expect("valid");
    for bad in [-1.0, f64::NAN, 86401.0] {
        let mut t = s.clone();
        t.recovery_timeout_seconds = Some(bad);
        let e = t.validate().unwrap_err();
        assert_eq!(e.field(), "spec.recoveryTimeoutSeconds", "{e}");
    }
}

/// A sandbox without a hostname gets its name made into a valid one, as every backend
/// sets it: at most 63 characters, letters and digits, `-` for the rest, none trailing.
#[test]
fn the_default_hostname_is_the_name_made_valid() {
    let mut s = SandboxSpec::default();
    for (name, want) in [
        ("web", "web"),
        ("under_score.x", "under-score-x"),
        ("trail_", "trail"),
        ("__", "sandbox"),
    ] {
        s.name = name.into();
        assert_eq!(s.hostname_or_default(), want, "{name}");
    }
    s.name = "a".repeat(70);
    assert_eq!(s.hostname_or_default(), "a".repeat(63));
    assert!(validate_hostname(&s.hostname_or_default()).is_ok());
    s.hostname = Some("given.example".into());
    assert_eq!(s.hostname_or_default(), "given.example");
}

#[test]
fn a_guest_path_mounted_twice_is_refused_however_it_is_spelled() {
    let mut s = spec("m");
    let mount = |guest: &str| Mount {
        guest: guest.into(),
        host: "/srv".into(),
        read_only: true,
    };
    s.mounts = vec![mount("/data"), mount("/data/")];
    assert_eq!(
        first_error(&s),
        r#"spec.mounts[1].guest: "/data/" is mounted twice"#
    );
    s.mounts = vec![mount("/other//x"), mount("/other/x")];
    assert_eq!(
        first_error(&s),
        r#"spec.mounts[1].guest: "/other/x" is mounted twice"#
    );
    s.mounts = vec![mount("/data"), mount("/data2")];
    assert!(s.validate().is_ok());
}
