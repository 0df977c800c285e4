/*
 * Fake bzImage probe: the protected-mode part of a test-built bzImage.
 *
 * The loader enters at offset 0x200 in 64-bit mode (Linux boot.rst,
 * "64-bit Boot Protocol"). The probe checks what that section promises
 * against values the test writes into the `expected` block, prints one
 * "FAIL: ..." line per mismatch on the 16550 at 0x3f8, then "PROBE OK" or
 * "PROBE FAILED n", and leaves through the isa-debug-exit port 0xf4:
 * value 0x10 when every check passed, 0x20 + failures otherwise.
 *
 * Position independent (RIP-relative only), so the test may load it anywhere.
 */

#define COM1            0x3f8
#define DEBUG_EXIT      0xf4
#define EXIT_PASS       0x10
#define EXIT_FAIL_BASE  0x20

#define MSR_EFER        0xc0000080
#define EFER_LMA        (1 << 10)
#define CR0_PE          (1 << 0)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)
#define RFLAGS_IF       (1 << 9)

/* zero-page.rst / boot.rst offsets into boot_params */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE  0x0c4
#define BP_EXT_CMD_LINE_PTR  0x0c8
#define BP_E820_ENTRIES      0x1e8
#define BP_HEADER            0x202
#define BP_VERSION           0x206
#define BP_TYPE_OF_LOADER    0x210
#define BP_LOADFLAGS         0x211
#define BP_RAMDISK_IMAGE     0x218
#define BP_RAMDISK_SIZE      0x21c
#define BP_CMD_LINE_PTR      0x228
#define BP_INIT_SIZE         0x260
#define BP_E820_TABLE        0x2d0

/* layout of the expected block (the test packs it with struct "<IIQQQQQ") */
#define EX_MAGIC        0
#define EX_E820_COUNT   4
#define EX_ZERO_PAGE    8
#define EX_LOAD_ADDR    16
#define EX_INIT_SIZE    24
#define EX_RAMDISK_SIZE 32
#define EX_VERSION      40
#define EX_E820         48      /* 16 entries x 20 bytes */
#define EX_CMDLINE      368     /* NUL-terminated, up to 512 bytes */

#define HDRS            0x53726448

/* or_fail jcc, msg: unless the flags satisfy jcc, report msg through fail */
.macro  or_fail jcc, msg
        \jcc    1f
        lea     \msg(%rip), %rdi
        call    fail
1:
.endm

        .code64
        .text
        .globl  _start
_start:
        /* offset 0: where a 32-bit loader would jump; we are never entered here */
1:      hlt
        jmp     1b

        .org    0x200
startup_64:
        cli
        mov     %rsi, %r15              /* r15 = boot_params as handed over */
        lea     stack_top(%rip), %rsp
        xor     %r14d, %r14d            /* r14 = failures */
        lea     expected(%rip), %r13    /* r13 = expected block */

        /* --- CPU state ------------------------------------------------- */
        pushfq
        pop     %rax
        test    $RFLAGS_IF, %eax
        or_fail jz, msg_if
        mov     $MSR_EFER, %ecx
        rdmsr
        test    $EFER_LMA, %eax
        or_fail jnz, msg_lma
        mov     %cr0, %rax
        mov     $(CR0_PE | CR0_PG), %ecx
        and     %rcx, %rax
        cmp     %rcx, %rax
        or_fail je, msg_cr0
        mov     %cr4, %rax
        test    $CR4_PAE, %eax
        or_fail jnz, msg_cr4
        mov     %cs, %ax
        cmp     $0x10, %ax
        or_fail je, msg_cs
        mov     %ds, %ax
        cmp     $0x18, %ax
        or_fail je, msg_ds
        mov     %es, %ax
        cmp     $0x18, %ax
        or_fail je, msg_es
        mov     %ss, %ax
        cmp     $0x18, %ax
        or_fail je, msg_ss
        /* entered at load address + 0x200 */
        lea     startup_64(%rip), %rax
        mov     EX_LOAD_ADDR(%r13), %rcx
        add     $0x200, %rcx
        cmp     %rcx, %rax
        or_fail je, msg_rip
        cmp     EX_ZERO_PAGE(%r13), %r15
        je      1f
        lea     msg_rsi(%rip), %rdi
        call    fail
        jmp     done                    /* nothing below can be read safely */
1:
        /* --- boot_params --------------------------------------------- */
        cmpl    $HDRS, BP_HEADER(%r15)
        or_fail je, msg_hdrs
        movzwl  BP_VERSION(%r15), %eax
        cmp     EX_VERSION(%r13), %eax
        or_fail je, msg_version
        movl    BP_INIT_SIZE(%r15), %eax
        cmp     EX_INIT_SIZE(%r13), %rax
        or_fail je, msg_init_size
        cmpb    $0xff, BP_TYPE_OF_LOADER(%r15)
        or_fail je, msg_loader
        testb   $1, BP_LOADFLAGS(%r15)  /* LOADED_HIGH */
        or_fail jnz, msg_loadflags
        /* command line: (ext_cmd_line_ptr << 32) | cmd_line_ptr */
        movl    BP_EXT_CMD_LINE_PTR(%r15), %eax
        shl     $32, %rax
        movl    BP_CMD_LINE_PTR(%r15), %ecx
        or      %rcx, %rax
        test    %rax, %rax
        jz      2f
        mov     %rax, %rsi
        lea     EX_CMDLINE(%r13), %rdi
3:      mov     (%rsi), %al
        cmp     (%rdi), %al
        jne     2f
        inc     %rsi
        inc     %rdi
        test    %al, %al
        jnz     3b
        jmp     1f
