"""What every emulated device looks like to the bus.

Modelled on vm-superio: a device is a small object that handles reads and
writes at offsets within its own range, and raises interrupts through an
injected :class:`IrqLine`. It knows nothing of KVM, so it is unit-tested
with no VM at all.
"""

from __future__ import annotations


class IrqLine:
    """An interrupt line the device can drive (edge: ``pulse``; level: ``set``).

    The interface, written down; implementations need not inherit from it
    (machine/vm.py's KvmIrqLine does not). Not a ``typing.Protocol``:
    ``typing`` costs about 2 ms of imports on every boot.
    """

    __slots__ = ()

    def set(self, level: bool) -> None:
        raise NotImplementedError

    def pulse(self) -> None:
        raise NotImplementedError


class NullIrq(IrqLine):
    """An IrqLine that goes nowhere; for tests and unwired devices."""

    def __init__(self) -> None:
        self.level = False
        self.pulses = 0

    def set(self, level: bool) -> None:
        self.level = level

    def pulse(self) -> None:
        self.pulses += 1


class Device:
    """Base class: subclasses override ``read``/``write``.

    ``offset`` is relative to the start of the range the device was attached
    at; ``size`` is the access width in bytes (1, 2, 4 or 8). ``read`` returns
    an integer of that width; ``write`` receives one.
    """

    name = "device"

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class StopGuest(Exception):
    """Raised by a device to end the run (reset, power-off, debug exit).

    ``reason`` is a short word ("reset", "poweroff", "debug-exit");
    ``status`` is the process exit status the run should end with.
    """

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(f"{reason} (status {status})")
        self.reason = reason
        self.status = status
