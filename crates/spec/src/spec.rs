//! [`SandboxSpec`], what a user or a caller such as containerd asks for, and its validation.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::resources::{ResourceInfo, ResourceRequirements, extract_resources_into};

/// Longest sandbox, pool or policy name; containerd IDs and cgroup paths must hold it.
pub const MAX_NAME_LEN: usize = 128;
/// The longest grace period between SIGTERM and SIGKILL, in seconds (an hour): a sandbox's
/// own setting or one given to stop, delete or restart.
pub const MAX_GRACE_SECONDS: u32 = 3600;
/// Longest annotation key, and total annotation size, as in Kubernetes.
const MAX_ANNOTATION_KEY_LEN: usize = 253;
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Generates the string forms shared by the plain enums below.
macro_rules! string_enum {
    ($ty:ident, $field:literal, $what:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The canonical name, as serialized.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }

            fn parse_error(value: &str) -> SpecError {
                let valid: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                let reason = format!(concat!("is not a ", $what, " (expected one of: {})"), valid.join(", "));
                SpecError::invalid($field, value, reason)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Which isolation runs the sandbox.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Accounting only: tracks resources, runs nothing.
    #[default]
    Slot,
    /// A container: namespaces, cgroups, seccomp.
    Linux,
    /// A WebAssembly module in wasmtime.
    Wasm,
    /// A microVM.
    Vm,
}
string_enum!(BackendKind, "backend", "backend", [Slot => "slot", Linux => "linux", Wasm => "wasm", Vm => "vm"]);

impl FromStr for BackendKind {
    type Err = SpecError;
    /// Case-insensitive: "slot", "Linux", "VM".
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == lower)
            .ok_or_else(|| Self::parse_error(s))
    }
}

/// What happens when a sandbox fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum FailurePolicy {
    /// Leave it Failed for a human to look at.
    #[default]
    Manual,
    /// Create it again, on any node with room.
    AutoRecreate,
}
string_enum!(FailurePolicy, "failurePolicy", "failure policy", [Manual => "Manual", AutoRecreate => "AutoRecreate"]);

impl FromStr for FailurePolicy {
    type Err = SpecError;
    /// Accepts "Manual", "manual", "AutoRecreate", "auto-recreate", "auto_recreate", "autorecreate".
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let folded: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        match folded.as_str() {
            "manual" => Ok(FailurePolicy::Manual),
            "autorecreate" => Ok(FailurePolicy::AutoRecreate),
            _ => Err(Self::parse_error(s)),
        }
    }
}

/// When a create is acknowledged: before (Fast) or after (Strong) the record is persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    #[default]
    Fast,
    Strong,
}
string_enum!(Consistency, "consistency", "consistency", [Fast => "fast", Strong => "strong"]);

impl FromStr for Consistency {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == lower)
            .ok_or_else(|| Self::parse_error(s))
    }
}

/// A port's transport protocol; Kubernetes' upper-case spelling is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    #[serde(alias = "TCP")]
    Tcp,
    #[serde(alias = "UDP")]
    Udp,
}
string_enum!(Protocol, "protocol", "protocol", [Tcp => "tcp", Udp => "udp"]);

impl FromStr for Protocol {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == lower)
            .ok_or_else(|| Self::parse_error(s))
    }
}

/// A port the sandbox listens on, optionally published on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// The node's address the port is published on (Kubernetes' `hostIP`); without it, every
    /// address, IPv4 and IPv6, as `docker run -p` does. Needs a `hostPort`.
    #[serde(
        rename = "hostIP",
        alias = "hostIp",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub host_ip: Option<std::net::IpAddr>,
}

