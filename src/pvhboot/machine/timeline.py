"""Boot phases on one clock, relative to the exec of this process.

All marks use CLOCK_BOOTTIME because that is the clock of the process start
time in /proc/self/stat (field 22, in clock ticks since boot: proc(5)). That
start time is coarse (USER_HZ, normally 10 ms), so "exec" is exact only to a
tick; every later phase is measured to the microsecond. If /proc is not
readable, the time this module was imported stands in for exec.
"""

from __future__ import annotations

import os
import time

_CLOCK = time.CLOCK_BOOTTIME
_IMPORTED = time.clock_gettime(_CLOCK)

# Phase names, in boot order (issue 3 "--timeline").
PHASES = (
    "exec",
    "kvm-ready",
    "kernel-mapped",
    "first-kvm-run",
    "first-serial-byte",
    "boot-timer",
    "exit",
)


def now() -> float:
    return time.clock_gettime(_CLOCK)


def process_start() -> float:
    """This process's exec time on CLOCK_BOOTTIME, from /proc/self/stat."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks = int(fields[19])  # field 22 overall; fields[0] is field 3
        start = ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    # Never after our own import: that would make exec look later than it was.
    return min(start, _IMPORTED)


class Timeline:
    def __init__(self, start: float | None = None) -> None:
        self.start = process_start() if start is None else start
        self.marks: dict[str, float] = {"exec": self.start}

    def mark(self, phase: str, when: float | None = None) -> None:
        """Record the first time ``phase`` happened (later calls are ignored)."""
        if phase not in self.marks:
            self.marks[phase] = now() if when is None else when

    def as_dict(self) -> dict[str, float]:
        """phase -> seconds since exec, in boot order, only phases that happened."""
        order = {p: i for i, p in enumerate(PHASES)}
        items = sorted(self.marks.items(), key=lambda kv: (order.get(kv[0], 99), kv[1]))
        return {p: t - self.start for p, t in items}


def format_timeline(timeline: dict[str, float]) -> str:
    """The --timeline table: phase, milliseconds since exec, delta to the previous phase."""
    lines = [f"{'phase':<18} {'ms':>10} {'+ms':>9}"]
    prev = 0.0
    for phase, t in timeline.items():
        lines.append(f"{phase:<18} {t * 1000:10.2f} {(t - prev) * 1000:9.2f}")
        prev = t
    return "\n".join(lines)
