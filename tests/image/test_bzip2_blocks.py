"""Parallel bzip2 decoding (image/bzip2_blocks.py) against bz2 and the bzip2 CLI."""

from __future__ import annotations

import bz2
import hashlib
import itertools
import mmap
import os
import random
import shutil
import subprocess
import sys
import threading
import tracemalloc

import pytest

from pvhboot.errors import CodecError
from pvhboot.image import bzip2_blocks
from pvhboot.image.bzip2_blocks import BLOCK_MAGIC, END_MAGIC, decode_bzip2


def _text(size: int, seed: int) -> bytes:
    """Random words: compressible ~3:1, no long runs, so a block holds ~level x 100 kB."""
    rng = random.Random(seed)
    letters = bytes(range(ord("a"), ord("z") + 1))
    vocab = [
        bytes(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(3000)
    ]
    words = rng.choices(vocab, k=size // 5)
    return b" ".join(words)[:size]


def _from_alphabet(alphabet: list[int], size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    return rng.randbytes(size).translate(table)


def _decode(data, **kwargs) -> bytes:
    out: list[bytes] = []
    decode_bzip2(data, out.append, **kwargs)
    return b"".join(out)


def _magics(stream: bytes, magic: int) -> list[int]:
    """Bit offsets of every occurrence of ``magic`` (true or by chance)."""
    return bzip2_blocks._MagicFinder(magic).find(memoryview(stream), 0, len(stream))


@pytest.fixture
def no_serial(monkeypatch):
    """Fail the test if the serial decoder runs: the parallel path must do it all."""

    def refuse(*args, **kwargs):
        raise AssertionError("the serial decoder ran")

    monkeypatch.setattr(bzip2_blocks, "_serial", refuse)


@pytest.fixture(scope="module")
def text9() -> bytes:
    return _text(3_200_000, seed=9)


@pytest.fixture(scope="module")
def stream9(text9) -> bytes:
    data = bz2.compress(text9, 9)
    assert len(_magics(data, BLOCK_MAGIC)) >= 4  # 900 kB blocks
    return data


@pytest.fixture(scope="module")
def text1() -> bytes:
    return _text(1_000_000, seed=1)


@pytest.fixture(scope="module")
def stream1(text1) -> bytes:
    data = bz2.compress(text1, 1)
    assert len(_magics(data, BLOCK_MAGIC)) >= 10  # 100 kB blocks
    return data


# --- correct output ----------------------------------------------------------


def test_level9_multiblock_matches_bz2(stream9, text9, no_serial):
    assert _decode(memoryview(stream9), workers=2) == text9


def test_level1_multiblock_matches_bz2(stream1, text1, no_serial):
    assert _decode(stream1, workers=2) == text1
    assert _decode(stream1, workers=3) == text1


def test_matches_bzip2_cli(stream1, tmp_path):
    if shutil.which("bzip2") is None:
        pytest.skip("no bzip2 CLI")
    expected = subprocess.run(
        ["bzip2", "-dc"], input=stream1, capture_output=True, check=True
    ).stdout
    assert _decode(stream1, workers=2) == expected


@pytest.mark.parametrize("level", [2, 5, 8])
def test_other_levels_and_mmap_input(tmp_path, no_serial, level):
    text = _text(level * 200_000 + 50_000, seed=level)  # two blocks and a bit
    if True:
        path = tmp_path / f"l{level}.bz2"
        path.write_bytes(bz2.compress(text, level))
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as view:
                assert _decode(view, workers=2) == text


def test_output_chunks_are_bounded(stream9):
    sizes: list[int] = []
    decode_bzip2(stream9, lambda chunk: sizes.append(len(chunk)), workers=2)
    assert max(sizes) <= bzip2_blocks.OUT_CHUNK
    assert sum(sizes) == 3_200_000


def test_workers_one_decodes_serially(stream1, text1):
    before = threading.active_count()
    assert _decode(stream1, workers=1) == text1
    assert threading.active_count() == before


def test_default_workers(stream1, text1):
    assert _decode(stream1) == text1


def test_size_trailer_and_garbage_ignored(stream1, text1, no_serial):
    # Linux appends the uncompressed size, little-endian.
    assert _decode(stream1 + len(text1).to_bytes(4, "little"), workers=2) == text1
    # A header without a block after it does not start another stream.
    assert _decode(stream1 + b"BZh9garbage", workers=2) == text1


def test_concatenated_streams(text1, text9, no_serial):
    a = bz2.compress(text1, 1)
    b = bz2.compress(b"", 9)
    c = bz2.compress(text9[:1_900_000], 9)
    d = bz2.compress(b"tail", 3)
    data = a + b + c + d + b"\x12\x34\x56\x78"
    expected = text1 + text9[:1_900_000] + b"tail"
    assert _decode(data, workers=2) == expected
    assert bz2.decompress(a + b + c + d) == expected


def test_concatenated_streams_serially(text1):
    # Without threads, the same rule for what follows a stream.
    data = bz2.compress(text1, 1) + bz2.compress(b"", 9) + bz2.compress(b"end", 2) + b"\1\2\3\4"
    assert _decode(data, workers=1) == text1 + b"end"


def test_block_magic_in_trailing_garbage(stream9, text9):
    garbage = b"\0\0\0\0" + BLOCK_MAGIC.to_bytes(6, "big") + bytes(range(200))
    assert _decode(stream9 + garbage, workers=2) == text9


def test_one_block_and_empty_streams():
    one = b"hello, world\n" * 5000
    assert _decode(bz2.compress(one, 9), workers=2) == one
    assert _decode(bz2.compress(b"", 9), workers=2) == b""
    assert _decode(bz2.compress(b"", 1) + b"\0\0\0\0", workers=2) == b""
    assert _decode(bz2.compress(b"x", 1) * 3, workers=2) == b"xxx"


def test_many_small_streams(no_serial):
    # pbzip2 writes one stream per block; here 40 one-block streams.
    parts = [_text(20_000, seed=n) for n in range(40)]
    data = b"".join(bz2.compress(p, 1 + n % 9) for n, p in enumerate(parts))
    assert _decode(data, workers=2) == b"".join(parts)


# --- false block boundaries ---------------------------------------------------


def _planted(magic: int, sizes: tuple[int, int, int]) -> tuple[bytes, bytes]:
    """Data whose compressed blocks contain ``magic`` where no block starts.

    Each block lists the byte values it uses as a 256-bit map (one bit per
    value, in order) after 16 bits saying which 16-value groups are used.
    Using exactly the values whose bits spell ``magic`` from value 16 on
    (and one value in every other group) puts ``magic`` into the block.
    The text is ``sizes[0]`` random letters, ``sizes[1]`` bytes with those
    values, then ``sizes[2]`` letters; blocks are 500 kB.
    """
    bits = [(magic >> (47 - j)) & 1 for j in range(48)]
    alphabet = [16 + j for j in range(48) if bits[j]]
    alphabet += [group * 16 + 5 for group in range(16) if not 1 <= group <= 3]
    letters = list(range(ord("a"), ord("z") + 1))
    text = b"".join(
        (
            _from_alphabet(letters, sizes[0], 1),
            _from_alphabet(alphabet, sizes[1], 2),
            _from_alphabet(letters, sizes[2], 3),
        )
    )
    return text, bz2.compress(text, 5)


@pytest.mark.parametrize("magic", [BLOCK_MAGIC, END_MAGIC])
def test_planted_magic_in_a_middle_block(magic):
    # Blocks 1, 2: letters; block 3 also holds the planted values; 4, 5: letters.
    text, stream = _planted(magic, (1_100_000, 350_000, 600_000))
    assert bz2.decompress(stream) == text
    # Five true block magics and one end magic, plus the planted one.
    blocks, ends = _magics(stream, BLOCK_MAGIC), _magics(stream, END_MAGIC)
    assert (len(blocks), len(ends)) == ((6, 1) if magic == BLOCK_MAGIC else (5, 2))
    before = bzip2_blocks.SERIAL_FALLBACKS
    assert _decode(stream, workers=2) == text
    # A false block magic splits block 3: that piece fails and the rest of
    # the stream is decoded serially. An end magic is only looked for where
    # a stream can end, so a false one in block 3 is never seen.
    assert bzip2_blocks.SERIAL_FALLBACKS == before + (magic == BLOCK_MAGIC)


@pytest.mark.parametrize("magic", [BLOCK_MAGIC, END_MAGIC])
def test_planted_magic_in_the_last_blocks(magic):
    text, stream = _planted(magic, (1_100_000, 900_000, 0))
    assert bz2.decompress(stream) == text
    before = bzip2_blocks.SERIAL_FALLBACKS
    assert _decode(stream, workers=2) == text
    assert bzip2_blocks.SERIAL_FALLBACKS == before + 1


def test_fallback_in_a_later_stream(stream1, text1):
    # The serial decoder restarts at the second stream, skipping the output
    # of its first two blocks, which went out already.
    text, stream = _planted(BLOCK_MAGIC, (1_100_000, 350_000, 600_000))
    before = bzip2_blocks.SERIAL_FALLBACKS
    assert _decode(stream1 + stream + stream1, workers=2) == text1 + text + text1
    assert bzip2_blocks.SERIAL_FALLBACKS == before + 1


def test_false_split_injected_falls_back(stream9, text9, monkeypatch):
    """A split inside a block (an injected false magic) still gives the right output."""
    real_next_at = bzip2_blocks._Scanner.next_at
    third = _magics(stream9, BLOCK_MAGIC)[2]
    fake = third + 12345  # inside the third block

    def next_at(self, pos, horizon=None):
        hit = real_next_at(self, pos, horizon)
        if pos <= fake and (hit is None or hit[0] > fake):
            return (fake, bzip2_blocks._BLOCK)
        return hit

    monkeypatch.setattr(bzip2_blocks._Scanner, "next_at", next_at)
    before = bzip2_blocks.SERIAL_FALLBACKS
    assert _decode(stream9, workers=2) == text9
    assert bzip2_blocks.SERIAL_FALLBACKS == before + 1


def _with_magic(noise: bytes, pos: int, magic: int) -> memoryview:
    width = len(noise) * 8
    value = int.from_bytes(noise, "big")
    value &= ~(((1 << 48) - 1) << (width - pos - 48))
    value |= magic << (width - pos - 48)
    return memoryview(value.to_bytes(len(noise), "big"))


def test_scanner_finds_magics_at_every_bit_offset():
    rng = random.Random(7)
    for shift in range(8):
        for magic, kind in ((BLOCK_MAGIC, bzip2_blocks._BLOCK), (END_MAGIC, bzip2_blocks._END)):
            pos = 8 * 1234 + shift
            view = _with_magic(rng.randbytes(3000), pos, magic)
            assert bzip2_blocks._Scanner(view).next_at(pos - 100) == (pos, kind)
            assert bzip2_blocks._bits(view, pos, 48) == magic
            # At the very end of the data, and across a scan window's edge.
            last = (3000 - 7) * 8 + shift if shift else (3000 - 6) * 8
            view = _with_magic(rng.randbytes(3000), last, magic)
            assert bzip2_blocks._MagicFinder(magic).find(view, 0, 3000)[-1:] == [last]
            edge = bzip2_blocks.SCAN_WINDOW * 8 - 20 + shift
            view = _with_magic(bytes(bzip2_blocks.SCAN_WINDOW + 100), edge, magic)
            assert bzip2_blocks._MagicFinder(magic).find(view, 0, len(view)) == [edge]


# --- corrupt and truncated input ---------------------------------------------


def test_flipped_bit_in_a_block(stream1):
    starts = _magics(stream1, BLOCK_MAGIC)
    # Block data; a block CRC; a block magic; the last bits of a block.
    for bit in (starts[3] + 5000, starts[3] + 60, starts[2] + 10, starts[-2] - 7):
        data = bytearray(stream1)
        data[bit >> 3] ^= 0x80 >> (bit & 7)
        with pytest.raises(CodecError, match=r"^bzip2 stream is corrupt"):
            _decode(bytes(data), workers=2)


def test_wrong_combined_crc(stream1):
    [end] = _magics(stream1, END_MAGIC)
    bit = end + 48 + 9  # inside the combined CRC
    data = bytearray(stream1)
    data[bit >> 3] ^= 0x80 >> (bit & 7)
    with pytest.raises(CodecError, match="combined CRC"):
        _decode(bytes(data), workers=2)
    with pytest.raises(CodecError, match=r"^bzip2 stream is corrupt"):
        _decode(bytes(data), workers=1)


def _outcome(data: bytes, workers: int):
    try:
        return hashlib.sha256(_decode(data, workers=workers)).hexdigest()
    except CodecError:
        return "CodecError"


def test_random_bit_flips_agree_with_serial():
    """Whatever a flipped bit does, the threads and the serial decoder agree."""
    stream = bz2.compress(_text(420_000, seed=11), 1)  # five blocks
    rng = random.Random(12)
    for bit in [rng.randrange(len(stream) * 8) for _ in range(25)] + [len(stream) * 8 - 1]:
        data = bytearray(stream)
        data[bit >> 3] ^= 0x80 >> (bit & 7)
        assert _outcome(bytes(data), 2) == _outcome(bytes(data), 1), bit


def test_not_bzip2():
    with pytest.raises(CodecError, match="bzip2 stream is"):
        _decode(b"BZh9" + bytes(100), workers=2)
    with pytest.raises(CodecError, match="bzip2 stream is"):
        _decode(b"gzip" * 100, workers=2)


def test_truncated_everywhere(stream1):
    size = len(stream1)
    cuts = sorted(
        set(range(0, size, size // 37)) | set(range(size - 12, size)) | {1, 4, 9, 10, 11}
    )
    before = threading.active_count()
    for cut in cuts:
        with pytest.raises(CodecError, match=r"^bzip2 stream is (truncated|corrupt)"):
            _decode(stream1[:cut], workers=2)
    assert threading.active_count() == before


# --- stopping early -----------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.mark.parametrize("after", [0, 1, 2_500_000])
def test_put_raising_stops_the_workers(stream9, after):
    before = threading.active_count()
    got = 0

    def put(chunk):
        nonlocal got
        got += len(chunk)
        if got > after:
            raise _Stop

    with pytest.raises(_Stop):
        decode_bzip2(stream9, put, workers=2)
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("pvhboot-bzip2")]


def test_output_limit_through_the_sink(stream9):
    import io

    from pvhboot.image.compression import _Sink

    sink = _Sink("bzip2", io.BytesIO(), 1_000_000)
    with pytest.raises(CodecError, match="more than the limit"):
        decode_bzip2(memoryview(stream9), sink.put, workers=2)


# --- under the decompression child's memory limit ------------------------------

_CHILD = """
import bz2, hashlib, sys
from pvhboot.image.vmlinux_cache import _address_space_now, apply_limits, child_limits
from pvhboot.image import bzip2_blocks
data = open(sys.argv[1], "rb").read()
if len(sys.argv) > 3:  # a tighter limit than the child's: baseline + argv[3] MiB
    apply_limits(_address_space_now() + (int(sys.argv[3]) << 20), 60)
else:
    apply_limits(*child_limits())
h = hashlib.sha256()
bzip2_blocks.decode_bzip2(memoryview(data), h.update, workers=int(sys.argv[2]))
print(h.hexdigest(), bzip2_blocks.SERIAL_FALLBACKS)
"""


def _run_child(tmp_path, stream: bytes, workers: int, *extra_mib: int) -> list[str]:
    path = tmp_path / "s.bz2"
    path.write_bytes(stream)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(workers), *map(str, extra_mib)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("workers", [2, 4])
def test_under_child_address_space_limit(tmp_path, stream9, text9, workers):
    assert _run_child(tmp_path, stream9, workers) == [hashlib.sha256(text9).hexdigest(), "0"]


def test_tight_address_space_limit(tmp_path, stream9, text9):
    # 24 MiB more than the interpreter has mapped: too little for the
    # threads' malloc arenas (64 MiB each), so the workers share the main
    # arena or fail and the serial decoder takes over; either way the
    # output must be right and no MemoryError may escape.
    digest, _fallbacks = _run_child(tmp_path, stream9, 2, 24)
    assert digest == hashlib.sha256(text9).hexdigest()


def test_long_runs_under_child_address_space_limit(tmp_path):
    # Runs compress best: each block holds ~45 MB of zeros, the most a
    # block can expand to, and three are in flight at once.
    zeros = bytes(140_000_000)
    stream = bz2.compress(zeros, 9)
    assert len(_magics(stream, BLOCK_MAGIC)) == 4
    expected = hashlib.sha256(zeros).hexdigest()
    del zeros
    assert _run_child(tmp_path, stream, 2) == [expected, "0"]


# --- work and memory bounded by the input ----------------------------------------


class _EndSearch:
    """Counts what a magic finder was asked to search and what it returned."""

    def __init__(self, monkeypatch, magic: int = END_MAGIC):
        self.calls = 0
        self.bytes = 0
        self.hits = 0
        real = bzip2_blocks._MagicFinder.find

        def find(finder, view, lo, hi, **kwargs):
            found = real(finder, view, lo, hi, **kwargs)
            if finder.magic == magic:
                self.calls += 1
                self.bytes += max(0, min(hi, len(view)) - lo)
                self.hits += len(found)
            return found

        monkeypatch.setattr(bzip2_blocks._MagicFinder, "find", find)


def test_many_empty_streams_scan_linearly(stream1, text1, monkeypatch, no_serial):
    # Each empty stream's end magic used to be found by searching from there
    # to the end of the input (and listing every end magic left): quadratic.
    count = 2000
    data = stream1 + bz2.compress(b"", 9) * count
    search = _EndSearch(monkeypatch)
    assert _decode(data, workers=2) == text1
    # One search per stream, each up to the stream's end magic only.
    assert search.hits <= count + 2
    assert search.calls <= 2 * count + 40
    assert search.bytes <= 2 * len(data) + (count + 40) * bzip2_blocks.END_FIRST_WINDOW


def test_end_magics_in_trailing_junk_are_not_listed(stream1, text1, monkeypatch, no_serial):
    # 3 MB of end magics after the stream: only the stream's own is looked at.
    junk = END_MAGIC.to_bytes(6, "big") * 500_000
    search = _EndSearch(monkeypatch)
    tracemalloc.start()
    try:
        assert _decode(stream1 + junk, workers=2) == text1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert search.hits <= 2
    assert search.bytes <= len(stream1) + 2 * bzip2_blocks.SCAN_WINDOW
    # Listing them all took ~40 bytes each (20 MB); a few blocks in flight
    # and a scan window take a few MB.
    assert peak < 10_000_000


def _append_bits(stream: bytes, fields: list[tuple[int, int]]) -> bytes:
    """``stream`` up to its end magic, then ``fields`` (value, bits), padded to a byte."""
    [end] = _magics(stream, END_MAGIC)
    value, nbits = int.from_bytes(stream, "big") >> (len(stream) * 8 - end), end
    for field, width in fields:
        value, nbits = (value << width) | field, nbits + width
    pad = -nbits % 8
    return (value << pad).to_bytes((nbits + pad) // 8, "big")


def test_piece_longer_than_a_block_is_left_to_serial(stream1, monkeypatch):
    # A block magic, then more than any block can hold, then an end magic:
    # re-wrapping that "block" would copy it several times over.
    junk_bits = 3 * bzip2_blocks.MAX_PIECE_BITS
    data = _append_bits(
        stream1,
        [(BLOCK_MAGIC, 48), (0x12345678, 32), (0, junk_bits), (END_MAGIC, 48), (0, 32)],
    )
    rewrapped: list[int] = []
    real_rewrap = bzip2_blocks._rewrap

    def rewrap(view, piece):
        rewrapped.append(piece.end - piece.start)
        return real_rewrap(view, piece)

    monkeypatch.setattr(bzip2_blocks, "_rewrap", rewrap)
    blocks, ends = _EndSearch(monkeypatch, BLOCK_MAGIC), _EndSearch(monkeypatch, END_MAGIC)
    before = bzip2_blocks.SERIAL_FALLBACKS
    with pytest.raises(CodecError, match=r"^bzip2 stream is corrupt"):
        _decode(data, workers=2)
    # The junk is searched no further than a block can reach (not to the end).
    reach = len(stream1) + bzip2_blocks.MAX_PIECE_BITS // 8 + bzip2_blocks.SCAN_WINDOW
    assert len(data) > reach + bzip2_blocks.MAX_PIECE_BITS // 8
    assert blocks.bytes <= reach + bzip2_blocks.SCAN_WINDOW
    assert ends.bytes <= 2 * reach
    with pytest.raises(CodecError, match=r"^bzip2 stream is corrupt"):
        _decode(data, workers=1)
    assert bzip2_blocks.SERIAL_FALLBACKS == before + 1
    assert rewrapped and max(rewrapped) <= bzip2_blocks.MAX_PIECE_BITS


def test_piece_at_most_the_bound_is_still_decoded_in_parallel(no_serial):
    # The bound is above any real block: level-9 blocks of random bytes
    # (stored at ~8.03 bits per byte, the longest blocks an encoder writes)
    # still decode on threads.
    noise = random.Random(5).randbytes(2_000_000)
    stream = bz2.compress(noise, 9)
    starts = _magics(stream, BLOCK_MAGIC) + _magics(stream, END_MAGIC)[-1:]
    assert max(b - a for a, b in itertools.pairwise(starts)) > 7_000_000
    assert _decode(stream, workers=2) == noise


def test_pending_pieces_are_bounded(stream1, text1, monkeypatch, no_serial):
    # Empty streams take no worker; they used to be planned all at once.
    live = 0
    peak = 0

    class Piece(bzip2_blocks._Piece):
        def __init__(self, *args, **kwargs):
            nonlocal live, peak
            super().__init__(*args, **kwargs)
            live += 1
            peak = max(peak, live)

        def __del__(self):
            nonlocal live
            live -= 1

    monkeypatch.setattr(bzip2_blocks, "_Piece", Piece)
    empty = bz2.compress(b"", 9)
    data = stream1 + empty * 1000 + stream1 + empty * 1000
    assert _decode(data, workers=2) == text1 + text1
    window = 2 + 1  # workers + 1
    # Plus the few held by the look-ahead and the loop variables; it was ~2000.
    assert peak <= bzip2_blocks.PENDING_PER_WINDOW * window + 8
