//! cgroups (work in progress).
