"""Firecracker's original boot-time port: the guest writes 123 to 0x3f0.

A guest init (or a probe) writes the magic byte when it considers itself
booted; the VMM records the moment for ``--timeline``. Other values are
ignored, so stray writes from drivers probing the legacy floppy range
(0x3f0..0x3f7) do not count as a boot.
"""

from __future__ import annotations

import time

from .base import Device

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections.abc pulls in collections: ~0.5 ms on the boot path
    from collections.abc import Callable


PORT = 0x3F0
MAGIC = 123  # Firecracker's MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE


class BootTimer(Device):
    name = "boot-timer"
    SIZE = 1

    def __init__(self, on_boot: Callable[[], object] | None = None) -> None:
        self.on_boot = on_boot
        self.boot_time: float | None = None  # time.monotonic() of the first magic write
        self.signals = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or (value & 0xFF) != MAGIC:
            return
        self.signals += 1
        if self.boot_time is None:
            self.boot_time = time.monotonic()
        if self.on_boot is not None:
            self.on_boot()
