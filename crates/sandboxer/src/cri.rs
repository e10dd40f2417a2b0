//! The few fields of the CRI `runtime.v1.PodSandboxConfig` the sandboxer reads from a
//! `Create` request's `options`, declared with the field numbers of Kubernetes'
//! `cri-api` (`pkg/apis/runtime/v1/api.proto`). Protobuf skips fields a message does not
//! declare, so this subset decodes a full config; nothing here is ever encoded for containerd.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxCpu, LinuxMemory};
use warren_spec::{
    LinuxResources, ResourceInfo, ResourceRequirements, SpecError, extract_resources,
};

/// The message's full name: containerd's `options` Any ends its type URL with it.
pub const POD_SANDBOX_CONFIG: &str = "runtime.v1.PodSandboxConfig";

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(btree_map = "string, string", tag = "6")]
    pub labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "7")]
    pub annotations: BTreeMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "4")]
    pub overhead: Option<LinuxContainerResources>,
    #[prost(message, optional, tag = "5")]
    pub resources: Option<LinuxContainerResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerResources {
    #[prost(int64, tag = "1")]
    pub cpu_period: i64,
    #[prost(int64, tag = "2")]
    pub cpu_quota: i64,
    #[prost(int64, tag = "3")]
    pub cpu_shares: i64,
    #[prost(int64, tag = "4")]
    pub memory_limit_in_bytes: i64,
}

/// containerd's copy of the pod-level `linux.resources` on the pause container's OCI spec,
/// each CRI field as a decimal annotation (all four, 0 for unset), with the CRI field it holds.
pub const SANDBOX_RESOURCE_ANNOTATIONS: [(&str, &str); 4] = [
    ("io.kubernetes.cri.sandbox-cpu-period", "cpu_period"),
    ("io.kubernetes.cri.sandbox-cpu-quota", "cpu_quota"),
    ("io.kubernetes.cri.sandbox-cpu-shares", "cpu_shares"),
    ("io.kubernetes.cri.sandbox-memory", "memory_limit_in_bytes"),
];

/// The pod-level resources containerd wrote into `annotations` ([`SANDBOX_RESOURCE_ANNOTATIONS`]),
/// if it wrote any.
pub fn annotated_resources(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<LinuxContainerResources>, SpecError> {
    if !SANDBOX_RESOURCE_ANNOTATIONS
        .iter()
        .any(|(key, _)| annotations.contains_key(*key))
    {
        return Ok(None);
    }
    let value = |i: usize| {
        let key = SANDBOX_RESOURCE_ANNOTATIONS[i].0;
        let Some(raw) = annotations.get(key) else {
            return Ok(0);
        };
        raw.parse::<i64>().map_err(|_| {
            SpecError::invalid(
                format!("annotations[{key:?}]"),
                raw,
                "is not a whole number (containerd writes the CRI value in decimal)",
            )
        })
    };
    Ok(Some(LinuxContainerResources {
        cpu_period: value(0)?,
        cpu_quota: value(1)?,
        cpu_shares: value(2)?,
        memory_limit_in_bytes: value(3)?,
    }))
}

/// The annotation of [`SANDBOX_RESOURCE_ANNOTATIONS`] that holds the CRI field `cri`.
pub fn annotation_of(cri: &str) -> String {
    let key = SANDBOX_RESOURCE_ANNOTATIONS
        .iter()
        .find(|(_, f)| *f == cri)
        .map_or(cri, |(k, _)| k);
    format!("annotations[{key:?}]")
}

impl LinuxContainerResources {
    /// What these resources ask for, read as containerd hands them to runc (a field at 0 is
    /// left out of the OCI spec) and then as OCI `linux.resources`, so the same values are
    /// legal here and in a container's spec. `field` names a CRI field (`"cpu_quota"`) in
    /// errors.
    pub(crate) fn info(&self, field: impl Fn(&str) -> String) -> Result<ResourceInfo, SpecError> {
        // OCI's period and shares are unsigned: containerd would hand runc a negative one as
        // a huge value, which runc refuses.
        let unsigned = |cri: &str, v: i64, reason: &str| match v {
            0 => Ok(None),
            v => u64::try_from(v)
                .map(Some)
                .map_err(|_| SpecError::invalid(field(cri), &v.to_string(), reason)),
        };
        let period = unsigned(
            "cpu_period",
            self.cpu_period,
            "is not a CFS period (expected 1000 to 1000000 µs, or 0 for the default)",
        )?;
        let shares = unsigned(
            "cpu_shares",
            self.cpu_shares,
            "is not a CPU weight runc accepts (expected 2 to 262144, or 0 for none)",
        )?;
        let set = |v: i64| (v != 0).then_some(v);
        let mut cpu = LinuxCpu::default();
        cpu.set_period(period)
            .set_quota(set(self.cpu_quota))
            .set_shares(shares);
        let mut memory = LinuxMemory::default();
        memory.set_limit(set(self.memory_limit_in_bytes));
        let mut oci = LinuxResources::default();
        oci.set_cpu(Some(cpu)).set_memory(Some(memory));
        extract_resources(
            &BTreeMap::new(),
            Some(&oci),
            &ResourceRequirements::default(),
        )
        .map_err(|e| {
            let cri = match e.field() {
                "linux.resources.cpu.period" => "cpu_period",
                "linux.resources.cpu.quota" => "cpu_quota",
                "linux.resources.cpu.shares" => "cpu_shares",
                "linux.resources.memory.limit" => "memory_limit_in_bytes",
                _ => return e,
            };
            e.in_field(field(cri))
        })
    }
}
