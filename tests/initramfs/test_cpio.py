"""The newc writer, checked against GNU cpio (the reader people trust) and
against the format's byte layout."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess

import pytest

from pvhboot.errors import UsageError
from pvhboot.initramfs import cpio

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed "
                                "(scripts/setup installs it)")


def _sample_entries():
    return [
        cpio.directory("/dev"),
        cpio.char_device("/dev/console", 5, 1, 0o600),
        cpio.directory("/bin", 0o750),
        cpio.regular_file("/bin/tool", b"\x7fELF" + bytes(range(256)) * 3 + b"x", 0o755),
        cpio.regular_file("/etc/empty", b"", 0o600),
        cpio.directory("/etc"),
        cpio.regular_file("/etc/motd", b"hello\n", 0o644),
        cpio.symlink("/init", "bin/tool"),
    ]


def _archive(entries=None, **kw) -> bytes:
    buf = io.BytesIO()
    n = cpio.write_archive(buf, _sample_entries() if entries is None else entries, **kw)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def _parse(data: bytes):
    """A minimal independent newc reader: (name, fields, body) per entry."""
    out = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110: pos + 110 + namesize]
        assert name.endswith(b"\0")
        pos += 110 + namesize
        assert pos % 4 == 0 or data[pos: pos + (-pos % 4)] == b"\0" * (-pos % 4)
        pos += -pos % 4
        body = data[pos: pos + filesize]
        pos += filesize
        pos += -pos % 4
        out.append((name[:-1].decode(), fields, body))
        if name == b"TRAILER!!!\0":
            return out, pos


def test_header_layout_padding_and_trailer():
    data = _archive()
    entries, end = _parse(data)
    assert end == len(data)
    assert len(data) % 4 == 0
    names = [e[0] for e in entries]
    # Sorted by path components: each directory precedes its contents.
    assert names == ["bin", "bin/tool", "dev", "dev/console", "etc", "etc/empty", "etc/motd",
                     "init", "TRAILER!!!"]
    by_name = {n: f for n, f, _ in entries}
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console[1]) and stat.S_IMODE(console[1]) == 0o600
    assert (console[9], console[10]) == (5, 1)  # rdevmajor, rdevminor
    assert all(f[5] == 0 for f in by_name.values())  # fixed mtime
    assert all(f[12] == 0 for f in by_name.values())  # check field
    assert by_name["bin"][4] == 2 and by_name["bin/tool"][4] == 1  # nlink
    inos = [f[0] for n, f, _ in entries if n != "TRAILER!!!"]
    assert len(set(inos)) == len(inos) and 0 not in inos
    bodies = {n: b for n, _, b in entries}
    assert bodies["init"] == b"bin/tool"
    assert bodies["etc/motd"] == b"hello\n"


def test_deterministic():
    assert _archive() == _archive()
    assert _archive() == _archive(list(reversed(_sample_entries())))


def test_mtime_is_written():
    entries, _ = _parse(_archive(mtime=0x5F5E100))
    assert {f[5] for n, f, _ in entries if n != "TRAILER!!!"} == {0x5F5E100}


def test_every_data_length_pads_to_four():
    for length in range(9):
        data = _archive([cpio.regular_file(f"/f{length}", b"a" * length)])
        parsed, end = _parse(data)
        assert end == len(data)
        assert parsed[0][2] == b"a" * length


@pytest.mark.parametrize(
    "entries",
    [
        [cpio.regular_file("/a", b"1"), cpio.regular_file("a", b"2")],
        [cpio.regular_file("/TRAILER!!!", b"")],
        [cpio.regular_file("/../etc/passwd", b"")],
        [cpio.regular_file("/x/../../y", b"")],
        [cpio.Entry("/fifo", stat.S_IFIFO | 0o644)],
        [cpio.Entry("/d", stat.S_IFDIR | 0o755, data=b"oops")],
        [cpio.Entry("/big-uid", stat.S_IFREG | 0o644, uid=1 << 32)],
    ],
    ids=["duplicate", "trailer-name", "dotdot", "dotdot-inner", "fifo", "dir-with-data",
         "uid-too-big"],
)
def test_bad_entries_are_refused_with_a_usage_error(entries):
    with pytest.raises(UsageError):
        _archive(entries)


def test_add_after_close_is_refused():
    w = cpio.CpioWriter(io.BytesIO())
    w.close()
    w.close()  # idempotent
    with pytest.raises(UsageError):
        w.add(cpio.directory("/x"))


@needs_cpio
def test_gnu_cpio_lists_it(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_archive())
    proc = subprocess.run(["cpio", "-t", "--quiet", "-F", str(archive)], capture_output=True,
                          text=True, check=True)
    assert proc.stdout.split() == ["bin", "bin/tool", "dev", "dev/console", "etc", "etc/empty",
                                   "etc/motd", "init"]
    verbose = subprocess.run(["cpio", "-tv", "--quiet", "-F", str(archive)], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    console = next(line for line in verbose if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert re.search(r"\s5,\s+1\s", console), console
    link = next(line for line in verbose if " init -> " in line)
    assert link.startswith("lrwxrwxrwx") and link.endswith("init -> bin/tool")


@needs_cpio
def test_gnu_cpio_extracts_contents_and_modes(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_archive())
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idv", "--quiet", "--no-absolute-filenames", "-F", str(archive)],
                   cwd=root, capture_output=True, check=True)
    for entry in _sample_entries():
        path = root / entry.name
        st = os.lstat(path)
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(entry.mode), entry.path
        if stat.S_ISLNK(entry.mode):
            assert os.readlink(path) == entry.data.decode()
            continue
        if stat.S_ISCHR(st.st_mode) and os.geteuid() != 0:
            continue
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(entry.mode), entry.path
        if stat.S_ISREG(entry.mode):
            assert path.read_bytes() == entry.data
        if stat.S_ISCHR(entry.mode):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == entry.rdev
