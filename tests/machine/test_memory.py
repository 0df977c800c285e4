"""Guest RAM: slot planning, bounds checks, and kernel segments mapped from
the file (not copied) wherever file offset and guest address are congruent."""

from __future__ import annotations

import os

import pytest

from pvhboot.boot.layout import memory_map
from pvhboot.boot.plan import E820_RAM, E820_RESERVED, Chunk, FileRange, MemoryRange
from pvhboot.errors import BootError, GuestError, UsageError
from pvhboot.machine.memory import (
    FOUR_GIB,
    PAGE_SIZE,
    GuestMemory,
    RamSlot,
    parse_memory_size,
    plan_slots,
)

MEM = 16 << 20


@pytest.mark.parametrize(
    "text,size",
    [
        ("128M", 128 << 20),
        ("128m", 128 << 20),
        ("1G", 1 << 30),
        ("512", 512 << 20),  # bare number = MiB, as QEMU's -m
        ("4096K", 4 << 20),
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        (" 32M ", 32 << 20),
        (64 << 20, 64 << 20),
    ],
)
def test_parse_memory_size(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "", "M", "-1M", "1.5G", "0x100M", "128 MiBs", True])
def test_parse_memory_size_rejects_junk(text):
    with pytest.raises(UsageError):
        parse_memory_size(text)


@pytest.mark.parametrize("text", ["1M", "2T", 4097 << 12 | 1])
def test_parse_memory_size_rejects_out_of_range_or_unaligned(text):
    with pytest.raises(UsageError):
        parse_memory_size(text)


def test_slots_follow_the_memory_map():
    assert plan_slots(128 << 20, memory_map(128 << 20)) == [RamSlot(0, 0, 128 << 20, 0)]
    mm = [
        MemoryRange(0, 0xA0000, E820_RAM),
        MemoryRange(0xA0000, 0x60000, E820_RESERVED),
        MemoryRange(0x100000, (3 << 30) - 0x100000, E820_RAM),
        MemoryRange(FOUR_GIB, 1 << 30, E820_RAM),
    ]
    low, high = plan_slots(4 << 30, mm)
    assert (low.guest_addr, low.size) == (0, 3 << 30)
    assert (high.slot, high.guest_addr, high.size, high.host_offset) == (1, FOUR_GIB, 1 << 30, 3 << 30)


def test_read_write_and_bounds():
    with GuestMemory(MEM) as mem:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc"
        assert mem.read(MEM - 4, 4) == bytes(4)
        assert mem.contains(MEM - 1) and not mem.contains(MEM)
        with pytest.raises(GuestError, match="not inside guest RAM"):
            mem.read(MEM - 2, 4)
        with pytest.raises(GuestError):
            mem.write(-1, b"x")


def test_chunk_outside_ram_is_refused_before_anything_is_written():
    with GuestMemory(MEM) as mem:
        chunks = [Chunk(0x2000, 3, b"xyz", "first"), Chunk(MEM - 1, 2, b"no", "too high")]
        with pytest.raises(BootError, match="too high.*--memory"):
            mem.load_chunks(chunks)
        assert mem.read(0x2000, 3) == bytes(3)


def _kernel_file(tmp_path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / "kernel.bin"
    path.write_bytes(data)
    return str(path), data


def test_congruent_file_range_is_mapped_not_copied(tmp_path):
    path, data = _kernel_file(tmp_path, 64 * PAGE_SIZE)
    with GuestMemory(MEM) as mem:
        chunk = Chunk(0x100000, 80 * PAGE_SIZE, FileRange(path, PAGE_SIZE, 60 * PAGE_SIZE), "k")
        stats = mem.load_chunks([chunk])
        assert stats.mapped_bytes == 60 * PAGE_SIZE and stats.copied_bytes == 0
        assert stats.mappings == 1
        assert mem.read(0x100000, 60 * PAGE_SIZE) == data[PAGE_SIZE : 61 * PAGE_SIZE]
        # memsz > filesz: the rest reads as zero
        assert mem.read(0x100000 + 60 * PAGE_SIZE, 20 * PAGE_SIZE) == bytes(20 * PAGE_SIZE)
        # RAM around the mapping is still ordinary anonymous memory
        mem.write(0x100000 - 1, b"\x01")
        mem.write(0x100000 + 80 * PAGE_SIZE, b"\x02")


def test_guest_writes_to_a_mapped_segment_never_reach_the_file(tmp_path):
    path, data = _kernel_file(tmp_path, 8 * PAGE_SIZE)
    with GuestMemory(MEM) as mem:
        mem.load_chunks([Chunk(0x200000, 8 * PAGE_SIZE, FileRange(path, 0, 8 * PAGE_SIZE), "k")])
        mem.write(0x200000, b"\0" * 64)
        assert mem.read(0x200000, 64) == bytes(64)
    with open(path, "rb") as f:
        assert f.read() == data


def test_unaligned_head_and_tail_are_copied_the_middle_mapped(tmp_path):
    path, data = _kernel_file(tmp_path, 16 * PAGE_SIZE)
    with GuestMemory(MEM) as mem:
        # offset 0x100 in the file at guest 0x300100: congruent, but not page-aligned
        src = FileRange(path, 0x100, 10 * PAGE_SIZE)
        stats = mem.load_chunks([Chunk(0x300100, 10 * PAGE_SIZE, src, "k")])
        assert stats.mapped_bytes == 9 * PAGE_SIZE
        assert stats.copied_bytes == PAGE_SIZE  # the two partial pages
        assert mem.read(0x300100, 10 * PAGE_SIZE) == data[0x100 : 0x100 + 10 * PAGE_SIZE]


def test_incongruent_file_range_falls_back_to_a_copy(tmp_path):
    path, data = _kernel_file(tmp_path, 4 * PAGE_SIZE)
    with GuestMemory(MEM) as mem:
        stats = mem.load_chunks([Chunk(0x100000, 3 * PAGE_SIZE, FileRange(path, 0x10, 3 * PAGE_SIZE), "k")])
        assert stats.mapped_bytes == 0 and stats.copied_bytes == 3 * PAGE_SIZE
        assert mem.read(0x100000, 3 * PAGE_SIZE) == data[0x10 : 0x10 + 3 * PAGE_SIZE]


def test_file_range_past_the_end_of_the_file_is_a_boot_error(tmp_path):
    path, _ = _kernel_file(tmp_path, PAGE_SIZE)
    with GuestMemory(MEM) as mem:
        with pytest.raises(BootError, match="past the end of the file"):
            mem.load_chunks([Chunk(0x100000, 2 * PAGE_SIZE, FileRange(path, 0, 2 * PAGE_SIZE), "k")])


def test_loading_cost_does_not_grow_with_the_mapped_size(tmp_path):
    # Mapping, not copying: a 3x bigger segment is still one mapping and no copy.
    small = tmp_path / "small"
    big = tmp_path / "big"
    small.write_bytes(b"\x90" * (1 << 20))
    big.write_bytes(b"\x90" * (3 << 20))
    for path, size in ((small, 1 << 20), (big, 3 << 20)):
        with GuestMemory(MEM) as mem:
            stats = mem.load_chunks([Chunk(0x400000, size, FileRange(str(path), 0, size), "k")])
            assert (stats.mappings, stats.copied_bytes) == (1, 0)
