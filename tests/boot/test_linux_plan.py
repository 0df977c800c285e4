"""Planning the Linux 64-bit boot protocol (boot.rst) without /dev/kvm."""

import struct
from dataclasses import dataclass

import pytest

from pvhboot.boot import layout
from pvhboot.boot.linux import plan_linux_bzimage, plan_linux_elf, zero_page_of
from pvhboot.boot.pagetables import PageTables, translate
from pvhboot.boot.plan import FileRange
from pvhboot.boot.zeropage import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    SetupHeader,
    e820_from_params,
)
from pvhboot.errors import BootError
from pvhboot.image.elf import parse_elf

MIB = 1 << 20
GIB = 1 << 30


@dataclass
class FakeBz:
    """The BzImageInfo fields the planner reads (the image helper's parser gives the same)."""

    protocol: int = 0x20F
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    pref_address: int = 0x1000000
    init_size: int = 0x1800000
    kernel_alignment: int = 0x200000
    relocatable: bool = True
    cmdline_size: int = 2047
    initrd_addr_max: int = 0x7FFFFFFF
    pm_offset: int = 0x4000
    pm_size: int = 0x300000
    setup_header: bytes = b""

    @property
    def protocol_str(self):
        return f"{self.protocol >> 8}.{self.protocol & 0xFF:02d}"

    def __post_init__(self):
        if not self.setup_header:
            h = SetupHeader()
            h.setup_sects = 31
            h.boot_flag = BOOT_FLAG_MAGIC
            h.header = HDRS_MAGIC
            h.version = self.protocol
            h.xloadflags = self.xloadflags
            h.pref_address = self.pref_address
            h.init_size = self.init_size
            h.kernel_alignment = self.kernel_alignment
            h.cmdline_size = self.cmdline_size
            h.initrd_addr_max = self.initrd_addr_max
            h.loadflags = 0x01
            self.setup_header = bytes(h)


def _tables(plan) -> PageTables:
    chunk = next(c for c in plan.chunks if c.label == "page tables")
    return PageTables(chunk.addr, chunk.source, 0)


def _chunk(plan, label):
    return next(c for c in plan.chunks if c.label == label)


@pytest.fixture
def initrd(tmp_path):
    path = tmp_path / "initrd.img"
    path.write_bytes(bytes(range(256)) * 40)
    return str(path)


def test_bzimage_plan_zero_page_and_cpu(initrd):
    bz = FakeBz()
    plan = plan_linux_bzimage(
        bz, "/k/bzImage", initrd=initrd, cmdline="console=ttyS0 hello", memory_size=128 * MIB
    )
    assert plan.protocol == "linux64"
    kernel = _chunk(plan, "kernel")
    assert kernel.addr == 0x1000000
    assert kernel.source == FileRange("/k/bzImage", 0x4000, 0x300000)

    zp = zero_page_of(plan)
    assert zp.hdr.type_of_loader == 0xFF
    assert zp.hdr.loadflags & LOADED_HIGH
    assert zp.hdr.header == HDRS_MAGIC  # copied from the image
    assert zp.hdr.init_size == bz.init_size
    cmd = _chunk(plan, "command line")
    assert zp.hdr.cmd_line_ptr == cmd.addr and zp.ext_cmd_line_ptr == 0
    assert cmd.source == b"console=ttyS0 hello\0"
    rd = _chunk(plan, "initrd")
    assert (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size) == (rd.addr, 10240)
    assert zp.ext_ramdisk_image == 0 and zp.ext_ramdisk_size == 0
    # One source of truth: PVH's memory map, unchanged.
    assert e820_from_params(zp) == layout.memory_map(128 * MIB) == plan.memory_map
    assert zp.acpi_rsdp_addr == 0

    cpu = plan.cpu
    assert cpu.rip == 0x1000000 + 0x200
    assert cpu.rsi == _chunk(plan, "zero page").addr
    assert cpu.cs.selector == 0x10 and cpu.cs.l == 1 and cpu.cs.db == 0
    assert cpu.ds.selector == cpu.es.selector == cpu.ss.selector == 0x18
    assert cpu.rflags == 0x2
    assert cpu.cr0 & (1 << 31) and cpu.cr0 & 1 and cpu.cr4 & (1 << 5)
    assert cpu.efer & (1 << 8) and cpu.efer & (1 << 10)
    assert cpu.cr3 == _chunk(plan, "page tables").addr
    gdt = _chunk(plan, "GDT")
    assert cpu.gdt_base == gdt.addr and cpu.gdt_limit == len(gdt.source) - 1
    # The GDT's 0x10 descriptor is 64-bit code (L=1), 0x18 is writable data.
    code = struct.unpack_from("<Q", gdt.source, 0x10)[0]
    data = struct.unpack_from("<Q", gdt.source, 0x18)[0]
    assert code >> 53 & 1 and (code >> 40) & 0x1F == 0x1B
    assert (data >> 40) & 0x1F == 0x13


