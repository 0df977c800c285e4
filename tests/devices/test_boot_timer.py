from __future__ import annotations

from pvhboot.devices.boot_timer import MAGIC, BootTimer


def test_magic_write_records_time_and_calls_back():
    calls = []
    dev = BootTimer(lambda: calls.append(1))
    dev.write(0, 1, 0x55)
    assert calls == [] and dev.boot_time is None
    dev.write(0, 1, MAGIC)
    assert calls == [1]
    first = dev.boot_time
    assert first is not None
    dev.write(0, 1, MAGIC)
    assert dev.boot_time == first and dev.signals == 2 and calls == [1, 1]


def test_other_offsets_ignored():
    dev = BootTimer()
    dev.write(1, 1, MAGIC)
    assert dev.boot_time is None
