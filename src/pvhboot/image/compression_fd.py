"""The file paths of :func:`pvhboot.image.compression.decompress_to_fd`.

Kept apart from compression.py, which the boot path imports (for
detect_codec) and which should stay small to load.
"""

from __future__ import annotations

import os

from ..errors import CodecError
from .compression import (
    _SIZE_TRAILER,
    _ZSTD_DID_SIZES,
    _ZSTD_FCS_SIZES,
    LZ4_LEGACY_BLOCK,
    ZSTD_MAX_WINDOW,
    _lz4_blocks,
    _lz4_safe,
    _lzop_blocks,
    _lzop_decode,
    _system_lib,
    _too_big,
    _zstd_frame_end,
    codec_error,
    decompress_to,
)

# --- straight into a file -------------------------------------------------------
#
# ``pvhboot extract`` and the vmlinux cache write a file, so the decoders below
# write it themselves: lz4 and lzo blocks decoded on both threads and written
# in place with os.pwrite, or (zstd, gzip: one stream, one thread) a decode
# straight into a shared mapping of the file while the other thread faults
# its pages in ahead. None holds the whole output in anonymous memory: on
# the VMs this runs on, first touch of fresh memory costs ~0.5 ms per MiB,
# about as much as decoding lz4.
#
# Threads are plain ``_thread`` threads (``threading`` costs imports). A worker
# never outlives the call that started it: every exit path, an error or
# Ctrl-C included, stops it and waits for it (:meth:`_Worker.join`).

# Decoders only start a second thread when a second CPU is there to run it.
_PARALLEL = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
# zstd, gzip: the helper pre-faults the output mapping in steps of this size,
# ahead of the decoder, so that the decoder thread takes fewer page faults.
_POPULATE_STEP = 4 << 20
# ... starting this far in: the decoder faults in the first pages itself.
_POPULATE_LEAD = 1 << 20
# madvise(2) MADV_POPULATE_WRITE (Linux 5.14): fault pages in writable.
_MADV_POPULATE_WRITE = 23


class _Worker:
    """A thread running ``fn(worker, *args)``; :meth:`join` waits for it, always.

    An exception ``fn`` lets out is kept in ``error`` (the decoders record
    their own failures in shared state, so that the first one wins).
    """

    __slots__ = ("error", "stop", "_done")

    def __init__(self, fn, *args):
        import _thread

        self.error: BaseException | None = None
        self.stop = False  # asked to stop early: fn checks it between steps
        self._done = _thread.allocate_lock()
        self._done.acquire()
        _thread.start_new_thread(self._run, (fn, args))

    def _run(self, fn, args) -> None:
        try:
            fn(self, *args)
        except BaseException as exc:  # reported by join's caller
            self.error = exc
        finally:
            self._done.release()

    @classmethod
    def start(cls, fn, *args) -> _Worker | None:
        """A running worker, or None when no thread can be started (a thread
        limit, no memory for its stack): the caller does the work alone."""
        try:
            return cls(fn, *args)
        except RuntimeError:  # _thread.error: "can't start new thread"
            return None

    def join(self) -> None:
        """Wait for the thread; Ctrl-C meanwhile asks it to stop, waits, re-raises."""
        interrupted = None
        while True:
            try:
                self._done.acquire()
                break
            except KeyboardInterrupt as exc:
                interrupted, self.stop = exc, True
        self._done.release()
        if interrupted is not None:
            raise interrupted


class _Pinned:
    """The address of any buffer (a read-only mmap too), held while in use.

    ctypes can only take the address of a writable buffer; a read-only mmap
    (how images are mapped) would need a copy. PyObject_GetBuffer gives the
    address of any exporter and keeps it from being closed or resized until
    PyBuffer_Release.
    """

    __slots__ = ("_view", "_obj", "address")

    def __init__(self, obj):
        import ctypes

        api = _pythonapi()
        self._view = _PyBuffer()
        self._obj = obj
        if api.PyObject_GetBuffer(ctypes.py_object(obj), ctypes.byref(self._view), 0) != 0:
            raise ValueError("the buffer has no contiguous address")
        self.address = self._view.buf or 0

    def release(self) -> None:
        if self._obj is not None:
            import ctypes

            _pythonapi().PyBuffer_Release(ctypes.byref(self._view))
            self._obj = None

    def __enter__(self) -> int:
        return self.address

    def __exit__(self, *exc) -> None:
        self.release()


