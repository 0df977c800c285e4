from __future__ import annotations

import pytest

from pvhboot.devices.base import StopGuest
from pvhboot.devices.debug_exit import DebugExit, debug_exit_status


@pytest.mark.parametrize("value,status", [(0, 1), (1, 3), (0x10, 0x21), (0x7F, 0xFF), (0x80, 1)])
def test_status_is_qemu_math(value, status):
    dev = DebugExit()
    with pytest.raises(StopGuest) as exc:
        dev.write(0, 1, value)
    assert exc.value.reason == "debug-exit"
    assert exc.value.status == status == debug_exit_status(value)
    assert dev.value == value


def test_wide_write_uses_value_masked_to_width():
    with pytest.raises(StopGuest) as exc:
        DebugExit().write(0, 2, 0x12345)
    assert exc.value.status == ((0x2345 << 1) | 1) & 0xFF


def test_read_floats():
    assert DebugExit().read(0, 1) == 0xFF
