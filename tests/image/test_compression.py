"""The seven payload codecs, checked against the real compressor CLIs.

Streams are made by the same tools (and options) Linux's scripts/Makefile.lib
uses, with Linux's 4-byte size trailer appended; the decoded bytes must be
exactly the input. Corrupt, truncated and oversized streams must fail with a
CodecError naming the codec.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import zlib

import pytest

from pvhboot.errors import CodecError
from pvhboot.image.compression import (
    CODECS,
    LZ4_LEGACY_BLOCK,
    decompress_bytes,
    decompress_to,
    decompress_to_fd,
    detect_codec,
)

# codec -> compressor command reading stdin and writing stdout, as Linux runs it
CLI = {
    "gzip": ["gzip", "-n", "-9", "-c"],
    "bzip2": ["bzip2", "-9", "-c"],
    "lzma": ["lzma", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB", "-c"],
    "lzo": ["lzop", "-9", "-c"],
    "lz4": ["lz4", "-l", "-9", "-c"],
    "zstd": ["zstd", "-19", "-q", "-c"],
}
LIMIT = 1 << 30


def _cli(cmd: list[str], data: bytes) -> bytes:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed")
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def _sample(size: int, seed: int) -> bytes:
    """Compressible but not trivial data: random 'words' from a small vocabulary."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=20000))
    return bytes(out[:size])


def _trailer(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little")


@pytest.fixture(scope="module")
def sample() -> bytes:
    return _sample(3 << 20, 1)


@pytest.fixture(scope="module")
def streams(sample) -> dict[str, bytes]:
    return {codec: _cli(cmd, sample) + _trailer(sample) for codec, cmd in CLI.items()}


def test_codec_list_is_linux_seven():
    assert CODECS == ("gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd")


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_against_cli(codec, sample, streams):
    stream = streams[codec]
    assert detect_codec(stream) == codec
    out = io.BytesIO()
    n = decompress_to(codec, stream, out, max_output=LIMIT)
    assert n == len(sample)
    assert out.getvalue() == sample


@pytest.mark.parametrize("codec", CODECS)
def test_mmap_and_memoryview_sources(codec, sample, streams, tmp_path):
    import mmap

    path = tmp_path / "s"
    path.write_bytes(streams[codec])
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert decompress_bytes(codec, m, max_output=LIMIT) == sample
        assert decompress_bytes(codec, memoryview(m)[: len(m)], max_output=LIMIT) == sample


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("keep", [0.5, 0.9, "minus9"])
def test_truncated_stream_is_an_error(codec, keep, streams):
    stream = streams[codec]
    cut = len(stream) - 9 if keep == "minus9" else int(len(stream) * keep)
    with pytest.raises(CodecError, match=codec):
        decompress_bytes(codec, stream[:cut], max_output=LIMIT)


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "lzma", "xz", "lzo", "zstd"])
def test_corrupt_stream_is_an_error(codec, streams):
    # Every codec but lz4 carries a checksum or a strict structure; smash a
    # run of bytes in the middle of the data.
    stream = bytearray(streams[codec])
    mid = len(stream) // 2
    stream[mid : mid + 64] = bytes(b ^ 0x5A for b in stream[mid : mid + 64])
    with pytest.raises(CodecError, match=codec):
        decompress_bytes(codec, bytes(stream), max_output=LIMIT)


def test_lz4_corrupt_block_size_is_an_error(streams):
    stream = bytearray(streams["lz4"])
    stream[4:8] = (0x7FFFFFFF).to_bytes(4, "little")
    with pytest.raises(CodecError, match="lz4 stream is corrupt"):
        decompress_bytes("lz4", bytes(stream), max_output=LIMIT)


def test_lz4_corrupt_block_data_is_an_error(streams):
    stream = bytearray(streams["lz4"])
    # Make the first sequence's match offset point before the output start.
    stream[8:40] = b"\x0f" + b"\xff" * 31
    with pytest.raises(CodecError, match="lz4"):
        decompress_bytes("lz4", bytes(stream), max_output=LIMIT)


