"""The seven codecs Linux compresses a bzImage payload with, as streams.

Linux (``scripts/Makefile.lib``, ``cmd_<codec>``) pipes the vmlinux ELF
through one of gzip, bzip2, lzma, xz, lzop, lz4 (legacy frame) or zstd and
appends the uncompressed size as a 4-byte little-endian word. Every decoder
here therefore stops at the end of its own stream and ignores what follows.

Everything decodes in bounded memory: input is read through a memoryview (an
mmap works), output leaves in chunks of at most :data:`OUT_CHUNK` bytes and is
written straight to ``out``; the whole output is never held in memory. Any
corrupt or truncated stream raises :class:`CodecError` with one line naming
the codec; every loop consumes input or produces output on each turn, so a
hostile stream cannot make it spin.

:func:`decompress_to_fd` writes a file instead, and there gzip, lz4, lzo and
zstd take faster paths: two threads, and no copy through Python (lz4 and lzo
blocks decoded in parallel and pwrite()n in place; zstd and gzip decoded by
the system's libzstd / libdeflate straight into a shared mapping of the file,
sized by the stream's own size field, never beyond ``max_output``). Each
falls back to the streaming decoder when its prerequisites are missing.

Only the standard library is imported at module level; lz4, zstandard,
lzallright and ctypes are imported by the decoder that needs them.
"""

from __future__ import annotations

import os

from ..errors import CodecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~8 ms of imports (re, warnings) on the boot path
    from collections.abc import Callable
    from typing import BinaryIO

CODECS = ("gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd")

# Input is fed to the stream decoders in slices of this size, and each decoder
# call may produce at most OUT_CHUNK bytes: large enough that the per-call cost
# of Python disappears, small enough to keep peak memory at a few MiB.
# 1 MiB out / 256 KiB in measured as fast as 4 MiB / 1 MiB on the Debian
# kernels (CPU within 1%) with a third fewer page faults.
IN_CHUNK = 256 << 10
OUT_CHUNK = 1 << 20

# Magic numbers at the start of each stream, as Linux's own decompressor
# table (lib/decompress.c, compressed_formats[]) recognises them.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b\x08", "gzip"),  # RFC 1952: ID1 ID2, CM=8 (deflate)
    (b"BZh", "bzip2"),  # "BZh" + block size digit
    (b"\xfd7zXZ\x00", "xz"),  # xz file format 2.2.1, Header Magic Bytes
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"),  # lzop file magic
    (b"\x02\x21\x4c\x18", "lz4"),  # LZ4 legacy frame magic 0x184C2102, LE
    (b"\x28\xb5\x2f\xfd", "zstd"),  # zstd frame magic 0xFD2FB528, LE
    # lzma "alone": properties byte 0x5d (lc=3 lp=0 pb=2) then the low bytes
    # of the dictionary size; Linux's lzma -9 always writes 5d 00 00.
    (b"\x5d\x00\x00", "lzma"),
)

# The lzma "alone" dictionary of `lzma -9` is 64 MiB and xz's kernel preset
# uses 32 MiB; refusing anything that needs more than this stops a header
# that asks for a 4 GiB dictionary before liblzma allocates it.
LZMA_MEMLIMIT = 512 << 20


def detect_codec(data: bytes | memoryview) -> str | None:
    """The codec whose magic number starts ``data``, or None."""
    head = bytes(data[:16])
    for magic, name in _MAGICS:
        if head.startswith(magic):
            if name == "bzip2" and not (len(head) > 3 and 0x31 <= head[3] <= 0x39):
                continue
            return name
    return None


