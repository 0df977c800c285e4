"""bzip2 decoding on several CPUs: a stream's blocks are independent.

libbz2 decodes one block at a time and every block restarts from scratch
(its own Huffman tables, its own inverse BWT, its own CRC), so the blocks of
a stream can be decoded concurrently. Blocks are not byte-aligned and carry
no length, so the stream is split where the block magic occurs, at any bit
offset. That magic can also occur by chance inside compressed data, so each
split is only a hypothesis: every piece is re-wrapped as a stream of its own
and handed to libbz2, which checks its block CRC. A piece that fails makes
the rest of the stream decode serially from its start (skipping the output
already delivered), so the output is always the serial decoder's output.

The re-wrapped streams no longer check the original stream's combined CRC,
so it is recomputed here from the block CRCs and compared. End magics are
only looked for where a stream can end (see :class:`_Scanner`).

bzip2 format facts (libbz2 ``compress.c``/``decompress.c``; Joe Tsai's
"bzip2 format specification"):

- stream: ``"BZh"`` + level digit ``'1'..'9'`` (block size, level x 100 000
  bytes), then blocks, then the end-of-stream magic, the 32-bit combined CRC
  and zero bits up to a byte boundary. Bits are written MSB first.
- block: a 48-bit magic, the 32-bit CRC of the block's output, then the
  coded data (no length).
- combined CRC: for each block in order, ``c = rotl32(c, 1) ^ block_crc``.

Like the bzip2 CLI, streams that follow each other are decoded one after the
other (a header, a level digit and a block or end magic start another one);
bytes after the last stream (Linux's 4-byte size trailer) are ignored.

Decoding runs in threads: ``bz2.BZ2Decompressor`` releases the GIL while it
works. Only a few blocks are in flight at a time and their output goes to
``put`` in order, so memory stays bounded by a few blocks' output.
"""

from __future__ import annotations

import os

from ..errors import CodecError
from .compression import _one_line, _truncated

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# 48-bit magics (the BCD digits of pi and sqrt(pi)), per the format notes.
BLOCK_MAGIC = 0x314159265359
END_MAGIC = 0x177245385090
MAGIC_BITS = 48
CRC_BITS = 32
# "BZh" + level digit.
HEADER_BYTES = 4
# A block starts with its magic and its CRC; a boundary cannot lie inside them.
BLOCK_HEAD_BITS = MAGIC_BITS + CRC_BITS
# What follows the last block: end magic + combined CRC.
TRAILER_BITS = MAGIC_BITS + CRC_BITS

# Input is fed in slices of IN_CHUNK and output taken in chunks of at most
# OUT_CHUNK, as the serial decoders in compression.py do.
IN_CHUNK = 256 << 10
OUT_CHUNK = 1 << 20
# Bytes searched for magics per step. The search runs in the calling thread,
# a step at a time just ahead of the blocks being decoded, so it overlaps
# the decoding instead of delaying the first block (~3 ms per MiB).
SCAN_WINDOW = 1 << 20
# End magics are searched for only up to the first one (see _Scanner.next_end),
# in windows that start this small and double up to SCAN_WINDOW: an empty
# stream is 14 bytes, so a whole window per stream would cost more than the
# stream, and one window per search bounds the work to what was skipped.
END_FIRST_WINDOW = 1 << 10
# The longest piece between two magics that can still be one block; a longer
# one is left to the serial decoder (re-wrapping copies a piece several times,
# so an unbounded "block" of junk would cost several times its size). A
# level-9 block holds at most 900 000 BWT bytes, so at most 900 001 coded
# symbols (runs of zeros take fewer symbols than bytes, plus the end-of-block
# symbol), each at most 20 bits (the longest Huffman code): 18.0 Mbit. Add
# the head (magic, CRC, randomised bit, origPtr: 105 bits), the symbol map
# (16 + 256 bits), the group and selector counts (3 + 15 bits), at most
# 32 767 selectors of at most 6 bits (unary, 6 tables): 0.2 Mbit, and the 6
# tables' code lengths (258 symbols, a 5-bit start and at most 19 two-bit
# steps and a stop bit each): 0.07 Mbit. About 18.3 Mbit = 2.3 MB; 4 MiB
# leaves room. (libbz2 would also take code lengths padded with up-and-down
# steps, which no encoder writes; the serial decoder still decodes those.)
MAX_PIECE_BITS = (4 << 20) * 8
# Pieces pulled ahead of the one being delivered, per block in flight: an
# end piece (an empty stream) takes no worker, so without this bound a run
# of them would all be planned at once.
PENDING_PER_WINDOW = 4
# Blocks in flight: one per worker plus one decoded ahead (measured as fast
# as two per worker). Each holds its whole output until its turn: normally
# ~2 MB, but up to ~45 MB for a block of long runs (a big zero-filled area),
# so more workers than this would raise the bound for little gain on a
# kernel-sized stream (and each thread's malloc arena reserves 64 MiB of
# address space under the decompression child's RLIMIT_AS).
MAX_WORKERS = 4
# Worker thread stack size (see _Pool).
THREAD_STACK = 1 << 20
# How long submit() waits for an idle worker to take a piece (normally ~0.1 ms).
HANDOVER_WAIT = 0.005