@pytest.mark.parametrize("codec", CODECS)
def test_max_output_is_enforced(codec, sample, streams):
    with pytest.raises(CodecError, match=f"{codec} stream decompresses to more than"):
        decompress_bytes(codec, streams[codec], max_output=len(sample) - 1)
    assert len(decompress_bytes(codec, streams[codec], max_output=len(sample))) == len(sample)


@pytest.mark.parametrize("codec", CODECS)
def test_garbage_and_empty_inputs(codec):
    for junk in (b"", b"\x00" * 3, bytes(range(256)) * 4):
        with pytest.raises(CodecError, match=codec):
            decompress_bytes(codec, junk, max_output=LIMIT)


def test_unknown_codec_lists_known_ones():
    with pytest.raises(CodecError, match="known codecs are gzip, bzip2"):
        decompress_bytes("brotli", b"x", max_output=10)


def test_detect_codec():
    assert detect_codec(b"BZh9" + b"x" * 10) == "bzip2"
    assert detect_codec(b"BZhx") is None
    assert detect_codec(b"\x7fELF") is None
    assert detect_codec(b"") is None
    assert detect_codec(memoryview(b"\x28\xb5\x2f\xfd\x00")) == "zstd"


def test_lz4_legacy_multi_block():
    data = _sample(LZ4_LEGACY_BLOCK * 2 + 12345, 2)
    stream = _cli(["lz4", "-l", "-1", "-c"], data)
    # Three legacy blocks: the 4-byte size of the second follows the first.
    first = int.from_bytes(stream[4:8], "little")
    assert int.from_bytes(stream[8 + first : 12 + first], "little") > 0
    assert decompress_bytes("lz4", stream + _trailer(data), max_output=LIMIT) == data
    # Concatenated legacy frames (lz4 -l on two files) form one stream.
    two = stream + stream
    assert decompress_bytes("lz4", two, max_output=LIMIT) == data + data
    # A newer frame's magic ends the legacy stream.
    assert decompress_bytes("lz4", stream + b"\x04\x22\x4d\x18junk", max_output=LIMIT) == data


def test_zstd_without_content_size(sample):
    for cmd in (["zstd", "-q", "-c", "--no-content-size"], ["zstd", "-q", "-c", "-"]):
        stream = _cli(cmd, sample)
        import zstandard

        assert zstandard.frame_content_size(stream) == -1  # really absent
        assert decompress_bytes("zstd", stream + _trailer(sample), max_output=LIMIT) == sample


def test_zstd_reserved_block_type_is_an_error(streams):
    stream = bytearray(streams["zstd"])
    import zstandard

    header = zstandard.frame_header_size(bytes(stream[:18]))
    stream[header] |= 0x06  # Block_Type 3 (reserved)
    with pytest.raises(CodecError, match="zstd stream is corrupt"):
        decompress_bytes("zstd", bytes(stream), max_output=LIMIT)


# --- lzo: lzop's checksum variants --------------------------------------------


def test_lzo_crc32_checksums(sample):
    stream = _cli(["lzop", "-9", "--crc32", "-c"], sample)
    flags = int.from_bytes(stream[0x11:0x15], "big")
    assert flags & 0x1100 == 0x1100  # F_H_CRC32 | F_CRC32_D
    assert decompress_bytes("lzo", stream + _trailer(sample), max_output=LIMIT) == sample


