"""The initramfs builder and its `python -m pvhboot.initramfs` entry."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import sys

import pytest

from pvhboot.errors import UsageError
from pvhboot.initramfs.builder import FileSpec, build_initramfs, initramfs_entries

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed "
                                "(scripts/setup installs it)")


def _listing(archive_bytes: bytes) -> list[str]:
    proc = subprocess.run(["cpio", "-tv", "--quiet"], input=archive_bytes, capture_output=True,
                          check=True)
    return proc.stdout.decode().splitlines()


def test_parents_and_console_are_added():
    entries = initramfs_entries([("/usr/lib/x/file", b"data", 0o600)], symlinks={"/init": "x"})
    kinds = {e.path: stat.S_IFMT(e.mode) for e in entries}
    assert kinds == {
        "/usr": stat.S_IFDIR, "/usr/lib": stat.S_IFDIR, "/usr/lib/x": stat.S_IFDIR,
        "/usr/lib/x/file": stat.S_IFREG, "/init": stat.S_IFLNK,
        "/dev": stat.S_IFDIR, "/dev/console": stat.S_IFCHR,
    }
    console = next(e for e in entries if e.path == "/dev/console")
    assert console.rdev == (5, 1)


def test_no_console_when_asked():
    entries = initramfs_entries([("/init", b"x", 0o755)], console=False)
    assert [e.path for e in entries] == ["/init"]


def test_host_file_keeps_its_mode_unless_given(tmp_path):
    src = tmp_path / "tool"
    src.write_bytes(b"#!/bin/sh\n")
    src.chmod(0o751)
    entries = initramfs_entries([FileSpec("/a", src), FileSpec("/b", str(src), 0o700)],
                                console=False)
    modes = {e.path: stat.S_IMODE(e.mode) for e in entries}
    assert modes == {"/a": 0o751, "/b": 0o700}


@pytest.mark.parametrize(
    "files",
    [
        [("/", b"x", 0o644)],
        [("/a/../b", b"x", 0o644)],
        [("/a", b"x"), ("a", b"y")],
        [("/a", b"x"), ("/a/b", b"y")],
        [("/missing", "/nonexistent/pvhboot-file")],
        [("/dir", "/")],
        ["not-a-tuple"],
    ],
    ids=["root", "dotdot", "twice", "file-and-dir", "missing-source", "source-is-dir", "shape"],
)
def test_bad_specs_are_usage_errors(files):
    with pytest.raises(UsageError):
        initramfs_entries(files)


@needs_cpio
def test_gzip_archive_is_reproducible_and_readable(tmp_path):
    init = tmp_path / "init"
    init.write_bytes(b"\x7fELF fake init")
    a = build_initramfs(tmp_path / "a.img", [("/init", init, 0o755), ("/etc/x", b"x\n")])
    b = build_initramfs(tmp_path / "b.img", [("/etc/x", b"x\n"), ("/init", init, 0o755)])
    raw = a.read_bytes()
    assert raw == b.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    # gzip header: mtime 0, no file name flag (reproducible).
    assert raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08
    listing = _listing(gzip.decompress(raw))
    names = [line.split()[-1] for line in listing]
    assert names == ["dev", "dev/console", "etc", "etc/x", "init"]
    assert listing[-1].startswith("-rwxr-xr-x")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_uncompressed(tmp_path):
    out = build_initramfs(tmp_path / "a.cpio", [("/init", b"x", 0o755)], compression="none")
    assert out.read_bytes()[:6] == b"070701"
    with pytest.raises(UsageError):
        build_initramfs(tmp_path / "b", [("/init", b"x")], compression="lz4")



def test_output_that_is_not_a_regular_file_is_refused(tmp_path):
    # os.replace would turn a symlink (or a device node) into the archive and
    # fail with a raw OSError on a directory: one UsageError instead.
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    for out in (tmp_path, link):
        with pytest.raises(UsageError, match="not a regular file"):
            build_initramfs(out, [("/init", b"x", 0o755)])
    assert link.is_symlink() and target.read_bytes() == b"keep"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

@needs_cpio
def test_module_cli(tmp_path):
    init = tmp_path / "myinit"
    init.write_bytes(b"init-bytes")
    extra = tmp_path / "extra"
    extra.write_bytes(b"extra-bytes")
    out = tmp_path / "initramfs.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "pvhboot.initramfs", str(out), "--init", str(init),
         "--add", f"{extra}:/opt/extra"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=gzip.decompress(out.read_bytes()), cwd=root,
                   check=True)
    assert (root / "init").read_bytes() == b"init-bytes"
    assert stat.S_IMODE((root / "init").stat().st_mode) == 0o755
    assert (root / "opt" / "extra").read_bytes() == b"extra-bytes"

    bad = subprocess.run([sys.executable, "-m", "pvhboot.initramfs", str(out), "--init",
                          str(tmp_path / "nope")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("pvhboot: error: ") and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_write_to_file_object():
    from pvhboot.initramfs.builder import write_initramfs

    buf = io.BytesIO()
    write_initramfs(buf, initramfs_entries([("/init", b"x", 0o755)]), compression="none")
    assert buf.getvalue().startswith(b"070701") and b"TRAILER!!!" in buf.getvalue()
