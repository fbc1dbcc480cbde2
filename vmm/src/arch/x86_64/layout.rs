//! Guest physical memory layout. Low memory follows what Linux and
//! Firecracker expect, so a kernel finds its boot structures where the boot
//! protocol says and nothing overlaps.

/// GDT used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page"), passed to the kernel in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT and one PD of 2 MiB pages (first 1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86-64 Linux's COMMAND_LINE_SIZE, including the terminating NUL; a bzImage
/// may announce another limit in its setup header.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here, and the e820 map leaves
/// it (and the legacy hole up to 1 MiB) out of usable RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap below 4 GiB (IOAPIC, LAPIC and our devices live in it).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where the in-kernel IOAPIC and LAPIC are (the MP table names them).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS below 4 GiB, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Guest RAM regions for `mem_size` bytes: one below the MMIO gap and, when
/// the guest is larger than the space below it, the rest from 4 GiB up.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The e820 map the guest sees: `(addr, size, type)`. With ACPI tables,
/// the range they live in (below 1 MiB) is reserved.
pub fn e820_map(mem_size: u64, acpi: bool) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    if acpi {
        use super::acpi::{ACPI_END, ACPI_START};
        map.push((ACPI_START, ACPI_END - ACPI_START, E820_RESERVED));
    }
    for (start, size) in ram_regions(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start >= MMIO_GAP_END {
            start + size
        } else {
            size
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Guest RAM of `size` bytes, laid out in the regions `ram_regions` gives
/// (below and above the 32-bit MMIO gap).
pub fn create_guest_memory(
    size: u64,
) -> Result<crate::memory::GuestMemory, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<(vm_memory::GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(start, len)| (vm_memory::GuestAddress(start), len as usize))
        .collect();
    crate::memory::GuestMemory::from_ranges(&ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_low_ram_and_the_legacy_hole() {
        assert_eq!(
            e820_map(64 * MIB, false),
            vec![(0, EBDA_START, E820_RAM), (MIB, 63 * MIB, E820_RAM)]
        );
        assert_eq!(
            e820_map(64 * MIB, true),
            vec![
                (0, EBDA_START, E820_RAM),
                (0xe_0000, 0x2_0000, E820_RESERVED),
                (MIB, 63 * MIB, E820_RAM)
            ]
        );
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let mem = 4096 * MIB;
        let regions = ram_regions(mem);
        assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), mem);
        let map = e820_map(mem, false);
        assert_eq!(map[1], (MIB, MMIO_GAP_START - MIB, E820_RAM));
        assert_eq!(map[2], (MMIO_GAP_END, mem - MMIO_GAP_START, E820_RAM));
        assert!(map
            .iter()
            .all(|&(a, s, _)| a + s <= MMIO_GAP_START || a >= MMIO_GAP_END));
    }
}
