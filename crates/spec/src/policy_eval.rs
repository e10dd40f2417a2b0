//! Evaluation of a [`SandboxSpec`] against a [`Policy`]: every violation, each naming the
//! spec field, its value and the policy rule it breaks.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::policy::{NetworkMode, PathAccess, Policy, PolicyMode, normalized, path_under};
use crate::quantity::{format_bytes, format_cpu};
use crate::resources::ResourceInfo;
use crate::spec::{BackendKind, SandboxSpec};

/// Shown as the value of a field the spec leaves unset.
pub const UNSET: &str = "<unset>";

/// One way a spec breaks a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The spec field, e.g. `spec.resources.limits.memory`.
    pub field: String,
    /// Its value, or `<unset>`.
    pub value: String,
    /// The policy rule and what it allows, e.g. `resources.maxMemory (at most "1Gi")`.
    pub rule: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?} violates {}", self.field, self.value, self.rule)
    }
}

/// The outcome of evaluating one spec against one policy; recorded with the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub policy: String,
    /// The policy's [`Policy::hash`] when it was evaluated.
    pub hash: String,
    pub mode: PolicyMode,
    /// No violations.
    pub admitted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
    /// Environment variables the workload will not see (`env.allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filtered_env: Vec<String>,
}

impl Decision {
    /// Whether the sandbox may be created: admitted, or the policy only audits.
    pub fn allows(&self) -> bool {
        self.admitted || self.mode == PolicyMode::Audit
    }

    /// "admitted", "denied" or "denied (audit)".
    pub fn verdict(&self) -> &'static str {
        match (self.admitted, self.mode) {
            (true, _) => "admitted",
            (false, PolicyMode::Enforce) => "denied",
            (false, PolicyMode::Audit) => "denied (audit)",
        }
    }
}

struct Out(Vec<Violation>);

impl Out {
    fn push(
        &mut self,
        field: impl Into<String>,
        value: impl Into<String>,
        rule: impl Into<String>,
    ) {
        self.0.push(Violation {
            field: field.into(),
            value: value.into(),
            rule: rule.into(),
        });
    }
}

fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

impl Policy {
    /// Every violation of this policy by `spec`, whose resources were extracted as
    /// `resources` ([`SandboxSpec::validate`]).
    pub fn evaluate(&self, spec: &SandboxSpec, resources: &ResourceInfo) -> Decision {
        let mut out = Out(Vec::new());
        self.check_exec(spec, &mut out);
        self.check_network(spec, &mut out);
        self.check_filesystem(spec, &mut out);
        self.check_resources(resources, &mut out);
        if let Some(max) = self.spec().max_lifetime_seconds {
            let rule = format!("maxLifetimeSeconds (timeoutSeconds of at most {max} is required)");
            match spec.timeout_seconds {
                None => out.push("spec.timeoutSeconds", UNSET, rule),
                Some(t) if t > max => out.push("spec.timeoutSeconds", t.to_string(), rule),
                Some(_) => {}
            }
        }
        let filtered_env = spec
            .env
            .keys()
            .filter(|k| !self.env_allowed(k))
            .cloned()
            .collect();
        Decision {
            policy: self.name().to_string(),
            hash: self.hash().to_string(),
            mode: self.spec().mode,
            admitted: out.0.is_empty(),
            violations: out.0,
            filtered_env,
        }
    }

    fn check_exec(&self, spec: &SandboxSpec, out: &mut Out) {
        let (Some(globs), Some(exec)) = (&self.exec, &self.spec().exec) else {
            return;
        };
        let rule = format!("exec.allow (one of {})", quoted_list(&exec.allow));
        match (spec.command.first(), spec.backend) {
            // What a wasm sandbox runs is its module; its command is only the argv the
            // module sees. The module's path is matched as it reads without `..` (the node
            // checks where its symlinks lead).
            (_, BackendKind::Wasm) => match &spec.image {
                Some(image) if globs.is_match(normalized(image)) => {}
                Some(image) => out.push("spec.image", image.as_str(), rule),
                None => out.push("spec.image", UNSET, rule),
            },
            // Matched as it reads without `..` (`/usr/bin/../../tmp/x` is `/tmp/x`): the vm
            // backend has no exec gate on the node, admission is its only check.
            (Some(cmd), _) => {
                if !globs.is_match(normalized(cmd)) {
                    out.push("spec.command[0]", cmd.as_str(), rule);
                }
            }
            (None, BackendKind::Slot) => {}
            (None, BackendKind::Linux | BackendKind::Vm) => out.push(
                "spec.command",
                UNSET,
                format!("{rule}: the image's own command cannot be checked; name the command"),
            ),
        }
    }

