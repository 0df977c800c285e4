"""Session fixtures over the helpers in ``pvhtest.py`` (real kernels, KVM
markers, the CLI runner). Tests import plain names from ``pvhtest``."""

from __future__ import annotations

import pytest

from pvhtest import KernelFiles, debian_kernel_files, test_kernel_files


@pytest.fixture(scope="session")
def debian_cloud_kernel() -> KernelFiles:
    return debian_kernel_files("cloud-amd64")


@pytest.fixture(scope="session")
def debian_generic_kernel() -> KernelFiles:
    return debian_kernel_files("amd64")


@pytest.fixture(scope="session")
def test_kernel() -> KernelFiles:
    return test_kernel_files()
