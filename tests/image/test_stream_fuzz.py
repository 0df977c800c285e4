"""Fuzz the hand-written stream framers, the PE reader and the IKCONFIG finder.

The library decoders (zlib, bz2, lzma, lz4.block, lzallright, zstandard) are
trusted; what pvhboot itself walks is not: the lz4 legacy block framing, the
lzop container (header, flags, checksums, block lengths) and the zstd block
walker that finds a frame's end. Seeds are real streams from the codecs' own
CLIs (``lz4 -l``, ``lzop -9``, ``zstd``), mutated mostly in their first
bytes, where the framing lives. Whatever the bytes, only a pvhboot error (one
line) or a result may come out: never struct.error, IndexError, ValueError...

The framers are called directly, not only through ``decompress_to``, whose
catch-all turns any library exception into a CodecError and would hide a
framer that raises the wrong type.
"""

from __future__ import annotations

import io
import random

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pvhboot.errors import CodecError, ImageError, PvhbootError  # noqa: E402
from pvhboot.image import compression  # noqa: E402
from pvhboot.image.ikconfig import find_config  # noqa: E402
from pvhboot.image.pe import parse_pe  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
# Output cap for the fuzzed decoders: a mutated length must not make a test slow.
MAX_OUT = 4 << 20


def _plain(size: int) -> bytes:
    """Compressible but not trivial data: words from a small vocabulary, seeded."""
    rng = random.Random(1234)
    words = [b"CONFIG_", b"kernel", b"\x00\x00\x00\x00", b"mov", b"\xff\xfe", b"PVH", b"0x10"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + bytes([rng.randrange(256)])
    return bytes(out[:size])


# 300 KiB: more than one lzop block (256 KiB) and several zstd blocks (128 KiB max),
# so the mutations reach a second block header too.
PLAIN = _plain(300 << 10)
_streams: dict = {}


@pytest.fixture(scope="module")
def streams(codec_cli):
    compress, _ = codec_cli
    if not _streams:
        for codec in ("lz4", "lzo", "zstd"):
            _streams[codec] = compress(codec, PLAIN)  # with Linux's 4-byte size trailer
    return _streams


def mutations(head: int = 256):
    """(patches, cut fraction or None, tail); patch offsets favour the first ``head`` bytes."""
    offset = st.integers(0, head - 1) | st.integers(0, 1 << 20)
    patch = st.tuples(offset, st.binary(min_size=1, max_size=8))
    return st.tuples(st.lists(patch, max_size=6), st.none() | st.floats(0, 1),
                     st.binary(max_size=16))


def only_pvhboot_errors(fn, *args, allowed=PvhbootError):
    try:
        return fn(*args)
    except allowed as exc:
        assert "\n" not in str(exc), repr(str(exc))
        return None


def run_framer(codec: str, data: bytes) -> bytes:
    """The codec's own decoder function, without decompress_to's catch-all."""
    out = io.BytesIO()
    decoder = compression._DECODERS[codec]
    decoder(memoryview(data), compression._Sink(codec, out, MAX_OUT))
    return out.getvalue()


def run_public(codec: str, data: bytes) -> bytes:
    return compression.decompress_bytes(codec, data, max_output=MAX_OUT)


@pytest.mark.parametrize("codec", ["lz4", "lzo", "zstd"])
def test_seeds_round_trip(streams, codec):
    """The unmutated seeds decode to the input, through both entry points."""
    assert run_framer(codec, streams[codec]) == PLAIN
    assert run_public(codec, streams[codec]) == PLAIN


@FUZZ
@given(mutation=mutations(), public=st.booleans())
def test_lz4_legacy(streams, mutate, mutation, public):
    run = run_public if public else run_framer
    only_pvhboot_errors(run, "lz4", mutate(streams["lz4"], mutation), allowed=CodecError)


@FUZZ
@given(mutation=mutations(), public=st.booleans())
def test_lzop_container(streams, mutate, mutation, public):
    run = run_public if public else run_framer
    only_pvhboot_errors(run, "lzo", mutate(streams["lzo"], mutation), allowed=CodecError)


@FUZZ
@given(mutation=mutations(), public=st.booleans())
def test_zstd(streams, mutate, mutation, public):
    run = run_public if public else run_framer
    only_pvhboot_errors(run, "zstd", mutate(streams["zstd"], mutation), allowed=CodecError)


@FUZZ
@given(mutation=mutations(head=64))
def test_zstd_block_walker(streams, mutate, mutation):
    """The frame walker alone: an end inside the data, or a CodecError."""
    data = mutate(streams["zstd"], mutation)
    end = only_pvhboot_errors(compression._zstd_frame_end, memoryview(data), allowed=CodecError)
    if end is not None:
        assert 0 < end <= len(data)


@FUZZ
@given(mutation=mutations(head=64))
def test_lzop_header(streams, mutate, mutation):
    data = mutate(streams["lzo"], mutation)
    reader = compression._Reader(memoryview(data), 0, "lzo")
    only_pvhboot_errors(compression._lzop_header, reader, allowed=CodecError)
    assert reader.pos <= len(data)


@FUZZ
@given(data=st.binary(max_size=512),
       magic=st.sampled_from([b"\x02\x21\x4c\x18", b"\x89LZO\x00\r\n\x1a\n",
                              b"\x28\xb5\x2f\xfd"]))
def test_random_bodies_behind_each_magic(data, magic):
    codec = compression.detect_codec(magic + bytes(8))
    only_pvhboot_errors(run_framer, codec, magic + data, allowed=CodecError)


# --- PE and IKCONFIG ---------------------------------------------------------


@pytest.fixture(scope="module")
def pe_seed(make_bzimage):
    return make_bzimage(b"\x1f\x8b\x08" + bytes(60), pe=True)


@FUZZ
@given(mutation=mutations(head=0x100))
def test_parse_pe(pe_seed, mutate, mutation):
    info = only_pvhboot_errors(parse_pe, mutate(pe_seed, mutation), allowed=ImageError)
    if info is not None:
        assert info.sections >= 0


@FUZZ
@given(data=st.binary(max_size=1024))
def test_parse_pe_random(data):
    only_pvhboot_errors(parse_pe, b"MZ" + data, allowed=ImageError)


@pytest.fixture(scope="module")
def config_seed():
    import gzip

    text = b"CONFIG_PVH=y\nCONFIG_SERIAL_8250=y\n" * 40
    blob = b"\xf4" * 100 + b"IKCFG_ST" + gzip.compress(text, mtime=0) + b"IKCFG_ED" + b"\0" * 64
    return blob, text.decode()


@FUZZ
@given(mutation=mutations(head=160), strict=st.booleans())
def test_find_config(config_seed, mutate, mutation, strict):
    blob, text = config_seed
    if mutation == ([], None, b""):
        assert find_config(blob, strict=strict) == text
    data = mutate(blob, mutation)
    result = only_pvhboot_errors(lambda: find_config(data, strict=strict), allowed=ImageError)
    assert result is None or isinstance(result, str)
