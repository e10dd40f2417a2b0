//! From a sandbox's spec (and its image, and its applied policy) to the container's
//! configuration the supervisor runs.

use super::*;

/// Builds the container's configuration from the spec and the image.
pub(super) fn container_config(
    inner: &Inner,
    config: &SandboxConfig,
) -> Result<(ContainerConfig, String), BackendError> {
    let spec = &config.spec;
    let invalid = |field: &str, value: &str, reason: &str| {
        BackendError::Invalid(format!("{field}: {value:?} {reason}"))
    };
    let name = spec.image.as_deref().ok_or_else(|| {
        BackendError::Invalid("spec.image: the linux backend needs an image".into())
    })?;
    let policy = config.policy.as_ref();
    let source = RootSource::of(inner, name, policy)?;
    let image = match &source {
        RootSource::Image(image) => &image.config,
        RootSource::Dir(_) => &warren_image::ImageConfig::default(),
    };
    let argv = command_line(spec, &image.entrypoint, &image.cmd);
    if argv.is_empty() {
        return Err(invalid(
            "spec.command",
            name,
            "has no entrypoint or cmd; give a command",
        ));
    }
    let mut env = image.env.clone();
    // The spec's variables the policy's env.allow lists (the decision's filtered_env names
    // the others); the image's own are the image's.
    for (k, v) in spec
        .env
        .iter()
        .filter(|(k, _)| policy.is_none_or(|p| p.policy.env_allowed(k)))
    {
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(key, _)| key) != k);
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", spec.hostname_or_default()));
    }
    let cwd = spec
        .working_dir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    let (uid, gid) = match (&spec.user, &image.user) {
        (Some(u), _) => parse_user(u).map_err(|e| BackendError::Invalid(e.to_string()))?,
        (None, Some(u)) if !u.is_empty() => {
            warren_spec::parse_image_user(u).map_err(|e| BackendError::Invalid(e.to_string()))?
        }
        _ => (0, 0),
    };
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for (i, m) in spec.mounts.iter().enumerate() {
        if let Some(reason) = reserved_guest_path(&m.guest) {
            return Err(invalid(
                &format!("spec.mounts[{i}].guest"),
                &m.guest,
                reason,
            ));
        }
        // Resolved here, and bound as resolved: the supervisor refuses a path that leads
        // elsewhere by then.
        let host =
            warren_runtime::resolve_host_path(&format!("spec.mounts[{i}].host"), &m.host, policy)?;
        mounts.push(BindMount {
            host,
            guest: m.guest.clone(),
            read_only: m.read_only,
        });
    }
    let enforced = PolicyEnforcement::of(config)?;
    let limits = limits_of(&config.resources)?;
    let storage_bytes = storage_of(&config.resources, matches!(source, RootSource::Dir(_)))?;
    let grace = spec
        .stop_grace_period_seconds
        .map(Duration::from_secs_f64)
        .unwrap_or(inner.config.default_stop_grace);
    Ok((
        ContainerConfig {
            id: config.id.clone(),
            layers: match &source {
                RootSource::Image(image) => image.layers.clone(),
                RootSource::Dir(_) => Vec::new(),
            },
            rootfs: match &source {
                RootSource::Image(_) => None,
                RootSource::Dir(dir) => Some(dir.clone()),
            },
            argv,
            env,
            cwd,
            hostname: spec.hostname_or_default(),
            uid,
            gid,
            read_only_rootfs: spec.read_only_rootfs,
            mounts,
            deny_syscalls: spec.deny_syscalls.clone(),
            policy_syscalls: enforced.syscalls,
            loopback: enforced.loopback,
            egress: match enforced.egress {
                Some(allow) => Some(inner.network.take(
                    &config.id,
                    allow,
                    config.resources.network_bandwidth,
                )?),
                None => None,
            },
            read_only_paths: enforced.read_only_paths,
            masked_paths: enforced.masked_paths,
            writable_paths: enforced.writable_paths,
            exec_allow: enforced.exec_allow,
            cgroup_parent: inner.config.cgroup_parent.clone(),
            limits,
            log_max_bytes: inner.config.log_max_bytes,
            stop_grace_ms: grace.as_millis() as u64,
            timeout_ms: spec
                .timeout_seconds
                .map(|s| Duration::from_secs_f64(s).as_millis() as u64),
            storage_bytes,
        },
        source.id(),
    ))
}

/// What the linux backend enforces of a sandbox's applied policy (see docs/policy.md).
pub(super) struct PolicyEnforcement {
    pub(super) syscalls: Option<crate::config::PolicySyscalls>,
    pub(super) loopback: bool,
    /// `network.mode: egress`: the IPv4 destinations (IPv6 ones cannot be reached: the
    /// sandbox gets IPv4 only).
    pub(super) egress: Option<Vec<crate::egress::Destination>>,
    pub(super) read_only_paths: Vec<String>,
    pub(super) masked_paths: Vec<String>,
    pub(super) writable_paths: Vec<String>,
    pub(super) exec_allow: Option<Vec<String>>,
}

