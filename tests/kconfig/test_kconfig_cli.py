"""`pvhboot kconfig` as a user runs it: exit statuses, text, --json, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pvhtest import run_cli

CACHE = Path(os.environ.get("PVHBOOT_CACHE", Path.home() / ".cache" / "pvhboot"))
LINUX_SRC = CACHE / "linux-source" / "linux-source-6.1"

GOOD = """\
# Linux/x86 6.1.192 Kernel Configuration
CONFIG_64BIT=y
CONFIG_X86_64=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PVH=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_DEVTMPFS=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y
"""


def write(tmp_path: Path, text: str, name: str = "test.config") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def assert_one_line_error(proc, status: int = 1) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvhboot: error: "), err
    assert proc.stdout == b""
    return lines[0]


def test_good_config_exits_0(tmp_path):
    proc = run_cli("kconfig", write(tmp_path, GOOD))
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr
    assert "PVH boot:" in out and "exit status 0" in out


def test_missing_pvh_exits_4(tmp_path):
    proc = run_cli("kconfig", write(tmp_path, GOOD.replace("CONFIG_PVH=y", "# CONFIG_PVH is not set")))
    assert proc.returncode == 4
    out = proc.stdout.decode()
    assert "no Xen needed" in out and "--source" in out


def test_missing_required_exits_3_with_reasons(tmp_path):
    text = GOOD.replace("CONFIG_DEVTMPFS=y", "").replace("CONFIG_VIRTIO_MMIO=y", "CONFIG_VIRTIO_MMIO=m")
    proc = run_cli("kconfig", write(tmp_path, text))
    assert proc.returncode == 3
    out = proc.stdout.decode()
    assert "[MISS] CONFIG_DEVTMPFS is not set" in out
    assert "[mod ] CONFIG_VIRTIO_MMIO=m" in out
    assert "devtmpfs gives it device nodes" in out


def test_json_shape(tmp_path):
    proc = run_cli("kconfig", write(tmp_path, GOOD.replace("CONFIG_BLK_DEV_INITRD=y", "")), "--json")
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "pvhboot-kconfig/1"
    assert doc["verdict"] == "partial" and doc["exit_status"] == 3
    assert doc["boot"]["pvh"]["ok"] is True and doc["boot"]["linux64"]["ok"] is True
    assert doc["solver"] is None
    initrd = next(o for o in doc["options"] if o["name"] == "CONFIG_BLK_DEV_INITRD")
    assert initrd == {
        "name": "CONFIG_BLK_DEV_INITRD",
        "level": "required",
        "value": "n",
        "ok": False,
        "why": initrd["why"],
        "note": None,
        "also_needs": [],
    } and initrd["why"]


def test_help_documents_exit_status():
    proc = run_cli("kconfig", "--help")
    out = proc.stdout.decode()
    assert proc.returncode == 0
    for needle in ("exit status:", "  3  ", "  4  ", "--json", "--source"):
        assert needle in out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"just some text\n", "no CONFIG_ lines"),
        (bytes(range(256)) * 40, "neither a kernel .config nor"),
        (b"\x7fELF\x02\x01\x01", "ELF"),
    ],
    ids=["empty", "text-without-config", "garbage", "truncated-elf"],
)
def test_bad_input_is_one_line(tmp_path, content, message):
    p = tmp_path / "input"
    p.write_bytes(content)
    line = assert_one_line_error(run_cli("kconfig", p))
    assert message in line


def test_missing_file(tmp_path):
    line = assert_one_line_error(run_cli("kconfig", tmp_path / "nope.config"))
    assert "nope.config" in line


def test_source_not_a_linux_tree(tmp_path):
    cfg = write(tmp_path, GOOD)
    line = assert_one_line_error(run_cli("kconfig", cfg, "--source", tmp_path))
    assert "not a Linux source tree" in line


def test_usage_error_exits_2():
    proc = run_cli("kconfig")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


# -- real kernels and the real tree --------------------------------------------

needs_tree = pytest.mark.skipif(
    not (LINUX_SRC / ".pvhboot-complete").exists(),
    reason=f"no Linux tree at {LINUX_SRC}: run scripts/fetch-linux-source first",
)


@pytest.mark.kernel
@needs_tree
def test_source_prints_verified_lines_for_pvh(tmp_path):
    # A fragment without guest support: the tree's defaults fill in the rest.
    text = GOOD.replace("CONFIG_HYPERVISOR_GUEST=y", "# CONFIG_HYPERVISOR_GUEST is not set")
    text = text.replace("CONFIG_PVH=y\n", "")
    cfg = write(tmp_path, text)
    proc = run_cli("kconfig", cfg, "--source", LINUX_SRC)
    assert proc.returncode == 4, proc.stderr
    out = proc.stdout.decode()
    block = out.split("To boot through PVH, append to the config:\n", 1)[1].split("  or run:")[0]
    assert block.split() == ["CONFIG_HYPERVISOR_GUEST=y", "CONFIG_PVH=y"]
    assert "--enable HYPERVISOR_GUEST --enable PVH" in out
    assert "selected by CONFIG_XEN_PVH, but PVH alone is enough" in out

    proc = run_cli("kconfig", cfg, "--source", LINUX_SRC, "--json")
    doc = json.loads(proc.stdout)
    pvh = doc["solver"]["pvh"]
    assert pvh["verified"] and pvh["set"] == ["CONFIG_HYPERVISOR_GUEST=y", "CONFIG_PVH=y"]
    assert pvh["selected_by"] == {"CONFIG_PVH": ["CONFIG_XEN_PVH"]}
    assert doc["solver"]["tree_version"].startswith("6.1.")

    # The printed lines, appended, make the command itself report PVH.
    cfg.write_text(text + "\n".join(pvh["set"]) + "\n")
    assert run_cli("kconfig", cfg, "--json").returncode == 0


@pytest.mark.kernel
def test_debian_cloud_config_has_pvh(debian_cloud_kernel):
    proc = run_cli("kconfig", debian_cloud_kernel.config, "--json")
    doc = json.loads(proc.stdout)
    assert doc["boot"]["pvh"]["ok"] is True
    assert doc["kernel_version"].startswith("6.1.")
    # virtio-mmio is a module there, so the verdict is partial.
    assert proc.returncode == 3 and doc["verdict"] == "partial"


@pytest.mark.kernel
def test_debian_image_without_ikconfig_says_so(debian_cloud_kernel):
    line = assert_one_line_error(run_cli("kconfig", debian_cloud_kernel.vmlinuz))
    assert "without an embedded config" in line and "CONFIG_IKCONFIG=y" in line


@pytest.mark.kernel
@pytest.mark.parametrize("which", ["vmlinuz", "vmlinux"])
def test_test_kernel_embedded_config(test_kernel, which):
    image = getattr(test_kernel, which)
    proc = run_cli("kconfig", image, "--json")
    assert proc.returncode in (0, 3), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["origin"] == "image"
    assert doc["boot"]["pvh"]["ok"] is True
    # The same answer as the .config the kernel was built from.
    from_config = json.loads(run_cli("kconfig", test_kernel.config, "--json").stdout)
    assert doc["options"] == from_config["options"]
