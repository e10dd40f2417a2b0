//! The local image store (work in progress).
