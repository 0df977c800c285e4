"""Segment descriptors: one ``Segment`` value gives both the GDT bytes the
guest can read and the hidden segment-register state the VMM loads.

A VMM sets segment registers directly (the descriptor cache), but the guest
may reload a selector from the GDT at any time. If the two disagreed, the
first reload would change the guest's view of memory, so both are derived
from the same ``Segment`` here.

Descriptor format: Intel SDM Vol. 3A, 3.4.5 "Segment Descriptors" (8 bytes)
and 8.2.3 "TSS Descriptor in 64-bit Mode" (16 bytes).
"""

from __future__ import annotations

import struct

from ..errors import BootError
from .plan import Segment

# With G=1 the 20-bit limit counts 4 KiB units and the CPU fills the low 12
# bits of the byte limit with ones (SDM 3.4.5, "G flag").
_PAGE_GRANULARITY_SHIFT = 12
_MAX_RAW_LIMIT = 0xFFFFF

# Segment.type values (SDM 3.4.5.1 Table 3-1, 3.5 Table 3-2); the low bit is
# "accessed", set up front so the CPU never has to write it back into the GDT.
TYPE_DATA_RW_ACCESSED = 0x3
TYPE_CODE_XR_ACCESSED = 0xB
TYPE_TSS_BUSY = 0xB  # 32-bit TSS (busy) / 64-bit TSS (busy) in long mode
TYPE_LDT = 0x2


def encode_descriptor(seg: Segment) -> int:
    """The low 8 bytes of the GDT descriptor for ``seg``, as an integer."""
    limit = seg.limit
    if seg.g:
        if limit & 0xFFF != 0xFFF:
            raise BootError(
                f"segment {seg.selector:#x}: limit {limit:#x} is not a whole number of 4 KiB pages"
            )
        limit >>= _PAGE_GRANULARITY_SHIFT
    if limit > _MAX_RAW_LIMIT:
        raise BootError(f"segment {seg.selector:#x}: limit {seg.limit:#x} needs G=1")
    base = seg.base & 0xFFFFFFFF
    access = (seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7
    flags = (seg.avl & 1) | (seg.l & 1) << 1 | (seg.db & 1) << 2 | (seg.g & 1) << 3
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | (limit >> 16 & 0xF) << 48
        | flags << 52
        | (base >> 24 & 0xFF) << 56
    )


def decode_descriptor(selector: int, raw: int) -> Segment:
    """The segment-register state a CPU caches when it loads ``raw``."""
    limit = (raw & 0xFFFF) | (raw >> 48 & 0xF) << 16
    base = (raw >> 16 & 0xFFFFFF) | (raw >> 56 & 0xFF) << 24
    access = raw >> 40 & 0xFF
    flags = raw >> 52 & 0xF
    g = flags >> 3 & 1
    if g:
        limit = limit << _PAGE_GRANULARITY_SHIFT | 0xFFF
    return Segment(
        selector=selector,
        base=base,
        limit=limit,
        type=access & 0xF,
        s=access >> 4 & 1,
        dpl=access >> 5 & 3,
        present=access >> 7 & 1,
        avl=flags & 1,
        l=flags >> 1 & 1,
        db=flags >> 2 & 1,
        g=g,
    )


def build_gdt(segments: list[Segment], *, wide_system: bool = False) -> bytes:
    """A GDT holding each segment at the slot its selector names.

    Slot 0 is the null descriptor (SDM 3.4.2). With ``wide_system`` (long
    mode), system descriptors (s=0, e.g. the TSS) take 16 bytes: the upper
    half carries base bits 63:32 (SDM 8.2.3).
    """
    slots: dict[int, int] = {0: 0}
    for seg in segments:
        index = seg.selector >> 3
        width = 2 if wide_system and not seg.s else 1
        for i in range(index, index + width):
            if i in slots:
                raise BootError(f"GDT slot {i} is used twice (selector {seg.selector:#x})")
        slots[index] = encode_descriptor(seg)
        if width == 2:
            slots[index + 1] = seg.base >> 32 & 0xFFFFFFFF
    count = max(slots) + 1
    return b"".join(struct.pack("<Q", slots.get(i, 0)) for i in range(count))
