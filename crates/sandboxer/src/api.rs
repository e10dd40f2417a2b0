//! Code generated from containerd's protos, in containerd's package layout so the generated
//! cross-package paths (`super::super::super::types::Mount`) resolve as written.

#![allow(missing_debug_implementations, clippy::all, rust_2018_idioms)]

pub mod types {
    tonic::include_proto!("containerd.types");
}

pub mod services {
    pub mod sandbox {
        pub mod v1 {
            tonic::include_proto!("containerd.services.sandbox.v1");
        }
    }
}
