"""ELF32/ELF64 little-endian reader: program headers, PT_LOAD segments, notes.

Only what a loader needs: the ELF header, the program header table, and the
notes (from PT_NOTE segments, or SHT_NOTE sections when a file has no
PT_NOTE). Works over bytes, memoryview or mmap without copying segment data.
Every count, offset and size is checked against the buffer before use, so a
corrupt header gives one ImageError line and never a big allocation.
"""

from __future__ import annotations

import ctypes

from .._record import FrozenRecord, Record
from ..errors import ImageError
from .notes import ElfNote, parse_notes, pvh_entry_from_notes, xen_pv_entry_from_notes

# ELF gABI, e_ident layout.
ELF_MAGIC = b"\x7fELF"
EI_CLASS, EI_DATA, EI_VERSION = 4, 5, 6
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EV_CURRENT = 1
EM_386, EM_X86_64 = 3, 62
# Program header types (gABI) and segment flags.
PT_NULL, PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 0, 1, 2, 3, 4
PF_X, PF_W, PF_R = 1, 2, 4
SHT_NOTE = 7
# More program headers than this needs an extension (PN_XNUM) no kernel uses.
PN_XNUM = 0xFFFF

# x86-64 kernel virtual base (Linux arch/x86/include/asm/page_64_types.h):
# text at __START_KERNEL_map + physical address, i.e. 0xffffffff81000000 for
# a kernel loaded at 16 MiB.
START_KERNEL_MAP = 0xFFFFFFFF80000000



# ELF gABI structures (elf.h). All little-endian; ELF64 moved p_flags up.
class Elf32_Ehdr(ctypes.LittleEndianStructure):  # noqa: N801 (C ABI name)
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * 16), ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16), ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint32), ("e_phoff", ctypes.c_uint32),
        ("e_shoff", ctypes.c_uint32), ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16), ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16), ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16), ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf64_Ehdr(ctypes.LittleEndianStructure):  # noqa: N801
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * 16), ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16), ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint64), ("e_phoff", ctypes.c_uint64),
        ("e_shoff", ctypes.c_uint64), ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16), ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16), ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16), ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf32_Phdr(ctypes.LittleEndianStructure):  # noqa: N801
    _fields_ = [
        ("p_type", ctypes.c_uint32), ("p_offset", ctypes.c_uint32),
        ("p_vaddr", ctypes.c_uint32), ("p_paddr", ctypes.c_uint32),
        ("p_filesz", ctypes.c_uint32), ("p_memsz", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32), ("p_align", ctypes.c_uint32),
    ]


class Elf64_Phdr(ctypes.LittleEndianStructure):  # noqa: N801
    _fields_ = [
        ("p_type", ctypes.c_uint32), ("p_flags", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint64), ("p_vaddr", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64), ("p_filesz", ctypes.c_uint64),
        ("p_memsz", ctypes.c_uint64), ("p_align", ctypes.c_uint64),
    ]


class Elf32_Shdr(ctypes.LittleEndianStructure):  # noqa: N801
    _fields_ = [
        ("sh_name", ctypes.c_uint32), ("sh_type", ctypes.c_uint32),
        ("sh_flags", ctypes.c_uint32), ("sh_addr", ctypes.c_uint32),
        ("sh_offset", ctypes.c_uint32), ("sh_size", ctypes.c_uint32),
        ("sh_link", ctypes.c_uint32), ("sh_info", ctypes.c_uint32),
        ("sh_addralign", ctypes.c_uint32), ("sh_entsize", ctypes.c_uint32),
    ]


class Elf64_Shdr(ctypes.LittleEndianStructure):  # noqa: N801
    _fields_ = [
        ("sh_name", ctypes.c_uint32), ("sh_type", ctypes.c_uint32),
        ("sh_flags", ctypes.c_uint64), ("sh_addr", ctypes.c_uint64),
        ("sh_offset", ctypes.c_uint64), ("sh_size", ctypes.c_uint64),
        ("sh_link", ctypes.c_uint32), ("sh_info", ctypes.c_uint32),
        ("sh_addralign", ctypes.c_uint64), ("sh_entsize", ctypes.c_uint64),
    ]


# class -> (Ehdr, Phdr, Shdr)
_STRUCTS = {
    ELFCLASS32: (Elf32_Ehdr, Elf32_Phdr, Elf32_Shdr),
    ELFCLASS64: (Elf64_Ehdr, Elf64_Phdr, Elf64_Shdr),
}


