"""prepare_boot: which path a kernel takes, and the one line that says why."""

import gzip
import struct

import pytest

from pvhboot.boot.prepare import prepare_boot
from pvhboot.boot.zeropage import XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64, SetupHeader
from pvhboot.errors import BootError, UsageError

MIB = 1 << 20
PVH_ENTRY = 0x1000040


def make_elf(*, pvh: bool, entry: int = 0x1000000) -> bytes:
    """A tiny ELF64 x86-64 kernel: one PT_LOAD at 16 MiB, and a PT_NOTE with the
    Xen PVH note (owner "Xen", type 18, 4-byte descriptor) when ``pvh``."""
    code = b"\xf4" * 0x100  # hlt
    note = b""
    if pvh:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", PVH_ENTRY)
    phnum = 2 if pvh else 1
    data_off = 64 + 56 * phnum
    phdrs = struct.pack(
        "<IIQQQQQQ", 1, 5, data_off, 0xFFFFFFFF81000000, 0x1000000, len(code), 0x2000, 0x1000
    )
    if pvh:
        phdrs += struct.pack(
            "<IIQQQQQQ", 4, 4, data_off + len(code), 0, 0, len(note), len(note), 4
        )
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0
    )
    return ehdr + phdrs + code + note


def make_bzimage(payload_elf: bytes, *, protocol: int = 0x20F, version: str = "6.1.99") -> bytes:
    """A bzImage per boot.rst: 4 setup sectors + header, a 0x200-byte entry stub,
    then the gzip payload (payload_offset is relative to the protected-mode code)."""
    setup_sects = 4
    pm_offset = (setup_sects + 1) * 512
    stub = b"\xf4" * 0x400
    payload = gzip.compress(payload_elf, mtime=0)
    pm = stub + payload
    pm += bytes(-len(pm) % 16)
    h = SetupHeader()
    h.setup_sects = setup_sects
    h.syssize = len(pm) // 16
    h.boot_flag = 0xAA55
    h.jump = 0xEB | ((0x26C - 0x202) << 8)  # jmp over the header
    h.header = 0x53726448
    h.version = protocol
    h.kernel_version = 0x400  # string at 0x200 + 0x400, inside the setup sectors
    h.loadflags = 0x01
    h.kernel_alignment = 0x200000
    h.relocatable_kernel = 1
    h.xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    h.cmdline_size = 2047
    h.initrd_addr_max = 0x7FFFFFFF
    h.payload_offset = len(stub)
    h.payload_length = len(payload)
    h.pref_address = 0x1000000
    h.init_size = 0x400000
    setup = bytearray(pm_offset)
    setup[0x1F1:0x26C] = bytes(h)
    ver = f"{version} (test@pvhboot) #1".encode() + b"\0"
    setup[0x600 : 0x600 + len(ver)] = ver
    return bytes(setup) + pm


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    # Keep the vmlinux cache of these tests away from the user's.
    d = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    monkeypatch.setenv("PVHBOOT_CACHE", str(d / "pvhboot"))
    return d


@pytest.fixture
def vmlinux_cache():
    from pvhboot.image import vmlinux_cache

    return vmlinux_cache


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_elf_with_pvh_note_boots_pvh(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=True))
    prep = prepare_boot(k, cmdline="console=ttyS0")
    assert prep.plan.protocol == "pvh"
    assert prep.plan.cpu.rip == PVH_ENTRY
    assert prep.message == "vmlinux has a PVH entry: booting through PVH"
    assert prep.image.format == "elf"


def test_elf_without_note_boots_linux64(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=False))
    prep = prepare_boot(k, cmdline="console=ttyS0")
    assert prep.plan.protocol == "linux64"
    assert prep.plan.cpu.rip == 0x1000000
    assert "no PVH entry" in prep.message and "64-bit" in prep.message


def test_elf_force_linux(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=True))
    prep = prepare_boot(k, boot="linux")
    assert prep.plan.protocol == "linux64"
    assert prep.message.startswith("--boot linux:")


def test_elf_force_pvh_without_note(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=False))
    with pytest.raises(BootError, match=r"--boot pvh.*no PVH entry.*CONFIG_PVH.*pvhboot kconfig"):
        prepare_boot(k, boot="pvh")


def test_unknown_boot_mode(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=True))
    with pytest.raises(UsageError, match="auto, pvh, linux"):
        prepare_boot(k, boot="uefi")


def test_missing_files(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=True))
    with pytest.raises(BootError, match="cannot read the kernel .*nope"):
        prepare_boot(str(tmp_path / "nope"))
    with pytest.raises(BootError, match="cannot read the initrd .*missing.img"):
        prepare_boot(k, initrd=str(tmp_path / "missing.img"))


def test_initrd_passed_through(tmp_path):
    k = _write(tmp_path, "vmlinux", make_elf(pvh=False))
    rd = _write(tmp_path, "rd", b"R" * 3000)
    prep = prepare_boot(k, initrd=rd, cmdline="x")
    chunk = next(c for c in prep.plan.chunks if c.label == "initrd")
    assert chunk.source.path == rd and chunk.size == 3000


