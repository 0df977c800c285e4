"""Address decoding: port I/O and MMIO ranges -> Device objects.

A device (devices/base.py) sees offsets within its own range and knows
nothing of KVM. Accesses nobody claims behave as on a PC's ISA bus with
nothing attached: reads float high (all ones) and writes vanish. Both are
counted, never fatal: Linux probes many legacy ports on purpose.
"""

from __future__ import annotations

from ..errors import UsageError


class Bus:
    def __init__(self) -> None:
        # Port space is 64 Ki ports and ranges are a few ports wide: one dict
        # entry per port makes each exit a single lookup.
        self._ports: dict[int, tuple[object, int]] = {}
        self._port_ranges: list[tuple[int, int, object]] = []
        self._mmio: list[tuple[int, int, object]] = []
        self.unhandled_port_reads = 0
        self.unhandled_port_writes = 0
        self.unhandled_mmio_reads = 0
        self.unhandled_mmio_writes = 0

    # --- wiring --------------------------------------------------------------

    def add_port_device(self, base: int, length: int, device) -> None:
        if not (0 <= base and length > 0 and base + length <= 0x10000):
            raise UsageError(f"port range [{base:#x}, {base + length:#x}) is outside 0..0xffff")
        _refuse_overlap(self._port_ranges, "ports", base, length, device)
        self._port_ranges.append((base, length, device))
        for port in range(base, base + length):
            self._ports[port] = (device, base)

    def add_mmio_device(self, base: int, length: int, device) -> None:
        _refuse_overlap(self._mmio, "MMIO", base, length, device)
        self._mmio.append((base, length, device))

    def port_device(self, port: int):
        hit = self._ports.get(port)
        return hit[0] if hit else None

    # --- dispatch (the exit loop calls these) --------------------------------

    def pio_read(self, port: int, size: int) -> int:
        hit = self._ports.get(port)
        if hit is None:
            self.unhandled_port_reads += 1
            return (1 << (8 * size)) - 1
        return hit[0].read(port - hit[1], size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        hit = self._ports.get(port)
        if hit is None:
            self.unhandled_port_writes += 1
            return
        hit[0].write(port - hit[1], size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        for base, length, device in self._mmio:
            if base <= addr < base + length:
                return device.read(addr - base, size)
        self.unhandled_mmio_reads += 1
        return (1 << (8 * size)) - 1

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        for base, length, device in self._mmio:
            if base <= addr < base + length:
                device.write(addr - base, size, value)
                return
        self.unhandled_mmio_writes += 1


def _refuse_overlap(ranges, space: str, base: int, length: int, device) -> None:
    for b, n, other in ranges:
        if base < b + n and b < base + length:
            raise UsageError(
                f"{_name(device)} at {space} [{base:#x}, {base + length:#x}) overlaps "
                f"{_name(other)} at [{b:#x}, {b + n:#x})"
            )


def _name(device) -> str:
    return getattr(device, "name", None) or type(device).__name__
