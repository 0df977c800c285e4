"""The kconfiglib solver against the real Linux 6.1 tree (Debian's
linux-source-6.1, fetched by scripts/fetch-linux-source).

Configs under test are made here with kconfiglib itself: allnoconfig (as
scripts/kconfig does: every prompt n, allnoconfig_y symbols y) and a
tinyconfig-like one (allnoconfig plus the tiny fragments, which set EXPERT
and switch TTY off). The answers are then checked twice: by reloading the
appended config in kconfiglib, and once by `make olddefconfig` itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pvhboot.errors import ConfigError
from pvhboot.kconfig.solver import Solver, check_source_tree, kernel_version, load_kconfig

pytestmark = pytest.mark.kernel

CACHE = Path(os.environ.get("PVHBOOT_CACHE", Path.home() / ".cache" / "pvhboot"))
LINUX_SRC = CACHE / "linux-source" / "linux-source-6.1"

REQUIRED_GOALS = [
    ("PVH", "y"),
    ("X86_64", "y"),
    ("SERIAL_8250", "y"),
    ("SERIAL_8250_CONSOLE", "y"),
    ("BLK_DEV_INITRD", "y"),
    ("DEVTMPFS", "y"),
    ("VIRTIO_MMIO", "y"),
    ("VIRTIO_MMIO_CMDLINE_DEVICES", "y"),
]


@pytest.fixture(scope="module")
def srctree() -> Path:
    if not (LINUX_SRC / ".pvhboot-complete").exists():
        pytest.skip(f"no Linux tree at {LINUX_SRC}: run scripts/fetch-linux-source first")
    return LINUX_SRC


@pytest.fixture(scope="module")
def kconf(srctree):
    return load_kconfig(str(srctree))


def _generate(kconf, tmp_path: Path, fragments: tuple[str, ...] = ()) -> str:
    kconf.warn = False
    kconf.unset_values()
    for sym in kconf.unique_defined_syms:
        sym.set_value(2 if sym.is_allnoconfig_y else 0)
    for frag in fragments:
        kconf.load_config(str(LINUX_SRC / frag), replace=False)
    out = tmp_path / "generated.config"
    kconf.write_config(str(out), save_old=False)
    return out.read_text()


@pytest.fixture
def allnoconfig(kconf, tmp_path) -> str:
    return _generate(kconf, tmp_path)


@pytest.fixture
def tinyconfig(kconf, tmp_path) -> str:
    return _generate(
        kconf,
        tmp_path,
        ("kernel/configs/tiny-base.config", "kernel/configs/tiny.config", "arch/x86/configs/tiny.config"),
    )


def _values_after_append(kconf, tmp_path: Path, text: str, lines: list[str]) -> dict[str, str]:
    """Load `text` + `lines` in kconfiglib, the way a user appends them."""
    path = tmp_path / "appended.config"
    path.write_text(text + "\n".join(lines) + "\n")
    kconf.load_config(str(path), replace=True)
    return {s.name: s.str_value for s in kconf.unique_defined_syms}


def test_tree_is_6_1_and_pvh_is_its_own_option(kconf, srctree):
    # The seed of the project: PVH is a plain prompt in arch/x86/Kconfig,
    # inside `if HYPERVISOR_GUEST`, and XEN_PVH merely selects it.
    assert kernel_version(str(srctree)).startswith("6.1.")
    import kconfiglib

    pvh = kconf.syms["PVH"]
    assert any(n.prompt for n in pvh.nodes)
    assert kconfiglib.expr_str(pvh.direct_dep) == "HYPERVISOR_GUEST"
    assert any(sel is pvh for sel, _ in kconf.syms["XEN_PVH"].selects)


def test_pvh_from_allnoconfig_is_exactly_guest_support_and_pvh(kconf, allnoconfig, tmp_path):
    with Solver(kconf, allnoconfig) as solver:
        sol = solver.solve([("PVH", "y")])
    assert sol.error is None and sol.verified
    assert sol.assignments == [("HYPERVISOR_GUEST", "y"), ("PVH", "y")]
    assert sol.selectors["PVH"] == ["XEN_PVH"]
    assert not any(name.startswith("XEN") for name, _ in sol.assignments)
    assert sol.scripts_config("x.config") == (
        "scripts/config --file x.config --enable HYPERVISOR_GUEST --enable PVH"
    )

    before = _values_after_append(kconf, tmp_path, allnoconfig, [])
    assert before["PVH"] == "n"
    after = _values_after_append(kconf, tmp_path, allnoconfig, sol.config_lines())
    assert after["PVH"] == "y"
    # Minimal: leaving out any one line loses PVH.
    for line in sol.config_lines():
        rest = [x for x in sol.config_lines() if x != line]
        assert _values_after_append(kconf, tmp_path, allnoconfig, rest)["PVH"] != "y"


def test_everything_required_from_tinyconfig(kconf, tinyconfig, tmp_path):
    start = _values_after_append(kconf, tmp_path, tinyconfig, [])
    # tinyconfig is the hard case: EXPERT=y lets TTY be switched off, and
    # the 64BIT prompt (ARCH=x86) is n.
    assert start["EXPERT"] == "y" and start["TTY"] == "n" and start["64BIT"] == "n"
    with Solver(kconf, tinyconfig) as solver:
        sol = solver.solve(REQUIRED_GOALS)
    assert sol.error is None and sol.verified
    names = [n for n, _ in sol.assignments]
    assert {"TTY", "64BIT", "HYPERVISOR_GUEST", "PVH", "VIRTIO_MENU"} <= set(names)
    after = _values_after_append(kconf, tmp_path, tinyconfig, sol.config_lines())
    for name, want in REQUIRED_GOALS:
        assert after[name] == want, name
    for line in sol.config_lines():
        rest = [x for x in sol.config_lines() if x != line]
        vals = _values_after_append(kconf, tmp_path, tinyconfig, rest)
        assert any(vals[n] != w for n, w in REQUIRED_GOALS), f"{line} is not needed"


def test_debian_cloud_config_needs_only_virtio_mmio(kconf, debian_cloud_kernel):
    text = debian_cloud_kernel.config.read_text()
    with Solver(kconf, text) as solver:
        pvh = solver.solve([("PVH", "y")])
        req = solver.solve(REQUIRED_GOALS)
    assert pvh.already and pvh.assignments == []
    assert req.verified
    # Debian builds virtio-mmio as a module without command-line devices.
    assert req.assignments == [("VIRTIO_MMIO", "y"), ("VIRTIO_MMIO_CMDLINE_DEVICES", "y")]


def test_debian_generic_config(kconf, debian_generic_kernel):
    with Solver(kconf, debian_generic_kernel.config.read_text()) as solver:
        sol = solver.solve([("PVH", "y"), ("KVM_GUEST", "y")])
    assert sol.already


def test_test_kernel_config(kconf, test_kernel, tmp_path):
    text = test_kernel.config.read_text()
    with Solver(kconf, text) as solver:
        assert solver.solve([("PVH", "y")]).already
        sol = solver.solve(REQUIRED_GOALS)
    assert sol.verified and sol.error is None
    after = _values_after_append(kconf, tmp_path, text, sol.config_lines())
    assert all(after[n] == w for n, w in REQUIRED_GOALS)


def test_unknown_symbol_is_reported(kconf, allnoconfig):
    with Solver(kconf, allnoconfig) as solver:
        sol = solver.solve([("NO_SUCH_OPTION_PVHBOOT", "y")])
    assert sol.error and "does not exist" in sol.error and not sol.verified


def test_not_a_linux_tree(tmp_path):
    (tmp_path / "Kconfig").write_text("config FOO\n\tbool\n")
    with pytest.raises(ConfigError, match="not a Linux source tree"):
        check_source_tree(str(tmp_path))


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                    reason="make olddefconfig needs make and gcc (it builds scripts/kconfig/conf)")
def test_make_olddefconfig_keeps_the_answer(kconf, allnoconfig, srctree, tmp_path):
    with Solver(kconf, allnoconfig) as solver:
        sol = solver.solve(REQUIRED_GOALS)
    assert sol.verified
    out = tmp_path / "build"
    out.mkdir()
    (out / ".config").write_text(allnoconfig + "\n".join(sol.config_lines()) + "\n")
    proc = subprocess.run(
        ["make", "-s", "-C", str(srctree), f"O={out}", "olddefconfig"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = (out / ".config").read_text().splitlines()
    for name, want in REQUIRED_GOALS:
        assert f"CONFIG_{name}={want}" in final, name


def test_choice_member(kconf, allnoconfig, tmp_path):
    # "Kernel compression mode" is a choice; picking a member is one line.
    with Solver(kconf, allnoconfig) as solver:
        sol = solver.solve([("KERNEL_ZSTD", "y")])
    assert sol.verified and sol.assignments == [("KERNEL_ZSTD", "y")]
    after = _values_after_append(kconf, tmp_path, allnoconfig, sol.config_lines())
    assert after["KERNEL_ZSTD"] == "y" and after["KERNEL_GZIP"] == "n"


def test_helpful_options_are_solved_on_top_of_the_required_set(srctree, tinyconfig, tmp_path, kconf):
    from pvhboot.kconfig.advice import solve_report
    from pvhboot.kconfig.check import check_config
    from pvhboot.kconfig.dotconfig import parse_config_text

    report = check_config(parse_config_text(tinyconfig, "tiny.config"))
    solved = solve_report(report, str(srctree))
    assert solved.pvh.assignments == [("HYPERVISOR_GUEST", "y"), ("PVH", "y")]
    blk = solved.per_option["VIRTIO_BLK"]
    assert blk.on_top_of_required and blk.verified
    # VIRTIO comes from VIRTIO_MMIO in the required set, not from another driver.
    assert blk.assignments == [("BLOCK", "y"), ("VIRTIO_BLK", "y")]
    lines = solved.required.config_lines() + blk.config_lines()
    after = _values_after_append(kconf, tmp_path, tinyconfig, lines)
    assert after["VIRTIO_BLK"] == "y" and after["PVH"] == "y"
