/* PVH probe guest: checks the entry state and struct hvm_start_info against
 * values the test compiled in (expect.h), reports every failed check on the
 * serial port, and exits through the debug-exit port 0xf4.
 *
 * It reads the ABI the way a guest does (start_info.h field offsets written
 * out here, not taken from the VMM's code), so a field the VMM fills wrongly
 * shows up as a failed check.
 *
 * Exit codes (QEMU isa-debug-exit: status = code << 1 | 1):
 *   PROBE_PASS            every check passed
 *   PROBE_FAIL + n        n checks failed (n capped at 15)
 */

#include "expect.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PROBE_PASS 0x31
#define PROBE_FAIL 0x40

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20
#define DEBUG_EXIT_PORT 0xf4

/* Written by pvh_probe_entry.S before anything else runs. */
u32 boot_ebx, boot_eflags, boot_cr0, boot_cr4;
u16 boot_sel[7]; /* cs ds es ss fs gs tr */
u8 boot_gdtr[6];
u64 boot_efer;

/* Must still read as zero: it lies in the .bss part of the PT_LOAD segment
 * (p_memsz > p_filesz), which the loader has to zero-fill. */
volatile u8 bss_zero_check[65536];
/* Read through each segment register at its absolute address: a non-zero
 * segment base would read something else. */
static volatile const u32 flat_marker = 0x5a17c0de;

extern u8 _image_start[], _image_end[];

static int failures, checks;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1_LSR) & LSR_THRE); i++)
        ;
    outb(COM1, (u8)c);
}
static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}
static void puthex(u64 v)
{
    puts("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        int d = (int)(v >> shift) & 0xf;
        if (d || started || shift == 0) {
            putc("0123456789abcdef"[d]);
            started = 1;
        }
    }
}

static void fail_begin(const char *what)
{
    failures++;
    puts("PROBE FAIL ");
    puts(what);
}

static void check_eq(const char *what, u64 got, u64 want)
{
    checks++;
    if (got == want)
        return;
    fail_begin(what);
    puts(": got ");
    puthex(got);
    puts(" expected ");
    puthex(want);
    puts("\n");
}

static void check_eq_i(const char *what, u32 index, u64 got, u64 want)
{
    checks++;
    if (got == want)
        return;
    fail_begin(what);
    puts(" of entry ");
    puthex(index);
    puts(": got ");
    puthex(got);
    puts(" expected ");
    puthex(want);
    puts("\n");
}

static void check_true(const char *what, int ok)
{
    checks++;
    if (ok)
        return;
    fail_begin(what);
    puts("\n");
}

/* What LAR/LSL would return, decoded from the GDT in memory: this host's
 * KVM backend cannot emulate LAR/LSL, and reading the table is what they do.
 * ok = the selector is non-null and inside the GDT limit. */
static u64 gdt_entry(u16 sel);
static u16 gdt_limit(void) { return *(u16 *)&boot_gdtr[0]; }
static u32 lar(u16 sel, int *ok)
{
    *ok = (sel & ~7u) != 0 && (u32)(sel | 7) <= gdt_limit();
    return *ok ? (u32)(gdt_entry(sel) >> 32) & 0x00f0ff00u : 0;
}
static u32 lsl(u16 sel, int *ok)
{
    u64 d;
    u32 limit;
    *ok = (sel & ~7u) != 0 && (u32)(sel | 7) <= gdt_limit();
    if (!*ok)
        return 0;
    d = gdt_entry(sel);
    limit = (u32)(d & 0xffff) | (u32)((d >> 48) & 0xf) << 16;
    if ((d >> 55) & 1)
        limit = limit << 12 | 0xfff;
    return limit;
}

/* LAR result: bits 8-15 access byte, 20-23 AVL/L/DB/G (SDM Vol. 2A, LAR). */
#define AR_TYPE(ar) (((ar) >> 8) & 0xf)
#define AR_S(ar) (((ar) >> 12) & 1)
#define AR_DPL(ar) (((ar) >> 13) & 3)
#define AR_P(ar) (((ar) >> 15) & 1)
#define AR_L(ar) (((ar) >> 21) & 1)
#define AR_DB(ar) (((ar) >> 22) & 1)
#define AR_G(ar) (((ar) >> 23) & 1)

static u64 gdt_entry(u16 sel)
{
    u32 base = *(u32 *)&boot_gdtr[2];
    return *(volatile u64 *)(base + (sel & ~7u));
}
static u32 desc_base(u64 d) { return (u32)(((d >> 16) & 0xffffff) | ((d >> 56) & 0xff) << 24); }

