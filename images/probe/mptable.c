/* Intel MultiProcessor Specification 1.4 tables: the CPU list a VMM without
 * ACPI publishes. */
#include "probe.h"

static uint8_t sum8(uint64_t addr, size_t n) {
    const volatile uint8_t *p = phys(addr);
    uint8_t s = 0;
    while (n--)
        s += *p++;
    return s;
}

static uint64_t scan(uint64_t start, uint64_t end) {
    for (uint64_t a = start; a + 16 <= end; a += 16) {
        const volatile uint8_t *p = phys(a);
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' && p[8] &&
            sum8(a, p[8] * 16) == 0)
            return a;
    }
    return 0;
}

static void add_cpu(struct mp_info *mp, uint8_t id, int bsp) {
    if (mp->ncpus >= MAX_CPUS)
        return;
    if (bsp)
        mp->bsp = mp->ncpus;
    mp->apic_id[mp->ncpus++] = id;
}

void mp_find(struct mp_info *mp) {
    mp->found = 0;
    mp->ncpus = 0;
    mp->bsp = -1;

    uint64_t fp = 0, ebda = (uint64_t)*(volatile uint16_t *)phys(0x40e) << 4;
    if (ebda)
        fp = scan(ebda, ebda + 1024);
    if (!fp)
        fp = scan(0x9fc00, 0xa0000);
    if (!fp)
        fp = scan(0xf0000, 0x100000);
    if (!fp)
        return;

    const volatile uint8_t *f = phys(fp);
    if (f[11]) { /* a default configuration: two CPUs, no table */
        mp->found = 1;
        add_cpu(mp, 0, 1);
        add_cpu(mp, 1, 0);
        return;
    }
    uint64_t ct = *(volatile uint32_t *)phys(fp + 4);
    const volatile uint8_t *c = phys(ct);
    if (!ct || c[0] != 'P' || c[1] != 'C' || c[2] != 'M' || c[3] != 'P')
        return;
    uint16_t len = *(volatile uint16_t *)phys(ct + 4);
    if (len < 0x2c || sum8(ct, len) != 0)
        return;
    mp->found = 1;

    /* Walk by the table length, as Linux does: QEMU's qboot leaves the
     * entry count at 0. */
    uint64_t e = ct + 0x2c, end = ct + len;
    while (e < end) {
        const volatile uint8_t *p = phys(e);
        if (p[0] == 0) { /* processor: id at 1, flags at 3 (enabled, BSP) */
            if (p[3] & 1)
                add_cpu(mp, p[1], p[3] & 2);
            e += 20;
        } else {
            e += 8;
        }
    }
}
