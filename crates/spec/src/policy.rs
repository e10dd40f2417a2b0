//! [`PolicySpec`], what an operator allows sandboxes to do, compiled into a [`Policy`] that
//! evaluates a [`SandboxSpec`] into a [`Decision`].
//!
//! A policy has a name and a spec of independent sections; a section that is absent does
//! not restrict anything. Compiling checks every value (globs, CIDRs, port ranges, syscall
//! names, quantities) and reports all errors at once, each naming the field and the value.
//! Evaluation ([`Policy::evaluate`], in `policy_eval.rs`) is pure and lists every
//! violation; enforcement (WASI capabilities, seccomp) reads the compiled matchers.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use globset::{GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SpecError;
use crate::quantity::{parse_bytes, parse_count, parse_cpu_millis};
use crate::resources::quantity;
use crate::spec::validate_name;

/// The policy's `spec`: what sandboxes under it may do and ask for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// `enforce` (default): a violating create or update is refused. `audit`: it is admitted
    /// and the denial recorded with the sandbox (policy simulation); capabilities are still
    /// narrowed by the backends.
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscalls: Option<SyscallPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FilesystemPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceCeilings>,
    /// Longest a sandbox may run: its `timeoutSeconds` must be set and at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<f64>,
}

/// What happens to a create or update that violates the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Audit,
}

/// Syscalls: exactly one of `allow` (only these; others fail with EPERM) or `deny`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyscallPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<SyscallEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<SyscallEntry>>,
}

/// A syscall by name (`ptrace`), or with conditions on its arguments, all of which must
/// hold for the entry to match.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SyscallEntry {
    Name(String),
    Rule(SyscallRule),
}

// By hand rather than `untagged`: a rule's own error (an unknown `op`, say) reaches the
// user, where an untagged enum only says that no variant matched.
impl<'de> Deserialize<'de> for SyscallEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = SyscallEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a syscall name, or {name, args} with conditions on its arguments")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SyscallEntry, E> {
                Ok(SyscallEntry::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SyscallEntry, A::Error> {
                SyscallRule::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(SyscallEntry::Rule)
            }
        }
        d.deserialize_any(Entry)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyscallRule {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<ArgCondition>,
}

/// `args[index] <op> value`; with `maskedEq`, `args[index] & mask == value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArgCondition {
    pub index: u8,
    pub op: ArgOp,
    pub value: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ArgOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    MaskedEq,
}

impl SyscallEntry {
    pub fn name(&self) -> &str {
        match self {
            SyscallEntry::Name(n) => n,
            SyscallEntry::Rule(r) => &r.name,
        }
    }

    pub fn args(&self) -> &[ArgCondition] {
        match self {
            SyscallEntry::Name(_) => &[],
            SyscallEntry::Rule(r) => &r.args,
        }
    }
}

/// Commands a sandbox may run: globs on `spec.command[0]` (for wasm without a command, on
/// the module, `spec.image`). `*` does not cross `/`; `**` does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecPolicy {
    pub allow: Vec<String>,
}

/// Network access.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    /// With `egress`: the destinations allowed (loopback is always allowed then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No sockets at all, and no ports.
    #[default]
    None,
    /// Loopback only; ports may be declared but not published on the node (`hostPort`).
    Loopback,
    /// Loopback and the `egress` destinations; no published ports.
    Egress,
}

/// A destination network and, optionally, its ports (`443`, `"8000-8080"`); all ports when
/// none are listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PortEntry {
    Port(u16),
    Range(String),
}

