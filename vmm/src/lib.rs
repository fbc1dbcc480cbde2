//! berth-vmm: one process per guest, straight over /dev/kvm.
//!
//! Where things live: `config` (the VM description), `arch` (boot protocol
//! and CPU setup), `memory` (guest RAM), `vstate` (KVM VM and vCPU threads), `devices`
//! (emulated hardware), `builder` (wires a VM from its config), `exit` (why
//! a VM ended), `machine` (a running VM's parts), `snapshot` and
//! `migration` (the live-migration protocol, both ends), `jail` (the
//! namespace and unprivileged user it runs in) and `seccomp` (the
//! per-thread system call filters).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod jail;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod precopy;
pub mod seccomp;
pub mod snapshot;
pub mod snapshot_engine;
pub mod vstate;
