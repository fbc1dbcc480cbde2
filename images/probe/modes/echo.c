/* Serial round trip: every received byte goes straight back, until a line
 * "quit" or an EOT (0x04). */
#include "probe.h"

static void run(const char *cmdline) {
    (void)cmdline;
    char line[4];
    size_t len = 0; /* of the current line, even past what line[] keeps */
    int last = '\n';
    uint64_t bytes = 0;

    pr("PROBE echo ready\n");
    for (;;) {
        int c = serial_getc();
        bytes++;
        serial_putc_raw((char)c);
        last = c;
        if (c == 0x04)
            break;
        if (c == '\n' || c == '\r') {
            if (len == 4 && memcmp(line, "quit", 4) == 0)
                break;
            len = 0;
        } else {
            if (len < sizeof line)
                line[len] = (char)c;
            len++;
        }
    }
    if (last != '\n') /* start the report on a line of its own */
        serial_putc('\n');
    pr("PROBE echo done bytes=%lu\n", bytes);
}

PROBE_MODE(echo, run);
