"""One KVM vCPU: its fd, the shared ``kvm_run`` page, and the boot-time state.

Setup order follows what the in-kernel model expects: CPUID first (it
decides which MSRs and LAPIC features exist), then MSRs, the LAPIC, the FPU,
and last the registers of the boot protocol (a BootPlan's CpuState).
"""

from __future__ import annotations

import ctypes
import os

from ..errors import KvmError
from ..kvm import ioctls as k
from ..kvm import structs as s

# --- CPUID (Intel SDM vol. 2A, CPUID; Documentation/virt/kvm/x86/cpuid.rst) ---
CPUID_LEAF_FEATURES = 0x1
CPUID_1_ECX_HYPERVISOR = 1 << 31  # "running under a hypervisor", read by Linux
CPUID_LEAF_EXT_TOPOLOGY = 0xB
CPUID_LEAF_EXT_TOPOLOGY_V2 = 0x1F
KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"  # ebx, ecx, edx of leaf 0x40000000
KVM_CPUID_FEATURES = 0x4000_0001

# --- MSRs (Intel SDM vol. 4) --------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0  # firmware normally enables rep movs/stos fast strings
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6  # no firmware programs MTRRs here: default all RAM to write-back
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

BOOT_MSRS = (
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
)

# --- Local APIC (Intel SDM vol. 3A, 11.5.1 Local Vector Table) ----------------
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_SHIFT = 8
APIC_DELIVERY_MODE_MASK = 0x7 << APIC_DELIVERY_MODE_SHIFT
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7  # LINT0 passes the 8259 PIC's INTR through, as on a PC

# --- FPU reset values (Intel SDM vol. 1, 8.1.5 and 10.2.3) --------------------
FPU_FCW_DEFAULT = 0x37F  # all x87 exceptions masked, extended precision
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked, round to nearest

