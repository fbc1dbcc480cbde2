//! The Intel MultiProcessor table (MP spec 1.4), which is how a guest without
//! ACPI learns its CPUs, its IOAPIC and how ISA interrupts are wired.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, HIMEM_START, IOAPIC_ADDR};
use crate::memory::GuestMemory;

/// Local APIC and IOAPIC versions KVM's in-kernel models report.
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// IOAPIC pins KVM's in-kernel IOAPIC has; ISA IRQ n is wired to pin n.
const IOAPIC_PINS: u8 = 24;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// Family 6, with APIC and FPU feature bits, as the processor entries expect.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;

/// Highest vCPU count the table can describe: APIC ids are one byte and
/// the IOAPIC takes the id after the last CPU.
pub const MAX_CPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table describes at most {MAX_CPUS} vCPUs, not {0}")]
    TooManyCpus(u32),
    #[error("the MP table does not fit below 1 MiB")]
    TooLarge,
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, both
/// meant to live at `base`.
pub fn build(base: u64, num_cpus: u32) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let table_addr = base + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // Polarity and trigger "conform to the bus" (flags 0).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, BUS_ISA]);
        entries.extend_from_slice(&[irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 carries the 8259's ExtINT, LINT1 NMIs, on every local APIC.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, BUS_ISA, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BERTH   ");
    table.extend_from_slice(b"BERTH-VMM   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table at the start of the EBDA; a large one runs on into the
/// legacy hole. The e820 map keeps both out of RAM.
pub fn setup(mem: &GuestMemory, num_cpus: u32) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, num_cpus)?;
    if EBDA_START + bytes.len() as u64 > HIMEM_START {
        return Err(MpTableError::TooLarge);
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_hold_and_every_cpu_is_listed() {
        let t = build(EBDA_START, 4).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let cpus: Vec<(u8, u8)> = table[44..]
            .chunks(20)
            .take_while(|e| e[0] == ENTRY_PROCESSOR)
            .map(|e| (e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn largest_table_fits_below_1mib() {
        let t = build(EBDA_START, MAX_CPUS).unwrap();
        assert!(EBDA_START + t.len() as u64 <= HIMEM_START);
        assert!(matches!(
            build(EBDA_START, MAX_CPUS + 1),
            Err(MpTableError::TooManyCpus(_))
        ));
    }
}
