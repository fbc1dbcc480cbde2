//! A VM from saved state: a snapshot directory (memory mapped privately
//! from its memory file) or what a migration sent. The memory already
//! holds the kernel and boot tables; every part continues from its state.

use std::path::Path;

use super::{attach_legacy, attach_virtio, create_vcpus, open_kvm, BuildError, Vmm};
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialStateError;
use crate::devices::virtio::mmio::{TransportSnapshot, TransportStateError};
use crate::machine::Transports;
use crate::memory::GuestMemory;
use crate::snapshot::{SnapshotError, VmSnapshot};
use crate::vstate::vcpu_state::{self, StateError};
use crate::vstate::vm::Vm;

/// What a restore can fail on, beyond what a boot can.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot's files: a header that does not check (magic, format,
    /// checksum, CPU vendor), state that does not decode, a memory file of
    /// the wrong size, a missing parent.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot set up the serial device: {0}")]
    Serial(#[source] SerialStateError),
    #[error("cannot set up the virtio devices: the snapshot has {saved} virtio devices, the config {configured}")]
    DeviceCount { saved: usize, configured: usize },
    #[error("cannot set up a virtio device's state: {0}")]
    DeviceState(#[source] TransportStateError),
    #[error("cannot set up the vCPU state: the snapshot has fewer vCPUs")]
    MissingVcpu,
    #[error("cannot set up a vCPU's saved state: {0}")]
    VcpuState(#[source] StateError),
    #[error("cannot set up the VM's saved state: {0}")]
    VmState(#[source] StateError),
}

/// A VM from a snapshot directory: memory mapped privately from its memory
/// file, vCPU, VM and device state as saved. `config` is the snapshot's own
/// with the caller's console settings.
pub fn restore(
    dir: &Path,
    snapshot: VmSnapshot,
    config: &VmConfig,
    kvm_device: &Path,
) -> Result<Vmm, BuildError> {
    let memory = crate::snapshot::load_memory(dir, &snapshot).map_err(RestoreError::from)?;
    // Dirty logging (and so a diff's baseline) starts with this VMM's first
    // full snapshot: turning it on here would cost every restore time that
    // grows with guest size.
    build_restore(config, kvm_device, snapshot, memory)
}

/// A VM from state and memory that arrived over a migration connection.
pub fn restore_migrated(
    snapshot: VmSnapshot,
    memory: GuestMemory,
    config: &VmConfig,
    kvm_device: &Path,
) -> Result<Vmm, BuildError> {
    build_restore(config, kvm_device, snapshot, memory)
}

/// Restore order: memory (given) → VM → serial and i8042 → virtio
/// transports → each vCPU (`vcpu_state::restore`) → irqchip, PIT, clock.
fn build_restore(
    config: &VmConfig,
    kvm_device: &Path,
    saved: VmSnapshot,
    memory: GuestMemory,
) -> Result<Vmm, BuildError> {
    let (kvm_fd, flavour) = open_kvm(config, kvm_device)?;
    let vm = Vm::new(&kvm_fd, memory)?;
    let legacy = attach_legacy(&vm, config, Some(&saved))?;
    let (attached, mmio) = attach_virtio(&vm, config)?;
    restore_transports(&attached.transports, &saved.virtio)?;

    let buses = (&legacy.pio, &mmio);
    let vcpus = create_vcpus(&kvm_fd, &vm, config, buses, &legacy.exit, |index, fd, _| {
        let state = (saved.vcpus.get(index as usize)).ok_or(RestoreError::MissingVcpu)?;
        vcpu_state::restore(&kvm_fd, fd, state).map_err(RestoreError::VcpuState)?;
        // The guest keeps the CPUID it was saved with.
        Ok(state.cpuid.clone())
    })?;
    vcpu_state::restore_vm(vm.fd(), &saved.vm).map_err(RestoreError::VmState)?;
    Ok(Vmm::assemble(vm, config, flavour, legacy, attached, vcpus))
}

/// Each transport continues from its saved registers and queues (a device
/// the driver had running is activated at its saved positions).
fn restore_transports(
    transports: &Transports,
    saved: &[TransportSnapshot],
) -> Result<(), RestoreError> {
    if saved.len() != transports.len() {
        return Err(RestoreError::DeviceCount {
            saved: saved.len(),
            configured: transports.len(),
        });
    }
    for (transport, state) in transports.iter().zip(saved) {
        lock(transport)
            .restore(state)
            .map_err(RestoreError::DeviceState)?;
    }
    Ok(())
}