2:      lea     msg_cmdline(%rip), %rdi
        call    fail
1:
        /* e820: count and every byte of the entries */
        movzbl  BP_E820_ENTRIES(%r15), %eax
        cmp     EX_E820_COUNT(%r13), %eax
        je      3f
        lea     msg_e820_count(%rip), %rdi
        call    fail
        jmp     1f
3:      imul    $20, %eax, %ecx
        lea     BP_E820_TABLE(%r15), %rsi
        lea     EX_E820(%r13), %rdi
        repe cmpsb
        or_fail je, msg_e820
        /* ramdisk: size, placement outside the init_size window, content */
        movl    BP_RAMDISK_SIZE(%r15), %eax
        movl    BP_EXT_RAMDISK_SIZE(%r15), %ecx
        shl     $32, %rcx
        or      %rcx, %rax
        mov     %rax, %rbx              /* rbx = ramdisk size */
        cmp     EX_RAMDISK_SIZE(%r13), %rax
        je      1f
        lea     msg_rd_size(%rip), %rdi
        call    fail
        jmp     rd_done
1:
        test    %rbx, %rbx
        jz      rd_done                 /* no initrd expected, none given */
        movl    BP_RAMDISK_IMAGE(%r15), %eax
        movl    BP_EXT_RAMDISK_IMAGE(%r15), %ecx
        shl     $32, %rcx
        or      %rcx, %rax
        mov     %rax, %r12              /* r12 = ramdisk address */
        /* [r12, r12+rbx) must not meet [load, load + init_size) */
        mov     EX_LOAD_ADDR(%r13), %rcx
        lea     (%r12, %rbx), %rdx
        cmp     %rcx, %rdx
        jbe     2f                      /* ends before the window */
        add     EX_INIT_SIZE(%r13), %rcx
        cmp     %rcx, %r12
        jae     2f                      /* starts after it */
        lea     msg_rd_window(%rip), %rdi
        call    fail
        jmp     rd_done
2:
        /* content: byte i == (i * 7 + 3) & 0xff, written by the test */
        xor     %ecx, %ecx
3:      lea     (%rcx, %rcx, 8), %eax   /* 9i ... */
        sub     %ecx, %eax
        sub     %ecx, %eax              /* ... - 2i = 7i */
        add     $3, %eax
        cmp     (%r12, %rcx), %al
        jne     4f
        inc     %rcx
        cmp     %rbx, %rcx
        jb      3b
        jmp     rd_done
4:      lea     msg_rd_content(%rip), %rdi
        call    fail
rd_done:

done:
        test    %r14, %r14
        jnz     1f
        lea     msg_ok(%rip), %rdi
        call    puts
        mov     $EXIT_PASS, %eax
        jmp     2f
1:      lea     msg_failed(%rip), %rdi
        call    puts
        mov     %r14, %rax
        add     $'0', %al
        call    putc
        mov     $'\n', %al
        call    putc
        mov     %r14, %rax
        add     $EXIT_FAIL_BASE, %eax
2:      mov     $DEBUG_EXIT, %dx
        out     %al, %dx
3:      hlt                             /* the VMM ends the run at the out */
        jmp     3b

/* fail(rdi = message): print "FAIL: <message>\n", count it */
fail:
        push    %rdi
        lea     msg_fail(%rip), %rdi
        call    puts
        pop     %rdi
        call    puts
        mov     $'\n', %al
        call    putc
        inc     %r14
        ret

/* puts(rdi = NUL-terminated string) */
puts:
1:      mov     (%rdi), %al
        test    %al, %al
        jz      2f
        call    putc
        inc     %rdi
        jmp     1b
2:      ret

/* putc(al) on COM1's transmit register */
putc:
        push    %rdx
        mov     $COM1, %dx
        out     %al, %dx
        pop     %rdx
        ret

msg_fail:       .asciz "FAIL: "
msg_ok:         .asciz "PROBE OK\n"
msg_failed:     .asciz "PROBE FAILED "
msg_if:         .asciz "interrupts enabled (RFLAGS.IF)"
msg_lma:        .asciz "EFER.LMA clear: not in long mode"
msg_cr0:        .asciz "CR0.PE/PG not set"
msg_cr4:        .asciz "CR4.PAE not set"
msg_cs:         .asciz "CS is not __BOOT_CS (0x10)"
msg_ds:         .asciz "DS is not __BOOT_DS (0x18)"
msg_es:         .asciz "ES is not __BOOT_DS (0x18)"
msg_ss:         .asciz "SS is not __BOOT_DS (0x18)"
msg_rip:        .asciz "not entered at load address + 0x200"
msg_rsi:        .asciz "RSI is not the zero page"
msg_hdrs:       .asciz "setup header not copied (no HdrS at 0x202)"
msg_version:    .asciz "setup header version differs from the image's"
msg_init_size:  .asciz "setup header init_size differs from the image's"
msg_loader:     .asciz "type_of_loader is not 0xff"
msg_loadflags:  .asciz "loadflags lacks LOADED_HIGH"
msg_cmdline:    .asciz "command line at cmd_line_ptr differs"
msg_e820_count: .asciz "e820_entries differs"
msg_e820:       .asciz "e820 table differs"
msg_rd_size:    .asciz "ramdisk_size differs"
msg_rd_window:  .asciz "ramdisk inside the kernel's init_size window"
msg_rd_content: .asciz "ramdisk content differs at ramdisk_image"

        .org    0x1000
        .globl  expected
expected:
        .long   0x45585054              /* "TPXE": the test finds the block by it */
        .fill   0x400 - 4, 1, 0

        .org    0x2000
stack:
        .fill   0x1000, 1, 0
stack_top:
