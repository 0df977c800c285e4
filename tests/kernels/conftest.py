"""Fixtures for booting real kernels: the test /init (built with gcc), the
project's own initramfs around it, and a helper that boots a kernel through
the Python API and reads the milestones off its console.

Shared helpers (markers, ``run_cli``, kernels) come from ``pvhtest``; this
directory's tests import only this file's own names (``INIT_HELLO`` ...)
through ``from conftest import``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


# A module that imports a `test_*` function gets it collected as a test, so
# this directory's tests use the `small_kernel` fixture instead.
from pvhtest import test_kernel_files as _small_kernel_files  # noqa: E402

INIT_SOURCE = _HERE / "init.c"
# A static, libc-free binary: the initramfs is one file and needs no loader.
INIT_CFLAGS = ["-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-O2",
               "-Wall", "-Wextra", "-Werror", "-Wl,--build-id=none"]

GUEST_MEMORY = "128M"
GUEST_MEMORY_BYTES = 128 << 20
# Boots take 30-70 s on an idle PVM host (KVM-HOST-NOTES gap 4), but 3-4x
# that while other guests run on the same 2 cores (measured: the gzip bzImage
# through the guest decompressor took 204-240 s at load average 7). The bound
# only ends a hung guest; a passing boot never waits for it.
BOOT_TIMEOUT = 420.0

# Milestones on the guest console.
RUN_INIT = "Run /init as init process"
INIT_HELLO = "pvhboot-init: hello from /init"
INIT_DONE = "pvhboot-init: restarting"


@pytest.fixture(scope="session")
def init_binary(tmp_path_factory) -> Path:
    """tests/kernels/init.c built with gcc into a static freestanding ELF."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("init") / "init"
    proc = subprocess.run([gcc, *INIT_CFLAGS, "-o", str(out), str(INIT_SOURCE)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"gcc failed on {INIT_SOURCE}:\n{proc.stderr}"
    return out


@pytest.fixture(scope="session")
def initramfs(init_binary, tmp_path_factory) -> Path:
    """The project's own initramfs (gzip cpio newc): /init and /dev/console."""
    from pvhboot.initramfs.builder import build_initramfs

    out = tmp_path_factory.mktemp("initramfs") / "initramfs.cpio.gz"
    return build_initramfs(out, [("/init", init_binary, 0o755)], compression="gzip")


@pytest.fixture(scope="session")
def small_kernel():
    """``small_kernel(codec)`` -> KernelFiles of scripts/build-test-kernel's build."""
    return _small_kernel_files


@dataclass
class Boot:
    """One boot of a real kernel, with what the test needs to check it."""

    kernel: str
    cmdline: str  # what the test passed (unique per boot)
    marker: str  # the unique word inside it
    plan: object  # pvhboot.boot.plan.BootPlan
    result: object  # pvhboot.RunResult
    seconds: float
    path_message: str  # the one stderr line: which boot path and why

    @property
    def console(self) -> str:
        return self.result.console.replace("\r", "")

    def lines(self) -> list[str]:
        return self.console.split("\n")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines()[-n:])

    def context(self) -> str:
        """For assertion messages: how the run ended and the end of the console."""
        r = self.result
        return (f"\n--- run ended: reason={r.reason} status={r.status} after {self.seconds:.1f} s;"
                f" {r.message}\n--- console tail:\n{self.tail()}")

    def command_line_seen(self) -> str | None:
        m = re.search(r"Command line: (.*)", self.console)
        return m.group(1).strip() if m else None

    def e820_seen(self) -> list[tuple[int, int, str]]:
        """The kernel's "BIOS-e820: [mem A-B] type" lines as (start, end+1, type)."""
        return [
            (int(a, 16), int(b, 16) + 1, kind.strip())
            for a, b, kind in re.findall(
                r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] ([^\n]+)", self.console
            )
        ]

    def ramdisk_seen(self) -> tuple[int, int] | None:
        """The kernel's "RAMDISK: [mem A-B]" as (start, end+1)."""
        m = re.search(r"RAMDISK: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]", self.console)
        return (int(m.group(1), 16), int(m.group(2), 16) + 1) if m else None

    def initrd_chunks(self) -> list:
        return [c for c in self.plan.chunks if c.label == "initrd"]

    def check_reached_init(self, initrd: Path) -> None:
        """What the kernel itself says it got, against what this boot gave it:
        the command line, the memory map, where the initrd is; then /init ran.
        Holds for PVH (hvm_start_info) and the Linux protocol (boot_params)."""
        from pvhboot.boot.layout import PAGE_SIZE, align_up, memory_map
        from pvhboot.boot.plan import E820_TYPE_NAMES

        ctx = self.context()
        assert self.result.reason == "console-match", ctx
        assert self.result.status == 0, ctx

        # The command line this test made up (unique per boot); the VMM may
        # append the host quirks after it.
        seen = self.command_line_seen()
        assert seen is not None, "no 'Command line:' on the console" + ctx
        assert seen == self.plan.cmdline.strip(), ctx
        assert seen.startswith(self.cmdline) and self.marker in seen, ctx

        # The memory map, as the kernel read it (hvm_start_info memmap or the
        # zero page's e820 table): one source of truth, layout.memory_map().
        assert self.plan.memory_map == memory_map(GUEST_MEMORY_BYTES)
        expected = [(r.addr, r.end, E820_TYPE_NAMES[r.type])
                    for r in memory_map(GUEST_MEMORY_BYTES)]
        assert self.e820_seen() == expected, ctx

        # The initrd: where the plan put it, to the page.
        chunks = self.initrd_chunks()
        assert len(chunks) == 1, self.plan.chunks
        start, size = chunks[0].addr, chunks[0].size
        assert start % PAGE_SIZE == 0
        assert size == Path(initrd).stat().st_size
        assert self.ramdisk_seen() == (start, align_up(start + size, PAGE_SIZE)), ctx
        assert "Unpacking initramfs..." in self.console, ctx
        # A cpio the kernel cannot read shows up here, and then no /init runs.
        assert "Initramfs unpacking failed" not in self.console, ctx

        assert RUN_INIT in self.console, ctx


