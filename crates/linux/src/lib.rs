//! The `linux` backend: each sandbox is a process tree from an OCI image, isolated the way
//! container runtimes do it: its own pid, mount, UTS, IPC, network and cgroup namespaces, an
//! overlayfs root (the image's layers below, a per-sandbox upper directory above), a minimal
//! `/dev`, masked and read-only kernel files, docker's default capability set, `no_new_privs`,
//! a seccomp deny-list, and memory/pids/cpu limits in a cgroup (v1 or v2, found at run time).
//!
//! # Design
//!
//! - **A supervisor process per sandbox** ([`supervisor`], the small `warren-supervise`
//!   binary): it outlives the server (a `kill -9` or an upgrade of the server leaves
//!   workloads running; the restarted server re-adopts them through `state.json` and a
//!   pidfd), keeps copying output into the CRI-format log, enforces stop grace periods and
//!   timeouts, and records the end (`exit.json`, with OOM kills read from the cgroup) even
//!   when no server is there to see it. conmon and containerd's shims exist for the same
//!   reasons. The supervisor is single-threaded, so it forks the container directly, without
//!   the restrictions of forking a multi-threaded server; on cgroup v2, into its cgroup
//!   ([`fork`]).
//! - **Everything mounted lives in the container's mount namespace**: the overlay is mounted
//!   after `unshare(CLONE_NEWNS)`, so it disappears with the last process of the sandbox and
//!   no host mount can leak, even if the supervisor is killed.
//! - **The container's setup is written here, not borrowed** ([`container`]): youki's
//!   libcontainer would bring its own process model (a runtime binary, its own state dir,
//!   several nix versions and rust-criu) where warren needs ~500 lines of ordered syscalls
//!   in a child it already controls. cgroups ([`cgroup`]) likewise; seccomp filters are
//!   compiled by `seccompiler` ([`seccomp`]).
//! - **Image layers are unpacked once** by `warren-image` and shared read-only by every
//!   sandbox; a sandbox's writes go to its own `upper` directory, removed on delete.
//! - **exec** ([`exec`]) enters a running sandbox's namespaces and cgroup from a helper
//!   (the supervisor binary in exec mode), with pipes or a terminal allocated from the
//!   container's own devpts.
//! - **Checkpoint and restore** with CRIU ([`criu`]): the whole tree with its namespaces, and
//!   the overlay's upper directory, are saved; a restore ([`restore`], the supervisor in
//!   restore mode) mounts a new sandbox's overlay in a mount namespace of its own and has
//!   CRIU bind it as the container's root (`--root`, as runc does), so no mount ever appears
//!   on the host. See `docs/checkpoint.md`.
//! - **A policy's exec list is enforced in the kernel** ([`execgate`]): `execve` goes to the
//!   sandbox's supervisor through seccomp user notification, which answers by the policy.
//!   **`network.mode: egress`** ([`egress`]) is a veth pair and an nftables allow-list set up
//!   by the supervisor.

pub mod backend;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod criu;
pub mod egress;
pub mod exec;
pub mod execgate;
pub mod fork;
pub mod restore;
pub mod seccomp;
pub mod supervisor;

pub use backend::{DEFAULT_RESTORE_TIMEOUT, LinuxBackend, LinuxConfig, WARM_LABEL};

/// This crate's build: a hash of its sources (see `build.rs`). A supervisor binary answers
/// `--build-id` with its own, and the server uses it only when the two match.
pub const BUILD_ID: &str = env!("WARREN_LINUX_BUILD_ID");

pub use warren_runtime::error_chain;