class _Sink:
    """Counts what goes to ``out`` and refuses to pass ``max_output``."""

    __slots__ = ("codec", "write", "total", "limit")

    def __init__(self, codec: str, out: BinaryIO, limit: int):
        self.codec = codec
        self.write = out.write
        self.total = 0
        self.limit = limit

    def put(self, chunk) -> None:
        n = len(chunk)
        if not n:
            return
        self.total += n
        if self.total > self.limit:
            raise _too_big(self.codec, self.limit)
        try:
            # An unbuffered file's write() is one write(2): it may take less
            # than asked (a disk filling up), and the rest must not be lost.
            done = self.write(chunk)
            if done is not None and done < n:
                with memoryview(chunk) as view:
                    rest = view.cast("B")[done:]
                    while rest:
                        done = self.write(rest)
                        if not done:
                            raise OSError(28, "No space left on device (short write)")
                        rest = rest[done:]
        except OSError as exc:  # the output's fault (a full disk), not the stream's
            raise _WriteError(exc) from None


class _WriteError(Exception):
    """Carries an OSError from ``out.write`` past the handler that turns the
    codec libraries' own errors (bz2 raises OSError for bad data) into
    CodecError."""


def decompress_to(codec: str, src, out: BinaryIO, *, max_output: int) -> int:
    """Decompress the ``codec`` stream at the start of ``src`` into ``out``.

    ``src`` is bytes, a memoryview or an mmap; bytes after the end of the
    stream (Linux's 4-byte size trailer) are ignored. Returns the number of
    bytes written. Raises CodecError for an unknown codec, a corrupt or
    truncated stream, or output beyond ``max_output`` bytes.
    """
    decoder = _DECODERS.get(codec)
    if decoder is None:
        raise CodecError(f"unknown codec {codec!r}: known codecs are {', '.join(CODECS)}")
    sink = _Sink(codec, out, max_output)
    with memoryview(src) as view:
        mv = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        try:
            decoder(mv, sink)
        except CodecError:
            raise
        except _WriteError as exc:
            raise exc.args[0] from None
        except Exception as exc:  # the codec libraries raise their own types
            raise codec_error(codec, exc) from None
    return sink.total


def codec_error(codec: str, exc: Exception) -> CodecError:
    """The one line for an exception a codec library raised."""
    if isinstance(exc, MemoryError):
        return CodecError(
            f"{codec} stream needs more memory than allowed to decompress: "
            "the image is corrupt or hostile"
        )
    return CodecError(f"{codec} stream is corrupt: {_one_line(exc)}")


_SYSTEM_LIBS: dict = {}  # soname -> CDLL or None


def _system_lib(soname: str, declare):
    """The shared library ``soname`` through ctypes, or None when it is
    missing or ``declare(lib, ctypes)`` (which sets the prototypes) finds it
    unsuitable. Looked up once per process."""
    if soname not in _SYSTEM_LIBS:
        lib = None
        try:
            import ctypes

            lib = ctypes.CDLL(soname)
            if not declare(lib, ctypes):
                lib = None
        except (OSError, AttributeError):  # not installed, or a symbol is missing
            lib = None
        _SYSTEM_LIBS[soname] = lib
    return _SYSTEM_LIBS[soname]


def decompress_bytes(codec: str, src, *, max_output: int) -> bytes:
    """Like :func:`decompress_to`, into memory (for small streams only)."""
    import io

    buf = io.BytesIO()
    decompress_to(codec, src, buf, max_output=max_output)
    return buf.getvalue()


