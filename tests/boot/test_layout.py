"""Guest memory map shapes and the region allocator's errors."""

from __future__ import annotations

import pytest

from pvhboot.boot import layout
from pvhboot.boot.layout import GIB, MIB, Layout, check_cmdline, memory_map
from pvhboot.boot.plan import E820_RAM, E820_RESERVED, MemoryRange
from pvhboot.errors import BootError
from pvhboot.machine import memory as machine_memory


def test_mmio_gap_matches_guest_ram_backing():
    assert layout.MMIO_GAP_START == machine_memory.DEFAULT_MMIO_GAP_START


def test_memory_map_128m():
    assert memory_map(128 * MIB) == [
        MemoryRange(0, 0xA0000, E820_RAM),
        MemoryRange(0xA0000, 0x60000, E820_RESERVED),
        MemoryRange(0x100000, 127 * MIB, E820_RAM),
    ]


def test_memory_map_exactly_3g_stops_at_gap():
    mm = memory_map(3 * GIB)
    assert mm[-1] == MemoryRange(MIB, 3 * GIB - MIB, E820_RAM)
    assert len(mm) == 3


def test_memory_map_above_3g_continues_at_4g():
    mm = memory_map(3 * GIB + 512 * MIB)
    assert mm[2] == MemoryRange(MIB, 3 * GIB - MIB, E820_RAM)
    assert mm[3] == MemoryRange(4 * GIB, 512 * MIB, E820_RAM)


def test_memory_map_6g():
    mm = memory_map(6 * GIB)
    assert mm[3] == MemoryRange(4 * GIB, 3 * GIB, E820_RAM)
    # total backed RAM (hole included) equals the requested size
    assert sum(r.size for r in mm) == 6 * GIB


def test_memory_map_agrees_with_ram_slots():
    for size in (128 * MIB, 3 * GIB, 5 * GIB):
        slots = machine_memory.plan_slots(size, memory_map(size))
        assert sum(s.size for s in slots) == size


def test_memory_map_too_small():
    with pytest.raises(BootError, match="too little"):
        memory_map(512 * 1024)


def test_reserve_and_overlap_names_both_regions():
    lay = Layout(128 * MIB)
    lay.reserve("kernel segment 0", 16 * MIB, 4 * MIB)
    with pytest.raises(BootError) as err:
        lay.reserve("initrd", 18 * MIB, 8 * MIB)
    msg = str(err.value)
    assert "initrd" in msg and "kernel segment 0" in msg
    assert "8 MiB" in msg and "4 MiB" in msg
    assert "0x1200000" in msg and "0x1000000" in msg


def test_reserve_adjacent_is_fine():
    lay = Layout(128 * MIB)
    lay.reserve("a", 16 * MIB, MIB)
    lay.reserve("b", 17 * MIB, MIB)
    assert lay.describe()[0].startswith("a at [0x1000000, 0x1100000)")


def test_kernel_beyond_ram_suggests_memory():
    lay = Layout(16 * MIB)
    with pytest.raises(BootError, match=r"does not fit in guest RAM.*--memory 24M"):
        lay.reserve("kernel segment 0", 16 * MIB, 8 * MIB)


def test_kernel_in_isa_hole():
    lay = Layout(128 * MIB)
    with pytest.raises(BootError, match=r"ISA hole.*cannot be loaded there"):
        lay.reserve("kernel segment 0", 0x90000, 0x20000)


def test_region_in_mmio_gap():
    lay = Layout(5 * GIB)
    with pytest.raises(BootError, match="MMIO gap"):
        lay.reserve("kernel segment 0", 3 * GIB - MIB, 2 * MIB)


def test_place_top_below_gap_page_aligned():
    lay = Layout(128 * MIB)
    r = lay.place_top("initrd", 10_000)
    assert r.addr % 4096 == 0
    assert r.end <= 128 * MIB
    assert 128 * MIB - r.end < 4096
    big = Layout(5 * GIB).place_top("initrd", MIB)
    assert big.end <= 3 * GIB