impl FromStr for PortSpec {
    type Err = SpecError;
    /// The CLI's `-p` forms, docker style: "8080", "80:8080" (host:container), "8080/udp",
    /// "80:8080/tcp", and with the node's address first: "127.0.0.1:80:8080",
    /// "[::1]:80:8080".
    fn from_str(s: &str) -> Result<Self, SpecError> {
        const FORMS: &str = r#"(expected "8080", "80:8080" as host:container, "127.0.0.1:80:8080" or "[::1]:80:8080", each with an optional "/udp")"#;
        let bad = |what: &str| SpecError::invalid("port", s, format!("{what} {FORMS}"));
        let (ports, protocol) = match s.split_once('/') {
            Some((ports, proto)) => (
                ports,
                proto.parse().map_err(|e: SpecError| e.in_field("port"))?,
            ),
            None => (s, Protocol::Tcp),
        };
        let port = |p: &str| -> Result<u16, SpecError> {
            match p.parse::<u16>() {
                // `-p 70000` is not a port; in `-p 8080:70000` one part is not.
                Ok(0) | Err(_) if p == s => Err(bad("is not a port (1-65535)")),
                Ok(0) | Err(_) => Err(bad(&format!("has {p:?}, which is not a port (1-65535)"))),
                Ok(port) => Ok(port),
            }
        };
        let address = |a: &str| -> Result<std::net::IpAddr, SpecError> {
            a.parse()
                .map_err(|_| bad(&format!("has {a:?}, which is not an IP address")))
        };
        // "[v6]:host:container": the brackets keep the address's colons apart.
        let (host_ip, ports) = match ports.strip_prefix('[') {
            Some(rest) => {
                let (ip, rest) = rest
                    .split_once(']')
                    .ok_or_else(|| bad("opens a \"[\" it never closes"))?;
                let ports = rest
                    .strip_prefix(':')
                    .ok_or_else(|| bad("needs \":HOST:CONTAINER\" after the address"))?;
                (Some(address(ip)?), ports)
            }
            None => (None, ports),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host_port, container_port) = match (host_ip, parts.as_slice()) {
            (None, [container]) => (None, None, port(container)?),
            (ip, [host, container]) => (ip, Some(port(host)?), port(container)?),
            (None, [ip, host, container]) => {
                (Some(address(ip)?), Some(port(host)?), port(container)?)
            }
            (Some(_), [_]) => return Err(bad("needs \":HOST:CONTAINER\" after the address")),
            _ => return Err(bad("has too many parts (an IPv6 address goes in brackets)")),
        };
        Ok(PortSpec {
            container_port,
            protocol,
            host_port,
            host_ip,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(std::net::IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        if let Some(host) = self.host_port {
            write!(f, "{host}:")?;
        }
        write!(f, "{}/{}", self.container_port, self.protocol)
    }
}

/// Everything needed to create a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form; the `resources.*` keys (see [`crate::ANNOTATION_CPU_LIMIT`] and friends) take
    /// precedence over everything else.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub backend: BackendKind,
    /// Container image, Wasm module, or VM image, depending on the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "ResourceRequirements::is_empty")]
    pub resources: ResourceRequirements,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Name of a policy; resolved elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// When the create is acknowledged; `None`: the server's default (`warren server
    /// --consistency`, fast unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// With `failurePolicy: AutoRecreate`: how long to wait for the agent of a Lost sandbox
    /// to come back before re-creating it on another agent (0, the default: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_timeout_seconds: Option<f64>,
    /// Pre-warmed pool to take the sandbox from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// When the sandbox is deleted, in unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<i64>,
    /// OCI `linux.resources` from a caller such as containerd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<LinuxResources>,
    /// Host directories made visible inside the sandbox; nothing else of the host is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Longest the workload may run, in seconds; it is stopped with status `Timeout` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// Seconds between the stop signal (SIGTERM) and SIGKILL; the server's default (10 s)
    /// when unset. A delete request's own grace period wins over this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period_seconds: Option<f64>,
    /// The sandbox's hostname (linux, vm); its name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `UID[:GID]` the workload runs as (numbers); the image's user, else root, when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Mounts the root filesystem read-only (linux).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only_rootfs: bool,
    /// Syscalls denied (EPERM) on top of the backend's default seccomp profile (linux).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_syscalls: Vec<String>,
    /// An opaque token (seed 004's `resetRevision`): an update that changes it re-creates the
    /// sandbox — its workload starts again from scratch, under a new uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_revision: Option<String>,
}

/// A host directory mapped into a sandbox: `GUEST::HOST` or `GUEST::HOST:ro` on the command
/// line (the wasmtime `--mapdir` form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// Path inside the sandbox.
    pub guest: String,
    /// Host directory.
    pub host: String,
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for Mount {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = |reason: &str| SpecError::invalid("mount", s, reason);
        let (guest, rest) = s
            .split_once("::")
            .ok_or_else(|| bad("is not GUEST::HOST or GUEST::HOST:ro"))?;
        let (host, read_only) = match rest.strip_suffix(":ro") {
            Some(h) => (h, true),
            None => (rest.strip_suffix(":rw").unwrap_or(rest), false),
        };
        let mount = Mount {
            guest: guest.to_string(),
            host: host.to_string(),
            read_only,
        };
        match mount.problem() {
            Some((part, reason)) => Err(bad(&format!("has a {part} path that {reason}"))),
            None => Ok(mount),
        }
    }
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}::{}{}",
            self.guest,
            self.host,
            if self.read_only { ":ro" } else { "" }
        )
    }
}

