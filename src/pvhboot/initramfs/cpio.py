"""A cpio "newc" archive writer, the format Linux unpacks as an initramfs.

Format facts come from Linux ``Documentation/driver-api/early-userspace/
buffer-format.rst`` (the kernel's reader is ``init/initramfs.c``) and the
cpio(5) manual page ("New ASCII Format").

The output is deterministic: every entry gets the same mtime, inode numbers
are assigned in order, and :func:`write_archive` sorts entries by path so
parents come before children. Two runs over the same inputs give the same
bytes, so an initramfs can be cached and compared by hash.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import UsageError

# cpio(5) "New ASCII Format": six-byte magic, then 13 fields of 8 hex digits.
NEWC_MAGIC = b"070701"
NEWC_FIELDS = 13
NEWC_HEADER_SIZE = len(NEWC_MAGIC) + NEWC_FIELDS * 8  # 110 bytes
# Header+name and file data are each padded to a multiple of 4 bytes
# (buffer-format.rst: "padded to a multiple of four bytes").
NEWC_ALIGN = 4
# The archive ends with an entry of this name (buffer-format.rst).
TRAILER_NAME = "TRAILER!!!"
# The fields are 8 hex digits wide, so nothing can exceed 32 bits.
FIELD_MAX = 0xFFFFFFFF

# A fixed mtime keeps archives reproducible (the kernel only uses it to set
# inode times when CONFIG_INITRAMFS_PRESERVE_MTIME is on).
DEFAULT_MTIME = 0


def _pad(length: int) -> bytes:
    return b"\0" * (-length % NEWC_ALIGN)


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (S_IF*).

    ``data`` is the file content for a regular file and the link target for
    a symlink; directories and device nodes have none. ``rdev`` is
    (major, minor) for character and block devices.
    """

    path: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev: tuple[int, int] = (0, 0)
    nlink: int | None = None  # default: 2 for directories, 1 otherwise

    @property
    def name(self) -> str:
        # Members are named relative to the archive root: the kernel's
        # initramfs unpacker and `cpio -i` both expect "dev/console", not
        # "/dev/console"; "." stands for the root itself.
        name = self.path.strip("/")
        return name or "."


def directory(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | (mode & 0o7777))


def regular_file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | (mode & 0o7777), bytes(data))


def symlink(path: str, target: str) -> Entry:
    # Symlink permissions are ignored by Linux; 0777 is what `ln -s` makes.
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | (mode & 0o7777), rdev=(major, minor))


class CpioWriter:
    """Streams newc entries to a binary file object.

    Call :meth:`add` for each entry (parents first), then :meth:`close` to
    write the trailer. Usable as a context manager; the trailer is written
    only when the block exits without an exception.
    """

    def __init__(self, out: BinaryIO, *, mtime: int = DEFAULT_MTIME):
        self._out = out
        self._mtime = mtime
        self._next_ino = 1  # inode 0 is left to the trailer, as GNU cpio does
        self._names: set[str] = set()
        self._closed = False
        self.bytes_written = 0

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.bytes_written += len(data)

    def _header(self, name: bytes, *, ino: int, mode: int, uid: int, gid: int, nlink: int,
                filesize: int, rdev: tuple[int, int]) -> bytes:
        # namesize counts the terminating NUL (buffer-format.rst).
        namesize = len(name) + 1
        fields = (
            ino, mode, uid, gid, nlink, self._mtime, filesize,
            0, 0,  # devmajor/devminor: the filesystem the file came from; unused
            rdev[0], rdev[1],
            namesize,
            0,  # check: only meaningful for the "070702" CRC format
        )
        for value in fields:
            if not 0 <= value <= FIELD_MAX:
                raise UsageError(
                    f"initramfs entry {name.decode(errors='replace')!r}: value {value} does not "
                    "fit a cpio newc field (32 bits); use a smaller file or id"
                )
        head = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
        return head + name + b"\0" + _pad(NEWC_HEADER_SIZE + namesize)

    def add(self, entry: Entry) -> None:
        if self._closed:
            raise UsageError("initramfs: entry added after the archive was closed")
        name = entry.name
        if name == TRAILER_NAME:
            raise UsageError(f"initramfs: {TRAILER_NAME!r} is reserved for the archive end")
        if name in self._names:
            raise UsageError(f"initramfs: {name!r} is listed twice; give each path once")
        if name.split("/")[0] == ".." or "/../" in f"/{name}/":
            raise UsageError(f"initramfs: {entry.path!r} leaves the archive root; use an "
                             "absolute path inside it")
        kind = stat.S_IFMT(entry.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK):
            raise UsageError(f"initramfs: {entry.path!r} has unsupported file type "
                             f"{kind:#o}; only files, directories, symlinks and devices")
        if entry.data and kind not in (stat.S_IFREG, stat.S_IFLNK):
            raise UsageError(f"initramfs: {entry.path!r} is not a file or symlink but has data")
        self._names.add(name)
        nlink = entry.nlink if entry.nlink is not None else (2 if kind == stat.S_IFDIR else 1)
        encoded = name.encode()
        self._write(self._header(
            encoded, ino=self._next_ino, mode=entry.mode, uid=entry.uid, gid=entry.gid,
            nlink=nlink, filesize=len(entry.data), rdev=entry.rdev,
        ))
        self._next_ino += 1
        if entry.data:
            self._write(entry.data)
            self._write(_pad(len(entry.data)))

    def close(self) -> None:
        """Write the TRAILER!!! entry. Idempotent."""
        if self._closed:
            return
        self._write(self._header(TRAILER_NAME.encode(), ino=0, mode=0, uid=0, gid=0, nlink=1,
                                 filesize=0, rdev=(0, 0)))
        self._closed = True


def write_archive(out: BinaryIO, entries: Iterable[Entry], *, mtime: int = DEFAULT_MTIME,
                  sort: bool = True) -> int:
    """Write ``entries`` (sorted by path unless ``sort=False``) and the trailer.

    Returns the number of bytes written. Sorting by path components puts every
    directory before what it contains, which the kernel's unpacker needs (it
    does not create missing parents).
    """
    items = list(entries)
    if sort:
        items.sort(key=lambda e: e.name.split("/") if e.name != "." else [])
    with CpioWriter(out, mtime=mtime) as writer:
        for entry in items:
            writer.add(entry)
    return writer.bytes_written
