"""Guest RAM: one anonymous host mapping, split into KVM memory slots, and
the loader that puts a BootPlan's chunks into it.

Kernel segments given as a ``FileRange`` are *mapped*, not copied, wherever
the file offset and the guest address are congruent modulo the page size: the
file is mapped ``MAP_PRIVATE | MAP_FIXED`` straight over the RAM mapping, so
loading a 50 MB vmlinux costs a handful of mmap calls, and only the pages the
guest touches are ever read from disk. ``MAP_PRIVATE`` means guest writes are
copy-on-write and never reach the file. Python's ``mmap`` module cannot map at
a fixed address, hence libc ``mmap`` through ctypes.

Every guest address is bounds-checked against the slots before any host
pointer is formed, so neither a plan nor a guest access can reach host memory
outside the RAM mapping.
"""

from __future__ import annotations

import ctypes
import os

from ..boot.plan import E820_RAM, Chunk, FileRange, MemoryRange
from ..errors import BootError, GuestError, UsageError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# <sys/mman.h>, x86-64 Linux values.
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000  # do not reserve swap: a 4 GiB guest costs what it touches
MAP_FAILED = ctypes.c_void_p(-1).value

FOUR_GIB = 1 << 32
# Where RAM stops below 4 GiB when the plan gives no memory map: the 32-bit
# MMIO hole (LAPIC, IOAPIC, PCI) lives in [3 GiB, 4 GiB), RAM beyond it
# continues at 4 GiB. Matches boot/layout's gap.
DEFAULT_MMIO_GAP_START = 3 << 30

MIN_MEMORY = 2 << 20  # below this no kernel and no start_info fit
MAX_MEMORY = 1 << 40  # MAP_NORESERVE makes it cheap, but KVM and sanity stop here

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory_size(value: str | int) -> int:
    """'128M', '1G', '512' (MiB, as QEMU's -m) or an int of bytes -> bytes.

    Raises UsageError for anything else, or for sizes outside what a guest
    can use, or not a multiple of 4 KiB.
    """
    if isinstance(value, bool):
        raise UsageError(f"memory size must be a number of bytes or a string like 128M, not {value!r}")
    if isinstance(value, int):
        size = value
        shown = f"{value} bytes"
    else:
        number, unit = _split_size(str(value))
        if number is None:
            raise UsageError(
                f"bad memory size {value!r}: use a number with an optional K, M, G suffix (e.g. 128M)"
            )
        size = number * _UNITS[unit]
        shown = str(value).strip()
    if size < MIN_MEMORY or size > MAX_MEMORY:
        raise UsageError(f"memory size {shown} is out of range: use between 2M and 1T (e.g. 128M)")
    if size % PAGE_SIZE:
        raise UsageError(f"memory size {shown} is not a multiple of 4K")
    return size


def _split_size(text: str) -> tuple[int | None, str]:
    """'128M' -> (128, 'm'); '1GiB' -> (1, 'g'); '512' -> (512, ''); junk -> (None, '').

    Hand-written rather than a regex: ``re`` is not otherwise on the boot path.
    """
    s = text.strip().lower()
    for suffix in ("ib", "b"):
        if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "kmgt":
            s = s[: -len(suffix)]
            break
    unit = ""
    if s and s[-1] in "kmgt":
        unit, s = s[-1], s[:-1].rstrip()
    if not s or not s.isascii() or not s.isdigit():
        return None, ""
    return int(s), unit


class RamSlot:
    """One KVM memory slot: guest-physical range backed at host_offset into RAM."""

    __slots__ = ("slot", "guest_addr", "size", "host_offset")

    def __init__(self, slot: int, guest_addr: int, size: int, host_offset: int) -> None:
        self.slot = slot
        self.guest_addr = guest_addr
        self.size = size
        self.host_offset = host_offset

    def __eq__(self, other) -> bool:
        return isinstance(other, RamSlot) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, int, int, int]:
        return (self.slot, self.guest_addr, self.size, self.host_offset)

    def __repr__(self) -> str:
        return (
            f"RamSlot(slot={self.slot}, guest_addr={self.guest_addr:#x}, size={self.size:#x}, "
            f"host_offset={self.host_offset:#x})"
        )

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size


class LoadStats:
    """What loading a plan cost: bytes mapped from files, copied, and left zero."""

    __slots__ = ("mapped_bytes", "copied_bytes", "zeroed_bytes", "mappings")

    def __init__(self) -> None:
        self.mapped_bytes = 0
        self.copied_bytes = 0
        self.zeroed_bytes = 0
        self.mappings = 0

    def __repr__(self) -> str:
        return (
            f"LoadStats(mapped={self.mapped_bytes}, copied={self.copied_bytes}, "
            f"zeroed={self.zeroed_bytes}, mappings={self.mappings})"
        )


def plan_slots(memory_size: int, memory_map: list[MemoryRange] | None = None) -> list[RamSlot]:
    """Split guest RAM into a slot below 4 GiB and, if needed, one above.

    The low slot runs from 0 to the end of the highest RAM range below 4 GiB
    (it also backs the ISA hole, which the memory map marks reserved: real
    machines have RAM or ROM there and firmware-less guests expect it
    readable). RAM above 4 GiB gets its own slot; the MMIO gap between is not
    backed, so guest accesses there exit as MMIO.
    """
    ram = [r for r in (memory_map or []) if r.type == E820_RAM]
    if ram:
        low_end = max((min(r.end, FOUR_GIB) for r in ram if r.addr < FOUR_GIB), default=0)
        high = [r for r in ram if r.end > FOUR_GIB]
        high_end = max((r.end for r in high), default=FOUR_GIB)
        high_size = high_end - FOUR_GIB
    else:
        low_end = min(memory_size, DEFAULT_MMIO_GAP_START)
        high_size = memory_size - low_end
    low_end = _align_up(low_end, PAGE_SIZE)
    high_size = _align_up(high_size, PAGE_SIZE)
    slots = [RamSlot(0, 0, low_end, 0)]
    if high_size:
        slots.append(RamSlot(1, FOUR_GIB, high_size, low_end))
    return slots


