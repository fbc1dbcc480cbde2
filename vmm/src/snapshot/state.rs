//! What a snapshot holds besides memory, as plain serde data.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// "full", or "diff": only the pages in `dirty` are in this memory file,
    /// the rest come from `parent` (a snapshot directory).
    pub kind: String,
    pub parent: Option<std::path::PathBuf>,
    /// For a diff: per region, one bit per 4 KiB page present here.
    pub dirty: Option<Vec<Vec<u64>>>,
    pub cpu_vendor: String,
    /// The host CPU's model name (informational: only the vendor must match).
    #[serde(default)]
    pub cpu_model: String,
    pub kvm_flavour: String,
    /// The VM description it was booted from (paths, vCPUs, memory).
    pub config: VmConfig,
    /// Guest RAM regions, (guest address, size), in memory-file order.
    pub regions: Vec<(u64, u64)>,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    #[serde(default)]
    pub i8042: crate::devices::legacy::i8042::I8042State,
    /// Each virtio-mmio transport, in the order the config lists devices.
    pub virtio: Vec<crate::devices::virtio::mmio::TransportSnapshot>,
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// vm-superio's SerialState, field for field.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}