def _too_big(codec: str, limit: int) -> CodecError:
    return CodecError(
        f"{codec} stream decompresses to more than the limit of {limit} bytes: "
        "the image is corrupt or hostile"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text[:200]


def _truncated(codec: str, detail: str = "") -> CodecError:
    return CodecError(
        f"{codec} stream is truncated{': ' + detail if detail else ''} "
        "(the image is cut short or its payload length is wrong)"
    )


# --- zlib / bz2 / lzma: incremental decompressor objects --------------------


def _gzip(mv: memoryview, sink: _Sink) -> None:
    import zlib  # here: the headers-only boot path imports this module only for detect_codec

    # wbits = 16 + 15: gzip wrapper only (header, CRC32 and ISIZE checked).
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pos, end = 0, len(mv)
    put = sink.put
    while not d.eof:
        data = d.unconsumed_tail
        if not data:
            if pos >= end:
                raise _truncated("gzip", "the deflate stream has no end")
            data = mv[pos : pos + IN_CHUNK]
            pos += len(data)
        try:
            chunk = d.decompress(data, OUT_CHUNK)
        except zlib.error as exc:
            raise CodecError(f"gzip stream is corrupt: {exc}") from None
        put(chunk)


def _stdlib_stream(codec: str, make: Callable[[], object], errors: tuple) -> Callable:
    """Decoder loop for bz2/lzma decompressor objects (needs_input/max_length)."""

    def decode(mv: memoryview, sink: _Sink) -> None:
        d = make()
        pos, end = 0, len(mv)
        put = sink.put
        idle = 0
        while not d.eof:
            if d.needs_input:
                if pos >= end:
                    raise _truncated(codec, "the stream has no end marker")
                data = mv[pos : pos + IN_CHUNK]
                pos += len(data)
            else:
                data = b""
            try:
                chunk = d.decompress(data, OUT_CHUNK)
            except errors as exc:
                raise CodecError(f"{codec} stream is corrupt: {_one_line(exc)}") from None
            except EOFError:
                break
            if chunk or data:
                idle = 0
            else:
                # No input taken and nothing produced: the library is stuck
                # (never seen, but a loop over untrusted data must end).
                idle += 1
                if idle > 2:
                    raise CodecError(f"{codec} stream is corrupt: the decoder made no progress")
            put(chunk)

    return decode


def _make_lzma(fmt: str):
    def make():
        import lzma

        return lzma.LZMADecompressor(format=getattr(lzma, fmt), memlimit=LZMA_MEMLIMIT)

    return make


def _lzma_errors():
    import lzma

    return (lzma.LZMAError, OSError, ValueError)


# --- lz4 legacy frame --------------------------------------------------------

# lz4 legacy frame (lz4 CLI `-l`, what Linux uses): the magic, then blocks
# each preceded by a 4-byte LE compressed size, each decompressing to at most
# 8 MiB. There is no end marker: the data ends, or another frame's magic
# follows (lz4 frame format spec, "Legacy frame").
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
# LZ4_compressBound(8 MiB) = n + n/255 + 16: no valid block is larger.
LZ4_LEGACY_MAX_CBLOCK = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16
# Magic numbers of the other lz4 frames: any of them ends a legacy stream.
_LZ4_FRAME_MAGIC = 0x184D2204
_LZ4_SKIPPABLE_MASK, _LZ4_SKIPPABLE = 0xFFFFFFF0, 0x184D2A50
# Linux appends the uncompressed size as one LE32 after the payload.
_SIZE_TRAILER = 4


_lz4_safe_fn = None


def _lz4_safe():
    """LZ4_decompress_safe through ctypes (which releases the GIL), or None.

    From the system's liblz4 (what the lz4 CLI links) when there is one:
    as fast as the copy the lz4 extension links in, and found without
    importing the lz4 package (~0.8 ms); else from that extension.
    """
    global _lz4_safe_fn
    if _lz4_safe_fn is None:
        _lz4_safe_fn = False
        import ctypes

        for where in ("liblz4.so.1", None):
            try:
                if where is None:
                    from lz4.block import _block

                    where = _block.__file__
                fn = ctypes.CDLL(where).LZ4_decompress_safe
            except (ImportError, OSError, AttributeError):
                continue
            fn.restype = ctypes.c_int
            fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
            _lz4_safe_fn = fn
            break
    return _lz4_safe_fn or None


_lz4_decode = None  # built on first use, then reused with its buffers


def _lz4_block_decoder():
    """A function ``(src_view, n) -> bytes-like`` decoding one legacy block.

    ``lz4.block.decompress`` allocates a fresh 8 MiB result per block, and
    faulting those pages in costs more than the decompression itself (about
    60 ms against 8 ms on Debian's 53 MB kernel). So when
    ``LZ4_decompress_safe`` is there (:func:`_lz4_safe`), call it into one
    reused buffer; it never reads past the source size nor writes past the
    capacity it is given.
    """
    fn = _lz4_safe()
    if fn is None:
        import lz4.block

        def slow(src: memoryview):
            try:
                return lz4.block.decompress(src, uncompressed_size=LZ4_LEGACY_BLOCK)
            except lz4.block.LZ4BlockError as exc:
                raise ValueError(_one_line(exc)) from None

        return slow
    import ctypes

    inbuf = bytearray(LZ4_LEGACY_MAX_CBLOCK)
    outbuf = bytearray(LZ4_LEGACY_BLOCK)
    in_addr = ctypes.addressof((ctypes.c_char * len(inbuf)).from_buffer(inbuf))
    out_addr = ctypes.addressof((ctypes.c_char * len(outbuf)).from_buffer(outbuf))
    out_view = memoryview(outbuf)

    def fast(src: memoryview):
        n = len(src)
        inbuf[:n] = src  # a read-only mmap has no address ctypes can take
        got = fn(in_addr, out_addr, n, LZ4_LEGACY_BLOCK)
        if got < 0:
            raise ValueError(f"malformed block data (error at input byte {-got - 1})")
        return out_view[:got]

    return fast


def _lz4_blocks(mv: memoryview, max_output: int) -> list[tuple[int, int]]:
    """(offset, size) of each compressed block of the legacy stream at mv[0].

    Only the 4-byte block headers are read (a handful for a kernel), so every
    structural error is found before anything is decoded. A stream with more
    blocks than ``max_output`` allows (every block but the last decodes to
    8 MiB) is refused as it is walked, before the list grows with it.
    """
    end = len(mv)
    pos = 4  # past the magic
    if end < 4 or int.from_bytes(mv[:4], "little") != LZ4_LEGACY_MAGIC:
        raise CodecError("lz4 stream does not start with the legacy frame magic 02 21 4c 18")
    blocks: list[tuple[int, int]] = []
    while end - pos >= 4:
        size = int.from_bytes(mv[pos : pos + 4], "little")
        if size == LZ4_LEGACY_MAGIC:  # concatenated legacy frames continue the stream
            pos += 4
            continue
        if size == _LZ4_FRAME_MAGIC or (size & _LZ4_SKIPPABLE_MASK) == _LZ4_SKIPPABLE:
            break
        if end - pos == _SIZE_TRAILER and blocks:
            break  # exactly Linux's size trailer is left
        n = len(blocks)
        if size == 0 or size > LZ4_LEGACY_MAX_CBLOCK:
            raise CodecError(
                f"lz4 stream is corrupt: block {n} at offset {pos} claims {size} bytes "
                f"(a legacy block holds 1 to {LZ4_LEGACY_MAX_CBLOCK})"
            )
        pos += 4
        if size > end - pos:
            raise _truncated("lz4", f"block {n} needs {size} bytes, {end - pos} are left")
        if n * LZ4_LEGACY_BLOCK > max_output:
            raise _too_big("lz4", max_output)
        blocks.append((pos, size))
        pos += size
    if not blocks:
        raise _truncated("lz4", "no block follows the magic")
    return blocks


def _lz4(mv: memoryview, sink: _Sink) -> None:
    blocks = _lz4_blocks(mv, sink.limit)
    global _lz4_decode
    if _lz4_decode is None:
        _lz4_decode = _lz4_block_decoder()
    decode = _lz4_decode
    put = sink.put
    for i, (pos, size) in enumerate(blocks):
        try:
            chunk = decode(mv[pos : pos + size])
        except ValueError as exc:
            raise CodecError(f"lz4 stream is corrupt: block {i}: {exc}") from None
        put(chunk)


# --- lzop container (LZO1X blocks) -------------------------------------------

# lzop file format (lzop's src/lzop.c and Linux's lib/decompress_unlzo.c).
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
_LZOP_F_ADLER32_D = 0x00000001
_LZOP_F_ADLER32_C = 0x00000002
_LZOP_F_H_EXTRA_FIELD = 0x00000040
_LZOP_F_CRC32_D = 0x00000100
_LZOP_F_CRC32_C = 0x00000200
_LZOP_F_H_FILTER = 0x00000800
_LZOP_F_H_CRC32 = 0x00001000
# Flag bits lzop defines (F_MASK) plus the OS and charset fields; any other
# bit set means a format this reader does not know (lzop's F_RESERVED).
_LZOP_F_KNOWN = 0x00003FFF | 0xFF000000 | 0x00F00000
# Header layout changed at lzop 0.9.40 (version_needed, level, mtime_high).
_LZOP_VERSION_0940 = 0x0940
# lzop refuses blocks larger than this (MAX_BLOCK_SIZE); Linux uses 256 KiB.
LZOP_MAX_BLOCK = 64 << 20
# Methods: M_LZO1X_1, M_LZO1X_1_15, M_LZO1X_999 all decode with LZO1X.
_LZOP_METHODS = (1, 2, 3)


class _Reader:
    """Bounds-checked big-endian reads over a memoryview."""

    __slots__ = ("mv", "pos", "codec")

    def __init__(self, mv: memoryview, pos: int, codec: str):
        self.mv, self.pos, self.codec = mv, pos, codec

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.mv) - self.pos:
            raise _truncated(self.codec, f"{what} at offset {self.pos} is cut off")
        out = self.mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")


