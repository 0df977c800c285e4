"""Guest linear -> guest-physical translation by walking the guest's page tables.

Used where the VMM must touch guest memory the way the guest's CPU would:
reading the instruction behind an emulation failure, the IDT and TSS, and
writing an exception frame on the guest's stack. Covers every x86 paging
mode a Linux guest uses (Intel SDM vol. 3A, chapter 4 "Paging"):

- paging off (CR0.PG = 0): linear = physical;
- 32-bit paging (CR4.PAE = 0), with 4 MiB pages when CR4.PSE is set;
- PAE paging (CR4.PAE = 1, EFER.LMA = 0), with 2 MiB pages;
- 4-level and 5-level paging (EFER.LMA = 1, CR4.LA57), with 2 MiB and
  1 GiB pages.

Access rights are not checked: the VMM acts as the processor delivering an
event at CPL 0, and a present mapping is all that matters for that.
"""

from __future__ import annotations

from ..errors import GuestError

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10

PTE_PRESENT = 1 << 0
PTE_PS = 1 << 7  # page size: this entry maps a large page
# Bits 51:12 of a 64-bit entry hold the next table / page frame (SDM 4.5,
# MAXPHYADDR at most 52).
ADDR_MASK_64 = 0x000F_FFFF_FFFF_F000
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def _entry(mem, table: int, index: int, width: int, what: str, linear: int) -> tuple[int, int]:
    addr = table + index * width
    try:
        raw = mem.read(addr, width)
    except GuestError as exc:
        raise GuestError(
            f"page walk for linear address {linear:#x}: the {what} entry at {addr:#x} "
            f"is outside guest RAM ({exc})"
        ) from None
    value = int.from_bytes(raw, "little")
    if not value & PTE_PRESENT:
        raise GuestError(
            f"linear address {linear:#x} is not mapped: {what} entry {index} at {addr:#x} "
            f"is not present ({value:#x})"
        )
    return value, addr


def paging_mode(sregs) -> str:
    """'off', '32bit', 'pae', '4level' or '5level'."""
    if not sregs.cr0 & CR0_PG:
        return "off"
    if not sregs.cr4 & CR4_PAE:
        return "32bit"
    if not sregs.efer & EFER_LMA:
        return "pae"
    return "5level" if sregs.cr4 & CR4_LA57 else "4level"


def translate(mem, sregs, linear: int) -> int:
    """The guest-physical address the guest's MMU gives ``linear``; GuestError if unmapped."""
    mode = paging_mode(sregs)
    if mode == "off":
        return linear & 0xFFFF_FFFF
    if mode == "32bit":
        return _walk_32bit(mem, sregs, linear & 0xFFFF_FFFF)
    if mode == "pae":
        return _walk_pae(mem, sregs, linear & 0xFFFF_FFFF)
    return _walk_long(mem, sregs, linear & 0xFFFF_FFFF_FFFF_FFFF, 5 if mode == "5level" else 4)


def _walk_32bit(mem, sregs, linear: int) -> int:
    # SDM 4.3: CR3[31:12] -> page directory (1024 x 4 bytes) -> page table.
    pd = sregs.cr3 & 0xFFFF_F000
    pde, _ = _entry(mem, pd, linear >> 22, 4, "page-directory", linear)
    if pde & PTE_PS and sregs.cr4 & CR4_PSE:
        # 4 MiB page; PSE-36 puts physical bits 39:32 in PDE bits 20:13.
        high = ((pde >> 13) & 0xFF) << 32
        return high | (pde & 0xFFC0_0000) | (linear & 0x3F_FFFF)
    pt = pde & 0xFFFF_F000
    pte, _ = _entry(mem, pt, (linear >> 12) & 0x3FF, 4, "page-table", linear)
    return (pte & 0xFFFF_F000) | (linear & 0xFFF)


def _walk_pae(mem, sregs, linear: int) -> int:
    # SDM 4.4: CR3[31:5] -> 4 PDPTEs -> page directory -> page table, 8-byte entries.
    pdpt = sregs.cr3 & 0xFFFF_FFE0
    pdpte, _ = _entry(mem, pdpt, linear >> 30, 8, "PDPT", linear)
    pde, _ = _entry(mem, pdpte & ADDR_MASK_64, (linear >> 21) & 0x1FF, 8, "page-directory", linear)
    if pde & PTE_PS:
        return (pde & ADDR_MASK_64 & ~0x1F_FFFF) | (linear & 0x1F_FFFF)
    pte, _ = _entry(mem, pde & ADDR_MASK_64, (linear >> 12) & 0x1FF, 8, "page-table", linear)
    return (pte & ADDR_MASK_64) | (linear & 0xFFF)


_LONG_LEVELS = (
    # (name, shift, large page allowed)
    ("PML5", 48, False),
    ("PML4", 39, False),
    ("PDPT", 30, True),  # 1 GiB page
    ("page-directory", 21, True),  # 2 MiB page
    ("page-table", 12, False),
)


def _walk_long(mem, sregs, linear: int, levels: int) -> int:
    # SDM 4.5: CR3[51:12] -> PML5/PML4 -> PDPT -> PD -> PT, 9 index bits per level.
    table = sregs.cr3 & ADDR_MASK_64
    for name, shift, large_ok in _LONG_LEVELS[5 - levels :]:
        entry, _ = _entry(mem, table, (linear >> shift) & 0x1FF, 8, name, linear)
        frame = entry & ADDR_MASK_64
        if shift == PAGE_SHIFT:
            return frame | (linear & 0xFFF)
        if large_ok and entry & PTE_PS:
            offset_mask = (1 << shift) - 1
            return (frame & ~offset_mask) | (linear & offset_mask)
        table = frame
    raise AssertionError("unreachable: the page-table level always returns")


def _chunks(mem, sregs, linear: int, length: int):
    """(gpa, offset, n) pieces of [linear, linear+length), split at page boundaries."""
    done = 0
    while done < length:
        addr = linear + done
        n = min(length - done, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
        yield translate(mem, sregs, addr), done, n
        done += n


def read_linear(mem, sregs, linear: int, length: int) -> bytes:
    """Read guest memory at a linear address, page by page through the guest's tables."""
    out = bytearray(length)
    for gpa, off, n in _chunks(mem, sregs, linear, length):
        out[off : off + n] = mem.read(gpa, n)
    return bytes(out)


def write_linear(mem, sregs, linear: int, data: bytes) -> None:
    """Write guest memory at a linear address; every page is translated before any write."""
    pieces = list(_chunks(mem, sregs, linear, len(data)))
    for gpa, off, n in pieces:
        mem.write(gpa, data[off : off + n])
