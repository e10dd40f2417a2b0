//! The backend's share of `network.mode: egress` ([`crate::egress`]): each sandbox's `/30` of
//! the server's range, the range's nftables table (written whole at the start of a server
//! that has had egress sandboxes, so a crash leaves nothing behind), and the teardown at
//! delete. The supervisor sets a sandbox's network up and takes it down when it ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::Ipv4Net;
use tracing::{info, warn};
use warren_runtime::BackendError;

use crate::config::{self, ContainerConfig, State};
use crate::egress::{self, Destination, Egress, Pool};

/// Marks a backend directory that has had egress sandboxes: only then does a server start
/// look at the bundles and rewrite the table.
const MARKER: &str = ".egress";

#[derive(Debug)]
pub(super) struct Network {
    range: Ipv4Net,
    marker: PathBuf,
    state: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    pool: Pool,
    /// Every sandbox holding a `/30` (running or not, until it is deleted).
    held: HashMap<String, Egress>,
    /// This server has written the range's table.
    table_written: bool,
}

impl Network {
    /// The range's state at a server's start: when the directory has had egress sandboxes,
    /// every bundle's `/30` is taken again and the table rewritten with the chains of the
    /// sandboxes still running (a killed supervisor's chain goes away here).
    pub(super) fn new(dir: &Path, range: Ipv4Net) -> Network {
        let network = Network {
            range,
            marker: dir.join(MARKER),
            state: Mutex::new(Held::default()),
        };
        if network.marker.exists() {
            network.reconcile(dir);
        }
        network
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reconcile(&self, dir: &Path) {
        let mut live = Vec::new();
        let mut state = self.lock();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let bundle = entry.path();
            let Ok(container) = config::read_json::<ContainerConfig>(&bundle, config::CONFIG_FILE)
            else {
                continue;
            };
            let name = entry.file_name();
            let (Some(e), Some(id)) = (container.egress, name.to_str()) else {
                continue;
            };
            if e.range() != self.range {
                continue;
            }
            state.pool.mark(e.index, id);
            let running = config::read_json::<State>(&bundle, config::STATE_FILE)
                .is_ok_and(|s| s.supervisor_alive())
                && !bundle.join(config::EXIT_FILE).exists();
            if running {
                live.push(e.clone());
            }
            state.held.insert(id.to_string(), e);
        }
        if state.held.is_empty() {
            // No sandbox holds a /30 any more: nothing of it stays in the host's firewall.
            self.remove_table(&mut state);
            return;
        }
        match egress::reconcile(self.range, &live) {
            Ok(()) => {
                info!(range = %self.range, running = live.len(), "linux: egress table rewritten");
                state.table_written = true;
            }
            Err(e) => warn!(range = %self.range, "linux: cannot rewrite the egress table: {e}"),
        }
    }

    /// Removes the range's table and the directory's mark (the next egress sandbox writes
    /// both again). Called with the state locked, so no `/30` is taken meanwhile.
    fn remove_table(&self, state: &mut Held) {
        match egress::remove_table(self.range) {
            Ok(()) => {
                state.table_written = false;
                let _ = std::fs::remove_file(&self.marker);
                info!(range = %self.range, "linux: egress table removed (no sandbox holds one)");
            }
            Err(e) => warn!(range = %self.range, "linux: cannot remove the egress table: {e}"),
        }
    }

    /// Takes a `/30` for sandbox `id` with the policy's destinations. The first one of this
    /// server writes the range's table.
    pub(super) fn take(
        &self,
        id: &str,
        allow: Vec<Destination>,
        bandwidth: Option<u64>,
    ) -> Result<Egress, BackendError> {
        let unavailable = |e: egress::EgressError| {
            BackendError::Invalid(format!(
                "policy.network.mode: \"egress\" cannot be set up here: {e}"
            ))
        };
        let tc = bandwidth.map(|_| "tc");
        for tool in ["ip", "nft", "nsenter"].into_iter().chain(tc) {
            egress::tool(tool).map_err(unavailable)?;
        }
        let mut state = self.lock();
        if !state.table_written {
            // A table nobody reconciled: no sandbox of this directory holds a chain yet.
            std::fs::write(&self.marker, b"").map_err(|e| BackendError::Io {
                action: "write",
                path: self.marker.display().to_string(),
                source: e,
            })?;
            let live: Vec<Egress> = Vec::new();
            egress::reconcile(self.range, &live).map_err(unavailable)?;
            state.table_written = true;
        }
        let index = state
            .pool
            .take(self.range, id)
            .map_err(|e| BackendError::Other(e.to_string()))?;
        let e = Egress {
            base: self.range.network(),
            prefix: self.range.prefix_len(),
            index,
            allow,
            bandwidth,
        };
        state.held.insert(id.to_string(), e.clone());
        Ok(e)
    }

    /// Whether sandbox `id` holds a `/30`.
    pub(super) fn holds(&self, id: &str) -> bool {
        self.lock().held.contains_key(id)
    }

    /// Gives back sandbox `id`'s `/30`, removing its chain and pair if they are still there.
    /// Blocking (runs `ip` and `nft`).
    pub(super) fn release(&self, id: &str) {
        let held = {
            let mut state = self.lock();
            state.pool.release(id);
            state.held.remove(id)
        };
        if let Some(e) = held
            && let Err(err) = egress::teardown(&e)
        {
            warn!(id, "linux: egress teardown: {err}");
        }
        let mut state = self.lock();
        if state.held.is_empty() && state.table_written {
            self.remove_table(&mut state);
        }
    }
}
