"""Helpers to build the fake bzImage probe: a real setup header (boot.rst) around the
64-bit code of probe.S, with the values the probe must find patched in.

The bzImage is assembled here byte by byte from boot.rst's field table,
independently of pvhboot's own zero-page code, so the probe checks our
loader against the spec rather than against itself.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pvhtest import requires_kvm, run_cli  # noqa: F401  (re-exported for the tests)

HERE = Path(__file__).resolve().parent
SECTOR = 512
SETUP_SECTS = 4  # real-mode setup: boot sector + 4 sectors
PM_OFFSET = (SETUP_SECTS + 1) * SECTOR

# boot.rst "The real-mode kernel header": (offset, struct format)
HDR = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}
HEADER_END = 0x26C  # protocol 2.15 ends after kernel_info_offset
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADED_HIGH = 1 << 0

EXPECTED_MAGIC = 0x45585054
EXPECTED_FMT = "<IIQQQQQ"  # magic, e820 count, zero page, load, init_size, ramdisk size, version
E820_SLOTS = 16
CMDLINE_MAX = 512

# The memory map pvhboot promises for 128 MiB (issue 3): RAM below 640 KiB,
# the ISA hole reserved, RAM from 1 MiB to the end.
MIB = 1 << 20
E820_128M = [(0, 0xA0000, 1), (0xA0000, 0x60000, 2), (0x100000, 127 * MIB, 1)]
ZERO_PAGE = 0x7000  # boot/layout.py ZERO_PAGE_ADDR


def initrd_pattern(size: int) -> bytes:
    """The content the probe expects at ramdisk_image: byte i = (7i + 3) & 0xff."""
    return bytes((7 * i + 3) & 0xFF for i in range(size))


@dataclass
class ProbeSpec:
    protocol: int = 0x20F
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    pref_address: int = 0x1000000
    init_size: int = 0x400000
    kernel_alignment: int = 0x200000
    relocatable: int = 1
    cmdline_size: int = 2047
    # What the probe must find:
    cmdline: str = ""
    e820: list = field(default_factory=lambda: list(E820_128M))
    zero_page: int = ZERO_PAGE
    ramdisk_size: int = 0
    # A gzip payload (an ELF without the PVH note) so --boot auto can look inside.
    payload: bytes | None = None


def small_elf_without_pvh() -> bytes:
    """The smallest ELF64 x86-64 file the payload check accepts (one PT_LOAD, no notes)."""
    code = b"\xf4" * 16
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, 1, 64, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, 0x1000000, 0x1000000, 16, 16, 0x1000)
    return ehdr + phdr + code


def assemble_probe(out: Path) -> bytes:
    """probe.S assembled with gcc and linked flat (position independent) with ld."""
    obj, elf, binary = out / "probe.o", out / "probe.elf", out / "probe.bin"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(HERE / "probe.S")], check=True)
    subprocess.run(
        ["ld", "-nostdlib", "-static", "-Ttext=0", "-e", "_start", "-o", str(elf), str(obj)],
        check=True,
    )
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(binary)], check=True)
    data = binary.read_bytes()
    assert struct.unpack_from("<I", data, 0x1000)[0] == EXPECTED_MAGIC
    return data


def build_bzimage(probe: bytes, spec: ProbeSpec) -> bytes:
    """Setup sectors with the header + the probe (+ payload) as protected-mode code."""
    pm = bytearray(probe)
    at = pm.find(struct.pack("<I", EXPECTED_MAGIC))
    assert at == 0x1000
    if len(spec.e820) > E820_SLOTS:
        raise ValueError("too many e820 entries for the probe")
    block = struct.pack(
        EXPECTED_FMT,
        EXPECTED_MAGIC,
        len(spec.e820),
        spec.zero_page,
        spec.pref_address,  # the probe expects the load address the spec implies
        spec.init_size,
        spec.ramdisk_size,
        spec.protocol,
    )
    block += b"".join(struct.pack("<QQI", *e) for e in spec.e820)
    block += bytes(20 * (E820_SLOTS - len(spec.e820)))
    cmd = spec.cmdline.encode() + b"\0"
    assert len(cmd) <= CMDLINE_MAX
    block += cmd
    pm[at : at + len(block)] = block

    payload_offset = payload_length = 0
    if spec.payload is not None:
        blob = gzip.compress(spec.payload, mtime=0)
        payload_offset, payload_length = len(pm), len(blob)
        pm += blob
    pm += bytes(-len(pm) % 16)

    setup = bytearray(PM_OFFSET)
    values = {
        "setup_sects": SETUP_SECTS,
        "syssize": len(pm) // 16,
        "boot_flag": 0xAA55,
        # jump: a short jmp over the header; its second byte gives the header's end.
        "jump": 0xEB | (HEADER_END - 0x202) << 8,
        "header": 0x53726448,  # "HdrS"
        "version": spec.protocol,
        "kernel_version": 0x600 - 0x200,  # string at 0x600, inside the setup sectors
        "loadflags": LOADED_HIGH,
        "code32_start": 0x100000,
        "initrd_addr_max": 0x7FFFFFFF,
        "kernel_alignment": spec.kernel_alignment,
        "relocatable_kernel": spec.relocatable,
        "xloadflags": spec.xloadflags,
        "cmdline_size": spec.cmdline_size,
        "payload_offset": payload_offset,
        "payload_length": payload_length,
        "pref_address": spec.pref_address,
        "init_size": spec.init_size,
    }
    for name, value in values.items():
        off, fmt = HDR[name]
        struct.pack_into("<" + fmt, setup, off, value)
    version = b"6.1.0-probe (pvhboot tests) #1\0"
    setup[0x600 : 0x600 + len(version)] = version
    return bytes(setup) + bytes(pm)
