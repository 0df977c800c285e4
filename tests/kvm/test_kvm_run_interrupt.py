"""KVM_RUN's interruption contract, which --timeout and Ctrl-C rely on:
with kvm_run.immediate_exit set, KVM_RUN returns EINTR at once, and the
ioctl wrapper reports it as a KvmError carrying errno and the ioctl name."""

from __future__ import annotations

import errno

import pytest

from pvhboot.errors import KvmError
from pvhboot.kvm import ioctls as k
from pvhtest import requires_kvm


@requires_kvm
def test_immediate_exit_makes_kvm_run_return_eintr():
    from pvhboot.machine.memory import GuestMemory
    from pvhboot.machine.vm import Vm

    mem = GuestMemory(4 << 20)
    vm = Vm(memory=mem)
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.kvm_run.immediate_exit = 1
        with pytest.raises(KvmError, match=r"KVM_RUN failed: EINTR") as info:
            k.ioctl(vcpu.fd, k.KVM_RUN, 0)
        # (exit_reason is not set on this path: KVM returns before entering)
        assert info.value.errno == errno.EINTR
    finally:
        vm.close()
        mem.close()


@requires_kvm
def test_run_loop_turns_a_stop_request_into_its_outcome():
    from pvhboot.machine.bus import Bus
    from pvhboot.machine.memory import GuestMemory
    from pvhboot.machine.run_loop import RunControl, run_vcpu
    from pvhboot.machine.vm import Vm

    mem = GuestMemory(4 << 20)
    vm = Vm(memory=mem)
    try:
        vcpu = vm.create_vcpu(0)
        control = RunControl()
        control.request_stop("timeout")  # as the SIGALRM handler does
        outcome = run_vcpu(vcpu, Bus(), mem, control=control)
        assert (outcome.reason, outcome.status) == ("timeout", 124)
        assert vcpu.kvm_run.immediate_exit == 0  # cleared for whoever runs next
    finally:
        vm.close()
        mem.close()
