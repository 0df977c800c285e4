"""Identity-mapped 4-level page tables for entering a kernel in long mode.

boot.rst ("64-bit Boot Protocol"): the 64-bit entry needs long mode with
paging on and "a range with setup_header.init_size from start address of
loaded kernel and zero page and command line buffer get ident mapping". We
map everything from 0 up to ``top`` with 2 MiB pages, which covers all of
those plus the initrd in one simple shape: one PML4, one PDPT and one page
directory per GiB.

Entry bits from the Intel SDM vol. 3A, 4.5 "4-Level Paging".
"""

from __future__ import annotations

import struct

from .._record import FrozenRecord
from ..errors import BootError

PAGE_SIZE = 4096
ENTRIES_PER_TABLE = 512
LARGE_PAGE_SIZE = 2 << 20  # a PDE with PS maps 2 MiB
GIB = 1 << 30  # one page directory maps 512 x 2 MiB

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PS = 1 << 7  # in a PDE: this entry maps a 2 MiB page, no page table below

# One PDPT covers 512 GiB; more than that is never needed for a boot.
MAX_TOP = ENTRIES_PER_TABLE * GIB


class PageTables(FrozenRecord):
    """Tables to place at ``addr`` (4 KiB aligned); CR3 = ``pml4``.

    The identity-mapped range is [0, top). A plain record, not a dataclass:
    ``dataclasses`` costs milliseconds of import on the boot path.
    """

    __slots__ = ("addr", "data", "top")

    def __init__(self, addr: int, data: bytes, top: int) -> None:
        self._init(addr, data, top)

    @property
    def pml4(self) -> int:
        return self.addr

    @property
    def size(self) -> int:
        return len(self.data)


def table_bytes_needed(top: int) -> int:
    """Bytes of tables that identity-map [0, top): PML4 + PDPT + one PD per GiB."""
    return (2 + _gib_count(top)) * PAGE_SIZE


def _gib_count(top: int) -> int:
    return max(1, -(-top // GIB))


def build_identity_tables(addr: int, top: int) -> PageTables:
    """Identity-map [0, top rounded up to 1 GiB) with 2 MiB pages at ``addr``.

    Layout: PML4 at addr, PDPT at addr + 4 KiB, page directories after it.
    """
    if addr % PAGE_SIZE:
        raise BootError(f"page tables must be 4 KiB aligned, not at {addr:#x}")
    if top > MAX_TOP:
        raise BootError(
            f"cannot identity-map {top:#x} bytes with one PDPT (max {MAX_TOP:#x}); use less memory"
        )
    ngib = _gib_count(top)
    pdpt_addr = addr + PAGE_SIZE
    pd_base = addr + 2 * PAGE_SIZE
    flags = PTE_PRESENT | PTE_WRITABLE

    pml4 = struct.pack("<Q", pdpt_addr | flags) + bytes(PAGE_SIZE - 8)
    pdpt = b"".join(struct.pack("<Q", (pd_base + i * PAGE_SIZE) | flags) for i in range(ngib))
    pdpt += bytes(PAGE_SIZE - len(pdpt))
    pds = bytearray(ngib * PAGE_SIZE)
    for i in range(ngib * ENTRIES_PER_TABLE):
        struct.pack_into("<Q", pds, i * 8, (i * LARGE_PAGE_SIZE) | flags | PTE_PS)
    return PageTables(addr=addr, data=pml4 + pdpt + bytes(pds), top=ngib * GIB)


def translate(tables: PageTables, linear: int) -> int | None:
    """Walk ``tables`` (as the CPU would) for ``linear``; None if not mapped.

    Used by tests to prove the identity mapping without a VM.
    """
    data = tables.data

    def entry(table_addr: int, index: int) -> int:
        off = table_addr - tables.addr + index * 8
        if off < 0 or off + 8 > len(data):
            raise LookupError(f"table at {table_addr:#x} lies outside the built tables")
        return struct.unpack_from("<Q", data, off)[0]

    addr_mask = ((1 << 52) - 1) & ~0xFFF
    pml4e = entry(tables.pml4, (linear >> 39) & 0x1FF)
    if not pml4e & PTE_PRESENT:
        return None
    pdpte = entry(pml4e & addr_mask, (linear >> 30) & 0x1FF)
    if not pdpte & PTE_PRESENT:
        return None
    pde = entry(pdpte & addr_mask, (linear >> 21) & 0x1FF)
    if not pde & PTE_PRESENT or not pde & PTE_PS:
        return None
    return (pde & addr_mask & ~(LARGE_PAGE_SIZE - 1)) | (linear & (LARGE_PAGE_SIZE - 1))
