//! Pools (seed 004's SandboxPool): pre-warmed sandboxes of one image kept ready on the
//! agents that match, stored like policies (`pools/<name>` in the store).
//!
//! A pool's spec bounds two numbers: the sandboxes created from it (`spec.pool`) that exist
//! (in use), and the pre-warmed ones waiting on its agents (warm). The plane keeps
//!
//! ```text
//! warm = min(bufferMax, max(bufferMin, min - inUse)), and at most max - inUse when max > 0
//! ```
//!
//! spread evenly over the pool's agents that are up (`nodeSelector` over their labels),
//! recomputed every tick and after every change. Agents keep that many through their
//! backend (the linux backend's warm shells: a claimed shell only gets the workload's
//! settings and execs it), and report how many are ready; the scheduler puts a create that
//! names the pool on an agent with a ready one first (a hit), else on any member (a miss,
//! a cold start). A create beyond `max` is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use warren_spec::{BackendKind, Phase, SandboxSpec, SpecError, validate_name};

use super::{ControlError, ControlPlane};
use crate::record::{SandboxRecord, now_ms};
use crate::selector::Selector;
use crate::store::Write;

/// Key prefix of pools in the store.
pub const PREFIX: &str = "pools/";

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn linux() -> BackendKind {
    BackendKind::Linux
}

/// What a pool keeps (the `spec` of a `kind: SandboxPool` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    /// Backend of its sandboxes: one with pre-warmed sandboxes, linux (the default) or vm.
    #[serde(default = "linux")]
    pub backend: BackendKind,
    pub image: String,
    /// Sandboxes the pool always holds, in use or pre-warmed.
    #[serde(default)]
    pub min: u32,
    /// Most sandboxes, in use and pre-warmed together; 0: no limit.
    #[serde(default)]
    pub max: u32,
    /// Pre-warmed sandboxes kept ready at least...
    #[serde(default)]
    pub buffer_min: u32,
    /// ...and at most (0: as many as `bufferMin`).
    #[serde(default)]
    pub buffer_max: u32,
    /// Label selector over agents' labels; empty: every agent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_selector: String,
}

impl PoolSpec {
    fn buffer_max(&self) -> u32 {
        if self.buffer_max == 0 {
            self.buffer_min
        } else {
            self.buffer_max
        }
    }