def _lzop_stream(data: bytes, flags: int, block: int = 256 << 10) -> bytes:
    """An lzop 1.04-style stream with the given checksum flags, built here so
    that the compressed-data checksums (which the CLI never writes) are covered."""
    from lzallright import LZOCompressor

    comp = LZOCompressor()
    header = (
        (0x1040).to_bytes(2, "big")  # version
        + (0x20A0).to_bytes(2, "big")  # library version
        + (0x0940).to_bytes(2, "big")  # version needed to extract
        + bytes([1, 5])  # method M_LZO1X_1, level
        + flags.to_bytes(4, "big")
        + (0o100644).to_bytes(4, "big")  # mode
        + (0).to_bytes(4, "big")  # mtime low
        + (0).to_bytes(4, "big")  # mtime high
        + b"\x00"  # no name
    )
    check = zlib.crc32(header) if flags & 0x1000 else zlib.adler32(header)
    out = bytearray(b"\x89LZO\x00\r\n\x1a\n" + header + check.to_bytes(4, "big"))
    for i in range(0, len(data), block):
        raw = data[i : i + block]
        packed = comp.compress(raw)
        stored = len(packed) >= len(raw)
        payload = raw if stored else packed
        out += len(raw).to_bytes(4, "big") + len(payload).to_bytes(4, "big")
        if flags & 0x1:
            out += zlib.adler32(raw).to_bytes(4, "big")
        if flags & 0x100:
            out += zlib.crc32(raw).to_bytes(4, "big")
        if not stored:
            if flags & 0x2:
                out += zlib.adler32(payload).to_bytes(4, "big")
            if flags & 0x200:
                out += zlib.crc32(payload).to_bytes(4, "big")
        out += payload
    out += bytes(4)
    return bytes(out)


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x3, 0x300, 0x1303])
def test_lzo_checksum_flags(flags):
    data = _sample(700_000, 3) + random.Random(4).randbytes(300_000)  # last block is stored
    stream = _lzop_stream(data, flags)
    assert decompress_bytes("lzo", stream + _trailer(data), max_output=LIMIT) == data
    if flags & 0x202:  # a compressed-data checksum: flip a byte in the first block's data
        bad = bytearray(stream)
        bad[-1 - len(data) // 2] ^= 0xFF
        with pytest.raises(CodecError, match="lzo"):
            decompress_bytes("lzo", bytes(bad), max_output=LIMIT)


def test_lzo_bad_header_checksum(streams):
    stream = bytearray(streams["lzo"])
    stream[0x19] ^= 1  # inside the mode field
    with pytest.raises(CodecError, match="lzo stream header checksum is wrong"):
        decompress_bytes("lzo", bytes(stream), max_output=LIMIT)


def test_lzo_absurd_block_length(streams):
    data = b"abc" * 1000
    stream = bytearray(_lzop_stream(data, 0))
    first = stream.index(len(data).to_bytes(4, "big"))
    stream[first : first + 4] = (0xFFFFFFF0).to_bytes(4, "big")
    with pytest.raises(CodecError, match="lzo stream is corrupt: block 0 claims"):
        decompress_bytes("lzo", bytes(stream), max_output=LIMIT)


# --- bombs -------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "xz", "zstd", "lz4"])
def test_bomb_stops_at_the_limit_in_bounded_chunks(codec):
    zeros = bytes(64 << 20)
    stream = _cli(CLI[codec], zeros)

    class Counting(io.RawIOBase):
        biggest = 0
        total = 0

        def writable(self):
            return True

        def write(self, b):
            Counting.biggest = max(Counting.biggest, len(b))
            Counting.total += len(b)
            return len(b)

    with pytest.raises(CodecError, match="more than the limit of 16777216"):
        decompress_to(codec, stream, Counting(), max_output=16 << 20)
    assert Counting.total <= 16 << 20
    assert Counting.biggest <= 8 << 20  # output leaves in bounded chunks


# --- fuzz ----------------------------------------------------------------------

_MAGIC = {
    "gzip": b"\x1f\x8b\x08",
    "bzip2": b"BZh9",
    "lzma": b"\x5d\x00\x00",
    "xz": b"\xfd7zXZ\x00",
    "lzo": b"\x89LZO\x00\r\n\x1a\n",
    "lz4": b"\x02\x21\x4c\x18",
    "zstd": b"\x28\xb5\x2f\xfd",
}


@pytest.mark.parametrize("codec", CODECS)
def test_fuzz_decoders_raise_only_codec_error(codec, streams):
    # Random tails after a valid magic, and random mutations of a real
    # stream: each either decodes (within the limit) or raises CodecError;
    # nothing else escapes, nothing hangs.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    real = streams[codec][:4096]

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        tail=st.binary(max_size=512),
        flips=st.lists(st.tuples(st.integers(0, len(real) - 1), st.integers(1, 255)),
                       max_size=6),
        cut=st.integers(0, len(real)),
    )
    def check(tail, flips, cut):
        for data in (_MAGIC[codec] + tail, _mutate(real, flips)[:cut]):
            try:
                decompress_bytes(codec, data, max_output=1 << 22)
            except CodecError as exc:
                assert codec in str(exc) and "\n" not in str(exc)

    check()


