"""`pvhboot extract`: byte-identical to the codec CLIs, atomic, never clobbers without --force."""

from __future__ import annotations

import os
import stat

import pytest

from pvhboot.image.bzimage import parse_bzimage

CODECS = ["gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd"]


def assert_one_line_error(proc, *words):
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("pvhboot: error: "), err
    for w in words:
        assert w in lines[0], err


def leftovers(directory, keep=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("codec", CODECS)
def test_matches_the_codec_cli(cli, codec_bzimage, codec_cli, tmp_path, codec):
    data, elf = codec_bzimage(codec)
    src = tmp_path / "bzImage"
    src.write_bytes(data)
    out = tmp_path / "vmlinux"
    proc = cli("extract", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    bz = parse_bzimage(data)
    _, decompress = codec_cli
    stock = decompress(codec, data[bz.payload_offset : bz.payload_offset + bz.payload_length])
    assert out.read_bytes() == stock == elf
    assert leftovers(tmp_path) == ["bzImage", "vmlinux"]
    # The mode a plain open() gives, not mkstemp's 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("codec", ["gzip", "xz", "zstd"])
def test_compressed_elf(cli, codec_cli, make_pvh_elf, tmp_path, codec):
    compress, _ = codec_cli
    elf = make_pvh_elf()
    src = tmp_path / "vmlinux.z"
    src.write_bytes(compress(codec, elf, size_trailer=False))
    proc = cli("extract", src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out").read_bytes() == elf


def test_plain_elf_is_copied_with_a_note(cli, make_pvh_elf, tmp_path):
    elf = make_pvh_elf()
    (tmp_path / "vmlinux").write_bytes(elf)
    proc = cli("extract", tmp_path / "vmlinux", "-o", tmp_path / "copy")
    assert proc.returncode == 0
    assert b"already an uncompressed ELF" in proc.stderr
    assert (tmp_path / "copy").read_bytes() == elf


def test_refuses_to_overwrite_without_force(cli, codec_bzimage, tmp_path):
    data, elf = codec_bzimage("gzip")
    (tmp_path / "bz").write_bytes(data)
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    assert_one_line_error(cli("extract", tmp_path / "bz", "-o", out), "--force")
    assert out.read_bytes() == b"precious"
    proc = cli("extract", tmp_path / "bz", "-o", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == elf
    assert leftovers(tmp_path) == ["bz", "out"]


def test_corrupt_stream_leaves_nothing(cli, codec_bzimage, tmp_path):
    data, _ = codec_bzimage("xz")
    bz = parse_bzimage(data)
    bad = bytearray(data)
    mid = bz.payload_offset + bz.payload_length // 2
    bad[mid : mid + 64] = b"\x5a" * 64
    (tmp_path / "bz").write_bytes(bytes(bad))
    assert_one_line_error(cli("extract", tmp_path / "bz", "-o", tmp_path / "out"), "xz")
    assert leftovers(tmp_path) == ["bz"]


def test_payload_not_elf_leaves_nothing(cli, make_bzimage, codec_cli, tmp_path):
    compress, _ = codec_cli
    (tmp_path / "bz").write_bytes(make_bzimage(compress("gzip", b"\0" * 4096)))
    assert_one_line_error(cli("extract", tmp_path / "bz", "-o", tmp_path / "out"), "ELF")
    assert leftovers(tmp_path) == ["bz"]


@pytest.mark.parametrize(
    "content, words",
    [(b"", ["empty"]), (b"plain text\n" * 50, ["not a kernel image"])],
)
def test_bad_input(cli, tmp_path, content, words):
    (tmp_path / "in").write_bytes(content)
    assert_one_line_error(cli("extract", tmp_path / "in", "-o", tmp_path / "out"), *words)
    assert leftovers(tmp_path) == ["in"]


def test_unknown_codec(cli, make_bzimage, tmp_path):
    (tmp_path / "bz").write_bytes(make_bzimage(b"\x00\x11\x22\x33" * 16))
    assert_one_line_error(cli("extract", tmp_path / "bz", "-o", tmp_path / "out"), "codec")


def test_missing_output_directory(cli, codec_bzimage, tmp_path):
    data, _ = codec_bzimage("gzip")
    (tmp_path / "bz").write_bytes(data)
    assert_one_line_error(cli("extract", tmp_path / "bz", "-o", tmp_path / "no" / "out"))


def test_interrupt_removes_the_temporary_file(codec_bzimage, tmp_path, monkeypatch):
    from pvhboot.commands.extract import extract
    from pvhboot.image import compression

    data, _ = codec_bzimage("gzip")
    (tmp_path / "bz").write_bytes(data)

    def interrupted(codec, src, fd, *, max_output):
        os.write(fd, b"\x7fELF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(compression, "decompress_to_fd", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(str(tmp_path / "bz"), str(tmp_path / "out"))
    assert leftovers(tmp_path) == ["bz"]


@pytest.mark.parametrize("codec", ["lz4", "lzo"])
def test_interrupt_in_a_worker_thread_path(codec_bzimage, tmp_path, monkeypatch, codec):
    # Ctrl-C while the two decoder threads write: both stop, the temporary
    # file goes, nothing is left running.
    import _thread

    from pvhboot.commands.extract import extract
    from pvhboot.image import compression_fd

    data, _ = codec_bzimage(codec)
    (tmp_path / "bz").write_bytes(data)
    real = compression_fd.pwrite_all
    calls = []

    def flaky(fd, view, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(fd, view, offset)

    monkeypatch.setattr(compression_fd, "pwrite_all", flaky)
    before = _thread._count()
    with pytest.raises(KeyboardInterrupt):
        extract(str(tmp_path / "bz"), str(tmp_path / "out"))
    assert leftovers(tmp_path) == ["bz"]
    assert _thread._count() == before
    if compression_fd._PARALLEL > 1:
        assert calls  # the threaded path ran


@pytest.mark.kernel
@pytest.mark.parametrize("fixture, codec", [("debian_cloud_kernel", "lz4"),
                                            ("debian_generic_kernel", "xz")])
def test_debian_kernels_match_the_codec_cli(request, cli, codec_cli, tmp_path, fixture, codec):
    kernel = request.getfixturevalue(fixture)
    data = kernel.vmlinuz.read_bytes()
    bz = parse_bzimage(data)
    out = tmp_path / "vmlinux"
    proc = cli("extract", kernel.vmlinuz, "-o", out)
    assert proc.returncode == 0, proc.stderr
    _, decompress = codec_cli
    stock = decompress(codec, data[bz.payload_offset :])  # as extract-vmlinux feeds it
    got = out.read_bytes()
    assert got[:4] == b"\x7fELF"
    assert len(got) == len(stock) and got == stock


# --- OUT must be a regular file (audit: --force replaced device nodes) ----------------


def _special_outputs(tmp_path):
    """name -> a path holding something that is not a regular file."""
    made = {}
    dev = tmp_path / "chardev"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null
        made["chardev"] = dev
    except (PermissionError, OSError):
        pass
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    made["fifo"] = fifo
    made["directory"] = tmp_path / "dir"
    made["directory"].mkdir()
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    made["symlink"] = tmp_path / "link"
    made["symlink"].symlink_to(target)
    made["dangling"] = tmp_path / "dangling"
    made["dangling"].symlink_to(tmp_path / "nowhere")
    return made


@pytest.mark.parametrize("force", [False, True])
def test_refuses_outputs_that_are_not_regular_files(cli, codec_bzimage, tmp_path, force):
    data, _ = codec_bzimage("gzip")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "bz").write_bytes(data)
    made = _special_outputs(work)
    before = {name: os.lstat(p) for name, p in made.items()}
    for name, out in made.items():
        args = ["extract", tmp_path / "bz", "-o", out] + (["--force"] if force else [])
        proc = cli(*args)
        assert_one_line_error(proc, str(out), "not a regular file")
        st = os.lstat(out)
        assert (st.st_mode, st.st_ino) == (before[name].st_mode, before[name].st_ino), name
    assert (work / "target").read_bytes() == b"precious"
    assert not (work / "nowhere").exists()
    assert not [p for p in leftovers(work) if p.endswith(".part")]
    assert sorted(os.listdir(work / "dir")) == []


def test_missing_output_directory_names_it(cli, codec_bzimage, tmp_path):
    data, _ = codec_bzimage("gzip")
    (tmp_path / "bz").write_bytes(data)
    missing = tmp_path / "no" / "dir"
    proc = cli("extract", tmp_path / "bz", "-o", missing / "out")
    assert_one_line_error(proc, str(missing), "does not exist")
    assert ".part" not in proc.stderr.decode()


# --- what is written must be a valid ELF (audit: garbage was "copied unchanged") -------


def _bad_elves(make_elf, make_note):
    good = make_elf()
    huge_phoff = make_elf(phoff=1 << 40)
    bad_class = bytearray(good)
    bad_class[4] = 9
    big_endian = bytearray(good)
    big_endian[5] = 2
    zero_header = b"\x7fELF" + bytes(len(good) - 4)  # an lz4 payload with zeroed bytes
    overflowing_note = make_elf(raw_notes=make_note("Xen", 18, b"\0" * 8, descsz=0xFFFFFFF0))
    return {
        "magic-only": b"\x7fELF",
        "bad-class": bytes(bad_class),
        "big-endian": bytes(big_endian),
        "huge-phoff": huge_phoff,
        "zero-header": zero_header,
        "overflowing-note": overflowing_note,
    }


BAD_ELVES = ["magic-only", "bad-class", "big-endian", "huge-phoff", "zero-header",
             "overflowing-note"]


@pytest.mark.parametrize("which", BAD_ELVES)
def test_invalid_plain_elf_is_not_copied(cli, make_elf, make_note, tmp_path, which):
    (tmp_path / "in").write_bytes(_bad_elves(make_elf, make_note)[which])
    proc = cli("extract", tmp_path / "in", "-o", tmp_path / "out")
    assert_one_line_error(proc, str(tmp_path / "in"), "not a valid")
    assert leftovers(tmp_path) == ["in"]


@pytest.mark.parametrize("which", BAD_ELVES)
@pytest.mark.parametrize("codec", ["gzip", "lz4"])
def test_invalid_decompressed_payload_leaves_nothing(cli, make_elf, make_note, make_bzimage,
                                                     codec_cli, tmp_path, which, codec):
    compress, _ = codec_cli
    elf = _bad_elves(make_elf, make_note)[which]
    (tmp_path / "bz").write_bytes(make_bzimage(compress(codec, elf)))
    (tmp_path / "z").write_bytes(compress(codec, elf, size_trailer=False))
    for src in ("bz", "z"):
        proc = cli("extract", tmp_path / src, "-o", tmp_path / "out", "--force")
        assert_one_line_error(proc, str(tmp_path / src),
                              "the decompressed payload is not a valid ELF")
        assert leftovers(tmp_path) == ["bz", "z"]


def test_invalid_payload_keeps_the_old_output(cli, make_elf, make_bzimage, codec_cli, tmp_path):
    compress, _ = codec_cli
    (tmp_path / "bz").write_bytes(make_bzimage(compress("gzip", b"\x7fELF")))
    (tmp_path / "out").write_bytes(b"old")
    assert_one_line_error(cli("extract", tmp_path / "bz", "-o", tmp_path / "out", "--force"),
                          "not a valid ELF")
    assert (tmp_path / "out").read_bytes() == b"old"
    assert leftovers(tmp_path) == ["bz", "out"]


@pytest.mark.parametrize("argv", [
    ["img", "-o", "out"],
    ["img", "--output", "out", "--force"],
    ["-f", "--output=out", "img"],
    ["-o", "out", "img", "-f"],
    ["img", "-o", "dir/with space"],
])
def test_fast_parse_agrees_with_argparse(argv):
    from pvhboot.cli import build_parser
    from pvhboot.commands import extract

    fast = extract.fast_parse(argv)
    slow = build_parser().parse_args(["extract", *argv])
    assert fast is not None
    assert (fast.image, fast.output, fast.force) == (slow.image, slow.output, slow.force)


@pytest.mark.parametrize("argv", [
    [], ["img"], ["-o", "out"], ["img", "-o"], ["img", "-o", "-x"], ["a", "b", "-o", "out"],
    ["img", "-o", "a", "-o", "b"], ["--help"], ["img", "--out", "x"], ["img", "-oout"],
    ["img", "--", "-o", "x"], ["img", "-o", "out", "--forc"], ["", "-o", "out"],
])
def test_fast_parse_leaves_the_rest_to_argparse(argv):
    from pvhboot.commands import extract

    assert extract.fast_parse(argv) is None


@pytest.mark.parametrize("codec", [None, "xz", "lz4", "zstd", "bzip2"])
def test_a_short_write_is_an_error_not_a_truncated_file(codec_bzimage, make_pvh_elf, tmp_path,
                                                        codec):
    # A disk filling up: write(2) takes less than asked (RLIMIT_FSIZE with
    # SIGXFSZ ignored does the same). Exit 1 with one line, no OUT, no temporary.
    import resource
    import signal
    import subprocess
    import sys

    if codec is None:
        data, size = make_pvh_elf(), None
        data += bytes(256 << 10)  # the copy of a plain ELF
    else:
        data, elf = codec_bzimage(codec)
        size = len(elf)
    src = tmp_path / "in"
    src.write_bytes(data)
    limit = (size or len(data)) - 100

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pvhboot", "extract", str(src), "-o", str(out)],
                          capture_output=True, preexec_fn=limited, check=False)
    assert_one_line_error(proc, "cannot write", "File too large", "another output path")
    assert leftovers(tmp_path) == ["in"]
