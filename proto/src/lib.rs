//! Berth's ttrpc contracts, package `berth.v1`.
//!
//! The `.proto` files under `proto/berth/v1/` are the contract between a
//! controller and `berth-agent` (`NodeService`, `VmService`) and between the
//! agent and each `berth-vmm` (`VmmService`). The code generated from them
//! lives in this crate only; the rest of Berth converts to plain Rust types
//! at the edge.
//!
//! [`vmm_process`] is the other half of the agent ↔ VMM contract: how the
//! agent launches a VMM and what files they share.

#[allow(
    clippy::all,
    unused,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

pub use generated::*;

pub mod vmm_process;

/// The version of the `berth.v1` API this build speaks.
pub const API_VERSION: &str = "v1";
