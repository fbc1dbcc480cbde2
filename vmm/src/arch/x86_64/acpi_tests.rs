//! The tables read back byte by byte, and by ACPICA's own disassembler.

use super::*;

fn windows(n: usize) -> Vec<MmioWindow> {
    (0..n)
        .map(|slot| MmioWindow {
            base: 0xd000_0000 + slot as u64 * 0x1000,
            len: 0x1000,
            gsi: 5 + slot as u32,
        })
        .collect()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
}

/// The table at guest address `addr` in `image`, its checksum checked.
fn table<'a>(image: &'a [u8], addr: u64, signature: &[u8; 4]) -> &'a [u8] {
    let at = (addr - ACPI_START) as usize;
    assert_eq!(&image[at..at + 4], signature, "table at {addr:#x}");
    let len = u32_at(image, at + 4) as usize;
    let t = &image[at..at + len];
    assert!(
        sums_to_zero(t),
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    t
}

struct Tables {
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn tables(vcpus: u32, devices: usize) -> Tables {
    let (rsdp, image) = build(vcpus, &windows(devices)).unwrap();
    assert_eq!(rsdp, ACPI_START);
    assert_eq!(rsdp % 16, 0);
    let r = &image[..36];
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(r[15], 2, "RSDP revision 2 (XSDT)");
    assert!(sums_to_zero(&r[..20]) && sums_to_zero(r), "RSDP checksums");
    let xsdt = table(&image, u64_at(r, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|at| u64_at(xsdt, at))
        .collect();
    assert_eq!(entries.len(), 2, "FADT and MADT");
    let fadt = table(&image, entries[0], b"FACP").to_vec();
    let madt = table(&image, entries[1], b"APIC").to_vec();
    let dsdt = table(&image, u64_at(&fadt, 140), b"DSDT").to_vec();
    Tables { fadt, madt, dsdt }
}

#[test]
fn the_fadt_is_hardware_reduced_with_sleep_and_reset_on_the_power_port() {
    let f = tables(1, 0).fadt;
    let flags = u32_at(&f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let iapc = u16::from_le_bytes([f[109], f[110]]);
    assert_eq!(iapc, 0b10_1110, "8042, no VGA, no MSI, no CMOS RTC");
    // Generic address structures: space 1 (I/O), 8 bits wide, at 0x600.
    let gas_is_power_port = |at: usize| f[at] == 1 && f[at + 1] == 8 && u64_at(&f, at + 4) == 0x600;
    assert!(gas_is_power_port(116), "reset register");
    assert_eq!(f[128], RESET_VALUE);
    assert!(gas_is_power_port(244), "sleep control register");
    assert!(gas_is_power_port(256), "sleep status register");
    assert_eq!(&f[268..276], b"BERTHVMM");
}

#[test]
fn the_madt_has_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
    for vcpus in [1, 3, MAX_CPUS] {
        let m = tables(vcpus, 0).madt;
        assert_eq!(u32_at(&m, 36), APIC_DEFAULT_PHYS_BASE);
        let (mut apic_ids, mut ioapics) = (Vec::new(), Vec::new());
        let mut at = 44;
        while at < m.len() {
            let (kind, len) = (m[at], m[at + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(u32_at(&m, at + 4), 1, "enabled");
                    apic_ids.push(u32::from(m[at + 3]));
                }
                1 => ioapics.push((u32_at(&m, at + 4), u32_at(&m, at + 8))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            at += len;
        }
        assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![(IOAPIC_ADDR, 0)]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    (0..=hay.len().saturating_sub(needle.len()))
        .filter(|&i| &hay[i..i + needle.len()] == needle)
        .collect()
}

#[test]
fn the_dsdt_names_every_virtio_window_with_its_gsi_in_slot_order() {
    let d = tables(2, 19).dsdt;
    let hids = find(&d, VIRTIO_MMIO_HID.as_bytes());
    assert_eq!(hids.len(), 19);
    let mut last = 0;
    for (slot, w) in windows(19).iter().enumerate() {
        // Memory32Fixed: read-write, base, length.
        let mut mem = vec![0x86, 0x09, 0x00, 0x01];
        mem.extend((w.base as u32).to_le_bytes());
        mem.extend((w.len as u32).to_le_bytes());
        // Extended interrupt: consumer, edge, active high; one GSI.
        let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        irq.extend(w.gsi.to_le_bytes());
        let at = find(&d, &mem);
        assert_eq!(at.len(), 1, "slot {slot}'s window");
        assert!(at[0] > hids[slot] && at[0] > last, "slot {slot} in order");
        assert_eq!(find(&d, &irq), vec![at[0] + mem.len()], "slot {slot}'s GSI");
        last = at[0];
    }
    assert_eq!(find(&d, b"_S5_").len(), 1);
    // COM1 and the i8042 by their PNP ids (EISA-compressed).
    assert_eq!(find(&d, b"COM1").len(), 1);
    assert_eq!(find(&d, b"PS2_").len(), 1);
}

#[test]
fn impossible_layouts_are_refused() {
    assert!(matches!(build(0, &[]), Err(AcpiError::TooManyCpus(0))));
    assert!(matches!(
        build(MAX_CPUS + 1, &[]),
        Err(AcpiError::TooManyCpus(_))
    ));
    let high = MmioWindow {
        base: 0x1_0000_0000,
        len: 0x1000,
        gsi: 5,
    };
    assert!(matches!(
        build(1, &[high]),
        Err(AcpiError::WindowAbove4G { .. })
    ));
}

/// Runs ACPICA's `iasl` in `dir`; its output when it fails.
fn iasl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("iasl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("iasl (acpica-tools) is installed by ci/install-deps.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl {args:?}: {text}");
    text
}

#[test]
fn acpica_disassembles_the_tables_and_recompiles_the_dsdt_cleanly() {
    let t = tables(3, 4);
    let dir = std::env::temp_dir().join(format!("berth-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in [("dsdt", &t.dsdt), ("apic", &t.madt), ("facp", &t.fadt)] {
        std::fs::write(dir.join(format!("{name}.dat")), bytes).unwrap();
        iasl(&dir, &["-d", &format!("{name}.dat")]);
    }
    let read = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();

    let madt = read("apic");
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 3, "{madt}");
    assert_eq!(madt.matches("[I/O APIC]").count(), 1, "{madt}");

    let fadt = read("facp");
    for line in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
    ] {
        assert!(fadt.contains(line), "{line:?} in {fadt}");
    }

    let dsdt = read("dsdt");
    assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 4, "{dsdt}");
    assert!(
        dsdt.contains("EisaId (\"PNP0501\")") && dsdt.contains("EisaId (\"PNP0303\")"),
        "{dsdt}"
    );
    for w in windows(4) {
        let base = format!("0x{:08X}", w.base);
        let gsi = format!("0x{:08X},", w.gsi);
        assert!(
            dsdt.contains(&base) && dsdt.contains(&gsi),
            "{base} and {gsi} in {dsdt}"
        );
    }
    // What the disassembler printed compiles back without an error.
    let compiled = iasl(&dir, &["-p", "recompiled", "dsdt.dsl"]);
    assert!(compiled.contains("0 Errors"), "{compiled}");
    std::fs::remove_dir_all(&dir).unwrap();
}
