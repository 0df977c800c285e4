"""The kernel's embedded .config (CONFIG_IKCONFIG).

kernel/configs.c wraps a gzip of the .config between the ASCII markers
``IKCFG_ST`` and ``IKCFG_ED``. In a bzImage the markers are inside the
compressed payload, so callers search the raw image first and then the
decompressed vmlinux.
"""

from __future__ import annotations

import zlib

from ..errors import ImageError

START_MARKER = b"IKCFG_ST"
END_MARKER = b"IKCFG_ED"
GZIP_MAGIC = b"\x1f\x8b"
# A real .config is a few hundred KiB; a gzip bomb between markers is not.
MAX_CONFIG_SIZE = 16 << 20
GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header, not raw deflate


def find_config_bytes(data, *, strict: bool = True) -> bytes | None:
    """The decompressed config from ``data`` (bytes or mmap), or None when absent.

    Compressed data (a bzImage's payload, seen raw) can hold the marker bytes
    by chance; each occurrence is tried in turn. A marker whose stream does
    not decode is an ImageError when ``strict`` (the data is the kernel
    itself), and is skipped otherwise.
    """
    at = data.find(START_MARKER + GZIP_MAGIC)
    first_error: ImageError | None = None
    while at >= 0:
        try:
            return _inflate(data, at)
        except ImageError as exc:
            first_error = first_error or exc
        at = data.find(START_MARKER + GZIP_MAGIC, at + 1)
    if first_error is not None and strict:
        raise first_error
    return None


def _inflate(data, start: int) -> bytes:
    gz_at = start + len(START_MARKER)
    end = data.find(END_MARKER, gz_at)
    stream = data[gz_at:end] if end >= 0 else data[gz_at : gz_at + MAX_CONFIG_SIZE]
    inflater = zlib.decompressobj(GZIP_WBITS)
    try:
        text = inflater.decompress(stream, MAX_CONFIG_SIZE)
    except zlib.error as exc:
        raise ImageError(f"embedded kernel config (IKCFG_ST at {start:#x}) is corrupt: {exc}") \
            from None
    if inflater.unconsumed_tail:
        raise ImageError(f"embedded kernel config is larger than {MAX_CONFIG_SIZE} bytes; corrupt?")
    if not inflater.eof:
        raise ImageError(f"embedded kernel config (IKCFG_ST at {start:#x}) is truncated")
    return text


def find_config(data, *, strict: bool = True) -> str | None:
    raw = find_config_bytes(data, strict=strict)
    return None if raw is None else raw.decode("utf-8", "replace")
