/* AP bring-up through the x2APIC: on the PVM KVM the xAPIC MMIO ICR delivers
 * nothing, so IPIs are sent with wrmsr. Only where the x2APIC cannot be
 * enabled at all (QEMU TCG before 8.0 ignores the EXTD bit) does the probe
 * fall back to the xAPIC MMIO registers. */
#include "probe.h"

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_EXTD 0x400
#define APIC_BASE_EN 0x800
#define MSR_X2APIC_ID 0x802
#define MSR_X2APIC_ICR 0x830
#define ICR_INIT 0x4500    /* INIT, level assert */
#define ICR_STARTUP 0x4600 /* STARTUP, level assert, | vector */
#define AP_TIMEOUT_CYCLES 2000000000ull
#define XAPIC_ID 0x20
#define XAPIC_ICR_LO 0x300
#define XAPIC_ICR_HI 0x310

extern const char tramp_start[], tramp_end[];

volatile uint32_t ap_apic_id[MAX_CPUS];
static uint32_t aps_up;
static uint64_t xapic_base; /* set only when the x2APIC would not enable */

/* Disabled -> x2APIC in one write is an invalid transition (#GP); go
 * through xAPIC first. KVM raises #GP here if the VMM's CPUID lacks x2APIC.
 * Returns whether the x2APIC is now on. */
static int x2apic_enable(void) {
    uint64_t b = rdmsr(MSR_APIC_BASE);
    if (!(b & APIC_BASE_EN))
        wrmsr(MSR_APIC_BASE, b |= APIC_BASE_EN);
    if (!(b & APIC_BASE_EXTD))
        wrmsr(MSR_APIC_BASE, b | APIC_BASE_EXTD);
    return (rdmsr(MSR_APIC_BASE) & APIC_BASE_EXTD) != 0;
}

static volatile uint32_t *xapic_reg(uint32_t off) { return phys(xapic_base + off); }

static uint32_t apic_id(void) {
    if (xapic_base)
        return *xapic_reg(XAPIC_ID) >> 24;
    return (uint32_t)rdmsr(MSR_X2APIC_ID);
}

static void send_ipi(uint32_t id, uint32_t icr) {
    if (xapic_base) {
        *xapic_reg(XAPIC_ICR_HI) = id << 24;
        *xapic_reg(XAPIC_ICR_LO) = icr;
        return;
    }
    wrmsr(MSR_X2APIC_ICR, (uint64_t)id << 32 | icr);
}

void (*volatile ap_entry)(uint32_t slot);

/* Runs on each AP with its own stack; slot numbers come from the trampoline. */
__attribute__((noreturn)) void ap_main(uint32_t slot) {
    idt_load();
    x2apic_enable();
    ap_apic_id[slot] = apic_id();
    __atomic_fetch_add(&aps_up, 1, __ATOMIC_SEQ_CST);
    if (ap_entry)
        ap_entry(slot);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* Starts every enabled AP of the MP table, one at a time, and returns how
 * many CPUs run (the BSP included). */
uint32_t smp_boot(const struct mp_info *mp) {
    size_t size = tramp_end - tramp_start;
    if (mp->ncpus <= 1 || size > 4096 || !e820_is_ram(TRAMP_ADDR, 4096))
        return 1;
    if (!x2apic_enable())
        xapic_base = rdmsr(MSR_APIC_BASE) & 0xffffff000ull;
    uint32_t self = apic_id();
    memcpy(phys(TRAMP_ADDR), tramp_start, size);

    uint32_t want = 0;
    for (uint32_t i = 0; i < mp->ncpus; i++) {
        uint32_t id = mp->apic_id[i];
        if (id == self)
            continue;
        want++;
        send_ipi(id, ICR_INIT);
        send_ipi(id, ICR_STARTUP | (TRAMP_ADDR >> 12));
        send_ipi(id, ICR_STARTUP | (TRAMP_ADDR >> 12));
        uint64_t t0 = rdtsc();
        while (__atomic_load_n(&aps_up, __ATOMIC_ACQUIRE) < want &&
               rdtsc() - t0 < AP_TIMEOUT_CYCLES)
            cpu_relax();
    }
    return 1 + __atomic_load_n(&aps_up, __ATOMIC_ACQUIRE);
}
