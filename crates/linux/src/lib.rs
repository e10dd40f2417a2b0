//! The `linux` backend (work in progress).

pub mod cgroup;
pub mod seccomp;
