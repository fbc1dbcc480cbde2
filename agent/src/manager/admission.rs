//! Admission: what the node can hold (capacity), whether a VM fits beside
//! what is held, and drain. One lock orders admissions, so parallel starts
//! that together exceed capacity admit exactly as many as fit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::error::{internal, ApiError, ApiResult};
use super::registry::{lock, Allocation, EventKind, VmEntry};
use super::Manager;
use crate::config::AgentConfig;
use crate::entitlement;
use crate::spec::{Limits, VmSpec};
use crate::store::{VmRecord, VmState};

/// Host totals and what admission counts, in one place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CapacityNumbers {
    pub cpus: u32,
    pub memory_mib: u64,
    pub allocatable_vcpus: u32,
    pub allocatable_memory_mib: u64,
    pub running_vcpus: u32,
    pub running_memory_mib: u64,
    pub defined_vcpus: u32,
    pub defined_memory_mib: u64,
    /// What admission holds against allocatable: running VMs, or all of
    /// them when the agent reserves on define.
    pub held_vcpus: u32,
    pub held_memory_mib: u64,
}

impl CapacityNumbers {
    /// Capacity of a host with `cpus` and the configured reserve and
    /// overcommit, holding `allocation`.
    pub fn of(
        config: &AgentConfig,
        limits: &Limits,
        cpus: u32,
        allocation: Allocation,
    ) -> CapacityNumbers {
        let memory_mib = limits.host_memory_mib;
        let alloc_cpus =
            (f64::from(cpus.saturating_sub(config.reserved_cpus)) * config.cpu_overcommit) as u32;
        let alloc_mem = (memory_mib.saturating_sub(config.reserved_memory_mib) as f64
            * config.memory_overcommit) as u64;
        let (held_vcpus, held_memory_mib) = if config.reserve_on_define {
            (allocation.defined_vcpus, allocation.defined_memory_mib)
        } else {
            (allocation.running_vcpus, allocation.running_memory_mib)
        };
        CapacityNumbers {
            cpus,
            memory_mib,
            allocatable_vcpus: alloc_cpus,
            allocatable_memory_mib: alloc_mem,
            running_vcpus: allocation.running_vcpus,
            running_memory_mib: allocation.running_memory_mib,
            defined_vcpus: allocation.defined_vcpus,
            defined_memory_mib: allocation.defined_memory_mib,
            held_vcpus,
            held_memory_mib,
        }
    }

    /// RESOURCE_EXHAUSTED, naming the resource and the numbers, when `spec`
    /// does not fit beside what is held.
    pub fn check_fits(&self, spec: &VmSpec) -> ApiResult<()> {
        if self.held_vcpus + spec.vcpus > self.allocatable_vcpus {
            return Err(ApiError::ResourceExhausted(format!(
                "VM {} needs {} vCPUs; {} of {} allocatable vCPUs are free",
                spec.id,
                spec.vcpus,
                self.allocatable_vcpus.saturating_sub(self.held_vcpus),
                self.allocatable_vcpus
            )));
        }
        if self.held_memory_mib + spec.memory_mib > self.allocatable_memory_mib {
            return Err(ApiError::ResourceExhausted(format!(
                "VM {} needs {} MiB of memory; {} of {} allocatable MiB are free",
                spec.id,
                spec.memory_mib,
                self.allocatable_memory_mib
                    .saturating_sub(self.held_memory_mib),
                self.allocatable_memory_mib
            )));
        }
        Ok(())
    }
}

/// Online host CPUs, from sysfs ("0-1" → 2).
pub fn host_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| entitlement::cpus_in(s.trim()))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct NodeState {
    drained: bool,
}

/// The admission lock and the drain flag (kept in `<state root>/node.json`).
pub struct Admission {
    gate: tokio::sync::Mutex<()>,
    drained: AtomicBool,
    node_file: PathBuf,
}

impl Admission {
    pub(super) fn load(node_file: PathBuf) -> Admission {
        let drained = std::fs::read(&node_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<NodeState>(&b).ok())
            .map(|n| n.drained)
            .unwrap_or(false);
        Admission {
            gate: tokio::sync::Mutex::new(()),
            drained: AtomicBool::new(drained),
            node_file,
        }
    }

    pub(super) async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    /// Records the drain flag, then sets it.
    fn set_drained(&self, drained: bool) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&NodeState { drained }).expect("plain data");
        berth_proto::vmm_process::files::write_atomic(&self.node_file, &bytes)?;
        self.drained.store(drained, Ordering::SeqCst);
        Ok(())
    }
}

impl Manager {
    /// The host's numbers and what admission holds.
    pub fn capacity(&self) -> CapacityNumbers {
        CapacityNumbers::of(
            &self.config,
            &self.limits,
            host_cpus(),
            self.registry.allocation(),
        )
    }

    /// Admits `entry` and marks it Starting under the admission lock. `also`
    /// edits the record saved with that transition.
    pub(super) async fn admit(
        &self,
        entry: &Arc<VmEntry>,
        why: &str,
        also: impl FnOnce(&mut VmRecord),
    ) -> ApiResult<()> {
        let _admission = self.admission.hold().await;
        if self.admission.drained() {
            return Err(ApiError::FailedPrecondition(
                "the node is drained: no new VM starts until Undrain".into(),
            ));
        }
        if !self.config.reserve_on_define {
            let spec = lock(&entry.inner).spec.clone();
            self.capacity().check_fits(&spec)?;
        }
        let mut inner = lock(&entry.inner);
        inner.record.restarts = 0;
        also(&mut inner.record);
        self.registry
            .transition(entry, &mut inner, VmState::Starting, why)
    }

    pub fn set_drained(&self, drained: bool) -> ApiResult<()> {
        self.admission.set_drained(drained).map_err(internal)?;
        let (kind, message) = if drained {
            (EventKind::Drained, "node drained")
        } else {
            (EventKind::Undrained, "node undrained")
        };
        self.registry.emit("", kind, VmState::Defined, message);
        Ok(())
    }

    pub fn drained(&self) -> bool {
        self.admission.drained()
    }
}
