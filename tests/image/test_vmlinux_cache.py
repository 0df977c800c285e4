"""The vmlinux cache: cold miss, warm hit without decompression (counted),
corrupt entries rebuilt, use_cache=False, and hostile payloads failing in the
child without harming the test process."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess

import pytest

from pvhboot.errors import CodecError, ImageError
from pvhboot.image import vmlinux_cache as vc

# --- synthetic images ------------------------------------------------------------


def _fake_elf(size: int, seed: int = 7) -> bytes:
    """An ELF64 x86-64 header with one PT_LOAD covering the whole file, then
    compressible filler: enough for the cache's header checks."""
    import random

    ehdr = bytearray(64)
    ehdr[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", ehdr, 16, 2, 0x3E, 1, 0x1000000, 64, 0, 0, 64, 56, 1,
                     0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x1000000, 0x1000000, size, size, 0x200000)
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)) for _ in range(500)]
    body = bytearray(ehdr + phdr)
    while len(body) < size:
        body += b"".join(rng.choices(words, k=5000))
    return bytes(body[:size])


def _compress(codec: str, data: bytes) -> bytes:
    cmd = {
        "gzip": ["gzip", "-n", "-9", "-c"],
        "xz": ["xz", "--check=crc32", "-c"],
        "zstd": ["zstd", "-q", "-c"],
        "lz4": ["lz4", "-l", "-c"],
        "bzip2": ["bzip2", "-c"],
    }[codec]
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed")
    out = subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
    return out + len(data).to_bytes(4, "little")  # Linux's size trailer


def _bzimage(payload: bytes, setup_sects: int = 1, protocol: int = 0x20F) -> bytes:
    """A minimal bzImage: boot sector + setup header, then protected-mode code
    whose payload starts 0x100 bytes in (boot.rst field offsets)."""
    pm = (setup_sects + 1) * 512
    img = bytearray(pm + 0x100 + len(payload) + 64)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x6A  # header ends at 0x26c
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, protocol)
    struct.pack_into("<II", img, 0x248, 0x100, len(payload))
    img[pm + 0x100 : pm + 0x100 + len(payload)] = payload
    return bytes(img)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    base = tmp_path / "cachebase"
    monkeypatch.setenv("PVHBOOT_CACHE", str(base))
    return base / "vmlinux"


@pytest.fixture(scope="module")
def elf() -> bytes:
    return _fake_elf(3 << 20)


@pytest.fixture(params=["fork", "worker"])
def child_mode(request, monkeypatch):
    """Run each test through both child mechanisms."""
    monkeypatch.setattr(vc, "_single_threaded", lambda: request.param == "fork")
    return request.param


# --- cache behaviour ---------------------------------------------------------------


def test_cold_miss_then_warm_hit_without_decompression(tmp_path, cache_dir, elf, child_mode):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("zstd", elf)))
    before = vc.DECOMPRESSIONS
    cold = vc.get_vmlinux(image)
    assert (cold.hit, cold.codec) == (False, "zstd")
    assert vc.DECOMPRESSIONS == before + 1
    assert cold.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert cold.path == str(cache_dir / f"{cold.sha256}.vmlinux")  # PVHBOOT_CACHE honoured
    assert open(cold.path, "rb").read() == elf
    warm = vc.get_vmlinux(image)
    assert warm.hit and warm.path == cold.path and warm.codec == "zstd"
    assert vc.DECOMPRESSIONS == before + 1  # the warm hit decompressed nothing
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".part")]


