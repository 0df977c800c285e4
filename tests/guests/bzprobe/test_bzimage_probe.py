"""The fake bzImage probe on real KVM (issue 4).

A test-built bzImage (boot.rst setup header + the 64-bit code of probe.S)
checks, from inside the guest, what the Linux 64-bit boot protocol promises:
boot_params (loader type, command line, e820, ramdisk) and the CPU state
(long mode, paging, selectors, RSI). It exits through port 0xf4.
"""

from __future__ import annotations

import pytest
from bzprobe_build import ProbeSpec, requires_kvm, run_cli, small_elf_without_pvh

EXIT_PASS = 0x10
PASS_STATUS = (EXIT_PASS << 1) | 1  # isa-debug-exit: status = (value << 1) | 1
CMDLINE = "console=ttyS0 probe=bzimage answer=42"
TIMEOUT = 60


def _run(kernel, *, initrd=None, cmdline=CMDLINE, boot="linux"):
    import pvhboot

    machine = pvhboot.Machine(
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        memory="128M",
        boot=boot,
        timeout=TIMEOUT,
        host_quirks=False,  # the probe compares the command line byte for byte
        quiet=True,
    )
    return machine, machine.run()


@requires_kvm
def test_probe_passes_through_linux_protocol(make_probe, probe_initrd):
    rd = probe_initrd(12345)
    kernel = make_probe(ProbeSpec(cmdline=CMDLINE, ramdisk_size=12345))
    machine, result = _run(kernel, initrd=rd)
    assert "PROBE OK" in result.console, result.console
    assert "FAIL" not in result.console
    assert (result.reason, result.status) == ("debug-exit", PASS_STATUS)
    assert machine.plan().protocol == "linux64"


@requires_kvm
def test_probe_without_initrd_nonrelocatable(make_probe):
    # A non-relocatable kernel must sit exactly at pref_address (boot.rst).
    spec = ProbeSpec(cmdline=CMDLINE, relocatable=0, pref_address=0x2000000, init_size=0x800000)
    _, result = _run(make_probe(spec))
    assert "PROBE OK" in result.console, result.console
    assert result.status == PASS_STATUS


@requires_kvm
def test_probe_auto_picks_linux_protocol_when_payload_has_no_pvh(
    make_probe, probe_initrd, isolated_cache
):
    from pvhboot.image import vmlinux_cache

    rd = probe_initrd(4096)
    spec = ProbeSpec(cmdline=CMDLINE, ramdisk_size=4096, payload=small_elf_without_pvh())
    kernel = make_probe(spec)
    before = vmlinux_cache.DECOMPRESSIONS
    machine, result = _run(kernel, initrd=rd, boot="auto")
    assert "PROBE OK" in result.console, result.console
    assert result.status == PASS_STATUS
    assert machine.prepared.message == (
        "bzImage 6.1.0-probe (gzip) has no PVH entry: "
        "booting through the Linux 64-bit boot protocol"
    )
    # Again: "no PVH" comes from the cache, nothing is decompressed.
    after_first = vmlinux_cache.DECOMPRESSIONS
    assert after_first == before + 1
    _, again = _run(kernel, initrd=rd, boot="auto")
    assert again.status == PASS_STATUS
    assert vmlinux_cache.DECOMPRESSIONS == after_first


@requires_kvm
@pytest.mark.parametrize(
    "change, failure",
    [
        ({"cmdline": CMDLINE + " extra"}, "FAIL: command line at cmd_line_ptr differs"),
        ({"ramdisk_size": 999}, "FAIL: ramdisk_size differs"),
        ({"e820": [(0, 0xA0000, 1), (0x100000, 127 << 20, 1)]}, "FAIL: e820_entries differs"),
        ({"zero_page": 0x8000}, "FAIL: RSI is not the zero page"),
    ],
)
def test_probe_detects_a_wrong_value(make_probe, probe_initrd, change, failure):
    """The same probe with one expectation the loader does not meet must fail."""
    rd = probe_initrd(12345)
    fields = {"cmdline": CMDLINE, "ramdisk_size": 12345, **change}
    _, result = _run(make_probe(ProbeSpec(**fields)), initrd=rd)
    assert failure in result.console, result.console
    assert "PROBE OK" not in result.console
    assert result.reason == "debug-exit"
    assert result.status == ((0x20 + 1) << 1) | 1


@requires_kvm
def test_probe_through_cli(make_probe, probe_initrd):
    rd = probe_initrd(777)
    kernel = make_probe(ProbeSpec(cmdline=CMDLINE, ramdisk_size=777))
    proc = run_cli(
        "run", "--kernel", kernel, "--initrd", rd, "--cmdline", CMDLINE, "--memory", "128M",
        "--boot", "linux", "--no-host-quirks", "--timeout", str(TIMEOUT),
    )
    assert b"PROBE OK" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == PASS_STATUS
    assert b"--boot linux: bzImage 6.1.0-probe: booting through the Linux 64-bit" in proc.stderr


def test_cli_boot_linux_on_protocol_2_10(make_probe):
    kernel = make_probe(ProbeSpec(protocol=0x20A))
    proc = run_cli("run", "--kernel", kernel, "--boot", "linux", "--no-host-quirks")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == [
        "pvhboot: error: bzImage boot protocol 2.10 has no 64-bit entry (XLF_KERNEL_64); "
        "need >= 2.12: boot a newer kernel, or its vmlinux"
    ]


def test_cli_boot_pvh_without_note(make_probe, isolated_cache):
    kernel = make_probe(ProbeSpec(payload=small_elf_without_pvh()))
    proc = run_cli("run", "--kernel", kernel, "--boot", "pvh", "--no-host-quirks")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pvhboot: error: --boot pvh:")
    assert "CONFIG_PVH" in lines[0] and "pvhboot kconfig" in lines[0]