// By hand rather than `untagged`, so that a bad entry's error names its value.
impl<'de> Deserialize<'de> for PortEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl serde::de::Visitor<'_> for Entry {
            type Value = PortEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (1 to 65535) or a range \"LOW-HIGH\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortEntry, E> {
                u16::try_from(v)
                    .map(PortEntry::Port)
                    .map_err(|_| E::custom(format_args!("{v} is not a port (1 to 65535)")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortEntry, E> {
                u16::try_from(v)
                    .map(PortEntry::Port)
                    .map_err(|_| E::custom(format_args!("{v} is not a port (1 to 65535)")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortEntry, E> {
                Ok(PortEntry::Range(v.to_string()))
            }
        }
        d.deserialize_any(Entry)
    }
}

/// Paths inside the sandbox (absolute; a path covers everything below it). A mount must
/// lie under `writable` (or, when read-only, under `readOnly` or `writable`) and must not be,
/// lie under, or contain a `masked` path. `hostPaths`, when given, are the host directories
/// mounts may come from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilesystemPolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_only: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_paths: Option<Vec<String>>,
}

/// Environment variables passed to the workload: names matching one of these globs; the
/// others are dropped (not refused).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvPolicy {
    pub allow: Vec<String>,
}

/// The most a sandbox may ask for. A ceiling makes the matching limit mandatory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceCeilings {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub max_cpu: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub max_memory: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub max_pids: Option<String>,
}

/// A policy checked and compiled: its matchers are built once, when it is applied or loaded.
#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    spec: PolicySpec,
    hash: String,
    pub(crate) exec: Option<GlobSet>,
    pub(crate) env: Option<GlobSet>,
    pub(crate) egress: Vec<CompiledEgress>,
    pub(crate) max_cpu_millis: Option<u64>,
    pub(crate) max_memory: Option<u64>,
    pub(crate) max_pids: Option<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledEgress {
    pub(crate) net: IpNet,
    /// Inclusive ranges; empty: every port.
    pub(crate) ports: Vec<(u16, u16)>,
}

/// Longest `maxLifetimeSeconds`, as for `timeoutSeconds`: a year.
const MAX_LIFETIME: f64 = 366.0 * 86400.0;