def unique_cmdline(extra: str = "") -> tuple[str, str]:
    """A command line no other boot uses, and the marker word in it.

    ``pvhboot_test=...`` has no dot, so the kernel passes it to /init as an
    environment variable (init.c prints it). ``panic=-1``: on this host /init's
    first system call kills it, and the kernel should restart at once (i8042
    reset: status 0) instead of waiting for a timeout.
    """
    marker = f"pvhboot_test={uuid.uuid4().hex[:16]}"
    words = ["console=ttyS0", "panic=-1", marker]
    if extra:
        words.append(extra)
    return " ".join(words), marker


@pytest.fixture(scope="session")
def boot_kernel():
    """``boot_kernel(kernel, initrd=None, boot="auto", stop_on=RUN_INIT, ...)`` -> Boot.

    Boots through the public Python API, as a library user would, with a unique
    command line. Prints the milestones and the time so `pytest -s` shows them.
    """
    pvhboot = pytest.importorskip("pvhboot")

    def boot(kernel, *, initrd=None, boot="auto", stop_on: str | None = re.escape(RUN_INIT),
             timeout: float = BOOT_TIMEOUT, extra_cmdline: str = "") -> Boot:
        cmdline, marker = unique_cmdline(extra_cmdline)
        machine = pvhboot.Machine(
            kernel=str(kernel), initrd=None if initrd is None else str(initrd),
            cmdline=cmdline, memory=GUEST_MEMORY, boot=boot, timeout=timeout, stop_on=stop_on,
        )
        plan = machine.plan()
        path_message = machine.prepare().message
        start = time.monotonic()
        result = machine.run()
        seconds = time.monotonic() - start
        b = Boot(str(kernel), cmdline, marker, plan, result, seconds, path_message)
        print(f"\nboot {Path(kernel).name} boot={boot} protocol={plan.protocol}: "
              f"reason={result.reason} status={result.status} in {seconds:.1f} s; "
              f"{result.message}; timeline={result.timeline}; path: {path_message}")
        return b

    return boot
