"""bzImage setup header: fields, flags, payload location and codec, PE variant, bad headers."""

from __future__ import annotations

import pytest

from pvhboot.errors import ImageError
from pvhboot.image.bzimage import (
    XLF_EFI_HANDOVER_64,
    XLF_KERNEL_64,
    parse_bzimage,
)

PAYLOAD = b"\x1f\x8b\x08" + bytes(61)  # a gzip magic is enough for the header reader


def test_header_fields(make_bzimage):
    data = make_bzimage(PAYLOAD, setup_sects=7, loadflags=0x01 | 0x20 | 0x80, xloadflags=0x0B)
    bz = parse_bzimage(data)
    assert bz.protocol == 0x20F and bz.protocol_str == "2.15"
    assert bz.setup_sects == 7
    assert bz.pm_offset == 8 * 512
    assert bz.loadflag_names == ["LOADED_HIGH", "QUIET_FLAG", "CAN_USE_HEAP"]
    assert bz.xloadflag_names == ["XLF_KERNEL_64", "XLF_CAN_BE_LOADED_ABOVE_4G",
                                  "XLF_EFI_HANDOVER_64"]
    assert bz.pref_address == 0x1000000 and bz.init_size == 0x3000000
    assert bz.kernel_alignment == 0x200000 and bz.relocatable is True
    assert bz.cmdline_size == 2047 and bz.initrd_addr_max == 0x7FFFFFFF
    assert bz.handover_offset == 0x190
    assert bz.kernel_version == "6.1.0-test (t@t) #1 SMP"
    # payload_offset is stored relative to the protected-mode code; we report it absolute.
    assert bz.payload_offset == bz.pm_offset + 0x400
    assert bz.payload_length == len(PAYLOAD)
    assert data[bz.payload_offset : bz.payload_offset + 3] == b"\x1f\x8b\x08"
    assert bz.codec == "gzip"
    assert bz.setup_header == data[0x1F1 : 0x202 + data[0x201]]
    assert bz.pm_size == len(data) - bz.pm_offset
    assert bz.is_pe is False


def test_setup_sects_zero_means_four(make_bzimage):
    bz = parse_bzimage(make_bzimage(PAYLOAD, setup_sects=0))
    assert bz.setup_sects == 4 and bz.pm_offset == 5 * 512


def test_entry_points(make_bzimage):
    bz = parse_bzimage(make_bzimage(PAYLOAD, xloadflags=XLF_KERNEL_64 | XLF_EFI_HANDOVER_64))
    assert bz.load_address == 0x1000000  # relocatable: pref_address
    assert bz.linux64_entry == 0x1000200
    assert bz.efi_handover_offset == 0x190
    bz = parse_bzimage(make_bzimage(PAYLOAD, xloadflags=0, relocatable=0))
    assert bz.load_address == 0x100000  # not relocatable: code32_start
    assert bz.linux64_entry is None and bz.efi_handover_offset is None


def test_unknown_flag_bits_are_shown_not_dropped(make_bzimage):
    bz = parse_bzimage(make_bzimage(PAYLOAD, loadflags=0x01 | 0x04))
    assert bz.loadflag_names == ["LOADED_HIGH", "0x4"]


def test_pe_variant(make_bzimage):
    data = make_bzimage(PAYLOAD, pe=True)
    assert data[:2] == b"MZ"
    assert parse_bzimage(data).is_pe is True


def test_payload_outside_the_file(make_bzimage):
    with pytest.raises(ImageError, match="outside the") as exc:
        parse_bzimage(make_bzimage(PAYLOAD, payload_offset=1 << 30))
    assert "\n" not in str(exc.value)
    with pytest.raises(ImageError, match="outside the"):
        parse_bzimage(make_bzimage(PAYLOAD, payload_length=0xFFFFFFFF))


def test_wrong_magic_and_truncation(make_bzimage):
    with pytest.raises(ImageError, match="HdrS"):
        parse_bzimage(make_bzimage(PAYLOAD, hdrs=b"HdrX"))
    data = make_bzimage(PAYLOAD, setup_sects=30)
    with pytest.raises(ImageError, match="truncated|too short"):
        parse_bzimage(data[:0x1000])
    with pytest.raises(ImageError, match="too short"):
        parse_bzimage(data[:0x100])
    bad = bytearray(data)
    bad[0x1FE:0x200] = b"\0\0"
    with pytest.raises(ImageError, match="boot_flag"):
        parse_bzimage(bytes(bad))


def test_protected_mode_size_from_syssize(make_bzimage):
    data = make_bzimage(PAYLOAD)
    # Bytes after syssize*16 (a signature, say) are not kernel code.
    bz = parse_bzimage(data + b"SIG" * 100)
    assert bz.pm_size == len(data) - bz.pm_offset
    with pytest.raises(ImageError, match="truncated"):
        parse_bzimage(data[:-32])


def test_unknown_codec_is_reported_as_none(make_bzimage):
    assert parse_bzimage(make_bzimage(b"\x00\x11\x22\x33" * 8)).codec is None


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd"])
def test_codec_detected_at_payload_start(codec_bzimage, codec):
    data, _ = codec_bzimage(codec)
    assert parse_bzimage(data).codec == codec


def test_no_kernel_version_pointer(make_bzimage):
    assert parse_bzimage(make_bzimage(PAYLOAD, version=None)).kernel_version is None


def test_old_protocol_has_no_payload_fields(make_bzimage):
    bz = parse_bzimage(make_bzimage(PAYLOAD, protocol=0x206))
    assert bz.protocol_str == "2.06"
    assert bz.payload_length == 0 and bz.codec is None
    assert bz.pref_address == 0 and bz.xloadflags == 0 and bz.linux64_entry is None


@pytest.mark.kernel
@pytest.mark.parametrize("flavour, codec", [("cloud-amd64", "lz4"), ("amd64", "xz")])
def test_debian_kernel_header(flavour, codec, request):
    fixture = "debian_cloud_kernel" if flavour == "cloud-amd64" else "debian_generic_kernel"
    kernel = request.getfixturevalue(fixture)
    bz = parse_bzimage(kernel.vmlinuz.read_bytes())
    assert bz.protocol_str == "2.15"
    assert bz.codec == codec
    assert bz.is_pe
    assert bz.relocatable and bz.xloadflags & XLF_KERNEL_64
    assert bz.kernel_version.startswith(kernel.vmlinuz.name.removeprefix("vmlinuz-"))


def test_setup_header_struct_matches_boot_rst():
    import ctypes

    from pvhboot.image.bzimage import SetupHeader

    assert ctypes.sizeof(SetupHeader) == 0x26C - 0x1F1
    for name, offset in [("syssize", 0x1F4), ("boot_flag", 0x1FE), ("header", 0x202),
                         ("kernel_version", 0x20E), ("loadflags", 0x211),
                         ("code32_start", 0x214), ("initrd_addr_max", 0x22C),
                         ("relocatable_kernel", 0x234), ("xloadflags", 0x236),
                         ("payload_offset", 0x248), ("pref_address", 0x258),
                         ("init_size", 0x260), ("handover_offset", 0x264),
                         ("kernel_info_offset", 0x268)]:
        assert 0x1F1 + getattr(SetupHeader, name).offset == offset, name