impl Policy {
    /// Checks every field of `spec` and compiles it; every error names its field (as
    /// `spec.<path>`) and value.
    pub fn compile(name: &str, spec: PolicySpec) -> Result<Policy, Vec<SpecError>> {
        let mut errors = Vec::new();
        errors.extend(validate_name("metadata.name", name).err());
        if let Some(s) = &spec.syscalls {
            check_syscalls(s, &mut errors);
        }
        let exec = spec
            .exec
            .as_ref()
            .and_then(|e| globs("spec.exec.allow", &e.allow, &mut errors));
        // An entry no variable name can match is a mistake, not a rule (`A=B`, an empty one).
        for (i, pattern) in spec.env.iter().flat_map(|e| e.allow.iter()).enumerate() {
            if pattern.is_empty() || pattern.contains(['=', '\0']) {
                errors.push(SpecError::Invalid {
                    field: format!("spec.env.allow[{i}]"),
                    value: pattern.clone(),
                    reason: "is not a variable name pattern (empty, or holding '=' or NUL)".into(),
                });
            }
        }
        let env = spec
            .env
            .as_ref()
            .and_then(|e| globs("spec.env.allow", &e.allow, &mut errors));
        let egress = spec
            .network
            .as_ref()
            .map(|n| compile_network(n, &mut errors))
            .unwrap_or_default();
        if let Some(fs) = &spec.filesystem {
            check_filesystem(fs, &mut errors);
        }
        let (mut max_cpu_millis, mut max_memory, mut max_pids) = (None, None, None);
        if let Some(r) = &spec.resources {
            let field = |f: &str| format!("spec.resources.{f}");
            if let Some(v) = &r.max_cpu {
                match parse_cpu_millis(v) {
                    Ok(m) => max_cpu_millis = Some(m),
                    Err(e) => errors.push(SpecError::quantity(field("maxCpu"), e)),
                }
            }
            if let Some(v) = &r.max_memory {
                match parse_bytes(v) {
                    Ok(m) => max_memory = Some(m),
                    Err(e) => errors.push(SpecError::quantity(field("maxMemory"), e)),
                }
            }
            if let Some(v) = &r.max_pids {
                match parse_count(v) {
                    Ok(m) => max_pids = Some(m),
                    Err(e) => errors.push(SpecError::quantity(field("maxPids"), e)),
                }
            }
        }
        if let Some(t) = spec.max_lifetime_seconds
            && !(t > 0.0 && t <= MAX_LIFETIME)
        {
            errors.push(SpecError::invalid(
                "spec.maxLifetimeSeconds",
                &t.to_string(),
                "must be more than 0 and at most a year",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let hash = spec_hash(&spec);
        Ok(Policy {
            name: name.to_string(),
            spec,
            hash,
            exec,
            env,
            egress,
            max_cpu_millis,
            max_memory,
            max_pids,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// `sha256:<hex>` of the spec's JSON: equal specs have equal hashes (caches key on it).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether the workload may see the environment variable `name`.
    pub fn env_allowed(&self, name: &str) -> bool {
        self.env.as_ref().is_none_or(|g| g.is_match(name))
    }

    /// The network mode; `None` when the policy does not restrict the network.
    pub fn network_mode(&self) -> Option<NetworkMode> {
        self.spec.network.as_ref().map(|n| n.mode)
    }

    /// Whether a connection to `ip:port` is allowed. Without a network section, everything
    /// is; `none` allows nothing; `loopback` loopback only; `egress` loopback and the list.
    pub fn connect_allowed(&self, ip: IpAddr, port: u16) -> bool {
        match self.network_mode() {
            None => true,
            Some(NetworkMode::None) => false,
            Some(NetworkMode::Loopback) => ip.is_loopback(),
            Some(NetworkMode::Egress) => {
                ip.is_loopback()
                    || self.egress.iter().any(|r| {
                        r.net.contains(&ip)
                            && (r.ports.is_empty()
                                || r.ports.iter().any(|&(lo, hi)| (lo..=hi).contains(&port)))
                    })
            }
        }
    }

    /// The `egress` destinations, compiled: each network with its inclusive port ranges
    /// (empty: every port). What a backend that filters packets itself installs.
    pub fn egress_destinations(&self) -> impl Iterator<Item = (IpNet, &[(u16, u16)])> {
        self.egress.iter().map(|r| (r.net, r.ports.as_slice()))
    }

    /// How a guest path may be mounted: `None` when the policy has no filesystem section
    /// (anything goes), else `Some(access)`. The most specific entry above the path decides
    /// (a `readOnly` path below a `writable` one is read-only, a `writable` one below a
    /// `readOnly` one writable, as the linux backend mounts them); a path listed in both is
    /// read-only.
    pub fn path_access(&self, guest: &str) -> Option<PathAccess> {
        let fs = self.spec.filesystem.as_ref()?;
        let touches_mask = fs
            .masked
            .iter()
            .any(|m| path_under(guest, m) || path_under(m, guest));
        let deepest = |list: &[String]| {
            list.iter()
                .filter(|p| path_under(guest, p))
                .map(|p| components(p).len())
                .max()
        };
        Some(
            match (touches_mask, deepest(&fs.writable), deepest(&fs.read_only)) {
                (true, _, _) => PathAccess::Masked,
                (false, Some(w), Some(r)) if w > r => PathAccess::Writable,
                (false, _, Some(_)) => PathAccess::ReadOnly,
                (false, Some(_), None) => PathAccess::Writable,
                (false, None, None) => PathAccess::None,
            },
        )
    }

    /// A `readOnly` path strictly below `guest`, if there is one: a read-write mount at
    /// `guest` would make it writable where a backend cannot remount part of a mount (wasm
    /// preopens whole directories).
    pub fn read_only_below(&self, guest: &str) -> Option<&str> {
        let fs = self.spec.filesystem.as_ref()?;
        fs.read_only
            .iter()
            .find(|r| path_under(r, guest) && !path_under(guest, r))
            .map(String::as_str)
    }

    /// Whether `exec.allow` lets `program` run: true without an exec section. The path is
    /// taken lexically normalised (`/bin/../tmp/x` is `/tmp/x`); the caller resolves
    /// symlinks where the file is.
    pub fn exec_allowed(&self, program: &str) -> bool {
        self.exec
            .as_ref()
            .is_none_or(|globs| globs.is_match(normalized(program)))
    }

    /// Whether `resolved`, a program file's path with its symlinks followed on this node, is
    /// listed in `exec.allow`: true without an exec section. Each entry counts as written and
    /// with its leading literal directories as they resolve on this node (`/srv/app/**` with
    /// `/srv/app` a link to `/srv/releases/v3` lists `/srv/releases/v3/m.wasm`), as
    /// `hostPaths` entries do. Reads the file system: call it on the node.
    pub fn resolved_exec_allowed(&self, resolved: &str) -> bool {
        if self.exec_allowed(resolved) {
            return true;
        }
        let program = normalized(resolved);
        self.spec
            .exec
            .iter()
            .flat_map(|e| e.allow.iter())
            .filter_map(|pattern| resolved_glob(pattern))
            .any(|glob| glob.is_match(&program))
    }

    /// Whether a mount may come from the host directory `host`.
    pub fn host_path_allowed(&self, host: &str) -> bool {
        self.host_paths_allow(|p| path_under(host, p))
    }

    /// Whether `resolved`, a host path with its symlinks followed on this node, lies under
    /// one of `hostPaths`, each taken as written or as it resolves on this node (a `/srv`
    /// that is a link to `/var/srv`). Reads the file system: call it on the node.
    pub fn resolved_host_path_allowed(&self, resolved: &str) -> bool {
        self.host_paths_allow(|p| {
            path_under(resolved, p)
                || std::fs::canonicalize(p)
                    .is_ok_and(|c| path_under(resolved, &c.to_string_lossy()))
        })
    }

    /// Whether `hostPaths` is unset, or one of its entries passes `under`.
    fn host_paths_allow(&self, under: impl Fn(&str) -> bool) -> bool {
        match self
            .spec
            .filesystem
            .as_ref()
            .and_then(|f| f.host_paths.as_ref())
        {
            None => true,
            Some(list) => list.iter().any(|p| under(p)),
        }
    }
}

/// What the policy lets a sandbox do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// Not mapped at all: not listed, or touching a masked path.
    None,
    Masked,
    ReadOnly,
    Writable,
}

/// Whether `path` is `base` or below it, by whole components ("/data2" is not under
/// "/data"), both taken lexically as a walk without symlinks would: empty and `.` components
/// dropped, `..` going up (never above the root). `/data//secret`, `/data/./secret` and
/// `/data/x/../secret` all lie under `/data/secret`. An absolute path is never under a
/// relative one nor the other way round, except that everything lies under `/`.
pub(crate) fn path_under(path: &str, base: &str) -> bool {
    let (p, b) = (components(path), components(base));
    if b.is_empty() && base.starts_with('/') {
        return true;
    }
    path.starts_with('/') == base.starts_with('/') && p.len() >= b.len() && p[..b.len()] == b[..]
}

/// A path's components, lexically normalised (see [`path_under`]).
fn components(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `path` lexically normalised: `/a//b/./c/../d` is `/a/b/d`.
pub(crate) fn normalized(path: &str) -> String {
    let joined = components(path).join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

fn spec_hash(spec: &PolicySpec) -> String {
    // Serializing plain structs, strings and numbers cannot fail; an empty input would only
    // make every such policy share a hash.
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let digest = Sha256::digest(&json);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// `pattern`, an `exec.allow` glob, with the literal directories before its first glob
/// character resolved on this node (escaped: a resolved name is never a pattern); `None`
/// when they resolve to themselves, do not exist, or the pattern is not absolute.
fn resolved_glob(pattern: &str) -> Option<globset::GlobMatcher> {
    if !pattern.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = pattern.split('/').collect();
    // A pattern without glob characters names one file: its directory resolves.
    let first_glob = parts
        .iter()
        .position(|c| c.contains(['*', '?', '[', '{', '\\']))
        .unwrap_or(parts.len() - 1);
    let literal = parts[..first_glob].join("/");
    let literal = if literal.is_empty() {
        "/".to_string()
    } else {
        literal
    };
    // Followed only through directories nobody but root can change: a link swapped in by
    // whoever may write one of them must not widen the list (`/srv/shared/mods` made a
    // link to `/` would make `/srv/shared/mods/**` everything). `..` is never walked.
    if parts[..first_glob].contains(&"..") || !trusted_path(std::path::Path::new(&literal)) {
        return None;
    }
    let resolved = std::fs::canonicalize(&literal).ok()?;
    let resolved = resolved.to_str()?;
    if normalized(resolved) == normalized(&literal) {
        return None;
    }
    let rest = parts[first_glob..].join("/");
    let glob = format!("{}/{rest}", globset::escape(resolved.trim_end_matches('/')));
    globset::GlobBuilder::new(&glob)
        .literal_separator(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

/// Whether every directory on the way to `path` (its symlinks followed) is root's and
/// writable by nobody else, or sticky (`/tmp`) with root's entry in it: what only root can
/// change.
fn trusted_path(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let mut at = std::path::PathBuf::from("/");
    for part in path.components().skip(1) {
        let Ok(dir) = std::fs::metadata(&at) else {
            return false;
        };
        at.push(part);
        let Ok(entry) = std::fs::symlink_metadata(&at) else {
            return false;
        };
        let others_write = dir.mode() & 0o022 != 0;
        let sticky = dir.mode() & 0o1000 != 0;
        if dir.uid() != 0 || (others_write && !(sticky && entry.uid() == 0)) {
            return false;
        }
    }
    true
}

fn globs(field: &str, patterns: &[String], errors: &mut Vec<SpecError>) -> Option<GlobSet> {
    let mut builder = GlobSetBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        match globset::GlobBuilder::new(p).literal_separator(true).build() {
            Ok(g) => {
                builder.add(g);
            }
            Err(e) => errors.push(SpecError::invalid(
                format!("{field}[{i}]"),
                p,
                format!("is not a glob: {}", e.kind()),
            )),
        }
    }
    match builder.build() {
        Ok(set) => Some(set),
        Err(e) => {
            errors.push(SpecError::invalid(
                field,
                "",
                format!("cannot be compiled: {e}"),
            ));
            None
        }
    }
}

/// A list of globs compiled once and matched as the exec and env rules match them (`*` does
/// not cross `/`, `**` does): what a backend that enforces `exec.allow` itself matches with.
#[derive(Debug, Clone)]
pub struct GlobList(GlobSet);

impl GlobList {
    /// Compiles `patterns`; each error names `field[i]` and the pattern.
    pub fn new(field: &str, patterns: &[String]) -> Result<GlobList, Vec<SpecError>> {
        let mut errors = Vec::new();
        match globs(field, patterns, &mut errors) {
            Some(set) if errors.is_empty() => Ok(GlobList(set)),
            _ => Err(errors),
        }
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }
}

/// A glob as the exec and env rules match them (exposed for tests and docs).
pub fn glob_matches(pattern: &str, value: &str) -> Result<bool, SpecError> {
    let glob = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| SpecError::invalid("glob", pattern, format!("is not a glob: {}", e.kind())))?;
    Ok(glob.compile_matcher().is_match(value))
}

fn syscall_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_syscalls(s: &SyscallPolicy, errors: &mut Vec<SpecError>) {
    let (key, list) = match (&s.allow, &s.deny) {
        (Some(a), None) => ("allow", a),
        (None, Some(d)) => ("deny", d),
        (Some(_), Some(_)) => {
            errors.push(SpecError::invalid(
                "spec.syscalls",
                "allow and deny",
                "gives both; give one (an allow-list or a deny-list)",
            ));
            return;
        }
        (None, None) => {
            errors.push(SpecError::invalid(
                "spec.syscalls",
                "",
                "gives neither allow nor deny",
            ));
            return;
        }
    };
    let mut seen = BTreeSet::new();
    for (i, entry) in list.iter().enumerate() {
        let field = format!("spec.syscalls.{key}[{i}]");
        let name = entry.name();
        if !syscall_name_ok(name) {
            errors.push(SpecError::invalid(
                format!("{field}.name"),
                name,
                "is not a syscall name (lowercase letters, digits and '_')",
            ));
        } else if entry.args().is_empty() && !seen.insert(name.to_string()) {
            errors.push(SpecError::invalid(
                format!("{field}.name"),
                name,
                "is listed twice",
            ));
        }
        for (j, a) in entry.args().iter().enumerate() {
            let afield = format!("{field}.args[{j}]");
            if a.index > 5 {
                errors.push(SpecError::invalid(
                    format!("{afield}.index"),
                    &a.index.to_string(),
                    "is not an argument index (0 to 5)",
                ));
            }
            match (a.op, a.mask) {
                (ArgOp::MaskedEq, None) => errors.push(SpecError::invalid(
                    format!("{afield}.mask"),
                    "",
                    "is required with op maskedEq",
                )),
                (op, Some(m)) if op != ArgOp::MaskedEq => errors.push(SpecError::invalid(
                    format!("{afield}.mask"),
                    &m.to_string(),
                    "is only allowed with op maskedEq",
                )),
                _ => {}
            }
        }
    }
}

fn compile_network(n: &NetworkPolicy, errors: &mut Vec<SpecError>) -> Vec<CompiledEgress> {
    if n.mode != NetworkMode::Egress && !n.egress.is_empty() {
        errors.push(SpecError::invalid(
            "spec.network.egress",
            &format!("{} rules", n.egress.len()),
            format!("is only allowed with mode egress, not {}", n.mode.as_str()),
        ));
    }
    let mut out = Vec::new();
    for (i, rule) in n.egress.iter().enumerate() {
        let field = format!("spec.network.egress[{i}]");
        let net = match parse_cidr(&rule.cidr) {
            Ok(net) => Some(net),
            Err(reason) => {
                errors.push(SpecError::invalid(
                    format!("{field}.cidr"),
                    &rule.cidr,
                    reason,
                ));
                None
            }
        };
        let mut ports = Vec::new();
        for (j, p) in rule.ports.iter().enumerate() {
            match parse_port_entry(p) {
                Ok(range) => ports.push(range),
                Err((value, reason)) => errors.push(SpecError::invalid(
                    format!("{field}.ports[{j}]"),
                    &value,
                    reason,
                )),
            }
        }
        if let Some(net) = net {
            out.push(CompiledEgress { net, ports });
        }
    }
    out
}

/// "10.0.0.0/8", "fd00::/8", or a bare address (one host). Host bits must be zero.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    const EXPECTED: &str = r#"(expected e.g. "10.0.0.0/8", "192.0.2.7" or "fd00::/8")"#;
    if !s.contains('/') {
        return s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("is not a CIDR {EXPECTED}"));
    }
    let net: IpNet = s.parse().map_err(|_| format!("is not a CIDR {EXPECTED}"))?;
    if net.trunc() != net {
        return Err(format!(
            "has host bits set (the network is {})",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_port_entry(p: &PortEntry) -> Result<(u16, u16), (String, String)> {
    const EXPECTED: &str = r#"is not a port or range (expected e.g. 443 or "8000-8080")"#;
    match p {
        PortEntry::Port(0) => Err(("0".into(), "is not a port (1 to 65535)".into())),
        PortEntry::Port(n) => Ok((*n, *n)),
        PortEntry::Range(s) => {
            let bad = || (s.clone(), EXPECTED.to_string());
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (s.trim(), s.trim()),
            };
            let lo: u16 = lo.parse().map_err(|_| bad())?;
            let hi: u16 = hi.parse().map_err(|_| bad())?;
            if lo == 0 || lo > hi {
                return Err((
                    s.clone(),
                    "is not a range of ports from 1 to 65535, low to high".into(),
                ));
            }
            Ok((lo, hi))
        }
    }
}

fn check_filesystem(fs: &FilesystemPolicy, errors: &mut Vec<SpecError>) {
    let lists: [(&str, &[String]); 4] = [
        ("readOnly", &fs.read_only),
        ("writable", &fs.writable),
        ("masked", &fs.masked),
        ("hostPaths", fs.host_paths.as_deref().unwrap_or_default()),
    ];
    for (key, list) in lists {
        for (i, p) in list.iter().enumerate() {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p.contains('\0') {
                errors.push(SpecError::invalid(
                    format!("spec.filesystem.{key}[{i}]"),
                    p,
                    "is not an absolute path without '..'",
                ));
            }
        }
    }
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Loopback => "loopback",
            NetworkMode::Egress => "egress",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
