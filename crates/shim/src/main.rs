//! `containerd-shim-warren-v1`: a containerd shim v2 (`runtime_type = "io.containerd.warren.v1"`)
//! that turns containerd tasks into warren sandboxes.
//!
//! The shim runs no workload: the warren server is the source of truth, and the shim forwards
//! each task to it over warren's gRPC API (server from the `warren.dev/server` annotation, else
//! `WARREN_SERVER` in containerd's environment, else the default socket). A `slot` task runs
//! until killed and exits with 128 + signal; a `linux` task is a real container on the rootfs
//! containerd prepared, its output copied to containerd's FIFOs. Deleting a task removes its
//! sandbox. See docs/containerd.md.

mod bootstrap;
mod bundle;
mod rootfs;
mod task;
mod warren;

#[tokio::main]
async fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = bootstrap::run(&args).await {
        eprintln!("containerd-shim-warren-v1: {e:#}");
        std::process::exit(1);
    }
}
