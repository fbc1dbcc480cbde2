/* Copies the command line and memory map out of the loader's structures
 * into `boot`, before anything writes to low memory. */
#include "probe.h"

struct bootinfo boot;

/* Linux boot_params ("zero page") offsets */
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define BP_E820_ENTRY_SIZE 20

/* PVH hvm_start_info */
#define PVH_MAGIC 0x336ec578
#define PVH_VERSION 4
#define PVH_CMDLINE 24
#define PVH_RSDP 32
#define PVH_MEMMAP 40
#define PVH_MEMMAP_ENTRIES 48
#define PVH_MEMMAP_ENTRY_SIZE 24

static void copy_cmdline(uint64_t addr) {
    size_t i = 0;
    if (addr)
        for (const volatile char *s = phys(addr); i < CMDLINE_MAX - 1 && s[i]; i++)
            boot.cmdline[i] = s[i];
    boot.cmdline[i] = 0;
}

static void add_e820(uint64_t addr, uint64_t size, uint32_t type) {
    if (boot.e820_count < MAX_E820)
        boot.e820[boot.e820_count++] = (struct e820_entry){addr, size, type};
}

void bootinfo_read(int kind, uint64_t info) {
    boot.kind = kind;
    if (kind == BOOT_LINUX) {
        uint64_t cmd = rd32(info + BP_CMD_LINE_PTR) |
                       (uint64_t)rd32(info + BP_EXT_CMD_LINE_PTR) << 32;
        copy_cmdline(cmd);
        boot.rsdp = rd64(info + BP_ACPI_RSDP_ADDR);
        uint32_t n = *(volatile uint8_t *)phys(info + BP_E820_ENTRIES);
        for (uint32_t i = 0; i < n; i++) {
            uint64_t e = info + BP_E820_TABLE + i * BP_E820_ENTRY_SIZE;
            add_e820(rd64(e), rd64(e + 8), rd32(e + 16));
        }
        return;
    }
    if (rd32(info) != PVH_MAGIC) {
        copy_cmdline(0);
        return;
    }
    copy_cmdline(rd64(info + PVH_CMDLINE));
    boot.rsdp = rd64(info + PVH_RSDP);
    if (rd32(info + PVH_VERSION) < 1) /* version 0 has no memory map */
        return;
    uint64_t map = rd64(info + PVH_MEMMAP);
    uint32_t n = rd32(info + PVH_MEMMAP_ENTRIES);
    for (uint32_t i = 0; map && i < n; i++) {
        uint64_t e = map + i * PVH_MEMMAP_ENTRY_SIZE;
        add_e820(rd64(e), rd64(e + 8), rd32(e + 16));
    }
}

int e820_is_ram(uint64_t addr, uint64_t size) {
    for (uint32_t i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        if (e->type == E820_RAM && addr >= e->addr && addr + size <= e->addr + e->size)
            return 1;
    }
    return 0;
}
