//! The few fields of the CRI `runtime.v1.PodSandboxConfig` the sandboxer reads from a
//! `Create` request's `options`, declared with the field numbers of Kubernetes'
//! `cri-api` (`pkg/apis/runtime/v1/api.proto`). Protobuf skips fields a message does not
//! declare, so this subset decodes a full config; nothing here is ever encoded for containerd.

use std::collections::BTreeMap;

use warren_spec::LinuxResources;

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

impl PodSandboxConfig {
    /// The pod's `linux.resources` in OCI form (the kubelet's pod-level totals), if any.
    pub fn oci_resources(&self) -> Option<LinuxResources> {
        let r = self.linux.as_ref()?.resources.as_ref()?;
        let mut cpu = serde_json::Map::new();
        if r.cpu_shares > 0 {
            cpu.insert("shares".into(), r.cpu_shares.into());
        }
        if r.cpu_quota > 0 && r.cpu_period > 0 {
            cpu.insert("quota".into(), r.cpu_quota.into());
            cpu.insert("period".into(), r.cpu_period.into());
        }
        let mut json = serde_json::Map::new();
        if !cpu.is_empty() {
            json.insert("cpu".into(), cpu.into());
        }
        if r.memory_limit_in_bytes > 0 {
            json.insert(
                "memory".into(),
                serde_json::json!({ "limit": r.memory_limit_in_bytes }),
            );
        }
        if json.is_empty() {
            return None;
        }
        serde_json::from_value(json.into()).ok()
    }
}
