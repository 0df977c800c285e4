"""open_image: format detection, entry points, payload facts and the JSON schema."""

from __future__ import annotations

import io
import json
import struct

import pytest

from pvhboot.errors import ImageError
from pvhboot.image.kernel import SCHEMA_VERSION, image_from_buffer, open_image

CODECS = ["gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd"]
PVH = 0x1000850
TOP_KEYS = {"schema_version", "path", "format", "compression", "boot_protocol", "kernel_version",
            "entry_points", "pvh_capable", "config_embedded", "load_segments", "notes", "bzimage"}


@pytest.mark.parametrize("codec", CODECS)
def test_bzimage_with_each_codec(codec_bzimage, tmp_path, codec):
    data, elf = codec_bzimage(codec)
    path = tmp_path / "bzImage"
    path.write_bytes(data)
    img = open_image(path)
    assert img.format == "bzimage"
    assert img.compression == codec
    assert img.bzimage.protocol_str == "2.15"
    assert img.kernel_version == "6.1.0-test (t@t) #1 SMP"
    assert img.kernel_release == "6.1.0-test"
    assert img.pvh_capable is True
    ep = img.entry_points
    assert ep.pvh == PVH
    assert ep.linux64 == 0x1000000 + 0x200
    assert ep.xen_pv == 0xFFFFFFFF83000000
    assert ep.efi_handover == 0x190 and ep.efi_pe is False
    assert img.payload_size == len(elf)
    assert [(s.paddr, s.filesz, s.memsz) for s in img.elf.load_segments] == [
        (0x1000000, 0x4000, 0x8000)]


def test_pe_bzimage(codec_bzimage):
    data, _ = codec_bzimage("gzip", pe=True)
    img = image_from_buffer(data)
    assert img.format == "bzimage" and img.entry_points.efi_pe is True
    assert img.pe.machine_name == "x86-64" and img.pe.subsystem_name == "EFI_APPLICATION"


def test_headers_only(codec_bzimage):
    data, _ = codec_bzimage("xz")
    img = image_from_buffer(data, load_payload=False)
    assert img.compression == "xz" and img.elf is None
    assert img.pvh_capable is None and img.entry_points.pvh is None
    assert img.entry_points.linux64 == 0x1000200


def test_plain_elf(make_pvh_elf):
    img = image_from_buffer(make_pvh_elf(), "vmlinux")
    assert img.format == "elf" and img.compression is None
    assert img.entry_points.pvh == PVH and img.entry_points.linux64 == 0x1000000
    assert img.kernel_version == "6.1.0-test (t@t) #1 SMP"
    assert img.pvh_capable is True and img.bzimage is None


def test_elf_without_pvh_note(make_elf):
    img = image_from_buffer(make_elf(notes=[("Xen", 6, b"linux\0")]))
    assert img.pvh_capable is False and img.entry_points.pvh is None


def test_elf32_has_no_linux64_entry(make_elf):
    img = image_from_buffer(make_elf(bits=32, loads=[(0x100000, 0xC0100000, b"x" * 64, 64)]))
    assert img.entry_points.linux64 is None


@pytest.mark.parametrize("codec", ["gzip", "xz", "zstd"])
def test_compressed_elf(codec_cli, make_pvh_elf, codec):
    compress, _ = codec_cli
    elf = make_pvh_elf()
    img = image_from_buffer(compress(codec, elf, size_trailer=False), "vmlinux.gz")
    assert img.format == "compressed-elf" and img.compression == codec
    assert img.entry_points.pvh == PVH and img.pvh_capable is True
    assert img.payload_size == len(elf)
    lazy = image_from_buffer(compress(codec, elf, size_trailer=False), load_payload=False)
    assert lazy.format == "compressed-elf" and lazy.elf is None and lazy.pvh_capable is None


def test_compressed_non_elf_is_an_error(codec_cli):
    compress, _ = codec_cli
    with pytest.raises(ImageError, match="not .*ELF"):
        image_from_buffer(compress("gzip", b"hello world" * 100))


