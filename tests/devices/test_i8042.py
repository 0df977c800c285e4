"""The 8042 answers Linux's probe at once and resets the guest on 0xFE."""

from __future__ import annotations

import pytest

from pvhboot.devices import i8042 as k
from pvhboot.devices.base import StopGuest
from pvhboot.devices.i8042 import I8042


def command(dev: I8042, cmd: int, *params: int) -> int | None:
    """What Linux's i8042_command does: write, send params, poll for a reply."""
    assert not dev.read(k.COMMAND, 1) & k.STR_IBF
    dev.write(k.COMMAND, 1, cmd)
    for p in params:
        dev.write(k.DATA, 1, p)
    if dev.read(k.COMMAND, 1) & k.STR_OBF:
        return dev.read(k.DATA, 1)
    return None


def test_idle_status_has_empty_buffers():
    dev = I8042()
    status = dev.read(k.COMMAND, 1)
    assert not status & (k.STR_OBF | k.STR_IBF)
    assert status & k.STR_SYS


def test_reset_command_stops_guest_with_status_zero():
    dev = I8042()
    with pytest.raises(StopGuest) as exc:
        dev.write(k.COMMAND, 1, 0xFE)
    assert exc.value.reason == "reset" and exc.value.status == 0


def test_pulse_without_reset_line_does_not_reset():
    dev = I8042()
    dev.write(k.COMMAND, 1, 0xFF)  # pulse nothing
    dev.write(k.COMMAND, 1, 0xFD)  # line 1 only


def test_output_port_write_dropping_reset_line_resets():
    dev = I8042()
    assert command(dev, k.CMD_READ_OUTPUT) == k.INITIAL_OUTPUT
    dev.write(k.COMMAND, 1, k.CMD_WRITE_OUTPUT)
    with pytest.raises(StopGuest):
        dev.write(k.DATA, 1, 0x02)


def test_linux_probe_sequence_answers_without_waiting():
    dev = I8042()
    assert command(dev, k.CMD_SELF_TEST) == 0x55
    ctr = command(dev, k.CMD_READ_CTR)
    assert ctr == k.INITIAL_CTR
    assert command(dev, k.CMD_WRITE_CTR, ctr & ~k.CTR_KBDINT) is None
    assert command(dev, k.CMD_READ_CTR) == ctr & ~k.CTR_KBDINT
    assert command(dev, k.CMD_KBD_TEST) == 0
    # AUX loopback: the byte comes back, but not flagged as aux data ...
    dev.write(k.COMMAND, 1, k.CMD_WRITE_AUX_OUTBUF)
    dev.write(k.DATA, 1, 0x5A)
    status = dev.read(k.COMMAND, 1)
    assert status & k.STR_OBF and not status & k.STR_AUXDATA
    # ... and Linux, seeing no aux flag, moves on to the AUX test without reading it.
    assert command(dev, k.CMD_AUX_TEST) == k.AUX_ABSENT
    assert not dev.read(k.COMMAND, 1) & k.STR_OBF


def test_keyboard_bytes_get_no_answer():
    dev = I8042()
    dev.write(k.DATA, 1, 0xF2)  # GETID to a keyboard that is not there
    assert not dev.read(k.COMMAND, 1) & k.STR_OBF


def test_port_b_refresh_toggles():
    dev = I8042()
    a = dev.read(k.PORT_B, 1) & k.PORT_B_REFRESH
    b = dev.read(k.PORT_B, 1) & k.PORT_B_REFRESH
    assert a != b