def test_identity_map_covers_everything_the_kernel_needs(initrd):
    bz = FakeBz()
    plan = plan_linux_bzimage(bz, "/k", initrd=initrd, cmdline="x", memory_size=128 * MIB)
    tables = _tables(plan)
    zp = zero_page_of(plan)
    needed = [
        (0x1000000, bz.init_size),
        (plan.cpu.rsi, 4096),
        (zp.hdr.cmd_line_ptr, 2),
        (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size),
        (plan.cpu.gdt_base, plan.cpu.gdt_limit + 1),
        (plan.cpu.cr3, len(tables.data)),
    ]
    for addr, size in needed:
        for probe in {addr, addr + size - 1, addr + size // 2, (addr + 0x1FFFFF) & ~0x1FFFFF}:
            if probe < addr + size:
                assert translate(tables, probe) == probe, hex(probe)
    assert translate(tables, 4 * GIB - 1) == 4 * GIB - 1
    assert translate(tables, 4 * GIB) is None


def test_nothing_inside_the_init_size_window(initrd):
    bz = FakeBz(init_size=100 * MIB)
    plan = plan_linux_bzimage(bz, "/k", initrd=initrd, cmdline="", memory_size=128 * MIB)
    window = (0x1000000, 0x1000000 + 100 * MIB)
    for c in plan.chunks:
        if c.label != "kernel":
            assert c.end <= window[0] or c.addr >= window[1], c.label


def test_initrd_cannot_fit_beside_a_huge_window(tmp_path):
    # 1 MiB free below the window and 1 MiB above it: a 2 MiB initrd fits in neither,
    # and the planner must refuse rather than put it inside the window.
    rd = tmp_path / "rd"
    with open(rd, "wb") as f:
        f.truncate(2 * MIB)
    bz = FakeBz(pref_address=2 * MIB, init_size=125 * MIB)
    with pytest.raises(BootError, match=r"initrd \(2 MiB\) does not fit"):
        plan_linux_bzimage(bz, "/k", initrd=str(rd), cmdline="", memory_size=128 * MIB)
    # 1 MiB fits, outside the window.
    with open(rd, "wb") as f:
        f.truncate(MIB)
    plan = plan_linux_bzimage(bz, "/k", initrd=str(rd), cmdline="", memory_size=128 * MIB)
    placed = _chunk(plan, "initrd")
    assert placed.end <= 2 * MIB or placed.addr >= 127 * MIB


def test_kernel_window_beyond_ram():
    with pytest.raises(BootError, match=r"kernel \(init_size window\).*--memory"):
        plan_linux_bzimage(FakeBz(init_size=200 * MIB), "/k", cmdline="", memory_size=128 * MIB)


def test_too_big_initrd(tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(200 * MIB)  # sparse
    with pytest.raises(BootError, match="initrd .* does not fit"):
        plan_linux_bzimage(FakeBz(), "/k", initrd=str(big), cmdline="", memory_size=128 * MIB)


def test_initrd_respects_initrd_addr_max(initrd):
    bz = FakeBz(initrd_addr_max=0x37FFFFF)  # below 56 MiB
    plan = plan_linux_bzimage(bz, "/k", initrd=initrd, cmdline="", memory_size=128 * MIB)
    rd = _chunk(plan, "initrd")
    assert rd.end <= 0x3800000
    assert rd.addr >= 0x1000000 + bz.init_size


def test_initrd_above_4g_uses_ext_fields(tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(2 * GIB + MIB)  # cannot fit below initrd_addr_max (2 GiB)
    plan = plan_linux_bzimage(FakeBz(), "/k", initrd=str(big), cmdline="", memory_size=6 * GIB)
    zp = zero_page_of(plan)
    assert zp.ext_ramdisk_image == 1 and zp.hdr.ramdisk_image == 0
    assert zp.ext_ramdisk_size == 0 and zp.hdr.ramdisk_size == 2 * GIB + MIB
    tables = _tables(plan)
    assert translate(tables, 4 * GIB + 2 * GIB + MIB - 1) == 6 * GIB + MIB - 1


def test_initrd_above_4g_refused_without_xlf(tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(2 * GIB + MIB)
    bz = FakeBz(xloadflags=XLF_KERNEL_64)
    with pytest.raises(BootError, match="initrd"):
        plan_linux_bzimage(bz, "/k", initrd=str(big), cmdline="", memory_size=6 * GIB)


@pytest.mark.parametrize("protocol", [0x20A, 0x20B, 0x206])
def test_old_protocol_has_no_64bit_entry(protocol):
    version = f"{protocol >> 8}.{protocol & 0xFF:02d}"
    with pytest.raises(BootError, match=rf"protocol {version} has no 64-bit entry.*2\.12"):
        plan_linux_bzimage(FakeBz(protocol=protocol), "/k", cmdline="", memory_size=128 * MIB)


def test_no_xlf_kernel_64():
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        plan_linux_bzimage(FakeBz(xloadflags=0), "/k", cmdline="", memory_size=128 * MIB)


def test_load_address_aligned_up_and_default():
    plan = plan_linux_bzimage(
        FakeBz(pref_address=0x1100000), "/k", cmdline="", memory_size=128 * MIB
    )
    assert _chunk(plan, "kernel").addr == 0x1200000
    assert plan.cpu.rip == 0x1200200
    plan = plan_linux_bzimage(FakeBz(pref_address=0), "/k", cmdline="", memory_size=128 * MIB)
    assert _chunk(plan, "kernel").addr == 0x200000  # 1 MiB aligned up to 2 MiB


def test_cmdline_too_long():
    with pytest.raises(BootError, match="command line too long"):
        plan_linux_bzimage(FakeBz(cmdline_size=16), "/k", cmdline="x" * 17, memory_size=128 * MIB)
    plan_linux_bzimage(FakeBz(cmdline_size=16), "/k", cmdline="x" * 16, memory_size=128 * MIB)


def test_missing_initrd_file(tmp_path):
    with pytest.raises(BootError, match="cannot read the initrd"):
        plan_linux_bzimage(
            FakeBz(), "/k", initrd=str(tmp_path / "nope"), cmdline="", memory_size=128 * MIB
        )


def _elf64(entry: int, segs: list[tuple[int, int, int, bytes]]) -> bytes:
    """A minimal ELF64 x86-64 executable: segs = (vaddr, paddr, memsz, data)."""
    ehsize, phentsize = 64, 56
    data_off = ehsize + phentsize * len(segs)
    phdrs = b""
    blobs = b""
    for vaddr, paddr, memsz, blob in segs:
        off = data_off + len(blobs)
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(blob), memsz, 0x1000)
        blobs += blob
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, ehsize, 0, 0, ehsize, phentsize,
        len(segs), 64, 0, 0,
    )
    return ehdr + phdrs + blobs


def test_elf_plan(tmp_path, initrd):
    raw = _elf64(
        0xFFFFFFFF81000010,
        [(0xFFFFFFFF81000000, 0x1000000, 0x200000, b"\x90" * 64), (0xFFFFFFFF81200000, 0x1200000, 0x100000, b"")],
    )
    path = tmp_path / "vmlinux"
    path.write_bytes(raw)
    elf = parse_elf(raw)
    plan = plan_linux_elf(elf, str(path), initrd=initrd, cmdline="root=x", memory_size=128 * MIB)
    assert plan.protocol == "linux64"
    assert plan.cpu.rip == 0x1000010
    k0 = _chunk(plan, "kernel 0")
    assert (k0.addr, k0.size) == (0x1000000, 0x200000)
    assert k0.source == FileRange(str(path), 64 + 2 * 56, 64)
    zp = zero_page_of(plan)
    assert zp.hdr.boot_flag == BOOT_FLAG_MAGIC and zp.hdr.header == HDRS_MAGIC
    assert zp.hdr.version >= 0x20C and zp.hdr.xloadflags & XLF_KERNEL_64
    assert zp.hdr.type_of_loader == 0xFF
    assert zp.hdr.cmd_line_ptr == _chunk(plan, "command line").addr
    assert zp.hdr.ramdisk_image == _chunk(plan, "initrd").addr
    assert zp.hdr.kernel_alignment == 2 * MIB
    assert e820_from_params(zp) == layout.memory_map(128 * MIB)
    assert plan.cpu.rsi == 0x7000 and plan.cpu.cs.selector == 0x10


def test_elf_entry_outside_segments(tmp_path):
    raw = _elf64(0x5000000, [(0x1000000, 0x1000000, 0x1000, b"\x90")])
    (tmp_path / "v").write_bytes(raw)
    with pytest.raises(BootError, match="e_entry"):
        plan_linux_elf(parse_elf(raw), str(tmp_path / "v"), cmdline="", memory_size=128 * MIB)


def test_elf_truncated_segment(tmp_path):
    raw = _elf64(0x1000000, [(0x1000000, 0x1000000, 0x1000, b"\x90" * 100)])
    (tmp_path / "v").write_bytes(raw[:-50])
    with pytest.raises(BootError, match="truncated"):
        plan_linux_elf(parse_elf(raw), str(tmp_path / "v"), cmdline="", memory_size=128 * MIB)


def test_elf_32bit_refused():
    raw = bytearray(_elf64(0x1000000, [(0x1000000, 0x1000000, 0x1000, b"\x90")]))
    info = parse_elf(bytes(raw))
    info.elf_class = 32
    with pytest.raises(BootError, match="x86-64"):
        plan_linux_elf(info, "/v", cmdline="", memory_size=128 * MIB)
