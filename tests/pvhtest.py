"""Plain helpers shared by the tests: real kernels (fetched or built by the
project's own scripts, cached under ~/.cache/pvhboot), the KVM skip markers,
and a helper that runs the CLI the way a user does.

Import them as ``from pvhtest import ...``. Not ``from conftest import``:
several directories have a conftest.py, and whichever pytest imported last
is the module named ``conftest``."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

KVM_PATH = "/dev/kvm"
HAVE_KVM = os.path.exists(KVM_PATH) and os.access(KVM_PATH, os.R_OK | os.W_OK)

requires_kvm = pytest.mark.skipif(
    not HAVE_KVM, reason=f"{KVM_PATH} is missing or not accessible: this test boots on real KVM"
)


def _host_has_hw_virt() -> bool:
    # User space in a guest needs VMX/SVM; the PVM backend here cannot run
    # guest system calls (KVM-HOST-NOTES gap 3).
    if os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


HAVE_GUEST_USERSPACE = HAVE_KVM and _host_has_hw_virt()

requires_guest_userspace = pytest.mark.skipif(
    not HAVE_GUEST_USERSPACE,
    reason="guest user space needs KVM on VMX/SVM; this host's PVM backend cannot run guest "
    "system calls (KVM-HOST-NOTES gap 3)",
)


@dataclass(frozen=True)
class KernelFiles:
    vmlinuz: Path  # bzImage (for the test kernel: arch/x86/boot/bzImage)
    config: Path
    system_map: Path
    vmlinux: Path | None = None  # the ELF, where the build provides one


def _script_lines(*cmd: str) -> list[str]:
    proc = subprocess.run(
        [str(SCRIPTS / cmd[0]), *cmd[1:]], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout.split("\n")


@functools.cache
def debian_kernel_files(flavour: str) -> KernelFiles:
    vmlinuz, config, system_map = _script_lines("fetch-debian-kernel", flavour)[:3]
    return KernelFiles(Path(vmlinuz), Path(config), Path(system_map))


@functools.cache
def test_kernel_files(codec: str | None = None) -> KernelFiles:
    """The project's small kernel, built by scripts/build-test-kernel.

    The script prints four lines: vmlinux, bzImage, .config, System.map.
    """
    script = SCRIPTS / "build-test-kernel"
    if not script.exists():
        pytest.skip("scripts/build-test-kernel is not in this tree yet")
    args = ["build-test-kernel"] + (["--codec", codec] if codec else [])
    vmlinux, bzimage, config, system_map = _script_lines(*args)[:4]
    return KernelFiles(Path(bzimage), Path(config), Path(system_map), Path(vmlinux))


def run_cli(*args: str, timeout: float = 600, input: bytes | None = None):
    """Run ``python -m pvhboot ARGS`` as a user would; returns CompletedProcess (bytes)."""
    return subprocess.run(
        [sys.executable, "-m", "pvhboot", *map(str, args)],
        capture_output=True,
        timeout=timeout,
        input=input if input is not None else b"",
        check=False,
    )
