"""Session fixtures over the helpers in ``pvhtest.py`` (real kernels, KVM
markers, the CLI runner). Tests import plain names from ``pvhtest``."""

from __future__ import annotations

import pytest

# HAVE_KVM, requires_kvm and run_cli are not used here:
# tests/guests/pvh_probe_build.py loads this file by path and reads them.
from pvhtest import (  # noqa: F401
    HAVE_KVM,
    KernelFiles,
    debian_kernel_files,
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