def _lzop_header(r: _Reader) -> int:
    """Parse and check the lzop header; return its flags."""
    import zlib

    if bytes(r.take(len(LZOP_MAGIC), "magic")) != LZOP_MAGIC:
        raise CodecError("lzo stream does not start with the lzop magic 89 4c 5a 4f")
    start = r.pos  # the header checksum covers everything from version on
    version = r.be16("version")
    r.be16("library version")
    if version >= _LZOP_VERSION_0940:
        r.be16("version needed to extract")
    method = r.u8("method")
    if method not in _LZOP_METHODS:
        raise CodecError(f"lzo stream uses method {method}, not an LZO1X method lzop writes")
    if version >= _LZOP_VERSION_0940:
        r.u8("level")
    flags = r.be32("flags")
    if flags & ~_LZOP_F_KNOWN & 0xFFFFFFFF:
        raise CodecError(f"lzo stream header has unknown flags {flags:#010x}")
    if flags & _LZOP_F_H_FILTER:
        r.be32("filter")
    r.be32("mode")
    r.be32("mtime")
    if version >= _LZOP_VERSION_0940:
        r.be32("mtime high")
    name_len = r.u8("name length")
    r.take(name_len, "file name")
    header = r.mv[start : r.pos]
    want = r.be32("header checksum")
    got = zlib.crc32(header) if flags & _LZOP_F_H_CRC32 else zlib.adler32(header)
    if got != want:
        raise CodecError(f"lzo stream header checksum is wrong ({got:#010x} != {want:#010x})")
    if flags & _LZOP_F_H_EXTRA_FIELD:
        extra_len = r.be32("extra field length")
        r.take(extra_len, "extra field")
        r.be32("extra field checksum")
    return flags


