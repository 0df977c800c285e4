"""ELF notes: walking a note area and naming the types a kernel carries.

A note is ``namesz, descsz, type`` (three little-endian u32), then the
owner name and the descriptor, each padded to 4 bytes. Linux and Xen pad to
4 bytes even in ELF64 files, whatever ``p_align`` says, so the walk always
uses 4 (issue 2; Xen's libelf does the same).

Type numbers mean nothing without the owner: Xen's 1 is ENTRY, GNU's 1 is
ABI_TAG. Every lookup here is by the raw ``(owner, type)`` pair.
"""

from __future__ import annotations

import ctypes

from .._record import FrozenRecord
from ..errors import ImageError

# Xen public/elfnote.h: XEN_ELFNOTE_* (owner "Xen").
XEN_ELFNOTE_ENTRY = 1
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAMES = {
    0: "XEN_ELFNOTE_INFO",
    1: "XEN_ELFNOTE_ENTRY",
    2: "XEN_ELFNOTE_HYPERCALL_PAGE",
    3: "XEN_ELFNOTE_VIRT_BASE",
    4: "XEN_ELFNOTE_PADDR_OFFSET",
    5: "XEN_ELFNOTE_XEN_VERSION",
    6: "XEN_ELFNOTE_GUEST_OS",
    7: "XEN_ELFNOTE_GUEST_VERSION",
    8: "XEN_ELFNOTE_LOADER",
    9: "XEN_ELFNOTE_PAE_MODE",
    10: "XEN_ELFNOTE_FEATURES",
    11: "XEN_ELFNOTE_BSD_SYMTAB",
    12: "XEN_ELFNOTE_HV_START_LOW",
    13: "XEN_ELFNOTE_L1_MFN_VALID",
    14: "XEN_ELFNOTE_SUSPEND_CANCEL",
    15: "XEN_ELFNOTE_INIT_P2M",
    16: "XEN_ELFNOTE_MOD_START_PFN",
    17: "XEN_ELFNOTE_SUPPORTED_FEATURES",
    18: "XEN_ELFNOTE_PHYS32_ENTRY",
    19: "XEN_ELFNOTE_PHYS32_RELOC",
}
# Linux include/uapi/linux/elfnote.h and include/linux/build-salt.h (owner "Linux").
LINUX_NOTE_NAMES = {
    0x100: "LINUX_ELFNOTE_BUILD_SALT",
    0x101: "LINUX_ELFNOTE_LTO_INFO",
}
# GNU elf.h NT_GNU_* (owner "GNU").
GNU_NOTE_NAMES = {
    1: "NT_GNU_ABI_TAG",
    2: "NT_GNU_HWCAP",
    3: "NT_GNU_BUILD_ID",
    4: "NT_GNU_GOLD_VERSION",
    5: "NT_GNU_PROPERTY_TYPE_0",
}
_NAMES_BY_OWNER = {"Xen": XEN_NOTE_NAMES, "Linux": LINUX_NOTE_NAMES, "GNU": GNU_NOTE_NAMES}



class Elf_Nhdr(ctypes.LittleEndianStructure):  # noqa: N801 (C ABI name; same in ELF32 and ELF64)
    _fields_ = [("n_namesz", ctypes.c_uint32), ("n_descsz", ctypes.c_uint32),
                ("n_type", ctypes.c_uint32)]


NHDR_SIZE = ctypes.sizeof(Elf_Nhdr)
NOTE_ALIGN = 4  # see module docstring: always 4, never p_align
# A single owner name longer than this is not a real note; it is a corrupt size.
MAX_OWNER_LEN = 256


class ElfNote(FrozenRecord):
    __slots__ = ("owner", "type", "type_name", "desc")

    def __init__(self, owner: str, type: int, type_name: str | None, desc: bytes) -> None:  # noqa: A002
        self._init(owner, type, type_name, desc)


def note_type_name(owner: str, note_type: int) -> str | None:
    """The symbolic name of a known ``(owner, type)`` pair, else None."""
    return _NAMES_BY_OWNER.get(owner, {}).get(note_type)


def _pad(n: int) -> int:
    return (n + NOTE_ALIGN - 1) & ~(NOTE_ALIGN - 1)


def parse_notes(data, start: int, size: int, *, where: str = "note segment") -> list[ElfNote]:
    """Walk the note area ``data[start:start+size]``; ImageError if a note overflows it.

    ``data`` is bytes, a memoryview or an mmap; only the notes' own bytes are copied.
    """
    end = start + size
    if start < 0 or size < 0 or end > len(data):
        raise ImageError(f"{where} at offset {start:#x} (+{size:#x}) lies outside the file")
    notes: list[ElfNote] = []
    off = start
    # Fewer than a header's worth of bytes at the end is padding, not a note.
    while end - off >= NHDR_SIZE:
        nh = Elf_Nhdr.from_buffer_copy(data[off : off + NHDR_SIZE])
        namesz, descsz, ntype = nh.n_namesz, nh.n_descsz, nh.n_type
        name_at = off + NHDR_SIZE
        desc_at = name_at + _pad(namesz)
        if namesz > end - name_at or desc_at > end or descsz > end - desc_at:
            raise ImageError(
                f"{where}: note at offset {off:#x} (namesz {namesz}, descsz {descsz}) "
                f"overflows its {size}-byte area; the image is corrupt"
            )
        if namesz > MAX_OWNER_LEN:
            raise ImageError(
                f"{where}: note at offset {off:#x} has a {namesz}-byte owner name; "
                "the image is corrupt"
            )
        raw_name = bytes(data[name_at : name_at + namesz])
        owner = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
        desc = bytes(data[desc_at : desc_at + descsz])
        notes.append(ElfNote(owner, ntype, note_type_name(owner, ntype), desc))
        off = desc_at + _pad(descsz)
    return notes


def find_note(notes: list[ElfNote], owner: str, note_type: int) -> ElfNote | None:
    for note in notes:
        if note.owner == owner and note.type == note_type:
            return note
    return None


def pvh_entry_from_notes(notes: list[ElfNote]) -> int | None:
    """The 32-bit physical PVH entry (Xen note 18), or None when absent.

    Xen pvh.pandoc: the descriptor may be 4 or 8 bytes; the entry is its low
    32 bits. Shorter than 4 bytes cannot hold an address.
    """
    note = find_note(notes, "Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) < 4 or len(note.desc) > 8:
        raise ImageError(
            f"invalid PVH note: Xen note type 18 has a {len(note.desc)}-byte descriptor "
            "(expected 4 or 8 bytes holding the 32-bit entry)"
        )
    return int.from_bytes(note.desc[:4], "little")


def xen_pv_entry_from_notes(notes: list[ElfNote]) -> int | None:
    """The Xen PV entry (XEN_ELFNOTE_ENTRY, a pointer-sized virtual address)."""
    note = find_note(notes, "Xen", XEN_ELFNOTE_ENTRY)
    if note is None:
        return None
    if not 1 <= len(note.desc) <= 8:
        raise ImageError(
            f"invalid Xen ENTRY note: {len(note.desc)}-byte descriptor (expected 4 or 8)"
        )
    return int.from_bytes(note.desc, "little")
