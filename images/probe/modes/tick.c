/* A guest that visibly makes progress: prints "PROBE tick <n>" every
 * probe.tick_cycles TSC cycles (default about 50 ms) until it receives a
 * 'q' on the console. A paused VM prints nothing; its count resumes. */
#include "probe.h"

#define COM1 0x3f8
#define LSR_DATA_READY 0x01

static void run(const char *cmdline) {
    uint64_t every = probe_arg_u64(cmdline, "tick_cycles", 130000000ull);
    uint64_t n = 0, next = rdtsc() + every;
    pr("PROBE tick ready\n");
    for (;;) {
        if ((inb(COM1 + 5) & LSR_DATA_READY) && inb(COM1) == 'q')
            break;
        if (rdtsc() >= next) {
            pr("PROBE tick %lu\n", n++);
            next += every;
            if (rdtsc() > next) /* came back from a pause: do not burst */
                next = rdtsc() + every;
        }
        cpu_relax();
    }
    pr("PROBE tick stopped at %lu\n", n);
}

PROBE_MODE(tick, run);
