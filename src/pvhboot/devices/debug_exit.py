"""QEMU's isa-debug-exit device: a guest ends the run with a status of its choice.

QEMU (hw/misc/debugexit.c) exits the process with ``(value << 1) | 1`` for a
write of ``value``: the status is always odd, so a guest can never fake a
clean QEMU exit (0). Probe guests and the benchmark rely on the same math
here, so their expectations hold under both VMMs. Attach at 0xf4, 1 port
(QEMU's ``iobase=0xf4,iosize=1``); wider writes use the whole value.
"""

from __future__ import annotations

from .base import Device, StopGuest

PORT = 0xF4
# Process exit statuses are 8 bits wide; the shell sees only the low byte.
EXIT_STATUS_MASK = 0xFF


def debug_exit_status(value: int) -> int:
    """The exit status QEMU's isa-debug-exit gives for a guest write of ``value``."""
    return ((value << 1) | 1) & EXIT_STATUS_MASK


class DebugExit(Device):
    name = "debug-exit"
    SIZE = 1

    def __init__(self) -> None:
        self.value: int | None = None  # the raw value written, for messages

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.value = value
        raise StopGuest("debug-exit", debug_exit_status(value))
