"""boot_params / setup_header layout against Linux zero-page.rst and boot.rst."""

import ctypes

import pytest

from pvhboot.boot.plan import E820_RAM, E820_RESERVED, MemoryRange
from pvhboot.boot.zeropage import (
    BootE820Entry,
    BootParams,
    SetupHeader,
    e820_from_params,
    fill_e820,
    setup_header_from_bytes,
)
from pvhboot.errors import BootError


def test_struct_sizes():
    assert ctypes.sizeof(BootParams) == 4096
    # boot.rst: the header runs from 0x1f1 to kernel_info_offset (0x268, 4 bytes).
    assert ctypes.sizeof(SetupHeader) == 0x26C - 0x1F1
    assert ctypes.sizeof(BootE820Entry) == 20


@pytest.mark.parametrize(
    "field, offset",
    [
        ("acpi_rsdp_addr", 0x070),
        ("ext_ramdisk_image", 0x0C0),
        ("ext_ramdisk_size", 0x0C4),
        ("ext_cmd_line_ptr", 0x0C8),
        ("cc_blob_address", 0x13C),
        ("alt_mem_k", 0x1E0),
        ("e820_entries", 0x1E8),
        ("sentinel", 0x1EF),
        ("hdr", 0x1F1),
        ("edd_mbr_sig_buffer", 0x290),
        ("e820_table", 0x2D0),
        ("eddbuf", 0xD00),
    ],
)
def test_boot_params_offsets(field, offset):
    assert getattr(BootParams, field).offset == offset


@pytest.mark.parametrize(
    "field, offset",
    [
        ("setup_sects", 0x1F1),
        ("boot_flag", 0x1FE),
        ("jump", 0x200),
        ("header", 0x202),
        ("version", 0x206),
        ("type_of_loader", 0x210),
        ("loadflags", 0x211),
        ("code32_start", 0x214),
        ("ramdisk_image", 0x218),
        ("ramdisk_size", 0x21C),
        ("heap_end_ptr", 0x224),
        ("cmd_line_ptr", 0x228),
        ("initrd_addr_max", 0x22C),
        ("kernel_alignment", 0x230),
        ("relocatable_kernel", 0x234),
        ("xloadflags", 0x236),
        ("cmdline_size", 0x238),
        ("payload_offset", 0x248),
        ("setup_data", 0x250),
        ("pref_address", 0x258),
        ("init_size", 0x260),
        ("handover_offset", 0x264),
        ("kernel_info_offset", 0x268),
    ],
)
def test_setup_header_offsets(field, offset):
    assert getattr(SetupHeader, field).offset + 0x1F1 == offset


def test_fields_land_at_their_byte_offsets():
    params = BootParams()
    params.hdr.type_of_loader = 0xFF
    params.hdr.cmd_line_ptr = 0x12345678
    params.ext_ramdisk_image = 0x9
    raw = bytes(params)
    assert raw[0x210] == 0xFF
    assert raw[0x228:0x22C] == (0x12345678).to_bytes(4, "little")
    assert raw[0xC0:0xC4] == (9).to_bytes(4, "little")


def test_setup_header_from_short_and_long_bytes():
    raw = bytearray(0x7B)
    raw[0x206 - 0x1F1 : 0x208 - 0x1F1] = (0x20F).to_bytes(2, "little")
    assert setup_header_from_bytes(bytes(raw)).version == 0x20F
    # A longer header (newer protocol) is cut to what the zero page holds.
    assert setup_header_from_bytes(bytes(raw) + b"\xff" * 20).version == 0x20F
    # An older, shorter header leaves later fields zero.
    assert setup_header_from_bytes(bytes(raw[:0x10])).version == 0


def test_e820_round_trip_and_limit():
    params = BootParams()
    ranges = [MemoryRange(0, 0xA0000, E820_RAM), MemoryRange(0xA0000, 0x60000, E820_RESERVED)]
    fill_e820(params, ranges)
    raw = bytes(params)
    assert raw[0x1E8] == 2
    assert raw[0x2D0 + 20 + 16] == E820_RESERVED
    assert e820_from_params(params) == ranges
    with pytest.raises(BootError, match="at most 128"):
        fill_e820(BootParams(), [MemoryRange(i << 20, 1 << 20, E820_RAM) for i in range(129)])
