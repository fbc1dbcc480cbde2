/* Memory dirtier for snapshot and live-migration tests: writes whole 4 KiB
 * pages of a region at 32 MiB at a paced rate, keeps a step counter and a
 * checksum, reports them, and verifies the whole region on request ('v' or
 * 'q' on the console).
 *
 * The page writes, the pacing and the verification run at CPL3, which the
 * PVM KVM runs natively (it emulates CPL0 code one instruction at a time):
 * the mode loads its own GDT (user segments and a TSS), sets U/S on the
 * identity-map entries of the probe image and the region, and calls user
 * functions through iretq; each ends with a ud2 whose #UD brings it back to
 * the kernel caller. The kernel does the port I/O (console commands,
 * reports) between slices of about 2 ms. probe.dirty_cpl=0 runs the same
 * functions at CPL0 instead (for comparison).
 *
 * Steps are numbered from 1: step s writes page s % pages with the words
 * s*K_STEP + p*K_PAGE + w and sets version[p] = s, count = s,
 * csum = (csum ^ s) * CSUM_PRIME (csum starts at 0). Before the first step
 * every page holds the version-0 content p*K_PAGE + w. */
#include "probe.h"

#define REGION_BASE 0x2000000ull /* 32 MiB */
#define PAGE_WORDS 512
#define MAX_MIB 1024
#define MAX_PAGES (MAX_MIB * 256)
#define K_STEP 0x9E3779B97F4A7C15ull
#define K_PAGE 0x100000001B3ull
#define CSUM_PRIME 0x100000001B3ull
#define SLICE_MS 2

#define COM1 0x3f8
#define LSR_DATA_READY 0x01

/* The mode's GDT: the probe's two kernel entries at the same selectors,
 * then the user segments and the TSS. */
#define SEL_UDATA 0x18
#define SEL_UCODE64 0x20
#define SEL_TSS 0x28
#define USER_RPL 3
#define VEC_UD 6

#define CR4_TSD (1ull << 2)
#define CR4_SMEP (1ull << 20)
#define CR4_SMAP (1ull << 21)
#define PTE_USER 0x4ull
#define PTE_PS 0x80ull
#define PTE_ADDR 0x000ffffffffff000ull
#define MIB2 0x200000ull

#define STR_(x) #x
#define STR(x) STR_(x)

struct dirty {
    uint64_t *region;
    uint64_t pages;
    uint64_t count, csum;  /* steps done; checksum over them */
    uint64_t pps, tsc_hz;  /* pacing: pages per second, TSC cycles per second */
    uint64_t t0, count0;   /* pacing origin: count0 steps were due at t0 */
    uint64_t max_lag;      /* steps behind after which the origin moves */
    uint64_t slice_end;    /* a batch returns at this TSC value */
    uint64_t bad_page;     /* verify: the first bad page, or pages if all ok */
};

/* version[p]: the last step that wrote page p (0: only the initial content). */
static uint64_t version[MAX_PAGES] NOINIT;
static struct dirty st;
static uint8_t user_stack[16384] NOINIT __attribute__((aligned(16)));
static uint8_t fault_stack[8192] NOINIT __attribute__((aligned(16)));

/* ---- code that runs at CPL3 (or CPL0 with probe.dirty_cpl=0) ---------- */
/* Only plain integer instructions, rdtsc, pause, mul/div: nothing that
 * needs CPL0, no call into the rest of the probe. */

static inline uint64_t u_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* a * b / c with a 128-bit intermediate; the quotient must fit 64 bits. */
static inline uint64_t muldiv(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t q, r;
    __asm__("mulq %[b]\n\tdivq %[c]" : "=a"(q), "=&d"(r) : "0"(a), [b] "r"(b), [c] "r"(c) : "cc");
    return q;
}

/* The content of page p after step s: word w = s*K_STEP + p*K_PAGE + w. */
static void write_page(uint64_t *pg, uint64_t v) {
    for (int w = 0; w < PAGE_WORDS; w += 4, v += 4) {
        pg[w] = v;
        pg[w + 1] = v + 1;
        pg[w + 2] = v + 2;
        pg[w + 3] = v + 3;
    }
}

