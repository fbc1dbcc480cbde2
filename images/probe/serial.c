/* Polled 16550 at 0x3f8 and a small printf. No interrupts: the probe runs
 * with IF=0 throughout. */
#include "probe.h"

#define COM1 0x3f8
#define LSR (COM1 + 5)
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

void serial_init(void) {
    outb(COM1 + 1, 0x00); /* IER: no interrupts */
    outb(COM1 + 3, 0x03); /* LCR: 8N1, DLAB off */
    outb(COM1 + 4, 0x03); /* MCR: DTR | RTS, no loopback */
}

void serial_putc_raw(char c) {
    while (!(inb(LSR) & LSR_THR_EMPTY))
        cpu_relax();
    outb(COM1, (uint8_t)c);
}

void serial_putc(char c) {
    if (c == '\n')
        serial_putc_raw('\r');
    serial_putc_raw(c);
}

int serial_getc(void) {
    while (!(inb(LSR) & LSR_DATA_READY))
        cpu_relax();
    return inb(COM1);
}

static void put_u64(uint64_t v, unsigned base, int neg) {
    char buf[24];
    int i = 0;
    do {
        buf[i++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        serial_putc('-');
    while (i)
        serial_putc(buf[--i]);
}

/* Supports %s %c %d %u %x (with an 'l' for 64-bit) and %%. */
void pr(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        int is_long = 0;
        while (*++fmt == 'l')
            is_long = 1;
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            while (*s)
                serial_putc(*s++);
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_u64(v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0);
            break;
        }
        case 'u':
        case 'x': {
            uint64_t v = is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            put_u64(v, *fmt == 'x' ? 16 : 10, 0);
            break;
        }
        case '%':
            serial_putc('%');
            break;
        case 0:
            fmt--;
            break;
        default:
            serial_putc('%');
            serial_putc(*fmt);
        }
    }
    va_end(ap);
}
