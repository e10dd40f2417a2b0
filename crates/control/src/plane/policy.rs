//! Policies on the control plane: stored with the sandboxes, resolved for each create and
//! update, and evaluated by the one evaluator in `warren_spec` (docs/policy.md).
//!
//! A sandbox is evaluated against the policy its spec names, else the server's default
//! policy: the one `--default-policy` names (which must then exist), else a policy named
//! `default` if one is stored, else none. The record keeps the policy's spec and the
//! decision, so a sandbox keeps the policy it was admitted under when the policy is
//! re-applied, and a restart enforces the same thing. A policy that sandboxes hold cannot
//! be deleted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use warren_runtime::AppliedPolicy;
use warren_spec::{Decision, Policy, PolicySpec, ResourceInfo, SandboxSpec, SpecError};

use super::{ControlError, ControlPlane};
use crate::record::{PolicyRecord, SandboxRecord, now_ms};
use crate::store::{Store, Write};

/// Key prefix of policies in the store.
pub const PREFIX: &str = "policies/";

/// The name of the default policy when `--default-policy` is not given.
pub const DEFAULT_POLICY: &str = "default";

/// A policy as stored (JSON under `policies/<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredPolicy {
    name: String,
    spec: PolicySpec,
    revision: u64,
    created_at_ms: i64,
    updated_at_ms: i64,
}

/// A stored policy, compiled.
#[derive(Debug, Clone)]
pub struct PolicyEntry {
    pub policy: Arc<Policy>,
    pub revision: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Default)]
pub(crate) struct Policies {
    map: Mutex<BTreeMap<String, PolicyEntry>>,
    /// Given with `--default-policy`: it must exist.
    required_default: Mutex<Option<String>>,
}

impl Policies {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PolicyEntry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn invalid(errors: Vec<SpecError>) -> ControlError {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    ControlError::InvalidPolicy(lines.join("; "))
}

/// Compiles a policy kept in a sandbox record.
fn applied_from(record: &PolicyRecord) -> Result<AppliedPolicy, ControlError> {
    let policy = Policy::compile(&record.decision.policy, record.spec.clone()).map_err(invalid)?;
    Ok(AppliedPolicy {
        policy: Arc::new(policy),
        decision: record.decision.clone(),
    })
}

impl ControlPlane {
    /// Makes `name` the default policy, which must then exist for creates that name none.
    pub fn set_default_policy(&self, name: Option<String>) {
        *self
            .inner
            .policies
            .required_default
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = name;
    }

    /// The default policy's name (whether or not it exists).
    pub fn default_policy(&self) -> String {
        self.inner
            .policies
            .required_default
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| DEFAULT_POLICY.to_string())
    }

    /// Loads the stored policies; unreadable rows are left as they are.
    pub(crate) fn recover_policies(&self, store: &dyn Store) -> Result<usize, ControlError> {
        let mut map = self.inner.policies.lock();
        for (key, value) in store.scan(PREFIX)? {
            let stored = match serde_json::from_slice::<StoredPolicy>(&value) {
                Ok(s) => s,
                Err(e) => {
                    warn!(key, error = %e, "store: unreadable policy left as it is");
                    continue;
                }
            };
            match Policy::compile(&stored.name, stored.spec) {
                Ok(policy) => {
                    map.insert(
                        stored.name,
                        PolicyEntry {
                            policy: Arc::new(policy),
                            revision: stored.revision,
                            created_at_ms: stored.created_at_ms,
                            updated_at_ms: stored.updated_at_ms,
                        },
                    );
                }
                Err(e) => warn!(key, error = %invalid(e), "store: policy no longer compiles"),
            }
        }
        Ok(map.len())
    }

    /// Creates or replaces a policy. Returns it and whether it was created, and changed.
    pub async fn apply_policy(
        &self,
        name: &str,
        spec: PolicySpec,
    ) -> Result<(PolicyEntry, bool, bool), ControlError> {
        let policy = Policy::compile(name, spec).map_err(invalid)?;
        let now = now_ms();
        let old = self.inner.policies.lock().get(name).cloned();
        if let Some(old) = &old
            && old.policy.spec() == policy.spec()
        {
            return Ok((old.clone(), false, false));
        }
        let entry = PolicyEntry {
            policy: Arc::new(policy),
            revision: old.as_ref().map_or(1, |o| o.revision + 1),
            created_at_ms: old.as_ref().map_or(now, |o| o.created_at_ms),
            updated_at_ms: now,
        };
        let stored = StoredPolicy {
            name: name.to_string(),
            spec: entry.policy.spec().clone(),
            revision: entry.revision,
            created_at_ms: entry.created_at_ms,
            updated_at_ms: entry.updated_at_ms,
        };
        let value =
            serde_json::to_vec(&stored).map_err(|e| ControlError::Internal(e.to_string()))?;
        self.inner
            .store
            .write(Write::Put {
                key: key(name),
                value,
            })
            .await?;
        self.inner
            .policies
            .lock()
            .insert(name.to_string(), entry.clone());
        info!(
            policy = name,
            revision = entry.revision,
            hash = entry.policy.hash(),
            "policy applied"
        );
        Ok((entry, old.is_none(), true))
    }