def test_bzimage_force_linux_needs_no_decompression(tmp_path, vmlinux_cache, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=True)))
    before = vmlinux_cache.DECOMPRESSIONS
    prep = prepare_boot(k, boot="linux")
    assert vmlinux_cache.DECOMPRESSIONS == before
    assert prep.plan.protocol == "linux64"
    assert prep.plan.cpu.rip == 0x1000200
    assert prep.message == (
        "--boot linux: bzImage 6.1.99 (gzip): booting through the Linux 64-bit boot protocol"
    )


def test_bzimage_old_protocol_force_linux(tmp_path):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=False), protocol=0x20A))
    with pytest.raises(BootError, match=r"protocol 2\.10 has no 64-bit entry"):
        prepare_boot(k, boot="linux")


def test_bzimage_with_pvh_payload_cached(tmp_path, vmlinux_cache, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=True)))
    before = vmlinux_cache.DECOMPRESSIONS
    first = prepare_boot(k, cmdline="a", use_cache=True)
    assert first.plan.protocol == "pvh"
    assert first.plan.cpu.rip == PVH_ENTRY
    assert first.message == (
        "bzImage 6.1.99 (gzip) has a PVH entry: booting the extracted vmlinux through PVH "
        "(extracted now)"
    )
    assert vmlinux_cache.DECOMPRESSIONS == before + 1
    second = prepare_boot(k, cmdline="a", use_cache=True)
    assert second.message.endswith("(cached)")
    assert vmlinux_cache.DECOMPRESSIONS == before + 1  # warm cache: none at all
    # The PVH plan maps the extracted vmlinux, not the bzImage.
    kernel_chunks = [c for c in second.plan.chunks if hasattr(c.source, "path")]
    assert any(c.source.path != k for c in kernel_chunks)


def test_bzimage_without_pvh_remembers(tmp_path, vmlinux_cache, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=False), version="6.1.0-56"))
    before = vmlinux_cache.DECOMPRESSIONS
    first = prepare_boot(k)
    assert first.plan.protocol == "linux64"
    assert first.message == (
        "bzImage 6.1.0-56 (gzip) has no PVH entry: booting through the Linux 64-bit boot protocol"
    )
    second = prepare_boot(k)
    assert second.plan.protocol == "linux64"
    # "No PVH" was learnt once; the second boot decompresses nothing.
    assert vmlinux_cache.DECOMPRESSIONS == before + 1


def test_bzimage_no_cache_decompresses_each_time(tmp_path, vmlinux_cache, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=True)))
    before = vmlinux_cache.DECOMPRESSIONS
    for _ in range(2):
        assert prepare_boot(k, use_cache=False).message.endswith("(extracted now)")
    assert vmlinux_cache.DECOMPRESSIONS == before + 2


