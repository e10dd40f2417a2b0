//! The sandbox status state machine: which phase may follow which.
//!
//! ```text
//!                ┌──────────── restart / recreate ──────────────┐
//!                ▼                                              │
//!   Pending ─► Creating ─► Running ─► Stopping ─► Stopped ──────┤
//!      ▲          │           │  ▲       │                      │
//!      │          │           │  │       ├──────► Exited ───────┤
//!      │          │           ▼  │       │                      │
//!      │          │          Lost ─┴─────┴──────► Failed ───────┤
//!      └──────────┴──────────┘                                  ▼
//!          (AutoRecreate)          any but Deleted ─► Expired ─► Deleted
//! ```
//!
//! In words: Pending → Creating | Failed | Deleted; Creating → Running | Failed | Deleted (a
//! rolled-back create); Running → Stopping | Exited | Failed | Lost; Stopping → Stopped |
//! Exited | Failed; Stopped, Exited, Failed → Deleted | Creating (restart, AutoRecreate);
//! Lost → Running, Stopped, Exited (its agent came back and says so) | Pending | Creating
//! (AutoRecreate) | Failed | Deleted; every phase but Deleted and Expired → Expired (its `expireTime` passed; it is
//! being removed) → Deleted. Deleted is final. There are no self-loops: a repeated phase is a
//! bug in the caller, not a no-op.
//!
//! # The Fast Sandbox phases
//!
//! Seed 004 names seven phases; each is observable here (in `warren get`, watch events and
//! the API's `status.phase`):
//!
//! | seed | warren | meaning |
//! |---|---|---|
//! | Pending | `Pending` | accepted, no agent has it yet (an AutoRecreate waiting for room) |
//! | Bound | `Creating` | placed on an agent, which is creating and starting it |
//! | Running | `Running` | |
//! | Terminating | `Stopping` | asked to stop: SIGTERM, SIGKILL after the grace period |
//! | Expired | `Expired` | its `expireTime` passed: it is stopped and removed |
//! | Failed | `Failed` | creating or running it failed (the reason says why) |
//! | Lost | `Lost` | its agent stopped answering; nobody knows if it still runs |
//!
//! warren adds `Stopped` (stopped on request), `Exited` (the workload ended by itself, with
//! its code) and `Deleted` (the last event of a sandbox).

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
    /// Its agent stopped answering (seed 004's Lost): whether it still runs is unknown.
    /// `reason` names the agent and when it was last heard from.
    Lost {
        reason: String,
    },
    /// Its `expireTime` passed: it is being stopped and removed.
    Expired,
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
            Phase::Lost { .. } => "Lost",
            Phase::Expired => "Expired",
        }
    }

    /// Whether `next` may follow `self`; data (exit code, reason) does not matter.
    pub fn can_transition_to(&self, next: &Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Pending, Creating | Failed { .. } | Deleted)
                | (Creating, Running | Failed { .. } | Deleted)
                | (
                    Running,
                    Stopping | Exited { .. } | Failed { .. } | Lost { .. }
                )
                | (Stopping, Stopped | Exited { .. } | Failed { .. })
                | (Stopped | Exited { .. } | Failed { .. }, Deleted | Creating)
                | (
                    Lost { .. },
                    Running
                        | Stopped
                        | Exited { .. }
                        | Pending
                        | Creating
                        | Failed { .. }
                        | Deleted
                )
                | (Expired, Deleted)
        ) || (*next == Expired && !matches!(self, Deleted | Expired))
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
    /// `Lost` is not terminal: its agent may come back with it, or AutoRecreate may start it
    /// again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Stopped
                | Phase::Exited { .. }
                | Phase::Failed { .. }
                | Phase::Deleted
                | Phase::Expired
        )
    }

    /// The name seed 004 (Fast Sandbox) gives this phase, where it differs: `Creating` is
    /// its Bound, `Stopping` its Terminating.
    pub fn seed_name(&self) -> Option<&'static str> {
        match self {
            Phase::Creating => Some("Bound"),
            Phase::Stopping => Some("Terminating"),
            _ => None,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Exited { code } => write!(f, "Exited({code})"),
            Phase::Failed { reason } => write!(f, "Failed: {reason}"),
            Phase::Lost { reason } => write!(f, "Lost: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn all() -> [Phase; 10] {
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
            Phase::Lost {
                reason: "agent b".into(),
            },
            Phase::Expired,
        ]
    }

    #[test]
    fn every_pair_matches_the_table() {
        // Rows: from; columns: to, in the order of `all()`.
        // Pe Cr Ru Sg Sd Ex Fa De Lo Xp
        const LEGAL: [[u8; 10]; 10] = [
            [0, 1, 0, 0, 0, 0, 1, 1, 0, 1], // Pending
            [0, 0, 1, 0, 0, 0, 1, 1, 0, 1], // Creating
            [0, 0, 0, 1, 0, 1, 1, 0, 1, 1], // Running
            [0, 0, 0, 0, 1, 1, 1, 0, 0, 1], // Stopping
            [0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // Stopped
            [0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // Exited
            [0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // Failed
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // Deleted
            [1, 1, 1, 0, 1, 1, 1, 1, 0, 1], // Lost
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 0], // Expired
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
        assert_eq!(
            terminal,
            ["Stopped", "Exited", "Failed", "Deleted", "Expired"]
        );
    }

    #[test]
    fn every_seed_phase_has_a_warren_phase() {
        // Seed 004's seven phases, each the name or the seed name of a phase here.
        let names: Vec<&str> = all()
            .iter()
            .map(|p| p.seed_name().unwrap_or(p.name()))
            .collect();
        for seed in [
            "Pending",
            "Bound",
            "Running",
            "Terminating",
            "Expired",
            "Failed",
            "Lost",
        ] {
            assert!(names.contains(&seed), "{seed} missing from {names:?}");
        }
    }

    #[test]
    fn lost_is_left_by_its_agent_coming_back_or_a_recreate() {
        let lost = Phase::Lost {
            reason: "agent b stopped answering".into(),
        };
        assert!(Phase::Running.can_transition_to(&lost));
        assert!(lost.can_transition_to(&Phase::Running));
        assert!(lost.can_transition_to(&Phase::Pending));
        assert!(lost.can_transition_to(&Phase::Creating));
        assert!(!lost.is_terminal());
        assert!(
            !Phase::Stopped.can_transition_to(&lost),
            "an end is not lost"
        );
        assert_eq!(lost.to_string(), "Lost: agent b stopped answering");
        assert_eq!(
            serde_json::to_string(&lost).unwrap(),
            r#"{"phase":"Lost","reason":"agent b stopped answering"}"#
        );
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
