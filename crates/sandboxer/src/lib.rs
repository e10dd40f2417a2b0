//! `warren sandboxer`: containerd's sandbox API endpoint, serving
//! `containerd.services.sandbox.v1.Controller` on a unix socket for a containerd 2.x
//! `[proxy_plugins.NAME] type = "sandbox"`, and the same as the standalone
//! `resource-slot-sandboxer` binary (the ResourceSlot seed's name and flags).
//!
//! The sandboxer is a warren control plane with a second front door. It builds the plane
//! exactly as `warren server --dir` does ([`warren_control::Server`]), so a containerd pod is a
//! normal warren sandbox on the `slot` backend: accounted, written to
//! `<dir>/slot/<id>/resources.json` in the seed's format, persisted in `<dir>/state.redb`, and
//! visible to `warren ls` through the plane's own API socket (`--api-listen`, by default
//! `<dir>/warren.sock`). The trade-off: one process holds both APIs and the store's lock, so a
//! sandboxer and a `warren server` cannot share a `--dir`; point the CLI at the sandboxer's
//! API socket instead.
//!
//! - [`api`]: the code generated from containerd's own protos (`proto/`, vendored unchanged):
//!   the server this crate implements and the client its tests drive it with.
//! - [`resources`]: what a pod and its containers ask for, from CRI annotations, the CRI
//!   `PodSandboxConfig`, OCI specs and Kuasar's `extensions["tasks"]`; the pod's total.
//! - [`controller`]: the Controller service and the pods' containerd-side state.
//! - [`serve`]: configuration, sockets, systemd readiness, graceful shutdown.

pub mod api;
pub mod controller;
mod cri;
pub mod resources;
pub mod serve;

pub use cri::{
    LinuxContainerResources, LinuxPodSandboxConfig, POD_SANDBOX_CONFIG, PodSandboxConfig,
    PodSandboxMetadata,
};
pub use serve::{Args, Config, SandboxerError, notify_ready, run, shutdown_signal};
