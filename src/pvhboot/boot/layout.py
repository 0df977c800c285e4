"""Guest-physical memory layout: fixed addresses, the memory map, and an
allocator that refuses overlaps.

Low memory (below 640 KiB) holds the small boot structures at fixed
addresses. The kernel goes where its ELF program headers say (``p_paddr``),
and the initrd at the top of RAM below 4 GiB, as far from the kernel as
possible so the kernel's own early allocations (page tables, brk, the
decompressor's scratch space for a bzImage) do not run into it.

    0x00000  page 0: real-mode IVT and BIOS data area; left alone, and
             address 0 means "absent" in hvm_start_info (start_info.h)
    0x01000  GDT
    0x02000  IDT (empty; the Linux 64-bit protocol wants interrupts off)
    0x03000  hvm_start_info, then the module list
    0x04000  memory map (hvm_memmap_table_entry[] for PVH)
    0x05000  boot stack, grows down from 0x7000
    0x07000  zero page (Linux boot_params, 4 KiB)
    0x09000  identity-map page tables for the Linux 64-bit entry
    0x20000  kernel command line
    0x9fc00  ... 640 KiB: end of low RAM
    0xa0000  ISA hole (VGA, option ROMs, BIOS): reserved
    1 MiB    RAM: the kernel (its p_paddr, usually 16 MiB for x86-64)
    ...      initrd at the top of RAM below min(RAM end, 3 GiB)
    3 GiB    32-bit MMIO gap (LAPIC, IOAPIC, PCI): not RAM
    4 GiB    the rest of RAM, when there is more than 3 GiB
"""

from __future__ import annotations

import os

from .._record import FrozenRecord
from ..errors import BootError
from .plan import E820_RAM, E820_RESERVED, MemoryRange

PAGE_SIZE = 4096
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
FOUR_GIB = 1 << 32

# --- The PC memory map (e820 conventions; Linux Documentation/arch/x86/zero-page.rst)
# RAM below the ISA hole: "conventional memory", 640 KiB.
LOW_RAM_END = 640 * KIB  # 0xA0000
# [640 KiB, 1 MiB) is the ISA hole: VGA memory, option ROMs and the BIOS.
ISA_HOLE_START = LOW_RAM_END
HIGH_RAM_START = 1 * MIB  # 0x100000, "extended memory"
# The 32-bit MMIO gap for LAPIC (0xfee00000), IOAPIC (0xfec00000) and PCI BARs.
# Must equal machine/memory.py DEFAULT_MMIO_GAP_START, which backs RAM the same way.
MMIO_GAP_START = 3 * GIB
MMIO_GAP_END = FOUR_GIB
# The largest guest RAM pvhboot accepts; must equal machine/memory.py
# MAX_MEMORY (boot/ may not import machine/; a test checks they agree).
# Advice to use more --memory is only given when this much would do.
MAX_GUEST_MEMORY = 1 << 40

# --- Fixed addresses of the boot structures (all below LOW_RAM_END) ----------
BOOT_GDT_ADDR = 0x1000
BOOT_GDT_MAX_SIZE = PAGE_SIZE
BOOT_IDT_ADDR = 0x2000
BOOT_IDT_MAX_SIZE = PAGE_SIZE
START_INFO_ADDR = 0x3000  # struct hvm_start_info (56 bytes), module list right after
START_INFO_MAX_SIZE = PAGE_SIZE
MEMMAP_ADDR = 0x4000
MEMMAP_MAX_SIZE = PAGE_SIZE
BOOT_STACK_BOTTOM = 0x5000
BOOT_STACK_TOP = 0x7000  # initial RSP for protocols that want one (grows down)
ZERO_PAGE_ADDR = 0x7000  # Linux boot_params: exactly one page
ZERO_PAGE_SIZE = PAGE_SIZE
PAGE_TABLES_ADDR = 0x9000  # PML4, PDPT, PDs for the Linux 64-bit entry
PAGE_TABLES_MAX_SIZE = 0x10000  # 16 pages: room to identity-map 4 GiB with 2 MiB pages
CMDLINE_ADDR = 0x20000
# Linux x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048 bytes
# including the NUL; the PVH entry copies at most that much. A bzImage may
# declare its own limit in setup_header.cmdline_size.
CMDLINE_MAX_SIZE = 2048