def test_corrupt_cache_entry_is_rebuilt(tmp_path, vmlinux_cache, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=True)))
    first = prepare_boot(k)
    cached_path = next(
        c.source.path for c in first.plan.chunks if hasattr(c.source, "path") and c.source.path != k
    )
    with open(cached_path, "r+b") as f:  # damage the cached ELF
        f.seek(0)
        f.write(b"garbage!")
    before = vmlinux_cache.DECOMPRESSIONS
    again = prepare_boot(k)
    assert again.plan.protocol == "pvh"
    assert again.message.endswith("(extracted now)")
    assert vmlinux_cache.DECOMPRESSIONS == before + 1
    with open(cached_path, "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_bzimage_force_pvh_without_note(tmp_path, vmlinux_cache, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=False)))
    with pytest.raises(BootError, match=r"--boot pvh.*no PVH entry.*CONFIG_PVH.*pvhboot kconfig"):
        prepare_boot(k, boot="pvh")


def test_kernel_is_a_directory(tmp_path):
    with pytest.raises(BootError, match="not a regular file"):
        prepare_boot(str(tmp_path))


@pytest.mark.kernel
@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_real_bzimage_selection_and_cache(codec, vmlinux_cache, tmp_path, monkeypatch):
    """The project's small kernel, built with two codecs: its payload has the PVH
    note, so auto extracts it once and boots the vmlinux through PVH; --boot linux
    plans the bzImage itself at its preferred address."""
    from pvhtest import test_kernel_files

    # Find (or build) the kernel first: the build script also reads PVHBOOT_CACHE.
    files = test_kernel_files(codec)
    k = str(files.vmlinuz)
    monkeypatch.setenv("PVHBOOT_CACHE", str(tmp_path / "pvhboot"))
    before = vmlinux_cache.DECOMPRESSIONS
    first = prepare_boot(k, cmdline="console=ttyS0")
    assert first.plan.protocol == "pvh"
    assert first.message.startswith("bzImage 6.1.")
    assert f"({codec}) has a PVH entry: booting the extracted vmlinux through PVH" in first.message
    assert first.message.endswith("(extracted now)")
    assert vmlinux_cache.DECOMPRESSIONS == before + 1
    second = prepare_boot(k, cmdline="console=ttyS0")
    assert second.message.endswith("(cached)")
    assert vmlinux_cache.DECOMPRESSIONS == before + 1

    forced = prepare_boot(k, boot="linux")
    bz = forced.image.bzimage
    assert forced.plan.protocol == "linux64"
    assert forced.plan.cpu.rip == bz.pref_address + 0x200
    assert vmlinux_cache.DECOMPRESSIONS == before + 1


def test_pvh_and_linux64_share_one_memory_map(tmp_path):
    from pvhboot.boot.linux import zero_page_of
    from pvhboot.boot.zeropage import e820_from_params

    k = _write(tmp_path, "vmlinux", make_elf(pvh=True))
    for size in (128 * MIB, 4 << 30):
        pvh = prepare_boot(k, memory_size=size, boot="pvh").plan
        linux = prepare_boot(k, memory_size=size, boot="linux").plan
        assert pvh.memory_map == linux.memory_map
        assert e820_from_params(zero_page_of(linux)) == pvh.memory_map


def _patched_elf(*, pvh: bool, machine: int | None = None, memsz: int | None = None,
                 paddr: int | None = None, entry: int = 0x1000000) -> bytes:
    data = bytearray(make_elf(pvh=pvh, entry=entry))
    if machine is not None:
        struct.pack_into("<H", data, 18, machine)  # e_machine
    if paddr is not None:
        struct.pack_into("<Q", data, 64 + 24, paddr)  # phdr 0 p_paddr
    if memsz is not None:
        struct.pack_into("<Q", data, 64 + 40, memsz)  # phdr 0 p_memsz
    return bytes(data)


@pytest.mark.parametrize("pvh", [True, False])
def test_foreign_machine_elf_is_refused(tmp_path, pvh):
    k = _write(tmp_path, "vmlinux", _patched_elf(pvh=pvh, machine=40))
    with pytest.raises(BootError, match=r"machine 40 \(ARM\)") as exc:
        prepare_boot(k)
    assert "\n" not in str(exc.value)


def test_pvh_entry_outside_segments_is_refused(tmp_path):
    data = bytearray(make_elf(pvh=True))
    data[-4:] = struct.pack("<I", 0x8000000)  # the PVH note's entry, far from the PT_LOAD
    k = _write(tmp_path, "vmlinux", bytes(data))
    with pytest.raises(BootError, match="outside every loadable segment"):
        prepare_boot(k)


def test_e_entry_outside_segments_is_refused(tmp_path):
    k = _write(tmp_path, "vmlinux", _patched_elf(pvh=False, entry=0x8000000))
    with pytest.raises(BootError, match="not inside any PT_LOAD"):
        prepare_boot(k)


@pytest.mark.parametrize("pvh", [True, False])
def test_absurd_memsz_gives_no_memory_advice(tmp_path, pvh):
    k = _write(tmp_path, "vmlinux", _patched_elf(pvh=pvh, memsz=(1 << 64) - 1))
    with pytest.raises(BootError) as exc:
        prepare_boot(k)
    msg = str(exc.value)
    assert "can never be loaded" in msg and "give the guest" not in msg


def test_kernel_beyond_ram_gets_advice_that_works(tmp_path):
    k = _write(tmp_path, "vmlinux", _patched_elf(pvh=True, memsz=200 * MIB))
    with pytest.raises(BootError, match=r"--memory 216M\)"):
        prepare_boot(k, memory_size=128 * MIB)
    assert prepare_boot(k, memory_size=216 * MIB).plan is not None


def test_no_cache_prepared_boot_exposes_the_temporary(tmp_path, cache_dir):
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=True)))
    prepared = prepare_boot(k, use_cache=False)
    assert prepared.vmlinux is not None and prepared.vmlinux.temporary
    import os

    assert os.path.exists(prepared.vmlinux.path)
    prepared.vmlinux.cleanup()
    assert not os.path.exists(prepared.vmlinux.path)


def test_no_cache_without_pvh_removes_the_temporary_at_once(tmp_path, cache_dir, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    k = _write(tmp_path, "bzImage", make_bzimage(make_elf(pvh=False)))
    prepared = prepare_boot(k, use_cache=False)
    assert prepared.vmlinux is None
    assert list(tmp.iterdir()) == []


def test_init_size_window_over_the_mmio_gap_gives_no_memory_advice(tmp_path):
    data = bytearray(make_bzimage(make_elf(pvh=False)))
    struct.pack_into("<I", data, 0x260, 0xC0000000)  # setup_header.init_size: 3 GiB
    k = _write(tmp_path, "bzImage", bytes(data))
    with pytest.raises(BootError) as exc:
        prepare_boot(k, boot="linux", memory_size=128 * MIB)
    msg = str(exc.value)
    assert "MMIO gap" in msg and "init_size" in msg
    assert "give the guest" not in msg
