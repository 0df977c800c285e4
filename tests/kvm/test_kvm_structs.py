"""The ctypes mirrors and ioctl numbers against the kernel's own headers.

The oracle is a small C program compiled here against the installed
<linux/kvm.h>: it prints sizeof/offsetof for each structure and the value of
each ioctl macro, and every one must equal what pvhboot.kvm computes.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pvhboot.kvm import ioctls
from pvhboot.kvm import structs as s

HEADER = Path("/usr/include/linux/kvm.h")

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADER.exists(),
    reason="needs gcc and <linux/kvm.h> (Debian: gcc linux-libc-dev; scripts/setup installs them)",
)

STRUCTS = {
    "kvm_regs": s.kvm_regs,
    "kvm_segment": s.kvm_segment,
    "kvm_dtable": s.kvm_dtable,
    "kvm_sregs": s.kvm_sregs,
    "kvm_fpu": s.kvm_fpu,
    "kvm_msr_entry": s.kvm_msr_entry,
    "kvm_msrs": s.kvm_msrs,
    "kvm_cpuid_entry2": s.kvm_cpuid_entry2,
    "kvm_cpuid2": s.kvm_cpuid2,
    "kvm_userspace_memory_region": s.kvm_userspace_memory_region,
    "kvm_pit_config": s.kvm_pit_config,
    "kvm_irq_level": s.kvm_irq_level,
    "kvm_lapic_state": s.kvm_lapic_state,
    "kvm_vcpu_events": s.kvm_vcpu_events,
    "kvm_run": s.kvm_run,
}

# (C expression for the member, ctypes path from the struct)
OFFSETS = {
    "kvm_run": [
        "immediate_exit",
        "exit_reason",
        "if_flag",
        "cr8",
        "apic_base",
        "io.port",
        "io.count",
        "io.data_offset",
        "mmio.phys_addr",
        "mmio.data",
        "mmio.len",
        "mmio.is_write",
        "fail_entry.hardware_entry_failure_reason",
        "fail_entry.cpu",
        "internal.suberror",
        "internal.ndata",
        "internal.data",
        "emulation_failure.flags",
        "emulation_failure.insn_size",
        "emulation_failure.insn_bytes",
        "system_event.type",
        "system_event.ndata",
        "system_event.data",
        "kvm_valid_regs",
        "kvm_dirty_regs",
        "s",
    ],
    "kvm_sregs": ["tr", "gdt", "idt", "cr0", "cr4", "efer", "apic_base", "interrupt_bitmap"],
    "kvm_segment": ["limit", "selector", "type", "unusable"],
    "kvm_fpu": ["fcw", "ftwx", "last_opcode", "last_ip", "xmm", "mxcsr"],
    "kvm_vcpu_events": [
        "interrupt",
        "nmi",
        "sipi_vector",
        "flags",
        "smi",
        "triple_fault",
        "exception_has_payload",
        "exception_payload",
    ],
    "kvm_userspace_memory_region": ["guest_phys_addr", "memory_size", "userspace_addr"],
    "kvm_irq_level": ["level"],
}

IOCTLS = [name for name in dir(ioctls) if name in ioctls.IOCTL_NAMES.values()]


def _py_offset(cls, path: str) -> int:
    offset = 0
    for part in path.split("."):
        # anonymous members (kvm_run's exit union) are promoted to the parent
        field = getattr(cls, part)
        offset += field.offset
        cls = dict(_all_fields(cls))[part]
    return offset


def _all_fields(cls):
    for name, ctype, *_ in cls._fields_:
        yield name, ctype
        if name in getattr(cls, "_anonymous_", ()):
            yield from _all_fields(ctype)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> dict[str, int]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    for name in STRUCTS:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for name, members in OFFSETS.items():
        for m in members:
            lines.append(f'printf("offsetof {name}.{m} %zu\\n", offsetof(struct {name}, {m}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0;}")
    work = tmp_path_factory.mktemp("kvmh")
    src = work / "oracle.c"
    src.write_text("\n".join(lines) + "\n")
    exe = work / "oracle"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        result[f"{kind} {key}"] = int(value)
    return result


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches_kernel(oracle, name):
    assert ctypes.sizeof(STRUCTS[name]) == oracle[f"sizeof {name}"]


def test_well_known_sizes(oracle):
    # The values every VMM relies on; also checks the oracle itself.
    assert oracle["sizeof kvm_regs"] == 144
    assert oracle["sizeof kvm_sregs"] == 312
    assert oracle["sizeof kvm_run"] >= 2352


@pytest.mark.parametrize(
    "name,member", [(n, m) for n, members in OFFSETS.items() for m in members]
)
def test_member_offset_matches_kernel(oracle, name, member):
    assert _py_offset(STRUCTS[name], member) == oracle[f"offsetof {name}.{member}"]


def test_every_ioctl_is_checked():
    assert len(IOCTLS) == len(ioctls.IOCTL_NAMES) >= 20


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_header(oracle, name):
    assert getattr(ioctls, name) == oracle[f"ioctl {name}"], name


def test_flexible_array_helpers_lay_out_entries_after_header():
    msrs = s.make_msrs([(0x10, 5), (0x1A0, 1)])
    assert ctypes.sizeof(msrs) == ctypes.sizeof(s.kvm_msrs) + 2 * ctypes.sizeof(s.kvm_msr_entry)
    assert msrs.nmsrs == 2 and msrs.entries[1].index == 0x1A0 and msrs.entries[0].data == 5
    cpuid = s.make_cpuid2(7)
    assert cpuid.nent == 7
    assert type(cpuid).entries.offset == ctypes.sizeof(s.kvm_cpuid2)


def test_ioctl_error_names_the_request_and_errno():
    from pvhboot.errors import KvmError

    with pytest.raises(KvmError, match=r"KVM_GET_REGS failed: EBADF"):
        ioctls.ioctl(-1, ioctls.KVM_GET_REGS, s.kvm_regs())
