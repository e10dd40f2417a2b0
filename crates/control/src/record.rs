//! The persisted form of a sandbox and its wire form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use warren_proto::{decision_to_pb, resource_info_to_pb, spec_to_pb, v1};
use warren_runtime::AppliedPolicy;
use warren_spec::{Decision, Phase, PolicySpec, ResourceInfo, SandboxSpec};

/// Key prefix of sandbox records in the store.
pub const PREFIX: &str = "sandboxes/";

pub fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// One sandbox as the control plane knows it. Stored as JSON: readable with any redb tool,
/// and new optional fields stay compatible with old records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub spec: SandboxSpec,
    pub status: Phase,
    pub resources: ResourceInfo,
    pub node: String,
    #[serde(default)]
    pub backend_info: BTreeMap<String, String>,
    pub revision: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The policy the sandbox was admitted under and the decision; `None`: no policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRecord>,
    /// How many times AutoRecreate created it again (after its node was lost or it failed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recreations: u32,
    /// A Running sandbox whose workload is paused (`warren pause`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A policy as a sandbox holds it: its spec then (a later apply does not change it) and
/// what it decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub spec: PolicySpec,
    pub decision: Decision,
}

impl SandboxRecord {
    /// A new sandbox about to be created on `node` (empty: not placed yet), with a fresh id,
    /// admitted under `applied`.
    pub fn creating(
        spec: SandboxSpec,
        resources: ResourceInfo,
        node: String,
        applied: Option<&AppliedPolicy>,
    ) -> Self {
        let now = now_ms();
        SandboxRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            spec,
            status: Phase::Creating,
            resources,
            node,
            backend_info: BTreeMap::new(),
            revision: 0,
            created_at_ms: now,
            updated_at_ms: now,
            policy: applied.map(|a| PolicyRecord {
                spec: a.policy.spec().clone(),
                decision: a.decision.clone(),
            }),
            recreations: 0,
            paused: false,
        }
    }

    pub fn to_pb(&self) -> v1::Sandbox {
        let (exit_code, reason) = match &self.status {
            Phase::Exited { code } => (Some(*code), String::new()),
            Phase::Failed { reason } | Phase::Lost { reason } => (None, reason.clone()),
            _ => (None, String::new()),
        };
        v1::Sandbox {
            id: self.id.clone(),
            spec: Some(spec_to_pb(&self.spec)),
            status: Some(v1::SandboxStatus {
                phase: self.status.name().to_string(),
                exit_code,
                reason,
                resources: Some(resource_info_to_pb(&self.resources)),
                node: self.node.clone(),
                backend_info: self.backend_info.clone().into_iter().collect(),
                policy: self.policy.as_ref().map(|p| decision_to_pb(&p.decision)),
                recreations: self.recreations,
                paused: self.paused && self.status == Phase::Running,
            }),
            revision: self.revision,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
