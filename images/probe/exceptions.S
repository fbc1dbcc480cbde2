/* Stubs for vectors 0-31, 16 bytes apart so idt.c can compute their
 * addresses. Each leaves {vector, error code, CPU frame} on the stack. */
#include "probe.h"

    .text
    .code64
    .balign 16
    .globl exception_stubs
exception_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    /* The CPU pushes an error code only for these vectors. */
    .if !((vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30))
    pushq $0
    .endif
    pushq $vec
    jmp exception_common
    .set vec, vec + 1
    .endr

exception_common:
    cld
    mov %rsp, %rdi
    call exception_handler
1:  jmp 1b
