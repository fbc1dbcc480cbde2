/* unclaimed: reads and writes an I/O port and an MMIO address that no
 * device claims (probe.unclaimed_n times each), prints what the reads
 * returned, then spins so the host can read the VMM's counters. A VMM
 * must answer all-ones and let the guest go on. */
#include "probe.h"

#define UNCLAIMED_PORT 0x510        /* QEMU's fw_cfg; nothing in berth-vmm */
#define UNCLAIMED_MMIO 0xd0100000ull /* in the MMIO gap, past every virtio window */

static void run(const char *cmdline) {
    uint64_t n = probe_arg_u64(cmdline, "unclaimed_n", 3);
    volatile uint32_t *mmio = phys(UNCLAIMED_MMIO);
    uint8_t port = 0;
    uint32_t word = 0;
    for (uint64_t i = 0; i < n; i++) {
        port = inb(UNCLAIMED_PORT);
        word = *mmio;
        outb(UNCLAIMED_PORT, 0x5a);
        *mmio = 0x5a5a5a5a;
    }
    pr("PROBE unclaimed port=0x%x mmio=0x%x n=%lu\n", port, word, n);
    for (;;)
        cpu_relax();
}
PROBE_MODE(unclaimed, run);