impl Mount {
    /// The first bad part (`guest` or `host`) and what is wrong with it.
    fn problem(&self) -> Option<(&'static str, &'static str)> {
        for (part, path) in [("guest", &self.guest), ("host", &self.host)] {
            if !path.starts_with('/') {
                return Some((part, "is not absolute"));
            }
            if path.split('/').any(|c| c == "..") || path.contains('\0') {
                return Some((part, "contains '..' or NUL"));
            }
        }
        None
    }

    fn validate(&self, field: &str) -> Result<(), SpecError> {
        match self.problem() {
            Some((part, reason)) => {
                let path = if part == "guest" {
                    &self.guest
                } else {
                    &self.host
                };
                Err(SpecError::invalid(format!("{field}.{part}"), path, reason))
            }
            None => Ok(()),
        }
    }
}

impl SandboxSpec {
    /// The hostname the workload sees: `hostname`, else the name made a valid one
    /// (characters other than ASCII letters and digits become `-`, at most 63, no trailing
    /// `-`; `sandbox` if nothing is left).
    pub fn hostname_or_default(&self) -> String {
        if let Some(h) = &self.hostname {
            return h.clone();
        }
        let mut h: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(63)
            .collect();
        while h.ends_with('-') {
            h.pop();
        }
        if h.is_empty() {
            "sandbox".to_string()
        } else {
            h
        }
    }