static int page_ok(const uint64_t *pg, uint64_t v) {
    uint64_t bad = 0;
    for (int w = 0; w < PAGE_WORDS; w++, v++)
        bad |= pg[w] ^ v;
    return bad == 0;
}

/* The last step in 1..count that wrote page p, or 0 if none did. */
static uint64_t expected_version(uint64_t p, uint64_t count, uint64_t pages) {
    uint64_t behind = (count % pages + pages - p) % pages;
    return behind >= count ? 0 : count - behind;
}

static void u_init(struct dirty *d) {
    for (uint64_t p = 0; p < d->pages; p++) {
        write_page(d->region + p * PAGE_WORDS, p * K_PAGE);
        version[p] = 0;
    }
}

static void u_verify(struct dirty *d) {
    for (uint64_t p = 0; p < d->pages; p++) {
        uint64_t v = version[p];
        if (v != expected_version(p, d->count, d->pages) ||
            !page_ok(d->region + p * PAGE_WORDS, v * K_STEP + p * K_PAGE)) {
            d->bad_page = p;
            return;
        }
    }
    d->bad_page = d->pages;
}

/* Writes pages at the paced rate until slice_end. A lag of more than
 * max_lag steps (a pause of the VM, a long kernel stop, a rate above what
 * the CPU reaches) moves the pacing origin: no catch-up burst. */
static void u_batch(struct dirty *d) {
    for (;;) {
        uint64_t now = u_rdtsc();
        if ((int64_t)(now - d->slice_end) >= 0)
            return;
        if ((int64_t)(now - d->t0) < 0) {
            d->t0 = now;
            d->count0 = d->count;
        }
        uint64_t due = d->count0 + muldiv(now - d->t0, d->pps, d->tsc_hz);
        if (d->count >= due) {
            __asm__ volatile("pause");
            continue;
        }
        if (due - d->count > d->max_lag) {
            d->t0 = now;
            d->count0 = d->count;
        }
        uint64_t s = d->count + 1;
        uint64_t p = s % d->pages;
        write_page(d->region + p * PAGE_WORDS, s * K_STEP + p * K_PAGE);
        version[p] = s;
        d->csum = (d->csum ^ s) * CSUM_PRIME;
        d->count = s;
    }
}

/* ---- the way into CPL3 and back ---------------------------------------- */

static uint64_t gdt64[7] __attribute__((aligned(16)));
static struct {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3, iomap_base;
} __attribute__((packed, aligned(16))) tss;
static uint64_t kernel_rsp __attribute__((used));
static uint64_t ud_orig __attribute__((used)); /* the #UD handler the mode replaces */

void dirty_call_user(void (*fn)(struct dirty *), struct dirty *arg, void *user_rsp);
void dirty_ud_entry(void);

/* dirty_call_user(fn, arg, user stack top): saves the callee-saved registers
 * and the stack, iretq to CPL3 at dirty_user_start with IF=0, which calls
 * fn(arg) and then executes ud2 at dirty_user_ud. The mode's #UD gate
 * (dirty_ud_entry) recognises that address, takes the saved stack back and
 * returns to the caller at CPL0; any other #UD goes on to the probe's own
 * handler. (syscall is no way back on the PVM KVM: it reaches the LSTAR
 * code, but that code then faults on a load of %ds with the kernel data
 * selector and on `in`, as if it still ran at CPL3. Exceptions from CPL3
 * are delivered properly, through the TSS's RSP0.) */
