//! warren's domain model: what a sandbox is, before anything runs it.
//!
//! This crate is pure: no I/O, no clock, no global state. Everything that reads untrusted input
//! (specs, CRI annotations, quantity strings) lives here, so it can be unit-tested, fuzzed
//! (`fuzz/`) and shared by the CLI, the control plane, the agent and the containerd shim
//! without pulling in their dependencies.
//!
//! - Quantities ([`parse_cpu`], [`parse_bytes`], [`format_bytes`], ...): Kubernetes' "500m",
//!   "2Gi", "1e3", parsed with exact integer arithmetic and rounded up as Kubernetes does.
//! - [`SandboxSpec`]: what a user or containerd asks for, and [`SandboxSpec::validate`].
//! - [`ResourceInfo`]: what the sandbox gets; its JSON is the ResourceSlot seed's format,
//!   written byte for byte by [`ResourceInfo::to_json_pretty`].
//! - [`Policy`]: what sandboxes may do and ask for ([`PolicySpec`]), compiled once, and
//!   [`Policy::evaluate`], which lists every [`Violation`] of a spec (see `docs/policy.md`).
//! - [`Phase`]: the status state machine.
//! - [`SpecError`]: every error names the field and the value, on one line.
//!
//! # Resource precedence
//!
//! [`extract_resources`] fills each [`ResourceInfo`] field from the first source that sets it:
//!
//! 1. **CRI annotations** (`resources.limits.cpu`, `resources.limits.memory`,
//!    `resources.requests.cpu`, `resources.requests.memory`, `resources.limits.pid`,
//!    `resources.limits.storage` or its alias `resources.limits.ephemeral-storage`,
//!    `resources.limits.network-bandwidth`): the most specific, set per sandbox by whoever
//!    created it.
//! 2. **OCI `linux.resources`** (cpu quota/period → limit, shares/1024 → request, memory
//!    limit and reservation, pids limit): what containerd or the kubelet computed, read as
//!    runc reads it: `-1` (unlimited) and `0` (unset) set nothing, a quota without a period
//!    runs under the default 100 ms, and a value runc or the kernel would refuse (a negative
//!    memory limit other than `-1`, a period outside 1 ms..1 s, shares outside 2..262144) is
//!    an error naming the field and value.
//! 3. **The spec's `resources`** (`requests`/`limits`, Kubernetes style): the user's defaults.
//!
//! Precedence is per field, not per source: an annotation that sets only the CPU limit leaves
//! memory to OCI or the spec. Every value given is validated even when overridden, so a typo
//! never hides. After merging, a request above its limit is rejected, as Kubernetes does.
//!
//! CPU is kept in whole millicores internally and reported in cores (`f64`); bytes, counts and
//! bits per second are `u64`.

mod error;
mod policy;
mod policy_eval;
mod quantity;
mod resources;
mod spec;
mod state;

pub use error::SpecError;
pub use policy::{
    ArgCondition, ArgOp, EgressRule, EnvPolicy, ExecPolicy, FilesystemPolicy, GlobList,
    NetworkMode, NetworkPolicy, PathAccess, Policy, PolicyMode, PolicySpec, PortEntry,
    ResourceCeilings, SyscallEntry, SyscallPolicy, SyscallRule, glob_matches, parse_cidr,
};
pub use policy_eval::{Decision, UNSET, Violation};
pub use quantity::{
    MAX_CPU_CORES, QuantityError, QuantityErrorKind, format_bytes, format_cpu, parse_bandwidth,
    parse_bytes, parse_count, parse_cpu, parse_cpu_millis,
};
pub use resources::{
    ANNOTATION_CPU_LIMIT, ANNOTATION_CPU_REQUEST, ANNOTATION_EPHEMERAL_STORAGE_LIMIT,
    ANNOTATION_MEMORY_LIMIT, ANNOTATION_MEMORY_REQUEST, ANNOTATION_NETWORK_BANDWIDTH,
    ANNOTATION_PID_LIMIT, ANNOTATION_STORAGE_LIMIT, OCI_CPU_PERIOD, ResourceInfo, ResourceList,
    ResourceRequirements, extract_resources, resources_to_oci,
};
pub use spec::{
    BackendKind, Consistency, FailurePolicy, MAX_GRACE_SECONDS, MAX_NAME_LEN, Mount, PortSpec,
    Protocol, SandboxSpec, parse_image_user, parse_user, validate_hostname, validate_label_value,
    validate_name,
};
pub use state::{Phase, TransitionError};

/// Re-exported so callers can build [`SandboxSpec::oci`] without depending on oci-spec.
pub use oci_spec::runtime::LinuxResources;