def test_plain_pe():
    pe = bytearray(0x400)
    pe[0:2] = b"MZ"
    struct.pack_into("<I", pe, 0x3C, 0x80)
    pe[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", pe, 0x84, 0x8664, 1, 0, 0, 0, 0xF0, 0x22)
    struct.pack_into("<HBBIIII", pe, 0x98, 0x20B, 1, 0, 0, 0, 0, 0x1234)
    struct.pack_into("<H", pe, 0x98 + 68, 10)
    img = image_from_buffer(bytes(pe))
    assert img.format == "pe" and img.entry_points.efi_pe is True
    assert img.pe.entry_rva == 0x1234 and img.pvh_capable is False


@pytest.mark.parametrize("data", [b"", b"hello", b"\0" * 4096, b"MZ" + b"\0" * 100])
def test_not_a_kernel(data):
    with pytest.raises(ImageError):
        image_from_buffer(data)


def test_unknown_payload_codec(make_bzimage):
    data = make_bzimage(b"\x00\x11\x22\x33" * 16)
    with pytest.raises(ImageError, match="no codec"):
        image_from_buffer(data)
    assert image_from_buffer(data, load_payload=False).compression is None


def test_corrupt_payload_stream(codec_bzimage):
    data, _ = codec_bzimage("xz")
    bad = bytearray(data)
    mid = len(bad) - 200
    bad[mid : mid + 64] = b"\xa5" * 64
    with pytest.raises(ImageError):
        image_from_buffer(bytes(bad))


def test_payload_that_is_not_elf(make_bzimage, codec_cli):
    compress, _ = codec_cli
    with pytest.raises(ImageError, match="not .*ELF|does not decompress to an ELF"):
        image_from_buffer(make_bzimage(compress("gzip", b"\0" * 1000)))


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        open_image(path)


def test_json_schema(codec_bzimage):
    data, _ = codec_bzimage("lz4", pe=True)
    doc = image_from_buffer(data, "bzImage").to_json()
    json.dumps(doc)  # plain JSON types only
    assert TOP_KEYS <= set(doc)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["format"] == "bzimage" and doc["compression"] == "lz4"
    assert doc["boot_protocol"] == "2.15"
    assert doc["entry_points"] == {"pvh": PVH, "linux64": 0x1000200,
                                   "xen_pv": 0xFFFFFFFF83000000, "efi_handover": 0x190,
                                   "efi_pe": True}
    assert doc["pvh_capable"] is True and doc["config_embedded"] is False
    assert [{k: s[k] for k in ("paddr", "filesz", "memsz")} for s in doc["load_segments"]] == [
        {"paddr": 0x1000000, "filesz": 0x4000, "memsz": 0x8000}]
    pvh = [n for n in doc["notes"] if n["owner"] == "Xen" and n["type"] == 18]
    assert pvh == [{"owner": "Xen", "type": 18, "type_name": "XEN_ELFNOTE_PHYS32_ENTRY",
                    "desc": struct.pack("<Q", PVH).hex()}]
    bz = doc["bzimage"]
    assert bz["loadflags"] == ["LOADED_HIGH"]
    assert bz["xloadflags"] == ["XLF_KERNEL_64", "XLF_CAN_BE_LOADED_ABOVE_4G",
                                "XLF_EFI_HANDOVER_32", "XLF_EFI_HANDOVER_64"]
    assert bz["relocatable"] is True and bz["payload_length"] > 0
    assert data[bz["payload_offset"] : bz["payload_offset"] + 4] == b"\x02\x21\x4c\x18"


def test_json_for_elf_has_null_bzimage(make_pvh_elf):
    doc = image_from_buffer(make_pvh_elf()).to_json()
    assert doc["bzimage"] is None and doc["boot_protocol"] is None
    assert doc["entry_points"]["efi_pe"] is False


# ------------------------------------------------------ real kernels ----

def _pyelftools_facts(elf_bytes: bytes):
    elffile = pytest.importorskip("elftools.elf.elffile")
    f = elffile.ELFFile(io.BytesIO(elf_bytes))
    loads = [(s["p_paddr"], s["p_filesz"], s["p_memsz"]) for s in f.iter_segments()
             if s["p_type"] == "PT_LOAD"]
    pvh = None
    for seg in f.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        for n in seg.iter_notes():
            # pyelftools names Xen types with GNU names; compare the raw (owner, type).
            raw_type = n["n_type"]
            if not isinstance(raw_type, int):
                from elftools.elf.enums import ENUM_NOTE_N_TYPE

                raw_type = ENUM_NOTE_N_TYPE.get(raw_type, -1)
            if n["n_name"] == "Xen" and raw_type == 18:
                desc = n["n_descdata"]
                desc = desc if isinstance(desc, bytes) else desc.encode("latin-1")
                pvh = int.from_bytes(desc[:4], "little")
    return loads, pvh, f.header["e_entry"]


@pytest.mark.kernel
@pytest.mark.parametrize("fixture, codec", [("debian_cloud_kernel", "lz4"),
                                            ("debian_generic_kernel", "xz")])
def test_debian_kernels(request, fixture, codec):
    kernel = request.getfixturevalue(fixture)
    img = open_image(kernel.vmlinuz)
    assert img.format == "bzimage" and img.compression == codec
    assert img.bzimage.protocol_str == "2.15"
    assert img.entry_points.efi_pe is True
    assert img.kernel_release == kernel.vmlinuz.name.removeprefix("vmlinuz-")
    assert img.pvh_capable is True
    loads, pvh, entry = _pyelftools_facts(img._payload)
    assert img.entry_points.pvh == pvh and pvh is not None
    assert [(s.paddr, s.filesz, s.memsz) for s in img.elf.load_segments] == loads
    assert img.elf.entry == entry
    assert img.entry_points.linux64 == img.bzimage.pref_address + 0x200
    json.dumps(img.to_json())


@pytest.mark.parametrize("codec", ["xz", "zstd", "gzip"])
def test_corrupt_payload_from_a_file_is_the_codec_error(codec_bzimage, tmp_path, codec):
    # Read through an mmap: the codec's error must come out, not an mmap BufferError.
    data, _ = codec_bzimage(codec)
    bz = image_from_buffer(data, load_payload=False).bzimage
    bad = bytearray(data)
    mid = bz.payload_offset + bz.payload_length // 2
    bad[mid : mid + 64] = b"\x5a" * 64
    path = tmp_path / "bz"
    path.write_bytes(bytes(bad))
    with pytest.raises(ImageError, match=codec):
        open_image(path)


def test_non_elf_stream_is_refused_early(codec_cli, monkeypatch):
    # A big compressed file that is not an ELF is refused on its first output
    # chunk, not after being decompressed whole into memory.
    from pvhboot.image import compression

    compress, _ = codec_cli
    seen = []
    real = compression.decompress_to

    def spy(codec, src, out, *, max_output):
        seen.append(max_output)
        return real(codec, src, out, max_output=max_output)

    monkeypatch.setattr(compression, "decompress_to", spy)
    with pytest.raises(ImageError, match="does not decompress to an ELF"):
        image_from_buffer(compress("zstd", bytes(8 << 20), size_trailer=False))
    assert seen


@pytest.mark.kernel
def test_project_test_kernel(test_kernel):
    """The project's own build: bzImage facts agree with its vmlinux and its .config."""
    img = open_image(test_kernel.vmlinuz)
    assert img.format == "bzimage" and img.pvh_capable is True
    assert img.config_text() == test_kernel.config.read_text()
    loads, pvh, entry = _pyelftools_facts(test_kernel.vmlinux.read_bytes())
    assert img.entry_points.pvh == pvh
    assert [(s.paddr, s.memsz) for s in img.elf.load_segments] == [(p, m) for p, _, m in loads]
    elf = open_image(test_kernel.vmlinux)
    assert elf.format == "elf" and elf.entry_points.pvh == pvh
    assert elf.kernel_release == img.kernel_release


def test_pe_struct_sizes():
    import ctypes

    from pvhboot.image.pe import CoffFileHeader, OptionalHeaderStandard

    assert ctypes.sizeof(CoffFileHeader) == 20  # PE spec 3.3
    assert ctypes.sizeof(OptionalHeaderStandard) == 20  # 3.4.1, through AddressOfEntryPoint


def test_open_image_refuses_a_fifo_before_reading(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"fifo is a FIFO, not a kernel image file"):
        open_image(fifo)  # before the fix: blocked in open() forever


def test_open_image_refuses_a_device(tmp_path):
    with pytest.raises(ImageError, match=r"^/dev/zero is a character device"):
        open_image("/dev/zero", load_payload=False)


def test_no_payload_message_says_length_zero(make_bzimage):
    from pvhboot.image.kernel import payload_view

    img = image_from_buffer(make_bzimage(b"\x1f\x8b\x08" + bytes(60), payload_length=0),
                            "bz_paylen0")
    with pytest.raises(ImageError) as exc:
        payload_view(b"", img.bzimage, "bz_paylen0")
    msg = str(exc.value)
    assert "payload_length is 0" in msg and "2.15" in msg
    assert "2.08" not in msg  # 2.15 is later than 2.08: naming it contradicts itself


def test_old_protocol_no_payload_message(make_bzimage):
    from pvhboot.image.kernel import payload_view

    img = image_from_buffer(make_bzimage(b"\x1f\x8b\x08" + bytes(60), protocol=0x206), "old")
    assert img.bzimage.payload_length == 0 and img.warnings == []
    with pytest.raises(ImageError, match=r"boot protocol 2.06 predates 2.08"):
        payload_view(b"", img.bzimage, "old")


@pytest.mark.parametrize("wrapper", ["bzimage", "compressed-file"])
@pytest.mark.parametrize("codec", CODECS)
def test_non_elf_payload_stops_at_the_first_chunk(codec_cli, make_bzimage, tmp_path, codec,
                                                  wrapper, monkeypatch):
    """A payload that is not an ELF is refused after the decoder's first output chunk.

    16 MiB of zeros stands for a bomb: if the whole stream were decoded, the
    sink would see many chunks (every codec produces at most 8 MiB per chunk).
    """
    from pvhboot.image import compression

    compress, _ = codec_cli
    stream = compress(codec, bytes(16 << 20))
    path = tmp_path / f"zeros.{codec}"
    path.write_bytes(make_bzimage(stream) if wrapper == "bzimage" else stream)
    calls = []
    real_put = compression._Sink.put
    monkeypatch.setattr(compression._Sink, "put",
                        lambda self, chunk: (calls.append(len(chunk)), real_put(self, chunk)))
    with pytest.raises(ImageError, match="does not decompress to an ELF"):
        open_image(path)
    nonempty = [n for n in calls if n]
    assert len(nonempty) == 1, nonempty
