"""The vCPU exit loop: KVM_RUN, decode why the guest stopped, dispatch, repeat.

The loop runs in the main thread so that a timer signal (``--timeout``) or
Ctrl-C interrupts KVM_RUN with EINTR. It ends with an :class:`Outcome`:
a device asked to stop (reset, power-off, debug exit, console match), the
guest did something the VMM cannot continue from (triple fault, entry
failure, an instruction the backend cannot emulate), or the time ran out.
"""

from __future__ import annotations

import ctypes
import errno as _errno

from ..devices.base import StopGuest
from ..errors import KvmError
from ..kvm import ioctls as k
from ..kvm import structs as s

# CLI exit statuses (TEAM.md): 0 reset/poweroff, 124 timeout (coreutils
# timeout(1) convention), 1 for a VMM or guest fault.
STATUS_OK = 0
STATUS_FAULT = 1
STATUS_TIMEOUT = 124


class Outcome:
    """Why the run ended: a short ``reason`` word, the exit ``status``, a message."""

    __slots__ = ("reason", "status", "message", "detail")

    def __init__(self, reason: str, status: int, message: str = "", detail: str = "") -> None:
        self.reason = reason
        self.status = status
        self.message = message  # one line for the user
        self.detail = detail  # optional multi-line dump (registers)

    def __repr__(self) -> str:
        return f"Outcome({self.reason!r}, {self.status}, {self.message!r})"


class RunControl:
    """Flags set from outside the loop (signal handlers, timers).

    Setting ``stop`` also sets the vCPU's ``immediate_exit`` so that a
    KVM_RUN entered after the signal returns at once instead of running on.
    """

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self._runs: list = []

    def attach(self, vcpu) -> None:
        self._runs.append(vcpu.kvm_run)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        for run in self._runs:
            if run is not None:
                run.immediate_exit = 1


def run_vcpu(vcpu, bus, mem, *, control=None, quirks=None, system_map=None, on_first_run=None):
    """Run ``vcpu`` until something ends the run; returns an Outcome."""
    run = vcpu.kvm_run
    view = vcpu.run_view
    fd = vcpu.fd
    control = control or RunControl()
    control.attach(vcpu)
    ioctl = k._libc_ioctl
    req_run = ctypes.c_ulong(k.KVM_RUN)
    io = run.io
    pio_read = bus.pio_read
    pio_write = bus.pio_write
    EXIT_IO = s.KVM_EXIT_IO
    IO_OUT = s.KVM_EXIT_IO_OUT
    if on_first_run is not None:
        on_first_run()
    try:
        while True:
            if control.stop_reason is not None:
                return _stopped(control)
            if ioctl(fd, req_run, 0) < 0:
                err = ctypes.get_errno()
                if err == _errno.EINTR or err == _errno.EAGAIN:
                    continue  # a signal: the top of the loop decides
                raise k._error(k.KVM_RUN, err)
            reason = run.exit_reason
            if reason == EXIT_IO:
                size = io.size
                port = io.port
                off = io.data_offset
                if io.direction == IO_OUT:
                    for _ in range(io.count):
                        pio_write(port, size, int.from_bytes(view[off : off + size], "little"))
                        off += size
                else:
                    for _ in range(io.count):
                        value = pio_read(port, size) & ((1 << (8 * size)) - 1)
                        view[off : off + size] = value.to_bytes(size, "little")
                        off += size
                continue
            outcome = _slow_exit(reason, run, vcpu, bus, mem, quirks, system_map)
            if outcome is not None:
                return outcome
    except StopGuest as stop:
        return Outcome(stop.reason, stop.status, _stop_message(stop))
    finally:
        run.immediate_exit = 0


def _stopped(control) -> Outcome:
    reason = control.stop_reason
    if reason == "timeout":
        return Outcome("timeout", STATUS_TIMEOUT, "the guest was stopped by --timeout")
    if reason == "quit":
        return Outcome("quit", STATUS_OK, "quit from the console (Ctrl-A x)")
    return Outcome(reason, STATUS_FAULT, f"the run was stopped ({reason})")


def _stop_message(stop: StopGuest) -> str:
    if stop.reason == "debug-exit":
        # QEMU's isa-debug-exit arithmetic: (value << 1) | 1, cut to 8 bits.
        return f"the guest ended the run through the debug-exit port: status {stop.status}"
    if stop.reason == "console-match":
        return "the console matched the stop pattern"
    return f"the guest ended the run ({stop.reason})"


