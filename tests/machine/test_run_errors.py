"""`pvhboot run` with a bad input: exactly one stderr line, before anything runs.

On a PVM host the host-quirks announcement used to come first, making two
lines; it now comes only right before the guest starts. These runs never
reach KVM_RUN, so they need no /dev/kvm (but they do check the PVM host
case when this host is one).
"""

from __future__ import annotations

import gzip
import struct

import pytest

from pvhboot.api import Machine
from pvhboot.errors import BootError
from pvhtest import run_cli

MIB = 1 << 20


def tiny_pvh_elf() -> bytes:
    """ELF64 x86-64: one PT_LOAD of HLTs at 16 MiB and the Xen PVH note (type 18)."""
    code = b"\xf4" * 0x100
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    data_off = 64 + 56 * 2
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, data_off, 0x1000000, 0x1000000, len(code),
                        0x2000, 0x1000)
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(code), 0, 0, len(note),
                         len(note), 4)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56,
                       2, 64, 0, 0)
    return ehdr + phdrs + code + note


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(tiny_pvh_elf())
    return k


def _one_error_line(proc, status: int = 1) -> str:
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pvhboot: error: "), lines
    assert proc.returncode == status, lines
    return lines[0]


def test_initrd_too_big(kernel, tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(200 * MIB)  # sparse: costs nothing
    _one_error_line(run_cli("run", "--kernel", kernel, "--initrd", big))


def test_cmdline_too_long_names_the_host_quirks_suffix(kernel):
    line = _one_error_line(run_cli("run", "--kernel", kernel, "--cmdline", "a" * 5000))
    assert "command line too long" in line


def test_memory_too_small_for_linux_boot(kernel):
    _one_error_line(run_cli("run", "--kernel", kernel, "--boot", "linux", "--memory", "2M"))


def test_truncated_compressed_vmlinux(tmp_path):
    gz = tmp_path / "vml.gz"
    gz.write_bytes(gzip.compress(tiny_pvh_elf())[:60])
    _one_error_line(run_cli("run", "--kernel", gz, "--no-cache"))


def test_console_log_in_a_missing_directory(kernel, tmp_path):
    _one_error_line(run_cli("run", "--kernel", kernel, "--console-log", tmp_path / "no" / "x"))


def test_missing_system_map_is_refused_before_boot(kernel, tmp_path):
    line = _one_error_line(run_cli("run", "--kernel", kernel, "--system-map", tmp_path / "nope"))
    assert "System.map" in line


def test_json_without_dry_run_is_a_usage_error(kernel):
    line = _one_error_line(run_cli("run", "--kernel", kernel, "--json"), status=2)
    assert "--dry-run" in line


def test_json_with_dry_run_still_works(kernel):
    proc = run_cli("run", "--kernel", kernel, "--json", "--dry-run")
    assert proc.returncode == 0, proc.stderr


def test_timeout_help_says_wall_time_from_start():
    proc = run_cli("run", "--help")
    assert "wall time from start" in " ".join(proc.stdout.decode().split())


def test_cmdline_too_long_message_counts_the_suffix(kernel):
    machine = Machine(kernel=kernel, cmdline="a" * 2040, host_quirks=True)
    suffix = machine.effective_cmdline()[2040:].strip()
    if suffix:  # a host with quirks (PVM): the message must own up to them
        with pytest.raises(BootError) as exc:
            machine.prepare()
        msg = str(exc.value)
        assert f"{len(suffix) + 1} of those bytes are pvhboot's host-quirks suffix" in msg
        assert "--no-host-quirks" in msg
        # Without quirks, 2040 bytes fit: the suffix was the whole problem.
        assert Machine(kernel=kernel, cmdline="a" * 2040, host_quirks=False).plan() is not None
    with pytest.raises(BootError) as exc:
        Machine(kernel=kernel, cmdline="a" * 3000, host_quirks=False).prepare()
    assert "host-quirks" not in str(exc.value)
