//! ACPI tables, which is how a stock distribution kernel learns its CPUs
//! (MADT), its devices (DSDT) and how to power off and reset (FADT):
//! hardware-reduced ACPI, no PCI, no legacy PM blocks, no CMOS RTC.
//!
//! All of it lives in `ACPI_START..ACPI_END` (below 1 MiB, marked reserved
//! in the e820 map): the RSDP first, where a guest that scans
//! 0xE0000-0xFFFFF finds it (the zero page also points at it), then the
//! DSDT, FADT, MADT and XSDT.

use acpi_tables::aml::{self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path};
use acpi_tables::aml::{ResourceTemplate, Scope, IO};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_PHYS_BASE, IOAPIC_ADDR};
use super::mptable::MAX_CPUS;
use crate::devices::legacy::i8042::{I8042_PORT_BASE, KEYBOARD_GSI};
use crate::devices::legacy::power::{POWER_PORT, RESET_VALUE, S5_SLEEP_TYPE};
use crate::devices::legacy::serial::{COM1_GSI, COM1_PORT_BASE, COM1_PORT_LEN};
use crate::memory::GuestMemory;

/// Where the tables go: the RSDP must sit 16-byte aligned in
/// 0xE0000-0xFFFFF for a guest that scans for it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"BERTH ";
const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_ID: [u8; 8] = *b"BERTHVMM";
/// The virtio-mmio transport's ACPI id (Linux: virtio_mmio's acpi_match).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// One virtio-mmio transport as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI describes at most {MAX_CPUS} vCPUs with one-byte APIC ids, not {0}")]
    TooManyCpus(u32),
    #[error("virtio window {base:#x}+{len:#x} is not below 4 GiB")]
    WindowAbove4G { base: u64, len: u64 },
    #[error("the ACPI tables ({0} bytes) do not fit between 0xE0000 and 1 MiB")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn io_port(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn com1() -> Vec<u8> {
    let port = COM1_PORT_BASE as u16;
    let io = IO::new(port, port, 1, COM1_PORT_LEN as u8);
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    bytes_of(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &1u8),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ))
}

fn i8042() -> Vec<u8> {
    let data = I8042_PORT_BASE as u16;
    let (data_io, command_io) = (IO::new(data, data, 1, 1), IO::new(data + 4, data + 4, 1, 1));
    let irq = Interrupt::new(true, true, false, false, KEYBOARD_GSI);
    let crs = ResourceTemplate::new(vec![&data_io, &command_io, &irq]);
    bytes_of(&Device::new(
        Path::new("PS2_"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0303")),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ))
}

fn virtio_mmio(slot: usize, w: &MmioWindow) -> Result<Vec<u8>, AcpiError> {
    let above = || AcpiError::WindowAbove4G {
        base: w.base,
        len: w.len,
    };
    let base = u32::try_from(w.base).map_err(|_| above())?;
    let len = u32::try_from(w.len).map_err(|_| above())?;
    base.checked_add(len).ok_or_else(above)?;
    let window = Memory32Fixed::new(true, base, len);
    let irq = Interrupt::new(true, true, false, false, w.gsi);
    let crs = ResourceTemplate::new(vec![&window, &irq]);
    // Names are four characters: V000..V018.
    let name = format!("V{slot:03}");
    Ok(bytes_of(&Device::new(
        Path::new(&name),
        vec![
            &Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID),
            &Name::new(Path::new("_UID"), &(slot as u32)),
            &Name::new(Path::new("_CCA"), &aml::ONE),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )))
}

/// The DSDT's AML: COM1, the i8042, one `LNRO0005` device per virtio
/// transport in slot order (so the first disk is the first virtio-blk
/// device Linux probes: /dev/vda), and the S5 sleep type `poweroff` uses.
fn dsdt_aml(virtio: &[MmioWindow]) -> Result<Vec<u8>, AcpiError> {
    let mut devices = vec![RawAml(com1()), RawAml(i8042())];
    for (slot, w) in virtio.iter().enumerate() {
        devices.push(RawAml(virtio_mmio(slot, w)?));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let mut out = bytes_of(&Scope::new(Path::new("_SB_"), children));
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut out);
    Ok(out)
}

/// AML already serialised (a device whose parts did not outlive the loop
/// that built it).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"BERTFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch =
        (IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT)
            .into();
    // Hardware-reduced ACPI has no PM1 blocks: poweroff writes SLP_TYP|SLP_EN
    // to the sleep control register, reboot the reset value to the reset
    // register. One port serves both (devices::legacy::power).
    fadt.sleep_control_reg = io_port(POWER_PORT);
    fadt.sleep_status_reg = io_port(POWER_PORT);
    fadt.reset_reg = io_port(POWER_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    bytes_of(&fadt.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"BERTAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_DEFAULT_PHYS_BASE),
    );
    // APIC id = vCPU index, as the CPUID topology says (arch::x86_64::cpuid).
    for index in 0..vcpus {
        let id = index as u8;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // KVM's IOAPIC: 24 pins from GSI 0, ISA IRQ n on pin n (no overrides).
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    bytes_of(&madt)
}

/// The tables for `vcpus` vCPUs and the virtio transports `virtio`, laid
/// out from `ACPI_START`: `(rsdp address, bytes)`.
pub fn build(vcpus: u32, virtio: &[MmioWindow]) -> Result<(u64, Vec<u8>), AcpiError> {
    if vcpus == 0 || vcpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut image = Vec::new();
    let place = |table: &[u8], image: &mut Vec<u8>| {
        let offset = image.len().next_multiple_of(16);
        image.resize(offset, 0);
        image.extend_from_slice(table);
        ACPI_START + offset as u64
    };
    // The RSDP is written last (it needs the XSDT's address) into the
    // first 64 bytes, kept free here.
    image.resize(64, 0);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"BERTDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(virtio)?);
    let dsdt_addr = place(dsdt.as_slice(), &mut image);
    let fadt_addr = place(&fadt(dsdt_addr), &mut image);
    let madt_addr = place(&madt(vcpus), &mut image);
    let mut xsdt = XSDT::new(OEM_ID, *b"BERTXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes_of(&xsdt), &mut image);
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    image[..rsdp.len()].copy_from_slice(&rsdp);
    if ACPI_START + image.len() as u64 > ACPI_END {
        return Err(AcpiError::TooLarge(image.len()));
    }
    Ok((ACPI_START, image))
}

/// Writes the tables into guest memory; returns the RSDP's address for the
/// zero page.
pub fn setup(mem: &GuestMemory, vcpus: u32, virtio: &[MmioWindow]) -> Result<u64, AcpiError> {
    let (rsdp, image) = build(vcpus, virtio)?;
    mem.write_slice(&image, GuestAddress(ACPI_START))?;
    Ok(rsdp)
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
