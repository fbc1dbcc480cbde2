/* The default mode: the common boot report is all it does. */
#include "probe.h"

static void run(const char *cmdline) { (void)cmdline; }

PROBE_MODE(boot, run);