def _slow_exit(reason, run, vcpu, bus, mem, quirks, system_map):
    """Everything but port I/O: rare exits, kept out of the hot loop."""
    if reason == s.KVM_EXIT_MMIO:
        mmio = run.mmio
        size = mmio.len
        if mmio.is_write:
            value = int.from_bytes(bytes(mmio.data)[:size], "little")
            bus.mmio_write(mmio.phys_addr, size, value)
        else:
            value = bus.mmio_read(mmio.phys_addr, size) & ((1 << (8 * size)) - 1)
            ctypes.memmove(mmio.data, value.to_bytes(size, "little"), size)
        return None
    if reason == s.KVM_EXIT_INTR:
        return None  # the loop top looks at the stop flags
    if reason == s.KVM_EXIT_IRQ_WINDOW_OPEN:
        return None
    if reason == s.KVM_EXIT_HLT:
        # With the in-kernel LAPIC a HLT sleeps in the kernel until an
        # interrupt; it reaches us only if the guest can never wake up.
        return Outcome(
            "halt", STATUS_FAULT, "the guest halted (HLT) with nothing to wake it", _dump(vcpu)
        )
    if reason == s.KVM_EXIT_SHUTDOWN:
        from .diagnose import shutdown_message

        return Outcome(
            "triple-fault",
            STATUS_FAULT,
            shutdown_message(_rip(vcpu), _symbols(system_map)),
            _dump(vcpu),
        )
    if reason == s.KVM_EXIT_FAIL_ENTRY:
        from .diagnose import fail_entry_message

        fe = run.fail_entry
        return Outcome(
            "fail-entry",
            STATUS_FAULT,
            fail_entry_message(fe.hardware_entry_failure_reason, fe.cpu),
            _dump(vcpu),
        )
    if reason == s.KVM_EXIT_INTERNAL_ERROR:
        return _internal_error(run, vcpu, mem, quirks, system_map)
    if reason == s.KVM_EXIT_SYSTEM_EVENT:
        kind = run.system_event.type
        if kind == s.KVM_SYSTEM_EVENT_SHUTDOWN:
            return Outcome("poweroff", STATUS_OK, "the guest powered off")
        if kind == s.KVM_SYSTEM_EVENT_RESET:
            return Outcome("reset", STATUS_OK, "the guest reset itself")
        if kind == s.KVM_SYSTEM_EVENT_CRASH:
            return Outcome("crash", STATUS_FAULT, "the guest reported a crash", _dump(vcpu))
        return Outcome("system-event", STATUS_FAULT, f"unknown KVM system event {kind}")
    name = s.EXIT_REASON_NAMES.get(reason, str(reason))
    return Outcome(
        "kvm-exit",
        STATUS_FAULT,
        f"unexpected KVM exit KVM_EXIT_{name} {_where(vcpu, system_map)}".rstrip(),
        _dump(vcpu),
    )


def _internal_error(run, vcpu, mem, quirks, system_map):
    sub = run.internal.suberror
    if quirks is not None and sub == s.KVM_INTERNAL_ERROR_EMULATION:
        handled = quirks.handle_internal_error(vcpu, mem)
        if handled:
            quirks_handled = getattr(vcpu, "quirks_handled", 0) + 1
            vcpu.quirks_handled = quirks_handled
            return None
    from .diagnose import internal_error_message

    internal = run.internal
    data = tuple(internal.data[: min(internal.ndata, len(internal.data))])
    message = internal_error_message(
        sub,
        data,
        rip=_rip(vcpu),
        insn=_decode(run, vcpu, mem),
        symbols=_symbols(system_map),
        quirks_active=bool(quirks is not None and getattr(quirks, "active", False)),
    )
    return Outcome("internal-error", STATUS_FAULT, message, _dump(vcpu))


def _decode(run, vcpu, mem) -> str:
    try:
        sregs = vcpu.get_sregs()
        regs = vcpu.get_regs()
    except KvmError:
        return "(registers unavailable)"
    try:
        from . import diagnose

        return diagnose.decode_at(mem, sregs, regs.rip)
    except Exception:  # a missing decoder must never hide the real error
        pass
    ef = run.emulation_failure
    if ef.flags & s.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES and ef.insn_size:
        return "bytes " + bytes(ef.insn_bytes)[: ef.insn_size].hex(" ")
    return "(instruction not decoded)"


def _where(vcpu, system_map) -> str:
    from .diagnose import where

    return where(_rip(vcpu), _symbols(system_map))


def _rip(vcpu) -> int | None:
    try:
        return vcpu.get_regs().rip
    except KvmError:
        return None


def _symbols(system_map):
    """The --system-map symbols, or None: a bad map must never hide the real error."""
    if not system_map:
        return None
    try:
        from .diagnose import SymbolMap

        return SymbolMap.load(system_map)
    except Exception:
        return None


def _dump(vcpu) -> str:
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except KvmError:
        return ""
    from .diagnose import register_dump

    return register_dump(regs, sregs)