def test_stat_memo_skips_hashing_and_sees_changes(tmp_path, cache_dir, monkeypatch, elf):
    import time

    monkeypatch.setattr(vc, "STAT_MEMO_MIN_AGE_NS", 20_000_000)
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    time.sleep(0.05)  # older than the memo's minimum age
    cold = vc.get_vmlinux(image)
    hashes, runs = vc.HASHES, vc.DECOMPRESSIONS
    warm = vc.get_vmlinux(image)
    assert warm.hit and warm.sha256 == cold.sha256 and warm.codec == "gzip"
    assert (vc.HASHES, vc.DECOMPRESSIONS) == (hashes, runs)  # neither hashed nor decompressed
    # Rewrite the image in place, same size: a new ctime, so a new key.
    other = _fake_elf(len(elf), seed=99)
    data = _bzimage(_compress("gzip", other))
    with open(image, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    changed = vc.get_vmlinux(image)
    assert vc.HASHES == hashes + 1 and not changed.hit
    assert changed.sha256 != cold.sha256 and open(changed.path, "rb").read() == other


def test_fresh_image_gets_no_stat_memo(tmp_path, cache_dir, elf):
    # Written just now: a write in the same clock tick could go unseen, so the
    # memo waits until the file is STAT_MEMO_MIN_AGE_NS old.
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    vc.get_vmlinux(image)
    hashes = vc.HASHES
    assert vc.get_vmlinux(image).hit
    assert vc.HASHES == hashes + 1
    assert not (cache_dir / vc.STAT_MEMO_DIR).exists()


def test_explicit_cache_dir(tmp_path, elf):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    got = vc.get_vmlinux(str(image), cache_dir=tmp_path / "c")
    assert os.path.dirname(got.path) == str(tmp_path / "c")
    assert vc.get_vmlinux(str(image), cache_dir=tmp_path / "c").hit


@pytest.mark.parametrize(
    "damage",
    ["truncate", "head", "tail", "no-sidecar", "bad-sidecar", "no-entry", "not-elf"],
)
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, cache_dir, elf, damage):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    first = vc.get_vmlinux(image)
    entry, sidecar = first.path, first.path[: -len(".vmlinux")] + ".json"
    assert os.stat(entry).st_mode & 0o777 == 0o444  # read-only: stray writes fail
    os.chmod(entry, 0o644)  # (root may write anyway: the stat identity catches that)
    if damage == "truncate":
        os.truncate(entry, len(elf) // 2)
    elif damage in ("head", "tail", "not-elf"):
        with open(entry, "r+b") as f:
            f.seek({"head": 1000, "tail": len(elf) - 10, "not-elf": 0}[damage])
            f.write(b"XXXX")
    elif damage == "no-sidecar":
        os.unlink(sidecar)
    elif damage == "bad-sidecar":
        with open(sidecar, "w") as f:
            f.write("{not json")
    elif damage == "no-entry":
        os.unlink(entry)
    before = vc.DECOMPRESSIONS
    again = vc.get_vmlinux(image)
    assert not again.hit
    assert vc.DECOMPRESSIONS == before + 1
    assert open(again.path, "rb").read() == elf
    assert vc.get_vmlinux(image).hit


def test_no_cache_gives_a_private_temporary(tmp_path, cache_dir, elf, child_mode):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("lz4", elf)))
    before = vc.DECOMPRESSIONS
    got = vc.get_vmlinux(image, use_cache=False)
    try:
        assert not got.hit and got.temporary and got.codec == "lz4"
        assert open(got.path, "rb").read() == elf
        assert not cache_dir.exists()  # nothing went into the cache
        assert vc.DECOMPRESSIONS == before + 1
    finally:
        got.cleanup()
    assert not os.path.exists(got.path)
    got.cleanup()  # idempotent


def test_compressed_elf_input(tmp_path, cache_dir, elf):
    image = tmp_path / "vmlinux.gz"
    image.write_bytes(gzip.compress(elf))
    got = vc.get_vmlinux(image)
    assert got.codec == "gzip" and open(got.path, "rb").read() == elf
    assert vc.get_vmlinux(image).hit


def test_plain_elf_is_returned_as_is(tmp_path, cache_dir, elf):
    image = tmp_path / "vmlinux"
    image.write_bytes(elf)
    before = vc.DECOMPRESSIONS
    got = vc.get_vmlinux(image)
    assert got.path == str(image) and got.codec is None
    assert vc.DECOMPRESSIONS == before


# --- bad and hostile input ------------------------------------------------------------


def test_corrupt_payload_fails_in_the_child(tmp_path, cache_dir, elf, child_mode):
    stream = bytearray(_compress("xz", elf))
    stream[len(stream) // 2] ^= 0xFF
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(bytes(stream)))
    with pytest.raises(CodecError, match=r"decompressing the xz payload of .* failed: xz stream"):
        vc.get_vmlinux(image)
    assert not cache_dir.exists() or not os.listdir(cache_dir)  # no partial entry left


def test_payload_that_is_not_an_elf(tmp_path, cache_dir):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", b"hello, not an ELF" * 1000)))
    with pytest.raises(ImageError, match="does not decompress to an ELF"):
        vc.get_vmlinux(image)
    assert not os.listdir(cache_dir)


