//! The protocol between warren's `vm` backend (the host) and `warren-guest`, PID 1 inside
//! each VM.
//!
//! The guest serves the task API of `proto/guest.proto` with tonic: HTTP/2 over the one byte
//! stream the VM has to its host, a virtio-serial port (`/dev/vportNpM`, named
//! [`PORT_NAME`]) backed on the host by a unix socket of qemu's; or, when the kernel command
//! line says `warren.vsock=PORT` ([`VSOCK_PARAM`]), one connection per host connection on
//! that vsock port. gRPC gives the framing,
//! streams (output, exec) and errors; nothing is parsed by hand on either side.
//!
//! This library half is what the host links: the generated client and server code and the
//! constants both sides agree on. The guest's own code (mounts, processes, the port) lives in
//! the `warren-guest` binary, which is built static for the initramfs by
//! `scripts/vm-assets.sh`.

#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod proto {
    tonic::include_proto!("warren.guest.v1");
}

/// The version a guest reports in `Ping`; the host refuses a guest from another version (a
/// stale initramfs would speak an older protocol).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `Start` takes `seed` (a clone's `Prepare` folded into its `Start`). A guest without it
/// would ignore the field and keep its template's RNG state, so a host sends it only to a
/// guest whose `Ping` lists this.
pub const FEATURE_START_SEEDS: &str = "start-seeds";

/// `Start` applies `storage_bytes`. A guest without it would ignore the field and let the
/// workload write without a limit, so a host refuses to start a storage-limited sandbox in a
/// guest whose `Ping` does not list this.
pub const FEATURE_STORAGE_LIMIT: &str = "storage-limit";

/// What this guest lists in `PingReply::features`.
pub const FEATURES: &[&str] = &[FEATURE_START_SEEDS, FEATURE_STORAGE_LIMIT];

/// The virtio-serial port's name (`-device virtserialport,name=...`).
pub const PORT_NAME: &str = "warren.0";

/// The kernel parameter that makes the guest serve on vsock instead of the virtio-serial
/// port (`warren.vsock=PORT`), and the port the host gives it.
pub const VSOCK_PARAM: &str = "warren.vsock";
pub const VSOCK_PORT: u32 = 1024;

/// The vsock port in a kernel command line's `warren.vsock=PORT`, if it has one.
pub fn vsock_port(cmdline: &str) -> Option<Result<u32, String>> {
    let value = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(VSOCK_PARAM)?.strip_prefix('='))?;
    Some(
        value
            .parse()
            .map_err(|_| format!("{VSOCK_PARAM}={value}: not a port number")),
    )
}

/// What the guest prints on its console when it waits for a host to connect: at boot, and
/// on the virtio-serial port after each host connection ended (over vsock, at boot only:
/// it listens from then on).
pub const WAITING_FOR_HOST: &str = "warren-guest: waiting for a host";

/// Where the guest mounts its cgroup2 hierarchy, and the workload's cgroup under it.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const WORKLOAD_CGROUP: &str = "sandbox";

/// The sandbox id a guest was given, readable by its processes.
pub const ID_FILE: &str = "/run/warren/id";

/// Guest-side output kept per stream for a host that reconnects (after a server restart);
/// older output is dropped and reported as `Dropped`.
pub const OUTPUT_KEEP_BYTES: usize = 4 << 20;

pub mod hello;
pub use hello::{GUEST_HELLO, HOST_HELLO, MAX_STALE, NONCE_LEN, droppable, find_hello};

#[cfg(test)]
mod tests {
    #[test]
    fn the_vsock_port_is_read_from_the_kernel_command_line() {
        assert_eq!(super::vsock_port("console=ttyS0 quiet"), None);
        assert_eq!(
            super::vsock_port("console=ttyS0 warren.vsock=1024 quiet"),
            Some(Ok(1024))
        );
        // Another parameter that merely starts the same is not it.
        assert_eq!(super::vsock_port("warren.vsockx=5"), None);
        let err = super::vsock_port("warren.vsock=lots").unwrap().unwrap_err();
        assert!(err.contains("warren.vsock=lots"), "{err}");
    }
}
