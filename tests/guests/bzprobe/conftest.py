"""Fixtures for the fake bzImage probe (builders live in bzprobe_build.py,
which the test module imports by that unique name)."""

from __future__ import annotations

import shutil

import pytest
from bzprobe_build import ProbeSpec, assemble_probe, build_bzimage, initrd_pattern


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory) -> bytes:
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed to build the bzImage probe")
    return assemble_probe(tmp_path_factory.mktemp("bzprobe"))


@pytest.fixture
def make_probe(probe_binary, tmp_path):
    """make_probe(spec, name) -> path of a bzImage built from ``spec``."""

    def make(spec: ProbeSpec, name: str = "bzImage-probe") -> str:
        path = tmp_path / name
        path.write_bytes(build_bzimage(probe_binary, spec))
        return str(path)

    return make


@pytest.fixture
def probe_initrd(tmp_path):
    def make(size: int) -> str:
        path = tmp_path / "probe-initrd.img"
        path.write_bytes(initrd_pattern(size))
        return str(path)

    return make


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Keep the vmlinux cache of these tests out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PVHBOOT_CACHE", str(tmp_path / "cache" / "pvhboot"))
    return tmp_path / "cache"
