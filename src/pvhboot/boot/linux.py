"""The Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst).

Two planners share one shape:

- ``plan_linux_bzimage``: a bzImage's protected-mode code is loaded at its
  preferred address and entered at load address + 0x200 (``startup_64`` of
  the in-kernel decompressor), with the image's own setup header copied into
  the zero page.
- ``plan_linux_elf``: an ELF ``vmlinux`` without a PVH note; its PT_LOAD
  segments go to ``p_paddr`` and it is entered at ``e_entry``'s physical
  address, with a zero page whose setup header we synthesize.

Both enter in long mode with identity-mapped page tables, a GDT holding
__BOOT_CS (0x10) and __BOOT_DS (0x18), interrupts off and RSI = the zero
page ("64-bit Boot Protocol" in boot.rst). The e820 table comes from
``layout.memory_map``, the same map PVH hands over.
"""

from __future__ import annotations

from ..errors import BootError
from ..image.elf import EM_X86_64
from . import cpu_state, layout
from .layout import FOUR_GIB, MIB, Layout, align_up, fmt_range, fmt_size
from .pagetables import build_identity_tables, table_bytes_needed
from .plan import BootPlan, Chunk, FileRange
from .zeropage import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    BootParams,
    fill_e820,
    setup_header_from_bytes,
)

# The `typing` module costs import time on the boot path; this idiom needs none.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image.bzimage import BzImageInfo
    from ..image.elf import ElfInfo

# boot.rst "64-bit Boot Protocol": first defined in protocol 2.12 together
# with xloadflags, whose XLF_KERNEL_64 says the entry exists.
MIN_PROTOCOL_64 = 0x020C
# "the 64-bit entry point is at the load address + 0x200" (boot.rst).
ENTRY_64_OFFSET = 0x200
# boot.rst: kernels with protocol < 2.10 (or pref_address 0) load at 1 MiB.
DEFAULT_LOAD_ADDRESS = 0x100000

# What we claim in the synthesized header of an ELF vmlinux: the protocol the
# fields we fill were defined by (2.15 adds kernel_info; we fill up to init_size).
SYNTH_PROTOCOL = 0x020F
# CONFIG_PHYSICAL_ALIGN's x86-64 default; only informational for a vmlinux.
SYNTH_KERNEL_ALIGNMENT = 2 * MIB
# boot.rst: initrd_addr_max defaults to 0x37ffffff before 2.03; a 64-bit
# vmlinux reads ramdisk_image as-is, so we allow anything below 4 GiB.
SYNTH_INITRD_ADDR_MAX = FOUR_GIB - 1
# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048 with the NUL.
SYNTH_CMDLINE_SIZE = layout.CMDLINE_MAX_SIZE - 1

_LOW32 = 0xFFFFFFFF


