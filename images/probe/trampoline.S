/* AP start-up. The SIPI starts an AP in real mode at CS=TRAMP_ADDR>>4, IP=0;
 * smp.c copies .text16 there. The code only uses CS-relative addresses and
 * link-time absolute ones, so it runs at any 4 KiB-aligned copy address. It
 * goes straight from real mode to long mode (PE and PG set together). */
#include "probe.h"

    .section .text16, "ax"
    .code16
    .globl ap_tramp
ap_tramp:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x1000, %sp            /* top of the trampoline page */
    /* The GDT pointer is built on the stack so this section holds no data. */
    pushl $gdt
    pushw $(3 * 8 - 1)
    mov %sp, %bx
    lgdtl (%bx)
    mov $0x20, %eax             /* CR4.PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80000011, %eax       /* CR0.PG | ET | PE */
    mov %eax, %cr0
    ljmpl $SEL_CODE64, $ap_long

    .text
    .code64
ap_long:
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %eax
    lock xaddl %eax, ap_next_slot(%rip)
    cmp $MAX_CPUS, %eax
    jae 2f                      /* no stack left for this one */
    mov %eax, %edi
    lea 1(%rax), %ecx
    imul $AP_STACK_SIZE, %ecx
    lea ap_stacks(%rcx), %rsp
    call ap_main
2:  cli
    hlt
    jmp 2b

    .bss
    .balign 16
ap_next_slot: .long 0
    .balign 16
ap_stacks: .skip MAX_CPUS * AP_STACK_SIZE