def _lzop_blocks(mv: memoryview, max_output: int):
    """Walk the lzop stream at mv[0]; yield (index, data, u_len, d_sums, c_sums).

    ``data`` is the block's bytes as stored, ``u_len`` what it decodes to,
    the sums are (expected, function, name) for the uncompressed and
    compressed data. Raises CodecError on any structural problem, and before
    the blocks' total size passes ``max_output``.
    """
    import zlib

    r = _Reader(mv, 0, "lzo")
    flags = _lzop_header(r)
    d_checks = [
        (fn, name)
        for flag, fn, name in (
            (_LZOP_F_ADLER32_D, zlib.adler32, "Adler-32"),
            (_LZOP_F_CRC32_D, zlib.crc32, "CRC-32"),
        )
        if flags & flag
    ]
    c_checks = [
        (fn, name)
        for flag, fn, name in (
            (_LZOP_F_ADLER32_C, zlib.adler32, "Adler-32"),
            (_LZOP_F_CRC32_C, zlib.crc32, "CRC-32"),
        )
        if flags & flag
    ]
    block = 0
    total = 0
    while True:
        u_len = r.be32("block length")
        if u_len == 0:
            return  # end-of-stream marker; anything after it is a trailer
        if u_len > LZOP_MAX_BLOCK:
            raise CodecError(
                f"lzo stream is corrupt: block {block} claims {u_len} bytes "
                f"(lzop blocks hold at most {LZOP_MAX_BLOCK})"
            )
        total += u_len
        if total > max_output:
            raise _too_big("lzo", max_output)
        c_len = r.be32("compressed block length")
        if c_len == 0 or c_len > u_len:
            raise CodecError(
                f"lzo stream is corrupt: block {block} has compressed length {c_len} "
                f"for {u_len} bytes"
            )
        d_sums = [(r.be32("checksum"), fn, name) for fn, name in d_checks]
        # lzop stores compressed-data checksums only for blocks that shrank.
        c_sums = [(r.be32("checksum"), fn, name) for fn, name in c_checks] if c_len < u_len else []
        data = r.take(c_len, f"block {block} data")
        yield block, data, u_len, d_sums, c_sums
        block += 1


