//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC +
//! LAPICs) and PIT. The order of calls here is the one KVM accepts on x86:
//! memory → TSS → irqchip → PIT → vCPUs.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub struct Vm {
    fd: VmFd,
    memory: GuestMemory,
}

impl Vm {
    pub fn new(kvm_fd: &Kvm, memory: GuestMemory) -> Result<Self, VmError> {
        let fd = kvm_fd.create_vm().map_err(kvm("create a VM"))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("an mmap region has a host address");
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which
            // this Vm keeps for as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(slot_region) }
                .map_err(kvm("register guest memory"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm("set the TSS address"))?;
        fd.create_irq_chip().map_err(kvm("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm("create the PIT"))?;
        Ok(Vm { fd, memory })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn register_slots(&self, flags: u32) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("an mmap region has a host address");
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags,
            };
            // SAFETY: the same live mapping as at creation, owned by
            // `self.memory` for as long as the VM exists; only flags change.
            unsafe { self.fd.set_user_memory_region(slot_region) }
                .map_err(kvm("change a memory slot's dirty logging"))?;
        }
        Ok(())
    }

    /// Turns KVM's dirty page logging on, and forgets what was dirty so far
    /// (in KVM's log and in the bitmap our devices write).
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        self.register_slots(kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)?;
        self.take_dirty()?;
        Ok(())
    }

    /// Pages written since the last call, per region, one bit per 4 KiB
    /// page: what vCPUs wrote (KVM's log) and what devices wrote (our
    /// bitmap). Both are cleared.
    pub fn take_dirty(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let mut all = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut bits = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm("read the dirty log"))?;
            let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
            for (word, dev) in bits.iter_mut().zip(mapping.bitmap().get_and_reset()) {
                *word |= dev;
            }
            all.push(bits);
        }
        Ok(all)
    }

    /// Routes writes to `evt` into interrupt line `gsi` without a VM exit.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm("register an irqfd"))
    }
}