class ElfSegment(FrozenRecord):
    """One program header (Phdr), as read."""

    __slots__ = ("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align")

    def __init__(self, type: int, offset: int, vaddr: int, paddr: int,  # noqa: A002
                 filesz: int, memsz: int, flags: int, align: int) -> None:
        self._init(type, offset, vaddr, paddr, filesz, memsz, flags, align)

    def __repr__(self) -> str:
        return (f"ElfSegment(type={self.type:#x}, offset={self.offset:#x}, "
                f"vaddr={self.vaddr:#x}, paddr={self.paddr:#x}, filesz={self.filesz:#x}, "
                f"memsz={self.memsz:#x}, flags={self.flags:#x}, align={self.align:#x})")

    @property
    def is_load(self) -> bool:
        return self.type == PT_LOAD

    @property
    def flags_str(self) -> str:
        """p_flags as readelf prints them, e.g. "R-X" (PF_R 4, PF_W 2, PF_X 1)."""
        return "".join(c if self.flags & bit else "-" for c, bit in (("R", 4), ("W", 2), ("X", 1)))


class ElfInfo(Record):
    """What pvhboot needs from an ELF's headers."""

    __slots__ = ("elf_class", "machine", "entry", "segments", "notes", "pvh_entry",
                 "xen_pv_entry", "entry_paddr", "size")

    def __init__(
        self,
        elf_class: int,  # 32 or 64
        machine: int,  # e_machine (62 = x86-64)
        entry: int,  # e_entry as written
        segments: list[ElfSegment],
        notes: list[ElfNote],
        pvh_entry: int | None,
        xen_pv_entry: int | None,
        # e_entry translated to a physical address (see physical_address()).
        entry_paddr: int | None = None,
        size: int = 0,  # bytes in the file
    ) -> None:
        self.elf_class = elf_class
        self.machine = machine
        self.entry = entry
        self.segments = segments
        self.notes = notes
        self.pvh_entry = pvh_entry
        self.xen_pv_entry = xen_pv_entry
        self.entry_paddr = entry_paddr
        self.size = size

    @property
    def load_segments(self) -> list[ElfSegment]:
        return [s for s in self.segments if s.type == PT_LOAD]

    def physical_address(self, vaddr: int) -> int | None:
        return physical_address(self.segments, vaddr)


def physical_address(segments: list[ElfSegment], vaddr: int) -> int | None:
    """Map a virtual address through the PT_LOAD that contains it.

    Falls back to the x86-64 kernel mapping (vaddr - __START_KERNEL_map) for
    an address in the kernel's high half, and to the address itself when it
    is already below that (vmlinux's e_entry is usually physical already).
    """
    for seg in segments:
        if seg.type == PT_LOAD and seg.vaddr <= vaddr < seg.vaddr + max(seg.memsz, 1):
            return seg.paddr + (vaddr - seg.vaddr)
    if vaddr >= START_KERNEL_MAP:
        return vaddr - START_KERNEL_MAP
    if vaddr < 1 << 32:
        return vaddr
    return None


def is_elf(data) -> bool:
    return len(data) >= 4 and bytes(data[:4]) == ELF_MAGIC


