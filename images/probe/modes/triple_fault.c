/* Ends the run the hard way: an empty IDT, then an exception, which the CPU
 * cannot deliver (#UD -> #DF -> shutdown). The VMM must report the triple
 * fault with the vCPU and RIP instead of hanging or exiting 0. */
#include "probe.h"

static void run(const char *cmdline) {
    (void)cmdline;
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) none = {0, 0};
    pr("PROBE triple_fault now\n");
    __asm__ volatile("lidt %0; ud2" ::"m"(none));
}

PROBE_MODE(triple_fault, run);