def _mutate(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for pos, xor in flips:
        out[pos] ^= xor
    return bytes(out)


# --- decompress_to_fd: the file paths (threads, mapping, fallbacks) -------------


def _to_file(codec, stream, tmp_path, *, max_output=LIMIT, junk=b"", flags=None):
    import os

    path = tmp_path / "out"
    path.write_bytes(junk)  # whatever was there must not survive
    fd = os.open(path, flags if flags is not None else os.O_RDWR)
    try:
        n = decompress_to_fd(codec, stream, fd, max_output=max_output)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert n == len(data)
    return data


def _threads_left() -> int:
    import _thread

    return _thread._count()  # threads started through _thread that still run


@pytest.mark.parametrize("codec", CODECS)
def test_fd_round_trip(codec, sample, streams, tmp_path):
    before = _threads_left()
    assert _to_file(codec, streams[codec], tmp_path, junk=b"old" * 5_000_000) == sample
    assert _threads_left() == before


@pytest.mark.parametrize("codec", CODECS)
def test_fd_read_only_mmap_source(codec, sample, streams, tmp_path):
    import mmap

    path = tmp_path / "s"
    path.write_bytes(b"pad" + streams[codec])
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        with memoryview(m) as view:
            assert _to_file(codec, view[3:], tmp_path) == sample


@pytest.mark.parametrize("codec", ["lz4", "lzo", "zstd", "gzip"])
def test_fd_max_output(codec, sample, streams, tmp_path):
    with pytest.raises(CodecError, match=f"{codec} stream decompresses to more than"):
        _to_file(codec, streams[codec], tmp_path, max_output=len(sample) - 1)
    assert _to_file(codec, streams[codec], tmp_path, max_output=len(sample)) == sample


def test_fd_lz4_many_blocks_and_frames(tmp_path):
    # More blocks than the pipeline has buffers, two frames, a short last block.
    data = _sample(LZ4_LEGACY_BLOCK * 2 + 12345, 2)
    stream = _cli(["lz4", "-l", "-1", "-c"], data)
    assert _to_file("lz4", stream + stream + _trailer(data + data), tmp_path) == data + data
    # A short block in the middle moves every later block: offsets follow the data.
    small = _cli(["lz4", "-l", "-1", "-c"], b"tiny" * 1000)
    assert _to_file("lz4", small + stream, tmp_path) == b"tiny" * 1000 + data


@pytest.mark.parametrize("codec", ["lz4", "lzo"])
def test_fd_corrupt_block_stops_every_thread(codec, tmp_path):
    data = _sample(LZ4_LEGACY_BLOCK * 2 + 12345, 5)
    if codec == "lz4":
        stream = bytearray(_cli(["lz4", "-l", "-1", "-c"], data))
        first = int.from_bytes(stream[4:8], "little")
        second = 8 + first + 4  # the second block's data
        stream[second : second + 32] = b"\x0f" + b"\xff" * 31
    else:
        stream = bytearray(_lzop_stream(data, 0))
        stream[len(stream) // 2 : len(stream) // 2 + 64] = b"\xff" * 64
    before = _threads_left()
    with pytest.raises(CodecError, match=f"{codec} stream is corrupt"):
        _to_file(codec, bytes(stream), tmp_path)
    assert _threads_left() == before


@pytest.mark.parametrize("claim", [0, 100, -1, 1 << 31, "huge"])
def test_fd_zstd_wrong_size_trailer_falls_back(claim, sample, tmp_path):
    # The trailer is only a hint: too small, one short, too large, beyond
    # max_output or 4 GiB: the output is still exactly the stream's.
    stream = _cli(["zstd", "-q", "-c", "-"], sample)  # no content size in the frame
    size = len(sample) + claim if claim == -1 else (0xFFFFFFFF if claim == "huge" else claim)
    out = _to_file("zstd", stream + size.to_bytes(4, "little"), tmp_path, max_output=1 << 30)
    assert out == sample


def test_fd_zstd_write_only_descriptor_falls_back(sample, streams, tmp_path):
    import os

    assert _to_file("zstd", streams["zstd"], tmp_path, flags=os.O_WRONLY) == sample


def test_fd_zstd_corrupt_is_an_error(streams, tmp_path):
    stream = bytearray(streams["zstd"])
    mid = len(stream) // 2
    stream[mid : mid + 64] = bytes(b ^ 0x5A for b in stream[mid : mid + 64])
    with pytest.raises(CodecError, match="zstd stream is corrupt"):
        _to_file("zstd", bytes(stream), tmp_path)


@pytest.mark.parametrize("codec", ["gzip", "lz4", "lzo", "zstd", "zstd-lying-trailer"])
def test_fd_decode_under_the_child_memory_limit(codec, tmp_path):
    # The vmlinux cache's worker runs the decoders with RLIMIT_AS at its own
    # baseline + CHILD_EXTRA_MEMORY: threads, buffers and mappings must fit.
    import sys

    from pvhboot.image.vmlinux_cache import CHILD_EXTRA_MEMORY

    data = _sample(20 << 20, 6)
    cmd = {"lz4": ["lz4", "-l", "-9", "-c"], "lzo": ["lzop", "-9", "-c"],
           "zstd": ["zstd", "-19", "-q", "-c", "-"], "gzip": ["gzip", "-n", "-9", "-c"],
           "zstd-lying-trailer": ["zstd", "-19", "-q", "-c", "-"]}[codec]
    stream = _cli(cmd, data) + (_trailer(data) if codec != "gzip" else b"")
    if codec == "zstd-lying-trailer":
        # Claims just under MAX_VMLINUX: the mapping does not fit the limit,
        # and the streaming decoder must take over.
        from pvhboot.image.vmlinux_cache import MAX_VMLINUX

        codec, stream = "zstd", stream[:-4] + (MAX_VMLINUX - 1).to_bytes(4, "little")
    src = tmp_path / "stream"
    src.write_bytes(stream)
    out = tmp_path / "out"
    out.touch()
    proc = subprocess.run(
        [sys.executable, "-m", "pvhboot.image._extract_worker", str(src), codec, "0",
         str(len(stream)), str(out), str(CHILD_EXTRA_MEMORY), "60"],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == data


@pytest.mark.parametrize("codec", ["gzip", "lz4", "lzo", "zstd"])
def test_fd_fast_paths_are_taken(codec, sample, streams, tmp_path):
    # The streaming fallback would pass every test above on its own: check
    # the fast path itself finishes (where its prerequisites are there).
    import os

    from pvhboot.image import compression_fd

    if compression_fd._PARALLEL < 2 and codec in ("lz4", "lzo"):
        pytest.skip("one CPU: the threaded path is not used")
    if codec == "zstd" and compression_fd._libzstd() is None:
        pytest.skip("no libzstd.so.1")
    if codec == "gzip" and compression_fd._libdeflate() is None:
        pytest.skip("no libdeflate.so.0")
    if codec == "gzip":
        streams = {"gzip": streams["gzip"][:-4]}  # the fixture adds a size; gzip has ISIZE
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with memoryview(streams[codec]) as mv:
            n = compression_fd._FD_DECODERS[codec](mv, fd, LIMIT)
    finally:
        os.close(fd)
    assert n == len(sample)
    assert path.read_bytes()[:n] == sample


def test_fd_gzip_wrong_isize_hint_falls_back(sample, streams, tmp_path):
    # Bytes after the member (a vmlinux.gz with padding) make the last four
    # bytes no ISIZE: the output is still exactly the member's.
    stream = streams["gzip"]  # gzip has no Linux trailer: the member ends the payload
    tails = [b"\x00" * 4, b"\xff\xff\xff\x7f", b"junk junk", (12345).to_bytes(4, "little"),
             (len(sample) + 100).to_bytes(4, "little")]  # none, huge, short, long hints
    for tail in tails:
        assert _to_file("gzip", stream + tail, tmp_path) == sample
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(CodecError, match="gzip stream is corrupt"):
        _to_file("gzip", bytes(bad), tmp_path)


@pytest.mark.parametrize("codec", ["gzip", "lz4", "lzo", "zstd"])
def test_fd_fuzz_raises_only_codec_error(codec, streams, tmp_path):
    # The file paths on mutated streams (sizes, hints and block headers
    # included): output within the limit or CodecError, no thread left over.
    import os

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    real = streams[codec][:6000] + streams[codec][-4:]
    path = tmp_path / "fuzz"
    before = _threads_left()

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        flips=st.lists(st.tuples(st.integers(0, len(real) - 1), st.integers(1, 255)),
                       max_size=6),
        cut=st.integers(0, len(real)),
    )
    def check(flips, cut):
        data = _mutate(real, flips)[:cut]
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            n = decompress_to_fd(codec, data, fd, max_output=1 << 22)
            assert os.fstat(fd).st_size == n <= 1 << 22
        except CodecError as exc:
            assert codec in str(exc) and "\n" not in str(exc)
        finally:
            os.close(fd)
        assert _threads_left() == before

    check()


@pytest.mark.parametrize("codec", ["gzip", "lz4", "lzo", "zstd"])
def test_fd_file_size_limit_is_a_clean_oserror(codec, streams, tmp_path):
    # A file that cannot grow (RLIMIT_FSIZE here, a full disk in life) is an
    # OSError from every path, never a signal from a store into a mapping.
    import sys

    src = tmp_path / "stream"
    src.write_bytes(streams[codec])
    code = f"""
import errno, os, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from pvhboot.image.compression import decompress_to_fd
data = open({str(src)!r}, "rb").read()
fd = os.open({str(tmp_path / "out")!r}, os.O_RDWR | os.O_CREAT)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    decompress_to_fd({codec!r}, data, fd, max_output=1 << 30)
except OSError as exc:
    print("OSError", errno.errorcode.get(exc.errno))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OSError EFBIG"


@pytest.mark.parametrize("codec", ["gzip", "lz4", "lzo", "zstd"])
def test_fd_without_a_second_thread(codec, sample, streams, tmp_path, monkeypatch):
    # No thread can be started (a thread limit, no memory for a stack): the
    # calling thread does all the work.
    import _thread

    def refuse(*args):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_thread, "start_new_thread", refuse)
    assert _to_file(codec, streams[codec], tmp_path) == sample


def test_multi_block_bzip2_goes_through_the_block_decoder(monkeypatch, tmp_path):
    # decompress_to and decompress_to_fd reach bzip2_blocks, and what they
    # write is the bzip2 CLI's output for a stream of many blocks.
    import bz2

    from pvhboot.image import bzip2_blocks

    calls = []
    real = bzip2_blocks.decode_bzip2
    monkeypatch.setattr(bzip2_blocks, "decode_bzip2",
                        lambda mv, put, **kw: calls.append(len(mv)) or real(mv, put, **kw))
    rng = random.Random(7)
    data = bytes(rng.choice(b"abcdefgh ") for _ in range(700_000)) * 2
    stream = bz2.compress(data, 1) + (len(data)).to_bytes(4, "little")  # ~14 blocks
    out = io.BytesIO()
    assert decompress_to("bzip2", stream, out, max_output=1 << 24) == len(data)
    assert out.getvalue() == data
    path = tmp_path / "out"
    with open(path, "w+b") as f:
        assert decompress_to_fd("bzip2", stream, f.fileno(), max_output=1 << 24) == len(data)
    assert path.read_bytes() == data
    assert len(calls) == 2


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd", "lzo"])
def test_fd_paths_without_the_system_libraries(codec, monkeypatch, sample, streams, tmp_path):
    # A machine without libdeflate, libzstd, liblzo2 or liblz4: the same
    # bytes, from the Python codecs (lz4 then uses the copy inside the lz4
    # extension, lzo lzallright).
    from pvhboot.image import compression, compression_fd

    monkeypatch.setattr(compression, "_SYSTEM_LIBS", {
        "libzstd.so.1": None, "libdeflate.so.0": None, "liblzo2.so.2": None})
    monkeypatch.setattr(compression, "_lz4_safe_fn", None)
    import ctypes

    real_cdll = ctypes.CDLL

    def no_liblz4(name, *args, **kwargs):
        if name == "liblz4.so.1":
            raise OSError(f"{name}: cannot open shared object file")
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", no_liblz4)
    assert compression_fd._libzstd() is None and compression_fd._libdeflate() is None
    stream = streams[codec][:-4] if codec == "gzip" else streams[codec]
    assert _to_file(codec, stream, tmp_path) == sample
    if codec == "lz4" and compression_fd._PARALLEL > 1:
        assert compression_fd._lz4_safe() is not None  # found in the lz4 extension


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_fd_size_hint_beyond_what_the_stream_can_hold_is_not_allocated(codec, monkeypatch,
                                                                      tmp_path):
    # A 60-byte stream whose size field claims 500 MB: no 500 MB fallocate
    # (the streaming decoder runs and says what is wrong).
    import gzip as gz
    import os

    from pvhboot.image import compression_fd

    claim = 500 << 20
    if codec == "gzip":
        stream = gz.compress(b"tiny")[:-4] + claim.to_bytes(4, "little")
    else:
        stream = _cli(["zstd", "-q", "-c", "--no-content-size"], b"tiny") + \
            claim.to_bytes(4, "little")
    sizes = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: sizes.append(n) or
                        real(fd, off, n))
    try:
        _to_file(codec, stream, tmp_path, max_output=1 << 30)
    except CodecError:
        pass  # gzip: ISIZE does not match; zstd: the trailer is just a hint
    assert all(n <= len(stream) * compression_fd.ZSTD_MAX_RATIO for n in sizes), sizes
    assert claim not in sizes


class _SlowNext:
    """An iterator that hands out item ``slow`` and then sleeps, as if the
    thread that took it lost the CPU right there (next() stays atomic)."""

    def __init__(self, items, slow, only_off_main=False):
        self.items, self.i, self.slow, self.only_off_main = list(items), 0, slow, only_off_main

    def __iter__(self):
        return self

    def __next__(self):
        import threading
        import time

        i = self.i
        if i >= len(self.items):
            raise StopIteration
        self.i = i + 1
        if i == self.slow and not (
            self.only_off_main and threading.current_thread() is threading.main_thread()
        ):
            time.sleep(0.3)
        return self.items[i]


def test_fd_lz4_block_taken_by_a_preempted_thread_is_still_written(monkeypatch, tmp_path):
    # The other thread finishes the last block meanwhile: the slow one must
    # still write the block it took, or the file has a hole and says nothing.
    import os

    from pvhboot.image import compression_fd

    if compression_fd._PARALLEL < 2 or compression_fd._lz4_safe() is None:
        pytest.skip("the threaded lz4 path needs 2 CPUs")
    raw = os.urandom(8 << 20) * 2 + b"tail" * 1000  # blocks of 8 MiB, 8 MiB, 4000 B
    stream = _cli(["lz4", "-l", "-c", "-1"], raw)
    monkeypatch.setattr(compression_fd, "enumerate",
                        lambda items: _SlowNext(list(enumerate(items)), 1), raising=False)
    assert _to_file("lz4", stream, tmp_path) == raw


def test_fd_lzo_block_taken_by_a_preempted_worker_is_still_written(monkeypatch, tmp_path):
    import os

    from pvhboot.image import compression_fd

    if compression_fd._PARALLEL < 2:
        pytest.skip("the threaded lzo path needs 2 CPUs")
    raw = os.urandom(1 << 20)  # lzop blocks of 256 KiB: 4 jobs
    stream = _cli(["lzop", "-c"], raw)
    monkeypatch.setattr(compression_fd, "iter",
                        lambda items: _SlowNext(items, len(items) - 1, only_off_main=True),
                        raising=False)
    assert _to_file("lzo", stream, tmp_path) == raw


def test_fd_gzip_header_crc_is_checked(sample, tmp_path):
    # libdeflate skips FHCRC without checking it; gzip -dc refuses a wrong one.
    import gzip as gz

    member = gz.compress(sample)
    flagged = member[:3] + bytes([member[3] | 0x02]) + member[4:10] + b"\xde\xad" + member[10:]
    with pytest.raises(CodecError, match="header crc mismatch"):
        _to_file("gzip", flagged, tmp_path)


def test_lz4_block_count_is_checked_against_the_limit_while_walking():
    # 100 headers of 5-byte blocks, then a cut-off one: the limit is noticed
    # at block 3 (3 x 8 MiB > 20 MiB), not after walking to the truncation.
    from pvhboot.image.compression import _lz4_blocks

    stream = (0x184C2102).to_bytes(4, "little") + ((5).to_bytes(4, "little") + b"\x50abcd") * 100
    stream += (1000).to_bytes(4, "little") + b"xx"
    with memoryview(stream) as mv:
        with pytest.raises(CodecError, match="more than the limit"):
            _lz4_blocks(mv, 20 << 20)
        with pytest.raises(CodecError, match="truncated"):
            _lz4_blocks(mv, 1 << 30)


def test_fd_lzo_with_too_many_blocks_streams_instead(monkeypatch, tmp_path):
    import os

    from pvhboot.image import compression_fd

    raw = os.urandom(1 << 20)  # 4 lzop blocks
    stream = _cli(["lzop", "-c"], raw)
    monkeypatch.setattr(compression_fd, "_LZO_MAX_JOBS", 2)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        with memoryview(stream) as mv:
            assert compression_fd._FD_DECODERS["lzo"](mv, fd, LIMIT) is None
    finally:
        os.close(fd)
    assert _to_file("lzo", stream, tmp_path) == raw


def test_lzo_block_that_expands_past_its_header_is_refused_without_growing(tmp_path):
    # A block whose header says 1 KiB but whose data decodes to 1 MiB: liblzo2
    # stops at the 1 KiB it was given (lzallright would grow its buffer).
    from pvhboot.image import compression

    if compression._system_lib("liblzo2.so.2", compression._declare_lzo) is None:
        pytest.skip("no liblzo2.so.2")
    big = bytes(1 << 20)
    stream = _cli(["lzop", "-c"], big)
    with memoryview(stream) as mv:
        jobs = list(compression._lzop_blocks(mv, LIMIT))
        block, data, u_len, d_sums, c_sums = jobs[0]
        assert len(data) < u_len  # a compressed block
        with pytest.raises(CodecError, match="block 0: it decodes to more than its header says"):
            compression._lzop_decode(block, data, 1024, (), ())
        assert bytes(compression._lzop_decode(block, data, u_len, d_sums, c_sums)) == \
            big[:u_len]
