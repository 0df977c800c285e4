"""Fixtures for the PVH probe guests: ``probe_builder`` compiles a probe
into the test's tmp dir (see pvh_probe_build.py)."""

from __future__ import annotations

import pytest
from pvh_probe_build import ProbeExpect, build_probe, have_toolchain


@pytest.fixture
def probe_builder(tmp_path):
    """``probe_builder(name=..., note_size=4, elf_class=32, **ProbeExpect fields) -> Path``

    Keyword arguments rather than an imported class: a test module cannot
    import this conftest by name (tests/conftest.py has the same name).
    """
    if not have_toolchain():
        pytest.skip("gcc, ld and objcopy build the probe guests")

    def build(*, note_size: int = 4, elf_class: int = 32, name: str = "probe", **expect):
        exp = ProbeExpect(**expect)
        return build_probe(tmp_path / name, exp, note_size=note_size, elf_class=elf_class)

    return build