    /// Every problem, naming the field and its value.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if !matches!(self.backend, BackendKind::Linux | BackendKind::Vm) {
            errors.push(format!(
                "spec.backend: {:?} keeps no pre-warmed sandboxes (pools need linux or vm)",
                self.backend.as_str()
            ));
        }
        let probe = SandboxSpec {
            name: "pool".into(),
            image: Some(self.image.clone()),
            ..Default::default()
        };
        if self.image.is_empty() {
            errors.push("spec.image: missing (the image every sandbox of the pool runs)".into());
        } else if self.image.starts_with('/') {
            // A root directory used in place: nothing to pre-warm from (a warm shell is made
            // from an image's layers), so every create would miss the pool.
            errors.push(format!(
                "spec.image: {:?} is a root directory; a pool pre-warms sandboxes of an image \
                 in the store (warren image import, warren pull)",
                self.image
            ));
        } else if let Err(e) = probe.validate() {
            errors.push(e.to_string());
        }
        if self.max > 0 && self.min > self.max {
            errors.push(format!(
                "spec.min: {} is more than spec.max ({})",
                self.min, self.max
            ));
        }
        if self.buffer_max > 0 && self.buffer_min > self.buffer_max {
            errors.push(format!(
                "spec.bufferMin: {} is more than spec.bufferMax ({})",
                self.buffer_min, self.buffer_max
            ));
        }
        if self.max > 0 && self.buffer_max() > self.max {
            errors.push(format!(
                "spec.bufferMax: {} is more than spec.max ({})",
                self.buffer_max(),
                self.max
            ));
        }
        if self.buffer_max() > 1000 {
            errors.push(format!(
                "spec.bufferMax: {} pre-warmed sandboxes is more than 1000",
                self.buffer_max()
            ));
        }
        if let Err(e) = Selector::parse(&self.node_selector) {
            errors.push(format!("spec.nodeSelector: {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Pre-warmed sandboxes wanted with `in_use` sandboxes of the pool in existence.
    pub fn warm_target(&self, in_use: u32) -> u32 {
        let want = self
            .buffer_min
            .max(self.min.saturating_sub(in_use))
            .min(self.buffer_max());
        if self.max > 0 {
            want.min(self.max.saturating_sub(in_use))
        } else {
            want
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredPool {
    name: String,
    spec: PoolSpec,
    revision: u64,
    created_at_ms: i64,
    updated_at_ms: i64,
}

/// A stored pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolEntry {
    pub name: String,
    pub spec: PoolSpec,
    pub revision: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A pool as it is now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub in_use: u32,
    pub ready: u32,
    pub target: u32,
    pub nodes: Vec<String>,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Pools {
    map: Mutex<BTreeMap<String, PoolEntry>>,
    /// Creates from each pool that took a pre-warmed sandbox, and that started cold.
    counts: Mutex<HashMap<String, (u64, u64)>>,
    /// What pools keep warm on the in-process agent.
    local: Mutex<HashSet<(BackendKind, String)>>,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PoolEntry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ControlPlane {
    /// Loads the stored pools; unreadable rows are left as they are.
    pub(super) fn recover_pools(&self) -> Result<usize, ControlError> {
        let mut n = 0;
        for (key, value) in self.inner.store.scan(PREFIX)? {
            match serde_json::from_slice::<StoredPool>(&value) {
                Ok(p) => {
                    self.inner.nodes.set_pool(&p.name, Some(rule(&p.spec)));
                    self.inner.pools.lock().insert(
                        p.name.clone(),
                        PoolEntry {
                            name: p.name,
                            spec: p.spec,
                            revision: p.revision,
                            created_at_ms: p.created_at_ms,
                            updated_at_ms: p.updated_at_ms,
                        },
                    );
                    n += 1;
                }
                Err(e) => warn!(key, error = %e, "store: unreadable pool left as it is"),
            }
        }
        Ok(n)
    }

    /// Creates or replaces a pool: its entry, and whether it was created and changed.
    pub async fn apply_pool(
        &self,
        name: &str,
        spec: PoolSpec,
    ) -> Result<(PoolEntry, bool, bool), ControlError> {
        validate_name("name", name)
            .map_err(|e: SpecError| ControlError::InvalidPool(e.to_string()))?;
        spec.validate()
            .map_err(|errors| ControlError::InvalidPool(errors.join("; ")))?;
        let old = self.inner.pools.lock().get(name).cloned();
        if let Some(old) = &old
            && old.spec == spec
        {
            return Ok((old.clone(), false, false));
        }
        let now = now_ms();
        let entry = PoolEntry {
            name: name.to_string(),
            spec,
            revision: old.as_ref().map_or(1, |o| o.revision + 1),
            created_at_ms: old.as_ref().map_or(now, |o| o.created_at_ms),
            updated_at_ms: now,
        };
        let stored = StoredPool {
            name: entry.name.clone(),
            spec: entry.spec.clone(),
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
        self.inner.nodes.set_pool(name, Some(rule(&entry.spec)));
        self.inner
            .pools
            .lock()
            .insert(name.to_string(), entry.clone());
        info!(pool = name, revision = entry.revision, image = %entry.spec.image, "pool applied");
        self.refresh_pools();
        Ok((entry, old.is_none(), true))
    }

    pub fn get_pool(&self, name: &str) -> Result<PoolEntry, ControlError> {
        self.inner
            .pools
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::PoolNotFound { name: name.into() })
    }

    pub fn list_pools(&self) -> Vec<PoolEntry> {
        self.inner.pools.lock().values().cloned().collect()
    }

    /// Removes a pool and its pre-warmed sandboxes; refused while sandboxes of it exist.
    pub async fn delete_pool(&self, name: &str) -> Result<PoolEntry, ControlError> {
        let entry = self.get_pool(name)?;
        let users = self.pool_users(name);
        if !users.is_empty() {
            return Err(ControlError::PoolInUse {
                name: name.into(),
                sandboxes: users,
            });
        }
        self.inner
            .store
            .write(Write::Delete { key: key(name) })
            .await?;
        self.inner.pools.lock().remove(name);
        self.inner.nodes.set_pool(name, None);
        info!(pool = name, "pool deleted");
        self.refresh_pools();
        Ok(entry)
    }

    /// Names of the sandboxes created from the pool, sorted.
    fn pool_users(&self, name: &str) -> Vec<String> {
        self.sandbox_names(|r| r.spec.pool.as_deref() == Some(name))
    }

    fn in_use(&self) -> HashMap<String, u32> {
        let reg = self.lock();
        let mut counts = HashMap::new();
        for e in reg.sandboxes.values() {
            if let Some(pool) = &e.record.spec.pool
                && e.record.status != Phase::Deleted
            {
                *counts.entry(pool.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// A pool as it is now.
    pub fn pool_status(&self, entry: &PoolEntry) -> PoolStatus {
        let in_use = self.in_use().get(&entry.name).copied().unwrap_or(0);
        let nodes = self.inner.nodes.pool_members(&entry.name);
        let ready = self
            .inner
            .nodes
            .list()
            .iter()
            .filter(|n| nodes.contains(&n.name))
            .flat_map(|n| n.warm.iter())
            .filter(|w| w.backend == entry.spec.backend && w.image == entry.spec.image)
            .map(|w| w.ready)
            .sum();
        let (hits, misses) = self
            .inner
            .pools
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&entry.name)
            .copied()
            .unwrap_or_default();
        PoolStatus {
            in_use,
            ready,
            target: entry.spec.warm_target(in_use),
            nodes,
            hits,
            misses,
        }
    }

    /// Recomputes what every node keeps pre-warmed for the pools, and applies the
    /// in-process agent's share (remote agents get theirs with their next heartbeat reply).
    pub fn refresh_pools(&self) {
        let pools = self.list_pools();
        // A registry scan only when there is a pool to count for.
        let in_use = if pools.is_empty() {
            HashMap::new()
        } else {
            self.in_use()
        };
        let mut targets: HashMap<String, HashMap<(BackendKind, String), u32>> = HashMap::new();
        for pool in &pools {
            let used = in_use.get(&pool.name).copied().unwrap_or(0);
            let want = pool.spec.warm_target(used);
            let members = self.inner.nodes.pool_members(&pool.name);
            let Some(m) = u32::try_from(members.len()).ok().filter(|m| *m > 0) else {
                continue;
            };
            for (k, node) in members.iter().enumerate() {
                let share = want / m + u32::from((k as u32) < want % m);
                *targets
                    .entry(node.clone())
                    .or_default()
                    .entry((pool.spec.backend, pool.spec.image.clone()))
                    .or_insert(0) += share;
            }
        }
        let targets: HashMap<String, Vec<(BackendKind, String, u32)>> = targets
            .into_iter()
            .map(|(node, t)| {
                let mut v: Vec<_> = t.into_iter().map(|((b, i), n)| (b, i, n)).collect();
                v.sort();
                (node, v)
            })
            .collect();
        let mine = self.inner.nodes.set_warm_targets(&targets);
        self.apply_local_warm(&mine);
        self.inner.nodes.refresh_local_warm();
    }

    /// Sets the in-process agent's pre-warmed sandboxes.
    fn apply_local_warm(&self, targets: &[(BackendKind, String, u32)]) {
        self.agent()
            .apply_warm_targets(targets, &self.inner.pools.local);
    }

    /// A create naming a pool: the pool must exist and have room; the spec takes the pool's
    /// image and backend, and may name only those (or the default backend, slot).
    pub(super) fn fill_from_pool(&self, spec: &mut SandboxSpec) -> Result<(), ControlError> {
        let Some(name) = spec.pool.clone() else {
            return Ok(());
        };
        let pool = self
            .inner
            .pools
            .lock()
            .get(&name)
            .cloned()
            .ok_or_else(|| ControlError::PoolMissing { name: name.clone() })?;
        if let Some(image) = &spec.image
            && *image != pool.spec.image
        {
            return Err(ControlError::InvalidSpec(format!(
                "spec.image: {image:?} is not the image of pool {name:?} ({:?})",
                pool.spec.image
            )));
        }
        // The default backend (slot) gives way to the pool's; another one was asked for.
        if spec.backend != BackendKind::Slot && spec.backend != pool.spec.backend {
            return Err(ControlError::InvalidSpec(format!(
                "spec.backend: {:?} is not the backend of pool {name:?} ({:?})",
                spec.backend.as_str(),
                pool.spec.backend.as_str()
            )));
        }
        spec.image = Some(pool.spec.image.clone());
        spec.backend = pool.spec.backend;
        if pool.spec.max > 0 && !self.lock().sandboxes.contains_key(&spec.name) {
            let in_use = self.in_use().get(&name).copied().unwrap_or(0);
            if in_use >= pool.spec.max {
                self.inner.metrics.error("pool_full");
                return Err(ControlError::PoolFull {
                    name,
                    max: pool.spec.max,
                });
            }
        }
        Ok(())
    }

    /// Counts a create from a pool as a hit (it took a pre-warmed sandbox) or a miss, and
    /// tops the pool up.
    pub(super) fn pool_started(&self, rec: &SandboxRecord) {
        let Some(pool) = &rec.spec.pool else {
            return;
        };
        let hit = rec.backend_info.get("warm").is_some_and(|w| w == "true");
        {
            let mut counts = self
                .inner
                .pools
                .counts
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let c = counts.entry(pool.clone()).or_default();
            if hit {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
        self.inner.metrics.pool_create(pool, hit);
        self.refresh_pools();
    }

    /// Ready and wanted pre-warmed sandboxes and sandboxes in use, by pool (metrics).
    pub fn pool_sizes(&self) -> Vec<(String, PoolStatus)> {
        self.list_pools()
            .iter()
            .map(|p| (p.name.clone(), self.pool_status(p)))
            .collect()
    }
}

fn rule(spec: &PoolSpec) -> (Selector, BackendKind) {
    // Validated when applied; a stored selector that no longer parses matches every agent.
    (
        Selector::parse(&spec.node_selector).unwrap_or_default(),
        spec.backend,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: u32, max: u32, bmin: u32, bmax: u32) -> PoolSpec {
        PoolSpec {
            backend: BackendKind::Linux,
            image: "busybox".into(),
            min,
            max,
            buffer_min: bmin,
            buffer_max: bmax,
            node_selector: String::new(),
        }
    }

    #[test]
    fn warm_target_follows_the_documented_formula() {
        // Buffer only.
        assert_eq!(spec(0, 0, 2, 0).warm_target(0), 2);
        assert_eq!(spec(0, 0, 2, 0).warm_target(50), 2);
        // min fills up to bufferMax while little is in use.
        assert_eq!(spec(5, 0, 1, 3).warm_target(0), 3);
        assert_eq!(spec(5, 0, 1, 3).warm_target(3), 2);
        assert_eq!(spec(5, 0, 1, 3).warm_target(10), 1);
        // max caps in use + warm.
        assert_eq!(spec(0, 4, 2, 0).warm_target(3), 1);
        assert_eq!(spec(0, 4, 2, 0).warm_target(4), 0);
    }

    #[test]
    fn bad_pools_name_every_field() {
        let mut bad = spec(5, 2, 3, 1);
        bad.backend = BackendKind::Slot;
        bad.node_selector = "in (".into();
        let errors = bad.validate().unwrap_err();
        let fields: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            fields,
            [
                "spec.backend",
                "spec.min",
                "spec.bufferMin",
                "spec.nodeSelector"
            ],
            "{errors:?}"
        );
        let mut no_image = spec(0, 0, 1, 0);
        no_image.image.clear();
        assert!(no_image.validate().unwrap_err()[0].starts_with("spec.image: missing"));
        assert!(spec(0, 0, 1, 2).validate().is_ok());
        // A root directory has no layers to pre-warm a shell from.
        let mut root_dir = spec(0, 0, 1, 0);
        root_dir.image = "/srv/rootfs".into();
        let errors = root_dir.validate().unwrap_err();
        assert!(
            errors.len() == 1
                && errors[0].starts_with("spec.image: \"/srv/rootfs\" is a root directory"),
            "{errors:?}"
        );
    }
}
