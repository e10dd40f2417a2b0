//! seccomp (work in progress).
