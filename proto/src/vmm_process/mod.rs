//! The contract between berth-agent and each berth-vmm process it runs
//! (docs/architecture.md): plain Rust, no KVM. The agent builds a VMM's
//! command line from [`launch::VmmArgs`] and writes its [`config::VmConfig`];
//! the VMM answers over `VmmService` (`vmm.proto`), writes an
//! [`exit::ExitRecord`] when it ends, and lays snapshots out as
//! [`snapshot`] says. What needs KVM to know about the host, the agent asks
//! the VMM binary for ([`host::HostInfo`]).

pub mod config;
pub mod control;
pub mod device;
pub mod exit;
pub mod files;
pub mod host;
pub mod launch;
pub mod migration;
pub mod run_lock;
pub mod snapshot;

/// Milliseconds since the Unix epoch, as every record and reply carries
/// them (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