__asm__(
    "    .text\n"
    "    .balign 16\n"
    "    .globl dirty_call_user\n"
    "dirty_call_user:\n"
    "    push %rbx\n"
    "    push %rbp\n"
    "    push %r12\n"
    "    push %r13\n"
    "    push %r14\n"
    "    push %r15\n"
    "    mov %rsp, kernel_rsp(%rip)\n"
    "    pushq $(" STR(SEL_UDATA) " | " STR(USER_RPL) ")\n"
    "    push %rdx\n"
    "    pushq $2\n"
    "    pushq $(" STR(SEL_UCODE64) " | " STR(USER_RPL) ")\n"
    "    lea dirty_user_start(%rip), %rax\n"
    "    push %rax\n"
    "    mov %rdi, %rax\n"
    "    mov %rsi, %rdi\n"
    "    iretq\n"
    "dirty_user_start:\n" /* CPL3 */
    "    call *%rax\n"
    "dirty_user_ud:\n"
    "    ud2\n"
    "    .balign 16\n"
    "    .globl dirty_ud_entry\n"
    "dirty_ud_entry:\n" /* CPL0, on the TSS's RSP0 stack if it came from CPL3 */
    "    push %rax\n"
    "    lea dirty_user_ud(%rip), %rax\n"
    "    cmp %rax, 8(%rsp)\n" /* the frame's RIP */
    "    pop %rax\n"
    "    jne 1f\n"
    "    mov kernel_rsp(%rip), %rsp\n"
    "    mov $" STR(SEL_DATA) ", %eax\n"
    "    mov %eax, %ds\n"
    "    mov %eax, %es\n"
    "    mov %eax, %ss\n"
    "    pop %r15\n"
    "    pop %r14\n"
    "    pop %r13\n"
    "    pop %r12\n"
    "    pop %rbp\n"
    "    pop %rbx\n"
    "    ret\n"
    "1:  jmp *ud_orig(%rip)\n");

extern const char __image_start[], __image_end[];

/* Sets or clears U/S on the identity-map entries (2 MiB pages, or 1 GiB)
 * that cover [start, end), then flushes the TLB. */
static void map_user(uint64_t start, uint64_t end, int on) {
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    for (uint64_t a = start & ~(MIB2 - 1); a < end; a += MIB2) {
        uint64_t *e = (uint64_t *)phys(cr3 & PTE_ADDR) + ((a >> 39) & 511);
        for (int level = 0; level < 3; level++) {
            *e = on ? *e | PTE_USER : *e & ~PTE_USER;
            if (level == 2 || (level == 1 && (*e & PTE_PS)))
                break;
            e = (uint64_t *)phys(*e & PTE_ADDR) + ((a >> (30 - 9 * level)) & 511);
        }
    }
    __asm__ volatile("mov %0, %%cr3" ::"r"(cr3) : "memory");
}

struct idt_gate {
    uint16_t off_lo, sel;
    uint8_t ist, type;
    uint16_t off_mid;
    uint32_t off_hi, zero;
} __attribute__((packed));

static struct idt_gate *ud_gate(void) {
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) p;
    __asm__ volatile("sidt %0" : "=m"(p));
    return (struct idt_gate *)p.base + VEC_UD;
}

static uint64_t gate_target(const struct idt_gate *g) {
    return g->off_lo | (uint64_t)g->off_mid << 16 | (uint64_t)g->off_hi << 32;
}

static void set_gate(struct idt_gate *g, uint64_t a) {
    g->off_lo = (uint16_t)a;
    g->off_mid = (uint16_t)(a >> 16);
    g->off_hi = (uint32_t)(a >> 32);
}

static void cpl3_setup(void) {
    uint64_t t = (uint64_t)&tss;
    gdt64[0] = 0;
    gdt64[1] = 0x00af9b000000ffffull; /* SEL_CODE64, as in entry.S */
    gdt64[2] = 0x00cf93000000ffffull; /* SEL_DATA */
    gdt64[3] = 0x00cff3000000ffffull; /* SEL_UDATA, DPL 3 */
    gdt64[4] = 0x00affb000000ffffull; /* SEL_UCODE64, DPL 3 */
    gdt64[5] = (sizeof tss - 1) | (t & 0xffffff) << 16 | 0x89ull << 40 | /* available 64-bit TSS */
               ((t >> 24) & 0xff) << 56;
    gdt64[6] = t >> 32;
    memset(&tss, 0, sizeof tss);
    tss.rsp[0] = (uint64_t)(fault_stack + sizeof fault_stack); /* CPL3 -> CPL0 stack */
    tss.iomap_base = sizeof tss;                               /* no I/O bitmap */
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) p = {sizeof gdt64 - 1, (uint64_t)gdt64};
    __asm__ volatile("lgdt %0; ltr %w1" ::"m"(p), "r"(SEL_TSS) : "memory");

    uint64_t cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    if (cr4 & (CR4_TSD | CR4_SMEP | CR4_SMAP))
        __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 & ~(CR4_TSD | CR4_SMEP | CR4_SMAP)));

    struct idt_gate *g = ud_gate();
    ud_orig = gate_target(g);
    set_gate(g, (uint64_t)dirty_ud_entry);
}

