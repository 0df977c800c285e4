"""Build an initramfs from a small spec: which files go where, with what mode.

The kernel unpacks the archive into its rootfs before any driver runs, then
executes ``/init``. Two details matter for a minimal one:

- ``/dev/console`` (char 5:1) must exist in the archive. The kernel opens it
  for init's stdin/stdout/stderr before devtmpfs is mounted; without it
  ``/init`` starts with no file descriptors ("Warning: unable to open an
  initial console").
- Every parent directory must come before its children, because the
  unpacker does not create missing parents. The builder adds them.

The result is reproducible (fixed mtimes, sorted entries, gzip header with no
name and no time), so its hash identifies its contents.
"""

from __future__ import annotations

import gzip
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import UsageError
from . import cpio

# Linux Documentation/admin-guide/devices.txt: char 5:1 is /dev/console.
CONSOLE_MAJOR = 5
CONSOLE_MINOR = 1

# The initramfs decompressors a kernel may have (CONFIG_RD_*); the project's
# test kernel enables RD_GZIP only, and gzip needs nothing outside Python.
COMPRESSIONS = ("none", "gzip")


@dataclass(frozen=True)
class FileSpec:
    """One file of the initramfs.

    ``source`` is a host path to read, or the content itself as bytes.
    ``mode`` is the permission bits; ``None`` keeps a host file's own
    permissions (0644 for bytes).
    """

    dest: str
    source: str | os.PathLike | bytes
    mode: int | None = None


def _as_spec(item) -> FileSpec:
    if isinstance(item, FileSpec):
        return item
    if isinstance(item, tuple) and len(item) in (2, 3):
        return FileSpec(*item)
    raise UsageError(f"initramfs: {item!r} is not (path, source[, mode]); give a FileSpec")


def _normalise(dest: str) -> str:
    parts = [p for p in dest.split("/") if p not in ("", ".")]
    if not parts:
        raise UsageError(f"initramfs: destination {dest!r} names the root; give a file path")
    if ".." in parts:
        raise UsageError(f"initramfs: destination {dest!r} contains '..'; use a plain path")
    return "/" + "/".join(parts)


def _load(spec: FileSpec) -> tuple[bytes, int]:
    if isinstance(spec.source, bytes | bytearray | memoryview):
        return bytes(spec.source), 0o644 if spec.mode is None else spec.mode
    path = Path(spec.source)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"initramfs: {path} is not a regular file; give a file to copy")
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"initramfs: cannot read {path}: {e.strerror}; check the path") from e
    return data, stat.S_IMODE(st.st_mode) if spec.mode is None else spec.mode


def initramfs_entries(
    files: Iterable[FileSpec | tuple],
    *,
    symlinks: dict[str, str] | None = None,
    directories: Iterable[str] = (),
    console: bool = True,
) -> list[cpio.Entry]:
    """The archive members for ``files`` plus their parents, and /dev/console."""
    entries: dict[str, cpio.Entry] = {}
    dirs: set[str] = set()

    def add_parents(dest: str) -> None:
        parent = dest.rsplit("/", 1)[0]
        while parent:
            dirs.add(parent)
            parent = parent.rsplit("/", 1)[0]

    def put(entry: cpio.Entry) -> None:
        if entry.path in entries:
            raise UsageError(f"initramfs: {entry.path} is given twice; list each path once")
        entries[entry.path] = entry
        add_parents(entry.path)

    for item in files:
        spec = _as_spec(item)
        dest = _normalise(spec.dest)
        data, mode = _load(spec)
        put(cpio.regular_file(dest, data, mode))
    for link, target in (symlinks or {}).items():
        put(cpio.symlink(_normalise(link), target))
    for d in directories:
        d = _normalise(d)
        dirs.add(d)
        add_parents(d)
    if console:
        put(cpio.char_device("/dev/console", CONSOLE_MAJOR, CONSOLE_MINOR, 0o600))
    for d in dirs:
        if d in entries:
            raise UsageError(f"initramfs: {d} is both a directory and a file; rename one")
        entries[d] = cpio.directory(d)
    return list(entries.values())


def write_initramfs(out: BinaryIO, entries: Iterable[cpio.Entry], *,
                    compression: str = "gzip") -> None:
    """Write the archive to ``out``, compressed as asked."""
    if compression not in COMPRESSIONS:
        raise UsageError(f"initramfs: unknown compression {compression!r}; "
                         f"use one of {', '.join(COMPRESSIONS)}")
    if compression == "none":
        cpio.write_archive(out, entries)
        return
    # mtime=0 and no file name in the gzip header keep the output reproducible.
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        cpio.write_archive(gz, entries)


def build_initramfs(
    out: str | os.PathLike,
    files: Iterable[FileSpec | tuple],
    *,
    symlinks: dict[str, str] | None = None,
    directories: Iterable[str] = (),
    console: bool = True,
    compression: str = "gzip",
) -> Path:
    """Build an initramfs file at ``out`` (written atomically) and return its path.

    ``files`` holds ``FileSpec`` or ``(dest, source, mode)`` tuples; ``source``
    is a host path or bytes. Parent directories and ``/dev/console`` are added.
    """
    entries = initramfs_entries(files, symlinks=symlinks, directories=directories,
                                console=console)
    out = Path(out)
    _check_output(out)
    directory = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=directory)
    except OSError as e:
        raise UsageError(f"initramfs: cannot write in {directory}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write_initramfs(f, entries, compression=compression)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UsageError(f"initramfs: cannot write {out}: {e.strerror}") from e
        raise
    return out


def _check_output(out: Path) -> None:
    # The atomic rename would replace a device node or symlink with the
    # archive (and fail on a directory): only a regular file may be replaced.
    try:
        st = out.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"initramfs: cannot check the output {out}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"initramfs: {out} exists and is not a regular file; "
                         "give the path of a file to write")
