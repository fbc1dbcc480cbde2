/* ACPI tables, which is how a VMM with ACPI publishes its CPUs (MADT), its
 * virtio-mmio devices (DSDT devices with _HID "LNRO0005") and its power
 * registers (FADT). Not an AML interpreter: for each LNRO0005 string it
 * reads the first 32-bit fixed memory and extended interrupt descriptors
 * that follow, which is how berth-vmm and Firecracker describe a device. */
#include "probe.h"

struct acpi_info acpi;

#define EBDA_PTR 0x40e
#define RSDP_SCAN_START 0xe0000
#define RSDP_SCAN_END 0x100000
#define MEM32_FIXED 0x86
#define EXT_IRQ 0x89
#define PACKAGE_OP 0x12
#define BYTE_PREFIX 0x0a
#define GAS_SYSTEM_IO 1

static int sums_to_zero(uint64_t a, uint32_t n) {
    uint8_t s = 0;
    while (n--)
        s += rd8(a++);
    return s == 0;
}

static int is_rsdp(uint64_t a) {
    static const char sig[] = "RSD PTR ";
    for (int i = 0; i < 8; i++)
        if (rd8(a + i) != (uint8_t)sig[i])
            return 0;
    return sums_to_zero(a, 20);
}

static uint64_t find_rsdp(void) {
    if (boot.rsdp && boot.rsdp < GIB4_BELOW && is_rsdp(boot.rsdp))
        return boot.rsdp;
    uint64_t ebda = (uint64_t)rd16(EBDA_PTR) << 4;
    for (uint64_t a = ebda; ebda && a < ebda + 1024; a += 16)
        if (is_rsdp(a))
            return a;
    for (uint64_t a = RSDP_SCAN_START; a < RSDP_SCAN_END; a += 16)
        if (is_rsdp(a))
            return a;
    return 0;
}

/* A table's length if `a` holds one with signature `sig` and a good checksum. */
static uint32_t table_len(uint64_t a, const char *sig) {
    if (!a || a >= GIB4_BELOW)
        return 0;
    for (int i = 0; i < 4; i++)
        if (rd8(a + i) != (uint8_t)sig[i])
            return 0;
    uint32_t len = rd32(a + 4);
    return len >= 36 && sums_to_zero(a, len) ? len : 0;
}

static void read_madt(uint64_t t, uint32_t len) {
    for (uint64_t e = t + 44; e + 2 <= t + len && rd8(e + 1) >= 2; e += rd8(e + 1)) {
        if (rd8(e) == 0 && (rd32(e + 4) & 1) && acpi.ncpus < MAX_CPUS) /* local APIC, enabled */
            acpi.apic_id[acpi.ncpus++] = rd8(e + 3);
    }
}

static void read_fadt(uint64_t t, uint32_t len) {
    acpi.dsdt = rd32(t + 40);
    if (len >= 148 && rd64(t + 140))
        acpi.dsdt = rd64(t + 140);
    if (len >= 129 && rd8(t + 116) == GAS_SYSTEM_IO) {
        acpi.reset_port = (uint16_t)rd64(t + 120);
        acpi.reset_value = rd8(t + 128);
    }
    if (len >= 256 && rd8(t + 244) == GAS_SYSTEM_IO)
        acpi.sleep_port = (uint16_t)rd64(t + 248);
}

static int match(uint64_t a, const char *s) {
    for (; *s; s++, a++)
        if (rd8(a) != (uint8_t)*s)
            return 0;
    return 1;
}

/* One LNRO0005 device: its window and GSI, from the descriptors after its
 * _HID up to the next device's. */
static void read_virtio(uint64_t from, uint64_t end) {
    uint64_t base = 0, size = 0;
    uint32_t gsi = 0;
    int have_irq = 0;
    for (uint64_t a = from; a + 9 < end && !(base && have_irq); a++) {
        if (a > from && match(a, "LNRO0005"))
            break;
        if (!base && rd8(a) == MEM32_FIXED && rd16(a + 1) == 9) {
            base = rd32(a + 4);
            size = rd32(a + 8);
        } else if (!have_irq && rd8(a) == EXT_IRQ && rd16(a + 1) >= 6 && rd8(a + 4) >= 1) {
            gsi = rd32(a + 5);
            have_irq = 1;
        }
    }
    if (base && have_irq && acpi.nvirtio < ACPI_MAX_VIRTIO)
        acpi.virtio[acpi.nvirtio++] = (struct acpi_window){base, size, gsi};
}

static void read_dsdt(uint64_t t, uint32_t len) {
    uint64_t end = t + len;
    for (uint64_t a = t + 36; a + 8 <= end; a++) {
        if (match(a, "LNRO0005"))
            read_virtio(a, end);
        /* Name (_S5_, Package () { SLP_TYPa, ... }) */
        if (match(a, "_S5_") && rd8(a + 4) == PACKAGE_OP) {
            uint64_t p = a + 5;
            p += 1 + (rd8(p) >> 6); /* PkgLength: lead byte + 0..3 more */
            p += 1;                 /* NumElements */
            uint8_t op = rd8(p);
            acpi.s5_type = op == BYTE_PREFIX ? rd8(p + 1) : op; /* Zero/One are 0x00/0x01 */
            acpi.s5_found = 1;
        }
    }
}

void acpi_find(void) {
    memset(&acpi, 0, sizeof acpi);
    uint64_t rsdp = find_rsdp();
    if (!rsdp)
        return;
    acpi.rsdp = rsdp;
    int xsdt = rd8(rsdp + 15) >= 2 && sums_to_zero(rsdp, rd32(rsdp + 20));
    uint64_t root = xsdt ? rd64(rsdp + 24) : rd32(rsdp + 16);
    uint32_t root_len = table_len(root, xsdt ? "XSDT" : "RSDT");
    uint32_t entry = xsdt ? 8 : 4;
    for (uint64_t e = root + 36; root_len && e + entry <= root + root_len; e += entry) {
        uint64_t t = xsdt ? rd64(e) : rd32(e);
        uint32_t len;
        if ((len = table_len(t, "APIC")))
            read_madt(t, len);
        else if ((len = table_len(t, "FACP")))
            read_fadt(t, len);
    }
    uint32_t len = table_len(acpi.dsdt, "DSDT");
    if (len)
        read_dsdt(acpi.dsdt, len);
}
