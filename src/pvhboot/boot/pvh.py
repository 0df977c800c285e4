"""The PVH boot plan: kernel segments at their physical addresses, the
initrd as module 0, and a ``struct hvm_start_info`` (version 1) in %ebx.

ABI: Xen ``xen/include/public/arch-x86/hvm/start_info.h`` (structures) and
``docs/misc/pvh.pandoc`` (entry state, see ``cpu_state.py``). Nothing here is
specific to Xen: Linux's ``arch/x86/platform/pvh`` reads the same layout.
"""

from __future__ import annotations

import ctypes

from ..errors import BootError
from . import layout
from .cpu_state import pvh_cpu_state, pvh_gdt
from .layout import Layout, fmt_range, fmt_size
from .plan import E820_TYPE_NAMES, BootPlan, Chunk, FileRange

# start_info.h: XEN_HVM_START_MAGIC_VALUE, "xEn3" with the 0x80 bit of the E set.
HVM_START_MAGIC = 0x336EC578
# Version 1 added the memory map (memmap_paddr, memmap_entries).
HVM_START_INFO_VERSION = 1

PT_LOAD = 1  # ELF program header type (System V gABI)


class hvm_start_info(ctypes.LittleEndianStructure):  # noqa: N801 (C ABI name)
    """start_info.h ``struct hvm_start_info``; 56 bytes in version 1."""

    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),  # SIF_xxx; none apply to a PVH guest we start
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        # version 1:
        ("memmap_paddr", ctypes.c_uint64),
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class hvm_modlist_entry(ctypes.LittleEndianStructure):  # noqa: N801
    """start_info.h ``struct hvm_modlist_entry``; 32 bytes."""

    _fields_ = [
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):  # noqa: N801
    """start_info.h ``struct hvm_memmap_table_entry``; 24 bytes. ``type`` uses
    the e820 numbers (XEN_HVM_MEMMAP_TYPE_RAM = 1, ...)."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


def _segments(elf):
    return [s for s in elf.segments if s.type == PT_LOAD and s.memsz > 0]


def plan_pvh(
    elf,  # image.elf.ElfInfo (duck-typed: pvh_entry, segments)
    elf_path: str,
    *,
    initrd: str | None,
    cmdline: str,
    memory_size: int,
) -> BootPlan:
    """Plan a PVH boot of the ELF kernel ``elf`` (an ``image.elf.ElfInfo``).

    ``elf_path`` is the file the segments are read (mapped) from. Raises
    BootError when the kernel has no PVH entry, or when something does not fit.
    """
    if elf.pvh_entry is None:
        raise BootError(
            f"{elf_path} has no PVH entry point (no Xen ELF note 18, XEN_ELFNOTE_PHYS32_ENTRY): "
            "rebuild the kernel with CONFIG_PVH=y (`pvhboot kconfig` lists what to enable)"
        )
    mmap = layout.memory_map(memory_size)
    lay = Layout(memory_size, mmap)
    chunks: list[Chunk] = []
    notes: list[str] = []

    # Kernel: each PT_LOAD at p_paddr. The file bytes are mapped by the VMM;
    # memsz beyond filesz (.bss) is left to the zeroed guest RAM.
    file_size = layout.file_size(elf_path, "kernel")
    segments = _segments(elf)
    if not segments:
        raise BootError(f"{elf_path} has no loadable (PT_LOAD) segment: it is not a kernel image")
    # Whole-kernel check first, so the advice covers every segment, not the first.
    kernel_start = min(s.paddr for s in segments)
    kernel_end = max(s.paddr + s.memsz for s in segments)
    if kernel_start >= layout.HIGH_RAM_START:
        layout.check_kernel_fits(kernel_start, kernel_end, memory_size)
    for i, seg in enumerate(segments):
        if seg.filesz > seg.memsz or seg.offset + seg.filesz > file_size:
            raise BootError(
                f"{elf_path}: PT_LOAD segment {i} claims file bytes "
                f"[{seg.offset:#x}, {seg.offset + seg.filesz:#x}) (memsz {seg.memsz:#x}) "
                f"beyond the file's {file_size} bytes: the image is truncated or corrupt"
            )
        name = f"kernel segment {i}"
        lay.reserve(name, seg.paddr, seg.memsz)
        chunks.append(
            Chunk(
                addr=seg.paddr,
                size=seg.memsz,
                source=FileRange(elf_path, seg.offset, seg.filesz),
                label=name,
            )
        )
        notes.append(
            f"{name}: {fmt_range(seg.paddr, seg.memsz)} ({fmt_size(seg.memsz)}), "
            f"{seg.filesz} bytes from file offset {seg.offset:#x}"
        )
    if not any(s.paddr <= elf.pvh_entry < s.paddr + s.memsz for s in segments):
        raise BootError(
            f"{elf_path}: the PVH entry {elf.pvh_entry:#x} is outside every loadable segment: "
            "the image is corrupt"
        )

    # Boot structures in low memory at their fixed addresses.
    gdt_bytes = pvh_gdt()
    lay.reserve("GDT", layout.BOOT_GDT_ADDR, len(gdt_bytes))
    chunks.append(Chunk(layout.BOOT_GDT_ADDR, len(gdt_bytes), gdt_bytes, "GDT"))

    cmdline_bytes = layout.check_cmdline(cmdline)
    lay.reserve("command line", layout.CMDLINE_ADDR, len(cmdline_bytes))
    chunks.append(Chunk(layout.CMDLINE_ADDR, len(cmdline_bytes), cmdline_bytes, "command line"))

    modules = []
    if initrd is not None:
        initrd_size = layout.file_size(initrd, "initrd")
        if initrd_size == 0:
            raise BootError(f"initrd {initrd} is empty: pass a cpio archive or leave --initrd out")
        region = lay.place_top("initrd", initrd_size, align=layout.INITRD_ALIGN)
        chunks.append(Chunk(region.addr, initrd_size, FileRange(initrd, 0, initrd_size), "initrd"))
        # The initrd module has no command line of its own: 0 means absent.
        modules.append(hvm_modlist_entry(paddr=region.addr, size=initrd_size, cmdline_paddr=0))
        notes.append(
            f"initrd: {fmt_range(region.addr, initrd_size)} ({fmt_size(initrd_size)}), "
            "page-aligned at the top of RAM below 4 GiB, module 0"
        )

    memmap = (hvm_memmap_table_entry * len(mmap))(
        *(hvm_memmap_table_entry(addr=r.addr, size=r.size, type=r.type) for r in mmap)
    )
    memmap_bytes = bytes(memmap)
    if len(memmap_bytes) > layout.MEMMAP_MAX_SIZE:
        raise BootError(f"memory map has {len(mmap)} entries: more than one page holds")
    lay.reserve("memory map", layout.MEMMAP_ADDR, len(memmap_bytes))
    chunks.append(Chunk(layout.MEMMAP_ADDR, len(memmap_bytes), memmap_bytes, "memory map"))

    start_info_addr = layout.START_INFO_ADDR
    modlist_addr = start_info_addr + ctypes.sizeof(hvm_start_info)
    info = hvm_start_info(
        magic=HVM_START_MAGIC,
        version=HVM_START_INFO_VERSION,
        flags=0,
        nr_modules=len(modules),
        modlist_paddr=modlist_addr if modules else 0,
        cmdline_paddr=layout.CMDLINE_ADDR,
        rsdp_paddr=0,  # no ACPI tables yet: the guest falls back to its defaults
        memmap_paddr=layout.MEMMAP_ADDR,
        memmap_entries=len(mmap),
    )
    blob = bytes(info) + b"".join(bytes(m) for m in modules)
    lay.reserve("hvm_start_info", start_info_addr, len(blob))
    chunks.append(Chunk(start_info_addr, len(blob), blob, "hvm_start_info + module list"))

    notes.insert(0, f"PVH entry {elf.pvh_entry:#x}, hvm_start_info at {start_info_addr:#x} (EBX)")
    notes.append(
        "memory map: "
        + ", ".join(f"{fmt_range(r.addr, r.size)} {E820_TYPE_NAMES.get(r.type, r.type)}" for r in mmap)
    )

    cpu = pvh_cpu_state(
        entry=elf.pvh_entry,
        start_info_addr=start_info_addr,
        gdt_base=layout.BOOT_GDT_ADDR,
        gdt_limit=len(gdt_bytes) - 1,
    )
    return BootPlan(
        protocol="pvh",
        memory_size=memory_size,
        memory_map=mmap,
        chunks=sorted(chunks, key=lambda c: c.addr),
        cpu=cpu,
        cmdline=cmdline,
        notes=notes,
    )
