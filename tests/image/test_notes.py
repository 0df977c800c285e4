"""ELF notes in every shape: 4/8-byte PVH descriptors, odd p_align, missing, truncated, forged sizes."""

from __future__ import annotations

import io
import struct

import pytest

from pvhboot.errors import ImageError
from pvhboot.image.elf import parse_elf
from pvhboot.image.notes import (
    XEN_ELFNOTE_PHYS32_ENTRY,
    note_type_name,
    parse_notes,
    pvh_entry_from_notes,
)


@pytest.mark.parametrize(
    "desc, expected",
    [
        (struct.pack("<I", 0x1000850), 0x1000850),
        (struct.pack("<Q", 0x1000850), 0x1000850),
        # The entry is the low 32 bits; high bits of an 8-byte descriptor are ignored.
        (struct.pack("<Q", 0xABCD_0000_0100_0850), 0x0100_0850),
    ],
)
def test_pvh_entry_from_4_and_8_byte_descriptors(make_elf, desc, expected):
    elf = parse_elf(make_elf(notes=[("Xen", 6, b"linux\0"), ("Xen", 18, desc)]))
    assert elf.pvh_entry == expected


@pytest.mark.parametrize("p_align", [1, 4, 8, 16, 0])
def test_notes_are_walked_with_4_byte_padding_whatever_p_align_says(make_elf, p_align):
    # 5-byte owner, 3- and 6-byte descriptors: padding differs between 4 and 8.
    notes = [("Linux", 0x100, b"abc"), ("GNUxx", 7, b"123456"), ("Xen", 18, b"\x50\x08\0\1")]
    elf = parse_elf(make_elf(notes=notes, note_align=p_align))
    assert [(n.owner, n.type, n.desc) for n in elf.notes] == notes
    assert elf.pvh_entry == 0x1000850


def test_missing_pvh_note(make_elf):
    elf = parse_elf(make_elf(notes=[("Xen", 6, b"linux\0")]))
    assert elf.pvh_entry is None
    elf = parse_elf(make_elf())  # no PT_NOTE at all
    assert elf.notes == [] and elf.pvh_entry is None


def test_type_18_of_another_owner_is_not_pvh(make_elf):
    elf = parse_elf(make_elf(notes=[("GNU", 18, struct.pack("<I", 0x1234)),
                                    ("Xenx", 18, struct.pack("<I", 0x1234))]))
    assert elf.pvh_entry is None


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_short_pvh_descriptor_is_invalid(make_elf, size):
    with pytest.raises(ImageError, match="invalid PVH note"):
        parse_elf(make_elf(notes=[("Xen", 18, b"\x01" * size)]))


def test_type_names_depend_on_the_owner():
    assert note_type_name("Xen", 1) == "XEN_ELFNOTE_ENTRY"
    assert note_type_name("GNU", 1) == "NT_GNU_ABI_TAG"
    assert note_type_name("Xen", XEN_ELFNOTE_PHYS32_ENTRY) == "XEN_ELFNOTE_PHYS32_ENTRY"
    assert note_type_name("GNU", 3) == "NT_GNU_BUILD_ID"
    assert note_type_name("GNU", 5) == "NT_GNU_PROPERTY_TYPE_0"
    assert note_type_name("Linux", 0x100) == "LINUX_ELFNOTE_BUILD_SALT"
    assert note_type_name("Nobody", 1) is None
    assert note_type_name("Xen", 99) is None


def test_xen_pv_entry(make_elf):
    elf = parse_elf(make_elf(notes=[("Xen", 1, struct.pack("<Q", 0xFFFFFFFF83000000))]))
    assert elf.xen_pv_entry == 0xFFFFFFFF83000000
    assert elf.notes[0].type_name == "XEN_ELFNOTE_ENTRY"


@pytest.mark.parametrize(
    "fields",
    [
        {"namesz": 1 << 31},
        {"descsz": 1 << 31},
        {"descsz": 0xFFFFFFFF},
        {"namesz": 64},
        {"descsz": 20},
    ],
)
def test_note_sizes_overflowing_the_segment(make_elf, make_note, fields):
    raw = make_note("Xen", 18, struct.pack("<I", 0x1000850), **fields)
    with pytest.raises(ImageError, match="overflows") as exc:
        parse_elf(make_elf(raw_notes=raw))
    assert "\n" not in str(exc.value)


def test_truncated_note_area(make_elf, make_note):
    raw = make_note("Xen", 6, b"linux\0") + make_note("Xen", 18, struct.pack("<I", 1))
    with pytest.raises(ImageError):
        parse_elf(make_elf(raw_notes=raw[:-2]))
    # Fewer bytes than a note header at the end are padding, not a note.
    elf = parse_elf(make_elf(raw_notes=raw + b"\0" * 8))
    assert elf.pvh_entry == 1


def test_note_area_outside_the_buffer():
    with pytest.raises(ImageError, match="outside"):
        parse_notes(b"\0" * 16, 8, 64)


def test_pvh_entry_matches_pyelftools_raw_note(make_pvh_elf):
    elftools = pytest.importorskip("elftools.elf.elffile")
    data = make_pvh_elf()
    theirs = elftools.ELFFile(io.BytesIO(data))
    raw = []
    for seg in theirs.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            # pyelftools labels Xen types with GNU names: compare the raw number only.
            raw += [(n["n_name"], n["n_descdata"]) for n in seg.iter_notes()
                    if n["n_name"] == "Xen" and _raw_type(n) == 18]
    (name, desc), = raw
    assert pvh_entry_from_notes(parse_elf(data).notes) == int.from_bytes(
        desc[:4] if isinstance(desc, bytes) else desc.encode("latin-1")[:4], "little")


def _raw_type(note) -> int:
    t = note["n_type"]
    if isinstance(t, int):
        return t
    from elftools.elf.enums import ENUM_NOTE_N_TYPE

    return ENUM_NOTE_N_TYPE.get(t, -1)


def test_notes_from_sht_note_sections_without_pt_note(make_elf, make_note):
    # An ELF with no PT_NOTE (e.g. a relinked object) still has its SHT_NOTE sections read.
    data = bytearray(make_elf())
    note = make_note("Xen", 18, struct.pack("<I", 0x1000850))
    note_at = len(data)
    data += note
    shoff = len(data)
    data += bytes(64)  # SHT_NULL
    data += struct.pack("<IIQQQQIIQQ", 0, 7, 0, 0, note_at, len(note), 0, 0, 4, 0)
    struct.pack_into("<Q", data, 0x28, shoff)  # e_shoff
    struct.pack_into("<HHH", data, 0x3A, 64, 2, 0)  # e_shentsize, e_shnum, e_shstrndx
    elf = parse_elf(bytes(data))
    assert elf.pvh_entry == 0x1000850
    struct.pack_into("<H", data, 0x3C, 5000)  # absurd e_shnum
    with pytest.raises(ImageError, match="section header"):
        parse_elf(bytes(data))
