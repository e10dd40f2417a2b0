//! The backends of a `warren agent` process: slot, wasm and linux on one state directory,
//! with their image store and the channel their status changes arrive on.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use warren_image::ImageStore;
use warren_linux::{LinuxBackend, LinuxConfig};
use warren_runtime::{Backend, BackendEvent, SlotBackend, SlotCapacity};
use warren_wasm::{WasmBackend, WasmConfig};

/// How to set up a node's backends.
#[derive(Debug, Clone)]
pub struct BackendsConfig {
    /// The node's state directory: `slot/`, `wasm/`, `linux/`, `images/` below it.
    pub dir: PathBuf,
    pub slot_capacity: SlotCapacity,
    pub wasm: WasmConfig,
    pub default_grace: Duration,
    /// The linux backend's supervisor command ([`LinuxConfig::default_supervisor`]).
    pub linux_supervisor: Vec<OsString>,
    pub cgroup_parent: String,
    /// Warm shells kept from the start (`--warm linux:IMAGE=N`); pools change them later.
    pub linux_warm: Vec<(String, usize)>,
    /// The image store; `<dir>/images` when `None`.
    pub images_dir: Option<PathBuf>,
    /// Where linux `network.mode: egress` sandboxes get their addresses (CIDR, a `/30`
    /// each); every server and agent on one host needs a range of its own.
    pub linux_egress_range: String,
}

/// The backends, ready to hand to an [`crate::Agent`].
#[derive(Debug)]
pub struct Backends {
    pub backends: Vec<Arc<dyn Backend>>,
    /// Status changes the backends notice (a workload exited).
    pub events: mpsc::UnboundedReceiver<BackendEvent>,
    pub images: ImageStore,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the {backend} backend: {message}")]
pub struct BackendsError {
    pub backend: &'static str,
    pub message: String,
}

/// Opens the image store and creates the backends under `config.dir`.
pub fn build(config: &BackendsConfig) -> Result<Backends, BackendsError> {
    let fail = |backend: &'static str| {
        move |e: &dyn std::error::Error| BackendsError {
            backend,
            message: warren_runtime::error_chain(e),
        }
    };
    std::fs::create_dir_all(&config.dir).map_err(|e| fail("node")(&e))?;
    // Sandboxes' state, logs and root file systems: for root only.
    std::fs::set_permissions(
        &config.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| fail("node")(&e))?;
    let slot = SlotBackend::new(config.dir.join("slot"), config.slot_capacity)
        .map_err(|e| fail("slot")(&e))?;
    let images_dir = config
        .images_dir
        .clone()
        .unwrap_or_else(|| config.dir.join("images"));
    let images = ImageStore::open(&images_dir).map_err(|e| fail("image store")(&e))?;
    let (events, events_rx) = mpsc::unbounded_channel();
    let wasm = WasmBackend::with_images(
        config.dir.join("wasm"),
        config.wasm.clone(),
        events.clone(),
        Some(images.clone()),
    )
    .map_err(|e| fail("wasm")(&e))?;
    let linux = LinuxBackend::new(
        LinuxConfig {
            dir: config.dir.join("linux"),
            images: images.clone(),
            supervisor: config.linux_supervisor.clone(),
            cgroup_parent: config.cgroup_parent.clone(),
            log_max_bytes: config.wasm.log_max_bytes,
            default_stop_grace: config.default_grace,
            warm: config.linux_warm.clone(),
            // CRIU found the default way; checkpoints are taken through the server's own
            // backends only for now (docs/nodes.md).
            criu: None,
            restore_timeout: warren_linux::DEFAULT_RESTORE_TIMEOUT,
            egress_range: warren_linux::egress::parse_range(&config.linux_egress_range)
                .map_err(|e| fail("linux")(&e))?,
        },
        events,
    )
    .map_err(|e| fail("linux")(&e))?;
    Ok(Backends {
        backends: vec![Arc::new(slot), Arc::new(wasm), Arc::new(linux)],
        events: events_rx,
        images,
    })
}
