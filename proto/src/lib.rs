//! Berth's ttrpc contracts, package `berth.v1`.
//!
//! The `.proto` files under `proto/berth/v1/` are the contract between a
//! controller and `berth-agent`, and between the agent and each `berth-vmm`;
//! the code generated from them lives in this crate only, and the rest of
//! Berth converts to plain Rust types at the edge. The contracts arrive with
//! the agent (see the project's issues); until then this crate carries the
//! API version the others report.

/// The version of the `berth.v1` API this build speaks.
pub const API_VERSION: &str = "v1";
