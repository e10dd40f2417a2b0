//! Wire <-> model conversions. Pure; the server validates the converted spec afterwards.

use warren_spec::{
    BackendKind, Consistency, FailurePolicy, Mount, PortSpec, Protocol, ResourceInfo, ResourceList,
    ResourceRequirements, SandboxSpec,
};

use crate::v1;

/// A wire message that does not map onto the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {value:?} {reason}")]
pub struct ConvertError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn err(field: &str, value: impl ToString, reason: &str) -> ConvertError {
    ConvertError {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn list_to_pb(l: &ResourceList) -> v1::ResourceList {
    v1::ResourceList {
        cpu: l.cpu.clone(),
        memory: l.memory.clone(),
        pids: l.pids.clone(),
        storage: l.storage.clone(),
        network_bandwidth: l.network_bandwidth.clone(),
    }
}

fn list_from_pb(l: Option<v1::ResourceList>) -> ResourceList {
    let l = l.unwrap_or_default();
    ResourceList {
        cpu: l.cpu,
        memory: l.memory,
        pids: l.pids,
        storage: l.storage,
        network_bandwidth: l.network_bandwidth,
    }
}

pub fn resources_to_pb(r: &ResourceRequirements) -> v1::Resources {
    v1::Resources {
        requests: Some(list_to_pb(&r.requests)),
        limits: Some(list_to_pb(&r.limits)),
    }
}

pub fn resources_from_pb(r: Option<v1::Resources>) -> ResourceRequirements {
    let r = r.unwrap_or_default();
    ResourceRequirements {
        requests: list_from_pb(r.requests),
        limits: list_from_pb(r.limits),
    }
}

pub fn failure_policy_to_pb(p: FailurePolicy) -> v1::FailurePolicy {
    match p {
        FailurePolicy::Manual => v1::FailurePolicy::Manual,
        FailurePolicy::AutoRecreate => v1::FailurePolicy::AutoRecreate,
    }
}

/// `None` for UNSPECIFIED, so callers can tell "not given" from "Manual".
pub fn failure_policy_from_pb(
    field: &str,
    raw: i32,
) -> Result<Option<FailurePolicy>, ConvertError> {
    match v1::FailurePolicy::try_from(raw) {
        Ok(v1::FailurePolicy::Unspecified) => Ok(None),
        Ok(v1::FailurePolicy::Manual) => Ok(Some(FailurePolicy::Manual)),
        Ok(v1::FailurePolicy::AutoRecreate) => Ok(Some(FailurePolicy::AutoRecreate)),
        Err(_) => Err(err(
            field,
            raw,
            "is not a failure policy (expected Manual or AutoRecreate)",
        )),
    }
}

/// `None` for UNSPECIFIED: the server's default applies.
fn consistency_from_pb(raw: i32) -> Result<Option<Consistency>, ConvertError> {
    match v1::Consistency::try_from(raw) {
        Ok(v1::Consistency::Unspecified) => Ok(None),
        Ok(v1::Consistency::Fast) => Ok(Some(Consistency::Fast)),
        Ok(v1::Consistency::Strong) => Ok(Some(Consistency::Strong)),
        Err(_) => Err(err(
            "spec.consistency",
            raw,
            "is not a consistency mode (expected fast or strong)",
        )),
    }
}

pub fn spec_to_pb(s: &SandboxSpec) -> v1::SandboxSpec {
    v1::SandboxSpec {
        name: s.name.clone(),
        labels: s.labels.clone().into_iter().collect(),
        annotations: s.annotations.clone().into_iter().collect(),
        backend: s.backend.as_str().to_string(),
        image: s.image.clone(),
        command: s.command.clone(),
        args: s.args.clone(),
        env: s.env.clone().into_iter().collect(),
        working_dir: s.working_dir.clone(),
        resources: Some(resources_to_pb(&s.resources)),
        ports: s
            .ports
            .iter()
            .map(|p| v1::Port {
                container_port: u32::from(p.container_port),
                protocol: match p.protocol {
                    Protocol::Tcp => v1::Protocol::Tcp as i32,
                    Protocol::Udp => v1::Protocol::Udp as i32,
                },
                host_port: p.host_port.map(u32::from),
                host_ip: p.host_ip.map(|ip| ip.to_string()),
            })
            .collect(),
        policy: s.policy.clone(),
        failure_policy: failure_policy_to_pb(s.failure_policy) as i32,
        consistency: match s.consistency {
            None => v1::Consistency::Unspecified as i32,
            Some(Consistency::Fast) => v1::Consistency::Fast as i32,
            Some(Consistency::Strong) => v1::Consistency::Strong as i32,
        },
        recovery_timeout_seconds: s.recovery_timeout_seconds,
        pool: s.pool.clone(),
        expire_time: s.expire_time,
        // LinuxResources serializes infallibly (plain data); an error here would be a bug in
        // oci-spec, and dropping the field would lose data, so fall back to null.
        oci_linux_resources_json: s
            .oci
            .as_ref()
            .map(|o| serde_json::to_string(o).unwrap_or_else(|_| "null".to_string())),
        mounts: s
            .mounts
            .iter()
            .map(|m| v1::Mount {
                guest: m.guest.clone(),
                host: m.host.clone(),
                read_only: m.read_only,
            })
            .collect(),
        timeout_seconds: s.timeout_seconds,
        stop_grace_period_seconds: s.stop_grace_period_seconds,
        hostname: s.hostname.clone(),
        user: s.user.clone(),
        read_only_rootfs: s.read_only_rootfs,
        deny_syscalls: s.deny_syscalls.clone(),
        reset_revision: s.reset_revision.clone(),
    }
}

fn port_from_pb(i: usize, p: &v1::Port) -> Result<PortSpec, ConvertError> {
    let field = |f: &str| format!("spec.ports[{i}].{f}");
    let container_port = u16::try_from(p.container_port).map_err(|_| {
        err(
            &field("containerPort"),
            p.container_port,
            "is not a port (1-65535)",
        )
    })?;
    let host_port = p
        .host_port
        .map(|h| {
            u16::try_from(h).map_err(|_| err(&field("hostPort"), h, "is not a port (1-65535)"))
        })
        .transpose()?;
    let host_ip = p
        .host_ip
        .as_deref()
        .map(|ip| {
            ip.parse()
                .map_err(|_| err(&field("hostIP"), ip, "is not an IP address"))
        })
        .transpose()?;
    let protocol = match v1::Protocol::try_from(p.protocol) {
        Ok(v1::Protocol::Tcp) => Protocol::Tcp,
        Ok(v1::Protocol::Udp) => Protocol::Udp,
        Err(_) => {
            return Err(err(
                &field("protocol"),
                p.protocol,
                "is not a protocol (tcp or udp)",
            ));
        }
    };
    Ok(PortSpec {
        container_port,
        protocol,
        host_port,
        host_ip,
    })
}

pub fn spec_from_pb(s: v1::SandboxSpec) -> Result<SandboxSpec, ConvertError> {
    let backend = if s.backend.is_empty() {
        BackendKind::default()
    } else {
        s.backend.parse::<BackendKind>().map_err(|_| {
            err(
                "spec.backend",
                &s.backend,
                "is not a backend (expected slot, linux, wasm or vm)",
            )
        })?
    };
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| port_from_pb(i, p))
        .collect::<Result<_, _>>()?;
    let oci = match s.oci_linux_resources_json.as_deref() {
        None | Some("") | Some("null") => None,
        Some(json) => Some(serde_json::from_str(json).map_err(|e| {
            err(
                "spec.oci",
                json,
                &format!("is not OCI linux.resources JSON: {e}"),
            )
        })?),
    };
    Ok(SandboxSpec {
        name: s.name,
        labels: s.labels.into_iter().collect(),
        annotations: s.annotations.into_iter().collect(),
        backend,
        image: s.image,
        command: s.command,
        args: s.args,
        env: s.env.into_iter().collect(),
        working_dir: s.working_dir,
        resources: resources_from_pb(s.resources),
        ports,
        policy: s.policy,
        failure_policy: failure_policy_from_pb("spec.failurePolicy", s.failure_policy)?
            .unwrap_or_default(),
        consistency: consistency_from_pb(s.consistency)?,
        recovery_timeout_seconds: s.recovery_timeout_seconds,
        pool: s.pool,
        expire_time: s.expire_time,
        oci,
        mounts: s
            .mounts
            .into_iter()
            .map(|m| Mount {
                guest: m.guest,
                host: m.host,
                read_only: m.read_only,
            })
            .collect(),
        timeout_seconds: s.timeout_seconds,
        stop_grace_period_seconds: s.stop_grace_period_seconds,
        hostname: s.hostname,
        user: s.user,
        read_only_rootfs: s.read_only_rootfs,
        deny_syscalls: s.deny_syscalls,
        reset_revision: s.reset_revision,
    })
}

pub fn resource_info_to_pb(r: &ResourceInfo) -> v1::ResourceInfo {
    v1::ResourceInfo {
        cpu_limit: r.cpu_limit,
        cpu_request: r.cpu_request,
        memory_limit: r.memory_limit,
        memory_request: r.memory_request,
        pid_limit: r.pid_limit,
        storage_limit: r.storage_limit,
        network_bandwidth: r.network_bandwidth,
    }
}

pub fn resource_info_from_pb(r: &v1::ResourceInfo) -> ResourceInfo {
    ResourceInfo {
        cpu_limit: r.cpu_limit,
        cpu_request: r.cpu_request,
        memory_limit: r.memory_limit,
        memory_request: r.memory_request,
        pid_limit: r.pid_limit,
        storage_limit: r.storage_limit,
        network_bandwidth: r.network_bandwidth,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_the_wire() {
        let mut spec = SandboxSpec {
            name: "web-1".into(),
            ..Default::default()
        };
        spec.labels.insert("app".into(), "web".into());
        spec.annotations
            .insert("resources.limits.cpu".into(), "2".into());
        spec.backend = BackendKind::Slot;
        spec.command = vec!["/bin/sh".into(), "-c".into()];
        spec.env.insert("A".into(), "b".into());
        spec.resources.limits.memory = Some("1Gi".into());
        spec.ports.push(PortSpec {
            container_port: 80,
            protocol: Protocol::Udp,
            host_port: Some(8080),
            host_ip: None,
        });
        spec.ports.push(PortSpec {
            container_port: 81,
            protocol: Protocol::Tcp,
            host_port: Some(8081),
            host_ip: Some("::1".parse().unwrap()),
        });
        spec.failure_policy = FailurePolicy::AutoRecreate;
        spec.consistency = Some(Consistency::Strong);
        spec.recovery_timeout_seconds = Some(3.0);
        spec.expire_time = Some(1_900_000_000);
        spec.mounts.push(Mount {
            guest: "/data".into(),
            host: "/srv".into(),
            read_only: true,
        });
        spec.timeout_seconds = Some(1.5);
        spec.stop_grace_period_seconds = Some(2.5);
        spec.hostname = Some("box".into());
        spec.user = Some("1000:100".into());
        spec.read_only_rootfs = true;
        spec.deny_syscalls = vec!["mkdir".into()];
        let back = spec_from_pb(spec_to_pb(&spec)).expect("converts back");
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_backend_names_the_field_and_value() {
        let pb = v1::SandboxSpec {
            name: "x".into(),
            backend: "xen".into(),
            ..Default::default()
        };
        let e = spec_from_pb(pb).expect_err("xen is not a backend");
        assert_eq!(e.field, "spec.backend");
        assert!(e.to_string().contains("\"xen\""), "{e}");
    }

    #[test]
    fn out_of_range_port_and_enum_are_refused() {
        let pb = v1::SandboxSpec {
            name: "x".into(),
            ports: vec![v1::Port {
                container_port: 70000,
                protocol: 0,
                host_port: None,
                host_ip: None,
            }],
            ..Default::default()
        };
        let e = spec_from_pb(pb).expect_err("70000 is not a port");
        assert_eq!(e.field, "spec.ports[0].containerPort");
        let pb = v1::SandboxSpec {
            name: "x".into(),
            failure_policy: 9,
            ..Default::default()
        };
        assert_eq!(spec_from_pb(pb).expect_err("9").field, "spec.failurePolicy");
        let pb = v1::SandboxSpec {
            name: "x".into(),
            ports: vec![v1::Port {
                container_port: 80,
                protocol: 0,
                host_port: Some(8080),
                host_ip: Some("localhost".into()),
            }],
            ..Default::default()
        };
        assert_eq!(
            spec_from_pb(pb).expect_err("not an address").to_string(),
            r#"spec.ports[0].hostIP: "localhost" is not an IP address"#
        );
    }

    #[test]
    fn bad_oci_json_is_refused() {
        let pb = v1::SandboxSpec {
            name: "x".into(),
            oci_linux_resources_json: Some("{\"memory\": 5}".into()),
            ..Default::default()
        };
        assert_eq!(spec_from_pb(pb).expect_err("bad json").field, "spec.oci");
    }
}