# liblzo2's lzo_init() (lzo/lzoconf.h) passes these sizes to __lzo_init_v2,
# which refuses a caller whose idea of the ABI differs from the library's:
# LZO_VERSION 2.10; short, int, long, lzo_uint32_t, lzo_uint, the dict
# entry (a pointer), char *, lzo_voidp and lzo_callback_t (three function
# pointers, a pointer and two lzo_xint: six words on x86-64).
_LZO_VERSION = 0x20A0
_LZO_INIT_SIZES = (2, 4, 8, 4, 8, 8, 8, 8, 48)
_LZO_E_OK = 0
# lzo/lzoconf.h error codes a hostile or damaged block can give.
_LZO_ERRORS = {
    -4: "its data ends early (input overrun)",
    -5: "it decodes to more than its header says (output overrun)",
    -6: "it refers to data before its start (lookbehind overrun)",
    -8: "it has data after its end (input not consumed)",
}


def _declare_lzo(lib, ctypes) -> bool:
    init = lib.__lzo_init_v2
    init.restype = ctypes.c_int
    init.argtypes = (ctypes.c_uint,) + (ctypes.c_int,) * len(_LZO_INIT_SIZES)
    if ctypes.sizeof(ctypes.c_void_p) != 8 or init(_LZO_VERSION, *_LZO_INIT_SIZES) != _LZO_E_OK:
        return False
    fn = lib.lzo1x_decompress_safe
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p)
    return True


_lzo_buffers = None  # per thread: (capacity, buffer, its address)


def _lzo1x_into(data, u_len: int):
    """The block decoded by liblzo2's lzo1x_decompress_safe into exactly
    u_len bytes (what lzop itself runs), or None without liblzo2.

    lzallright's decoder grows its output past the size it is given, so a
    block claiming 2 MiB could make it allocate hundreds; this one stops at
    the capacity (LZO_E_OUTPUT_OVERRUN) and releases the GIL meanwhile.
    The result is a view of this thread's reused buffer (faulting in a
    fresh one per block cost more than the decoding): it is valid until
    this thread decodes the next block, and every caller writes it first.
    """
    global _lzo_buffers
    lib = _system_lib("liblzo2.so.2", _declare_lzo)
    if lib is None:
        return None
    import ctypes

    if _lzo_buffers is None:
        import _thread

        _lzo_buffers = _thread._local()
    have = getattr(_lzo_buffers, "slot", None)
    if have is None or have[0] < u_len:
        # u_len <= LZOP_MAX_BLOCK (64 MiB), checked by _lzop_blocks.
        buf = ctypes.create_string_buffer(max(u_len, 1))
        have = _lzo_buffers.slot = (max(u_len, 1), buf, ctypes.addressof(buf))
    got = ctypes.c_size_t(u_len)
    rc = lib.lzo1x_decompress_safe(bytes(data), len(data), have[2], ctypes.byref(got), None)
    if rc != _LZO_E_OK:
        raise ValueError(_LZO_ERRORS.get(rc, f"liblzo2 error {rc}"))
    return memoryview(have[1]).cast("B")[: got.value]


