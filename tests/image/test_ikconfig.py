"""The embedded .config (IKCFG_ST ... IKCFG_ED), in a raw image and inside a bzImage payload."""

from __future__ import annotations

import gzip

import pytest

from pvhboot.errors import ImageError
from pvhboot.image.ikconfig import find_config
from pvhboot.image.kernel import image_from_buffer

CONFIG = b"#\n# Linux/x86 6.1.0 Kernel Configuration\n#\nCONFIG_PVH=y\nCONFIG_64BIT=y\n"


def wrapped(config: bytes = CONFIG) -> bytes:
    return b"IKCFG_ST" + gzip.compress(config, mtime=0) + b"IKCFG_ED"


def test_found_between_markers():
    assert find_config(b"junk" * 100 + wrapped() + b"more junk") == CONFIG.decode()


def test_absent():
    assert find_config(b"no config here" * 1000) is None
    # The marker without a gzip stream after it is not a config (a string in the code).
    assert find_config(b"...IKCFG_ST...") is None


def test_corrupt_stream_is_an_image_error():
    data = bytearray(wrapped())
    data[20:40] = b"\xff" * 20
    with pytest.raises(ImageError, match="embedded kernel config"):
        find_config(bytes(data))


def test_truncated_stream_is_an_image_error():
    with pytest.raises(ImageError, match="truncated"):
        find_config(wrapped()[:30])


def test_config_in_a_plain_elf(make_pvh_elf):
    img = image_from_buffer(make_pvh_elf(config=CONFIG))
    assert img.config_text() == CONFIG.decode()
    assert img.to_json()["config_embedded"] is True
    assert image_from_buffer(make_pvh_elf()).config_text() is None


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_config_inside_a_bzimage_payload(codec_bzimage, codec):
    data, _ = codec_bzimage(codec, config=CONFIG)
    img = image_from_buffer(data)
    assert img.config_text() == CONFIG.decode()
    assert img.config_embedded is True
    # Headers only: the payload was not read, so the answer is unknown, not "no".
    assert image_from_buffer(data, load_payload=False).config_embedded is None


def test_a_chance_marker_in_compressed_bytes_is_skipped_when_not_strict():
    fake = b"IKCFG_ST\x1f\x8b" + b"\xff" * 30
    assert find_config(fake + wrapped(), strict=False) == CONFIG.decode()
    assert find_config(fake, strict=False) is None
    with pytest.raises(ImageError):
        find_config(fake)