    /// Validates every field and returns the extracted resources (annotations > oci >
    /// resources). On failure, returns the first error; see [`SandboxSpec::validate_all`].
    pub fn validate(&self) -> Result<ResourceInfo, SpecError> {
        let mut errors = Vec::new();
        let info = self.validate_into(&mut errors);
        match errors.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(info),
        }
    }

    /// Like [`SandboxSpec::validate`], but reports every error, in field order. The `Err`
    /// vector is never empty.
    pub fn validate_all(&self) -> Result<ResourceInfo, Vec<SpecError>> {
        let mut errors = Vec::new();
        let info = self.validate_into(&mut errors);
        if errors.is_empty() {
            Ok(info)
        } else {
            Err(errors)
        }
    }

    fn validate_into(&self, errors: &mut Vec<SpecError>) -> ResourceInfo {
        let mut check = |r: Result<(), SpecError>| {
            if let Err(e) = r {
                errors.push(e);
            }
        };
        check(validate_name("spec.name", &self.name));
        for (key, value) in &self.labels {
            check(validate_label_key(key));
            check(validate_label_value(
                &format!("spec.labels[{key:?}]"),
                value,
            ));
        }
        check(validate_annotations(&self.annotations));
        if let Some(image) = &self.image {
            check(validate_image(image));
        }
        for (i, arg) in self.command.iter().enumerate() {
            check(no_nul(&format!("spec.command[{i}]"), arg));
        }
        for (i, arg) in self.args.iter().enumerate() {
            check(no_nul(&format!("spec.args[{i}]"), arg));
        }
        for (key, value) in &self.env {
            check(validate_env(key, value));
        }
        if let Some(dir) = &self.working_dir {
            check(validate_working_dir(dir));
        }
        validate_ports(&self.ports, errors);
        if let Some(policy) = &self.policy {
            errors.extend(validate_name("spec.policy", policy).err());
        }
        if let Some(pool) = &self.pool {
            errors.extend(validate_name("spec.pool", pool).err());
        }
        if let Some(t) = self.expire_time
            && t < 0
        {
            errors.push(SpecError::invalid(
                "spec.expireTime",
                &t.to_string(),
                "must not be negative",
            ));
        }
        let mut guests = std::collections::BTreeSet::new();
        for (i, m) in self.mounts.iter().enumerate() {
            let field = format!("spec.mounts[{i}]");
            errors.extend(m.validate(&field).err());
            // `/data/` and `/data//` are `/data` too.
            if !guests.insert(crate::policy::normalized(&m.guest)) {
                errors.push(SpecError::invalid(
                    format!("{field}.guest"),
                    &m.guest,
                    "is mounted twice",
                ));
            }
        }
        if let Some(t) = self.timeout_seconds
            && !(t > 0.0 && t <= 366.0 * 86400.0)
        {
            errors.push(SpecError::invalid(
                "spec.timeoutSeconds",
                &t.to_string(),
                "must be more than 0 and at most a year",
            ));
        }
        if let Some(t) = self.recovery_timeout_seconds
            && !(t.is_finite() && (0.0..=86400.0).contains(&t))
        {
            errors.push(SpecError::invalid(
                "spec.recoveryTimeoutSeconds",
                &t.to_string(),
                "must be from 0 to 86400",
            ));
        }
        if let Some(t) = self.stop_grace_period_seconds
            && !(t.is_finite() && (0.0..=f64::from(MAX_GRACE_SECONDS)).contains(&t))
        {
            errors.push(SpecError::invalid(
                "spec.stopGracePeriodSeconds",
                &t.to_string(),
                format!("must be from 0 to {MAX_GRACE_SECONDS}"),
            ));
        }
        if let Some(h) = &self.hostname {
            errors.extend(validate_hostname(h).err());
        }
        if let Some(u) = &self.user {
            errors.extend(parse_user(u).err());
        }
        for (i, name) in self.deny_syscalls.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                errors.push(SpecError::invalid(
                    format!("spec.denySyscalls[{i}]"),
                    name,
                    "is not a syscall name (lowercase letters, digits and '_')",
                ));
            }
        }
        extract_resources_into(
            &self.annotations,
            self.oci.as_ref(),
            &self.resources,
            errors,
        )
    }
}

/// Checks a hostname: 1 to 63 characters of `[A-Za-z0-9-]` per dot-separated label (RFC 1123),
/// at most 64 in all, the kernel's limit (`sethostname` refuses longer ones).
pub fn validate_hostname(h: &str) -> Result<(), SpecError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.len() > MAX_HOSTNAME_LEN {
        return Err(SpecError::invalid(
            "spec.hostname",
            h,
            format!(
                "is {} characters long; the kernel takes at most {MAX_HOSTNAME_LEN}",
                h.len()
            ),
        ));
    }
    if h.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(SpecError::invalid(
            "spec.hostname",
            h,
            "is not a hostname (dot-separated labels of 1 to 63 letters, digits and '-')",
        ))
    }
}

