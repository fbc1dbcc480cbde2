/* poweroff: enters ACPI S5 the way Linux does on hardware-reduced ACPI:
 * the DSDT's _S5_ sleep type with SLP_EN, written to the FADT's sleep
 * control register. acpi_reset: the FADT's reset value to its reset
 * register. Neither should come back; if one does, it says so. */
#include "probe.h"

#define SLP_TYP_SHIFT 2
#define SLP_EN 0x20

static void run_poweroff(const char *cmdline) {
    (void)cmdline;
    if (!acpi.sleep_port || !acpi.s5_found) {
        pr("PROBE poweroff error=no_acpi_sleep_register\n");
        return;
    }
    pr("PROBE poweroff port=0x%x slp_typ=%u\n", acpi.sleep_port, acpi.s5_type);
    outb(acpi.sleep_port, (uint8_t)(acpi.s5_type << SLP_TYP_SHIFT | SLP_EN));
    pr("PROBE poweroff error=still_running\n");
}
PROBE_MODE(poweroff, run_poweroff);

static void run_acpi_reset(const char *cmdline) {
    (void)cmdline;
    if (!acpi.reset_port) {
        pr("PROBE acpi_reset error=no_reset_register\n");
        return;
    }
    pr("PROBE acpi_reset port=0x%x value=%u\n", acpi.reset_port, acpi.reset_value);
    outb(acpi.reset_port, acpi.reset_value);
    pr("PROBE acpi_reset error=still_running\n");
}
PROBE_MODE(acpi_reset, run_acpi_reset);