def _protocol_str(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def check_64bit_entry(bz: BzImageInfo) -> None:
    """BootError unless the bzImage offers the 64-bit entry (protocol >= 2.12 + XLF_KERNEL_64)."""
    found = getattr(bz, "protocol_str", None) or _protocol_str(bz.protocol)
    if bz.protocol < MIN_PROTOCOL_64:
        raise BootError(
            f"bzImage boot protocol {found} has no 64-bit entry (XLF_KERNEL_64); need >= 2.12: "
            "boot a newer kernel, or its vmlinux"
        )
    if not bz.xloadflags & XLF_KERNEL_64:
        raise BootError(
            f"bzImage (boot protocol {found}) does not set XLF_KERNEL_64: it has no 64-bit "
            "entry; boot a 64-bit kernel"
        )


def bzimage_load_address(bz: BzImageInfo) -> int:
    """Where the protected-mode code goes (boot.rst "pref_address", "kernel_alignment").

    A relocatable kernel may go anywhere aligned to kernel_alignment; we take
    its preferred address, aligned up. A non-relocatable one must sit at
    pref_address exactly (or 1 MiB when it gives none).
    """
    base = bz.pref_address or DEFAULT_LOAD_ADDRESS
    if bz.relocatable and bz.kernel_alignment:
        align = bz.kernel_alignment
        if align & (align - 1):
            raise BootError(
                f"bzImage kernel_alignment {align:#x} is not a power of two: the image is corrupt"
            )
        base = align_up(base, align)
    return base


def _place_initrd(
    lay: Layout, path: str, size: int, *, addr_max: int, above_4g_ok: bool
) -> int:
    """Top of RAM below min(addr_max + 1, 3 GiB); above 4 GiB if allowed and needed."""
    if size == 0:
        raise BootError(f"initrd {path} is empty: give a non-empty initrd or none")
    try:
        return lay.place_top("initrd", size, below=min(addr_max + 1, FOUR_GIB)).addr
    except BootError:
        high = [r for r in lay.ram if r.addr >= FOUR_GIB and r.size >= size]
        if not (above_4g_ok and high):
            raise
    # boot.rst XLF_CAN_BE_LOADED_ABOVE_4G: the ramdisk may live above 4 GiB,
    # its address split across ramdisk_image and ext_ramdisk_image. The
    # lowest spot keeps the identity map small.
    return lay.reserve("initrd", high[0].addr, size).addr


def _common_plan(
    *,
    lay: Layout,
    params: BootParams,
    memory_size: int,
    chunks: list[Chunk],
    entry: int,
    initrd: str | None,
    cmdline: str,
    cmdline_limit: int,
    initrd_addr_max: int,
    above_4g_ok: bool,
    notes: list[str],
) -> BootPlan:
    """Everything after the kernel is placed: cmdline, initrd, zero page, tables, GDT, CPU."""
    hdr = params.hdr

    cmd = layout.check_cmdline(cmdline, limit=cmdline_limit + 1)
    cmd_addr = lay.reserve("command line", layout.CMDLINE_ADDR, len(cmd)).addr
    hdr.cmd_line_ptr = cmd_addr & _LOW32
    params.ext_cmd_line_ptr = cmd_addr >> 32
    chunks.append(Chunk(cmd_addr, len(cmd), cmd, "command line"))

    if initrd is not None:
        size = layout.file_size(initrd, "initrd")
        addr = _place_initrd(lay, initrd, size, addr_max=initrd_addr_max, above_4g_ok=above_4g_ok)
        hdr.ramdisk_image = addr & _LOW32
        hdr.ramdisk_size = size & _LOW32
        params.ext_ramdisk_image = addr >> 32
        params.ext_ramdisk_size = size >> 32
        chunks.append(Chunk(addr, size, FileRange(initrd, 0, size), "initrd"))
        notes.append(f"initrd {fmt_size(size)} at {fmt_range(addr, size)}")

    # One source of truth for the memory map: the same list PVH hands over.
    fill_e820(params, lay.memory_map)
    # No ACPI tables yet; 0 makes the kernel search the BIOS areas (and find none).
    params.acpi_rsdp_addr = 0

    zp_addr = lay.reserve("zero page", layout.ZERO_PAGE_ADDR, layout.ZERO_PAGE_SIZE).addr

    # Identity-map at least 4 GiB (all low RAM), more if anything sits above.
    top = max([FOUR_GIB] + [r.end for r in lay.regions])
    tables_size = table_bytes_needed(top)
    if tables_size > layout.PAGE_TABLES_MAX_SIZE:
        raise BootError(
            f"identity-mapping {fmt_size(align_up(top, 1 << 30))} needs {fmt_size(tables_size)} "
            f"of page tables, more than the {fmt_size(layout.PAGE_TABLES_MAX_SIZE)} reserved: "
            "use less guest memory"
        )
    lay.reserve("page tables", layout.PAGE_TABLES_ADDR, tables_size)
    tables = build_identity_tables(layout.PAGE_TABLES_ADDR, top)

    gdt = cpu_state.long_mode_gdt()
    gdt_addr = lay.reserve("GDT", layout.BOOT_GDT_ADDR, len(gdt)).addr

    chunks.append(Chunk(zp_addr, layout.ZERO_PAGE_SIZE, bytes(params), "zero page"))
    chunks.append(Chunk(tables.addr, tables.size, tables.data, "page tables"))
    chunks.append(Chunk(gdt_addr, len(gdt), gdt, "GDT"))

    cpu = cpu_state.long_mode_cpu_state(
        entry, rsi=zp_addr, cr3=tables.pml4, gdt_base=gdt_addr, gdt_limit=len(gdt) - 1
    )
    notes.append(f"zero page at {zp_addr:#x}, identity map [0, {tables.top:#x}), entry {entry:#x}")
    return BootPlan(
        protocol="linux64",
        memory_size=memory_size,
        memory_map=list(lay.memory_map),
        chunks=chunks,
        cpu=cpu,
        cmdline=cmdline,
        notes=notes,
    )


def plan_linux_bzimage(
    bz: BzImageInfo,
    path: str,
    *,
    initrd: str | None = None,
    cmdline: str = "",
    memory_size: int,
) -> BootPlan:
    """Plan a bzImage boot through its 64-bit entry (boot.rst "64-bit Boot Protocol")."""
    check_64bit_entry(bz)
    lay = Layout(memory_size)

    load = bzimage_load_address(bz)
    if bz.pm_size <= 0:
        raise BootError(f"{path}: the bzImage has no protected-mode code: the image is truncated")
    # The kernel decompresses in place and needs init_size bytes from its load
    # address (boot.rst "init_size"); nothing of ours may live in there.
    window = max(bz.init_size, bz.pm_size)
    lay.reserve("kernel (init_size window)", load, window)
    chunks = [Chunk(load, bz.pm_size, FileRange(path, bz.pm_offset, bz.pm_size), "kernel")]

    params = BootParams()
    params.hdr = setup_header_from_bytes(bz.setup_header)
    hdr = params.hdr
    # boot.rst "type_of_loader": 0xff = undefined loader, no ID assigned.
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    # Protected-mode code sits at 1 MiB or above. CAN_USE_HEAP/heap_end_ptr
    # matter only to the real-mode setup code, which this entry skips.
    hdr.loadflags |= LOADED_HIGH
    # A relocatable kernel reads code32_start as where it was loaded.
    hdr.code32_start = load & _LOW32

    notes = [
        f"bzImage boot protocol {_protocol_str(bz.protocol)}: kernel "
        f"{fmt_size(bz.pm_size)} at {load:#x}, init_size window {fmt_range(load, window)}"
    ]
    cmdline_limit = bz.cmdline_size or 255  # boot.rst: 255 before protocol 2.06
    return _common_plan(
        lay=lay,
        params=params,
        memory_size=memory_size,
        chunks=chunks,
        entry=load + ENTRY_64_OFFSET,
        initrd=initrd,
        cmdline=cmdline,
        cmdline_limit=cmdline_limit,
        initrd_addr_max=bz.initrd_addr_max or 0x37FFFFFF,
        above_4g_ok=bool(bz.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G),
        notes=notes,
    )


def synthesize_setup_header(params: BootParams, *, kernel_start: int, kernel_end: int) -> None:
    """Fill the setup-header fields a 64-bit kernel reads, for a vmlinux that has none.

    Linux's startup_64 and setup_arch look at: boot_flag/header (to trust the
    header), version (which fields exist), type_of_loader, loadflags,
    cmd_line_ptr/cmdline_size, ramdisk_*, hardware_subarch (0 = PC) and
    setup_data (0 = none); the rest describe a bzImage and stay plausible.
    """
    hdr = params.hdr
    hdr.boot_flag = BOOT_FLAG_MAGIC
    hdr.header = HDRS_MAGIC
    hdr.version = SYNTH_PROTOCOL
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags = LOADED_HIGH
    hdr.code32_start = kernel_start & _LOW32
    hdr.kernel_alignment = SYNTH_KERNEL_ALIGNMENT
    hdr.initrd_addr_max = SYNTH_INITRD_ADDR_MAX
    hdr.xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    hdr.cmdline_size = SYNTH_CMDLINE_SIZE
    hdr.pref_address = kernel_start
    hdr.init_size = (kernel_end - kernel_start) & _LOW32


def plan_linux_elf(
    elf: ElfInfo,
    elf_path: str,
    *,
    initrd: str | None = None,
    cmdline: str = "",
    memory_size: int,
) -> BootPlan:
    """Plan a 64-bit ELF vmlinux boot through its 64-bit entry (no PVH note needed)."""
    if elf.elf_class != 64 or elf.machine != EM_X86_64:
        raise BootError(
            f"{elf_path}: a {elf.elf_class}-bit ELF for machine {elf.machine} has no x86-64 "
            "entry; give an x86-64 vmlinux"
        )
    loads = [s for s in elf.load_segments if s.memsz > 0]
    if not loads:
        raise BootError(f"{elf_path}: the ELF has no PT_LOAD segments: nothing to boot")
    lay = Layout(memory_size)
    chunks: list[Chunk] = []
    file_size = layout.file_size(elf_path, "kernel")
    for i, seg in enumerate(loads):
        if seg.filesz > seg.memsz or seg.offset + seg.filesz > file_size:
            raise BootError(
                f"{elf_path}: PT_LOAD {i} claims file bytes [{seg.offset:#x}, "
                f"{seg.offset + seg.filesz:#x}) with p_memsz {seg.memsz:#x} in a {file_size}-byte "
                "file: the ELF is truncated or corrupt"
            )
        lay.reserve(f"kernel segment {i}", seg.paddr, seg.memsz)
        chunks.append(
            Chunk(seg.paddr, seg.memsz, FileRange(elf_path, seg.offset, seg.filesz), f"kernel {i}")
        )
    start = min(s.paddr for s in loads)
    end = max(s.paddr + s.memsz for s in loads)

    entry = elf.entry_paddr
    if entry is None:
        entry = elf.physical_address(elf.entry)
    if entry is None or not any(s.paddr <= entry < s.paddr + s.memsz for s in loads):
        raise BootError(
            f"{elf_path}: e_entry {elf.entry:#x} is not inside any PT_LOAD segment: "
            "the ELF has no usable 64-bit entry"
        )

    params = BootParams()
    synthesize_setup_header(params, kernel_start=start, kernel_end=end)
    notes = [
        f"ELF vmlinux without a PVH note: segments {fmt_range(start, end - start)}, "
        "synthesized zero page"
    ]
    return _common_plan(
        lay=lay,
        params=params,
        memory_size=memory_size,
        chunks=chunks,
        entry=entry,
        initrd=initrd,
        cmdline=cmdline,
        cmdline_limit=SYNTH_CMDLINE_SIZE,
        initrd_addr_max=SYNTH_INITRD_ADDR_MAX,
        above_4g_ok=True,
        notes=notes,
    )


def zero_page_of(plan: BootPlan) -> BootParams:
    """The boot_params a plan hands the kernel (tests and --dry-run read it back)."""
    for chunk in plan.chunks:
        if chunk.label == "zero page" and isinstance(chunk.source, bytes):
            return BootParams.from_buffer_copy(chunk.source)
    raise BootError("this plan has no zero page: it is not a Linux 64-bit boot")

