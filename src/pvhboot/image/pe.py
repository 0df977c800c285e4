"""Just enough PE/COFF to say what an EFI image is (Microsoft PE format spec).

A bzImage built with CONFIG_EFI_STUB is also a PE image: the "MZ" DOS stub
points (e_lfanew at 0x3c) at a "PE\\0\\0" signature, a COFF file header and an
optional header. That is what `efi_pe` reports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ImageError

MZ_MAGIC = b"MZ"
OFF_E_LFANEW = 0x3C
PE_SIGNATURE = b"PE\0\0"
# COFF file header (PE spec 3.3): Machine, NumberOfSections, TimeDateStamp,
# PointerToSymbolTable, NumberOfSymbols, SizeOfOptionalHeader, Characteristics.
_COFF = struct.Struct("<HHIIIHH")
# Optional header (3.4): Magic, linker versions, three sizes, AddressOfEntryPoint.
_OPT_HEAD = struct.Struct("<HBBIIII")
OPT_OFF_SUBSYSTEM = 68  # same offset in PE32 and PE32+
PE32_MAGIC, PE32PLUS_MAGIC = 0x10B, 0x20B
IMAGE_FILE_MACHINE_I386 = 0x14C
IMAGE_FILE_MACHINE_AMD64 = 0x8664
MACHINE_NAMES = {IMAGE_FILE_MACHINE_I386: "i386", IMAGE_FILE_MACHINE_AMD64: "x86-64"}
SUBSYSTEM_NAMES = {10: "EFI_APPLICATION", 11: "EFI_BOOT_SERVICE_DRIVER",
                   12: "EFI_RUNTIME_DRIVER", 13: "EFI_ROM"}


@dataclass(frozen=True)
class PeInfo:
    machine: int
    machine_name: str | None
    sections: int
    pe32plus: bool
    entry_rva: int
    subsystem: int | None
    subsystem_name: str | None


def parse_pe(data, *, what: str = "PE image") -> PeInfo:
    size = len(data)
    if size < OFF_E_LFANEW + 4 or bytes(data[:2]) != MZ_MAGIC:
        raise ImageError(f"{what}: no 'MZ' DOS header; not a PE image")
    (lfanew,) = struct.unpack_from("<I", data, OFF_E_LFANEW)
    if lfanew > size - 4 - _COFF.size or bytes(data[lfanew : lfanew + 4]) != PE_SIGNATURE:
        raise ImageError(f"{what}: no 'PE\\0\\0' signature at e_lfanew {lfanew:#x}; "
                         "not a PE image")
    machine, nsections, _, _, _, opt_size, _ = _COFF.unpack_from(data, lfanew + 4)
    opt_at = lfanew + 4 + _COFF.size
    magic = entry = 0
    subsystem = None
    if opt_size >= _OPT_HEAD.size and opt_at + _OPT_HEAD.size <= size:
        magic, _, _, _, _, _, entry = _OPT_HEAD.unpack_from(data, opt_at)
        if opt_size >= OPT_OFF_SUBSYSTEM + 2 and opt_at + OPT_OFF_SUBSYSTEM + 2 <= size:
            (subsystem,) = struct.unpack_from("<H", data, opt_at + OPT_OFF_SUBSYSTEM)
    return PeInfo(
        machine=machine,
        machine_name=MACHINE_NAMES.get(machine),
        sections=nsections,
        pe32plus=magic == PE32PLUS_MAGIC,
        entry_rva=entry,
        subsystem=subsystem,
        subsystem_name=SUBSYSTEM_NAMES.get(subsystem) if subsystem is not None else None,
    )
