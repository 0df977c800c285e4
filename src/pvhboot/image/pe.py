"""Just enough PE/COFF to say what an EFI image is (Microsoft PE format spec).

A bzImage built with CONFIG_EFI_STUB is also a PE image: the "MZ" DOS stub
points (e_lfanew at 0x3c) at a "PE\\0\\0" signature, a COFF file header and an
optional header. That is what `efi_pe` reports.
"""

from __future__ import annotations

import ctypes
import struct

from .._record import FrozenRecord
from ..errors import ImageError

MZ_MAGIC = b"MZ"
OFF_E_LFANEW = 0x3C
PE_SIGNATURE = b"PE\0\0"


class CoffFileHeader(ctypes.LittleEndianStructure):
    """PE spec 3.3 "COFF File Header (Object and Image)", after "PE\\0\\0"."""

    _pack_ = 1
    _fields_ = [
        ("Machine", ctypes.c_uint16), ("NumberOfSections", ctypes.c_uint16),
        ("TimeDateStamp", ctypes.c_uint32), ("PointerToSymbolTable", ctypes.c_uint32),
        ("NumberOfSymbols", ctypes.c_uint32), ("SizeOfOptionalHeader", ctypes.c_uint16),
        ("Characteristics", ctypes.c_uint16),
    ]


class OptionalHeaderStandard(ctypes.LittleEndianStructure):
    """PE spec 3.4.1: the standard fields common to PE32 and PE32+ (up to the entry point)."""

    _pack_ = 1
    _fields_ = [
        ("Magic", ctypes.c_uint16), ("MajorLinkerVersion", ctypes.c_uint8),
        ("MinorLinkerVersion", ctypes.c_uint8), ("SizeOfCode", ctypes.c_uint32),
        ("SizeOfInitializedData", ctypes.c_uint32),
        ("SizeOfUninitializedData", ctypes.c_uint32), ("AddressOfEntryPoint", ctypes.c_uint32),
    ]


_COFF_SIZE = ctypes.sizeof(CoffFileHeader)
_OPT_SIZE = ctypes.sizeof(OptionalHeaderStandard)
OPT_OFF_SUBSYSTEM = 68  # same offset in PE32 and PE32+
PE32_MAGIC, PE32PLUS_MAGIC = 0x10B, 0x20B
IMAGE_FILE_MACHINE_I386 = 0x14C
IMAGE_FILE_MACHINE_AMD64 = 0x8664
MACHINE_NAMES = {IMAGE_FILE_MACHINE_I386: "i386", IMAGE_FILE_MACHINE_AMD64: "x86-64"}
SUBSYSTEM_NAMES = {10: "EFI_APPLICATION", 11: "EFI_BOOT_SERVICE_DRIVER",
                   12: "EFI_RUNTIME_DRIVER", 13: "EFI_ROM"}


class PeInfo(FrozenRecord):
    __slots__ = ("machine", "machine_name", "sections", "pe32plus", "entry_rva", "subsystem",
                 "subsystem_name")

    def __init__(self, machine: int, machine_name: str | None, sections: int, pe32plus: bool,
                 entry_rva: int, subsystem: int | None, subsystem_name: str | None) -> None:
        self._init(machine, machine_name, sections, pe32plus, entry_rva, subsystem,
                   subsystem_name)


def parse_pe(data, *, what: str = "PE image") -> PeInfo:
    size = len(data)
    if size < OFF_E_LFANEW + 4 or bytes(data[:2]) != MZ_MAGIC:
        raise ImageError(f"{what}: no 'MZ' DOS header; not a PE image")
    (lfanew,) = struct.unpack_from("<I", data, OFF_E_LFANEW)
    if lfanew > size - 4 - _COFF_SIZE or bytes(data[lfanew : lfanew + 4]) != PE_SIGNATURE:
        raise ImageError(f"{what}: no 'PE\\0\\0' signature at e_lfanew {lfanew:#x}; "
                         "not a PE image")
    coff_at = lfanew + 4
    coff = CoffFileHeader.from_buffer_copy(data[coff_at : coff_at + _COFF_SIZE])
    opt_at = coff_at + _COFF_SIZE
    magic = entry = 0
    subsystem = None
    if coff.SizeOfOptionalHeader >= _OPT_SIZE and opt_at + _OPT_SIZE <= size:
        opt = OptionalHeaderStandard.from_buffer_copy(data[opt_at : opt_at + _OPT_SIZE])
        magic, entry = opt.Magic, opt.AddressOfEntryPoint
        sub_at = opt_at + OPT_OFF_SUBSYSTEM
        if coff.SizeOfOptionalHeader >= OPT_OFF_SUBSYSTEM + 2 and sub_at + 2 <= size:
            (subsystem,) = struct.unpack_from("<H", data, sub_at)
    return PeInfo(
        machine=coff.Machine,
        machine_name=MACHINE_NAMES.get(coff.Machine),
        sections=coff.NumberOfSections,
        pe32plus=magic == PE32PLUS_MAGIC,
        entry_rva=entry,
        subsystem=subsystem,
        subsystem_name=SUBSYSTEM_NAMES.get(subsystem) if subsystem is not None else None,
    )
