"""A stand-in vCPU for the host-quirk tests (test_quirks*.py).

It holds copies of the kvm register structs, as KVM would between ioctls, so
a test sees exactly what the quirk layer computed and wrote back; ``calls``
records which setters ran.
"""

from __future__ import annotations

import ctypes

from pvhboot.kvm.structs import kvm_fpu


class FakeVcpu:
    """Holds copies of the register structs, as KVM would between ioctls."""

    def __init__(self, regs, sregs, fpu=None):
        self.regs, self.sregs = regs, sregs
        self.fpu = fpu or kvm_fpu()
        self.calls: list[str] = []

    @staticmethod
    def _copy(obj):
        new = type(obj)()
        ctypes.pointer(new)[0] = obj
        return new

    def get_regs(self):
        return self._copy(self.regs)

    def set_regs(self, r):
        self.calls.append("set_regs")
        self.regs = self._copy(r)

    def get_sregs(self):
        return self._copy(self.sregs)

    def set_sregs(self, s):
        self.calls.append("set_sregs")
        self.sregs = self._copy(s)

    def get_fpu(self):
        return self._copy(self.fpu)

    def set_fpu(self, f):
        self.calls.append("set_fpu")
        self.fpu = self._copy(f)
