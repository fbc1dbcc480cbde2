//! The VM description, as the VMM reads it: the contract's `config`.

pub use berth_proto::vmm_process::config::*;