    fn check_network(&self, spec: &SandboxSpec, out: &mut Out) {
        let Some(mode) = self.network_mode() else {
            return;
        };
        for (i, p) in spec.ports.iter().enumerate() {
            match (mode, p.host_port) {
                (NetworkMode::None, _) => out.push(
                    format!("spec.ports[{i}].containerPort"),
                    p.container_port.to_string(),
                    "network.mode none (no ports)",
                ),
                (_, Some(host)) => out.push(
                    format!("spec.ports[{i}].hostPort"),
                    host.to_string(),
                    format!("network.mode {mode} (the policy publishes nothing on the node)"),
                ),
                (_, None) => {}
            }
        }
    }

    fn check_filesystem(&self, spec: &SandboxSpec, out: &mut Out) {
        let Some(fs) = &self.spec().filesystem else {
            return;
        };
        // A root filesystem given as a host path is a host path the sandbox gets, read-write.
        if let Some(root) = spec.image.as_deref().filter(|i| i.starts_with('/'))
            && !self.host_path_allowed(root)
        {
            let allowed = fs.host_paths.as_deref().unwrap_or_default();
            out.push(
                "spec.image".to_string(),
                root,
                format!(
                    "filesystem.hostPaths (a root filesystem path must be under one of {})",
                    quoted_list(allowed)
                ),
            );
        }
        for (i, m) in spec.mounts.iter().enumerate() {
            let field = |f: &str| format!("spec.mounts[{i}].{f}");
            if !self.host_path_allowed(&m.host) {
                let allowed = fs.host_paths.as_deref().unwrap_or_default();
                out.push(
                    field("host"),
                    m.host.as_str(),
                    format!(
                        "filesystem.hostPaths (under one of {})",
                        quoted_list(allowed)
                    ),
                );
            }
            // wasm preopens whole directories: a read-write one must not hold a path the
            // policy keeps read-only (linux remounts that path read-only inside the mount).
            if spec.backend == BackendKind::Wasm
                && !m.read_only
                && let Some(inner) = self.read_only_below(&m.guest)
            {
                out.push(
                    field("readOnly"),
                    "false",
                    format!(
                        "filesystem.readOnly ({inner:?} lies inside {:?}: mount it read-only)",
                        m.guest
                    ),
                );
            }
            match self.path_access(&m.guest) {
                None | Some(PathAccess::Writable) => {}
                Some(PathAccess::ReadOnly) if m.read_only => {}
                Some(PathAccess::ReadOnly) => out.push(
                    field("readOnly"),
                    "false",
                    format!(
                        "filesystem.readOnly ({:?} must be mounted read-only)",
                        m.guest
                    ),
                ),
                Some(PathAccess::Masked) => out.push(
                    field("guest"),
                    m.guest.as_str(),
                    format!(
                        "filesystem.masked (must not be, lie under or contain one of {})",
                        quoted_list(&fs.masked)
                    ),
                ),
                Some(PathAccess::None) => out.push(
                    field("guest"),
                    m.guest.as_str(),
                    format!(
                        "filesystem (not under writable {} or readOnly {})",
                        quoted_list(&fs.writable),
                        quoted_list(&fs.read_only)
                    ),
                ),
            }
        }
        if let Some(dir) = &spec.working_dir
            && fs.masked.iter().any(|m| path_under(dir, m))
        {
            out.push(
                "spec.workingDir",
                dir.as_str(),
                format!("filesystem.masked (one of {})", quoted_list(&fs.masked)),
            );
        }
    }

    fn check_resources(&self, r: &ResourceInfo, out: &mut Out) {
        let Some(ceil) = &self.spec().resources else {
            return;
        };
        let rule = |key: &str, max: &Option<String>| {
            format!(
                "resources.{key} (a limit of at most {:?} is required)",
                max.as_deref().unwrap_or_default()
            )
        };
        if let Some(max) = self.max_cpu_millis {
            let rule = rule("maxCpu", &ceil.max_cpu);
            match r.cpu_limit {
                None => out.push("spec.resources.limits.cpu", UNSET, rule),
                // Millicores, rounded as the quantity was: 0.5 cores is 500.
                Some(c) if (c * 1000.0).round() > max as f64 => {
                    out.push("spec.resources.limits.cpu", format_cpu(c), rule)
                }
                Some(_) => {}
            }
        }
        if let Some(max) = self.max_memory {
            let rule = rule("maxMemory", &ceil.max_memory);
            match r.memory_limit {
                None => out.push("spec.resources.limits.memory", UNSET, rule),
                Some(m) if m > max => {
                    out.push("spec.resources.limits.memory", format_bytes(m), rule)
                }
                Some(_) => {}
            }
        }
        if let Some(max) = self.max_pids {
            let rule = rule("maxPids", &ceil.max_pids);
            match r.pid_limit {
                None => out.push("spec.resources.limits.pids", UNSET, rule),
                Some(p) if p > max => out.push("spec.resources.limits.pids", p.to_string(), rule),
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
#[path = "policy_tests.rs"]
mod tests;
