//! The node agent's HTTP API (seed 004's, port 5758): the JSON bodies both sides share, and
//! the error kinds that cross it.
//!
//! | call | body | reply |
//! |---|---|---|
//! | `POST /api/v1/agent/create` | [`CreateRequest`] | [`CreateResponse`] |
//! | `POST /api/v1/agent/delete` | [`DeleteRequest`] (stop with a grace period, then remove) | [`SandboxState`] |
//! | `POST /api/v1/agent/stop` | [`DeleteRequest`] | [`SandboxState`] |
//! | `POST /api/v1/agent/adopt` | [`CreateRequest`] (take back a sandbox after a restart) | [`CreateResponse`] |
//! | `POST /api/v1/agent/update` | [`UpdateRequest`] | `{}` |
//! | `POST /api/v1/agent/signal` | [`SignalRequest`] | `{}` |
//! | `GET /api/v1/agent/status[?sandbox=ID]` | | [`AgentStatus`] or one [`SandboxState`] |
//! | `GET /api/v1/agent/logs?sandbox=ID[&follow=true][&tail=N][&sinceMs=T]` | | CRI log lines, streamed |
//! | `GET /api/v1/agent/exec?sandbox=ID[&backend=KIND]` | WebSocket upgrade | the process's stdio and exit ([`crate::exec`]) |
//! | `GET /healthz`, `GET /readyz` | | `ok` / `ready` |
//!
//! Every call needs `Authorization: Bearer TOKEN` (401 otherwise). Errors are
//! `{"error": "...", "kind": "invalid"}` with the HTTP status of their [`ErrorKind`]; a body
//! that is not the JSON expected is a 400 whose message names the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use warren_runtime::BackendStatus;
use warren_spec::{BackendKind, Decision, PolicySpec, ResourceInfo, SandboxSpec};

/// The agent API's port when none is given (seed 004).
pub const DEFAULT_PORT: u16 = 5758;

/// Sandboxes an agent holds at most when neither `--capacity` nor `AGENT_CAPACITY` says
/// (seed 004).
pub const DEFAULT_CAPACITY: u32 = 5;

/// What went wrong, in words both sides map the same way: to an HTTP status here, to a gRPC
/// code in the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is wrong (bad JSON, a field the backend cannot do): 400.
    Invalid,
    /// No or a wrong bearer token: 401.
    Unauthorized,
    /// No such sandbox: 404.
    NotFound,
    /// The id is taken: 409.
    AlreadyExists,
    /// The agent or its backend is full: 429.
    Capacity,
    /// The backend cannot do this: 501.
    Unsupported,
    /// The backend cannot run on this node: 503.
    Unavailable,
    /// Anything else: 500.
    Internal,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::Capacity => 429,
            ErrorKind::Unsupported => 501,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind an HTTP status stands for, for replies without a JSON body.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            400 => ErrorKind::Invalid,
            401 | 403 => ErrorKind::Unauthorized,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::AlreadyExists,
            429 => ErrorKind::Capacity,
            501 => ErrorKind::Unsupported,
            503 => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub kind: ErrorKind,
}

/// A policy as it crosses to the agent: its spec (compiled there) and the decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyWire {
    pub name: String,
    pub spec: PolicySpec,
    pub decision: Decision,
}

/// Create (and start) a sandbox; also the body of `adopt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    /// Chosen by the control plane: unique, filesystem-safe.
    pub id: String,
    pub spec: SandboxSpec,
    /// The resources the control plane resolved from the spec.
    #[serde(default)]
    pub resources: ResourceInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyWire>,
    /// The workload's standard input, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateResponse {
    pub id: String,
    pub status: WireStatus,
    /// What the backend reports (`resources_path`, `pid`, `warm`...).
    #[serde(default)]
    pub info: BTreeMap<String, String>,
}

/// Stop (SIGTERM, SIGKILL after the grace period) and, for `delete`, remove a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteRequest {
    pub id: String,
    /// The backend holding it; found by asking each backend when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// Seconds from SIGTERM to SIGKILL; the agent's default (10 s) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    pub resources: ResourceInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignalRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// A Linux signal number, 1-64.
    pub signal: i32,
}

/// `pause` and `resume`: the sandbox to pause or let run on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PauseRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
}

/// A sandbox's status as it crosses the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "PascalCase")]
pub enum WireStatus {
    Created,
    Running,
    Stopped,
    Exited { code: i32 },
    Failed { reason: String },
}

impl From<&BackendStatus> for WireStatus {
    fn from(s: &BackendStatus) -> Self {
        match s {
            BackendStatus::Created => WireStatus::Created,
            BackendStatus::Running => WireStatus::Running,
            BackendStatus::Stopped => WireStatus::Stopped,
            BackendStatus::Exited { code } => WireStatus::Exited { code: *code },
            BackendStatus::Failed { reason } => WireStatus::Failed {
                reason: reason.clone(),
            },
        }
    }
}

impl From<WireStatus> for BackendStatus {
    fn from(s: WireStatus) -> Self {
        match s {
            WireStatus::Created => BackendStatus::Created,
            WireStatus::Running => BackendStatus::Running,
            WireStatus::Stopped => BackendStatus::Stopped,
            WireStatus::Exited { code } => BackendStatus::Exited { code },
            WireStatus::Failed { reason } => BackendStatus::Failed { reason },
        }
    }
}

/// One sandbox the agent holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxState {
    pub id: String,
    pub backend: BackendKind,
    pub status: WireStatus,
    /// What it uses now (asked for one sandbox; absent when not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<warren_runtime::Usage>,
}

/// A backend as the agent found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendState {
    pub kind: BackendKind,
    pub available: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Pre-warmed sandboxes of one image on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmState {
    pub backend: BackendKind,
    pub image: String,
    /// Ready to be claimed now.
    pub ready: u32,
    /// What the agent keeps ready.
    pub target: u32,
}

/// `GET /api/v1/agent/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    /// Changes each time the agent process starts.
    pub boot_id: String,
    pub capacity: u32,
    pub sandboxes: Vec<SandboxState>,
    pub backends: Vec<BackendState>,
    /// Names of the images in the agent's image store (what image affinity scores).
    pub images: Vec<String>,
    pub warm: Vec<WarmState>,
}

/// Query of `GET /api/v1/agent/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogsQuery {
    pub sandbox: String,
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub tail: Option<usize>,
    /// Only lines written at or after this time (unix milliseconds).
    #[serde(default)]
    pub since_ms: Option<i64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_cross_the_wire_unchanged() {
        for s in [
            BackendStatus::Created,
            BackendStatus::Running,
            BackendStatus::Stopped,
            BackendStatus::Exited { code: 3 },
            BackendStatus::Failed {
                reason: "OOMKilled".into(),
            },
        ] {
            let json = serde_json::to_string(&WireStatus::from(&s)).unwrap();
            let back: WireStatus = serde_json::from_str(&json).unwrap();
            assert_eq!(BackendStatus::from(back), s, "{json}");
        }
        assert_eq!(
            serde_json::to_string(&WireStatus::Exited { code: 3 }).unwrap(),
            r#"{"state":"Exited","code":3}"#
        );
    }

    #[test]
    fn kinds_and_http_statuses_agree() {
        for kind in [
            ErrorKind::Invalid,
            ErrorKind::Unauthorized,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::Capacity,
            ErrorKind::Unsupported,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ] {
            assert_eq!(ErrorKind::from_http_status(kind.http_status()), kind);
        }
    }
}
