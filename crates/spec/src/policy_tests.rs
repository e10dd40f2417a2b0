use super::*;
use crate::policy::{
    ArgCondition, ArgOp, EgressRule, EnvPolicy, ExecPolicy, FilesystemPolicy, NetworkPolicy,
    PolicySpec, PortEntry, ResourceCeilings, SyscallEntry, SyscallPolicy, SyscallRule,
    glob_matches, parse_cidr,
};
use crate::{Mount, PortSpec, Protocol, SandboxSpec};

fn policy(spec: PolicySpec) -> Policy {
    Policy::compile("p", spec).unwrap()
}

fn errors(spec: PolicySpec) -> Vec<String> {
    Policy::compile("p", spec)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn sandbox() -> SandboxSpec {
    SandboxSpec {
        name: "sb".into(),
        ..Default::default()
    }
}

fn eval(p: &Policy, spec: &SandboxSpec) -> Vec<String> {
    let resources = spec.validate().unwrap();
    p.evaluate(spec, &resources)
        .violations
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn an_empty_policy_admits_everything() {
    let p = policy(PolicySpec::default());
    let mut spec = sandbox();
    spec.command = vec!["/bin/sh".into()];
    spec.ports = vec!["80:8080".parse().unwrap()];
    let d = p.evaluate(&spec, &spec.validate().unwrap());
    assert!(d.admitted && d.allows());
    assert_eq!(d.verdict(), "admitted");
    assert_eq!(d.policy, "p");
    assert!(d.hash.starts_with("sha256:") && d.hash.len() == 71);
}

#[test]
fn hash_follows_the_spec() {
    let a = policy(PolicySpec::default());
    let b = policy(PolicySpec {
        max_lifetime_seconds: Some(60.0),
        ..Default::default()
    });
    assert_ne!(a.hash(), b.hash());
    assert_eq!(a.hash(), policy(PolicySpec::default()).hash());
}

#[test]
fn resource_ceilings_at_the_boundary() {
    let p = policy(PolicySpec {
        resources: Some(ResourceCeilings {
            max_cpu: Some("500m".into()),
            max_memory: Some("1Gi".into()),
            max_pids: Some("100".into()),
        }),
        ..Default::default()
    });
    let mut spec = sandbox();
    spec.resources.limits.cpu = Some("0.5".into());
    spec.resources.limits.memory = Some("1Gi".into());
    spec.resources.limits.pids = Some("100".into());
    assert_eq!(eval(&p, &spec), Vec::<String>::new());

    spec.resources.limits.cpu = Some("501m".into());
    spec.resources.limits.memory = Some("1073741825".into());
    spec.resources.limits.pids = Some("101".into());
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.resources.limits.cpu: "501m" violates resources.maxCpu (a limit of at most "500m" is required)"#,
            r#"spec.resources.limits.memory: "1073741825" violates resources.maxMemory (a limit of at most "1Gi" is required)"#,
            r#"spec.resources.limits.pids: "101" violates resources.maxPids (a limit of at most "100" is required)"#,
        ]
    );
}

