/* Vectors 0-31 report the fault on the serial port and end the run, so a
 * broken probe fails loudly instead of triple-faulting silently. */
#include "probe.h"

struct idt_gate {
    uint16_t off_lo, sel;
    uint8_t ist, type;
    uint16_t off_mid;
    uint32_t off_hi, zero;
} __attribute__((packed));

struct exc_frame {
    uint64_t vec, err, rip, cs, rflags, rsp, ss;
};

extern const char exception_stubs[];
static struct idt_gate idt[32] __attribute__((aligned(16)));

void idt_init(void) {
    for (int v = 0; v < 32; v++) {
        uint64_t a = (uint64_t)(exception_stubs + 16 * v);
        idt[v] = (struct idt_gate){(uint16_t)a, SEL_CODE64, 0, 0x8e, /* present interrupt gate */
                                   (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0};
    }
    idt_load();
}

void idt_load(void) {
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) p = {sizeof idt - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(p));
}

__attribute__((noreturn)) void exception_handler(struct exc_frame *f) {
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    pr("PROBE exception vec=%lu err=0x%lx rip=0x%lx cr2=0x%lx\n", f->vec, f->err, f->rip, cr2);
    probe_end();
}