_PyBuffer = None
_API = None


def _pythonapi():
    global _API, _PyBuffer
    if _API is None:
        import ctypes

        class PyBuffer(ctypes.Structure):  # Py_buffer, Include/pybuffer.h
            _fields_ = [
                ("buf", ctypes.c_void_p),
                ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p),
            ]

        api = ctypes.pythonapi
        api.PyObject_GetBuffer.argtypes = (ctypes.py_object, ctypes.POINTER(PyBuffer),
                                           ctypes.c_int)
        api.PyObject_GetBuffer.restype = ctypes.c_int
        api.PyBuffer_Release.argtypes = (ctypes.POINTER(PyBuffer),)
        api.PyBuffer_Release.restype = None
        _PyBuffer = PyBuffer
        _API = api
    return _API


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``: one pwrite(2) may take less than
    asked (a disk filling up), and what it leaves must not be lost."""
    with memoryview(data) as whole:
        view = whole.cast("B") if whole.format != "B" or whole.ndim != 1 else whole
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(28, "No space left on device (short write)")  # ENOSPC
            view = view[n:]
            offset += n




def decompress_to_fd(codec: str, src, fd: int, *, max_output: int) -> int:
    """See :func:`pvhboot.image.compression.decompress_to_fd`."""
    fast = _FD_DECODERS.get(codec)
    if fast is not None:
        with memoryview(src) as view:
            mv = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            try:
                size = fast(mv, fd, max_output)
            except (CodecError, OSError):
                raise
            except Exception as exc:  # the codec libraries raise their own types
                raise codec_error(codec, exc) from None
        if size is not None:
            os.ftruncate(fd, size)
            return size
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    with open(fd, "wb", buffering=0, closefd=False) as out:
        return decompress_to(codec, src, out, max_output=max_output)


def _on_two_threads(work) -> None:
    """Run ``work(worker)`` on a second thread and ``work(None)`` here, and
    wait for both. The worker is told to stop only when this thread leaves
    abnormally (Ctrl-C outside ``work``'s own handling): on a normal finish
    it must complete the job it has already taken, or that job's block
    would be missing from the file."""
    worker = None
    try:
        worker = _Worker.start(work)
        work(None)
    except BaseException:
        if worker is not None:
            worker.stop = True
        raise
    finally:
        if worker is not None:
            worker.join()


# --- lz4 into a file: blocks decoded on two threads ----------------------------




def _lz4_to_fd(mv: memoryview, fd: int, max_output: int) -> int | None:
    """Both threads take the next block, decode it into their own 8 MiB
    buffer and pwrite it in place.

    Block i lands at i * 8 MiB: the lz4 CLI fills every block but the last.
    A stream where a block before the last is short (another encoder, or two
    frames) makes this return None after all, and the streaming decoder
    writes it. Measured on the 53 MB Debian kernel: 19.5 ms, against 24 ms
    for one thread and 26-28 ms for a decode-here, write-there pipeline
    (that one faults in two or three fresh buffers; on these VMs faulting
    in fresh memory costs as much as decoding).
    """
    fn = _lz4_safe()
    if fn is None or _PARALLEL < 2:
        return None
    import mmap

    blocks = _lz4_blocks(mv, max_output)
    last = len(blocks) - 1
    jobs = iter(enumerate(blocks))  # shared: next() on it is atomic under the GIL
    # "error": the first failure; "fallback": a block before the last was
    # short, or no buffer for the main thread; "size": the last block's end.
    state: dict = {}
    written: list[int] = []  # blocks each thread wrote (list.append is atomic)

    def work(me: _Worker | None) -> None:
        done = 0
        try:
            buf = mmap.mmap(-1, LZ4_LEGACY_BLOCK)  # anonymous, returned when closed
        except (OSError, ValueError):
            if me is None:  # the worker's blocks go to the main thread instead
                state.setdefault("fallback", True)
            return
        try:
            with _Pinned(buf) as dst:
                for i, (pos, size) in jobs:
                    # A block taken is always written, unless the whole
                    # result is going to be thrown away anyway.
                    if "error" in state or "fallback" in state or (me is not None and me.stop):
                        return
                    # The destination is the 8 MiB buffer: its exact capacity is given.
                    got = fn(src.address + pos, dst, size, LZ4_LEGACY_BLOCK)
                    if got < 0:
                        raise CodecError(f"lz4 stream is corrupt: block {i}: malformed block "
                                         f"data (error at input byte {-got - 1})")
                    offset = i * LZ4_LEGACY_BLOCK
                    if offset + got > max_output:
                        raise _too_big("lz4", max_output)
                    if i < last and got != LZ4_LEGACY_BLOCK:
                        state.setdefault("fallback", True)
                        return
                    with memoryview(buf) as view:
                        pwrite_all(fd, view[:got], offset)
                    done += 1
                    if i == last:
                        state["size"] = offset + got
        except BaseException as exc:
            state.setdefault("error", exc)
        finally:
            written.append(done)
            _close_quietly(buf)

    src = _Pinned(mv)
    try:
        _on_two_threads(work)
    finally:
        src.release()
    if "error" in state:
        raise state["error"]
    if "fallback" in state or sum(written) != len(blocks):
        return None  # the streaming decoder writes it all again
    return state["size"]


# --- lzo into a file: blocks decoded on two threads ------------------------------


# Jobs listed up front at most: Linux's lzop blocks are 256 KiB, so a 1 GiB
# vmlinux has 4096. A hostile stream of 1-byte blocks would otherwise cost
# ~60 bytes of job list per input byte.
_LZO_MAX_JOBS = 4096


def _lzo_to_fd(mv: memoryview, fd: int, max_output: int) -> int | None:
    if _PARALLEL < 2:
        return None
    jobs = []
    total = 0
    for job in _lzop_blocks(mv, max_output):  # every header checked before decoding
        if len(jobs) == _LZO_MAX_JOBS:
            return None  # the streaming decoder takes such a stream a block at a time
        jobs.append((job, total))
        total += job[2]
    it = iter(jobs)  # shared: next() on a list iterator is atomic under the GIL
    state: dict = {}
    written: list[int] = []  # blocks each thread wrote (list.append is atomic)

    def work(me: _Worker | None) -> None:
        done = 0
        try:
            for job, offset in it:
                # A block taken is always written unless an error ends it all.
                if "error" in state or (me is not None and me.stop):
                    return
                pwrite_all(fd, _lzop_decode(*job), offset)
                done += 1
        except BaseException as exc:
            state.setdefault("error", exc)
        finally:
            written.append(done)

    _on_two_threads(work)
    if "error" in state:
        raise state["error"]
    if sum(written) != len(jobs):
        return None  # the streaming decoder writes it all again
    return total


# --- zstd into a mapping of the file ------------------------------------------------


def _libzstd():
    """The system's libzstd through ctypes, or None.

    Its one-shot decoder (ZSTD_decompress, with the destination as the
    window) runs the kernel payload in ~34 ms where python-zstandard's
    streaming reader, built without zstd's assembly decoders and copying
    through a 128 MiB window buffer, needs ~58 ms.
    """
    return _system_lib("libzstd.so.1", _declare_zstd)


def _declare_zstd(lib, ctypes) -> bool:
    lib.ZSTD_versionNumber.restype = ctypes.c_uint
    if lib.ZSTD_versionNumber() < 10400:  # 1.4.0: the one-shot API as used here
        return False
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = (ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_void_p, ctypes.c_size_t)
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = (ctypes.c_size_t,)
    return True


def _zstd_window(mv: memoryview) -> tuple[int, int | None]:
    """(window size, frame content size or None) from the frame header (RFC 8878 3.1.1.1)."""
    fhd = mv[4]
    single_segment = bool(fhd & 0x20)
    fcs_size = _ZSTD_FCS_SIZES[fhd >> 6]
    if fcs_size == 0 and single_segment:
        fcs_size = 1
    pos = 5
    window = None
    if not single_segment:
        wd = mv[5]
        base = 1 << (10 + (wd >> 3))
        window = base + (base >> 3) * (wd & 7)
        pos = 6
    pos += _ZSTD_DID_SIZES[fhd & 3]
    fcs = None
    if fcs_size:
        fcs = int.from_bytes(mv[pos : pos + fcs_size], "little")
        if fcs_size == 2:
            fcs += 256  # 3.1.1.1.4: the 2-byte field is offset by 256
    if window is None:
        window = fcs or 0
    return window, fcs


def _zstd_to_fd(mv: memoryview, fd: int, max_output: int) -> int | None:
    lib = _libzstd()
    if lib is None:
        return None
    frame_end = _zstd_frame_end(mv)  # checks the magic, the header and every block header
    window, fcs = _zstd_window(mv)
    if window > ZSTD_MAX_WINDOW:
        return None  # the streaming decoder explains the refusal
    # The output size: the frame says it, or Linux's 4-byte trailer follows
    # the frame. Only a hint: the decoder never writes past it, and a stream
    # that does not decode to exactly this size goes to the streaming path.
    hint = fcs
    if hint is None and len(mv) - frame_end == _SIZE_TRAILER:
        hint = int.from_bytes(mv[frame_end:], "little")
    if not _plausible(hint, frame_end, ZSTD_MAX_RATIO, max_output):
        return None

    def decode(dst: int, capacity: int, src: int) -> int | None:
        result = lib.ZSTD_decompress(dst, capacity, src, frame_end)
        # Any error (a short hint or a corrupt stream) goes to the streaming
        # decoder: it says what is wrong in the words the other paths use.
        return None if lib.ZSTD_isError(result) else result

    return _into_mapping(mv, fd, hint, decode)


def _into_mapping(mv: memoryview, fd: int, hint: int, decode) -> int | None:
    """Run ``decode(dst, hint, src)`` (addresses) with the file at ``fd``
    grown to ``hint`` bytes and mapped shared at ``dst``, while the other
    thread faults the mapping in ahead of it. The result is the decoded
    size, or None (the caller falls back) when the decoder says the space
    was short or the size is not exactly ``hint``. The caller has checked
    ``hint`` against max_output.
    """
    import mmap

    try:
        # Allocated, not just a sparse size: a store into a mapped hole on a
        # full disk is SIGBUS, which would kill `pvhboot extract` without a
        # word. Here a full disk is an OSError, and the streaming path (whose
        # write() reports ENOSPC as such) takes over. ~2 ms for 53 MB on ext4.
        os.posix_fallocate(fd, 0, hint)
        out = mmap.mmap(fd, hint, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError):
        return None  # no space, not mappable (a write-only descriptor), no address space
    try:
        with _Pinned(mv) as src, _Pinned(out) as dst:
            helper = None
            try:
                if _PARALLEL > 1:
                    helper = _Worker.start(_populate, dst, hint)
                result = decode(dst, hint, src)
            finally:
                if helper is not None:
                    helper.stop = True  # it only faults pages in ahead: no work lost
                    helper.join()
    finally:
        _close_quietly(out)
    return result if result == hint else None


# The most output one input byte can give, so that a size hint (a field an
# image controls) never reserves more disk than the stream could fill:
# - deflate (RFC 1951): a 258-byte match in as little as ~2 bits: 1032:1;
# - zstd (RFC 8878 3.1.1.2): an RLE block, 3 header bytes and 1 byte,
#   repeats up to Block_Maximum_Size (128 KiB): 32768:1.
DEFLATE_MAX_RATIO = 1032
ZSTD_MAX_RATIO = 32768


def _plausible(hint: int | None, compressed: int, ratio: int, max_output: int) -> bool:
    """A size hint to allocate for: non-zero, within max_output, and no more
    than ``compressed`` bytes of this codec can decode to."""
    return bool(hint) and hint <= max_output and hint <= compressed * ratio


def _close_quietly(mapping) -> None:
    """Close an mmap unless a view of it is still alive (say, in the traceback
    of the error being raised: BufferError would replace that error). The
    memory goes when the last view does."""
    try:
        mapping.close()
    except BufferError:
        pass


# --- gzip into a mapping of the file, with libdeflate ------------------------------

# libdeflate.h enum libdeflate_result.
_LIBDEFLATE_SUCCESS = 0
# RFC 1952 2.3.1: FLG bit 1, a CRC16 of the header follows it.
_GZIP_FHCRC = 0x02


def _libdeflate():
    """The system's libdeflate through ctypes, or None.

    A whole-buffer inflater: ~3.5 ms for the 12 MB test kernel where zlib
    takes ~34 ms (and ~40 ms against ~166 ms at 53 MB). It needs the output
    size up front, which gzip's ISIZE field gives.
    """
    return _system_lib("libdeflate.so.0", _declare_deflate)


def _declare_deflate(lib, ctypes) -> bool:
    lib.libdeflate_alloc_decompressor.restype = ctypes.c_void_p
    lib.libdeflate_alloc_decompressor.argtypes = ()
    lib.libdeflate_free_decompressor.restype = None
    lib.libdeflate_free_decompressor.argtypes = (ctypes.c_void_p,)
    size_p = ctypes.POINTER(ctypes.c_size_t)
    lib.libdeflate_gzip_decompress_ex.restype = ctypes.c_int
    lib.libdeflate_gzip_decompress_ex.argtypes = (
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
        ctypes.c_size_t, size_p, size_p)
    return True


def _gzip_to_fd(mv: memoryview, fd: int, max_output: int) -> int | None:
    lib = _libdeflate()
    if lib is None or len(mv) < 18:  # RFC 1952: 10-byte header, 8-byte trailer
        return None
    if mv[3] & _GZIP_FHCRC:
        return None  # libdeflate skips the header CRC unchecked; zlib checks it
    # ISIZE (RFC 1952 2.3.1: the input size modulo 2^32) ends the member,
    # and a bzImage's gzip payload ends with its member (Linux appends no
    # size for gzip). A hint only: the decoder checks ISIZE and CRC32 itself.
    hint = int.from_bytes(mv[-4:], "little")
    if not _plausible(hint, len(mv), DEFLATE_MAX_RATIO, max_output):
        return None
    import ctypes

    def decode(dst: int, capacity: int, src: int) -> int | None:
        d = lib.libdeflate_alloc_decompressor()
        if not d:
            raise MemoryError
        used, got = ctypes.c_size_t(), ctypes.c_size_t()
        try:
            rc = lib.libdeflate_gzip_decompress_ex(d, src, len(mv), dst, capacity,
                                                   ctypes.byref(used), ctypes.byref(got))
        finally:
            lib.libdeflate_free_decompressor(d)
        # Any failure (a wrong ISIZE hint, a corrupt or truncated stream)
        # goes to zlib's streaming decoder, which says what is wrong.
        return got.value if rc == _LIBDEFLATE_SUCCESS else None

    return _into_mapping(mv, fd, hint, decode)


def _populate(me: _Worker, address: int, size: int) -> None:
    """Fault the shared mapping in ahead of the decoder (on the other CPU).

    From _POPULATE_LEAD on, then the start: both threads faulting the same
    first pages at once made each wait for the other (measured: ~1 ms of
    11 ms on the 12 MB test kernel, ~2 ms of 42 ms at 53 MB).
    """
    lead = min(_POPULATE_LEAD, size)
    for begin, end in ((lead, size), (0, lead)):
        pos = begin
        while pos < end:
            if me.stop:
                return
            step = min(_POPULATE_STEP, end - pos)
            if not _populate_range(address + pos, step):
                return  # an old kernel: the decoder takes the faults itself
            pos += step


_madvise_fn = None


def _populate_range(address: int, size: int) -> bool:
    """madvise(MADV_POPULATE_WRITE) through ctypes, False where it fails.

    Not mmap.madvise: that holds the GIL for the whole call, and the thread
    that needs it next is the decoder, to start its next block.
    """
    global _madvise_fn
    if _madvise_fn is None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.restype = ctypes.c_int
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise_fn = fn
    page = 4096
    start = address & ~(page - 1)  # madvise wants a page-aligned start
    return _madvise_fn(start, size + (address - start), _MADV_POPULATE_WRITE) == 0


_FD_DECODERS = {"gzip": _gzip_to_fd, "lz4": _lz4_to_fd, "lzo": _lzo_to_fd,
                "zstd": _zstd_to_fd}


