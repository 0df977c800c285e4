/* PVH probe guest, entry: record the CPU state the VMM handed over before
 * any instruction can change it, then call the C checks.
 *
 * The PVH ABI (Xen docs/misc/pvh.pandoc) gives no stack, so the first thing
 * is an ESP load (MOV does not touch EFLAGS); PUSHF right after captures the
 * entry EFLAGS. Every store here uses an absolute address through DS, and
 * probe_main is reached by an absolute indirect call: both only work with
 * flat segments, and probe_main checks the results.
 */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 2f - 1f                   /* descsz: 4 or 8 */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
1:
    .long _start
#ifdef PVH_NOTE_DESC8
    .long 0                         /* high half: an ELF32 object has no 64-bit relocation */
#endif
2:
    .balign 4

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl %ebx, boot_ebx
    movl $probe_stack_top, %esp
    pushfl
    popl boot_eflags
    movl %cr0, %eax
    movl %eax, boot_cr0
    movl %cr4, %eax
    movl %eax, boot_cr4
    movw %cs, boot_sel + 0
    movw %ds, boot_sel + 2
    movw %es, boot_sel + 4
    movw %ss, boot_sel + 6
    movw %fs, boot_sel + 8
    movw %gs, boot_sel + 10
    strw boot_sel + 12
    sgdt boot_gdtr
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    movl %eax, boot_efer
    movl %edx, boot_efer + 4
    movl $probe_main, %eax
    call *%eax
    /* probe_main exits through port 0xf4; if that port does nothing, stop. */
3:  cli
    hlt
    jmp 3b

    .section .bss
    .balign 16
probe_stack:
    .skip 16384
probe_stack_top:
