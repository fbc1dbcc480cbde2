//! The parts of a running VM that the control API, snapshots and migration
//! all reach: memory and the VM fd, the vCPU threads, the devices, and the
//! exit channel. Capturing the VM's state (everything but memory) lives
//! here, so a snapshot and a migration save exactly the same things.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::bus::lock;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::mmio::{MmioTransport, TransportSnapshot};
use crate::exit::ExitNotifier;
use crate::snapshot::VmSnapshot;
use crate::vstate::vcpu::{SaveError, VcpuSet};
use crate::vstate::vcpu_state::StateError;
use crate::vstate::vm::Vm;

use berth_proto::vmm_process::device::{DeviceId, Direction, LimiterId};

pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The virtio-mmio transports, in the order the config lists devices.
pub type Transports = Vec<Arc<Mutex<MmioTransport>>>;

/// Why `Machine::capture` could not record the VM's state.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The vCPUs' registers, saved by their own threads.
    #[error(transparent)]
    Vcpus(#[from] SaveError),
    /// The VM-wide state: irqchips, PIT, clock.
    #[error(transparent)]
    Vm(#[from] StateError),
}

/// A device's rate limiter, by the contract's name for it (disk0/io,
/// nic0/rx, nic0/tx).
pub struct DeviceLimiter {
    pub id: LimiterId,
    pub limiter: Arc<RateLimiter>,
}

pub struct Machine {
    pub vm: Arc<Vm>,
    pub vcpus: Arc<VcpuSet>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub transports: Transports,
    /// Every device's rate limiter, by device name and direction.
    pub limiters: Arc<Vec<DeviceLimiter>>,
    pub config: crate::config::VmConfig,
    pub flavour: String,
    pub exit: ExitNotifier,
    /// The CPUID each vCPU was given. Saved state records these rather
    /// than what KVM_GET_CPUID2 reports: the PVM flavour reports the host's
    /// raw CPUID there, and restoring that would hand the guest features
    /// KVM does not support.
    pub guest_cpuids: Vec<Vec<kvm_cpuid_entry2>>,
}

impl Machine {
    /// Stops every device worker so nothing writes guest memory; returns
    /// each transport's state.
    pub fn quiesce_devices(&self) -> Vec<TransportSnapshot> {
        self.transports
            .iter()
            .map(|t| lock(t).quiesce_for_snapshot())
            .collect()
    }

    pub fn resume_devices(&self) {
        for t in &self.transports {
            lock(t).resume_device();
        }
    }

    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.vm
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    pub fn memory_bytes(&self) -> u64 {
        self.vm.memory().iter().map(|r| r.len()).sum()
    }

    /// The VM's state apart from memory, as a full snapshot describes it.
    /// The config as it stands now: the one it started with, with the rate
    /// limits a live SetRateLimit changed since (a snapshot or a migrated
    /// VM keeps them).
    pub fn current_config(&self) -> crate::config::VmConfig {
        let mut config = self.config.clone();
        for l in self.limiters.iter() {
            let limit = l.limiter.config();
            let slot = match (l.id.device, l.id.direction) {
                (DeviceId::Disk(i), _) => config.disks.get_mut(i).map(|d| &mut d.limit),
                (DeviceId::Nic(i), Direction::Rx) => {
                    config.nics.get_mut(i).map(|n| &mut n.rx_limit)
                }
                (DeviceId::Nic(i), _) => config.nics.get_mut(i).map(|n| &mut n.tx_limit),
                (DeviceId::Rng, _) => config.rng.as_mut().map(|r| &mut r.limit),
            };
            if let Some(slot) = slot {
                *slot = limit;
            }
        }
        config
    }

    /// The vCPUs must be paused and the devices quiesced (`virtio`).
    pub fn capture(&self, virtio: Vec<TransportSnapshot>) -> Result<VmSnapshot, CaptureError> {
        let mut vcpus = self.vcpus.save_states(PAUSE_TIMEOUT)?;
        for (state, cpuid) in vcpus.iter_mut().zip(&self.guest_cpuids) {
            state.cpuid = cpuid.clone();
        }
        let vm = crate::vstate::vcpu_state::save_vm(self.vm.fd())?;
        Ok(VmSnapshot {
            kind: "full".into(),
            parent: None,
            dirty: None,
            cpu_vendor: berth_proto::vmm_process::host::cpu_vendor(),
            cpu_model: berth_proto::vmm_process::host::cpu_model(),
            kvm_flavour: self.flavour.clone(),
            config: self.current_config(),
            regions: self.regions(),
            vcpus,
            vm,
            serial: lock(&self.serial).state().into(),
            i8042: lock(&self.i8042).state(),
            virtio,
        })
    }
}
