/* Shared declarations of the probe guest (C and assembly). */
#ifndef PROBE_H
#define PROBE_H

#define BOOT_LINUX 1
#define BOOT_PVH 2

#define MAX_CPUS 64
#define AP_STACK_SIZE 4096
#define BSP_STACK_SIZE 16384
#define TRAMP_ADDR 0x10000 /* SIPI vector 0x10 */

#define SEL_CODE64 0x08
#define SEL_DATA 0x10

#ifndef __ASSEMBLER__
#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>

#define MAX_E820 128
#define CMDLINE_MAX 4096
#define E820_RAM 1

struct e820_entry {
    uint64_t addr, size;
    uint32_t type;
};

struct bootinfo {
    int kind;
    uint64_t rsdp; /* where the loader says the ACPI RSDP is (0: not said) */
    char cmdline[CMDLINE_MAX];
    uint32_t e820_count;
    struct e820_entry e820[MAX_E820];
};
extern struct bootinfo boot;

/* A mode registers itself by defining one of these with PROBE_MODE; the
 * linker collects them between __start_probe_modes and __stop_probe_modes. */
struct probe_mode {
    const char *name;
    void (*run)(const char *cmdline);
    /* Optional: what every AP runs instead of halting (it must not return). */
    void (*ap_run)(uint32_t slot);
};
#define PROBE_MODE(ident, fn)                                              \
    static const struct probe_mode probe_mode_##ident                      \
        __attribute__((section(".probe_modes"), used, aligned(8))) = {     \
            #ident, fn, 0}
#define PROBE_MODE_SMP(ident, fn, ap_fn)                                   \
    static const struct probe_mode probe_mode_##ident                      \
        __attribute__((section(".probe_modes"), used, aligned(8))) = {     \
            #ident, fn, ap_fn}
extern const struct probe_mode __start_probe_modes[], __stop_probe_modes[];

/* Static buffers that the boot code does not zero (a mode initialises them). */
#define NOINIT __attribute__((section(".noinit")))

struct mp_info {
    int found;
    uint32_t ncpus;
    uint8_t apic_id[MAX_CPUS];
    int bsp; /* index into apic_id, -1 if no entry has the BP flag */
};

#define ACPI_MAX_VIRTIO 32
#define GIB4_BELOW 0x100000000ull
struct acpi_window {
    uint64_t base, size;
    uint32_t gsi;
};
struct acpi_info {
    uint64_t rsdp, dsdt; /* 0: no ACPI */
    uint32_t ncpus;      /* enabled local APICs in the MADT */
    uint8_t apic_id[MAX_CPUS];
    uint32_t nvirtio; /* LNRO0005 devices in the DSDT */
    struct acpi_window virtio[ACPI_MAX_VIRTIO];
    uint16_t sleep_port, reset_port; /* FADT registers in I/O space (0: none) */
    uint8_t reset_value, s5_type, s5_found;
};
extern struct acpi_info acpi;

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* serial.c */
void serial_init(void);
void serial_putc_raw(char c);
void serial_putc(char c);
int serial_getc(void);
void pr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* cmdline.c */
int probe_arg(const char *cmdline, const char *key, char *out, size_t outsz);
uint64_t probe_arg_u64(const char *cmdline, const char *key, uint64_t dflt);

/* bootinfo.c */
void bootinfo_read(int kind, uint64_t info);
int e820_is_ram(uint64_t addr, uint64_t size);

/* idt.c */
void idt_init(void);
void idt_load(void);

/* acpi.c */
void acpi_find(void);
/* mptable.c */
void mp_find(struct mp_info *mp);

/* smp.c */
uint32_t smp_boot(const struct mp_info *mp);
/* Set before smp_boot: what the APs run once up (NULL: halt). */
extern void (*volatile ap_entry)(uint32_t slot);
extern volatile uint32_t ap_apic_id[MAX_CPUS];

/* main.c */
__attribute__((noreturn)) void probe_end(void);

/* The I/O and MSR instructions all work under the CPL0 emulator. */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "d"(port)); }
static inline uint8_t inb(uint16_t port) {
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "d"(port));
    return v;
}
static inline uint64_t rdmsr(uint32_t msr) {
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
/* Hides a constant physical address from gcc, which otherwise warns about
 * (or optimises on) dereferencing small integer addresses. */
static inline void *phys(uint64_t addr) {
    __asm__("" : "+r"(addr));
    return (void *)addr;
}
/* Little-endian reads of guest-physical memory (identity-mapped). */
static inline uint8_t rd8(uint64_t a) { return *(volatile uint8_t *)phys(a); }
static inline uint16_t rd16(uint64_t a) { return rd8(a) | (uint16_t)rd8(a + 1) << 8; }
static inline uint32_t rd32(uint64_t a) { return rd16(a) | (uint32_t)rd16(a + 2) << 16; }
static inline uint64_t rd64(uint64_t a) { return rd32(a) | (uint64_t)rd32(a + 4) << 32; }
#endif /* __ASSEMBLER__ */
#endif
