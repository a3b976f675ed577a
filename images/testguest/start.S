/*
 * Test guest entry points, in 32-bit protected mode with paging off (the PVH boot state).
 *
 * - pvh_start: the PVH entry (the ELF note below points here); %ebx = hvm_start_info.
 * - ap_trampoline: 16-bit code copied to TRAMPOLINE_ADDR; APs start here after INIT/SIPI, switch to
 *   protected mode and call ap_main.
 * - isr_*: interrupt entry stubs.
 */
#define TRAMPOLINE_ADDR 0x8000

    .section .note.pvh, "a", @note
    .p2align 2
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start             /* 32-bit entry, zero-extended to 8 bytes so that */
    .long 0                     /* 4- and 8-byte readers agree */

    .text
    .code32
    .globl pvh_start
pvh_start:
    cli
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $bsp_stack_top, %esp
    push %ebx
    call bsp_main
2:  cli
    hlt
    jmp 2b

/* Application processors: real mode at TRAMPOLINE_ADDR, CS = TRAMPOLINE_ADDR >> 4. */
    .globl ap_trampoline, ap_trampoline_end
    .code16
ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TRAMPOLINE_ADDR + (ap_gdt_ptr - ap_trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_entry32
    .p2align 2
ap_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .code32
ap_entry32:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    /* Stack by LAPIC id: ap_stacks + (id + 1) * 4096. */
    mov 0xfee00020, %eax
    shr $24, %eax
    mov %eax, %ebx
    inc %eax
    shl $12, %eax
    add $ap_stacks, %eax
    mov %eax, %esp
    push %ebx
    call ap_main
3:  cli
    hlt
    jmp 3b

/*
 * Interrupt stubs: save the caller-saved registers, call C, return. `iret` cannot be emulated in
 * ring 0 on nested-PVM hosts ("KVM internal error"), and every interrupt here arrives from ring 0
 * at ring 0, so the return is done by hand: rearrange [eip, cs, eflags] into [eflags, eip], then
 * popf; ret.
 */
    .macro ISR_RETURN
    push %eax                   /* eax, eip, cs, eflags */
    mov 4(%esp), %eax
    xchg %eax, 12(%esp)         /* eax, eip, cs, eip; eax = eflags */
    mov %eax, 8(%esp)           /* eax, eip, eflags, eip */
    pop %eax
    add $4, %esp                /* eflags, eip */
    popf
    ret
    .endm

    .globl isr_timer, isr_ged, isr_spurious, isr_unexpected
isr_timer:
    pusha
    cld
    call on_timer
    popa
    ISR_RETURN
isr_ged:
    pusha
    cld
    call on_ged
    popa
    ISR_RETURN
isr_spurious:
    ISR_RETURN
/* Exceptions: one stub per vector pushes its number; the C side reports it and ends the VM. */
    .macro EXC n
exc_\n:
    push $\n
    jmp isr_unexpected
    .endm
    .altmacro
    .set i, 0
    .rept 32
    EXC %i
    .set i, i + 1
    .endr
isr_unexpected:
    cld
    call on_unexpected
4:  cli
    hlt
    jmp 4b

    .section .rodata
    .globl exception_stubs
    .macro EXCADDR n
    .long exc_\n
    .endm
exception_stubs:
    .set i, 0
    .rept 32
    EXCADDR %i
    .set i, i + 1
    .endr

    .data
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff    /* 0x08: code, 32-bit, flat */
    .quad 0x00cf93000000ffff    /* 0x10: data, flat */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .bss
    .p2align 12
bsp_stack:
    .skip 16384
bsp_stack_top:
    .globl ap_stacks
ap_stacks:
    .skip 4096 * 65
    .section .note.GNU-stack,"",@progbits
