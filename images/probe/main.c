/* The common boot report, then the mode chosen by probe.mode= (default boot). */
#include "probe.h"

#define GIB4 0x100000000ull

/* i8042 reset ends a berth-vmm run; QEMU microvm may lack an i8042, so then
 * isa-debug-exit, then a triple fault. Never hlt: with an in-kernel irqchip
 * a hlt with IF=0 never returns to the VMM. */
__attribute__((noreturn)) void probe_end(void) {
    outb(0x64, 0xfe);
    outb(0xf4, 0);
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) none = {0, 0};
    __asm__ volatile("lidt %0; ud2" ::"m"(none));
    for (;;)
        ;
}

static void report_memory(void) {
    uint64_t ram = 0, page = 0;
    for (uint32_t i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        pr("PROBE e820 0x%lx 0x%lx %u\n", e->addr, e->size, e->type);
        if (e->type != E820_RAM)
            continue;
        ram += e->size;
        uint64_t end = e->addr + e->size;
        if (end > GIB4)
            end = GIB4;
        end &= ~0xfffull;
        if (end >= e->addr + 0x1000 && end - 0x1000 > page)
            page = end - 0x1000;
    }
    pr("PROBE mem_kib %lu\n", ram / 1024);
    if (!page) {
        pr("PROBE mem_check none\n");
        return;
    }
    volatile uint64_t *p = phys(page);
    for (int i = 0; i < 512; i++)
        p[i] = page ^ (i * 0x9e3779b97f4a7c15ull);
    int ok = 1;
    for (int i = 0; i < 512; i++)
        if (p[i] != (page ^ (i * 0x9e3779b97f4a7c15ull)))
            ok = 0;
    pr("PROBE mem_check %s 0x%lx\n", ok ? "ok" : "fail", page);
}

void probe_main(int kind, uint64_t info) {
    idt_init(); /* so that a bad boot-info pointer is reported, not a triple fault */
    serial_init();
    bootinfo_read(kind, info); /* before anything writes to low memory */
    pr("PROBE hello boot=%s\n", kind == BOOT_PVH ? "pvh" : "linux");
    pr("PROBE cmdline %s\n", boot.cmdline);
    report_memory();

    struct mp_info mp;
    mp_find(&mp);
    if (mp.found)
        pr("PROBE cpus_mp %u\n", mp.ncpus);
    else
        pr("PROBE cpus_mp 1 nomptable\n");
    acpi_find();
    if (acpi.rsdp) {
        pr("PROBE acpi rsdp=0x%lx dsdt=0x%lx\n", acpi.rsdp, acpi.dsdt);
        pr("PROBE cpus_madt %u\n", acpi.ncpus);
        for (uint32_t i = 0; i < acpi.nvirtio; i++)
            pr("PROBE acpi_virtio 0x%lx 0x%lx %u\n", acpi.virtio[i].base, acpi.virtio[i].size,
               acpi.virtio[i].gsi);
    } else {
        pr("PROBE acpi none\n");
    }
    /* CPUs from the MADT when there is one, as Linux prefers it. */
    if (acpi.ncpus) {
        mp.ncpus = acpi.ncpus;
        for (uint32_t i = 0; i < acpi.ncpus; i++)
            mp.apic_id[i] = acpi.apic_id[i];
    }
    /* The mode is known before the APs start: it may give them work. */
    char name[32] = "boot";
    probe_arg(boot.cmdline, "mode", name, sizeof name);
    const struct probe_mode *m = __start_probe_modes;
    while (m < __stop_probe_modes && strcmp(m->name, name) != 0)
        m++;
    if (m < __stop_probe_modes)
        ap_entry = m->ap_run;
    pr("PROBE cpus_up %u\n", smp_boot(&mp));

    if (m == __stop_probe_modes) {
        pr("PROBE error unknown mode %s\n", name);
        probe_end();
    }
    pr("PROBE mode %s\n", name);
    m->run(boot.cmdline);
    pr("PROBE done\n");
    probe_end();
}
