//! The janitor (seed 004's node janitor): removes sandboxes, and their files, that the
//! control plane does not know.
//!
//! Orphans happen: a fast create whose record was never written (the store failed, or the
//! control plane died before its write behind), a sandbox re-created elsewhere while its
//! agent was unreachable, a control plane that lost its state. Every `period` the janitor
//! lists what the node's backends hold, asks the control plane which of the ids it has held
//! for longer than the orphan timeout it does not know, and removes those (stop without a
//! grace period, then delete), logging each one. An id is judged only after the timeout, so
//! a create in flight (its record on the way) is never taken for an orphan; when the
//! control plane cannot be asked, nothing is removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};
use warren_spec::BackendKind;

use crate::Agent;

/// Seed 004's `--fastpath-orphan-timeout` default.
pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(10);

/// Who decides what is an orphan: the control plane.
#[async_trait::async_trait]
pub trait Oracle: Send + Sync {
    /// The ids among `ids` that the control plane does not know; `Err` when it cannot tell.
    async fn unknown(&self, ids: Vec<String>) -> Result<Vec<String>, String>;
}

/// Called with each id the janitor removed (the agent process gives its slot back).
pub type OnRemoved = Arc<dyn Fn(&str) + Send + Sync>;

/// The janitor of one node.
pub struct Janitor {
    agent: Agent,
    oracle: Arc<dyn Oracle>,
    orphan_timeout: Duration,
    on_removed: Option<OnRemoved>,
    /// When each id was first seen on the node.
    seen: HashMap<(BackendKind, String), Instant>,
}

impl std::fmt::Debug for Janitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Janitor")
            .field("node", &self.agent.node())
            .field("orphan_timeout", &self.orphan_timeout)
            .finish_non_exhaustive()
    }
}

impl Janitor {
    pub fn new(agent: Agent, oracle: Arc<dyn Oracle>, orphan_timeout: Duration) -> Self {
        Janitor {
            agent,
            oracle,
            orphan_timeout,
            on_removed: None,
            seen: HashMap::new(),
        }
    }

    pub fn on_removed(mut self, f: OnRemoved) -> Self {
        self.on_removed = Some(f);
        self
    }

    /// How often [`Janitor::run`] sweeps: half the orphan timeout, between 1 and 30 s, so an
    /// orphan goes within 1.5 timeouts of its appearance.
    pub fn period(&self) -> Duration {
        (self.orphan_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// One pass: returns the ids removed.
    pub async fn sweep(&mut self) -> Vec<String> {
        let held = match self.agent.list().await {
            Ok(held) => held,
            Err(e) => {
                warn!(error = %e, "janitor: cannot list the node's sandboxes");
                return Vec::new();
            }
        };
        let now = Instant::now();
        let mut still = HashMap::with_capacity(held.len());
        for key in held {
            let since = self.seen.get(&key).copied().unwrap_or(now);
            still.insert(key, since);
        }
        self.seen = still;
        let old: Vec<(BackendKind, String)> = self
            .seen
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= self.orphan_timeout)
            .map(|(k, _)| k.clone())
            .collect();
        if old.is_empty() {
            return Vec::new();
        }
        let ids: Vec<String> = old.iter().map(|(_, id)| id.clone()).collect();
        let unknown = match self.oracle.unknown(ids).await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "janitor: cannot ask the control plane; removing nothing");
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for (kind, id) in old {
            if !unknown.contains(&id) {
                continue;
            }
            let age = self
                .seen
                .get(&(kind, id.clone()))
                .map(|s| now.duration_since(*s))
                .unwrap_or_default();
            // Stop first: a linux orphan may still run its workload.
            let _ = self.agent.stop(kind, &id, Duration::ZERO).await;
            match self.agent.delete(kind, &id).await {
                Ok(()) => {
                    info!(backend = %kind, id, seen_for = ?age, "janitor: removed an orphan the control plane does not know");
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    warn!(backend = %kind, id, error = %e, "janitor: could not remove an orphan");
                    continue;
                }
            }
            self.seen.remove(&(kind, id.clone()));
            if let Some(f) = &self.on_removed {
                f(&id);
            }
            removed.push(id);
        }
        removed
    }

    /// Sweeps every [`Janitor::period`] until `stop` turns true (or its sender goes).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.sweep().await; }
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use warren_runtime::{Backend, SandboxConfig, SlotBackend, SlotCapacity};
    use warren_spec::SandboxSpec;

    use super::*;

    #[derive(Default)]
    struct Known(Mutex<Option<Vec<String>>>);

    #[async_trait::async_trait]
    impl Oracle for Known {
        async fn unknown(&self, ids: Vec<String>) -> Result<Vec<String>, String> {
            match &*self.0.lock().unwrap() {
                Some(known) => Ok(ids.into_iter().filter(|i| !known.contains(i)).collect()),
                None => Err("control plane unreachable".into()),
            }
        }
    }

    #[tokio::test]
    async fn removes_only_unknown_ids_older_than_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let slot = SlotBackend::new(tmp.path(), SlotCapacity::default()).unwrap();
        let agent = Agent::new("n", [Arc::new(slot) as Arc<dyn Backend>]);
        for id in ["kept", "orphan"] {
            let config = SandboxConfig {
                id: id.into(),
                spec: SandboxSpec {
                    name: id.into(),
                    ..Default::default()
                },
                ..Default::default()
            };
            agent.run(&config).await.unwrap();
        }
        let oracle = Arc::new(Known::default());
        let removed_ids = Arc::new(Mutex::new(Vec::new()));
        let r = removed_ids.clone();
        let mut janitor = Janitor::new(agent.clone(), oracle.clone(), Duration::from_millis(200))
            .on_removed(Arc::new(move |id| r.lock().unwrap().push(id.to_string())));
        // Too young to judge.
        assert!(janitor.sweep().await.is_empty());
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The control plane cannot be asked: nothing goes.
        assert!(janitor.sweep().await.is_empty());
        *oracle.0.lock().unwrap() = Some(vec!["kept".into()]);
        assert_eq!(janitor.sweep().await, vec!["orphan".to_string()]);
        assert!(!tmp.path().join("orphan").exists(), "its files are gone");
        assert!(tmp.path().join("kept").exists());
        assert_eq!(*removed_ids.lock().unwrap(), vec!["orphan".to_string()]);
        assert_eq!(
            agent.list().await.unwrap(),
            vec![(BackendKind::Slot, "kept".to_string())]
        );
    }
}
