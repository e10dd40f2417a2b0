//! Policy decisions between the wire and the model.

use warren_spec::{Decision, PolicyMode, Violation};

use crate::v1;

pub fn decision_to_pb(d: &Decision) -> v1::PolicyDecision {
    v1::PolicyDecision {
        policy: d.policy.clone(),
        hash: d.hash.clone(),
        mode: match d.mode {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Audit => "audit",
        }
        .to_string(),
        admitted: d.admitted,
        violations: d
            .violations
            .iter()
            .map(|v| v1::PolicyViolation {
                field: v.field.clone(),
                value: v.value.clone(),
                rule: v.rule.clone(),
            })
            .collect(),
        filtered_env: d.filtered_env.clone(),
    }
}

/// Lenient: an unknown mode reads as `enforce`, the stricter one.
pub fn decision_from_pb(d: &v1::PolicyDecision) -> Decision {
    Decision {
        policy: d.policy.clone(),
        hash: d.hash.clone(),
        mode: match d.mode.as_str() {
            "audit" => PolicyMode::Audit,
            _ => PolicyMode::Enforce,
        },
        admitted: d.admitted,
        violations: d
            .violations
            .iter()
            .map(|v| Violation {
                field: v.field.clone(),
                value: v.value.clone(),
                rule: v.rule.clone(),
            })
            .collect(),
        filtered_env: d.filtered_env.clone(),
    }
}
