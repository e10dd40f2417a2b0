//! The sandbox status state machine: which phase may follow which.
//!
//! ```text
//!                ┌──────────── restart / recreate ──────────────┐
//!                ▼                                              │
//!   Pending ─► Creating ─► Running ─► Stopping ─► Stopped ──────┤
//!      │          │           │          │                      │
//!      │          │           ├──────────┴──────► Exited ───────┤
//!      │          │           │          │                      │
//!      ├──────────┴───────────┴──────────┴──────► Failed ───────┤
//!      │          │                                             ▼
//!      └──────────┴────────────────────────────────────────► Deleted
//! ```
//!
//! In words: Pending → Creating | Failed | Deleted; Creating → Running | Failed | Deleted (a
//! rolled-back create); Running → Stopping | Exited | Failed; Stopping → Stopped | Exited |
//! Failed; Stopped, Exited, Failed → Deleted | Creating (restart, AutoRecreate); Deleted is
//! final. There are no self-loops: a repeated phase is a bug in the caller, not a no-op.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "PascalCase")]
pub enum Phase {
    /// Accepted and recorded, not yet handed to a backend.
    Pending,
    /// A backend is creating and starting it.
    Creating,
    Running,
    /// Asked to stop; waiting for the grace period or the exit.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// The workload exited on its own.
    Exited {
        code: i32,
    },
    /// Creating or running it failed; `reason` is for humans.
    Failed {
        reason: String,
    },
    /// Gone; kept only until the record is removed.
    Deleted,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} -> {} is not a legal transition", from.name(), to.name())]
pub struct TransitionError {
    pub from: Phase,
    pub to: Phase,
}

impl Phase {
    /// The phase's name without its data: "Exited", "Failed".
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Creating => "Creating",
            Phase::Running => "Running",
            Phase::Stopping => "Stopping",
            Phase::Stopped => "Stopped",
            Phase::Exited { .. } => "Exited",
            Phase::Failed { .. } => "Failed",
            Phase::Deleted => "Deleted",
        }
    }

    /// Whether `next` may follow `self`; data (exit code, reason) does not matter.
    pub fn can_transition_to(&self, next: &Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Pending, Creating | Failed { .. } | Deleted)
                | (Creating, Running | Failed { .. } | Deleted)
                | (Running, Stopping | Exited { .. } | Failed { .. })
                | (Stopping, Stopped | Exited { .. } | Failed { .. })
                | (Stopped | Exited { .. } | Failed { .. }, Deleted | Creating)
        )
    }

    /// Returns `next` if the transition is legal.
    pub fn transition(&self, next: Phase) -> Result<Phase, TransitionError> {
        if self.can_transition_to(&next) {
            Ok(next)
        } else {
            Err(TransitionError {
                from: self.clone(),
                to: next,
            })
        }
    }

    /// True once the workload is no longer running and nothing will happen without a request.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Stopped | Phase::Exited { .. } | Phase::Failed { .. } | Phase::Deleted
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Exited { code } => write!(f, "Exited({code})"),
            Phase::Failed { reason } => write!(f, "Failed: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn all() -> [Phase; 8] {
        [
            Phase::Pending,
            Phase::Creating,
            Phase::Running,
            Phase::Stopping,
            Phase::Stopped,
            Phase::Exited { code: 3 },
            Phase::Failed {
                reason: "oom".into(),
            },
            Phase::Deleted,
        ]
    }

    #[test]
    fn every_pair_matches_the_table() {
        // Rows: from; columns: to, in the order of `all()`.
        // Pe Cr Ru Sg Sd Ex Fa De
        const LEGAL: [[u8; 8]; 8] = [
            [0, 1, 0, 0, 0, 0, 1, 1], // Pending
            [0, 0, 1, 0, 0, 0, 1, 1], // Creating
            [0, 0, 0, 1, 0, 1, 1, 0], // Running
            [0, 0, 0, 0, 1, 1, 1, 0], // Stopping
            [0, 1, 0, 0, 0, 0, 0, 1], // Stopped
            [0, 1, 0, 0, 0, 0, 0, 1], // Exited
            [0, 1, 0, 0, 0, 0, 0, 1], // Failed
            [0, 0, 0, 0, 0, 0, 0, 0], // Deleted
        ];
        for (i, from) in all().iter().enumerate() {
            for (j, to) in all().into_iter().enumerate() {
                let legal = LEGAL[i][j] == 1;
                assert_eq!(from.can_transition_to(&to), legal, "{from} -> {to}");
                match from.transition(to.clone()) {
                    Ok(next) => assert!(legal && next == to),
                    Err(e) => {
                        assert!(!legal);
                        let msg =
                            format!("{} -> {} is not a legal transition", from.name(), to.name());
                        assert_eq!(e.to_string(), msg);
                    }
                }
            }
        }
    }

    #[test]
    fn data_does_not_change_legality() {
        let running = Phase::Running;
        assert!(running.can_transition_to(&Phase::Exited { code: -1 }));
        assert!(running.can_transition_to(&Phase::Failed {
            reason: String::new()
        }));
        let err = Phase::Running.transition(Phase::Pending).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Running -> Pending is not a legal transition"
        );
    }

    #[test]
    fn terminal_phases() {
        let terminal: Vec<_> = all()
            .into_iter()
            .filter(Phase::is_terminal)
            .map(|p| p.name())
            .collect();
        assert_eq!(terminal, ["Stopped", "Exited", "Failed", "Deleted"]);
    }

    #[test]
    fn display_and_serde() {
        assert_eq!(Phase::Exited { code: 3 }.to_string(), "Exited(3)");
        assert_eq!(
            Phase::Failed {
                reason: "oom".into()
            }
            .to_string(),
            "Failed: oom"
        );
        assert_eq!(Phase::Running.to_string(), "Running");
        let json = serde_json::to_string(&Phase::Exited { code: 3 }).unwrap();
        assert_eq!(json, r#"{"phase":"Exited","code":3}"#);
        assert_eq!(
            serde_json::to_string(&Phase::Pending).unwrap(),
            r#"{"phase":"Pending"}"#
        );
        for phase in all() {
            let json = serde_json::to_string(&phase).unwrap();
            assert_eq!(serde_json::from_str::<Phase>(&json).unwrap(), phase);
        }
    }
}
