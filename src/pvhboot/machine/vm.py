"""A KVM virtual machine: the /dev/kvm handle, the VM fd, its memory slots,
the in-kernel interrupt controllers and timer, and interrupt lines for devices.

Everything here is one ioctl deep: the structures and numbers live in
``pvhboot.kvm``; this module only sequences them the way an x86 VM needs.
"""

from __future__ import annotations

import os

from ..errors import KvmError
from ..kvm import ioctls as k
from ..kvm import structs as s

KVM_DEVICE = "/dev/kvm"

# Intel VMX needs a three-page TSS and a one-page identity-mapped page table
# for real mode / unpaged protected mode; both must lie in guest-physical
# space that is neither RAM nor MMIO we use. Just below the 4 GiB BIOS ROM
# area is where every x86 VMM puts them (Documentation/virt/kvm/api.rst,
# KVM_SET_TSS_ADDR and KVM_SET_IDENTITY_MAP_ADDR). Other backends ignore them.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


def open_kvm() -> int:
    """Open /dev/kvm and check the API version; one actionable line on failure."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmError(
            f"{KVM_DEVICE} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
            "or run on a host with KVM"
        ) from None
    except PermissionError:
        raise KvmError(
            f"no permission to open {KVM_DEVICE}: add yourself to its group "
            "(usually 'kvm') or run as root"
        ) from None
    except OSError as exc:
        raise KvmError(f"cannot open {KVM_DEVICE}: {exc.strerror}") from None
    version = k.ioctl(fd, k.KVM_GET_API_VERSION)
    if version != k.KVM_API_VERSION:
        os.close(fd)
        raise KvmError(
            f"{KVM_DEVICE} speaks KVM API version {version}, pvhboot needs "
            f"{k.KVM_API_VERSION}: use a Linux kernel from 2.6.22 or later"
        )
    return fd


class KvmIrqLine:
    """An IrqLine (devices/base.py) wired to one in-kernel irqchip input.

    On the in-kernel PIC and IOAPIC, ISA lines 0-15 are shared by both, so
    asserting GSI 4 reaches the PIC's IRQ 4 and IOAPIC pin 4 at once; the
    guest uses whichever it programmed.
    """

    __slots__ = ("_fd", "_level", "gsi", "level")

    def __init__(self, vm_fd: int, gsi: int) -> None:
        self._fd = vm_fd
        self.gsi = gsi
        self.level = False
        self._level = s.kvm_irq_level()
        self._level.irq = gsi

    def set(self, level: bool) -> None:
        level = bool(level)
        if level == self.level:
            return
        self.level = level
        self._level.level = int(level)
        k.ioctl(self._fd, k.KVM_IRQ_LINE, self._level)

    def pulse(self) -> None:
        # An edge for the PIC: raise then lower. Leaves the line low.
        self._level.level = 1
        k.ioctl(self._fd, k.KVM_IRQ_LINE, self._level)
        self._level.level = 0
        k.ioctl(self._fd, k.KVM_IRQ_LINE, self._level)
        self.level = False


class Vm:
    """A VM with an in-kernel irqchip and PIT, ready for memory and vCPUs.

    ``Vm()`` opens /dev/kvm itself; pass ``kvm_fd`` to share one handle.
    Pass ``memory`` (a GuestMemory) to register it before the irqchip exists,
    which is much cheaper than :meth:`set_memory` afterwards.
    Close with :meth:`close` (or use it as a context manager): vCPUs first,
    then the VM, then /dev/kvm.
    """

    def __init__(self, kvm_fd: int | None = None, *, memory=None, pit: bool = True) -> None:
        self.kvm_fd = open_kvm() if kvm_fd is None else kvm_fd
        self._own_kvm_fd = kvm_fd is None
        self.fd = -1
        self.vcpus: list = []
        self.memory = None
        try:
            self.fd = k.ioctl(self.kvm_fd, k.KVM_CREATE_VM, 0)
            k.ioctl(self.fd, k.KVM_SET_TSS_ADDR, TSS_ADDR)
            ident = s.u64(IDENTITY_MAP_ADDR)
            k.ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, ident)
            # Memory before the irqchip: once the irqchip exists, the first
            # memslot change waits for an SRCU grace period (measured here:
            # 4-7 ms against 0.1 ms), which is a third of a probe's boot.
            if memory is not None:
                self.set_memory(memory)
            # PIC + IOAPIC + per-vCPU LAPIC in the kernel: HLT, interrupt
            # delivery and EOIs then never leave the kernel.
            k.ioctl(self.fd, k.KVM_CREATE_IRQCHIP)
            if pit:
                # The PIT on IRQ 0 (Linux calibrates against it). Port 0x61's
                # speaker bit is emulated as a dummy so its reads never exit.
                cfg = s.kvm_pit_config()
                cfg.flags = s.KVM_PIT_SPEAKER_DUMMY
                k.ioctl(self.fd, k.KVM_CREATE_PIT2, cfg)
        except BaseException:
            self.close()
            raise

    # --- memory ----------------------------------------------------------------

    def set_memory(self, memory) -> None:
        """Register every slot of a machine.memory.GuestMemory with KVM."""
        region = s.kvm_userspace_memory_region()
        for slot in memory.slots:
            region.slot = slot.slot
            region.flags = 0
            region.guest_phys_addr = slot.guest_addr
            region.memory_size = slot.size
            region.userspace_addr = memory.host_addr + slot.host_offset
            k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)
        self.memory = memory

    # --- interrupts ------------------------------------------------------------

    def irq_line(self, gsi: int) -> KvmIrqLine:
        return KvmIrqLine(self.fd, gsi)

    # --- vCPUs -----------------------------------------------------------------

    def vcpu_mmap_size(self) -> int:
        return k.ioctl(self.kvm_fd, k.KVM_GET_VCPU_MMAP_SIZE)

    def create_vcpu(self, index: int = 0):
        from .vcpu import Vcpu

        vcpu = Vcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until the kernel's list fits."""
        import errno

        capacity = 128  # 75 entries here; the kernel caps the list at 256
        while True:
            cpuid = s.make_cpuid2(capacity)
            try:
                k.ioctl(self.kvm_fd, k.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except KvmError as exc:
                if getattr(exc, "errno", None) != errno.E2BIG or capacity >= 4096:
                    raise
                capacity *= 2

    def check_extension(self, cap: int) -> int:
        return k.ioctl(self.kvm_fd, k.KVM_CHECK_EXTENSION, cap)

    # --- teardown --------------------------------------------------------------

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._own_kvm_fd and self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