@pytest.mark.parametrize("codec", ["zstd", "xz"])
def test_bomb_beyond_the_limit_fails_cleanly(tmp_path, cache_dir, monkeypatch, codec, child_mode):
    # 96 MiB of zeros compresses to a few KiB; with the output cap lowered to
    # 32 MiB the child must stop and report, and the parent carry on.
    head = _fake_elf(4096)[:120]  # a valid ELF header + PT_LOAD, then zeros
    bomb = _compress(codec, head + bytes((96 << 20) - len(head)))
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(bomb))
    if child_mode == "fork":
        monkeypatch.setattr(vc, "MAX_VMLINUX", 32 << 20)
        match = "more than the limit of 33554432"
    else:
        # A fresh interpreter does not see the patched cap; with its own
        # address-space limit in force it must still stream the 96 MiB out.
        match = None
    if match:
        with pytest.raises(CodecError, match=match):
            vc.get_vmlinux(image)
        assert not os.listdir(cache_dir)
    else:
        got = vc.get_vmlinux(image, use_cache=False)
        assert os.path.getsize(got.path) == 96 << 20
        got.cleanup()


def test_memory_limit_stops_a_hungry_decoder(tmp_path, cache_dir, monkeypatch, child_mode):
    # An lzma "alone" header asking for a 256 MiB dictionary: allowed by the
    # decoder's own memlimit, refused by the child's address-space limit.
    monkeypatch.setattr(vc, "CHILD_EXTRA_MEMORY", 48 << 20)
    header = bytes([0x5D]) + (256 << 20).to_bytes(4, "little") + (b"\xff" * 8)
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(header + bytes(4096)))
    with pytest.raises(CodecError, match="lzma stream needs more memory than allowed"):
        vc.get_vmlinux(image)


def test_wall_clock_timeout_kills_the_child(tmp_path, cache_dir, monkeypatch, elf, child_mode):
    monkeypatch.setattr(vc, "CHILD_TIMEOUT", 0.0001)
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("bzip2", elf)))
    with pytest.raises(CodecError, match="ran longer than"):
        vc.get_vmlinux(image)
    assert not os.listdir(cache_dir)


def test_payload_outside_the_file(tmp_path, cache_dir, elf):
    data = bytearray(_bzimage(_compress("gzip", elf)))
    struct.pack_into("<I", data, 0x24C, len(data) * 2)
    image = tmp_path / "bzImage"
    image.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="outside"):
        vc.get_vmlinux(image)


def test_unknown_payload_codec(tmp_path, cache_dir):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(b"\x00\x01\x02\x03" * 100))
    with pytest.raises(ImageError, match="none of Linux's codecs"):
        vc.get_vmlinux(image)


def test_not_a_kernel(tmp_path, cache_dir):
    image = tmp_path / "junk"
    image.write_bytes(b"hello world" * 10)
    with pytest.raises(ImageError, match="not a kernel image"):
        vc.get_vmlinux(image)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        vc.get_vmlinux(empty)


def test_unwritable_cache_dir(tmp_path, elf):
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(ImageError, match="cannot write the vmlinux cache"):
        vc.get_vmlinux(image, cache_dir=blocker / "sub")


# --- real kernels -----------------------------------------------------------------------


def _bare_cli(codec: str, payload: bytes) -> bytes:
    # The bare CLIs stop at Linux's 4-byte size trailer with an error, so
    # give them the stream without it. gzip has no such trailer (its own
    # ISIZE field is the size).
    cmd = {"lz4": ["lz4", "-dc"], "xz": ["xz", "-dc", "--single-stream"],
           "gzip": ["gzip", "-dc"]}[codec]
    stream = payload if codec == "gzip" else payload[:-4]
    return subprocess.run(cmd, input=stream, capture_output=True, check=True).stdout


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("fixture", "codec"),
    [("debian_cloud_kernel", "lz4"), ("debian_generic_kernel", "xz"), ("test_kernel", "gzip")],
)
def test_real_kernel_matches_the_bare_cli(request, tmp_path, monkeypatch, fixture, codec):
    from pvhboot.image.bzimage import parse_bzimage

    kernel = request.getfixturevalue(fixture)
    monkeypatch.setenv("PVHBOOT_CACHE", str(tmp_path))
    data = kernel.vmlinuz.read_bytes()
    bz = parse_bzimage(data)
    assert bz.codec == codec
    want = _bare_cli(codec, data[bz.payload_offset : bz.payload_offset + bz.payload_length])
    got = vc.get_vmlinux(kernel.vmlinuz)
    assert got.codec == codec and not got.hit
    with open(got.path, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(want).digest()
    before = vc.DECOMPRESSIONS
    assert vc.get_vmlinux(kernel.vmlinuz).hit
    assert vc.DECOMPRESSIONS == before


def test_interrupted_parent_kills_and_reaps_the_child(tmp_path, cache_dir, monkeypatch, elf):
    monkeypatch.setattr(vc, "_single_threaded", lambda: True)
    children = []

    def interrupted(rfd, pid, what):
        children.append(pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(vc, "_collect", interrupted)
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("bzip2", elf)))
    with pytest.raises(KeyboardInterrupt):
        vc.get_vmlinux(image)
    assert children
    with pytest.raises(ChildProcessError):  # already reaped: no zombie left behind
        os.waitpid(children[0], os.WNOHANG)
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".part")]