impl PolicyEnforcement {
    pub(super) fn of(config: &SandboxConfig) -> Result<PolicyEnforcement, BackendError> {
        let Some(applied) = &config.policy else {
            return Ok(PolicyEnforcement {
                syscalls: None,
                loopback: true,
                egress: None,
                read_only_paths: Vec::new(),
                masked_paths: Vec::new(),
                writable_paths: Vec::new(),
                exec_allow: None,
            });
        };
        let policy = &applied.policy;
        let spec = policy.spec();
        let loopback = policy.network_mode() != Some(NetworkMode::None);
        let egress = (policy.network_mode() == Some(NetworkMode::Egress)).then(|| {
            policy
                .egress_destinations()
                .filter_map(|(net, ports)| match net {
                    ipnet::IpNet::V4(net) => Some(crate::egress::Destination {
                        net: net.to_string(),
                        ports: ports.to_vec(),
                    }),
                    ipnet::IpNet::V6(_) => None,
                })
                .collect()
        });
        let fs = spec.filesystem.clone().unwrap_or_default();
        Ok(PolicyEnforcement {
            syscalls: spec
                .syscalls
                .clone()
                .map(|syscalls| crate::config::PolicySyscalls {
                    hash: policy.hash().to_string(),
                    syscalls,
                }),
            loopback,
            egress,
            read_only_paths: fs.read_only,
            masked_paths: fs.masked,
            writable_paths: fs.writable,
            exec_allow: spec.exec.as_ref().map(|e| e.allow.clone()),
        })
    }
}

/// Why a container cannot take a bind mount at `guest`, if it cannot: the root is the
/// image's (docker refuses `/` too), `/proc` is the pid namespace's own (runc refuses mounts
/// on it), and `/dev` is made by the runtime.
fn reserved_guest_path(guest: &str) -> Option<&'static str> {
    let path = Path::new(guest);
    let mut parts = path
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir));
    parts.next(); // the root
    match (parts.next(), parts.next()) {
        (None, _) => Some("is the root: the image is the root filesystem"),
        (Some(first), _) if first.as_os_str() == "proc" => {
            Some("is /proc or under it, which the sandbox's own pid namespace fills")
        }
        (Some(first), None) if first.as_os_str() == "dev" => {
            Some("is /dev, which the runtime makes (a path under it may be mounted)")
        }
        _ => None,
    }
}

/// Where a container's root filesystem comes from: `spec.image` names an image in the
/// store, or, starting with `/`, is a prepared root directory used in place (what the
/// containerd shim hands over: containerd's mounted snapshot).
pub(super) enum RootSource {
    Image(warren_image::Image),
    Dir(PathBuf),
}

impl RootSource {
    pub(super) fn of(
        inner: &Inner,
        name: &str,
        policy: Option<&warren_runtime::AppliedPolicy>,
    ) -> Result<RootSource, BackendError> {
        if !name.starts_with('/') {
            return inner
                .config
                .images
                .resolve(name)
                .map(RootSource::Image)
                .map_err(|e| {
                    BackendError::Invalid(format!("spec.image: {}", crate::error_chain(&e)))
                });
        }
        let dir = PathBuf::from(name);
        if dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(BackendError::Invalid(format!(
                "spec.image: {name:?}: a root filesystem path must not hold '..'"
            )));
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(BackendError::Invalid(format!(
                    "spec.image: {name:?} is not a directory (a root filesystem path must be one)"
                )));
            }
            Err(e) => {
                return Err(BackendError::Invalid(format!(
                    "spec.image: {name:?}: cannot use it as a root filesystem: {e}"
                )));
            }
        }
        // The host's own root (however spelt, or bind-mounted elsewhere) would give the
        // sandbox the host, read-write.
        let same_file = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
            use std::os::unix::fs::MetadataExt as _;
            (a.dev(), a.ino()) == (b.dev(), b.ino())
        };
        if let (Ok(this), Ok(root)) = (std::fs::metadata(&dir), std::fs::metadata("/"))
            && same_file(&this, &root)
        {
            return Err(BackendError::Invalid(format!(
                "spec.image: {name:?} is the host's root directory: a root filesystem path \
                 must be a directory prepared for the sandbox (an unpacked image, containerd's \
                 snapshot)"
            )));
        }
        Ok(RootSource::Dir(warren_runtime::resolve_host_path(
            "spec.image",
            name,
            policy,
        )?))
    }

    /// Warm shells are kept per image id; a directory never matches one.
    pub(super) fn id(&self) -> String {
        match self {
            RootSource::Image(image) => image.id.clone(),
            RootSource::Dir(dir) => format!("dir:{}", dir.display()),
        }
    }
}

