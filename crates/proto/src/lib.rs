//! warren's public gRPC API, `warren.v1`, and its conversions to and from the spec model.
//!
//! The `.proto` file under `proto/` is the contract; this crate only generates code from it
//! and converts between wire messages and `warren_spec` types. Conversions that can fail (a
//! wire message from an old or hostile client) return [`ConvertError`] naming the field, so
//! the server can answer `INVALID_ARGUMENT` with a message a person understands.

#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("warren.v1");
}

mod convert;
mod policy;

pub use convert::{
    ConvertError, failure_policy_from_pb, failure_policy_to_pb, resource_info_from_pb,
    resource_info_to_pb, resources_from_pb, resources_to_pb, spec_from_pb, spec_to_pb,
};
pub use policy::{decision_from_pb, decision_to_pb};
