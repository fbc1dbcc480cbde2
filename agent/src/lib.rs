//! berth-agent: the per-host daemon. A controller (or nodectl) drives it
//! over ttrpc; it keeps VM definitions and state under its state root and
//! runs one berth-vmm per started VM, detached, so VMs outlive the agent.
//!
//! `config` (the agent's TOML), `spec` (the VM document and its checks;
//! `cloud_init`, its first-boot part and the NoCloud seed),
//! `store` (state on disk), `vmm_proc` (one VMM process), `manager` (VMs and
//! their lifecycle), `server` (the ttrpc edge), `notify` (systemd readiness).

pub mod api_guard;
pub mod cgroups;
pub mod cloud_init;
pub mod config;
pub mod doctor;
pub mod entitlement;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod host;
pub mod images;
pub mod jail;
pub mod manager;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod root_lock;
pub mod server;
pub mod spec;
pub mod store;
pub mod usage;
pub mod vmm_proc;