#[test]
fn a_ceiling_makes_its_limit_mandatory() {
    let p = policy(PolicySpec {
        resources: Some(ResourceCeilings {
            max_memory: Some("1Gi".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        eval(&p, &sandbox()),
        [
            r#"spec.resources.limits.memory: "<unset>" violates resources.maxMemory (a limit of at most "1Gi" is required)"#
        ]
    );
    // An annotation counts as much as the spec: the extracted resources are checked.
    let mut spec = sandbox();
    spec.annotations
        .insert("resources.limits.memory".into(), "2Gi".into());
    assert_eq!(eval(&p, &spec).len(), 1);
    spec.annotations
        .insert("resources.limits.memory".into(), "512Mi".into());
    assert!(eval(&p, &spec).is_empty());
}

#[test]
fn lifetime() {
    let p = policy(PolicySpec {
        max_lifetime_seconds: Some(60.0),
        ..Default::default()
    });
    let mut spec = sandbox();
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.timeoutSeconds: "<unset>" violates maxLifetimeSeconds (timeoutSeconds of at most 60 is required)"#
        ]
    );
    spec.timeout_seconds = Some(60.0);
    assert!(eval(&p, &spec).is_empty());
    spec.timeout_seconds = Some(60.5);
    assert_eq!(eval(&p, &spec).len(), 1);
}

#[test]
fn exec_allow_list_with_globs() {
    let p = policy(PolicySpec {
        exec: Some(ExecPolicy {
            allow: vec![
                "/usr/bin/python3*".into(),
                "/bin/echo".into(),
                "hello.wasm".into(),
            ],
        }),
        ..Default::default()
    });
    let mut spec = sandbox();
    spec.backend = crate::BackendKind::Linux;
    spec.command = vec!["/usr/bin/python3.11".into(), "-c".into()];
    assert!(eval(&p, &spec).is_empty());
    spec.command = vec!["/bin/echo".into()];
    assert!(eval(&p, &spec).is_empty());
    spec.command = vec!["/bin/sh".into()];
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.command[0]: "/bin/sh" violates exec.allow (one of ["/usr/bin/python3*", "/bin/echo", "hello.wasm"])"#
        ]
    );
    // `*` stays within one path component.
    spec.command = vec!["/usr/bin/python3/../../bin/sh".into()];
    assert_eq!(eval(&p, &spec).len(), 1);
    // A command is matched as it reads without `..`: no climbing out of a listed directory.
    let under = policy(PolicySpec {
        exec: Some(ExecPolicy {
            allow: vec!["/usr/bin/**".into()],
        }),
        ..Default::default()
    });
    let mut vm = sandbox();
    vm.backend = crate::BackendKind::Vm;
    vm.command = vec!["/usr/bin/../../tmp/evil".into()];
    assert_eq!(
        eval(&under, &vm),
        [
            r#"spec.command[0]: "/usr/bin/../../tmp/evil" violates exec.allow (one of ["/usr/bin/**"])"#
        ]
    );
    vm.command = vec!["/usr/bin//env".into()];
    assert!(eval(&under, &vm).is_empty());
    // The image's own command cannot be checked.
    spec.command.clear();
    assert!(eval(&p, &spec)[0].starts_with(r#"spec.command: "<unset>" violates exec.allow"#));
    // Wasm without a command: the module is what runs.
    spec.backend = crate::BackendKind::Wasm;
    spec.image = Some("hello.wasm".into());
    assert!(eval(&p, &spec).is_empty());
    spec.image = Some("other.wasm".into());
    assert!(eval(&p, &spec)[0].starts_with(r#"spec.image: "other.wasm" violates exec.allow"#));
    // A wasm command is only the module's argv: it does not stand for the module.
    spec.command = vec!["/bin/echo".into()];
    assert!(eval(&p, &spec)[0].starts_with(r#"spec.image: "other.wasm" violates exec.allow"#));
    spec.image = Some("hello.wasm".into());
    assert!(eval(&p, &spec).is_empty());
    // A module path is matched as it reads without `..`.
    let p = policy(PolicySpec {
        exec: Some(ExecPolicy {
            allow: vec!["/srv/wasm/**".into()],
        }),
        ..Default::default()
    });
    spec.image = Some("/srv/wasm/sub/../../evil.wasm".into());
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.image: "/srv/wasm/sub/../../evil.wasm" violates exec.allow (one of ["/srv/wasm/**"])"#
        ]
    );
    spec.image = Some("/srv/wasm//a/./b.wasm".into());
    assert_eq!(eval(&p, &spec), Vec::<String>::new());
    assert!(p.exec_allowed("/srv/wasm/x/../y.wasm") && !p.exec_allowed("/srv/x.wasm"));
    // Slot runs nothing.
    spec.command.clear();
    spec.backend = crate::BackendKind::Slot;
    assert!(eval(&p, &spec).is_empty());
}

#[test]
fn glob_matching() {
    assert!(glob_matches("/bin/*", "/bin/ls").unwrap());
    assert!(!glob_matches("/bin/*", "/bin/x/ls").unwrap());
    assert!(glob_matches("/opt/**", "/opt/a/b/c").unwrap());
    assert!(glob_matches("APP_?", "APP_1").unwrap());
    assert!(glob_matches("{a,b}.wasm", "b.wasm").unwrap());
    assert!(!glob_matches("APP_*", "XAPP_1").unwrap());
    let e = glob_matches("[a", "a").unwrap_err().to_string();
    assert!(e.starts_with(r#"glob: "[a" is not a glob"#), "{e}");
    let e = errors(PolicySpec {
        exec: Some(ExecPolicy {
            allow: vec!["/ok".into(), "/bin/[".into()],
        }),
        ..Default::default()
    });
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(r#"spec.exec.allow[1]: "/bin/[" is not a glob"#),
        "{e:?}"
    );
}

#[test]
fn env_is_filtered_not_refused() {
    let p = policy(PolicySpec {
        env: Some(EnvPolicy {
            allow: vec!["APP_*".into(), "PATH".into()],
        }),
        ..Default::default()
    });
    let mut spec = sandbox();
    for k in ["APP_MODE", "PATH", "SECRET", "PATHX"] {
        spec.env.insert(k.into(), "v".into());
    }
    let d = p.evaluate(&spec, &spec.validate().unwrap());
    assert!(d.admitted);
    assert_eq!(d.filtered_env, ["PATHX", "SECRET"]);
    assert!(p.env_allowed("APP_MODE") && !p.env_allowed("SECRET"));
    let e = errors(PolicySpec {
        env: Some(EnvPolicy {
            allow: vec!["A=B".into(), "OK_*".into(), "".into(), "X\0Y".into()],
        }),
        ..Default::default()
    });
    assert_eq!(
        e,
        [
            r#"spec.env.allow[0]: "A=B" is not a variable name pattern (empty, or holding '=' or NUL)"#,
            r#"spec.env.allow[2]: "" is not a variable name pattern (empty, or holding '=' or NUL)"#,
            r#"spec.env.allow[3]: "X\0Y" is not a variable name pattern (empty, or holding '=' or NUL)"#,
        ]
    );
}

fn network(mode: NetworkMode, egress: Vec<EgressRule>) -> PolicySpec {
    PolicySpec {
        network: Some(NetworkPolicy { mode, egress }),
        ..Default::default()
    }
}

#[test]
fn network_modes_and_ports() {
    let mut spec = sandbox();
    spec.ports = vec![
        PortSpec {
            container_port: 8080,
            protocol: Protocol::Tcp,
            host_port: None,
            host_ip: None,
        },
        "80:81".parse().unwrap(),
    ];
    let none = policy(network(NetworkMode::None, vec![]));
    assert_eq!(
        eval(&none, &spec),
        [
            r#"spec.ports[0].containerPort: "8080" violates network.mode none (no ports)"#,
            r#"spec.ports[1].containerPort: "81" violates network.mode none (no ports)"#,
        ]
    );
    let lo = policy(network(NetworkMode::Loopback, vec![]));
    assert_eq!(
        eval(&lo, &spec),
        [
            r#"spec.ports[1].hostPort: "80" violates network.mode loopback (the policy publishes nothing on the node)"#
        ]
    );
    assert!(!none.connect_allowed("127.0.0.1".parse().unwrap(), 80));
    assert!(lo.connect_allowed("127.0.0.1".parse().unwrap(), 80));
    assert!(lo.connect_allowed("::1".parse().unwrap(), 80));
    assert!(!lo.connect_allowed("10.0.0.1".parse().unwrap(), 80));
    assert!(policy(PolicySpec::default()).connect_allowed("10.0.0.1".parse().unwrap(), 80));
}

#[test]
fn egress_cidrs_and_port_ranges() {
    let p = policy(network(
        NetworkMode::Egress,
        vec![
            EgressRule {
                cidr: "10.0.0.0/8".into(),
                ports: vec![PortEntry::Port(443), PortEntry::Range("8000-8080".into())],
            },
            EgressRule {
                cidr: "192.0.2.7".into(),
                ports: vec![],
            },
            EgressRule {
                cidr: "fd00::/8".into(),
                ports: vec![PortEntry::Port(53)],
            },
        ],
    ));
    let ok = |ip: &str, port| p.connect_allowed(ip.parse().unwrap(), port);
    assert!(ok("10.1.2.3", 443));
    assert!(ok("10.1.2.3", 8000) && ok("10.1.2.3", 8080));
    assert!(!ok("10.1.2.3", 7999) && !ok("10.1.2.3", 8081) && !ok("10.1.2.3", 80));
    assert!(!ok("11.0.0.1", 443));
    assert!(ok("192.0.2.7", 1) && !ok("192.0.2.8", 1));
    assert!(ok("fd12::1", 53) && !ok("fd12::1", 54));
    assert!(ok("127.0.0.1", 9999));
}

#[test]
fn cidr_and_port_errors_name_field_and_value() {
    assert!(parse_cidr("10.0.0.0/8").is_ok());
    let e = errors(network(
        NetworkMode::Egress,
        vec![
            EgressRule {
                cidr: "10.0.0.0/33".into(),
                ports: vec![PortEntry::Port(0), PortEntry::Range("90-80".into())],
            },
            EgressRule {
                cidr: "10.0.0.1/8".into(),
                ports: vec![PortEntry::Range("http".into())],
            },
            EgressRule {
                cidr: "example.com".into(),
                ports: vec![],
            },
        ],
    ));
    assert_eq!(
        e,
        [
            r#"spec.network.egress[0].cidr: "10.0.0.0/33" is not a CIDR (expected e.g. "10.0.0.0/8", "192.0.2.7" or "fd00::/8")"#,
            r#"spec.network.egress[0].ports[0]: "0" is not a port (1 to 65535)"#,
            r#"spec.network.egress[0].ports[1]: "90-80" is not a range of ports from 1 to 65535, low to high"#,
            r#"spec.network.egress[1].cidr: "10.0.0.1/8" has host bits set (the network is 10.0.0.0/8)"#,
            r#"spec.network.egress[1].ports[0]: "http" is not a port or range (expected e.g. 443 or "8000-8080")"#,
            r#"spec.network.egress[2].cidr: "example.com" is not a CIDR (expected e.g. "10.0.0.0/8", "192.0.2.7" or "fd00::/8")"#,
        ]
    );
    let e = errors(network(
        NetworkMode::Loopback,
        vec![EgressRule {
            cidr: "10.0.0.0/8".into(),
            ports: vec![],
        }],
    ));
    assert_eq!(
        e,
        [r#"spec.network.egress: "1 rules" is only allowed with mode egress, not loopback"#]
    );
}

fn fs_policy() -> Policy {
    policy(PolicySpec {
        filesystem: Some(FilesystemPolicy {
            read_only: vec!["/data".into()],
            writable: vec!["/tmp".into(), "/out/".into()],
            masked: vec!["/data/secret".into()],
            host_paths: Some(vec!["/srv".into()]),
        }),
        ..Default::default()
    })
}

fn mount(guest: &str, host: &str, read_only: bool) -> Mount {
    Mount {
        guest: guest.into(),
        host: host.into(),
        read_only,
    }
}

#[test]
fn filesystem_rules() {
    let p = fs_policy();
    let mut spec = sandbox();
    spec.mounts = vec![
        mount("/tmp", "/srv/a", false),
        mount("/out/x", "/srv/b", false),
        mount("/data/pub", "/srv/c", true),
        mount("/tmp/ro", "/srv/d", true),
    ];
    assert_eq!(eval(&p, &spec), Vec::<String>::new());
    spec.mounts = vec![
        mount("/data/a", "/srv/a", false),
        mount("/data/secret/k", "/srv/b", true),
        mount("/etc", "/srv/c", true),
        mount("/tmp2", "/srv2", false),
    ];
    spec.working_dir = Some("/data/secret".into());
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.mounts[0].readOnly: "false" violates filesystem.readOnly ("/data/a" must be mounted read-only)"#,
            r#"spec.mounts[1].guest: "/data/secret/k" violates filesystem.masked (must not be, lie under or contain one of ["/data/secret"])"#,
            r#"spec.mounts[2].guest: "/etc" violates filesystem (not under writable ["/tmp", "/out/"] or readOnly ["/data"])"#,
            r#"spec.mounts[3].host: "/srv2" violates filesystem.hostPaths (under one of ["/srv"])"#,
            r#"spec.mounts[3].guest: "/tmp2" violates filesystem (not under writable ["/tmp", "/out/"] or readOnly ["/data"])"#,
            r#"spec.workingDir: "/data/secret" violates filesystem.masked (one of ["/data/secret"])"#,
        ]
    );
    // A root filesystem given as a host path is a host path too; an image name is not.
    let mut spec = sandbox();
    for (image, verdict) in [
        ("/srv/roots/a", None),
        ("busybox", None),
        (
            "/",
            Some(
                r#"spec.image: "/" violates filesystem.hostPaths (a root filesystem path must be under one of ["/srv"])"#,
            ),
        ),
        (
            "/srv2",
            Some(
                r#"spec.image: "/srv2" violates filesystem.hostPaths (a root filesystem path must be under one of ["/srv"])"#,
            ),
        ),
    ] {
        spec.image = Some(image.into());
        assert_eq!(eval(&p, &spec), Vec::from_iter(verdict), "{image}");
    }
    // Paths are compared as they read without empty, `.` and `..` components.
    let mut spec = sandbox();
    spec.mounts = vec![
        mount("/data//secret", "/srv/a", true),
        mount("/data/./secret/k", "/srv/b", true),
    ];
    spec.image = Some("/srv/roots/../../etc".into());
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.image: "/srv/roots/../../etc" violates filesystem.hostPaths (a root filesystem path must be under one of ["/srv"])"#,
            r#"spec.mounts[0].guest: "/data//secret" violates filesystem.masked (must not be, lie under or contain one of ["/data/secret"])"#,
            r#"spec.mounts[1].guest: "/data/./secret/k" violates filesystem.masked (must not be, lie under or contain one of ["/data/secret"])"#,
        ]
    );
    // A mount above a masked path would expose it.
    assert_eq!(p.path_access("/data"), Some(PathAccess::Masked));
    assert_eq!(p.path_access("/data/pub"), Some(PathAccess::ReadOnly));
    assert_eq!(p.path_access("/"), Some(PathAccess::Masked));
    assert_eq!(p.path_access("/out"), Some(PathAccess::Writable));
    assert_eq!(policy(PolicySpec::default()).path_access("/x"), None);
    let e = errors(PolicySpec {
        filesystem: Some(FilesystemPolicy {
            writable: vec!["tmp".into(), "/a/../b".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        e,
        [
            r#"spec.filesystem.writable[0]: "tmp" is not an absolute path without '..'"#,
            r#"spec.filesystem.writable[1]: "/a/../b" is not an absolute path without '..'"#,
        ]
    );
}

#[test]
fn syscall_lists_are_checked() {
    let rule = |name: &str, args| {
        SyscallEntry::Rule(SyscallRule {
            name: name.into(),
            args,
        })
    };
    let ok = PolicySpec {
        syscalls: Some(SyscallPolicy {
            deny: Some(vec![
                SyscallEntry::Name("ptrace".into()),
                rule(
                    "personality",
                    vec![ArgCondition {
                        index: 0,
                        op: ArgOp::Ne,
                        value: 0,
                        mask: None,
                    }],
                ),
            ]),
            allow: None,
        }),
        ..Default::default()
    };
    policy(ok);
    let e = errors(PolicySpec {
        syscalls: Some(SyscallPolicy {
            allow: Some(vec![
                SyscallEntry::Name("Read".into()),
                SyscallEntry::Name("write".into()),
                SyscallEntry::Name("write".into()),
                rule(
                    "ioctl",
                    vec![
                        ArgCondition {
                            index: 6,
                            op: ArgOp::MaskedEq,
                            value: 1,
                            mask: None,
                        },
                        ArgCondition {
                            index: 1,
                            op: ArgOp::Eq,
                            value: 1,
                            mask: Some(3),
                        },
                    ],
                ),
            ]),
            deny: None,
        }),
        ..Default::default()
    });
    assert_eq!(
        e,
        [
            r#"spec.syscalls.allow[0].name: "Read" is not a syscall name (lowercase letters, digits and '_')"#,
            r#"spec.syscalls.allow[2].name: "write" is listed twice"#,
            r#"spec.syscalls.allow[3].args[0].index: "6" is not an argument index (0 to 5)"#,
            r#"spec.syscalls.allow[3].args[0].mask: "" is required with op maskedEq"#,
            r#"spec.syscalls.allow[3].args[1].mask: "3" is only allowed with op maskedEq"#,
        ]
    );
    let both = errors(PolicySpec {
        syscalls: Some(SyscallPolicy {
            allow: Some(vec![]),
            deny: Some(vec![]),
        }),
        ..Default::default()
    });
    assert_eq!(
        both,
        [r#"spec.syscalls: "allow and deny" gives both; give one (an allow-list or a deny-list)"#]
    );
}

#[test]
fn bad_quantities_lifetime_and_name() {
    let e = Policy::compile(
        "bad name",
        PolicySpec {
            resources: Some(ResourceCeilings {
                max_cpu: Some("2x".into()),
                max_memory: Some("lots".into()),
                max_pids: Some("1.5".into()),
            }),
            max_lifetime_seconds: Some(0.0),
            ..Default::default()
        },
    )
    .unwrap_err();
    let fields: Vec<&str> = e.iter().map(|e| e.field()).collect();
    assert_eq!(
        fields,
        [
            "metadata.name",
            "spec.resources.maxCpu",
            "spec.resources.maxMemory",
            "spec.resources.maxPids",
            "spec.maxLifetimeSeconds",
        ]
    );
    assert!(e[1].to_string().contains(r#""2x""#), "{}", e[1]);
}

#[test]
fn audit_mode_allows_what_it_denies() {
    let p = policy(PolicySpec {
        mode: PolicyMode::Audit,
        max_lifetime_seconds: Some(1.0),
        ..Default::default()
    });
    let d = p.evaluate(&sandbox(), &Default::default());
    assert!(!d.admitted && d.allows());
    assert_eq!(d.verdict(), "denied (audit)");
}

#[test]
fn policy_spec_reads_yaml_style_json() {
    let json = r#"{
        "mode": "audit",
        "syscalls": {"deny": ["ptrace", {"name": "personality", "args": [{"index": 0, "op": "ne", "value": 0}]}]},
        "exec": {"allow": ["/bin/*"]},
        "network": {"mode": "egress", "egress": [{"cidr": "10.0.0.0/8", "ports": [443, "8000-8080"]}]},
        "filesystem": {"readOnly": ["/data"], "writable": ["/tmp"], "masked": ["/proc/kcore"]},
        "env": {"allow": ["APP_*"]},
        "resources": {"maxCpu": 2, "maxMemory": "1Gi", "maxPids": 100},
        "maxLifetimeSeconds": 3600
    }"#;
    let spec: PolicySpec = serde_json::from_str(json).unwrap();
    let p = policy(spec.clone());
    assert_eq!(p.spec(), &spec);
    let back: PolicySpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
    let e = serde_json::from_str::<PolicySpec>(r#"{"network": {"mode": "open"}}"#).unwrap_err();
    assert!(e.to_string().contains("open"), "{e}");
    // A bad entry of a list that takes two forms is named, not "no variant matched".
    for (json, want) in [
        (
            r#"{"network": {"mode": "egress", "egress": [{"cidr": "10.0.0.0/8", "ports": [443, 70000]}]}}"#,
            "70000 is not a port (1 to 65535)",
        ),
        (
            r#"{"network": {"mode": "egress", "egress": [{"cidr": "10.0.0.0/8", "ports": [true]}]}}"#,
            "a port (1 to 65535) or a range",
        ),
        (
            r#"{"syscalls": {"deny": [{"name": "kill", "args": [{"index": 0, "op": "foo", "value": 1}]}]}}"#,
            "unknown variant `foo`",
        ),
        (
            r#"{"syscalls": {"deny": [{"name": "kill", "flags": 1}]}}"#,
            "unknown field `flags`",
        ),
        (
            r#"{"syscalls": {"deny": [7]}}"#,
            "a syscall name, or {name, args}",
        ),
    ] {
        let e = serde_json::from_str::<PolicySpec>(json).unwrap_err();
        assert!(e.to_string().contains(want), "{json}: {e}");
    }
}

#[test]
fn the_most_specific_path_entry_decides() {
    let p = policy(PolicySpec {
        filesystem: Some(FilesystemPolicy {
            writable: vec!["/data".into(), "/ro/tmp".into(), "/both".into()],
            read_only: vec!["/data/cfg".into(), "/ro".into(), "/both".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    for (guest, access) in [
        ("/data", PathAccess::Writable),
        ("/data/x", PathAccess::Writable),
        ("/data/cfg", PathAccess::ReadOnly),
        ("/data//cfg/y", PathAccess::ReadOnly),
        ("/ro", PathAccess::ReadOnly),
        ("/ro/tmp/z", PathAccess::Writable),
        ("/both", PathAccess::ReadOnly),
    ] {
        assert_eq!(p.path_access(guest), Some(access), "{guest}");
    }
    assert_eq!(p.read_only_below("/data"), Some("/data/cfg"));
    assert_eq!(p.read_only_below("/data/cfg"), None);
    assert_eq!(p.read_only_below("/x"), None);

    // wasm preopens a whole directory: a read-write one holding a read-only path is
    // refused; linux remounts that path read-only inside the mount.
    let mut spec = sandbox();
    spec.mounts = vec![mount("/data", "/srv/d", false)];
    spec.backend = crate::BackendKind::Wasm;
    spec.image = Some("m.wasm".into());
    assert_eq!(
        eval(&p, &spec),
        [
            r#"spec.mounts[0].readOnly: "false" violates filesystem.readOnly ("/data/cfg" lies inside "/data": mount it read-only)"#
        ]
    );
    spec.mounts[0].read_only = true;
    assert!(eval(&p, &spec).is_empty());
    spec.mounts[0].read_only = false;
    spec.backend = crate::BackendKind::Linux;
    spec.image = Some("busybox".into());
    assert!(eval(&p, &spec).is_empty());
}

#[test]
fn paths_compare_by_normalised_components() {
    for (path, base, under) in [
        ("/data", "/data", true),
        ("/data2", "/data", false),
        ("/data/x", "/data/", true),
        ("/data//secret", "/data/secret", true),
        ("/data/./secret", "/data/secret", true),
        ("/data/x/../secret/k", "/data/secret", true),
        ("/data/secret/..", "/data/secret", false),
        ("/../../etc", "/etc", true),
        ("/anything", "/", true),
        ("data", "/data", false),
        ("/data", "data", false),
    ] {
        assert_eq!(path_under(path, base), under, "{path} under {base}");
    }
    assert_eq!(normalized("/a//b/./c/../d"), "/a/b/d");
    assert_eq!(normalized("/.."), "/");
}

/// An exec.allow entry counts where its literal directories lead on the node, as a hostPaths
/// entry does: a module reached through a release link is listed by the link's glob, and
/// nothing outside it is.
#[test]
fn exec_globs_count_as_written_and_as_they_resolve() {
    let d = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(d.path()).unwrap();
    let releases = root.join("releases/v3");
    std::fs::create_dir_all(&releases).unwrap();
    std::fs::create_dir(root.join("other")).unwrap();
    std::os::unix::fs::symlink(&releases, root.join("current")).unwrap();
    let show = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let allow = |globs: &[String]| {
        policy(PolicySpec {
            exec: Some(ExecPolicy {
                allow: globs.to_vec(),
            }),
            ..PolicySpec::default()
        })
    };
    let module = show(&releases.join("m.wasm"));
    let glob = allow(&[format!("{}/*.wasm", show(&root.join("current")))]);
    assert!(
        !glob.exec_allowed(&module),
        "as written it lists the link only"
    );
    assert!(glob.resolved_exec_allowed(&module));
    assert!(!glob.resolved_exec_allowed(&show(&root.join("other/m.wasm"))));
    assert!(!glob.resolved_exec_allowed(&show(&releases.join("sub/m.wasm"))));
    // A file named outright: its directory resolves.
    let file = allow(&[show(&root.join("current/m.wasm"))]);
    assert!(file.resolved_exec_allowed(&module));
    assert!(!file.resolved_exec_allowed(&show(&releases.join("n.wasm"))));
    // Nothing to resolve, or nothing there: as written only.
    let missing = allow(&[format!("{}/**", show(&root.join("gone")))]);
    assert!(!missing.resolved_exec_allowed(&module));
    let relative = allow(&["current/*.wasm".to_string()]);
    assert!(!relative.resolved_exec_allowed(&module));
    // Without an exec section everything runs.
    assert!(policy(PolicySpec::default()).resolved_exec_allowed(&module));
    // A link is followed only through directories only root can change: one another user
    // may write (or owns) could have the link swapped for one to anywhere. `..` never.
    use std::os::unix::fs::PermissionsExt as _;
    let shared = root.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::os::unix::fs::symlink(&releases, shared.join("mods")).unwrap();
    let via_shared = allow(&[format!("{}/*.wasm", show(&shared.join("mods")))]);
    assert!(via_shared.resolved_exec_allowed(&module));
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(!via_shared.resolved_exec_allowed(&module));
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::lchown(&shared, Some(1000), None).unwrap();
    assert!(!via_shared.resolved_exec_allowed(&module));
    let dotdot = allow(&[format!(
        "{}/../releases/v3/*.wasm",
        show(&root.join("other"))
    )]);
    assert!(!dotdot.resolved_exec_allowed(&module));
}
