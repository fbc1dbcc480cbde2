/* Burns CPU on every vCPU, for measuring CPU shares: the APs spin forever,
 * the BSP spins and prints "PROBE burn <n>" every probe.burn_cycles TSC
 * cycles (default about 0.5 s) so a test sees it progress. Never ends: the
 * VMM is stopped from outside. */
#include "probe.h"

static volatile uint64_t ap_loops[MAX_CPUS];

static void ap_burn(uint32_t slot) {
    for (;;)
        ap_loops[slot % MAX_CPUS]++;
}

static void run(const char *cmdline) {
    uint64_t every = probe_arg_u64(cmdline, "burn_cycles", 1300000000ull);
    uint64_t n = 0, loops = 0, next = rdtsc() + every;
    pr("PROBE burn ready\n");
    for (;;) {
        loops++;
        if ((loops & 0xff) == 0 && rdtsc() >= next) {
            pr("PROBE burn %lu\n", n++);
            next = rdtsc() + every;
        }
    }
}

PROBE_MODE_SMP(burn, run, ap_burn);