static void check_segment(const char *name, u16 sel, int code)
{
    int ok;
    u32 ar = lar(sel, &ok);
    check_true(name, ok && sel != 0);
    check_eq(code ? "CS RPL (CPL 0)" : "data selector RPL", sel & 3, 0);
    if (!ok)
        return;
    if (code) {
        /* execute/read code; bit 0 (accessed) may be either */
        check_eq("CS type (execute/read)", AR_TYPE(ar) & 0xe, 0xa);
        check_eq("CS L (must be 32-bit, not 64-bit)", AR_L(ar), 0);
    } else {
        check_eq("data segment type (read/write)", AR_TYPE(ar) & 0xe, 0x2);
    }
    check_eq("segment S (code/data)", AR_S(ar), 1);
    check_eq("segment DPL", AR_DPL(ar), 0);
    check_eq("segment present", AR_P(ar), 1);
    check_eq("segment D/B (32-bit)", AR_DB(ar), 1);
    check_eq("segment G", AR_G(ar), 1);
    check_eq("segment limit (4 GiB)", lsl(sel, &ok), 0xffffffffu);
    check_eq("segment base in the GDT", desc_base(gdt_entry(sel)), 0);
}

static u32 read_es(u32 addr)
{
    u32 v;
    __asm__ volatile("movl %%es:(%1), %0" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
static u32 read_ss(u32 addr)
{
    u32 v;
    __asm__ volatile("movl %%ss:(%1), %0" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
static u32 read_cs(u32 addr)
{
    u32 v;
    __asm__ volatile("movl %%cs:(%1), %0" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

static int in_ram(const volatile u8 *memmap, u32 entries, u64 addr, u64 size)
{
    for (u32 i = 0; i < entries; i++) {
        const volatile u8 *e = memmap + 24 * i;
        u64 a = *(const volatile u64 *)(e + 0), s = *(const volatile u64 *)(e + 8);
        if (*(const volatile u32 *)(e + 16) == 1 && a <= addr && addr + size <= a + s)
            return 1;
    }
    return 0;
}

static int overlaps_image(u64 addr, u64 size)
{
    return addr < (u32)_image_end && (u32)_image_start < addr + size;
}

static u32 strlen_(const volatile char *s)
{
    u32 n = 0;
    while (s[n] && n < 65536)
        n++;
    return n;
}

static void check_cpu(void)
{
    /* pvh.pandoc: CR0.PE set, every other writable bit clear (ET is fixed to 1). */
    check_eq("CR0 (PE only, paging off)", boot_cr0 & ~0x10u, 0x1);
    check_eq("CR4", boot_cr4, 0);
    check_eq("EFER (no long mode)", boot_efer, 0);
    check_eq("EFLAGS", boot_eflags, 0x2);
    check_segment("CS valid", boot_sel[0], 1);
    check_segment("DS valid", boot_sel[1], 0);
    check_segment("ES valid", boot_sel[2], 0);
    check_segment("SS valid", boot_sel[3], 0);
    /* Flat bases in the registers themselves, not only in the GDT. */
    u32 marker = (u32)&flat_marker;
    check_eq("DS base 0 (absolute read)", flat_marker, 0x5a17c0de);
    check_eq("ES base 0 (absolute read)", read_es(marker), 0x5a17c0de);
    check_eq("SS base 0 (absolute read)", read_ss(marker), 0x5a17c0de);
    check_eq("CS base 0 (absolute read)", read_cs(marker), 0x5a17c0de);

    /* TR: a 32-bit TSS in busy state, base 0, limit 0x67. */
    int ok;
    u16 tr = boot_sel[6];
    u32 ar = lar(tr, &ok);
    check_true("TR selector valid", ok && tr != 0);
    if (ok) {
        check_eq("TR type (32-bit TSS, busy)", AR_TYPE(ar), 0xb);
        check_eq("TR S (system)", AR_S(ar), 0);
        check_eq("TR limit", lsl(tr, &ok), 0x67);
        check_eq("TR base", desc_base(gdt_entry(tr)), 0);
    }
}

static void check_start_info(void)
{
    const volatile u8 *si = (const volatile u8 *)boot_ebx;
#define SI32(off) (*(const volatile u32 *)(si + (off)))
#define SI64(off) (*(const volatile u64 *)(si + (off)))
    check_true("EBX points at start_info (non-zero)", boot_ebx != 0);
    if (!boot_ebx)
        return;
    /* struct hvm_start_info, start_info.h */
    check_eq("start_info.magic", SI32(0), 0x336ec578);
    check_eq("start_info.version", SI32(4), 1);
    check_eq("start_info.flags", SI32(8), 0);
    check_eq("start_info.nr_modules", SI32(12), EXP_NR_MODULES);
    check_eq("start_info.rsdp_paddr", SI64(32), 0);
    check_eq("start_info.reserved", SI32(52), 0);
    check_eq("start_info.memmap_entries", SI32(48), EXP_MEMMAP_N);

    u64 memmap_paddr = SI64(40);
    u32 n = SI32(48);
    check_true("start_info.memmap_paddr non-zero", memmap_paddr != 0);
    const volatile u8 *mm = (const volatile u8 *)(u32)memmap_paddr;
    if (memmap_paddr && n == EXP_MEMMAP_N) {
        for (u32 i = 0; i < n; i++) {
            const volatile u8 *e = mm + 24 * i;
            check_eq_i("memmap addr", i, *(const volatile u64 *)(e + 0), exp_memmap[i].addr);
            check_eq_i("memmap size", i, *(const volatile u64 *)(e + 8), exp_memmap[i].size);
            check_eq_i("memmap type", i, *(const volatile u32 *)(e + 16), exp_memmap[i].type);
            check_eq_i("memmap reserved", i, *(const volatile u32 *)(e + 20), 0);
        }
    }
    int have_map = memmap_paddr && n == EXP_MEMMAP_N;
    if (have_map) {
        check_true("start_info lies in RAM", in_ram(mm, n, boot_ebx, 56));
        check_true("memmap lies in RAM", in_ram(mm, n, memmap_paddr, 24ull * n));
    }
    check_true("start_info outside the kernel image", !overlaps_image(boot_ebx, 56));
    check_true("memmap outside the kernel image", !overlaps_image(memmap_paddr, 24ull * n));

    /* Command line */
    u64 cmdline_paddr = SI64(24);
    check_true("start_info.cmdline_paddr non-zero", cmdline_paddr != 0);
    if (cmdline_paddr) {
        const volatile char *got = (const volatile char *)(u32)cmdline_paddr;
        const char *want = EXP_CMDLINE;
        u32 len = strlen_(got);
        int same = len == sizeof(EXP_CMDLINE) - 1;
        for (u32 i = 0; same && i < len; i++)
            same = got[i] == want[i];
        checks++;
        if (!same) {
            fail_begin("cmdline: got \"");
            for (u32 i = 0; i < len && i < 200; i++)
                putc(got[i]);
            puts("\" expected \"");
            puts(want);
            puts("\"\n");
        }
        check_true("cmdline outside the kernel image", !overlaps_image(cmdline_paddr, len + 1));
        if (have_map)
            check_true("cmdline lies in RAM", in_ram(mm, n, cmdline_paddr, len + 1));
    }

    /* Modules: the initrd as module 0 */
    u64 modlist = SI64(16);
    if (EXP_NR_MODULES == 0) {
        check_eq("start_info.modlist_paddr (no modules)", modlist, 0);
        return;
    }
    check_true("start_info.modlist_paddr non-zero", modlist != 0);
    if (!modlist || SI32(12) < 1)
        return;
    const volatile u8 *m = (const volatile u8 *)(u32)modlist;
    u64 paddr = *(const volatile u64 *)(m + 0), size = *(const volatile u64 *)(m + 8);
    check_eq("module[0].paddr", paddr, EXP_MOD0_PADDR);
    check_eq("module[0].size", size, EXP_MOD0_SIZE);
    check_eq("module[0].cmdline_paddr", *(const volatile u64 *)(m + 16), 0);
    check_eq("module[0].reserved", *(const volatile u64 *)(m + 24), 0);
    check_true("module list outside the kernel image", !overlaps_image(modlist, 32));
    check_true("module 0 outside the kernel image", !overlaps_image(paddr, size));
    if (have_map) {
        check_true("module list lies in RAM", in_ram(mm, n, modlist, 32));
        check_true("module 0 lies in RAM", in_ram(mm, n, paddr, size));
    }
    if (paddr == EXP_MOD0_PADDR && size == EXP_MOD0_SIZE) {
        const volatile u8 *data = (const volatile u8 *)(u32)paddr;
        int same = 1;
        for (u32 i = 0; i < sizeof(exp_mod0_head); i++)
            same &= data[i] == exp_mod0_head[i];
        check_true("module 0 first bytes match the initrd file", same);
        same = 1;
        for (u32 i = 0; i < sizeof(exp_mod0_tail); i++)
            same &= data[size - sizeof(exp_mod0_tail) + i] == exp_mod0_tail[i];
        check_true("module 0 last bytes match the initrd file", same);
        /* Through ES and SS too: their limits must reach the top of RAM. */
        check_eq("ES reads module 0", read_es((u32)paddr), *(const volatile u32 *)data);
        check_eq("SS reads module 0", read_ss((u32)paddr), *(const volatile u32 *)data);
    }
}

void probe_main(void)
{
    int nonzero = 0;
    for (u32 i = 0; i < sizeof(bss_zero_check); i++)
        nonzero |= bss_zero_check[i];
    check_true(".bss (p_memsz > p_filesz) is zero-filled", !nonzero);
    check_cpu();
    check_start_info();
    if (failures) {
        puts("PROBE FAILED ");
        puthex((u64)failures);
        puts(" of ");
        puthex((u64)checks);
        puts(" checks\n");
        outb(DEBUG_EXIT_PORT, (u8)(PROBE_FAIL + (failures > 15 ? 15 : failures)));
    } else {
        puts("PROBE OK ");
        puthex((u64)checks);
        puts(" checks\n");
        outb(DEBUG_EXIT_PORT, PROBE_PASS);
    }
}
