"""The vmlinux ELF inside a bzImage (or a compressed ELF), on disk, cached.

Booting a bzImage through PVH needs its payload ELF decompressed. That is
done once per image: the result is kept at
``$PVHBOOT_CACHE/vmlinux/<sha256 of the image>.vmlinux`` (default base
``~/.cache/pvhboot``) with a small sidecar ``<sha256>.json``. A warm hit costs
hashing the image (or not even that: see the stat memo below) and a cheap
validation of the entry; nothing is decompressed (:data:`DECOMPRESSIONS`
counts the runs, so tests can prove it).

The payload is untrusted input. It is decompressed in a child process
(``os.fork`` when this process has a single thread, else a fresh interpreter
running :mod:`pvhboot.image._extract_worker`) with an address-space limit,
a CPU-time limit and a wall-clock timeout, so a hostile stream costs the
parent an error message and nothing else. The child writes straight into a
temporary file in the cache directory; the parent checks its exit status,
then checks the result with :func:`pvhboot.image.elf.parse_elf`, fsyncs it
and renames it into place, so an entry is either a complete, valid ELF or
absent. Entries are made read-only (0444) so that an accidental write fails,
and the sidecar records the entry's identity (inode, size, mtime, ctime):
any later write, chmod or replacement changes it, and the entry is rebuilt.
"""

from __future__ import annotations

import os

from ..errors import CodecError, ImageError

# Counts decompressions actually run by this process (cold misses and
# use_cache=False); a warm hit leaves it alone.
DECOMPRESSIONS = 0

# Largest vmlinux accepted. Distribution kernels are 50-70 MB, allyesconfig
# builds a few hundred MB; a stream that wants more is broken or hostile.
MAX_VMLINUX = 1 << 30
# The child may map this much beyond what it inherits from the parent: the
# decoders' buffers, lzma's 64 MiB dictionary or zstd's 128 MiB window, with
# room to spare. Output goes to a file, not to memory.
CHILD_EXTRA_MEMORY = 768 << 20
CHILD_CPU_SECONDS = 60
CHILD_TIMEOUT = 120.0

ELF_MAGIC = b"\x7fELF"
# Sidecar check, on every warm hit, with no hashing of the whole entry
# (50-70 MB: tens of ms, far over the 5 ms issue 4 allows a warm hit):
# - the entry's fstat identity (size, mtime_ns, ctime_ns, inode, device) as
#   it was right after the final rename. Writing the file in place (anywhere,
#   same size included), chmod-ing it or putting another file there changes
#   mtime/ctime/inode, and ctime cannot be set back by anyone, so this catches
#   damage in the middle that the spans below would miss;
# - the first and last CHECK_SPAN bytes hashed, and the ELF headers in range:
#   a second net for a file whose stat we cannot trust (e.g. a restored copy
#   on a filesystem with coarse timestamps).
# A copied or restored cache gets new inodes and is rebuilt once: a fair price.
CHECK_SPAN = 64 << 10
# 2: the sidecar records the entry's stat identity ("stat"); entries are 0444.
SIDECAR_VERSION = 2
ENTRY_MODE = 0o444
# Exit status the child uses to say "the message on the pipe is the error".
_CHILD_REPORTED = 3