def test_forgotten_temporary_is_removed_at_exit(tmp_path, cache_dir, elf):
    # A fresh interpreter asks for a no-cache vmlinux, prints its path and
    # exits without cleanup(): the file must be gone afterwards.
    import sys

    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    code = (
        "import sys; from pvhboot.image.vmlinux_cache import get_vmlinux; "
        "got = get_vmlinux(sys.argv[1], use_cache=False); "
        "print(got.path); assert open(got.path, 'rb').read(4) == b'\\x7fELF'"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True,
                          text=True, check=True)
    path = proc.stdout.strip()
    assert path.endswith(".elf") and not os.path.exists(path)


# --- audit: damage in the middle, invalid ELF payloads ---------------------------------


@pytest.mark.parametrize("chmod_first", [True, False])
def test_same_size_damage_in_the_middle_is_rebuilt(tmp_path, cache_dir, elf, chmod_first):
    import json
    import time

    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", elf)))
    first = vc.get_vmlinux(image)
    meta = json.loads(open(first.path[: -len(".vmlinux")] + ".json").read())
    assert meta["version"] == vc.SIDECAR_VERSION and len(meta["stat"]) == 5
    # The entry's timestamps come from the kernel's coarse clock: let it tick
    # so the write below lands on a later one (as any real later write does).
    time.sleep(0.05)
    if chmod_first:
        os.chmod(first.path, 0o644)
    elif os.geteuid() != 0:
        with pytest.raises(PermissionError):  # 0444: an accidental write fails
            open(first.path, "r+b")
        return
    with open(first.path, "r+b") as f:  # root writes through 0444
        f.seek(len(elf) // 2)
        f.write(b"XXXX")
    assert os.path.getsize(first.path) == len(elf)
    before = vc.DECOMPRESSIONS
    again = vc.get_vmlinux(image)
    assert not again.hit and again.path == first.path
    assert vc.DECOMPRESSIONS == before + 1
    assert open(again.path, "rb").read() == elf
    assert vc.get_vmlinux(image).hit
    assert vc.DECOMPRESSIONS == before + 1


def _invalid_elves():
    good = _fake_elf(8192)
    bad_class = bytearray(good)
    bad_class[4] = 9
    big_endian = bytearray(good)
    big_endian[5] = 2
    huge_phoff = bytearray(good)
    struct.pack_into("<Q", huge_phoff, 0x20, 1 << 40)
    past_end = bytearray(good)
    struct.pack_into("<Q", past_end, 64 + 32, 1 << 30)  # PT_LOAD filesz beyond the file
    return {
        "magic-only": b"\x7fELF",
        "zero-header": b"\x7fELF" + bytes(8188),
        "bad-class": bytes(bad_class),
        "big-endian": bytes(big_endian),
        "huge-phoff": bytes(huge_phoff),
        "segment-past-end": bytes(past_end),
    }


@pytest.mark.parametrize("which", sorted(_invalid_elves()))
@pytest.mark.parametrize("use_cache", [True, False])
def test_invalid_elf_payload_is_never_stored(tmp_path, cache_dir, monkeypatch, child_mode,
                                             which, use_cache):
    import tempfile

    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    image = tmp_path / "bzImage"
    image.write_bytes(_bzimage(_compress("gzip", _invalid_elves()[which])))
    with pytest.raises(ImageError, match="payload is not a valid ELF") as info:
        vc.get_vmlinux(image, use_cache=use_cache)
    message = str(info.value)
    assert message.startswith(f"{image}: ") and "\n" not in message
    assert str(cache_dir) not in message and str(private_tmp) not in message
    assert not cache_dir.exists() or not os.listdir(cache_dir)  # no entry, no .part
    assert not os.listdir(private_tmp)  # no leaked use_cache=False temporary