_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class Vcpu:
    """A vCPU of ``vm``; ``run()`` enters the guest once (KVM_RUN)."""

    def __init__(self, vm, index: int = 0) -> None:
        from .memory import MAP_FAILED, PROT_READ, PROT_WRITE, _mmap, _munmap

        self._munmap = _munmap
        self.vm = vm
        self.index = index
        self.fd = k.ioctl(vm.fd, k.KVM_CREATE_VCPU, index)
        self.run_size = vm.vcpu_mmap_size()
        MAP_SHARED = 0x01
        addr = _mmap(None, self.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            os.close(self.fd)
            raise KvmError(f"cannot map the vCPU's kvm_run area: {os.strerror(err)}")
        self.run_addr = addr
        self.kvm_run = s.kvm_run.from_address(addr)
        # A byte view of the whole area: port I/O data lives at data_offset.
        self.run_view = memoryview((ctypes.c_ubyte * self.run_size).from_address(addr)).cast("B")
        self.msr_failures: list[int] = []

    # --- the one hot call ----------------------------------------------------

    def run(self) -> int:
        """KVM_RUN; returns exit_reason. EINTR propagates as KvmError(errno=EINTR)."""
        k.ioctl(self.fd, k.KVM_RUN, 0)
        return self.kvm_run.exit_reason

    # --- register access (names fixed by TEAM.md; quirks.py calls these) -----

    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        k.ioctl(self.fd, k.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        k.ioctl(self.fd, k.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        k.ioctl(self.fd, k.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        k.ioctl(self.fd, k.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        k.ioctl(self.fd, k.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        k.ioctl(self.fd, k.KVM_SET_FPU, fpu)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        k.ioctl(self.fd, k.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        k.ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, events)

    def get_lapic(self) -> s.kvm_lapic_state:
        lapic = s.kvm_lapic_state()
        k.ioctl(self.fd, k.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        k.ioctl(self.fd, k.KVM_SET_LAPIC, lapic)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = s.make_msrs([(i, 0) for i in indices])
        n = k.ioctl(self.fd, k.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    # --- boot-time setup -----------------------------------------------------

    def setup(self, cpu) -> None:
        """Everything a boot vCPU needs, ending with ``cpu`` (a boot.plan.CpuState)."""
        self.setup_cpuid()
        self.setup_msrs()
        self.setup_lapic()
        self.setup_fpu()
        self.set_cpu_state(cpu)

    def setup_cpuid(self) -> None:
        cpuid = self.vm.supported_cpuid()
        for i in range(cpuid.nent):
            e = cpuid.entries[i]
            if e.function == CPUID_LEAF_FEATURES:
                e.ecx |= CPUID_1_ECX_HYPERVISOR
                # EBX[31:24] is the initial APIC ID.
                e.ebx = (e.ebx & 0x00FF_FFFF) | ((self.index & 0xFF) << 24)
            elif e.function in (CPUID_LEAF_EXT_TOPOLOGY, CPUID_LEAF_EXT_TOPOLOGY_V2):
                e.edx = self.index  # x2APIC ID of this vCPU, per sub-leaf
            elif e.function == KVM_CPUID_SIGNATURE:
                # Linux finds kvm-clock through this signature; make sure it
                # is KVM's whatever the backend reported.
                e.ebx, e.ecx, e.edx = (
                    int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8)
                )
                e.eax = max(e.eax, KVM_CPUID_FEATURES)
        k.ioctl(self.fd, k.KVM_SET_CPUID2, cpuid)

    def setup_msrs(self) -> None:
        """Write BOOT_MSRS; an MSR the backend refuses is recorded, not fatal."""
        pending = list(BOOT_MSRS)
        while pending:
            msrs = s.make_msrs(pending)
            done = k.ioctl(self.fd, k.KVM_SET_MSRS, msrs)
            if done >= len(pending):
                break
            # KVM stops at the first MSR it rejects; skip it and go on.
            self.msr_failures.append(pending[done][0])
            pending = pending[done + 1 :]

    def setup_lapic(self) -> None:
        lapic = self.get_lapic()
        # Not ``lapic.regs``: ctypes turns a c_char array into bytes cut at the first NUL.
        regs = bytearray(ctypes.string_at(ctypes.addressof(lapic), ctypes.sizeof(lapic)))
        for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            value = int.from_bytes(regs[reg : reg + 4], "little")
            value = (value & ~APIC_DELIVERY_MODE_MASK) | (mode << APIC_DELIVERY_MODE_SHIFT)
            regs[reg : reg + 4] = value.to_bytes(4, "little")
        ctypes.memmove(ctypes.addressof(lapic), bytes(regs), len(regs))
        self.set_lapic(lapic)

    def setup_fpu(self) -> None:
        fpu = s.kvm_fpu()
        fpu.fcw = FPU_FCW_DEFAULT
        fpu.mxcsr = MXCSR_DEFAULT
        self.set_fpu(fpu)

    def set_cpu_state(self, cpu) -> None:
        """Load a boot.plan.CpuState: sregs (segments, tables, control regs), then GPRs."""
        sregs = self.get_sregs()
        for name in _SEGMENT_NAMES:
            seg = getattr(cpu, name, None)
            if seg is not None:
                _fill_segment(getattr(sregs, name), seg)
        sregs.gdt.base = cpu.gdt_base
        sregs.gdt.limit = cpu.gdt_limit
        sregs.idt.base = cpu.idt_base
        sregs.idt.limit = cpu.idt_limit
        sregs.cr0 = cpu.cr0
        sregs.cr3 = cpu.cr3
        sregs.cr4 = cpu.cr4
        sregs.efer = cpu.efer
        self.set_sregs(sregs)

        regs = s.kvm_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags"):
            setattr(regs, name, getattr(cpu, name))
        self.set_regs(regs)

    # --- teardown ------------------------------------------------------------

    def close(self) -> None:
        if self.run_addr:
            self.run_view.release()
            self.kvm_run = None
            self._munmap(self.run_addr, self.run_size)
            self.run_addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fill_segment(dst: s.kvm_segment, seg) -> None:
    dst.base = seg.base
    dst.limit = seg.limit
    dst.selector = seg.selector
    dst.type = seg.type
    dst.present = seg.present
    dst.dpl = seg.dpl
    dst.db = seg.db
    dst.s = seg.s
    dst.l = seg.l
    dst.g = seg.g
    dst.avl = seg.avl
    dst.unusable = seg.unusable
