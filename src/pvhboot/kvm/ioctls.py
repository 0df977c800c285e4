"""KVM ioctl request numbers, computed from the _IOC encoding, and a wrapper.

<asm-generic/ioctl.h>: a request is dir << 30 | size << 16 | type << 8 | nr,
with 2 bits of direction, 14 of argument size, 8 of type and 8 of number.
KVM's type byte is KVMIO = 0xAE (<linux/kvm.h>). Computing the numbers from
the structure sizes means a wrong struct mirror shows up as EINVAL/ENOTTY
instead of silently corrupting memory, and the test compares each number
with the one the C header computes.
"""

from __future__ import annotations

import ctypes

from ..errors import KvmError
from . import structs as s

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, KVMIO, nr, 0)


def _IOR(nr: int, ctype) -> int:
    return _IOC(_IOC_READ, KVMIO, nr, ctypes.sizeof(ctype))


def _IOW(nr: int, ctype) -> int:
    return _IOC(_IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


def _IOWR(nr: int, ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


# ioctls on the /dev/kvm system fd
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, s.kvm_cpuid2)

# ioctls on a VM fd
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, s.kvm_irq_level)
KVM_CREATE_PIT2 = _IOW(0x77, s.kvm_pit_config)

# ioctls on a vCPU fd
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, s.kvm_regs)
KVM_SET_REGS = _IOW(0x82, s.kvm_regs)
KVM_GET_SREGS = _IOR(0x83, s.kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, s.kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, s.kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, s.kvm_msrs)
KVM_GET_FPU = _IOR(0x8C, s.kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, s.kvm_cpuid2)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, s.kvm_vcpu_events)

# KVM_CHECK_EXTENSION capabilities used here (<linux/kvm.h> KVM_CAP_*).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IMMEDIATE_EXIT = 136

KVM_API_VERSION = 12

IOCTL_NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and not name.startswith(("KVM_CAP_", "KVM_API"))
}


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg=0) -> int:
    """ioctl(2) that raises KvmError naming the request and the errno.

    ``arg`` is an int or a ctypes object (passed by reference, so the kernel
    fills it in place). Returns the ioctl's non-negative result. ctypes
    releases the GIL during the call, so a blocking KVM_RUN does not stall
    other threads, and EINTR is reported (as KvmError with ``errno``) rather
    than retried, which is what the timeout machinery relies on.
    """
    if isinstance(arg, int):
        ret = _libc_ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg))
    else:
        ret = _libc_ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg))
    if ret < 0:
        raise _error(request, ctypes.get_errno())
    return ret


def _error(request: int, err: int) -> KvmError:
    import errno as _errno
    import os

    name = IOCTL_NAMES.get(request, hex(request))
    code = _errno.errorcode.get(err, str(err))
    exc = KvmError(f"{name} failed: {code} ({os.strerror(err)})")
    exc.errno = err
    return exc
