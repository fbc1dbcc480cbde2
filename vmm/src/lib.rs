//! berth-vmm: one process per guest, straight over /dev/kvm.
//!
//! Where things live: `config` (the VM description), `arch` (boot protocol
//! and CPU setup), `vstate` (KVM VM, memory and vCPU threads), `devices`
//! (emulated hardware), `builder` (wires a VM from its config), `exit` (why
//! a VM ended).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod fsutil;
pub mod snapshot;
pub mod vstate;
