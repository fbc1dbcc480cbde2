/* The two boot entries. Both zero .bss, build the probe's own identity map of
 * the first 4 GiB, load its own GDT and stack, and call probe_main(kind, info):
 * nothing the loader set up is trusted beyond the boot-info pointer. */
#include "probe.h"

#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100

/* PVH: XEN_ELFNOTE_PHYS32_ENTRY. The payload is 8 bytes as in Linux, because
 * QEMU reads it as a size_t. */
    .section .note.Xen, "a"
    .balign 4
    .long 4, 8, 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start

/* PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info. */
    .section .text32, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    /* .bss is zero, so only the low dword of each entry needs writing. */
    movl $(pdpt + 3), pml4
    mov $pdpt, %edi
    mov $(pd + 3), %eax
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    dec %ecx
    jnz 1b
    mov $pd, %edi
    mov $0x83, %eax             /* present, writable, 2 MiB */
    mov $2048, %ecx
2:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz 2b

    lgdtl gdt_ptr
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $(CR0_PG | CR0_PE), %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE64, $pvh_long

    .text
    .code64
pvh_long:
    mov %esi, %esi              /* zero-extend the boot-info pointer */
    mov $BOOT_PVH, %edi
    jmp common64

/* Linux x86-64 boot protocol: long mode, paging on (first GiB identity
 * mapped), rsi = boot_params. No stack is used until our own is loaded. */
    .globl linux_start
linux_start:
    cli
    cld
    mov %rsi, %r8

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    xor %eax, %eax
    rep stosq

    movl $(pdpt + 3), pml4(%rip)
    mov $pdpt, %edi
    mov $(pd + 3), %eax
    mov $4, %ecx
1:  mov %eax, (%rdi)
    add $0x1000, %eax
    add $8, %rdi
    dec %ecx
    jnz 1b
    mov $pd, %edi
    mov $0x83, %eax
    mov $2048, %ecx
2:  mov %eax, (%rdi)
    add $0x200000, %eax
    add $8, %rdi
    dec %ecx
    jnz 2b

    lgdt gdt_ptr(%rip)
    mov $pml4, %eax
    mov %rax, %cr3
    mov $(bsp_stack + BSP_STACK_SIZE), %esp
    pushq $SEL_CODE64
    lea 3f(%rip), %rax
    pushq %rax
    lretq                       /* reload CS from our GDT */
3:  mov %r8, %rsi
    mov $BOOT_LINUX, %edi

/* rdi = boot kind, rsi = boot-info physical address */
common64:
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $(bsp_stack + BSP_STACK_SIZE), %esp
    call probe_main
    call probe_end

    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* SEL_CODE64: 64-bit code, accessed */
    .quad 0x00cf93000000ffff    /* SEL_DATA: flat data, accessed */
gdt_end:
    .balign 16
    .globl gdt_ptr
gdt_ptr:                        /* lgdtl reads the low 4 bytes of the base */
    .word gdt_end - gdt - 1
    .quad gdt

    .bss
    .balign 4096
    .globl pml4
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4 * 4096
    .balign 16
bsp_stack: .skip BSP_STACK_SIZE