_BLOCK, _END, _BAD = 0, 1, 2

# How often the serial fallback ran (tests check which path was taken).
SERIAL_FALLBACKS = 0


def decode_bzip2(mv, put: Callable[[bytes], None], *, workers: int | None = None) -> None:
    """Decode the bzip2 stream(s) at the start of ``mv``, calling ``put`` in order.

    ``mv`` is bytes, a memoryview or an mmap. Output goes to ``put`` in
    chunks of at most :data:`OUT_CHUNK` bytes; an exception from ``put``
    stops the decoding (worker threads are stopped and joined) and
    propagates. Raises :class:`CodecError` for a corrupt or truncated stream.
    ``workers`` defaults to the CPUs this process may run on (at most
    :data:`MAX_WORKERS`); with fewer than 2, or fewer than 2 blocks, the
    stream is decoded serially in this thread.
    """
    view = mv if _is_byte_view(mv) else memoryview(mv).cast("B")
    count = _worker_count(workers)
    if count < 2:
        _serial(view, 0, 0, put)
        return
    scanner = _Scanner(view)
    plan = _plan(view, scanner)
    # Look ahead for a second block: a one-block stream gains nothing from
    # threads, and something that is not bzip2 at all gets libbz2's message.
    head: list[_Piece] = []
    blocks = 0
    for piece in plan:
        head.append(piece)
        blocks += piece.kind == _BLOCK
        if blocks >= 2 or piece.kind == _BAD:
            break
    if blocks < 2:
        _serial(view, 0, 0, put)
        return
    import bz2  # noqa: F401  (imported here, not concurrently by the workers)

    try:
        pool = _Pool(view, count)
    except RuntimeError:  # "can't start new thread": no room for threads here
        _serial(view, 0, 0, put)
        return
    try:
        _consume(view, _chain(head, plan), pool, put, window=count + 1)
    finally:
        pool.close()


def _is_byte_view(mv) -> bool:
    return isinstance(mv, memoryview) and mv.format == "B" and mv.ndim == 1


