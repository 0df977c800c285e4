"""Synthetic kernel images for the image/ tests, built from scratch here.

- ``make_elf(...)``: an ELF32/ELF64 with PT_LOAD segments and a PT_NOTE of
  arbitrary notes (or raw note bytes, to build broken ones);
- ``make_bzimage(payload, ...)``: a minimal setup header (boot.rst layout)
  around an already compressed payload, optionally with a PE "MZ" header;
- ``compress_cli(codec, data)``: the codec's own CLI, options as Linux's
  scripts/Makefile.lib, plus Linux's 4-byte size trailer.

The builders are fixtures (test modules cannot import a shared module here).
Tests take the root helpers from ``pvhtest`` (tests/pvhtest.py), not from a
``conftest`` module, so this file re-exports none of them.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from pvhtest import run_cli

# ---------------------------------------------------------------- ELF ----

PT_LOAD, PT_NOTE = 1, 4
EM_X86_64, EM_386 = 62, 3
KERNEL_VBASE = 0xFFFFFFFF80000000  # x86-64 __START_KERNEL_map
PVH_ENTRY = 0x1000850


def note_bytes(owner: str | bytes, ntype: int, desc: bytes, *, namesz: int | None = None,
               descsz: int | None = None) -> bytes:
    """One note, name and descriptor each padded to 4 bytes; sizes can be forged."""
    name = owner.encode() + b"\0" if isinstance(owner, str) else owner
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return (struct.pack("<III", len(name) if namesz is None else namesz,
                        len(desc) if descsz is None else descsz, ntype)
            + pad(name) + pad(desc))


def build_elf(*, bits: int = 64, machine: int | None = None, entry: int | None = None,
              loads: list[tuple[int, int, bytes, int]] | None = None,
              notes: list[tuple[str, int, bytes]] | None = None,
              raw_notes: bytes | None = None, note_align: int = 4,
              phnum: int | None = None, phoff: int | None = None,
              phentsize: int | None = None, endian: int = 1) -> bytes:
    """An ELF image. ``loads``: (paddr, vaddr, data, memsz); notes go in one PT_NOTE."""
    if machine is None:
        machine = EM_X86_64 if bits == 64 else EM_386
    if loads is None:
        loads = [(0x1000000, KERNEL_VBASE + 0x1000000, b"\x90" * 0x1000, 0x2000)]
    if entry is None:
        entry = loads[0][0] if loads else 0
    note_data = raw_notes if raw_notes is not None else b"".join(
        note_bytes(o, t, d) for o, t, d in (notes or []))
    has_notes = raw_notes is not None or notes is not None
    ehsize, phsz = (64, 56) if bits == 64 else (52, 32)
    nph = len(loads) + (1 if has_notes else 0)
    data_at = ehsize + nph * phsz
    body = bytearray()
    phdrs = []
    note_off = data_at
    body += note_data
    body += b"\0" * (-len(body) % 16)
    for paddr, vaddr, seg, memsz in loads:
        off = data_at + len(body)
        phdrs.append((PT_LOAD, 5, off, vaddr, paddr, len(seg), memsz, 0x1000))
        body += seg + b"\0" * (-len(seg) % 16)
    if has_notes:
        phdrs.append((PT_NOTE, 4, note_off, 0, 0, len(note_data), len(note_data), note_align))
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, endian, 1]) + b"\0" * 9
    fields = (ident, 2, machine, 1, entry,
              ehsize if phoff is None else phoff, 0, 0, ehsize,
              phsz if phentsize is None else phentsize,
              nph if phnum is None else phnum, 0, 0, 0)
    if bits == 64:
        out = bytearray(struct.pack("<16sHHIQQQIHHHHHH", *fields))
        for t, fl, off, va, pa, fs, ms, al in phdrs:
            out += struct.pack("<IIQQQQQQ", t, fl, off, va, pa, fs, ms, al)
    else:
        out = bytearray(struct.pack("<16sHHIIIIIHHHHHH", *fields))
        for t, fl, off, va, pa, fs, ms, al in phdrs:
            out += struct.pack("<IIIIIIII", t, off, va & 0xFFFFFFFF, pa, fs, ms, fl, al)
    out += body
    return bytes(out)


def pvh_kernel_elf(*, pvh_desc: bytes | None = struct.pack("<Q", PVH_ENTRY),
                   config: bytes | None = None, size: int = 0x4000) -> bytes:
    """A small 'vmlinux' with the Xen notes a PVH kernel has (and optionally IKCONFIG)."""
    notes = [("Xen", 6, b"linux\0"), ("Xen", 1, struct.pack("<Q", KERNEL_VBASE + 0x3000000)),
             ("GNU", 3, bytes(range(20))), ("Linux", 0x100, b"6.1.0-test\0")]
    if pvh_desc is not None:
        notes.append(("Xen", 18, pvh_desc))
    text = bytearray(b"Linux version 6.1.0-test (t@t) #1 SMP\n\0")
    if config is not None:
        import gzip

        text += b"IKCFG_ST" + gzip.compress(config, mtime=0) + b"IKCFG_ED"
    text += bytes((i * 7) & 0xFF for i in range(size - len(text)))
    return build_elf(loads=[(0x1000000, KERNEL_VBASE + 0x1000000, bytes(text), size * 2)],
                     notes=notes)


# ---------------------------------------------------------- bzImage ----

HEADER_END = 0x26C  # through kernel_info_offset (protocol 2.15)


def build_bzimage(payload: bytes, *, setup_sects: int = 4, protocol: int = 0x20F,
                  version: bytes | None = b"6.1.0-test (t@t) #1 SMP",
                  loadflags: int = 0x01, xloadflags: int = 0x0F, pref_address: int = 0x1000000,
                  init_size: int = 0x3000000, relocatable: int = 1, handover: int = 0x190,
                  pe: bool = False, payload_offset: int | None = None,
                  payload_length: int | None = None, hdrs: bytes = b"HdrS",
                  setup_fill: bytes = b"") -> bytes:
    """A bzImage-shaped file: boot sector + setup + 0x400 bytes of 'decompressor' + payload."""
    real_sects = setup_sects or 4
    setup = bytearray((real_sects + 1) * 512)
    if pe:
        setup[0:2] = b"MZ"
        struct.pack_into("<I", setup, 0x3C, 0x40)
        setup[0x40:0x44] = b"PE\0\0"
        struct.pack_into("<HHIIIHH", setup, 0x44, 0x8664, 2, 0, 0, 0, 0xF0, 0x206)
        struct.pack_into("<HBBIIII", setup, 0x58, 0x20B, 2, 20, 0x1000, 0, 0, 0x2000)
        struct.pack_into("<H", setup, 0x58 + 68, 10)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = HEADER_END - 0x202
    setup[0x202:0x206] = hdrs
    struct.pack_into("<H", setup, 0x206, protocol)
    if version is not None:
        setup[0x300 : 0x300 + len(version) + 1] = version + b"\0"
        struct.pack_into("<H", setup, 0x20E, 0x100)
    setup[0x400 : 0x400 + len(setup_fill)] = setup_fill
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)
    pm = bytearray(b"\xf4" * 0x400) + payload
    pm += b"\0" * (-len(pm) % 16)
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16)
    struct.pack_into("<I", setup, 0x248, 0x400 if payload_offset is None else payload_offset)
    struct.pack_into("<I", setup, 0x24C, len(payload) if payload_length is None
                     else payload_length)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    struct.pack_into("<I", setup, 0x264, handover)
    return bytes(setup + pm)


# -------------------------------------------------------------- codecs ----

# codec -> (compressor command, decompressor command), options as Linux's Makefile.lib
CODEC_CLI = {
    "gzip": (["gzip", "-n", "-9", "-c"], ["gzip", "-dc"]),
    "bzip2": (["bzip2", "-9", "-c"], ["bzip2", "-dc"]),
    "lzma": (["lzma", "-9", "-c"], ["lzma", "-dc"]),
    "xz": (["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB", "-c"], ["xz", "-dc"]),
    "lzo": (["lzop", "-9", "-c"], ["lzop", "-dc"]),
    "lz4": (["lz4", "-l", "-9", "-c"], ["lz4", "-dc"]),
    "zstd": (["zstd", "-19", "-q", "-c"], ["zstd", "-dcq"]),
}
CODECS = tuple(CODEC_CLI)


def have_cli(codec: str) -> bool:
    return shutil.which(CODEC_CLI[codec][0][0]) is not None


def compress_cli(codec: str, data: bytes, *, size_trailer: bool = True) -> bytes:
    if not have_cli(codec):
        pytest.skip(f"{CODEC_CLI[codec][0][0]} is not installed (scripts/setup installs it)")
    out = subprocess.run(CODEC_CLI[codec][0], input=data, capture_output=True, check=True).stdout
    return out + (struct.pack("<I", len(data)) if size_trailer else b"")


def decompress_cli(codec: str, data: bytes) -> bytes:
    """What the stock CLI prints for ``data`` (it may warn about the trailer: ignored)."""
    proc = subprocess.run(CODEC_CLI[codec][1], input=data, capture_output=True, check=False)
    return proc.stdout


# ------------------------------------------------------------- fuzzing ----


def apply_mutation(data: bytes, mutation) -> bytes:
    """``data`` with a hypothesis mutation applied: (patches, cut fraction or None, tail).

    Patches are (offset, bytes), the offset taken modulo the length; the cut
    truncates to that fraction of the length; the tail is appended.
    """
    patches, cut, tail = mutation
    buf = bytearray(data)
    for off, chunk in patches:
        off %= len(buf)
        buf[off : off + len(chunk)] = chunk
    if cut is not None:
        del buf[int(len(buf) * cut):]
    return bytes(buf) + tail


@pytest.fixture(scope="session")
def mutate():
    """apply_mutation, for the fuzz tests (shared by test_parsers_fuzz and test_stream_fuzz)."""
    return apply_mutation


@pytest.fixture(scope="session")
def make_elf():
    return build_elf


@pytest.fixture(scope="session")
def make_bzimage():
    return build_bzimage


@pytest.fixture(scope="session")
def make_note():
    return note_bytes


@pytest.fixture(scope="session")
def make_pvh_elf():
    return pvh_kernel_elf


@pytest.fixture(scope="session")
def codec_cli():
    """(compress, decompress) with each codec's own CLI."""
    return compress_cli, decompress_cli


@pytest.fixture(scope="session")
def cli():
    """run_cli from tests/conftest.py: ``python -m pvhboot ARGS``."""
    return run_cli


_payload_cache: dict = {}


@pytest.fixture(scope="session")
def codec_bzimage():
    """``codec_bzimage(codec)`` -> (bzImage bytes, payload ELF bytes), cached per codec."""

    def make(codec: str, *, pe: bool = False, config: bytes | None = None):
        key = (codec, pe, config)
        if key not in _payload_cache:
            elf = pvh_kernel_elf(config=config)
            _payload_cache[key] = (build_bzimage(compress_cli(codec, elf), pe=pe), elf)
        return _payload_cache[key]

    return make