static int at_cpl3;

static void run_fn(void (*fn)(struct dirty *)) {
    if (at_cpl3)
        dirty_call_user(fn, &st, user_stack + sizeof user_stack);
    else
        fn(&st);
}

/* ---- the kernel side ---------------------------------------------------- */

static const char *hex16(char *buf, uint64_t v) {
    for (int i = 15; i >= 0; i--, v >>= 4)
        buf[i] = "0123456789abcdef"[v & 15];
    buf[16] = 0;
    return buf;
}

static void verify(void) {
    run_fn(u_verify);
    if (st.bad_page == st.pages)
        pr("PROBE dirty verify ok pages=%lu count=%lu\n", st.pages, st.count);
    else
        pr("PROBE dirty verify fail page=%lu count=%lu\n", st.bad_page, st.count);
}

static void run(const char *cmdline) {
    uint64_t mib = probe_arg_u64(cmdline, "dirty_mib", 16);
    uint64_t rate = probe_arg_u64(cmdline, "dirty_rate", 0);
    uint64_t khz = probe_arg_u64(cmdline, "tsc_khz", 2600000);
    uint64_t report_ms = probe_arg_u64(cmdline, "report_ms", 500);
    at_cpl3 = probe_arg_u64(cmdline, "dirty_cpl", 3) != 0;
    if (!khz)
        khz = 2600000;
    if (!report_ms)
        report_ms = 500;
    if (mib == 0 || mib > MAX_MIB) {
        pr("PROBE dirty error=bad_dirty_mib\n");
        return;
    }
    uint64_t region_end = REGION_BASE + (mib << 20);
    if (!e820_is_ram(REGION_BASE, mib << 20)) {
        pr("PROBE dirty error=region_not_ram\n");
        return;
    }
    uint64_t tsc_hz = khz * 1000;
    if (rate > tsc_hz / 256) /* at most one page per TSC cycle */
        rate = tsc_hz / 256;

    st.region = phys(REGION_BASE);
    st.pages = mib * 256;
    st.count = st.csum = 0;
    st.pps = rate * 256;
    st.tsc_hz = tsc_hz;
    st.max_lag = st.pps / 20 + 1; /* 50 ms of steps */
    if (at_cpl3) {
        cpl3_setup();
        map_user((uint64_t)__image_start, (uint64_t)__image_end, 1);
        map_user(REGION_BASE, region_end, 1);
    }
    run_fn(u_init);
    pr("PROBE dirty ready pages=%lu rate=%lu\n", st.pages, rate);

    uint64_t slice = khz * SLICE_MS, every = khz * report_ms;
    uint64_t now = rdtsc();
    uint64_t next_report = now + every, last_t = now, last_count = 0;
    st.t0 = now;
    st.count0 = 0;
    char hex[17];
    for (;;) {
        st.slice_end = rdtsc() + slice;
        run_fn(u_batch);
        if (inb(COM1 + 5) & LSR_DATA_READY) {
            int c = inb(COM1);
            if (c == 'v') {
                verify();
            } else if (c == 'q') {
                verify();
                pr("PROBE dirty stopped count=%lu csum=%s\n", st.count, hex16(hex, st.csum));
                break;
            }
        }
        now = rdtsc();
        if ((int64_t)(now - next_report) >= 0) {
            uint64_t kib_s = muldiv((st.count - last_count) * 4, tsc_hz, now - last_t);
            pr("PROBE dirty count=%lu csum=%s rate_kib_s=%lu\n", st.count, hex16(hex, st.csum),
               kib_s);
            last_t = now;
            last_count = st.count;
            next_report += every;
            if ((int64_t)(now - next_report) >= 0) /* came back from a pause: no burst */
                next_report = now + every;
        }
    }
    if (at_cpl3) {
        map_user((uint64_t)__image_start, (uint64_t)__image_end, 0);
        map_user(REGION_BASE, region_end, 0);
        set_gate(ud_gate(), ud_orig);
    }
}

PROBE_MODE(dirty, run);
