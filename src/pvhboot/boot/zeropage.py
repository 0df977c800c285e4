"""The Linux x86 "zero page": ``struct boot_params`` and its ``setup_header``.

Layout from Linux ``Documentation/arch/x86/zero-page.rst``,
``Documentation/arch/x86/boot.rst`` (section "The real-mode kernel header")
and ``arch/x86/include/uapi/asm/bootparam.h``. The kernel declares both
structs ``__attribute__((packed))``, hence ``_pack_ = 1``; sizes and offsets
are asserted in tests/boot/test_zeropage.py.

Only the fields a loader writes or a 64-bit kernel reads have names; the
rest (screen_info, APM, EDD, EFI ...) are opaque byte arrays we leave zero.
"""

from __future__ import annotations

import ctypes

# The setup header and its flag bits are the image reader's (image/bzimage.py,
# boot.rst "The real-mode kernel header"): the zero page embeds the same
# struct at 0x1f1, so one definition serves both. Re-exported for linux.py.
from ..image.bzimage import BOOT_FLAG as BOOT_FLAG_MAGIC  # noqa: F401
from ..image.bzimage import HDRS_MAGIC as _HDRS_BYTES
from ..image.bzimage import (  # noqa: F401
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    SetupHeader,
)
from .plan import MemoryRange

# "HdrS" as the little-endian u32 a loader writes to hdr.header.
HDRS_MAGIC = int.from_bytes(_HDRS_BYTES, "little")

# type_of_loader 0xff: "undefined" boot loader (boot.rst, "type_of_loader").
LOADER_TYPE_UNDEFINED = 0xFF

E820_MAX_ENTRIES_ZEROPAGE = 128  # bootparam.h


class BootE820Entry(ctypes.LittleEndianStructure):
    """bootparam.h ``struct boot_e820_entry`` (packed, 20 bytes)."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params`` (zero-page.rst), exactly one 4 KiB page."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),  # 0x054
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),  # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),  # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 16),  # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 16),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),  # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", ctypes.c_uint8 * 0x80),  # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),  # 0x1e4
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1ea
        ("kbd_status", ctypes.c_uint8),  # 0x1eb
        ("secure_boot", ctypes.c_uint8),  # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),  # 0x1ed
        # Nonzero tells the kernel (sanitize_boot_params) that a loader copied
        # the whole setup sector blindly, and it then wipes stale fields. The
        # image holds 0xff here; we copy from 0x1f1 only, so it stays 0.
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),  # 0x1f0
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),  # 0xcd0
        ("eddbuf", ctypes.c_uint8 * (6 * 82)),  # 0xd00: EDDMAXNR x struct edd_info
        ("_pad9", ctypes.c_uint8 * 276),  # 0xeec
    ]


def setup_header_from_bytes(raw: bytes) -> SetupHeader:
    """A SetupHeader from an image's bytes at 0x1f1 (shorter input: the rest is 0).

    Older protocols have shorter headers; bytes past our struct are ignored
    because the zero page has no room for them.
    """
    size = ctypes.sizeof(SetupHeader)
    return SetupHeader.from_buffer_copy(bytes(raw[:size]).ljust(size, b"\0"))


def fill_e820(params: BootParams, memory_map: list[MemoryRange]) -> None:
    """Write the guest memory map into the zero page's e820 table."""
    from ..errors import BootError

    if len(memory_map) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(
            f"memory map has {len(memory_map)} entries but the zero page holds at most "
            f"{E820_MAX_ENTRIES_ZEROPAGE}; use a simpler memory layout"
        )
    for i, r in enumerate(memory_map):
        params.e820_table[i].addr = r.addr
        params.e820_table[i].size = r.size
        params.e820_table[i].type = r.type
    params.e820_entries = len(memory_map)


def e820_from_params(params: BootParams) -> list[MemoryRange]:
    """Read the e820 table back (for tests and --dry-run output)."""
    return [
        MemoryRange(params.e820_table[i].addr, params.e820_table[i].size, params.e820_table[i].type)
        for i in range(params.e820_entries)
    ]