# The initrd goes below this (Linux reads hvm_start_info module addresses as
# 64-bit, but keeping boot data below 4 GiB is what Xen does: start_info.h).
INITRD_ADDR_MAX = FOUR_GIB
INITRD_ALIGN = PAGE_SIZE


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def fmt_size(size: int) -> str:
    """A size for people: '128 MiB', '4 KiB', '612 bytes'."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    if size >= MIB:
        return f"{size / MIB:.1f} MiB"
    if size >= KIB:
        return f"{size / KIB:.1f} KiB"
    return f"{size} bytes"


def fmt_range(addr: int, size: int) -> str:
    return f"[{addr:#x}, {addr + size:#x})"


def memory_map(memory_size: int) -> list[MemoryRange]:
    """The guest's physical memory map for ``memory_size`` bytes of RAM.

    RAM [0, 640 KiB), reserved [640 KiB, 1 MiB), RAM [1 MiB, min(size, 3 GiB)),
    and RAM above 4 GiB for whatever does not fit below the MMIO gap. The ISA
    hole counts towards ``memory_size`` (it is backed, as on real machines),
    the MMIO gap does not: the guest gets ``memory_size`` bytes of backing.
    """
    if memory_size < HIGH_RAM_START:
        raise BootError(
            f"{fmt_size(memory_size)} of guest RAM is too little: give at least 2 MiB (--memory)"
        )
    ranges = [
        MemoryRange(0, LOW_RAM_END, E820_RAM),
        MemoryRange(ISA_HOLE_START, HIGH_RAM_START - ISA_HOLE_START, E820_RESERVED),
    ]
    low_end = min(memory_size, MMIO_GAP_START)
    if low_end > HIGH_RAM_START:
        ranges.append(MemoryRange(HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM))
    if memory_size > MMIO_GAP_START:
        ranges.append(MemoryRange(MMIO_GAP_END, memory_size - MMIO_GAP_START, E820_RAM))
    return ranges


def memory_needed(end: int) -> int | None:
    """The smallest --memory (whole MiB) whose RAM reaches up to ``end``, or None.

    RAM below the gap ends at min(size, 3 GiB); above it, RAM runs from 4 GiB
    for (size - 3 GiB), so reaching ``end`` > 4 GiB takes end - 1 GiB. None
    when no size up to MAX_GUEST_MEMORY would do (``end`` falls inside the
    MMIO gap, or beyond what the largest guest has).
    """
    if end <= MMIO_GAP_START:
        need = end
    elif end <= MMIO_GAP_END:
        return None  # ends inside the gap: that part is never RAM
    else:
        need = end - (MMIO_GAP_END - MMIO_GAP_START)
    need = align_up(max(need, 2 * MIB), MIB)
    return need if need <= MAX_GUEST_MEMORY else None


def check_kernel_fits(start: int, end: int, memory_size: int) -> None:
    """BootError when the kernel's segments [start, end) run past guest RAM.

    Checked on the whole kernel, before any segment is placed, so the advice
    names a --memory that holds every segment, not just the first that fails.
    """
    ram_end = max(r.end for r in memory_map(memory_size) if r.type == E820_RAM)
    if end <= ram_end:
        return
    span = fmt_range(start, end - start)
    need = memory_needed(end)
    if need is None:
        raise BootError(
            f"kernel does not fit: its segments span {span}, which no guest's RAM reaches "
            "(it ends in the MMIO gap or beyond the largest guest): the image's headers are wrong"
        )
    raise BootError(
        f"kernel does not fit: its segments span {span} but guest RAM ends at {ram_end:#x} "
        f"({fmt_size(memory_size)}): give the guest at least {need // MIB}M "
        f"(--memory {need // MIB}M)"
    )


def check_region_possible(name: str, addr: int, size: int) -> None:
    """BootError when [addr, addr+size) can be RAM with no --memory at all.

    Such a region (the kernel's, from its own headers) overlaps the ISA hole
    or the 32-bit MMIO gap, or ends beyond the largest guest: more RAM cannot
    help, so the error says the region itself is impossible.
    """
    end = addr + size
    where = ""
    if addr < HIGH_RAM_START and end > ISA_HOLE_START:
        where = f"it overlaps the ISA hole {fmt_range(ISA_HOLE_START, HIGH_RAM_START - ISA_HOLE_START)}"
    elif addr < MMIO_GAP_END and end > MMIO_GAP_START:
        gap = fmt_range(MMIO_GAP_START, MMIO_GAP_END - MMIO_GAP_START)
        where = f"it overlaps the 32-bit MMIO gap {gap}, which is never RAM"
    elif memory_needed(end) is None:
        where = (
            f"it ends beyond the RAM of the largest guest ({fmt_size(MAX_GUEST_MEMORY)}, "
            f"RAM up to {MAX_GUEST_MEMORY + MMIO_GAP_END - MMIO_GAP_START:#x})"
        )
    if where:
        raise BootError(
            f"{name} at {fmt_range(addr, size)} ({fmt_size(size)}) can never be loaded: {where}; "
            "no --memory helps: the image's headers ask for an impossible address"
        )


class Region(FrozenRecord):
    """A named piece of guest-physical memory the boot plan uses (a plain
    record, not a dataclass: see _record.py)."""

    __slots__ = ("name", "addr", "size")

    def __init__(self, name: str, addr: int, size: int) -> None:
        self._init(name, addr, size)

    @property
    def end(self) -> int:
        return self.addr + self.size

    def __repr__(self) -> str:
        return f"Region({self.name!r}, {self.addr:#x}, {self.size:#x})"

    def describe(self) -> str:
        return f"{self.name} at {fmt_range(self.addr, self.size)} ({fmt_size(self.size)})"


class Layout:
    """Places named regions in guest RAM and refuses any that overlap or fall
    outside RAM, with an error that names both regions and their sizes."""

    def __init__(self, memory_size: int, ranges: list[MemoryRange] | None = None) -> None:
        self.memory_size = memory_size
        self.memory_map = ranges if ranges is not None else memory_map(memory_size)
        self.ram = sorted(
            (r for r in self.memory_map if r.type == E820_RAM), key=lambda r: r.addr
        )
        self.regions: list[Region] = []

    # --- queries ---------------------------------------------------------------

    def ram_range_of(self, addr: int, size: int) -> MemoryRange | None:
        """The RAM range wholly containing [addr, addr+size), if any."""
        for r in self.ram:
            if r.addr <= addr and addr + size <= r.end:
                return r
        return None

    def overlapping(self, addr: int, size: int) -> Region | None:
        for region in self.regions:
            if addr < region.end and region.addr < addr + size:
                return region
        return None

    def _ram_end_below(self, limit: int) -> int:
        return max((min(r.end, limit) for r in self.ram if r.addr < limit), default=0)

    def _where_not_ram(self, addr: int, size: int) -> str:
        """Why [addr, addr+size) is not in RAM, as a phrase."""
        end = addr + size
        ram_end = max(r.end for r in self.ram)
        if end > ram_end and not (addr < MMIO_GAP_END and end > MMIO_GAP_START):
            return f"guest RAM ends at {ram_end:#x} ({fmt_size(self.memory_size)})"
        for r in self.memory_map:
            if r.type != E820_RAM and addr < r.end and r.addr < end:
                return f"it overlaps the reserved range {fmt_range(r.addr, r.size)} (ISA hole)"
        if addr < MMIO_GAP_END and end > MMIO_GAP_START:
            return (
                f"it overlaps the 32-bit MMIO gap {fmt_range(MMIO_GAP_START, MMIO_GAP_END - MMIO_GAP_START)}"
            )
        return "it is not inside one RAM range"

    # --- placing ---------------------------------------------------------------

    def reserve(self, name: str, addr: int, size: int) -> Region:
        """Claim [addr, addr+size) for ``name``; BootError if outside RAM or taken."""
        if size <= 0:
            raise BootError(f"{name} has no size ({size} bytes): nothing to place")
        if self.ram_range_of(addr, size) is None:
            hint = ""
            ram_end = max(r.end for r in self.ram)
            need = memory_needed(addr + size)
            possible = True
            try:
                check_region_possible(name, addr, size)
            except BootError:
                possible = False
            if possible and need is not None and addr + size > ram_end and need > self.memory_size:
                hint = f": give the guest at least {need // MIB}M (--memory {need // MIB}M)"
            else:
                hint = ": it cannot be loaded there, whatever --memory is"
            raise BootError(
                f"{name} at {fmt_range(addr, size)} ({fmt_size(size)}) does not fit in guest RAM: "
                f"{self._where_not_ram(addr, size)}{hint}"
            )
        other = self.overlapping(addr, size)
        if other is not None:
            raise BootError(
                f"{name} at {fmt_range(addr, size)} ({fmt_size(size)}) overlaps {other.describe()}"
            )
        region = Region(name, addr, size)
        self.regions.append(region)
        return region

    def place_top(
        self, name: str, size: int, *, below: int = INITRD_ADDR_MAX, align: int = PAGE_SIZE
    ) -> Region:
        """Claim ``size`` bytes as high as possible in RAM below ``below``,
        aligned, overlapping nothing already placed (used for the initrd)."""
        if size <= 0:
            raise BootError(f"{name} is empty: nothing to place")
        limit = min(below, MMIO_GAP_START)
        for r in sorted(self.ram, key=lambda r: r.addr, reverse=True):
            top = min(r.end, limit)
            while top - r.addr >= size:
                addr = align_down(top - size, align)
                if addr < r.addr:
                    break
                other = self.overlapping(addr, size)
                if other is None:
                    region = Region(name, addr, size)
                    self.regions.append(region)
                    return region
                top = other.addr  # try just below whatever is in the way
        below_limit = [reg for reg in self.regions if HIGH_RAM_START <= reg.addr < limit]
        last = max(below_limit, key=lambda reg: reg.end, default=None)
        highest = align_up(last.end if last else HIGH_RAM_START, align)
        after = f"{last.name} (ends {last.end:#x})" if last else f"{HIGH_RAM_START:#x}"
        need = align_up(highest + size, MIB)
        available = max(0, self._ram_end_below(limit) - highest)
        if need <= limit:
            more = fmt_size(align_up(max(need - self.memory_size, MIB), MIB))
            suggestion = f"give the guest at least {need // MIB}M (--memory {need // MIB}M, {more} more)"
        else:
            suggestion = f"use a smaller {name}: it must fit below {fmt_size(limit)}"
        raise BootError(
            f"{name} ({fmt_size(size)}) does not fit in guest RAM ({fmt_size(self.memory_size)}): "
            f"{fmt_size(available)} free above {after}; {suggestion}"
        )

    def describe(self) -> list[str]:
        return [r.describe() for r in sorted(self.regions, key=lambda r: r.addr)]


def file_size(path: str, what: str) -> int:
    """Size of a file the plan maps (kernel, initrd); BootError (one line) if unreadable."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise BootError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def check_cmdline(cmdline: str, *, limit: int = CMDLINE_MAX_SIZE) -> bytes:
    """The command line as NUL-terminated bytes; BootError if it cannot be passed.

    ``limit`` counts the terminating NUL (Linux COMMAND_LINE_SIZE does).
    """
    try:
        data = cmdline.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BootError(f"the command line cannot be encoded: {exc.reason}; use plain text") from None
    if b"\0" in data:
        raise BootError("the command line contains a NUL character: remove it")
    if len(data) + 1 > limit:
        raise BootError(
            f"command line too long: {len(data)} bytes, the limit is {limit - 1} "
            f"(kernel COMMAND_LINE_SIZE {limit} including the NUL): shorten it"
        )
    return data + b"\0"