class GuestMemory:
    """Guest RAM in one anonymous MAP_NORESERVE mapping, addressed by guest-physical address."""

    def __init__(self, memory_size: int, memory_map: list[MemoryRange] | None = None) -> None:
        self.slots = plan_slots(memory_size, memory_map)
        self.host_size = sum(s.size for s in self.slots)
        addr = _mmap(
            None,
            self.host_size,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
            -1,
            0,
        )
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise GuestError(
                f"cannot reserve {self.host_size >> 20} MiB of guest RAM: {os.strerror(err)}"
            )
        self.host_addr: int = addr
        self._view = memoryview((ctypes.c_ubyte * self.host_size).from_address(addr)).cast("B")
        self.stats = LoadStats()

    # --- address translation -------------------------------------------------

    def _host_offset(self, gpa: int, length: int) -> int:
        """Offset into the RAM mapping of [gpa, gpa+length), which must lie in one slot."""
        if gpa < 0 or length < 0:
            raise GuestError(f"negative guest address or length ({gpa:#x}, {length})")
        for s in self.slots:
            if s.guest_addr <= gpa and gpa + length <= s.guest_end:
                return s.host_offset + (gpa - s.guest_addr)
        raise GuestError(
            f"guest range [{gpa:#x}, {gpa + length:#x}) is not inside guest RAM ({self.describe()})"
        )

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(s.guest_addr <= gpa and gpa + length <= s.guest_end for s in self.slots)

    def host_address(self, gpa: int, length: int = 1) -> int:
        return self.host_addr + self._host_offset(gpa, length)

    def describe(self) -> str:
        return ", ".join(f"[{s.guest_addr:#x}, {s.guest_end:#x})" for s in self.slots)

    def read(self, gpa: int, length: int) -> bytes:
        off = self._host_offset(gpa, length)
        return bytes(self._view[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self._host_offset(gpa, len(data))
        self._view[off : off + len(data)] = data

    # --- loading a plan -------------------------------------------------------

    def load_chunks(self, chunks: list[Chunk]) -> LoadStats:
        """Place every chunk; raises BootError before writing anything if one lies outside RAM."""
        for chunk in chunks:
            if chunk.size < chunk.data_length:
                raise BootError(
                    f"{chunk.label}: {chunk.data_length} bytes of data do not fit its size {chunk.size}"
                )
            if not self.contains(chunk.addr, chunk.size):
                raise BootError(
                    f"{chunk.label} at [{chunk.addr:#x}, {chunk.end:#x}) ({chunk.size} bytes) "
                    f"is outside guest RAM {self.describe()}: give the guest more memory (--memory)"
                )
        files: dict[str, tuple[int, int]] = {}  # path -> (fd, size): each kernel opened once
        try:
            for chunk in chunks:
                if isinstance(chunk.source, FileRange):
                    self._load_file_range(chunk.addr, chunk.source, files)
                else:
                    self.write(chunk.addr, chunk.source)
                    self.stats.copied_bytes += len(chunk.source)
                # Bytes between the data and chunk.size stay zero: they lie in
                # anonymous RAM never written before, or in a copied tail page
                # (file mappings cover only pages wholly inside the data), so an
                # explicit memset would only cost RSS.
                self.stats.zeroed_bytes += chunk.size - chunk.data_length
        finally:
            for fd, _ in files.values():
                os.close(fd)
        return self.stats

    def _load_file_range(self, gpa: int, src: FileRange, files: dict) -> None:
        if src.path not in files:
            fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
            files[src.path] = (fd, os.fstat(fd).st_size)
        fd, file_size = files[src.path]
        if src.offset < 0 or src.offset + src.length > file_size:
            raise BootError(
                f"{src.path}: bytes [{src.offset:#x}, {src.offset + src.length:#x}) "
                f"are past the end of the file ({file_size} bytes)"
            )
        start, end = gpa, gpa + src.length
        map_start = _align_up(start, PAGE_SIZE)
        map_end = _align_down(end, PAGE_SIZE)
        congruent = (gpa - src.offset) % PAGE_SIZE == 0
        if not congruent or map_end <= map_start:
            self._copy_from_file(fd, gpa, src.offset, src.length)
            return
        # unaligned head and tail are copied; whole pages in between are mapped
        if map_start > start:
            self._copy_from_file(fd, start, src.offset, map_start - start)
        if end > map_end:
            self._copy_from_file(fd, map_end, src.offset + (map_end - start), end - map_end)
        host = self.host_address(map_start, map_end - map_start)
        file_off = src.offset + (map_start - start)
        got = _mmap(
            host,
            map_end - map_start,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_FIXED,
            fd,
            file_off,
        )
        if got != host:
            err = ctypes.get_errno()
            raise BootError(f"cannot map {src.path} into guest RAM: {os.strerror(err)}")
        self.stats.mapped_bytes += map_end - map_start
        self.stats.mappings += 1

    def _copy_from_file(self, fd: int, gpa: int, offset: int, length: int) -> None:
        off = self._host_offset(gpa, length)
        view = self._view[off : off + length]
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise BootError(f"short read from kernel file at offset {offset + done:#x}")
            done += n
        self.stats.copied_bytes += length

    def close(self) -> None:
        if self.host_addr:
            self._view.release()
            _munmap(self.host_addr, self.host_size)
            self.host_addr = 0

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _align_down(value: int, align: int) -> int:
    return value // align * align
