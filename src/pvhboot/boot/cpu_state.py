"""The boot vCPU's registers for each entry protocol.

Each protocol has a fixed set of ``Segment`` values; the GDT written into
guest memory (``pvh_gdt()`` / ``long_mode_gdt()``) and the segment registers
in the ``CpuState`` are both built from them (see ``gdt.py``), so a guest that
reloads a selector sees the same segment the VMM loaded.
"""

from __future__ import annotations

from . import gdt
from .plan import CpuState, Segment

# Control register bits (Intel SDM Vol. 3A, 2.5 "Control Registers").
CR0_PE = 1 << 0  # protected mode
CR0_ET = 1 << 4  # extension type: hard-wired to 1 on every CPU since the 486
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5
# IA32_EFER (SDM 2.2.1 "Extended Feature Enable Register").
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (set by the CPU when PG turns on with LME)

# EFLAGS bit 1 is reserved and reads as 1; IF, TF and VM stay clear as
# pvh.pandoc and the Linux boot protocol both require.
EFLAGS_RESERVED = 0x2

FLAT_LIMIT = 0xFFFFFFFF  # 4 GiB, byte granular as the descriptor cache holds it

# --- PVH: Xen docs/misc/pvh.pandoc, "x86/HVM direct boot ABI" ---------------
# Flat 32-bit code (execute/read) and data (read/write), base 0, limit 4 GiB.
# The ABI leaves selector values unspecified; Linux's pvh_start_xen loads its
# own GDT first thing, so any layout consistent with our GDT works.
PVH_CS_SELECTOR = 0x08
PVH_DS_SELECTOR = 0x10
PVH_TSS_SELECTOR = 0x18
# pvh.pandoc: TR holds a 32-bit TSS in active (busy) state, base 0, limit 0x67
# (104 bytes, the size of a 32-bit TSS: SDM 7.2.1).
PVH_TSS_LIMIT = 0x67

PVH_CODE = Segment(
    selector=PVH_CS_SELECTOR, base=0, limit=FLAT_LIMIT, type=gdt.TYPE_CODE_XR_ACCESSED, db=1, g=1
)
PVH_DATA = Segment(
    selector=PVH_DS_SELECTOR, base=0, limit=FLAT_LIMIT, type=gdt.TYPE_DATA_RW_ACCESSED, db=1, g=1
)
PVH_TSS = Segment(
    selector=PVH_TSS_SELECTOR, base=0, limit=PVH_TSS_LIMIT, type=gdt.TYPE_TSS_BUSY, s=0, db=0, g=0
)

# --- Linux 64-bit boot protocol: Documentation/arch/x86/boot.rst -------------
# "64-bit Boot Protocol": a GDT with __BOOT_CS (0x10, flat execute/read) and
# __BOOT_DS (0x18, flat read/write); CS = __BOOT_CS; DS, ES, SS = __BOOT_DS.
LINUX_BOOT_CS = 0x10
LINUX_BOOT_DS = 0x18
LINUX_TSS_SELECTOR = 0x20  # 16-byte descriptor in long mode: slots 4 and 5
# A 64-bit TSS is 104 bytes too (SDM 8.7 Figure 8-11).
LONG_MODE_TSS_LIMIT = 0x67

LONG_MODE_CODE = Segment(
    selector=LINUX_BOOT_CS,
    base=0,
    limit=FLAT_LIMIT,
    type=gdt.TYPE_CODE_XR_ACCESSED,
    l=1,
    db=0,  # L=1 requires D=0 (SDM 5.2.1)
    g=1,
)
LONG_MODE_DATA = Segment(
    selector=LINUX_BOOT_DS, base=0, limit=FLAT_LIMIT, type=gdt.TYPE_DATA_RW_ACCESSED, db=1, g=1
)
LONG_MODE_TSS = Segment(
    selector=LINUX_TSS_SELECTOR,
    base=0,
    limit=LONG_MODE_TSS_LIMIT,
    type=gdt.TYPE_TSS_BUSY,
    s=0,
    db=0,
    g=0,
)

# The LDT is left as the CPU resets it (SDM 9.1.1 Table 9-1): selector 0,
# base 0, limit 0xffff, present. Neither protocol uses it.
RESET_LDT = Segment(selector=0, base=0, limit=0xFFFF, type=gdt.TYPE_LDT, s=0, db=0, g=0)


def pvh_gdt() -> bytes:
    """The GDT to place at the ``gdt_base`` given to ``pvh_cpu_state``."""
    return gdt.build_gdt([PVH_CODE, PVH_DATA, PVH_TSS])


def long_mode_gdt() -> bytes:
    """The GDT to place at the ``gdt_base`` given to ``long_mode_cpu_state``."""
    return gdt.build_gdt([LONG_MODE_CODE, LONG_MODE_DATA, LONG_MODE_TSS], wide_system=True)


def _flat_state(
    *, code: Segment, data: Segment, tss: Segment, gdt_base: int, gdt_limit: int, **regs
) -> CpuState:
    """What both protocols share: interrupts off, flat code/data, a busy TSS, the reset LDT."""
    return CpuState(
        rflags=EFLAGS_RESERVED,
        cs=code,
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=tss,
        ldt=RESET_LDT,
        gdt_base=gdt_base,
        gdt_limit=gdt_limit,
        **regs,
    )


def pvh_cpu_state(entry: int, start_info_addr: int, gdt_base: int, gdt_limit: int) -> CpuState:
    """Registers at the PVH entry point (pvh.pandoc, "Initial state").

    32-bit protected mode, paging off (CR0 = PE | ET), CR4 = 0, EFER = 0,
    flat CS/DS/ES/SS, busy 32-bit TSS in TR, EBX = start_info address.
    """
    return _flat_state(
        code=PVH_CODE,
        data=PVH_DATA,
        tss=PVH_TSS,
        gdt_base=gdt_base,
        gdt_limit=gdt_limit,
        rip=entry,
        rbx=start_info_addr,
        cr0=CR0_PE | CR0_ET,
        cr4=0,
        efer=0,
    )


def long_mode_cpu_state(
    entry: int, rsi: int, cr3: int, gdt_base: int, gdt_limit: int, *, rsp: int = 0
) -> CpuState:
    """Registers at a Linux 64-bit entry (boot.rst "64-bit Boot Protocol").

    Long mode with paging on (CR0 = PE | PG | ET, CR4 = PAE, EFER = LME | LMA),
    CR3 = identity-mapping page tables, RSI = boot_params address.
    """
    return _flat_state(
        code=LONG_MODE_CODE,
        data=LONG_MODE_DATA,
        tss=LONG_MODE_TSS,
        gdt_base=gdt_base,
        gdt_limit=gdt_limit,
        rip=entry,
        rsi=rsi,
        rsp=rsp,
        cr0=CR0_PE | CR0_ET | CR0_PG,
        cr3=cr3,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
