"""VM and vCPU bring-up on real KVM: what the setup writes reads back."""

from __future__ import annotations

import os

import pytest

from pvhboot.boot.cpu_state import long_mode_cpu_state, pvh_cpu_state
from pvhboot.errors import KvmError
from pvhboot.machine import vcpu as vcpu_mod
from pvhboot.machine import vm as vm_mod
from pvhboot.machine.memory import GuestMemory
from pvhtest import requires_kvm


def test_missing_kvm_device_is_one_actionable_line(monkeypatch, tmp_path):
    monkeypatch.setattr(vm_mod, "KVM_DEVICE", str(tmp_path / "kvm"))
    with pytest.raises(KvmError, match=r"does not exist: load the kvm module"):
        vm_mod.open_kvm()


def test_unopenable_kvm_device_says_why(monkeypatch, tmp_path):
    # A directory cannot be opened read-write: the message names the path.
    monkeypatch.setattr(vm_mod, "KVM_DEVICE", str(tmp_path))
    with pytest.raises(KvmError, match=str(tmp_path)):
        vm_mod.open_kvm()


@pytest.fixture
def vm():
    mem = GuestMemory(16 << 20)
    machine = vm_mod.Vm(memory=mem)
    yield machine
    machine.close()
    mem.close()


@requires_kvm
def test_vcpu_boot_state_reads_back(vm):
    cpu = vm.create_vcpu(0)
    state = pvh_cpu_state(0x101000, 0x3000, 0x1000, 0x1F)
    cpu.setup(state)

    regs = cpu.get_regs()
    assert (regs.rip, regs.rbx, regs.rflags) == (0x101000, 0x3000, 0x2)
    sregs = cpu.get_sregs()
    assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)
    assert (sregs.cr4, sregs.efer) == (0, 0)
    assert (sregs.cs.selector, sregs.cs.limit, sregs.cs.db, sregs.cs.type) == (0x8, 0xFFFFFFFF, 1, 0xB)
    assert (sregs.ss.selector, sregs.ds.selector) == (0x10, 0x10)
    assert (sregs.tr.selector, sregs.tr.limit, sregs.tr.s) == (0x18, 0x67, 0)
    assert (sregs.gdt.base, sregs.gdt.limit) == (0x1000, 0x1F)

    fpu = cpu.get_fpu()
    assert fpu.fcw == vcpu_mod.FPU_FCW_DEFAULT
    # Measured: the PVM backend reads MXCSR back as 0 through KVM_GET_FPU
    # whatever KVM_SET_FPU wrote; everywhere else it must read back.
    if not os.path.exists("/sys/module/kvm_pvm"):
        assert fpu.mxcsr == vcpu_mod.MXCSR_DEFAULT


@requires_kvm
def test_lapic_lint0_extint_lint1_nmi(vm):
    cpu = vm.create_vcpu(0)
    cpu.setup_lapic()
    import ctypes

    lapic = cpu.get_lapic()
    raw = ctypes.string_at(ctypes.addressof(lapic), ctypes.sizeof(lapic))

    def mode(reg):
        return (int.from_bytes(raw[reg : reg + 4], "little") >> 8) & 7

    assert mode(vcpu_mod.APIC_LVT_LINT0) == vcpu_mod.APIC_MODE_EXTINT
    assert mode(vcpu_mod.APIC_LVT_LINT1) == vcpu_mod.APIC_MODE_NMI


@requires_kvm
def test_boot_msrs_read_back(vm):
    cpu = vm.create_vcpu(0)
    cpu.setup_msrs()
    wanted = {i: v for i, v in vcpu_mod.BOOT_MSRS if i not in cpu.msr_failures}
    wanted.pop(vcpu_mod.MSR_IA32_TSC)  # it has ticked since
    got = cpu.get_msrs(list(wanted))
    for index, value in wanted.items():
        if index in got:
            assert got[index] == value, hex(index)
    assert got.get(vcpu_mod.MSR_MTRR_DEF_TYPE, vcpu_mod.MTRR_ENABLE | 6) == vcpu_mod.MTRR_ENABLE | 6


@requires_kvm
def test_cpuid_is_accepted_and_marks_a_hypervisor(vm):
    cpuid = vm.supported_cpuid()
    assert 0 < cpuid.nent <= 256
    cpu = vm.create_vcpu(0)
    cpu.setup_cpuid()  # KVM_SET_CPUID2 refuses malformed tables with EINVAL
    leaves = {cpuid.entries[i].function for i in range(cpuid.nent)}
    assert vcpu_mod.CPUID_LEAF_FEATURES in leaves


@requires_kvm
def test_long_mode_state_loads(vm):
    cpu = vm.create_vcpu(0)
    cpu.setup_cpuid()
    cpu.set_cpu_state(long_mode_cpu_state(0x1000200, 0x7000, 0x9000, 0x1000, 0x2F))
    sregs = cpu.get_sregs()
    assert sregs.efer & (1 << 10)  # LMA
    assert sregs.cs.l == 1 and sregs.cr3 == 0x9000
    assert cpu.get_regs().rsi == 0x7000


@requires_kvm
def test_vcpu_events_round_trip(vm):
    cpu = vm.create_vcpu(0)
    events = cpu.get_vcpu_events()
    cpu.set_vcpu_events(events)


@requires_kvm
def test_irq_line_drives_the_irqchip(vm):
    line = vm.irq_line(4)
    line.set(True)
    line.set(True)  # no change: no ioctl
    line.set(False)
    line.pulse()
    assert line.level is False


@requires_kvm
def test_memory_after_irqchip_still_works():
    mem = GuestMemory(8 << 20)
    machine = vm_mod.Vm()
    try:
        machine.set_memory(mem)
        assert machine.memory is mem
    finally:
        machine.close()
        mem.close()
