//! The `vm` backend: each sandbox is a microVM.
//!
//! qemu (`-M microvm` by default) runs a guest kernel and an initramfs the project builds
//! (`scripts/vm-assets.sh`: a minimal kernel, `warren-guest` as PID 1, busybox). The host
//! talks to the guest with the task API of `warren-guest` (tonic) over a virtio-serial port
//! backed by a unix socket (the default: no vhost-vsock needed, snapshots work), or over
//! virtio-vsock, served by the host kernel or by a vhost-user device process per VM
//! ([`config::ChannelKind`], [`channel::Address`]); qemu itself is driven over QMP (JSON
//! lines on another unix socket, [`qmp`]).
//!
//! # Design
//!
//! - **KVM when it works, TCG otherwise** ([`config::probe_accel`]): a /dev/kvm without
//!   hardware virtualization in the CPU flags (PVM, nested without VMX) runs guests under
//!   TCG. `accel` in the config forces either.
//! - **Seed 002's hypervisor config** ([`config`]): `[hypervisor]` with Kuasar's fields plus
//!   `accel` and `machine`, validated with field-and-value errors before any qemu runs.
//! - **Clones, not boots** ([`template`]): a template VM of each shape is booted once and
//!   saved with its RAM in a shared file; sandboxes are copy-on-write restores of it, from
//!   a pool kept ready, each given its own hostname, id and fresh entropy.
//! - **The VM outlives the server** ([`monitor`]): qemu is not the server's to take down; a
//!   restarted server reconnects to each guest and resumes its log where it ended, since
//!   the guest keeps the workload's output for a host that reconnects.
//! - **Every end is noticed**: the workload's exit (from the guest), qemu's (killed,
//!   crashed, or a guest kernel panic, which reboots into qemu's exit), or a guest that stops
//!   answering health pings; each becomes the sandbox's status, and the VM is torn down.
//! - **Images as disks** ([`image`]): a sandbox's OCI image becomes one read-only ext4 file,
//!   made once per image; the guest mounts it under a writable overlay. Without an image the
//!   workload runs in the initramfs.

pub mod backend;
pub mod channel;
pub mod config;
mod exec;
pub mod image;
pub mod monitor;
pub mod qemu;
pub mod qmp;
mod sys;
pub mod template;
pub mod vm;

pub use backend::{VmBackend, VmBackendConfig};
pub use config::{Acceleration, VmConfig};
pub use template::parse_pool_summary;