class CachedVmlinux:
    """Where the vmlinux ELF is, and how it got there.

    A plain class rather than a dataclass: ``dataclasses`` pulls in
    ``inspect`` and costs ~10 ms of imports on the boot path.
    """

    __slots__ = ("path", "hit", "codec", "sha256", "temporary")

    def __init__(self, path: str, hit: bool, codec: str | None, sha256: str,
                 temporary: bool = False):
        self.path = path  # an ELF file
        self.hit = hit  # True: served from the cache, nothing decompressed
        self.codec = codec  # payload codec; None when the input already was an ELF
        self.sha256 = sha256  # of the image file
        self.temporary = temporary  # a private file that cleanup() removes

    def __repr__(self) -> str:
        return (f"CachedVmlinux(path={self.path!r}, hit={self.hit}, codec={self.codec!r}, "
                f"sha256={self.sha256!r}, temporary={self.temporary})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, CachedVmlinux):
            return NotImplemented
        return (self.path, self.hit, self.codec, self.sha256) == (
            other.path, other.hit, other.codec, other.sha256)

    __hash__ = None

    def cleanup(self) -> None:
        """Remove the file if it is a private temporary (use_cache=False).

        Callers that forget are covered: temporaries still present when the
        process exits are removed then (a mapping of the file stays valid
        after the unlink, so the VMM may call this as soon as it has mapped).
        """
        if self.temporary:
            _TEMPORARIES.discard(self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# use_cache=False files not cleaned up yet; removed at exit (a 50-70 MB
# vmlinux per --no-cache boot would otherwise pile up in /tmp).
_TEMPORARIES: set[str] = set()


def _remember_temporary(path: str) -> None:
    if not _TEMPORARIES:
        import atexit

        atexit.register(_remove_temporaries)
    _TEMPORARIES.add(path)


def _remove_temporaries() -> None:
    for path in list(_TEMPORARIES):
        _TEMPORARIES.discard(path)
        try:
            os.unlink(path)
        except OSError:
            pass


def cache_dir_default() -> str:
    base = os.environ.get("PVHBOOT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pvhboot"
    )
    return os.path.join(base, "vmlinux")


def get_vmlinux(image_path, *, use_cache: bool = True, cache_dir=None) -> CachedVmlinux:
    """The vmlinux ELF of ``image_path`` (a bzImage or compressed ELF) as a file.

    ``cache_dir`` is the directory holding the entries (default
    ``$PVHBOOT_CACHE/vmlinux``). With ``use_cache=False`` the ELF goes to a
    private temporary file; call ``.cleanup()`` when done with it.
    """
    import mmap

    path = os.fspath(image_path)
    directory = os.fspath(cache_dir) if cache_dir is not None else cache_dir_default()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise ImageError(f"{path}: the file is empty; not a kernel image")
        if use_cache:
            hit = _memo_hit(directory, st)
            if hit is not None:
                return hit
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with mm:
        global HASHES
        HASHES += 1
        import hashlib  # here, not at the top: the decompression child never hashes

        sha = hashlib.sha256(mm).hexdigest()
        kind, codec, start, length = _locate(mm, path)
        if kind == "elf":
            return CachedVmlinux(path, False, None, sha)
        if not use_cache:
            import tempfile

            try:
                fd, tmp = tempfile.mkstemp(prefix="pvhboot-vmlinux-", suffix=".elf")
            except OSError as exc:
                raise ImageError(
                    f"{path}: cannot create a temporary file for its vmlinux in "
                    f"{tempfile.gettempdir()}: {exc.strerror}; set TMPDIR to a writable "
                    "directory"
                ) from None
            try:
                _decompress_file(mm, path, codec, start, length, fd, tmp, durable=False)
            except BaseException:
                _unlink(tmp)
                raise
            finally:
                os.close(fd)
            _remember_temporary(tmp)
            return CachedVmlinux(tmp, False, codec, sha, temporary=True)

        entry = os.path.join(directory, sha + ".vmlinux")
        sidecar = os.path.join(directory, sha + ".json")
        if _valid_entry(entry, sidecar, sha) is not None:
            _memo_store(directory, st, sha)
            return CachedVmlinux(entry, True, codec, sha)
        _unlink(sidecar)  # stale or corrupt: rebuild from scratch
        _unlink(entry)
        _build_entry(mm, path, codec, start, length, directory, entry, sidecar, sha)
        _memo_store(directory, st, sha)
        return CachedVmlinux(entry, False, codec, sha)


# --- the stat memo: a warm hit without re-hashing ------------------------------

# Hashing Debian's 14 MB image costs ~10 ms, more than issue 4 allows a warm
# hit to add over booting the vmlinux directly (5 ms). So the cache also
# remembers, per (device, inode, size, mtime, ctime) of an image, the SHA-256
# it had. Any write to the file changes its ctime, which nobody can set back,
# so a changed file gets a new key. The one hole is a write within the
# timestamp granularity of the last one (the kernel's coarse clock ticks every
# few ms); a memo is therefore only recorded for a file whose timestamps are
# older than STAT_MEMO_MIN_AGE_NS, so any later write lands on a later tick.
STAT_MEMO_MIN_AGE_NS = 2_000_000_000
STAT_MEMO_DIR = "by-stat"
# Counts SHA-256 runs over an image (tests prove the memo skips them).
HASHES = 0


def _stat_key(st) -> str:
    return (f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-"
            f"{st.st_ctime_ns:x}")


def _memo_hit(directory: str, st) -> CachedVmlinux | None:
    try:
        with open(os.path.join(directory, STAT_MEMO_DIR, _stat_key(st)), "rb") as f:
            sha = f.read(65).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
        return None
    meta = _valid_entry(os.path.join(directory, sha + ".vmlinux"),
                        os.path.join(directory, sha + ".json"), sha)
    if meta is None:
        return None  # the slow path re-hashes, checks again and rebuilds
    codec = meta.get("codec")
    return CachedVmlinux(os.path.join(directory, sha + ".vmlinux"), True,
                         codec if isinstance(codec, str) else None, sha)


def _memo_store(directory: str, st, sha: str) -> None:
    import time

    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < STAT_MEMO_MIN_AGE_NS:
        return  # too fresh: a write in the same clock tick would go unseen
    memo_dir = os.path.join(directory, STAT_MEMO_DIR)
    path = os.path.join(memo_dir, _stat_key(st))
    tmp = f"{path}.{os.getpid()}.part"
    try:
        os.makedirs(memo_dir, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(sha)
        os.replace(tmp, path)
    except OSError:
        _unlink(tmp)  # only an optimisation: a missing memo means re-hashing


# --- where the compressed ELF is ----------------------------------------------


def _locate(mm, path: str):
    """(kind, codec, start, length): kind is 'elf', 'bzimage' or 'compressed-elf'."""
    from .bzimage import is_bzimage
    from .compression import CODECS, detect_codec

    head = bytes(mm[:16])
    if head.startswith(ELF_MAGIC):
        return "elf", None, 0, len(mm)
    if is_bzimage(mm):
        start, length = _payload_range(mm, path)
        codec = detect_codec(mm[start : start + 16])
        if codec is None:
            raise ImageError(
                f"{path}: the bzImage payload at {start:#x} starts with "
                f"{bytes(mm[start : start + 4]).hex()}, which is none of Linux's codecs "
                f"({' '.join(CODECS)})"
            )
        return "bzimage", codec, start, length
    codec = detect_codec(head)
    if codec is None:
        raise ImageError(
            f"{path}: not a kernel image: no ELF magic, no bzImage 'HdrS' header and no "
            "known compression magic"
        )
    return "compressed-elf", codec, 0, len(mm)


def _payload_range(mm, path: str) -> tuple[int, int]:
    from .bzimage import parse_bzimage

    bz = parse_bzimage(mm, what=path)
    reason = bz.no_payload_reason()
    if reason:
        raise ImageError(f"{path}: {reason}")
    return bz.payload_offset, bz.payload_length


# --- the cache entry -----------------------------------------------------------


def _sha256_hex(data: bytes) -> str:
    """SHA-256 of a small buffer, without loading OpenSSL on the warm path.

    ``hashlib`` imports ``_hashlib`` (OpenSSL): about 2 ms, almost half of
    what issue 4 allows a warm hit to add over booting the vmlinux itself.
    CPython's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before) is a
    cheap import and just as good for two 64 KiB spans.
    """
    import sys

    # Ask for the module this Python has: a failed import searches all of sys.path.
    try:
        if sys.version_info >= (3, 12):
            from _sha2 import sha256
        else:
            from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    return sha256(data).hexdigest()


def _valid_entry(entry: str, sidecar: str, sha: str) -> dict | None:
    """The sidecar's metadata when the entry checks out, else None."""
    import json

    try:
        with open(sidecar, "rb") as f:
            meta = json.loads(f.read(4096))
        fd = os.open(entry, os.O_RDONLY)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if not isinstance(meta, dict) or meta.get("version") != SIDECAR_VERSION:
            return None
        if meta.get("image_sha256") != sha or meta.get("size") != size:
            return None
        if meta.get("stat") != _identity(st):
            return None  # written, chmod-ed or replaced since we built it
        head = os.pread(fd, CHECK_SPAN, 0)
        tail = os.pread(fd, CHECK_SPAN, max(0, size - CHECK_SPAN))
        if meta.get("head") != _sha256_hex(head):
            return None
        if meta.get("tail") != _sha256_hex(tail):
            return None
        return meta if _elf_headers_in_range(head, size) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _identity(st) -> list[int]:
    """What the sidecar records of the entry's fstat (a list: JSON has no tuples)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _elf_headers_in_range(head: bytes, size: int) -> bool:
    """ELF magic, and the program headers' file ranges inside ``size`` bytes."""
    import struct

    if len(head) < 64 or not head.startswith(ELF_MAGIC) or head[4] != 2 or head[5] != 1:
        return False  # the x86-64 vmlinux is ELFCLASS64, little-endian
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phentsize < 56 or phoff + phentsize * phnum > len(head):
        return False
    for i in range(phnum):
        _, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", head, phoff + i * phentsize)
        if offset + filesz > size:
            return False
    return True


def _build_entry(mm, path, codec, start, length, directory, entry, sidecar, sha) -> None:
    import json
    import tempfile

    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + sha[:16], suffix=".part")
    except OSError as exc:
        raise ImageError(
            f"cannot write the vmlinux cache in {directory}: {exc.strerror}; set PVHBOOT_CACHE "
            "to a writable directory or boot with --no-cache"
        ) from None
    meta_tmp = None
    try:
        try:
            _decompress_file(mm, path, codec, start, length, fd, tmp)
            size = os.fstat(fd).st_size
            head = os.pread(fd, CHECK_SPAN, 0)
            tail = os.pread(fd, CHECK_SPAN, max(0, size - CHECK_SPAN))
            # Read-only, so a stray write fails instead of silently damaging
            # the entry (root still can: the stat identity catches that).
            os.fchmod(fd, ENTRY_MODE)
            # The ELF first, then the sidecar that vouches for it: a crash in
            # between leaves an entry without a sidecar, which is rebuilt.
            os.replace(tmp, entry)
            # fstat of our own descriptor after the rename (which itself
            # changes ctime): the identity of the inode we wrote, even if
            # another process has already put its own file at ``entry``
            # (then the identities differ and that entry is rebuilt).
            ident = _identity(os.fstat(fd))
        finally:
            os.close(fd)
        meta = {
            "version": SIDECAR_VERSION,
            "image_sha256": sha,
            "image": os.path.abspath(path),
            "codec": codec,
            "size": size,
            "head": _sha256_hex(head),
            "tail": _sha256_hex(tail),
            "stat": ident,
        }
        mfd, meta_tmp = tempfile.mkstemp(dir=directory, prefix="." + sha[:16], suffix=".json")
        with open(mfd, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, sidecar)
        _fsync_dir(directory)
    except BaseException as exc:
        _unlink(tmp)
        if meta_tmp:
            _unlink(meta_tmp)
        if isinstance(exc, OSError):  # ENOSPC, EIO, ...: say where, not a temp name
            raise ImageError(
                f"cannot write the vmlinux cache in {directory}: {exc.strerror or exc}; free "
                "some space, set PVHBOOT_CACHE to a writable directory or boot with --no-cache"
            ) from None
        raise


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except (FileNotFoundError, NotADirectoryError):
        pass


# --- decompression in a child process -----------------------------------------


def _decompress_file(mm, path, codec, start, length, fd: int, tmp: str, durable=True) -> None:
    """Decompress mm[start:start+length] into ``fd`` (the file ``tmp``) in a
    child process under limits, then check the result and (for a cache entry,
    which must survive a crash) fsync it. A private temporary file needs no
    fsync: it dies with the boot that uses it."""
    global DECOMPRESSIONS
    DECOMPRESSIONS += 1
    what = f"decompressing the {codec} payload of {path} failed"
    if _single_threaded():
        _run_forked(mm, codec, start, length, fd, what)
    else:
        _run_worker(path, codec, start, length, tmp, what)
    head = os.pread(fd, 4, 0)
    if head != ELF_MAGIC:
        raise ImageError(
            f"{path}: the {codec} payload does not decompress to an ELF (it starts with "
            f"{head.hex() or 'nothing'}); not a Linux kernel payload"
        )
    from .elf import elf_file_problem

    problem = elf_file_problem(fd)
    if problem:
        raise ImageError(f"{path}: its {codec} payload is not a valid ELF: {problem}; "
                         "the image is corrupt or not a Linux kernel")
    if durable:
        os.fsync(fd)


def _single_threaded() -> bool:
    # fork() in a process with other threads may copy a lock some thread
    # holds; a fresh interpreter is the safe way then.
    import threading

    return threading.active_count() == 1


def child_limits() -> tuple[int, int]:
    """(RLIMIT_AS bytes, RLIMIT_CPU seconds) for a decompression child."""
    return _address_space_now() + CHILD_EXTRA_MEMORY, CHILD_CPU_SECONDS


def _address_space_now() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[0])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 256 << 20


def apply_limits(address_space: int, cpu_seconds: int) -> None:
    """Set the child's limits; called in the child before it touches the data."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # A crashing decoder must not leave a core dump the size of its heap.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(codec: str, src, fd: int) -> None:
    """The child's work: decompress src into fd (read-write: zstd maps it).
    Raises CodecError/ImageError."""
    from .compression import decompress_to_fd

    decompress_to_fd(codec, src, fd, max_output=MAX_VMLINUX)


def _run_forked(mm, codec, start, length, fd, what) -> None:
    address_space, cpu = child_limits()
    # Import the decoders before forking so the child does not pay for (or
    # fail on, under its memory limit) the imports.
    from . import compression  # noqa: F401

    rpipe, wpipe = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        status = 0
        try:
            os.close(rpipe)
            apply_limits(address_space, cpu)
            with memoryview(mm) as view:
                run_child(codec, view[start : start + length], fd)
        except BaseException as exc:  # report every failure as one line, then exit
            status = _CHILD_REPORTED
            try:
                os.write(wpipe, _child_message(exc).encode("utf-8", "replace")[:4000])
            except BaseException:
                pass
        finally:
            os._exit(status)
    os.close(wpipe)
    try:
        message = _collect(rpipe, pid, what)
    except BaseException:
        # Ctrl-C (or anything else) in the parent: never leave the child
        # running or unreaped.
        _kill_and_reap(pid)
        raise
    finally:
        os.close(rpipe)
    _, wait_status = os.waitpid(pid, 0)
    _check_status(wait_status, message, what)


def _kill_and_reap(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _collect(rfd: int, pid: int, what: str) -> bytes:
    """Read the child's message until it closes the pipe (exits), or kill it
    when CHILD_TIMEOUT passes."""
    import select
    import time

    deadline = time.monotonic() + CHILD_TIMEOUT
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill_and_reap(pid)
            raise CodecError(
                f"{what}: it ran longer than {CHILD_TIMEOUT:.0f} s and was stopped; "
                "the payload is hostile or corrupt"
            )
        ready, _, _ = select.select([rfd], [], [], left)
        if ready:
            data = os.read(rfd, 4096)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def _child_message(exc: BaseException) -> str:
    from ..errors import PvhbootError

    if isinstance(exc, PvhbootError):
        kind = "image" if not isinstance(exc, CodecError) else "codec"
        return f"{kind}\t{exc}"
    if isinstance(exc, MemoryError):
        return "codec\tit needs more memory than the child's limit allows"
    if isinstance(exc, OSError):
        return f"image\tcannot write the output: {exc.strerror or exc}"
    return f"codec\t{type(exc).__name__}: {exc}"


def _check_status(wait_status: int, message: bytes, what: str) -> None:
    import signal

    if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0:
        return
    text = message.decode("utf-8", "replace").strip().replace("\n", " ")
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and not text:
            raise CodecError(
                f"{what}: it used more than {CHILD_CPU_SECONDS} s of CPU and was stopped; "
                "the payload is hostile or corrupt"
            )
        raise CodecError(
            f"{what}: the decoder died with signal {signal.Signals(sig).name}; "
            "the payload is hostile or corrupt"
        )
    kind, _, detail = text.partition("\t")
    if not detail:
        detail = f"the child exited with status {os.WEXITSTATUS(wait_status)}"
    cls = ImageError if kind == "image" else CodecError
    raise cls(f"{what}: {detail}")


def _run_worker(path, codec, start, length, tmp, what) -> None:
    """Decompress through ``python -m pvhboot.image._extract_worker``."""
    import subprocess
    import sys

    _, cpu = child_limits()
    # The worker limits itself to its own baseline plus the decoders' share,
    # as a forked child is limited to the parent's baseline plus that share.
    cmd = [
        sys.executable,
        "-m",
        "pvhboot.image._extract_worker",
        path,
        codec,
        str(start),
        str(length),
        tmp,
        str(CHILD_EXTRA_MEMORY),
        str(cpu),
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=CHILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise CodecError(
            f"{what}: it ran longer than {CHILD_TIMEOUT:.0f} s and was stopped; "
            "the payload is hostile or corrupt"
        ) from None
    if proc.returncode < 0:
        wait_status = -proc.returncode  # WIFSIGNALED form for _check_status
    else:
        wait_status = proc.returncode << 8
    _check_status(wait_status, proc.stderr[-4000:], what)