def _worker_count(workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


# --- the consumer: output in order, combined CRC, fallback -------------------


def _consume(view, pieces: Iterator[_Piece], pool: _Pool, put, *, window: int) -> None:
    from collections import deque

    pending: deque[_Piece] = deque()
    in_flight = 0
    more = True
    stream = -1  # byte offset of the stream being delivered
    emitted = 0  # its output bytes already given to put
    combined = 0
    while True:
        while more and in_flight < window and len(pending) < PENDING_PER_WINDOW * window:
            piece = next(pieces, None)
            if piece is None:
                more = False
                break
            if piece.kind == _BLOCK:
                pool.submit(piece)
                in_flight += 1
            pending.append(piece)
        if not pending:
            return
        piece = pending.popleft()
        if piece.stream != stream:
            stream, emitted, combined = piece.stream, 0, 0
        if piece.kind == _BLOCK:
            in_flight -= 1
            chunks = pool.result(piece)
            if chunks is None:  # not a block after all, or a corrupt one
                # Free the threads' stacks and the blocks decoded ahead first.
                pool.close()
                pending.clear()
                _fallback(view, stream, emitted, put)
                return
            for chunk in chunks:
                emitted += len(chunk)
                put(chunk)
            combined = (((combined << 1) | (combined >> 31)) & 0xFFFFFFFF) ^ piece.crc
        elif piece.kind == _END:
            if combined != piece.crc:
                raise CodecError(
                    f"bzip2 stream is corrupt: its combined CRC 0x{piece.crc:08x} does not "
                    f"match its blocks' CRCs (0x{combined:08x})"
                )
        else:  # the layout is not understood from here on: let libbz2 say why
            pool.close()
            pending.clear()
            _fallback(view, stream, emitted, put)
            return


def _fallback(view, stream: int, skip: int, put) -> None:
    global SERIAL_FALLBACKS
    SERIAL_FALLBACKS += 1
    _serial(view, stream, skip, put)


# --- locating blocks ---------------------------------------------------------


class _Piece:
    """One step of a stream's layout, in order: a block, an end, or 'not understood'."""

    __slots__ = ("kind", "stream", "level", "start", "end", "crc", "data", "chunks", "done")

    def __init__(self, kind: int, stream: int, level=0, start=0, end=0, crc=0):
        self.kind = kind
        self.stream = stream  # byte offset of the stream's "BZh"
        self.level = level
        self.start = start  # bit offset of the block magic
        self.end = end  # bit offset of the magic that follows it
        self.crc = crc  # block CRC, or the stream's combined CRC for _END
        self.data = None  # the re-wrapped stream, while queued
        self.chunks = None
        self.done = False


def _bits(view, pos: int, n: int) -> int:
    """The ``n`` bits at bit offset ``pos`` (MSB first) as an int."""
    first = pos >> 3
    last = (pos + n + 7) >> 3
    value = int.from_bytes(view[first:last], "big")
    return (value >> ((last << 3) - pos - n)) & ((1 << n) - 1)


def _stream_at(view, byte: int) -> bool:
    """True when a bzip2 stream header and its first magic start at ``byte``."""
    if byte + HEADER_BYTES + MAGIC_BITS // 8 > len(view):
        return False
    if bytes(view[byte : byte + 3]) != b"BZh" or not 0x31 <= view[byte + 3] <= 0x39:
        return False
    return _bits(view, (byte + HEADER_BYTES) * 8, MAGIC_BITS) in (BLOCK_MAGIC, END_MAGIC)


class _MagicFinder:
    """Finds one 48-bit magic at every bit offset.

    A magic starting ``s`` bits into byte ``i - 1`` fully covers bytes
    ``i .. i + 4``; those five bytes depend only on ``s``. The data is
    translated to 1 for the (~40) byte values in any of the 8 shifted
    patterns and 0 elsewhere, so one ``find`` of five 1s yields every
    candidate (plus a few thousand others per MiB, rejected by a dict
    lookup), and each is then checked against all 48 bits. About 1.6 ms per
    MiB, half the time of a regular expression over the 8 patterns; it holds
    the GIL.
    """

    RUN = b"\1" * 5

    def __init__(self, magic: int):
        self.magic = magic
        self.shifts: dict[bytes, int] = {}
        for shift in range(8):
            self.shifts[(magic << (8 - shift)).to_bytes(7, "big")[1:6]] = shift
        used = {byte for pattern in self.shifts for byte in pattern}
        self.table = bytes(1 if value in used else 0 for value in range(256))

    def find(self, view, lo: int, hi: int, *, first: bool = False) -> list[int]:
        """Bit offsets of the magic at byte-granular ``i`` in [lo, hi), ascending.

        With ``first``, only the first one (the search stops there).
        """
        size, shifts, magic, run = len(view), self.shifts, self.magic, self.RUN
        end = size * 8
        found = []
        lo = max(lo, 1)
        hi = min(hi, size - 4)  # i + 5 <= size
        while lo < hi:
            step = min(hi, lo + SCAN_WINDOW)
            chunk = bytes(view[lo : step + 4])
            marks = chunk.translate(self.table)
            j = marks.find(run, 0, step - lo + 4)
            while j >= 0:
                shift = shifts.get(chunk[j : j + 5])
                if shift is not None:
                    pos = ((lo + j - 1) << 3) + shift
                    if pos + MAGIC_BITS <= end and _bits(view, pos, MAGIC_BITS) == magic:
                        found.append(pos)
                        if first:
                            return found
                j = marks.find(run, j + 1, step - lo + 4)
            lo = step
        # In order of i; within one i at most one shift matches.
        return found


class _Scanner:
    """Where the next block or end magic is, searching as little as it can.

    Block magics are searched everywhere, a window at a time, just ahead of
    the blocks being decoded. End magics are searched only where a stream
    can end: before a block magic that a stream header precedes, or after
    the last block magic. Elsewhere, an end magic (a true one would have to
    be followed by another stream) can only be compressed data.
    """

    def __init__(self, view):
        self.view = view
        self.size = len(view)
        self.blocks = _MagicFinder(BLOCK_MAGIC)
        self.ends = _MagicFinder(END_MAGIC)
        self.found: list[int] = []  # block magic bit offsets, ascending
        self.next_index = 1  # the next byte index i (see _MagicFinder) to search

    def _scan_more(self) -> None:
        hi = min(self.size, self.next_index + SCAN_WINDOW)
        # Later windows only hold magics past everything found so far.
        self.found.extend(self.blocks.find(self.view, self.next_index, hi))
        self.next_index = hi

    def next_block(self, pos: int, horizon: int | None = None) -> int | None:
        """The first block magic at bit offset >= ``pos``, or None.

        With ``horizon``, None also when there is none up to that bit offset
        (the search stops past it).
        """
        from bisect import bisect_left

        while True:
            k = bisect_left(self.found, pos)
            if k < len(self.found):
                return self.found[k]
            if self.next_index >= self.size:
                return None
            # Magics at byte indexes below next_index start before its byte.
            if horizon is not None and (self.next_index - 1) * 8 > horizon:
                return None
            self._scan_more()

    def next_at(self, pos: int, horizon: int | None = None) -> tuple[int, int] | None:
        """The next (bit offset, kind) a stream can continue with at or after ``pos``.

        With ``horizon``, nothing past that bit offset is searched: the
        answer is None or anything past it when nothing comes before it.
        (An end magic found before it then stands even if a block magic
        without a header follows later; if that end is one by chance, the
        piece before it fails its CRC in libbz2, as any false split does.)
        """
        block = self.next_block(pos, horizon)
        if block is not None and not self._header_before(block):
            return block, _BLOCK
        limit = (block - HEADER_BYTES * 8) if block is not None else self.size * 8
        if horizon is not None:
            limit = min(limit, horizon)
        end = self.next_end(pos, limit)
        if end is not None:
            return end, _END
        return None if block is None else (block, _BLOCK)

    def next_end(self, pos: int, limit: int) -> int | None:
        """The first end magic at bit offset >= ``pos`` that starts before ``limit``.

        Searched from ``pos`` on and only up to the first one, in growing
        windows: each stream's search ends where its end magic is, so many
        empty streams or junk full of end magics cost what was skipped over,
        not the rest of the input each time.
        """
        lo = (pos >> 3) + 1  # byte index i (see _MagicFinder) of a magic at pos
        hi = ((limit + 7) >> 3) + 1
        window = END_FIRST_WINDOW
        while lo < hi:
            step = min(hi, lo + window)
            found = self.ends.find(self.view, lo, step, first=True)
            if found and found[0] < pos:
                # At pos's own byte index but a few bits before pos (an
                # index holds at most one): look on from the next index.
                found = self.ends.find(self.view, lo + 1, step, first=True)
            if found:
                return found[0]
            lo = step
            window = min(window * 2, SCAN_WINDOW)
        return None

    def _header_before(self, pos: int) -> bool:
        byte = pos >> 3
        view = self.view
        return (
            pos & 7 == 0
            and byte >= HEADER_BYTES
            and bytes(view[byte - 4 : byte - 1]) == b"BZh"
            and 0x31 <= view[byte - 1] <= 0x39
        )


def _plan(view, scanner: _Scanner) -> Iterator[_Piece]:
    """The layout of the stream(s) in ``view`` as found by the magics."""
    size_bits = len(view) * 8
    byte = 0
    if not _stream_at(view, 0):
        yield _Piece(_BAD, 0)
        return
    while True:
        level = view[byte + 3] - 0x30
        first = (byte + HEADER_BYTES) * 8
        # The stream's first magic must be right there: look no further.
        magic = scanner.next_at(first, first + 1)
        if magic is None or magic[0] != first:
            yield _Piece(_BAD, byte)
            return
        while magic[1] == _BLOCK:
            start = magic[0]
            # A piece longer than MAX_PIECE_BITS is not decoded on threads,
            # so the search need not look further (junk is not all scanned).
            magic = scanner.next_at(start + BLOCK_HEAD_BITS, start + MAX_PIECE_BITS)
            # No end magic (truncated), or the next magic is further than a
            # block can reach (not one block): libbz2 will say why.
            if magic is None or magic[0] - start > MAX_PIECE_BITS:
                yield _Piece(_BAD, byte)
                return
            crc = _bits(view, start + MAGIC_BITS, CRC_BITS)
            yield _Piece(_BLOCK, byte, level, start, magic[0], crc)
        end = magic[0] + TRAILER_BITS
        if end > size_bits:
            yield _Piece(_BAD, byte)
            return
        yield _Piece(_END, byte, crc=_bits(view, magic[0] + MAGIC_BITS, CRC_BITS))
        byte = (end + 7) >> 3
        if not _stream_at(view, byte):
            return


def _rewrap(view, piece: _Piece) -> bytes:
    """``piece`` as a one-block stream: header, block, end magic, CRC, padding."""
    start, end = piece.start, piece.end
    first, lead = start >> 3, start & 7
    whole, rest = divmod(end - start, 8)  # the block: `whole` bytes and `rest` bits
    # Move the block to a byte boundary. Each pass over a big int costs
    # ~1 ms per MB, so this takes three (from_bytes, shift, to_bytes) plus a
    # copy, and builds the small tail separately.
    if lead:
        nbytes = ((end + 7) >> 3) - first
        value = int.from_bytes(view[first : first + nbytes], "big") << lead
        # The `lead` bits before the block land in an extra first byte: dropped.
        body = value.to_bytes(nbytes + 1, "big")[1:]
    else:
        body = bytes(view[first : first + whole + (1 if rest else 0)])
    tail_bits = body[whole] >> (8 - rest) if rest else 0
    # A one-block stream's combined CRC is rotl32(0, 1) ^ crc == crc.
    tail = (((tail_bits << MAGIC_BITS) | END_MAGIC) << CRC_BITS) | piece.crc
    nbits = rest + TRAILER_BITS
    pad = -nbits % 8
    return b"".join(
        (
            b"BZh",
            bytes((0x30 + piece.level,)),
            body[:whole],
            (tail << pad).to_bytes((nbits + pad) >> 3, "big"),
        )
    )


# --- worker threads ----------------------------------------------------------


class _Pool:
    """A few threads that decode pieces; results are collected in order."""

    def __init__(self, view, count: int):
        import threading
        from collections import deque

        self.view = view
        self.cv = threading.Condition()
        self.todo: deque[_Piece] = deque()
        self.stop = False
        self.idle = 0  # workers waiting for a piece
        self.threads: list = []
        # The default stack is RLIMIT_STACK (8 MiB), address space that the
        # decompression child's RLIMIT_AS counts and glibc keeps cached
        # after the thread ends. A worker runs a few Python frames and
        # libbz2 (a few KiB of stack).
        previous = threading.stack_size()
        try:
            threading.stack_size(THREAD_STACK)
        except (ValueError, RuntimeError):  # not settable here: keep the default
            previous = None
        try:
            for n in range(count):
                thread = threading.Thread(
                    target=self._work, name=f"pvhboot-bzip2-{n}", daemon=True
                )
                thread.start()
                self.threads.append(thread)
        except BaseException:
            self.close()
            raise
        finally:
            if previous is not None:
                threading.stack_size(previous)

    def submit(self, piece: _Piece) -> None:
        # Re-wrapped here, not by the worker: a worker then needs the GIL
        # only for a moment before libbz2 releases it, so this thread's
        # scanning does not hold it up.
        try:
            piece.data = _rewrap(self.view, piece)
        except MemoryError:
            piece.data = None  # the worker reports a failure: decoded serially
        with self.cv:
            self.todo.append(piece)
            self.cv.notify()
            if self.idle:
                # Hand the GIL over until an idle worker has taken the piece
                # (otherwise it waits for this thread's next blocking call).
                self.cv.wait_for(lambda: not self.todo or self.stop, HANDOVER_WAIT)

    def result(self, piece: _Piece) -> list | None:
        """Wait for ``piece``: its output chunks, or None if it failed to decode."""
        with self.cv:
            while not piece.done:
                self.cv.wait()
        chunks, piece.chunks = piece.chunks, None
        return chunks

    def cancel(self) -> None:
        """Drop queued pieces and make running ones give up."""
        with self.cv:
            self.stop = True
            self.todo.clear()
            self.cv.notify_all()

    def close(self) -> None:
        self.cancel()
        for thread in self.threads:
            thread.join()
        self.threads.clear()

    def _work(self) -> None:
        cv, todo = self.cv, self.todo
        while True:
            with cv:
                while not todo and not self.stop:
                    self.idle += 1
                    cv.wait()
                    self.idle -= 1
                if self.stop:
                    return
                piece = todo.popleft()
                cv.notify_all()  # submit() may be waiting for this
            try:
                chunks = self._decode(piece)
            except BaseException:  # MemoryError and the like: let the serial path decide
                chunks = None
            with cv:
                piece.chunks = chunks
                piece.done = True
                cv.notify_all()

    def _decode(self, piece: _Piece) -> list | None:
        import bz2

        data, piece.data = piece.data, None
        if data is None:
            return None
        d = bz2.BZ2Decompressor()
        chunks = []
        while not d.eof:
            if self.stop:
                return None
            try:
                chunk = d.decompress(data, OUT_CHUNK)
            except (OSError, ValueError, EOFError):
                return None
            data = b""
            if not chunk:  # all input taken, no end reached: not a whole block
                return None
            chunks.append(chunk)
        return None if d.unused_data else chunks


# --- serial decoding (one thread; also the fallback) -------------------------


def _serial(view, start: int, skip: int, put) -> None:
    """Decode the stream at byte ``start`` and any that follow, serially.

    The first ``skip`` output bytes were already delivered and are dropped.
    """
    import bz2

    size = len(view)
    byte = start
    while True:
        d = bz2.BZ2Decompressor()
        pos = byte
        idle = 0
        while not d.eof:
            if d.needs_input:
                if pos >= size:
                    raise _truncated("bzip2", "the stream has no end marker")
                data = view[pos : pos + IN_CHUNK]
                pos += len(data)
            else:
                data = b""
            try:
                chunk = d.decompress(data, OUT_CHUNK)
            except (OSError, ValueError) as exc:
                raise CodecError(f"bzip2 stream is corrupt: {_one_line(exc)}") from None
            except EOFError:
                break
            if chunk or data:
                idle = 0
            else:
                idle += 1
                if idle > 2:  # never seen; a loop over untrusted data must end
                    raise CodecError("bzip2 stream is corrupt: the decoder made no progress")
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk = chunk[skip:]
                skip = 0
            put(chunk)
        byte = pos - len(d.unused_data)
        if not _stream_at(view, byte):
            return
