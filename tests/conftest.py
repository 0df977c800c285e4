"""Session fixtures over the helpers in ``pvhtest.py`` (real kernels, KVM
markers, the CLI runner). Tests import plain names from ``pvhtest``."""

from __future__ import annotations

import pytest

from pvhtest import (  # noqa: F401  (re-exported for older imports)
    HAVE_GUEST_USERSPACE,
    HAVE_KVM,
    KVM_PATH,
    ROOT,
    SCRIPTS,
    KernelFiles,
    debian_kernel_files,
    requires_guest_userspace,
    requires_kvm,
    run_cli,
    test_kernel_files,
)


@pytest.fixture(scope="session")
def debian_cloud_kernel() -> KernelFiles:
    return debian_kernel_files("cloud-amd64")


@pytest.fixture(scope="session")
def debian_generic_kernel() -> KernelFiles:
    return debian_kernel_files("amd64")


@pytest.fixture(scope="session")
def test_kernel() -> KernelFiles:
    return test_kernel_files()
