"""The project's small 6.1 kernel (scripts/build-test-kernel), its vmlinux booted
through PVH with the project's own initramfs, checked from the guest's console:
the kernel itself reports what it received (command line, memory map, initrd
placement) and that it ran /init. Nothing here reads our own builders back."""

from __future__ import annotations

import re

import pytest

from conftest import (
    GUEST_MEMORY_BYTES,
    INIT_DONE,
    INIT_HELLO,
    RUN_INIT,
    requires_guest_userspace,
    requires_kvm,
)
from pvhboot.boot.layout import PAGE_SIZE, align_up, memory_map
from pvhboot.boot.plan import E820_TYPE_NAMES

pytestmark = [pytest.mark.kernel, requires_kvm]


def _expected_e820() -> list[tuple[int, int, str]]:
    return [(r.addr, r.end, E820_TYPE_NAMES[r.type]) for r in memory_map(GUEST_MEMORY_BYTES)]


def test_vmlinux_boots_through_pvh_to_init(test_kernel, initramfs, boot_kernel):
    b = boot_kernel(test_kernel.vmlinux, initrd=initramfs)
    ctx = b.context()
    assert b.plan.protocol == "pvh"
    assert b.result.reason == "console-match", ctx
    assert b.result.status == 0, ctx

    # The command line this test made up (unique per run) came through
    # hvm_start_info.cmdline_paddr; the VMM may append host quirks after it.
    seen = b.command_line_seen()
    assert seen is not None, "no 'Command line:' on the console" + ctx
    assert seen == b.plan.cmdline.strip(), ctx
    assert seen.startswith(b.cmdline), ctx
    assert b.marker in seen

    # The memory map the kernel read from hvm_start_info.memmap_paddr.
    assert b.plan.memory_map == memory_map(GUEST_MEMORY_BYTES)
    assert b.e820_seen() == _expected_e820(), ctx

    # The initrd (module 0): where the plan put it, to the page.
    initrd = b.initrd_chunks()
    assert len(initrd) == 1, b.plan.chunks
    start = initrd[0].addr
    assert start % PAGE_SIZE == 0
    assert initrd[0].size == initramfs.stat().st_size
    assert b.ramdisk_seen() == (start, align_up(start + initrd[0].size, PAGE_SIZE)), ctx
    assert "Unpacking initramfs..." in b.console, ctx
    # The kernel found our cpio readable: a bad archive shows up as
    # "Initramfs unpacking failed: ..." and then no /init to run.
    assert "Initramfs unpacking failed" not in b.console, ctx

    assert RUN_INIT in b.console, ctx
    assert re.search(r"Linux version 6\.1\.", b.console), ctx


@requires_guest_userspace
def test_init_prints_and_restarts(test_kernel, initramfs, boot_kernel):
    """Only where guest user space runs (VMX/SVM): /init's own output, then
    reboot(2), which the VMM sees as an i8042 reset (status 0)."""
    b = boot_kernel(test_kernel.vmlinux, initrd=initramfs, stop_on=None)
    ctx = b.context()
    assert INIT_HELLO in b.console, ctx
    assert f"pvhboot-init: env: {b.marker}" in b.console, ctx
    assert INIT_DONE in b.console, ctx
    assert b.result.reason == "reset", ctx
    assert b.result.status == 0, ctx