def parse_elf(data, *, what: str = "ELF") -> ElfInfo:
    """Read an ELF image from bytes/memoryview/mmap. Raises ImageError when malformed."""
    size = len(data)
    if size < 4 or bytes(data[:4]) != ELF_MAGIC:
        raise ImageError(f"{what}: no ELF magic (\\x7fELF) at offset 0; not an ELF file")
    if size < 16:
        raise ImageError(f"{what}: truncated ELF header ({size} bytes)")
    ident = bytes(data[:16])
    elf_class = ident[EI_CLASS]
    if elf_class not in _STRUCTS:
        raise ImageError(f"{what}: unknown ELF class {elf_class} (expected 1=ELF32 or 2=ELF64)")
    if ident[EI_DATA] != ELFDATA2LSB:
        raise ImageError(f"{what}: big-endian or unknown data encoding {ident[EI_DATA]}; "
                         "only little-endian x86 kernels are supported")
    ehdr_t, phdr_t, _ = _STRUCTS[elf_class]
    ehsize, phsize = ctypes.sizeof(ehdr_t), ctypes.sizeof(phdr_t)
    if size < ehsize:
        raise ImageError(f"{what}: truncated ELF header ({size} of {ehsize} bytes)")
    eh = ehdr_t.from_buffer_copy(data[:ehsize])
    phoff, phnum, phentsize = eh.e_phoff, eh.e_phnum, eh.e_phentsize
    bits = 64 if elf_class == ELFCLASS64 else 32

    if phnum == PN_XNUM:
        raise ImageError(f"{what}: e_phnum is PN_XNUM (program header count stored elsewhere, "
                         "which no kernel does); the ELF header is corrupt")
    if phnum and phentsize < phsize:
        raise ImageError(f"{what}: e_phentsize {phentsize} is smaller than an ELF{bits} "
                         f"program header ({phsize}); the header is corrupt")
    if phnum and (phoff < ehsize or phoff > size or phnum * phentsize > size - phoff):
        raise ImageError(f"{what}: program header table ({phnum} x {phentsize} bytes at "
                         f"{phoff:#x}) lies outside the {size}-byte file; truncated or corrupt")

    segments: list[ElfSegment] = []
    for i in range(phnum):
        at = phoff + i * phentsize
        ph = phdr_t.from_buffer_copy(data[at : at + phsize])
        p_off, p_filesz = ph.p_offset, ph.p_filesz
        if ph.p_type in (PT_LOAD, PT_NOTE) and p_filesz and (
                p_off > size or p_filesz > size - p_off):
            raise ImageError(f"{what}: segment {i} (offset {p_off:#x}, {p_filesz} bytes) "
                             f"extends past the end of the {size}-byte file; truncated?")
        if ph.p_type == PT_LOAD and p_filesz > ph.p_memsz:
            raise ImageError(f"{what}: PT_LOAD segment {i} has filesz {p_filesz:#x} > "
                             f"memsz {ph.p_memsz:#x}; the header is corrupt")
        segments.append(ElfSegment(ph.p_type, p_off, ph.p_vaddr, ph.p_paddr, p_filesz,
                                   ph.p_memsz, ph.p_flags, ph.p_align))

    notes: list[ElfNote] = []
    # An empty PT_NOTE says nothing, whatever its (then unused) offset.
    note_segs = [s for s in segments if s.type == PT_NOTE and s.filesz]
    for seg in note_segs:
        notes.extend(parse_notes(data, seg.offset, seg.filesz,
                                 where=f"{what}: PT_NOTE at {seg.offset:#x}"))
    if not note_segs and eh.e_shnum and eh.e_shoff:
        notes.extend(_section_notes(data, elf_class, eh.e_shoff, eh.e_shentsize, eh.e_shnum,
                                    what))

    pvh = pvh_entry_from_notes(notes)
    xen_pv = xen_pv_entry_from_notes(notes)
    return ElfInfo(
        elf_class=bits,
        machine=eh.e_machine,
        entry=eh.e_entry,
        segments=segments,
        notes=notes,
        pvh_entry=pvh,
        xen_pv_entry=xen_pv,
        entry_paddr=physical_address(segments, eh.e_entry),
        size=size,
    )


def _section_notes(data, elf_class, shoff, shentsize, shnum, what) -> list[ElfNote]:
    """Notes from SHT_NOTE sections, for ELFs without a PT_NOTE segment."""
    shdr_t = _STRUCTS[elf_class][2]
    shsize = ctypes.sizeof(shdr_t)
    size = len(data)
    if shentsize < shsize or shoff > size or shnum * shentsize > size - shoff:
        raise ImageError(f"{what}: section header table ({shnum} x {shentsize} bytes at "
                         f"{shoff:#x}) lies outside the {size}-byte file; truncated or corrupt")
    notes: list[ElfNote] = []
    for i in range(shnum):
        at = shoff + i * shentsize
        sh = shdr_t.from_buffer_copy(data[at : at + shsize])
        if sh.sh_type == SHT_NOTE and sh.sh_size:
            notes.extend(parse_notes(data, sh.sh_offset, sh.sh_size,
                                     where=f"{what}: SHT_NOTE section {i}"))
    return notes


def read_elf_file(path: str) -> ElfInfo:
    """parse_elf over an mmap of ``path`` (the segments are not read)."""
    import mmap

    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise ImageError(f"{path}: empty file; not an ELF") from exc
        with mm:
            return parse_elf(mm, what=path)


def elf_problem(data) -> str | None:
    """Why ``data`` is not a valid ELF (parse_elf's reason, without a file name), or None.

    Used on a decompressed payload before anyone is handed it, so the caller
    can name the image instead of a temporary file.
    """
    tag = "\0elf"  # a prefix no path has, stripped from parse_elf's message
    try:
        parse_elf(data, what=tag)
    except ImageError as exc:
        reason = str(exc)
        return reason[len(tag) + 2:] if reason.startswith(tag + ": ") else reason
    except (ValueError, IndexError, OverflowError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def elf_file_problem(fd: int) -> str | None:
    """elf_problem of the file open at ``fd`` (mapped, not read)."""
    import mmap

    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except ValueError:
        return "it is empty"
    try:
        return elf_problem(mm)
    finally:
        try:
            mm.close()
        except BufferError:  # a traceback still holds a slice; it goes with it
            pass