    pub fn get_policy(&self, name: &str) -> Result<PolicyEntry, ControlError> {
        self.inner
            .policies
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::PolicyNotFound { name: name.into() })
    }

    pub fn list_policies(&self) -> Vec<PolicyEntry> {
        self.inner.policies.lock().values().cloned().collect()
    }

    /// Names of the sandboxes admitted under the policy `name`, sorted.
    pub fn sandboxes_under(&self, name: &str) -> Vec<String> {
        self.sandbox_names(|r| r.policy.as_ref().is_some_and(|p| p.decision.policy == name))
    }

    /// Removes a policy no sandbox holds.
    pub async fn delete_policy(&self, name: &str) -> Result<PolicyEntry, ControlError> {
        let entry = self.get_policy(name)?;
        let held = self.sandboxes_under(name);
        if !held.is_empty() {
            return Err(ControlError::PolicyInUse {
                name: name.into(),
                sandboxes: held,
            });
        }
        self.inner
            .store
            .write(Write::Delete { key: key(name) })
            .await?;
        self.inner.policies.lock().remove(name);
        info!(policy = name, "policy deleted");
        Ok(entry)
    }

    /// The policy a spec is evaluated against: the one it names, else the default.
    pub fn resolve_policy(&self, spec: &SandboxSpec) -> Result<Option<Arc<Policy>>, ControlError> {
        let map = self.inner.policies.lock();
        if let Some(name) = &spec.policy {
            return match map.get(name) {
                Some(e) => Ok(Some(e.policy.clone())),
                None => Err(ControlError::PolicyMissing {
                    name: name.clone(),
                    why: "spec.policy",
                }),
            };
        }
        let required = self
            .inner
            .policies
            .required_default
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match required {
            Some(name) => match map.get(&name) {
                Some(e) => Ok(Some(e.policy.clone())),
                None => Err(ControlError::PolicyMissing {
                    name,
                    why: "the server's --default-policy",
                }),
            },
            None => Ok(map.get(DEFAULT_POLICY).map(|e| e.policy.clone())),
        }
    }

    /// Evaluates a spec for a create: the policy and its decision, or the refusal.
    pub(crate) fn admit(
        &self,
        spec: &SandboxSpec,
        resources: &ResourceInfo,
    ) -> Result<Option<AppliedPolicy>, ControlError> {
        let Some(policy) = self.resolve_policy(spec)? else {
            return Ok(None);
        };
        let decision = policy.evaluate(spec, resources);
        refuse_unless_allowed(&spec.name, &decision)?;
        Ok(Some(AppliedPolicy { policy, decision }))
    }

    /// Evaluates an updated spec against the policy the sandbox was admitted under.
    pub(crate) fn readmit(
        &self,
        old: &SandboxRecord,
        spec: &SandboxSpec,
        resources: &ResourceInfo,
    ) -> Result<Option<PolicyRecord>, ControlError> {
        let Some(record) = &old.policy else {
            return Ok(None);
        };
        let applied = applied_from(record)?;
        let decision = applied.policy.evaluate(spec, resources);
        refuse_unless_allowed(&spec.name, &decision)?;
        Ok(Some(PolicyRecord {
            spec: record.spec.clone(),
            decision,
        }))
    }

    /// The compiled policy of a recovered record (for the backends).
    pub(crate) fn applied_of(&self, rec: &SandboxRecord) -> Option<AppliedPolicy> {
        let record = rec.policy.as_ref()?;
        match applied_from(record) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(sandbox = %rec.spec.name, error = %e, "its policy no longer compiles");
                None
            }
        }
    }

    /// `warren policy check`: evaluates without creating. With `inline`, that policy;
    /// with `name`, the stored one; else the one a create would use.
    pub fn check_policy(
        &self,
        spec: &SandboxSpec,
        name: Option<&str>,
        inline: Option<(String, PolicySpec)>,
    ) -> Result<Option<Decision>, ControlError> {
        let resources = spec
            .validate()
            .map_err(|e| ControlError::InvalidSpec(e.to_string()))?;
        let policy = match (inline, name) {
            (Some((name, spec)), _) => {
                Some(Arc::new(Policy::compile(&name, spec).map_err(invalid)?))
            }
            (None, Some(name)) => Some(self.get_policy(name)?.policy),
            (None, None) => self.resolve_policy(spec)?,
        };
        Ok(policy.map(|p| p.evaluate(spec, &resources)))
    }
}

fn refuse_unless_allowed(sandbox: &str, decision: &Decision) -> Result<(), ControlError> {
    if decision.allows() {
        return Ok(());
    }
    Err(ControlError::PolicyViolation {
        sandbox: sandbox.to_string(),
        policy: decision.policy.clone(),
        violations: decision
            .violations
            .iter()
            .map(ToString::to_string)
            .collect(),
    })
}
