"""ELF reader: ELF32/ELF64 program headers, physical entry, and every way a header can lie."""

from __future__ import annotations

import io
import struct

import pytest

from pvhboot.errors import ImageError
from pvhboot.image.elf import PT_LOAD, PT_NOTE, START_KERNEL_MAP, parse_elf, physical_address

VBASE = START_KERNEL_MAP


def test_elf64_segments_and_entry(make_elf):
    data = make_elf(loads=[(0x1000000, VBASE + 0x1000000, b"A" * 100, 0x3000),
                           (0x2000000, VBASE + 0x2000000, b"B" * 50, 50)],
                    entry=VBASE + 0x1000010)
    elf = parse_elf(data)
    assert elf.elf_class == 64 and elf.machine == 62
    loads = elf.load_segments
    assert [(s.paddr, s.vaddr, s.filesz, s.memsz) for s in loads] == [
        (0x1000000, VBASE + 0x1000000, 100, 0x3000), (0x2000000, VBASE + 0x2000000, 50, 50)]
    assert data[loads[1].offset : loads[1].offset + 50] == b"B" * 50
    assert elf.entry == VBASE + 0x1000010
    # e_entry is virtual here: it maps through the PT_LOAD that holds it.
    assert elf.entry_paddr == 0x1000010
    assert elf.notes == [] and elf.pvh_entry is None and elf.xen_pv_entry is None


def test_elf32_is_read(make_elf):
    data = make_elf(bits=32, loads=[(0x100000, 0xC0100000, b"x" * 64, 0x1000)],
                    entry=0xC0100004, notes=[("Xen", 18, struct.pack("<I", 0x100040))])
    elf = parse_elf(data)
    assert elf.elf_class == 32 and elf.machine == 3
    (seg,) = elf.load_segments
    assert (seg.paddr, seg.vaddr, seg.filesz, seg.memsz) == (0x100000, 0xC0100000, 64, 0x1000)
    assert elf.entry_paddr == 0x100004
    assert elf.pvh_entry == 0x100040


def test_physical_entry_outside_segments_uses_kernel_map(make_elf):
    # An entry in the kernel's high half that no PT_LOAD covers still has a physical address.
    elf = parse_elf(make_elf(entry=VBASE + 0x1234000))
    assert elf.entry_paddr == 0x1234000
    assert physical_address(elf.segments, 0x1000000) == 0x1000000  # already physical


def test_segments_agree_with_pyelftools(make_pvh_elf):
    elftools = pytest.importorskip("elftools.elf.elffile")
    data = make_pvh_elf()
    ours = parse_elf(data)
    theirs = elftools.ELFFile(io.BytesIO(data))
    ref = [(s["p_type"], s["p_offset"], s["p_vaddr"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
           for s in theirs.iter_segments()]
    names = {"PT_LOAD": PT_LOAD, "PT_NOTE": PT_NOTE}
    ref = [(names[t], *rest) for t, *rest in ref]
    assert [(s.type, s.offset, s.vaddr, s.paddr, s.filesz, s.memsz) for s in ours.segments] == ref
    assert ours.entry == theirs.header["e_entry"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"phnum": 0xFFFF}, "PN_XNUM"),
        ({"phnum": 5000}, "outside"),
        ({"phoff": 1 << 40}, "outside"),
        ({"phoff": 8}, "outside"),
        ({"phentsize": 8}, "smaller than"),
        ({"endian": 2}, "big-endian"),
    ],
)
def test_absurd_headers_are_image_errors(make_elf, kwargs, message):
    with pytest.raises(ImageError, match=message) as exc:
        parse_elf(make_elf(**kwargs))
    assert "\n" not in str(exc.value)


def test_bad_ident(make_elf):
    data = bytearray(make_elf())
    data[4] = 7
    with pytest.raises(ImageError, match="ELF class"):
        parse_elf(bytes(data))
    with pytest.raises(ImageError, match="no ELF magic"):
        parse_elf(b"\x7fELG" + bytes(60))
    with pytest.raises(ImageError, match="truncated"):
        parse_elf(b"\x7fELF\x02\x01\x01")


@pytest.mark.parametrize("cut", [4, 20, 63, 64, 100, 150])
def test_truncated_elf_is_image_error(make_elf, cut):
    data = make_elf(loads=[(0x1000000, VBASE + 0x1000000, b"A" * 400, 400)])
    with pytest.raises(ImageError):
        parse_elf(data[:cut])


def test_segment_past_end_of_file(make_elf):
    data = make_elf(loads=[(0x1000000, VBASE + 0x1000000, b"A" * 400, 400)])
    with pytest.raises(ImageError, match="past the end"):
        parse_elf(data[:-100])


def test_filesz_larger_than_memsz(make_elf):
    with pytest.raises(ImageError, match="filesz"):
        parse_elf(make_elf(loads=[(0x1000000, VBASE + 0x1000000, b"A" * 64, 16)]))


def test_huge_segment_size_is_checked_before_use(make_elf):
    data = bytearray(make_elf())
    # PT_LOAD p_filesz (ELF64 phdr at 64: type flags offset vaddr paddr filesz ...)
    struct.pack_into("<Q", data, 64 + 32, 1 << 62)
    struct.pack_into("<Q", data, 64 + 40, 1 << 62)
    with pytest.raises(ImageError, match="past the end"):
        parse_elf(bytes(data))


def test_mmap_input(tmp_path, make_pvh_elf):
    import mmap

    from pvhboot.image.elf import read_elf_file

    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert parse_elf(mm).pvh_entry == 0x1000850
    assert read_elf_file(str(path)).pvh_entry == 0x1000850


def test_abi_struct_sizes():
    import ctypes

    from pvhboot.image import elf, notes

    # elf.h: the sizes e_ehsize, e_phentsize and e_shentsize carry in real files.
    assert ctypes.sizeof(elf.Elf32_Ehdr) == 52 and ctypes.sizeof(elf.Elf64_Ehdr) == 64
    assert ctypes.sizeof(elf.Elf32_Phdr) == 32 and ctypes.sizeof(elf.Elf64_Phdr) == 56
    assert ctypes.sizeof(elf.Elf32_Shdr) == 40 and ctypes.sizeof(elf.Elf64_Shdr) == 64
    assert ctypes.sizeof(notes.Elf_Nhdr) == 12
    assert elf.Elf64_Phdr.p_offset.offset == 8 and elf.Elf32_Phdr.p_flags.offset == 24