/// The cgroup limits a sandbox's resources ask for. A CPU limit above the node's online
/// CPUs is refused, as docker refuses it: it would limit nothing, and its user most likely
/// meant millicores (`500m`, not `500`).
pub(super) fn limits_of(r: &ResourceInfo) -> Result<Limits, BackendError> {
    limits_on(r, online_cpus())
}

/// [`limits_of`] on a node with `online` CPUs (`None`: not known, nothing refused).
fn limits_on(r: &ResourceInfo, online: Option<u64>) -> Result<Limits, BackendError> {
    if let (Some(cpu), Some(online)) = (r.cpu_limit, online)
        && cpu > online as f64
    {
        return Err(BackendError::Invalid(format!(
            "spec.resources.limits.cpu: {cpu} is more than this node's {online} CPUs \
             (it would limit nothing; millicores are written 500m)"
        )));
    }
    Ok(Limits {
        memory_bytes: r.memory_limit,
        pids: r.pid_limit,
        cpu_limit_millis: r.cpu_limit.map(|c| (c * 1000.0).round() as u64),
        cpu_request_millis: r.cpu_request.map(|c| (c * 1000.0).round() as u64),
    })
}

/// The smallest storage limit: an ext4 file system's own structures need some room.
pub(super) const MIN_STORAGE: u64 = 8 << 20;

/// The size of the writable layer's file system a storage limit asks for. A prepared root
/// directory (`dir`: containerd's snapshot through the shim) is written in place: whoever
/// prepared it limits it (kubelet evicts pods past their ephemeral-storage), so the limit
/// is recorded, not applied, as containerd's runtimes do.
pub(super) fn storage_of(r: &ResourceInfo, dir: bool) -> Result<Option<u64>, BackendError> {
    let Some(bytes) = r.storage_limit.filter(|_| !dir) else {
        return Ok(None);
    };
    let field = "spec.resources.limits.storage";
    if bytes < MIN_STORAGE {
        return Err(BackendError::Invalid(format!(
            "{field}: {bytes} bytes is below the {}Mi a writable layer's file system needs",
            MIN_STORAGE >> 20
        )));
    }
    Ok(Some(bytes))
}

/// The CPUs online on this host, counted once (glibc reads a file in /sys for it: not on
/// every create).
fn online_cpus() -> Option<u64> {
    static ONLINE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *ONLINE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
            .ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n > 0)
    })
}

/// Kubernetes' rule: `command` replaces the image's entrypoint, `args` its cmd; args alone
/// keep the entrypoint.
pub(super) fn command_line(
    spec: &SandboxSpec,
    entrypoint: &[String],
    cmd: &[String],
) -> Vec<String> {
    match (spec.command.is_empty(), spec.args.is_empty()) {
        (false, _) => spec.command.iter().chain(&spec.args).cloned().collect(),
        (true, false) => entrypoint.iter().chain(&spec.args).cloned().collect(),
        (true, true) => entrypoint.iter().chain(cmd).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_limit_above_the_nodes_cpus_is_refused_naming_both() {
        let cpus = |limit| ResourceInfo {
            cpu_limit: Some(limit),
            ..Default::default()
        };
        let err = limits_on(&cpus(1000.0), Some(2)).unwrap_err().to_string();
        assert!(
            err.contains("spec.resources.limits.cpu: 1000 is more than this node's 2 CPUs"),
            "{err}"
        );
        assert!(limits_on(&cpus(2.5), Some(2)).is_err());
        let fits = limits_on(&cpus(2.0), Some(2)).expect("all the node's CPUs");
        assert_eq!(fits.cpu_limit_millis, Some(2000));
        assert_eq!(
            limits_on(&cpus(0.25), Some(2)).unwrap().cpu_limit_millis,
            Some(250)
        );
        // Without a count nothing is refused; without a limit neither.
        assert!(limits_on(&cpus(1000.0), None).is_ok());
        assert!(limits_on(&ResourceInfo::default(), Some(1)).is_ok());
    }

    #[test]
    fn a_storage_limit_is_a_size_on_images_and_recorded_on_prepared_roots() {
        let storage = |bytes| ResourceInfo {
            storage_limit: Some(bytes),
            ..Default::default()
        };
        assert_eq!(
            storage_of(&storage(MIN_STORAGE), false).unwrap(),
            Some(MIN_STORAGE)
        );
        let err = storage_of(&storage(MIN_STORAGE - 1), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.resources.limits.storage: 8388607 bytes is below the 8Mi"),
            "{err}"
        );
        assert_eq!(storage_of(&storage(1), true).unwrap(), None);
        assert_eq!(storage_of(&ResourceInfo::default(), false).unwrap(), None);
    }
}
