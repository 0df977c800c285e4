"""The bus without a VM: decoding, offsets, and what unclaimed accesses do."""

from __future__ import annotations

import pytest

from pvhboot.devices.base import Device
from pvhboot.errors import UsageError
from pvhboot.machine.bus import Bus


class Recorder(Device):
    name = "recorder"

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0x40 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_port_accesses_reach_the_device_at_its_offset():
    bus, dev = Bus(), Recorder()
    bus.add_port_device(0x3F8, 8, dev)
    assert bus.pio_read(0x3F8, 1) == 0x40
    assert bus.pio_read(0x3FD, 1) == 0x45
    bus.pio_write(0x3FF, 1, 0x99)
    assert dev.writes == [(7, 1, 0x99)]
    assert bus.port_device(0x3FA) is dev
    assert bus.port_device(0x400) is None


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_unclaimed_port_reads_float_high_and_are_counted(size, ones):
    bus = Bus()
    bus.add_port_device(0x60, 1, Recorder())
    assert bus.pio_read(0x61, size) == ones
    assert bus.pio_read(0x80, size) == ones
    assert bus.unhandled_port_reads == 2


def test_unclaimed_port_writes_are_ignored_and_counted():
    bus = Bus()
    bus.pio_write(0x80, 1, 0x12)
    bus.pio_write(0xCF8, 4, 0x80000000)
    assert bus.unhandled_port_writes == 2
    assert bus.unhandled_port_reads == 0


def test_overlapping_port_ranges_are_refused_naming_both():
    bus = Bus()
    bus.add_port_device(0x3F8, 8, Recorder())
    with pytest.raises(UsageError, match=r"overlaps recorder at \[0x3f8, 0x400\)"):
        bus.add_port_device(0x3FF, 2, Recorder())
    bus.add_port_device(0x400, 1, Recorder())  # adjacent is fine


def test_port_range_must_fit_the_16_bit_space():
    with pytest.raises(UsageError):
        Bus().add_port_device(0xFFFF, 2, Recorder())


def test_mmio_dispatch_and_unclaimed_mmio():
    bus, dev = Bus(), Recorder()
    bus.add_mmio_device(0xD000_0000, 0x200, dev)
    assert bus.mmio_read(0xD000_0010, 4) == 0x50
    bus.mmio_write(0xD000_0100, 4, 7)
    assert dev.writes == [(0x100, 4, 7)]
    assert bus.mmio_read(0xD000_0200, 4) == 0xFFFFFFFF
    bus.mmio_write(0xC000_0000, 1, 1)
    assert (bus.unhandled_mmio_reads, bus.unhandled_mmio_writes) == (1, 1)
    with pytest.raises(UsageError):
        bus.add_mmio_device(0xD000_01FF, 1, Recorder())