def test_place_top_skips_regions_in_the_way():
    lay = Layout(128 * MIB)
    lay.reserve("kernel", 120 * MIB, 8 * MIB)
    r = lay.place_top("initrd", MIB)
    assert r.end <= 120 * MIB


def test_initrd_does_not_fit_says_how_much_memory():
    lay = Layout(32 * MIB)
    lay.reserve("kernel segment 0", 16 * MIB, 8 * MIB)
    with pytest.raises(BootError) as err:
        lay.place_top("initrd", 20 * MIB)
    msg = str(err.value)
    assert "initrd (20 MiB) does not fit" in msg
    assert "--memory 44M" in msg


def test_cmdline_nul_terminated_and_limits():
    assert check_cmdline("console=ttyS0") == b"console=ttyS0\0"
    assert len(check_cmdline("x" * 2047)) == 2048
    with pytest.raises(BootError, match="command line too long: 2048 bytes, the limit is 2047"):
        check_cmdline("x" * 2048)
    with pytest.raises(BootError, match="NUL"):
        check_cmdline("a\0b")


def test_fixed_boot_structures_fit_low_ram_without_overlap():
    lay = Layout(128 * MIB)
    lay.reserve("gdt", layout.BOOT_GDT_ADDR, layout.BOOT_GDT_MAX_SIZE)
    lay.reserve("idt", layout.BOOT_IDT_ADDR, layout.BOOT_IDT_MAX_SIZE)
    lay.reserve("start_info", layout.START_INFO_ADDR, layout.START_INFO_MAX_SIZE)
    lay.reserve("memmap", layout.MEMMAP_ADDR, layout.MEMMAP_MAX_SIZE)
    lay.reserve("stack", layout.BOOT_STACK_BOTTOM, layout.BOOT_STACK_TOP - layout.BOOT_STACK_BOTTOM)
    lay.reserve("zero page", layout.ZERO_PAGE_ADDR, layout.ZERO_PAGE_SIZE)
    lay.reserve("page tables", layout.PAGE_TABLES_ADDR, layout.PAGE_TABLES_MAX_SIZE)
    lay.reserve("cmdline", layout.CMDLINE_ADDR, layout.CMDLINE_MAX_SIZE)
    assert all(r.end <= layout.LOW_RAM_END for r in lay.regions)


def test_max_guest_memory_matches_machine_memory():
    assert layout.MAX_GUEST_MEMORY == machine_memory.MAX_MEMORY


def test_window_over_mmio_gap_gives_no_memory_advice():
    # A bzImage init_size window reaching into [3 GiB, 4 GiB): no RAM size moves the gap.
    lay = Layout(128 * MIB)
    with pytest.raises(BootError) as exc:
        lay.reserve("kernel (init_size window)", 16 * MIB, 3 * GIB)
    msg = str(exc.value)
    assert "MMIO gap" in msg and "cannot be loaded there" in msg
    assert "give the guest" not in msg and "--memory " not in msg.replace("whatever --memory", "")


def test_region_beyond_largest_guest_gives_no_memory_advice():
    lay = Layout(128 * MIB)
    with pytest.raises(BootError) as exc:
        lay.reserve("kernel segment 0", 16 * MIB, (1 << 64) - 1 - 16 * MIB)
    assert "give the guest" not in str(exc.value)


def test_region_above_4g_advice_is_enough_and_exact():
    lay = Layout(128 * MIB)
    with pytest.raises(BootError, match=r"--memory 4097M\)"):
        lay.reserve("kernel segment 0", 5 * GIB, MIB)
    # ... and that size really holds it.
    Layout(4097 * MIB).reserve("kernel segment 0", 5 * GIB, MIB)


def test_memory_needed():
    assert layout.memory_needed(24 * MIB) == 24 * MIB
    assert layout.memory_needed(3 * GIB + 1) is None
    assert layout.memory_needed(layout.MAX_GUEST_MEMORY + GIB) == layout.MAX_GUEST_MEMORY
    assert layout.memory_needed(layout.MAX_GUEST_MEMORY + GIB + 1) is None