/// Parses an image config's `User` as [`parse_user`] does, naming the image config in its
/// errors. A user name (`nobody`) is refused: it would need the image's `/etc/passwd`; the
/// error asks for `--user`.
pub fn parse_image_user(user: &str) -> Result<(u32, u32), SpecError> {
    parse_user(user).map_err(|e| {
        let reason = match e {
            // Numeric but refused ((uid_t)-1, say): parse_user's reason.
            SpecError::Invalid { reason, .. }
                if user.bytes().all(|b| b.is_ascii_digit() || b == b':') =>
            {
                reason
            }
            _ => "is not numeric UID[:GID]; give --user".to_string(),
        };
        SpecError::invalid("image config User", user, reason)
    })
}

/// The kernel's longest hostname (`__NEW_UTS_LEN`).
const MAX_HOSTNAME_LEN: usize = 64;

/// Parses `UID[:GID]` (decimal numbers); the gid defaults to the uid. 4294967295 is refused:
/// it is `(uid_t)-1`, which `setresuid` takes as "leave unchanged", so the process would stay
/// root.
pub fn parse_user(s: &str) -> Result<(u32, u32), SpecError> {
    let bad = || SpecError::invalid("spec.user", s, "is not UID or UID:GID (decimal numbers)");
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let id = |text: &str| -> Result<u32, SpecError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match text.parse::<u32>() {
            Ok(u32::MAX) => Err(SpecError::invalid(
                "spec.user",
                s,
                "uses 4294967295, which is (uid_t)-1: the kernel takes it as \"no change\" and \
                 the process would stay root",
            )),
            Ok(id) => Ok(id),
            // Digits only, so too large.
            Err(_) => Err(SpecError::invalid(
                "spec.user",
                s,
                "has an ID above 4294967294, the largest",
            )),
        }
    };
    let uid = id(uid)?;
    let gid = match gid {
        Some(g) => id(g)?,
        None => uid,
    };
    Ok((uid, gid))
}

/// Checks a sandbox, pool or policy name: 1 to 128 characters of `[A-Za-z0-9_.-]`, starting
/// with a letter or digit, so it is a valid containerd ID and path component.
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    const RULE: &str = "(names are 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', '-', \
                        starting with a letter or digit)";
    let invalid = |what: String| SpecError::invalid(field, name, format!("{what} {RULE}"));
    if name.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "is {} characters long",
            name.chars().count()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return Err(invalid(format!("contains {bad:?}")));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid("must start with a letter or digit".into()));
    }
    Ok(())
}

/// A Kubernetes label name or value segment: up to 63 of `[A-Za-z0-9._-]`, alphanumeric at
/// both ends. Returns what is wrong.
fn label_segment_problem(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some(format!("is {} characters long (max 63)", s.len()));
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Some(format!(
            "contains {bad:?} (allowed: A-Z, a-z, 0-9, '.', '_', '-')"
        ));
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if !s.starts_with(alnum) || !s.ends_with(alnum) {
        return Some("must start and end with a letter or digit".into());
    }
    None
}

/// A DNS subdomain as Kubernetes uses for label prefixes: lower-case labels joined by dots.
fn dns_subdomain_problem(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some(format!("has a prefix of {} characters (max 253)", s.len()));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.split('.').all(label_ok) {
        None
    } else {
        Some(format!(
            "has a prefix {s:?} that is not a lower-case DNS name"
        ))
    }
}

fn validate_label_key(key: &str) -> Result<(), SpecError> {
    let problem = match key.split_once('/') {
        Some((prefix, name)) => dns_subdomain_problem(prefix)
            .or_else(|| label_segment_problem(name).map(|p| format!("has a name part that {p}"))),
        None if key.is_empty() => Some("must not be empty".into()),
        None => label_segment_problem(key),
    };
    match problem {
        Some(p) => Err(SpecError::invalid(
            "spec.labels",
            key,
            format!("is not a label key: {p}"),
        )),
        None => Ok(()),
    }
}

