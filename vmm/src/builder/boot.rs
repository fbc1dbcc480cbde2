//! A VM booted from its config: fresh memory, the kernel and initrd loaded
//! into it, the boot structures (ACPI tables or the MP table, GDT and page
//! tables, command line, zero page) written, and vCPU 0 set to the kernel's
//! entry.

use std::path::Path;

use super::{attach_legacy, attach_virtio, create_vcpus, open_kvm, BuildError, Vmm};
use crate::arch::x86_64::layout::create_guest_memory;
use crate::arch::x86_64::{acpi, boot, mptable, regs};
use crate::config::{Discovery, VmConfig};
use crate::vstate::vm::Vm;

pub fn build(config: &VmConfig, kvm_device: &Path) -> Result<Vmm, BuildError> {
    let (kvm_fd, flavour) = open_kvm(config, kvm_device)?;
    let mem_size = config.memory_mib << 20;
    let memory = create_guest_memory(mem_size).map_err(|e| BuildError::GuestMemory {
        mib: config.memory_mib,
        message: e.to_string(),
    })?;
    let vm = Vm::new(&kvm_fd, memory)?;
    let mem = vm.memory();
    let kernel = boot::load_kernel(mem, &config.kernel.path)?;
    let initrd = match &config.kernel.initrd {
        Some(path) => Some(boot::load_initrd(mem, &kernel, path)?),
        None => None,
    };
    regs::write_boot_tables(mem)?;

    let legacy = attach_legacy(&vm, config, None)?;
    let (attached, mmio) = attach_virtio(&vm, config)?;
    // The user's command line, then (legacy) the words that announce our
    // devices.
    let (announce, acpi_rsdp) = match config.discovery {
        Discovery::Acpi => (
            Vec::new(),
            Some(acpi::setup(mem, config.vcpus, &attached.windows)?),
        ),
        Discovery::Legacy => {
            mptable::setup(mem, config.vcpus)?;
            (super::virtio::cmdline_words(&attached.windows), None)
        }
    };
    let cmdline = std::iter::once(config.kernel.cmdline.as_str())
        .chain(announce.iter().map(String::as_str))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    boot::write_cmdline(mem, &kernel, &cmdline)?;
    boot::write_zero_page(mem, &kernel, cmdline.len(), initrd, mem_size, acpi_rsdp)?;

    let buses = (&legacy.pio, &mmio);
    let vcpus = create_vcpus(
        &kvm_fd,
        &vm,
        config,
        buses,
        &legacy.exit,
        |index, fd, cpuid| {
            // APs stay in KVM's wait-for-SIPI state until the guest starts them.
            if index == 0 {
                regs::setup_boot_regs(fd, kernel.entry)?;
            }
            Ok(cpuid.as_slice().to_vec())
        },
    )?;
    Ok(Vmm::assemble(vm, config, flavour, legacy, attached, vcpus))
}
