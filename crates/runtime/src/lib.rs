//! The `Backend` trait and warren's isolation backends.
//!
//! A backend turns a validated sandbox (a [`SandboxConfig`]) into something that runs on this
//! node: a record (`slot`), a container (`linux`), a Wasm instance (`wasm`) or a microVM (`vm`).
//! The trait is narrow on purpose: five required lifecycle methods plus `is_available`, and
//! optional capabilities (`update`, `adopt`, `list`) with defaults, so a new backend is small
//! and the control plane never special-cases one.
//!
//! Backends own only node-local state. The control plane's store is the source of truth: on
//! restart it hands every sandbox it knows back to the backend with [`Backend::adopt`], and
//! removes what the backend has but the store does not ([`Backend::list`]).
//!
//! Backends are dispatched through `Arc<dyn Backend>`; `async-trait` boxes the futures, which
//! costs one allocation per call, noise next to any backend's real work.

mod backend;
pub mod logs;
pub mod slot;

pub use backend::{
    AppliedPolicy, Backend, BackendError, BackendEvent, BackendInfo, BackendStatus, CheckpointInfo,
    EventSink, ExecProcess, ExecRequest, ProcessInfo, Resize, SandboxConfig, Stdin, Usage,
    check_resolved_host_path, format_warm, linux_only_fields, no_published_ports, parse_warm,
    remove_tree, resolve_host_path, sandbox_dirs,
};
pub use slot::{SlotBackend, SlotCapacity};

/// An error's message followed by its causes ("write 5 to /x: Device or resource busy"):
/// errors here keep the OS error as their source, and a user needs both.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}