/// Checks a label value: empty, or up to 63 characters of `[A-Za-z0-9_.-]` starting and
/// ending with a letter or digit (Kubernetes' rule).
pub fn validate_label_value(field: &str, value: &str) -> Result<(), SpecError> {
    match value {
        "" => Ok(()),
        _ => match label_segment_problem(value) {
            Some(p) => Err(SpecError::invalid(field, value, p)),
            None => Ok(()),
        },
    }
}

fn validate_annotations(annotations: &BTreeMap<String, String>) -> Result<(), SpecError> {
    let mut total = 0;
    for (key, value) in annotations {
        if key.is_empty() || key.len() > MAX_ANNOTATION_KEY_LEN {
            let reason = format!("is not an annotation key (1 to {MAX_ANNOTATION_KEY_LEN} bytes)");
            return Err(SpecError::invalid("spec.annotations", key, reason));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            let reason = format!("is not an annotation key: it contains {c:?}");
            return Err(SpecError::invalid("spec.annotations", key, reason));
        }
        total += key.len() + value.len();
    }
    if total > MAX_ANNOTATIONS_BYTES {
        let reason = format!("is larger than the {MAX_ANNOTATIONS_BYTES} bytes allowed in total");
        return Err(SpecError::invalid(
            "spec.annotations",
            &format!("{total} bytes"),
            reason,
        ));
    }
    Ok(())
}

fn validate_image(image: &str) -> Result<(), SpecError> {
    if image.is_empty() {
        return Err(SpecError::invalid(
            "spec.image",
            image,
            "must not be empty when given",
        ));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SpecError::invalid(
            "spec.image",
            image,
            "must not contain whitespace",
        ));
    }
    Ok(())
}

/// NUL cannot cross `execve`: the string would be cut short silently.
fn no_nul(field: &str, value: &str) -> Result<(), SpecError> {
    match value.contains('\0') {
        true => Err(SpecError::invalid(
            field,
            value,
            "must not contain a NUL character",
        )),
        false => Ok(()),
    }
}

fn validate_env(key: &str, value: &str) -> Result<(), SpecError> {
    let field = format!("spec.env[{key:?}]");
    if key.is_empty() {
        return Err(SpecError::invalid(
            "spec.env",
            key,
            "is not a variable name: empty",
        ));
    }
    if key.contains(['=', '\0']) {
        return Err(SpecError::invalid(
            "spec.env",
            key,
            "is not a variable name: contains '=' or NUL",
        ));
    }
    no_nul(&field, value)
}

fn validate_working_dir(dir: &str) -> Result<(), SpecError> {
    no_nul("spec.workingDir", dir)?;
    match dir.starts_with('/') {
        true => Ok(()),
        false => Err(SpecError::invalid(
            "spec.workingDir",
            dir,
            "must be an absolute path",
        )),
    }
}

fn validate_ports(ports: &[PortSpec], errors: &mut Vec<SpecError>) {
    let mut container = HashSet::new();
    let mut host = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = |name: &str| format!("spec.ports[{i}].{name}");
        if p.container_port == 0 {
            errors.push(SpecError::invalid(
                field("containerPort"),
                "0",
                "must be 1 to 65535",
            ));
        } else if !container.insert((p.container_port, p.protocol)) {
            let reason = format!("is listed twice for {}", p.protocol);
            errors.push(SpecError::invalid(
                field("containerPort"),
                &p.container_port.to_string(),
                reason,
            ));
        }
        if let (Some(ip), None) = (p.host_ip, p.host_port) {
            errors.push(SpecError::invalid(
                field("hostIP"),
                &ip.to_string(),
                "needs a hostPort: only a published port has a node address",
            ));
        }
        match p.host_port {
            Some(0) => errors.push(SpecError::invalid(
                field("hostPort"),
                "0",
                "must be 1 to 65535",
            )),
            Some(hp) if !host.insert((hp, p.protocol)) => {
                let reason = format!("is published twice for {}", p.protocol);
                errors.push(SpecError::invalid(
                    field("hostPort"),
                    &hp.to_string(),
                    reason,
                ));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
#[path = "spec_tests.rs"]
mod tests;
