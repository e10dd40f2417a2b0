//! What a control-plane operation can fail with; `grpc::status_of` maps each to a code.

use std::time::Duration;

use warren_agent::AgentError;
use warren_spec::BackendKind;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// A request field outside the spec is wrong; the message names it and its value.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("sandbox {name:?} not found")]
    NotFound { name: String },
    #[error(
        "sandbox {name:?} already exists with a different spec (delete it first, or use `warren apply`)"
    )]
    AlreadyExists { name: String },
    #[error("another operation on sandbox {name:?} is in progress; retry")]
    Busy { name: String },
    /// Busy with a stop, which waits out its grace period before SIGKILL.
    #[error(
        "sandbox {name:?} is stopping (SIGKILL follows its grace period); `warren kill {name}` \
         ends it now"
    )]
    Stopping { name: String },
    #[error("sandbox {name:?} is at revision {actual}, not {expected}")]
    RevisionMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "sandbox {name:?} has id {actual}, not {expected}: it was replaced since (deleted and \
         created again, restarted or recreated)"
    )]
    IdMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Selector(#[from] crate::selector::SelectorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backend {backend} keeps no logs for sandbox {name:?}")]
    NoLogs { name: String, backend: BackendKind },
    #[error("sandbox {name:?} is {phase}, not Running")]
    NotRunning { name: String, phase: String },
    #[error("sandbox {name:?} is paused: unpause it first (`warren unpause`)")]
    Paused { name: String },
    #[error("sandbox {name:?} did not finish within {waited:?}")]
    WaitTimeout { name: String, waited: Duration },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("policy {name:?} not found")]
    PolicyNotFound { name: String },
    /// A create or check needs a policy that is not stored.
    #[error("policy {name:?} (named by {why}) does not exist; apply it with `warren policy apply`")]
    PolicyMissing { name: String, why: &'static str },
    #[error("policy {name:?} is held by sandboxes {}; delete them first", sandboxes.join(", "))]
    PolicyInUse {
        name: String,
        sandboxes: Vec<String>,
    },
    /// No node can take the sandbox.
    #[error(transparent)]
    Schedule(#[from] crate::scheduler::ScheduleError),
    #[error("invalid pool: {0}")]
    InvalidPool(String),
    #[error("pool {name:?} not found")]
    PoolNotFound { name: String },
    /// A create names a pool that is not stored.
    #[error("spec.pool: {name:?} does not exist; create it with `warren pool create`")]
    PoolMissing { name: String },
    #[error("pool {name:?} has sandboxes {}; delete them first", sandboxes.join(", "))]
    PoolInUse {
        name: String,
        sandboxes: Vec<String>,
    },
    #[error("pool {name:?} is full: it holds its max of {max} sandboxes")]
    PoolFull { name: String, max: u32 },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoints::store::CheckpointError),
    /// One line per violation: `field: "value" violates rule`.
    #[error("sandbox {sandbox:?} is refused by policy {policy:?}:\n  {}", violations.join("\n  "))]
    PolicyViolation {
        sandbox: String,
        policy: String,
        violations: Vec<String>,
    },
}