def _lzop_decode(block: int, data: memoryview, u_len: int, d_sums, c_sums):
    """One lzop block, decoded and checked (both decoders release the GIL)."""
    for want, fn, name in c_sums:
        if fn(data) != want:
            raise CodecError(f"lzo stream is corrupt: block {block} fails its {name} check")
    if len(data) == u_len:
        chunk = data  # stored: lzop keeps blocks that would not shrink as they are
    else:
        try:
            chunk = _lzo1x_into(data, u_len)
        except ValueError as exc:
            raise CodecError(f"lzo stream is corrupt: block {block}: {exc}") from None
        if chunk is None:
            from lzallright import LZOCompressor, LZOError

            try:
                chunk = LZOCompressor.decompress(data, output_size_hint=u_len)
            except LZOError as exc:
                raise CodecError(
                    f"lzo stream is corrupt: block {block}: {_one_line(exc)}"
                ) from None
        if len(chunk) != u_len:
            raise CodecError(
                f"lzo stream is corrupt: block {block} gives {len(chunk)} bytes, "
                f"its header says {u_len}"
            )
    for want, fn, name in d_sums:
        if fn(chunk) != want:
            raise CodecError(f"lzo stream is corrupt: block {block} fails its {name} check")
    return chunk


def _lzo(mv: memoryview, sink: _Sink) -> None:
    put = sink.put
    for job in _lzop_blocks(mv, sink.limit):
        put(_lzop_decode(*job))


# --- zstd --------------------------------------------------------------------

# zstd frame format (RFC 8878, 3.1.1). python-zstandard's stream reader ends
# silently when its input runs out mid-frame, so the frame's extent is walked
# here first (block headers only, a few hundred for a kernel): a frame that
# runs past the data is truncated, whatever the decoder says.
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_FCS_SIZES = (0, 2, 4, 8)  # Frame_Content_Size_flag -> field size
_ZSTD_DID_SIZES = (0, 1, 2, 4)  # Dictionary_ID_flag -> field size
_ZSTD_BLOCK_RAW, _ZSTD_BLOCK_RLE, _ZSTD_BLOCK_RESERVED = 0, 1, 3
# 3.1.1.2.4: Block_Size is at most 128 KiB.
_ZSTD_BLOCK_MAX = 128 << 10
# Window sizes up to 2^27 (zstd --ultra -22, Linux's zstd22) are accepted;
# larger ones would let a header demand huge buffers.
ZSTD_MAX_WINDOW = 1 << 27


def _zstd_frame_end(mv: memoryview) -> int:
    end = len(mv)
    if end < 5:
        raise _truncated("zstd", "the frame header is cut off")
    if int.from_bytes(mv[:4], "little") != _ZSTD_MAGIC:
        raise CodecError("zstd stream does not start with the frame magic 28 b5 2f fd")
    fhd = mv[4]
    if fhd & 0x08:
        raise CodecError("zstd stream is corrupt: the frame header's reserved bit is set")
    single_segment = bool(fhd & 0x20)
    fcs = _ZSTD_FCS_SIZES[fhd >> 6]
    if fcs == 0 and single_segment:
        fcs = 1
    pos = 5 + (0 if single_segment else 1) + _ZSTD_DID_SIZES[fhd & 3] + fcs
    blocks = 0
    while True:
        if pos + 3 > end:
            raise _truncated("zstd", f"block {blocks} header at offset {pos} is cut off")
        header = int.from_bytes(mv[pos : pos + 3], "little")
        pos += 3
        btype = (header >> 1) & 3
        bsize = header >> 3
        if btype == _ZSTD_BLOCK_RESERVED or bsize > _ZSTD_BLOCK_MAX:
            raise CodecError(f"zstd stream is corrupt: block {blocks} has an invalid header")
        pos += 1 if btype == _ZSTD_BLOCK_RLE else bsize
        blocks += 1
        if header & 1:  # Last_Block
            break
    if fhd & 0x04:  # Content_Checksum_flag
        pos += 4
    if pos > end:
        raise _truncated("zstd", f"the frame needs {pos} bytes, {end} are there")
    return pos


