"""ELF32/ELF64 little-endian reader: program headers, PT_LOAD segments, notes.

Only what a loader needs: the ELF header, the program header table, and the
notes (from PT_NOTE segments, or SHT_NOTE sections when a file has no
PT_NOTE). Works over bytes, memoryview or mmap without copying segment data.
Every count, offset and size is checked against the buffer before use, so a
corrupt header gives one ImageError line and never a big allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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

_EHDR = {
    ELFCLASS32: struct.Struct("<16sHHIIIIIHHHHHH"),
    ELFCLASS64: struct.Struct("<16sHHIQQQIHHHHHH"),
}
# Field order differs between the classes: p_flags moved in ELF64.
_PHDR32 = struct.Struct("<IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
_SHDR32 = struct.Struct("<IIIIIIIIII")  # name type flags addr offset size link info align entsize
_SHDR64 = struct.Struct("<IIQQQQIIQQ")


@dataclass(frozen=True)
class ElfSegment:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int
    align: int

    @property
    def is_load(self) -> bool:
        return self.type == PT_LOAD


@dataclass
class ElfInfo:
    elf_class: int  # 32 or 64
    machine: int  # e_machine (62 = x86-64)
    entry: int  # e_entry as written
    segments: list[ElfSegment]
    notes: list[ElfNote]
    pvh_entry: int | None
    xen_pv_entry: int | None
    # e_entry translated to a physical address (see physical_address()).
    entry_paddr: int | None = None
    size: int = 0  # bytes in the file
    extra: dict = field(default_factory=dict)

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
    if elf_class not in _EHDR:
        raise ImageError(f"{what}: unknown ELF class {elf_class} (expected 1=ELF32 or 2=ELF64)")
    if ident[EI_DATA] != ELFDATA2LSB:
        raise ImageError(f"{what}: big-endian or unknown data encoding {ident[EI_DATA]}; "
                         "only little-endian x86 kernels are supported")
    ehdr = _EHDR[elf_class]
    if size < ehdr.size:
        raise ImageError(f"{what}: truncated ELF header ({size} of {ehdr.size} bytes)")
    (_, _e_type, machine, _version, entry, phoff, shoff, _flags, _ehsize,
     phentsize, phnum, shentsize, shnum, _shstrndx) = ehdr.unpack_from(data, 0)
    phdr = _PHDR64 if elf_class == ELFCLASS64 else _PHDR32
    bits = 64 if elf_class == ELFCLASS64 else 32

    if phnum == PN_XNUM:
        raise ImageError(f"{what}: e_phnum is PN_XNUM (program header count stored elsewhere, "
                         "which no kernel does); the ELF header is corrupt")
    if phnum and phentsize < phdr.size:
        raise ImageError(f"{what}: e_phentsize {phentsize} is smaller than an ELF{bits} "
                         f"program header ({phdr.size}); the header is corrupt")
    if phnum and (phoff < ehdr.size or phoff > size or phnum * phentsize > size - phoff):
        raise ImageError(f"{what}: program header table ({phnum} x {phentsize} bytes at "
                         f"{phoff:#x}) lies outside the {size}-byte file; truncated or corrupt")

    segments: list[ElfSegment] = []
    for i in range(phnum):
        at = phoff + i * phentsize
        if elf_class == ELFCLASS64:
            p_type, p_flags, p_off, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = (
                phdr.unpack_from(data, at))
        else:
            p_type, p_off, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = (
                phdr.unpack_from(data, at))
        if p_type in (PT_LOAD, PT_NOTE) and p_filesz and (
                p_off > size or p_filesz > size - p_off):
            raise ImageError(f"{what}: segment {i} (offset {p_off:#x}, {p_filesz} bytes) "
                             f"extends past the end of the {size}-byte file; truncated?")
        if p_type == PT_LOAD and p_filesz > p_memsz:
            raise ImageError(f"{what}: PT_LOAD segment {i} has filesz {p_filesz:#x} > "
                             f"memsz {p_memsz:#x}; the header is corrupt")
        segments.append(ElfSegment(p_type, p_off, p_vaddr, p_paddr, p_filesz, p_memsz,
                                   p_flags, p_align))

    notes: list[ElfNote] = []
    # An empty PT_NOTE says nothing, whatever its (then unused) offset.
    note_segs = [s for s in segments if s.type == PT_NOTE and s.filesz]
    for seg in note_segs:
        notes.extend(parse_notes(data, seg.offset, seg.filesz,
                                 where=f"{what}: PT_NOTE at {seg.offset:#x}"))
    if not note_segs and shnum and shoff:
        notes.extend(_section_notes(data, elf_class, shoff, shentsize, shnum, what))

    pvh = pvh_entry_from_notes(notes)
    xen_pv = xen_pv_entry_from_notes(notes)
    return ElfInfo(
        elf_class=bits,
        machine=machine,
        entry=entry,
        segments=segments,
        notes=notes,
        pvh_entry=pvh,
        xen_pv_entry=xen_pv,
        entry_paddr=physical_address(segments, entry),
        size=size,
    )


def _section_notes(data, elf_class, shoff, shentsize, shnum, what) -> list[ElfNote]:
    """Notes from SHT_NOTE sections, for ELFs without a PT_NOTE segment."""
    shdr = _SHDR64 if elf_class == ELFCLASS64 else _SHDR32
    size = len(data)
    if shentsize < shdr.size or shoff > size or shnum * shentsize > size - shoff:
        raise ImageError(f"{what}: section header table ({shnum} x {shentsize} bytes at "
                         f"{shoff:#x}) lies outside the {size}-byte file; truncated or corrupt")
    notes: list[ElfNote] = []
    for i in range(shnum):
        fields = shdr.unpack_from(data, shoff + i * shentsize)
        sh_type, sh_offset, sh_size = fields[1], fields[4], fields[5]
        if sh_type == SHT_NOTE and sh_size:
            notes.extend(parse_notes(data, sh_offset, sh_size,
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
