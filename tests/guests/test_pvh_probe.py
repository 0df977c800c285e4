"""PVH probe guests on real KVM: the guest itself checks its entry state and
every field of hvm_start_info against values this test computes from the
ABI (not from our planner), and reports through the serial port and the
debug-exit port.

Expected values come from the PVH ABI and the documented guest layout:
the memory map for 128 MiB (RAM below 640 KiB, the ISA hole reserved, RAM
from 1 MiB) and the initrd at the top of RAM below 4 GiB, page aligned.
"""

from __future__ import annotations

import pytest
from pvh_probe_build import PASS_STATUS, PROBE_FAIL, requires_kvm, run_cli

MIB = 1 << 20
GUEST_MEMORY = 128 * MIB
PROBE_ENTRY = 0x100000  # pvh_probe.ld links _start at 1 MiB
RAM, RESERVED = 1, 2  # e820 / XEN_HVM_MEMMAP_TYPE_*

MEMMAP_128M = [
    (0x0, 0xA0000, RAM),
    (0xA0000, 0x60000, RESERVED),
    (0x100000, GUEST_MEMORY - 0x100000, RAM),
]
CMDLINE = 'console=ttyS0 probe="quoted value" x=1,2 /path'


def _initrd(tmp_path, size: int):
    # A pattern that differs at every offset, so a module placed a page off
    # (or truncated) shows in the first and last bytes.
    data = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(size))
    path = tmp_path / "initrd.bin"
    path.write_bytes(data)
    return path, data


def _top_of_ram(size: int) -> int:
    return (GUEST_MEMORY - size) & ~0xFFF


def _run(probe, *, initrd=None, cmdline=CMDLINE):
    from pvhboot import Machine

    machine = Machine(
        kernel=probe,
        initrd=initrd,
        cmdline=cmdline,
        memory="128M",
        boot="pvh",
        timeout=120,
        host_quirks=False,  # the probe checks the exact command line
        quiet=True,
    )
    return machine.run()


def test_probe_builds_with_pvh_note(probe_builder, tmp_path):
    """Both note forms and both ELF classes carry the PVH entry our reader finds."""
    from pvhboot.image.kernel import open_image

    for note_size, elf_class in ((4, 32), (8, 64), (8, 32), (4, 64)):
        probe = probe_builder(
            name=f"p{note_size}_{elf_class}",
            note_size=note_size,
            elf_class=elf_class,
            cmdline="",
            memmap=MEMMAP_128M,
        )
        img = open_image(str(probe))
        assert img.format == "elf"
        assert img.elf.elf_class == elf_class
        assert img.entry_points.pvh == PROBE_ENTRY
        descs = [n.desc for n in img.elf.notes if n.owner == "Xen" and n.type == 18]
        assert [len(d) for d in descs] == [note_size]


@requires_kvm
@pytest.mark.parametrize("note_size,elf_class", [(4, 32), (8, 64)])
def test_pvh_probe_with_initrd(probe_builder, tmp_path, note_size, elf_class):
    size = 3 * 4096 + 123  # not a page multiple: the size must be passed exactly
    initrd, data = _initrd(tmp_path, size)
    probe = probe_builder(
        note_size=note_size,
        elf_class=elf_class,
        cmdline=CMDLINE,
        memmap=MEMMAP_128M,
        module=(_top_of_ram(size), size),
        module_head=data[:64],
        module_tail=data[-64:],
    )
    result = _run(probe, initrd=initrd)
    assert "PROBE FAIL" not in result.console, result.console
    assert "PROBE OK" in result.console, (result.reason, result.message, result.console)
    assert (result.reason, result.status) == ("debug-exit", PASS_STATUS)


@requires_kvm
def test_pvh_probe_without_initrd(probe_builder):
    probe = probe_builder(cmdline="", memmap=MEMMAP_128M, module=None)
    result = _run(probe, cmdline="")
    assert "PROBE OK" in result.console, (result.reason, result.message, result.console)
    assert result.status == PASS_STATUS


@requires_kvm
def test_pvh_probe_detects_wrong_values(probe_builder, tmp_path):
    """A probe expecting different values must fail, naming each field:
    proof that the probe can fail at all."""
    size = 8192
    initrd, data = _initrd(tmp_path, size)
    probe = probe_builder(
        cmdline=CMDLINE + " extra",
        memmap=[*MEMMAP_128M[:2], (0x100000, 2 * GUEST_MEMORY, RAM)],
        module=(_top_of_ram(size), size + 1),
        module_head=data[:16],
        module_tail=data[-16:],
    )
    result = _run(probe, initrd=initrd)
    assert "PROBE OK" not in result.console
    assert "PROBE FAIL cmdline" in result.console
    assert "PROBE FAIL memmap size of entry 0x2" in result.console
    assert "PROBE FAIL module[0].size" in result.console
    assert result.reason == "debug-exit"
    assert result.status == (PROBE_FAIL + 3) << 1 | 1, result.console



@requires_kvm
def test_pvh_probe_detects_wrong_cpu_state(probe_builder):
    """The CPU-state checks can fail too: the same plan with EFLAGS, CR0 and
    the GDT's TSS descriptor altered must be reported field by field."""
    import struct

    from pvhboot import Machine

    probe = probe_builder(cmdline="", memmap=MEMMAP_128M, module=None)
    machine = Machine(kernel=probe, memory="128M", boot="pvh", timeout=120, host_quirks=False)
    plan = machine.plan()
    plan.cpu = plan.cpu.replace(rflags=0x46, cr0=plan.cpu.cr0 | 0x20)
    (gdt,) = [c for c in plan.chunks if c.addr == plan.cpu.gdt_base]
    table = bytearray(gdt.source)
    tss_slot = plan.cpu.tr.selector & ~7
    (desc,) = struct.unpack_from("<Q", table, tss_slot)
    struct.pack_into("<Q", table, tss_slot, desc & ~(0xF << 40) | 0x9 << 40)  # "available"
    plan.chunks[plan.chunks.index(gdt)] = gdt.replace(source=bytes(table))
    result = machine.run_plan(plan)
    assert "PROBE FAIL CR0" in result.console, result.console
    assert "PROBE FAIL EFLAGS: got 0x46 expected 0x2" in result.console
    assert "PROBE FAIL TR type (32-bit TSS, busy): got 0x9 expected 0xb" in result.console
    assert result.status == (PROBE_FAIL + 3) << 1 | 1


@requires_kvm
def test_pvh_probe_through_the_cli(probe_builder, tmp_path):
    """`pvhboot run` with QEMU-style options: the exit status is the probe's
    debug-exit status, and its report reaches stdout."""
    size = 5000
    initrd, data = _initrd(tmp_path, size)
    probe = probe_builder(
        note_size=8,
        elf_class=64,
        cmdline="console=ttyS0",
        memmap=MEMMAP_128M,
        module=(_top_of_ram(size), size),
        module_head=data[:32],
        module_tail=data[-32:],
    )
    proc = run_cli(
        "run", "-kernel", probe, "-initrd", initrd, "-append", "console=ttyS0", "-m", "128",
        "--no-host-quirks", "--timeout", "120",
    )
    out = proc.stdout.decode(errors="replace")
    assert "PROBE OK" in out, (out, proc.stderr.decode(errors="replace"))
    assert proc.returncode == PASS_STATUS
