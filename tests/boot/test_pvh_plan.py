"""PVH plan: ABI struct sizes, chunk placement, and the errors a user sees.

The probe guests (tests/guests) check what the guest actually reads; these
tests check the planner's decisions without /dev/kvm.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest

from pvhboot.boot import layout, pvh
from pvhboot.boot.layout import MIB
from pvhboot.boot.plan import FileRange
from pvhboot.errors import BootError

KERNEL_PADDR = 16 * MIB


def _seg(offset, paddr, filesz, memsz, type=pvh.PT_LOAD):
    return SimpleNamespace(
        type=type, offset=offset, vaddr=paddr, paddr=paddr, filesz=filesz, memsz=memsz
    )


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(0x3000))
    elf = SimpleNamespace(
        pvh_entry=KERNEL_PADDR + 0x40,
        segments=[
            _seg(0x1000, KERNEL_PADDR, 0x1000, 0x1000),
            _seg(0x2000, KERNEL_PADDR + 0x200000, 0x800, 0x100000),  # .bss tail
            _seg(0, 0, 0, 0, type=4),  # PT_NOTE: ignored
        ],
    )
    return elf, str(path)


def _chunk(plan, label):
    (c,) = [c for c in plan.chunks if c.label.startswith(label)]
    return c


def test_struct_sizes_match_start_info_h():
    assert ctypes.sizeof(pvh.hvm_start_info) == 56
    assert ctypes.sizeof(pvh.hvm_modlist_entry) == 32
    assert ctypes.sizeof(pvh.hvm_memmap_table_entry) == 24
    assert pvh.hvm_start_info.memmap_paddr.offset == 40
    assert pvh.hvm_start_info.memmap_entries.offset == 48


def test_plan_places_everything(kernel, tmp_path):
    elf, path = kernel
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"07070" + bytes(9000))
    plan = pvh.plan_pvh(elf, path, initrd=str(initrd), cmdline="console=ttyS0", memory_size=128 * MIB)
    assert plan.protocol == "pvh"
    seg0 = _chunk(plan, "kernel segment 0")
    assert (seg0.addr, seg0.size, seg0.source) == (KERNEL_PADDR, 0x1000, FileRange(path, 0x1000, 0x1000))
    seg1 = _chunk(plan, "kernel segment 1")
    assert seg1.size == 0x100000 and seg1.source.length == 0x800  # zero-filled by size
    rd = _chunk(plan, "initrd")
    assert rd.addr % 4096 == 0 and rd.end <= 128 * MIB and 128 * MIB - rd.end < 4096
    assert rd.source == FileRange(str(initrd), 0, 9005)
    cmd = _chunk(plan, "command line")
    assert cmd.source == b"console=ttyS0\0"
    # The start_info the guest reads
    si_chunk = _chunk(plan, "hvm_start_info")
    si = pvh.hvm_start_info.from_buffer_copy(si_chunk.source)
    assert si.magic == 0x336EC578 and si.version == 1 and si.nr_modules == 1
    assert si.cmdline_paddr == cmd.addr and si.rsdp_paddr == 0
    assert si.modlist_paddr == si_chunk.addr + 56
    mod = pvh.hvm_modlist_entry.from_buffer_copy(si_chunk.source, 56)
    assert (mod.paddr, mod.size, mod.cmdline_paddr) == (rd.addr, 9005, 0)
    mm_chunk = _chunk(plan, "memory map")
    assert si.memmap_paddr == mm_chunk.addr and si.memmap_entries == 3
    entries = (pvh.hvm_memmap_table_entry * 3).from_buffer_copy(mm_chunk.source)
    assert [(e.addr, e.size, e.type) for e in entries] == [
        (r.addr, r.size, r.type) for r in plan.memory_map
    ]
    # CPU: EBX -> start_info, entry from the note, GDT where the chunk is
    assert plan.cpu.rbx == si_chunk.addr and plan.cpu.rip == elf.pvh_entry
    gdt = _chunk(plan, "GDT")
    assert plan.cpu.gdt_base == gdt.addr and plan.cpu.gdt_limit == gdt.size - 1
    # no two chunks overlap
    ordered = sorted(plan.chunks, key=lambda c: c.addr)
    assert all(a.end <= b.addr for a, b in zip(ordered, ordered[1:], strict=False))
    assert any("initrd" in n for n in plan.notes)


def test_no_initrd_means_no_modules(kernel):
    elf, path = kernel
    plan = pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=128 * MIB)
    si = pvh.hvm_start_info.from_buffer_copy(_chunk(plan, "hvm_start_info").source)
    assert si.nr_modules == 0 and si.modlist_paddr == 0
    assert _chunk(plan, "command line").source == b"\0"


def test_no_pvh_entry_points_at_config_pvh(kernel):
    elf, path = kernel
    elf.pvh_entry = None
    with pytest.raises(BootError, match=r"CONFIG_PVH.*pvhboot kconfig"):
        pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=128 * MIB)


def test_kernel_does_not_fit(kernel):
    elf, path = kernel
    with pytest.raises(BootError, match=r"kernel does not fit: .*0x1300000\).*at least 19M"):
        pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=8 * MIB)
    # The advice works: the boot data goes below the kernel.
    assert pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=19 * MIB) is not None


def test_initrd_does_not_fit(kernel, tmp_path):
    elf, path = kernel
    initrd = tmp_path / "big"
    with open(initrd, "wb") as f:
        f.truncate(40 * MIB)
    with pytest.raises(BootError, match=r"initrd \(40 MiB\) does not fit.*above kernel segment 1.*--memory 59M"):
        pvh.plan_pvh(elf, path, initrd=str(initrd), cmdline="", memory_size=32 * MIB)


def test_cmdline_too_long(kernel):
    elf, path = kernel
    with pytest.raises(BootError, match="command line too long"):
        pvh.plan_pvh(elf, path, initrd=None, cmdline="a" * 4000, memory_size=128 * MIB)


def test_overlapping_segments(kernel):
    elf, path = kernel
    elf.segments.append(_seg(0x1000, KERNEL_PADDR + 0x800, 0x100, 0x1000))
    with pytest.raises(BootError, match="kernel segment 2 .* overlaps kernel segment 0"):
        pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=128 * MIB)


def test_kernel_over_boot_structures(kernel):
    elf, path = kernel
    elf.segments = [_seg(0x1000, 0x1000, 0x1000, 0x1000)]
    elf.pvh_entry = 0x1000
    with pytest.raises(BootError, match="GDT .* overlaps kernel segment 0"):
        pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=128 * MIB)


def test_truncated_segment(kernel):
    elf, path = kernel
    elf.segments[0] = _seg(0x2000, KERNEL_PADDR, 0x10000, 0x10000)
    with pytest.raises(BootError, match="truncated"):
        pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=128 * MIB)


def test_large_memory_map_has_high_ram(kernel):
    elf, path = kernel
    plan = pvh.plan_pvh(elf, path, initrd=None, cmdline="", memory_size=4 * layout.GIB)
    si = pvh.hvm_start_info.from_buffer_copy(_chunk(plan, "hvm_start_info").source)
    assert si.memmap_entries == 4
    assert plan.memory_map[-1].addr == 4 * layout.GIB


def test_describe_text_and_json(kernel):
    import json

    from pvhboot.boot.describe import format_plan, plan_to_json

    elf, path = kernel
    plan = pvh.plan_pvh(elf, path, initrd=None, cmdline="quiet", memory_size=128 * MIB)
    text = format_plan(plan)
    assert "protocol: pvh" in text
    assert "kernel segment 1" in text and "zero-filled" in text and path in text
    assert f"rip={elf.pvh_entry:#x}" in text and "rbx=0x3000" in text
    assert "reserved" in text and "usable" in text
    data = json.loads(json.dumps(plan_to_json(plan)))
    assert data["protocol"] == "pvh"
    assert data["cpu"]["rbx"] == layout.START_INFO_ADDR
    assert data["cpu"]["cs"]["selector"] == 0x08
    assert data["chunks"][-1]["source"] == {"file": path, "offset": 0x2000, "length": 0x800}
