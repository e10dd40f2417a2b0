//! warren's control plane: the sandbox registry, the state store, the gRPC API and the
//! server that ties them together.
//!
//! - [`plane`] owns every state change of a sandbox (create, update, delete, expiry,
//!   recovery) and the event stream `WatchSandboxes` reads.
//! - [`store`] is where acknowledged state lives: redb with group commit by default, etcd
//!   for several servers (`--store etcd://...`), where [`leader`] elects the one that serves.
//! - [`grpc`] maps the wire API onto the plane, and errors onto gRPC codes, in one place;
//!   [`policies`] serves the stored policies and `CheckPolicy` (the plane's `plane/policy.rs`
//!   resolves and evaluates them on every create and update).
//! - [`checkpoints`] serves checkpoints and keeps them on disk with their manifests (the
//!   plane's `plane/checkpoint.rs` takes and restores them through the backends).
//! - [`server`] binds, authenticates and serves; [`client`] connects to it.
//! - [`nodes`] holds the agents behind one seam (the in-process one and `warren agent`
//!   processes), decides which are alive, and places sandboxes with the [`scheduler`];
//!   [`cluster_grpc`] serves agents' heartbeats, `warren nodes` and pools; [`link`] is the
//!   agent process's side of it.
//!
//! The control plane never runs workloads itself: it calls node agents
//! (`warren_agent::Agent` in-process, `warren_agent::remote::RemoteAgent` over HTTP).

pub mod address;
pub mod checkpoints;
pub mod client;
pub mod cluster_grpc;
pub mod grpc;
pub mod images;
pub mod leader;
pub mod link;
pub mod metrics;
pub mod nodes;
pub mod plane;
pub mod policies;
pub mod record;
pub mod registrations;
pub mod scheduler;
pub mod selector;
pub mod server;
pub mod socket;
pub mod store;

pub use address::Address;
pub use plane::{ControlError, ControlPlane, PlaneOptions, SandboxUpdate};
pub use server::{Server, ServerConfig, ServerError, StoreConfig};
pub use warren_linux::{DEFAULT_RESTORE_TIMEOUT, LinuxConfig};
pub use warren_vm::VmConfig;
pub use warren_wasm::WasmConfig;