def _zstd_module():
    """python-zstandard's C backend, loaded without its package __init__.

    ``import zstandard`` runs ``platform`` and ``typing`` imports and a
    backend selection that together cost ~10 ms of CPU, about a tenth of
    decoding a whole distribution kernel. The C extension itself needs none
    of it, so load it directly (registered under its own name, so a later
    ``import zstandard`` reuses it); fall back to the package if the layout
    is not the expected one.
    """
    import sys

    mod = sys.modules.get("zstandard.backend_c") or sys.modules.get("zstandard")
    if mod is not None:
        return mod
    try:
        import importlib.machinery
        import importlib.util

        spec = importlib.util.find_spec("zstandard")
        where = spec.submodule_search_locations[0] if spec else None
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(where, "backend_c" + suffix)
            if os.path.exists(path):
                loader = importlib.machinery.ExtensionFileLoader("zstandard.backend_c", path)
                module = importlib.util.module_from_spec(
                    importlib.util.spec_from_loader("zstandard.backend_c", loader)
                )
                loader.exec_module(module)
                sys.modules["zstandard.backend_c"] = module
                return module
    except (ImportError, OSError, TypeError, AttributeError, IndexError):
        pass
    import zstandard

    return zstandard


def _zstd(mv: memoryview, sink: _Sink) -> None:
    zstandard = _zstd_module()

    frame_end = _zstd_frame_end(mv)
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    buf = bytearray(OUT_CHUNK)
    view = memoryview(buf)
    put = sink.put
    try:
        with dctx.stream_reader(
            mv[:frame_end], read_size=IN_CHUNK, read_across_frames=False, closefd=False
        ) as reader:
            while True:
                n = reader.readinto(buf)
                if not n:
                    break
                put(view[:n])
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd stream is corrupt: {_one_line(exc)}") from None
    finally:
        view.release()


def decompress_to_fd(codec: str, src, fd: int, *, max_output: int) -> int:
    """Like :func:`decompress_to`, into the regular file open at ``fd``.

    The file's previous contents are discarded; on return it holds exactly
    the output (its size is the return value). For gzip, lz4, lzo and zstd
    this uses both CPUs and writes without intermediate copies: see the
    section comment above. A fast path that cannot finish (a wrong size
    hint, a file that cannot be mapped, a stream the fast decoder refuses)
    truncates the file and the streaming decoder starts again, so the
    output and the error messages are the streaming decoder's; a corrupt
    stream raises CodecError either way. OSError (a full disk) propagates
    as it is.
    """
    # The file paths live in their own module: ctypes, threads and mappings
    # are of no use to the boot path, which imports this one for detect_codec.
    from .compression_fd import decompress_to_fd as fast

    return fast(codec, src, fd, max_output=max_output)


def _bzip2(mv: memoryview, sink: _Sink) -> None:
    # Blocks decoded on every CPU (bzip2_blocks.py): libbz2 alone is the
    # floor of extract-vmlinux too, so only both CPUs get under it.
    from .bzip2_blocks import decode_bzip2

    decode_bzip2(mv, sink.put)


_DECODERS: dict[str, Callable[[memoryview, _Sink], None]] = {
    "gzip": _gzip,
    "bzip2": _bzip2,
    "lzma": lambda mv, sink: _stdlib_stream(
        "lzma", _make_lzma("FORMAT_ALONE"), _lzma_errors()
    )(mv, sink),
    "xz": lambda mv, sink: _stdlib_stream("xz", _make_lzma("FORMAT_XZ"), _lzma_errors())(mv, sink),
    "lzo": _lzo,
    "lz4": _lz4,
    "zstd": _zstd,
}
