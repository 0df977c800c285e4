/*
 * The test initramfs's /init: a static, freestanding x86-64 program with no
 * libc, so the initramfs is one small file and the build needs only gcc.
 *
 * Build: gcc -static -nostdlib -ffreestanding -fno-stack-protector -O2 -o init init.c
 *
 * It prints a greeting, its arguments and the pvhboot_* variables of its
 * environment (the kernel hands init the unknown "name=value" words of the
 * command line as environment, and words after "--" as arguments), so a test
 * can check that this very run's command line reached user space. Then it
 * restarts the machine.
 *
 * Why restart and not power off: without ACPI (the test kernel has none)
 * the kernel turns LINUX_REBOOT_CMD_POWER_OFF into a halt (kernel/reboot.c:
 * no power-off handler registered), which would leave the vCPU halted until
 * the VMM's timeout. A restart goes through the i8042 reset line (0xFE to
 * port 0x64), which the VMM turns into a clean exit with status 0.
 *
 * On a KVM host without VMX/SVM (the PVM backend) the first system call here
 * faults (KVM-HOST-NOTES gap 3): the kernel kills init and panics, and with
 * panic=-1 on the command line it restarts at once, through the same reset.
 */

/* x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl). */
#define SYS_write 1
#define SYS_open 2
#define SYS_exit 60
#define SYS_reboot 169

#define O_WRONLY 1
#define O_NOCTTY 0400

/* include/uapi/linux/reboot.h: the magic numbers reboot(2) insists on. */
#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_RESTART 0x01234567L
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcL

typedef unsigned long size_t;

static long sys3(long nr, long a, long b, long c)
{
    long ret;
    /* The syscall instruction clobbers rcx (return rip) and r11 (rflags). */
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}

static long sys4(long nr, long a, long b, long c, long d)
{
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}

static size_t length(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static int out_fd = 1;

static void put(const char *s)
{
    sys3(SYS_write, out_fd, (long)s, (long)length(s));
}

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* Called from _start with the initial stack: argc, argv[], NULL, envp[], NULL. */
__attribute__((noreturn, used)) void pvhboot_main(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    char **envp = argv + argc + 1;

    /* The kernel opens /dev/console as fds 0-2 when the initramfs has it;
     * if it could not, open it ourselves. */
    if (sys3(SYS_write, out_fd, (long)"", 0) < 0)
        out_fd = (int)sys3(SYS_open, (long)"/dev/console", O_WRONLY | O_NOCTTY, 0);

    put("pvhboot-init: hello from /init\n");
    for (long i = 0; i < argc; i++) {
        put("pvhboot-init: argv: ");
        put(argv[i]);
        put("\n");
    }
    for (char **e = envp; *e; e++) {
        if (starts_with(*e, "pvhboot_")) {
            put("pvhboot-init: env: ");
            put(*e);
            put("\n");
        }
    }
    put("pvhboot-init: restarting\n");
    sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0);
    /* Not reached unless reboot(2) failed (e.g. no CAP_SYS_BOOT); exiting
     * makes the kernel panic, which panic=-1 turns into a restart too. */
    put("pvhboot-init: reboot failed\n");
    for (;;)
        sys3(SYS_exit, 1, 0, 0);
}

/* The ELF entry: no return address on the stack, rsp points at argc. Align
 * the stack to 16 bytes as the C ABI wants at a call. */
__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "    xor %ebp, %ebp\n"
        "    mov %rsp, %rdi\n"
        "    and $-16, %rsp\n"
        "    call pvhboot_main\n"
        "    hlt\n");
