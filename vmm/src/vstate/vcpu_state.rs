//! Saving and restoring one vCPU's architectural state. Restore order
//! matters to KVM: CPUID first (it decides which MSRs and xsave features
//! exist), then mp_state, registers, special registers, xsave, xcrs, the
//! local APIC, MSRs (the TSC among them), and the pending events last.

use kvm_bindings::{kvm_irqchip, kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::snapshot::state::{VcpuState, VmState};

#[derive(Debug, thiserror::Error)]
#[error("KVM could not {what}: {source}")]
pub struct StateError {
    pub what: String,
    pub source: kvm_ioctls::Error,
}

fn kvm<T>(what: &str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError {
        what: what.to_string(),
        source,
    })
}

/// The MSRs worth saving: KVM's own list of the ones it handles.
pub fn msr_indices(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm("list MSRs", kvm_fd.get_msr_index_list())?
        .as_slice()
        .to_vec())
}

/// Reads every MSR of `indices` that KVM lets this vCPU read.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            what: "hold the MSR list".into(),
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = kvm("read MSRs", fd.get_msrs(&mut msrs))?;
        if read == wanted.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        // KVM stops at the first MSR it will not read for this vCPU.
        wanted.remove(read);
    }
}

pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    Ok(VcpuState {
        cpuid: kvm("read CPUID", fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
            .as_slice()
            .to_vec(),
        mp_state: kvm("read the MP state", fd.get_mp_state())?,
        regs: kvm("read registers", fd.get_regs())?,
        sregs: kvm("read special registers", fd.get_sregs())?,
        xsave: kvm("read the xsave area", fd.get_xsave())?,
        xcrs: kvm("read XCRs", fd.get_xcrs())?,
        lapic: kvm("read the local APIC", fd.get_lapic())?,
        msrs: read_msrs(fd, msr_indices)?,
        events: kvm("read pending events", fd.get_vcpu_events())?,
    })
}

pub fn restore(kvm_fd: &Kvm, fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let cpuid = kvm_bindings::CpuId::from_entries(&s.cpuid).map_err(|_| StateError {
        what: "hold the CPUID".into(),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    kvm("set CPUID", fd.set_cpuid2(&cpuid))?;
    kvm("set the MP state", fd.set_mp_state(s.mp_state))?;
    kvm("set registers", fd.set_regs(&s.regs))?;
    kvm("set special registers", fd.set_sregs(&s.sregs))?;
    let xsave_size = kvm_fd.check_extension_int(Cap::Xsave2);
    if xsave_size > std::mem::size_of_val(&s.xsave) as i32 {
        return Err(StateError {
            what: format!(
                "restore a {xsave_size}-byte xsave area (KVM_SET_XSAVE2 is not supported yet)"
            ),
            source: kvm_ioctls::Error::new(libc::ENOTSUP),
        });
    }
    // SAFETY: KVM reads at most size_of::<kvm_xsave>() bytes here: the
    // host's xsave area was just checked to fit in it (no XSAVE2 needed).
    kvm("set the xsave area", unsafe { fd.set_xsave(&s.xsave) })?;
    kvm("set XCRs", fd.set_xcrs(&s.xcrs))?;
    kvm("set the local APIC", fd.set_lapic(&s.lapic))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| StateError {
        what: "hold the MSRs".into(),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = kvm("set MSRs", fd.set_msrs(&msrs))?;
    if written != s.msrs.len() {
        return Err(StateError {
            what: format!("set MSR {:#x}", s.msrs[written].index),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    kvm("set pending events", fd.set_vcpu_events(&s.events))?;
    Ok(())
}

/// The in-kernel PIC pair and IOAPIC, the PIT and the KVM clock.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let mut irqchips = Vec::new();
    for chip_id in 0..3 {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        kvm("read the irqchip", vm.get_irqchip(&mut chip))?;
        irqchips.push(chip);
    }
    Ok(VmState {
        irqchips,
        pit: kvm("read the PIT", vm.get_pit2())?,
        clock: kvm("read the clock", vm.get_clock())?,
    })
}

pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    for chip in &s.irqchips {
        kvm("set the irqchip", vm.set_irqchip(chip))?;
    }
    kvm("set the PIT", vm.set_pit2(&s.pit))?;
    let mut clock = s.clock;
    // Only the clock value travels; the flags describe the old host.
    clock.flags = 0;
    kvm("set the clock", vm.set_clock(&clock))?;
    Ok(())
}
