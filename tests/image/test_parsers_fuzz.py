"""Fuzz the parsers: whatever the bytes, only ImageError (or a result) comes out.

Inputs are real-shaped images (an ELF with notes, a bzImage around a
compressed ELF) with random bytes overwritten, truncated, or extended, so the
mutations reach deep into the headers instead of failing at the magic.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pvhboot.errors import ImageError  # noqa: E402
from pvhboot.image.bzimage import parse_bzimage  # noqa: E402
from pvhboot.image.elf import parse_elf  # noqa: E402
from pvhboot.image.ikconfig import find_config  # noqa: E402
from pvhboot.image.kernel import image_from_buffer  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

_seeds: dict = {}


@pytest.fixture(scope="module")
def seeds(make_pvh_elf, make_bzimage):
    import gzip

    if not _seeds:
        elf = make_pvh_elf(size=0x400, config=b"CONFIG_PVH=y\n")
        _seeds["elf"] = elf
        # gzip from the standard library: the fuzz test needs no external CLI.
        _seeds["bzimage"] = make_bzimage(gzip.compress(elf, mtime=0) + len(elf).to_bytes(4, "little"),
                                         pe=True)
    return _seeds


def mutations():
    """(list of (offset, bytes) patches, truncate-to fraction or None, tail bytes)."""
    patch = st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8))
    return st.tuples(st.lists(patch, max_size=8), st.none() | st.floats(0, 1),
                     st.binary(max_size=16))


def only_image_errors(fn, data):
    try:
        fn(data)
    except ImageError as exc:
        assert "\n" not in str(exc), repr(str(exc))


@FUZZ
@given(mutation=mutations())
def test_parse_elf(seeds, mutate, mutation):
    only_image_errors(parse_elf, mutate(seeds["elf"], mutation))


@FUZZ
@given(mutation=mutations())
def test_parse_bzimage(seeds, mutate, mutation):
    only_image_errors(parse_bzimage, mutate(seeds["bzimage"], mutation))


@FUZZ
@given(mutation=mutations(), which=st.sampled_from(["elf", "bzimage"]))
def test_open_image(seeds, mutate, mutation, which):
    def full(data):
        img = image_from_buffer(data)
        img.to_json()  # includes the config search

    only_image_errors(full, mutate(seeds[which], mutation))


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(data):
    only_image_errors(image_from_buffer, data)
    only_image_errors(find_config, b"IKCFG_ST\x1f\x8b" + data)
