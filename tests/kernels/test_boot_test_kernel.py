"""The project's small 6.1 kernel (scripts/build-test-kernel), its vmlinux booted
through PVH with the project's own initramfs, checked from the guest's console:
the kernel itself reports what it received (command line, memory map, initrd
placement) and that it ran /init. Nothing here reads our own builders back."""

from __future__ import annotations

import re

import pytest

from conftest import INIT_DONE, INIT_HELLO  # this directory's conftest
from pvhtest import requires_guest_userspace, requires_kvm

pytestmark = [pytest.mark.kernel, requires_kvm]


def test_vmlinux_boots_through_pvh_to_init(test_kernel, initramfs, boot_kernel):
    b = boot_kernel(test_kernel.vmlinux, initrd=initramfs)
    assert b.plan.protocol == "pvh"
    assert re.search(r"Linux version 6\.1\.", b.console), b.context()
    b.check_reached_init(initramfs)


@requires_guest_userspace
def test_init_prints_and_restarts(test_kernel, initramfs, boot_kernel):
    """Only where guest user space runs (VMX/SVM): /init's own output, with
    this boot's marker from the command line, then reboot(2), which the VMM
    sees as an i8042 reset (status 0)."""
    b = boot_kernel(test_kernel.vmlinux, initrd=initramfs, stop_on=None)
    ctx = b.context()
    assert INIT_HELLO in b.console, ctx
    assert f"pvhboot-init: env: {b.marker}" in b.console, ctx
    assert INIT_DONE in b.console, ctx
    assert b.result.reason == "reset", ctx
    assert b.result.status == 0, ctx
