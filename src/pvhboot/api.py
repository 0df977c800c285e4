"""The Python API: ``Machine(kernel=...).run()`` boots a kernel and returns a RunResult.

The CLI (``pvhboot run``) is a thin layer over this, so library users never
need to shell out. Everything heavy is imported inside the methods: the
time from exec to the first guest instruction is part of what pvhboot
promises (issue 3), and a module imported here is paid for by every boot.

Example::

    from pvhboot import Machine
    result = Machine(kernel="vmlinux", cmdline="console=ttyS0", memory="128M",
                     timeout=60, stop_on=r"Run /init").run()
    print(result.reason, result.status, result.timeline)
"""

from __future__ import annotations

import sys

# Where the legacy devices live (the PC/AT I/O map; issue 3 "Devices").
SERIAL_PORT = 0x3F8  # COM1
SERIAL_PORTS = 8
SERIAL_IRQ = 4
I8042_PORT = 0x60  # data 0x60 ... command/status 0x64
I8042_PORTS = 5
DEBUG_EXIT_PORT = 0xF4  # QEMU isa-debug-exit's customary iobase
BOOT_TIMER_PORT = 0x3F0  # Firecracker's original boot-timer port; the guest writes 123

BOOTS = ("auto", "pvh", "linux")
# setitimer(2) takes seconds in a time_t; a year is beyond any boot and far
# from overflow.
MAX_TIMEOUT = 365 * 24 * 3600.0


class RunResult:
    """How a run ended.

    ``reason``: "reset", "poweroff", "debug-exit", "timeout", "console-match",
    or a fault ("triple-fault", "internal-error", "fail-entry", ...).
    ``status``: the CLI exit status for it. ``console``: the serial output, if
    captured. ``timeline``: phase -> seconds since "exec": the process's exec
    for the CLI, the call of ``run()`` for the API. ``message``: one line.
    ``detail``: a register dump for faults, else "". ``quirks_handled``: how
    many emulation failures the host-quirks layer stepped over.

    A plain class, not a dataclass: ``dataclasses`` costs milliseconds to
    import and to apply, on every boot.
    """

    __slots__ = (
        "reason",
        "status",
        "console",
        "timeline",
        "message",
        "unhandled_port_reads",
        "detail",
        "quirks_handled",
    )

    def __init__(
        self,
        reason: str,
        status: int,
        console: str = "",
        timeline: dict[str, float] | None = None,
        message: str = "",
        unhandled_port_reads: int = 0,
        detail: str = "",
        quirks_handled: int = 0,
    ) -> None:
        self.reason = reason
        self.status = status
        self.console = console
        self.timeline = {} if timeline is None else timeline
        self.message = message
        self.unhandled_port_reads = unhandled_port_reads
        self.detail = detail
        self.quirks_handled = quirks_handled

    def __repr__(self) -> str:
        return (
            f"RunResult(reason={self.reason!r}, status={self.status}, message={self.message!r}, "
            f"unhandled_port_reads={self.unhandled_port_reads}, console={len(self.console)} chars)"
        )


class Machine:
    """One guest: a kernel plus its boot options. ``plan()`` dry-runs, ``run()`` boots."""

    def __init__(
        self,
        kernel,
        initrd=None,
        cmdline: str = "",
        memory="128M",
        boot: str = "auto",
        timeout: float | None = None,
        console_log=None,
        capture_console: bool = True,
        echo_console: bool = False,
        host_quirks: bool = True,
        use_cache: bool = True,
        system_map=None,
        stop_on: str | None = None,
        quiet: bool = False,
    ) -> None:
        from .errors import UsageError
        from .machine.memory import parse_memory_size

        if boot not in BOOTS:
            raise UsageError(f"unknown boot path {boot!r}: use one of {', '.join(BOOTS)}")
        if timeout is not None:
            try:
                timeout = float(timeout)
            except (TypeError, ValueError):
                raise UsageError(f"timeout must be a number of seconds, not {timeout!r}") from None
            if not 0 < timeout < MAX_TIMEOUT:
                raise UsageError(
                    f"timeout must be more than 0 and less than {MAX_TIMEOUT:.0f} seconds, "
                    f"not {timeout}"
                )
        self.kernel = str(kernel)
        self.initrd = None if initrd is None else str(initrd)
        self.cmdline = cmdline or ""
        self.memory_size = parse_memory_size(memory)
        self.boot = boot
        self.timeout = timeout
        self.console_log = None if console_log is None else str(console_log)
        self.capture_console = capture_console
        self.echo_console = echo_console
        self.host_quirks = host_quirks
        self.use_cache = use_cache
        if system_map is not None:
            from .boot.prepare import readable_file

            system_map = readable_file(system_map, "System.map")
        self.system_map = system_map
        self.stop_on = stop_on
        if stop_on is not None:
            import re

            try:
                self._stop_re = re.compile(stop_on.encode() if isinstance(stop_on, str) else stop_on)
            except re.error as exc:
                raise UsageError(f"bad stop_on pattern {stop_on!r}: {exc}") from None
        else:
            self._stop_re = None
        self.quiet = quiet
        self.prepared = None
        self.quirks = None
        # CLI only: leave the VM open after run() for exit_leaving_teardown.
        self.defer_teardown = False
        self.timeline_from_exec = False  # the CLI sets it: phases count from exec
        self.gc_paused = False  # the CLI disables GC during setup; the run loop re-enables it
        # The CLI sets it: SIGTERM/SIGHUP end the run cleanly (the VM and the
        # terminal restored, temporaries removed) with exit status 128+signal.
        self.handle_signals = False
        self._open_vm = None
        self._open_fds = ()

    # --- planning --------------------------------------------------------------

    def _host_quirks(self):
        if self.quirks is None:
            from .machine.quirks import HostQuirks

            self.quirks = HostQuirks(enabled=self.host_quirks)
        return self.quirks

    def effective_cmdline(self) -> str:
        # The host-quirks suffix, unless the user's own clearcpuid= wins.
        return self._host_quirks().apply_cmdline(self.cmdline.strip())

    def prepare(self):
        """Choose the boot path and plan it (boot.prepare.prepare_boot); cached."""
        if self.prepared is None:
            from .boot.prepare import prepare_boot
            from .errors import BootError

            cmdline = self.effective_cmdline()
            try:
                self.prepared = prepare_boot(
                    self.kernel,
                    initrd=self.initrd,
                    cmdline=cmdline,
                    memory_size=self.memory_size,
                    boot=self.boot,
                    use_cache=self.use_cache,
                )
            except BootError as exc:
                added = len(cmdline.encode("utf-8", "replace")) - len(
                    self.cmdline.strip().encode("utf-8", "replace")
                )
                if str(exc).startswith("command line too long") and added > 0:
                    suffix = cmdline[len(self.cmdline.strip()) :].strip()
                    raise BootError(
                        f"{exc}; {added} of those bytes are pvhboot's host-quirks suffix "
                        f"{suffix!r} (--no-host-quirks drops it)"
                    ) from None
                raise
        return self.prepared

    def plan(self):
        """The BootPlan this machine would run (``pvhboot run --dry-run``)."""
        return self.prepare().plan

    # --- running ---------------------------------------------------------------

    def run(self) -> RunResult:
        """Boot the kernel and run until the guest stops, faults or times out.

        The timeout counts wall time from the start: of this call for the
        API, of the process for the CLI (the timeline's origin). pvhboot's
        stderr lines (host quirks, boot path) come only once everything is
        ready and the guest is about to start, so a bad input gives exactly
        one line: its error.
        """
        timeline = self._timeline()
        signals = _Signals(self.handle_signals, quiet=self.quiet)
        with signals:
            quirks = self._host_quirks()
            prepared = self.prepare()
            lines = []
            if not self.quiet:
                line = quirks.announce()
                if line:
                    lines.append(line)
                if getattr(prepared, "message", ""):
                    lines.append(prepared.message)
            return self.run_plan(
                prepared.plan,
                timeline=timeline,
                quirks=quirks,
                announce=lines,
                vmlinux=getattr(prepared, "vmlinux", None),
                signals=signals,
            )

    def _timeline(self):
        """Phases from the exec of this process (the CLI), or from this call (the API).

        In a long-lived Python process, time since exec says nothing about
        this boot; the CLI sets ``timeline_from_exec`` because there the
        start-up of pvhboot itself is part of what is measured.
        """
        from .machine.timeline import Timeline, now

        return Timeline() if self.timeline_from_exec else Timeline(start=now())

    def run_plan(
        self, plan, *, timeline=None, quirks=None, announce=(), vmlinux=None, signals=None
    ) -> RunResult:
        """Run a ready BootPlan (built by boot/ or by hand, as tests do).

        ``announce``: lines printed (with the "pvhboot: " prefix) right
        before the guest starts. ``vmlinux``: a CachedVmlinux the plan maps;
        its cleanup() runs as soon as the segments are mapped.
        """

        timeline = timeline or self._timeline()
        console = _Console(self)
        try:
            return _run(self, plan, timeline, console, quirks, announce, vmlinux, signals)
        finally:
            console.close()


class _Console:
    """Where serial output goes: stdout, a capture buffer, a log file, the stop pattern."""

    TAIL_MAX = 16384  # bytes of unfinished output kept for stop_on

    def __init__(self, machine: Machine) -> None:
        self.capture = bytearray() if machine.capture_console else None
        self.echo_fd = sys.stdout.fileno() if machine.echo_console else None
        self.log = _open_console_log(machine.console_log) if machine.console_log else None
        self.stop_re = machine._stop_re
        self.tail = bytearray()  # the current and previous line, for stop_on

    def out(self, data: bytes) -> None:
        if self.capture is not None:
            self.capture += data
        if self.echo_fd is not None:
            import os

            try:
                os.write(self.echo_fd, data)
            except BlockingIOError:
                pass
        if self.log is not None:
            self.log.write(data)
        if self.stop_re is not None:
            self.tail += data
            if self.stop_re.search(self.tail):
                from .devices.base import StopGuest

                raise StopGuest("console-match", 0)
            if b"\n" in data:
                # Keep the line just finished plus the new one: patterns are
                # matched within a line (or across one line break).
                lines = self.tail.split(b"\n")
                self.tail = bytearray(b"\n".join(lines[-2:]))
            if len(self.tail) > self.TAIL_MAX:
                # A guest that never ends its line must not make each search slower.
                del self.tail[: -self.TAIL_MAX // 2]

    def text(self) -> str:
        return self.capture.decode("utf-8", "replace") if self.capture is not None else ""

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def _run(
    machine: Machine, plan, timeline, console: _Console, quirks, announce, vmlinux, signals
) -> RunResult:
    from .machine.memory import GuestMemory
    from .machine.run_loop import RunControl, run_vcpu
    from .machine.vm import Vm

    mem = GuestMemory(plan.memory_size, plan.memory_map)
    vm = None
    try:
        vm = Vm(memory=mem)
        vcpu = vm.create_vcpu(0)
        timeline.mark("kvm-ready")
        mem.load_chunks(plan.chunks)
        timeline.mark("kernel-mapped")
        if vmlinux is not None:
            # A --no-cache temporary: the MAP_PRIVATE mappings keep its data,
            # so remove it now; a run killed later leaves nothing in /tmp.
            vmlinux.cleanup()
        vcpu.setup(plan.cpu)
        bus, serial = _make_bus(vm, console, timeline)
        control = RunControl()
        if machine.gc_paused:
            import gc

            gc.enable()  # a guest may run for minutes: collect cycles from here on
        host_input = console.echo_fd is not None and _stdin_worth_reading()
        for line in announce:
            print(f"pvhboot: {line}", file=sys.stderr)
        if signals is None:
            signals = _Signals(False)
        deadline = None if machine.timeout is None else timeline.start + machine.timeout
        with _Timeout(deadline, control, always=host_input), _host_console(
            host_input, serial, control
        ), signals.stopping(control):
            outcome = run_vcpu(
                vcpu,
                bus,
                mem,
                control=control,
                quirks=quirks if quirks is not None and getattr(quirks, "active", False) else None,
                system_map=machine.system_map,
                on_first_run=lambda: timeline.mark("first-kvm-run"),
            )
        timeline.mark("exit")
        if signals.signum is not None:
            from .machine.run_loop import Outcome

            outcome = Outcome(
                "signal", 128 + signals.signum, f"stopped by {_signal_name(signals.signum)}"
            )
        return RunResult(
            reason=outcome.reason,
            status=outcome.status,
            console=console.text(),
            timeline=timeline.as_dict(),
            message=outcome.message,
            unhandled_port_reads=bus.unhandled_port_reads,
            detail=outcome.detail,
            quirks_handled=getattr(vcpu, "quirks_handled", 0),
        )
    finally:
        if machine.defer_teardown and vm is not None:
            # The caller exits right away and lets the kernel tear the VM down
            # (see exit_leaving_teardown); closing here would cost that time.
            machine._open_vm = (vm, mem)
            machine._open_fds = (vm.kvm_fd, vm.fd, *(v.fd for v in vm.vcpus))
        else:
            if vm is not None:
                vm.close()
            mem.close()


def exit_leaving_teardown(status: int, keep_fds=()):
    """End this process now with ``status``, leaving the VM's teardown to a child.

    Closing a VM is synchronous in KVM and slow on some hosts (measured on
    this PVM host: 20-28 ms for a VM with an irqchip and a PIT, a third of a
    probe boot), and a process's exit waits for it. A forked child inherits
    the KVM file descriptors, waits until this process is gone (EOF on a
    pipe), and then exits, so the last reference, and the teardown, are
    its. The child keeps no terminal, no stdio and no descriptor but
    ``keep_fds`` (the VM's): whoever waits for our output sees EOF when we
    exit. Used by the CLI only; the API closes.
    """
    import atexit
    import os

    # os._exit skips atexit: run the handlers ourselves (the vmlinux cache
    # removes --no-cache temporaries there, the console restores the TTY).
    try:
        atexit._run_exitfuncs()
    except Exception:  # a failing handler must not change the guest's status
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        r, w = os.pipe()
        pid = os.fork()
    except OSError:
        os._exit(status)
    if pid == 0:  # child: hold the VM until the parent is gone
        try:
            os.close(w)
            os.setsid()  # out of the terminal's process group: no Ctrl-C, no SIGHUP
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            # Nothing but the VM's descriptors and the pipe: a caller's pipes
            # and files must see EOF / be released when we exit.
            keep = sorted({r, *keep_fds})
            low = 3
            for fd in keep:
                if fd > low:
                    os.closerange(low, fd)
                low = max(low, fd + 1)
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
            os.read(r, 1)
        finally:
            os._exit(0)
    os._exit(status)


def _make_bus(vm, console: _Console, timeline):
    from .devices.boot_timer import BootTimer
    from .devices.debug_exit import DebugExit
    from .devices.i8042 import I8042
    from .devices.serial import Serial16550
    from .machine.bus import Bus

    bus = Bus()
    serial = Serial16550(
        vm.irq_line(SERIAL_IRQ),
        console.out,
        on_first_byte=lambda _t: timeline.mark("first-serial-byte"),
    )
    bus.add_port_device(SERIAL_PORT, SERIAL_PORTS, serial)
    bus.add_port_device(I8042_PORT, I8042_PORTS, I8042())
    bus.add_port_device(DEBUG_EXIT_PORT, 1, DebugExit())
    bus.add_port_device(BOOT_TIMER_PORT, 1, BootTimer(lambda: timeline.mark("boot-timer")))
    return bus, serial


def _stdin_worth_reading() -> bool:
    """A terminal, pipe, socket or file on stdin; not /dev/null or a closed fd.

    Reading /dev/null would only start a thread (and import its machinery)
    to see EOF, which every scripted run and the benchmark would pay for.
    """
    import os
    import stat

    try:
        if os.isatty(0):
            return True
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)


class _host_console:
    """machine/console.Console (raw TTY + stdin reader) around the run, when wanted.

    The reader thread is started with SIGALRM blocked, so it inherits the
    mask and the timeout signal always lands on the vCPU (main) thread,
    where it interrupts KVM_RUN. Ctrl-A x asks the loop to stop and kicks
    the main thread out of KVM_RUN with that same signal.
    """

    def __init__(self, enabled: bool, serial, control) -> None:
        self.enabled = enabled
        self.serial = serial
        self.control = control
        self.console = None

    def __enter__(self):
        if not self.enabled:
            return self
        import signal
        import threading

        from .machine.console import Console

        main = threading.main_thread().ident

        def quit_() -> None:
            self.control.request_stop("quit")
            signal.pthread_kill(main, signal.SIGALRM)

        self.console = Console(self.serial.feed_input, on_quit=quit_)
        # SIGTERM/SIGHUP too: they must interrupt KVM_RUN in the main thread.
        old = signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM, signal.SIGHUP}
        )
        try:
            self.console.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return self

    def __exit__(self, *exc) -> None:
        if self.console is not None:
            self.console.stop()
            self.console = None


class _Timeout:
    """SIGALRM at the ``deadline``, then every 50 ms, until the loop notices.

    ``deadline`` is on the timeline's clock (CLOCK_BOOTTIME): the timeout is
    wall time from the start (of the process for the CLI), so slow set-up
    (a 1 TiB guest) counts against it. A deadline already past stops the
    run before the first KVM_RUN.

    The repeat covers the race where the signal lands just before KVM_RUN is
    entered; Python's handlers do not set SA_RESTART, so KVM_RUN returns
    EINTR. The handler only sets flags (RunControl.request_stop).
    """

    REPEAT = 0.05

    def __init__(self, deadline: float | None, control, *, always: bool = False) -> None:
        self.deadline = deadline
        self.seconds = deadline is not None
        self.control = control
        # ``always``: install the handler even without a timeout, so that
        # other threads can kick KVM_RUN with SIGALRM (console quit).
        self.active = self.seconds or always
        self.old = None

    def __enter__(self):
        if self.active:
            import signal
            import threading

            if threading.current_thread() is not threading.main_thread():
                from .errors import UsageError

                # Python installs signal handlers only from the main thread,
                # and the timer signal must interrupt KVM_RUN in this thread.
                raise UsageError(
                    "a timeout needs Machine.run() in the main thread: "
                    "call it there, or run without timeout"
                )
            self.old = signal.signal(signal.SIGALRM, self._fire)
            if self.seconds:
                from .machine.timeline import now

                left = self.deadline - now()
                if left <= 0:
                    self.control.request_stop("timeout")
                else:
                    signal.setitimer(signal.ITIMER_REAL, left, self.REPEAT)
        return self

    def _fire(self, signum, frame) -> None:
        # A kick from the console thread has already set its own reason;
        # request_stop keeps the first one.
        if self.seconds:
            self.control.request_stop("timeout")

    def __exit__(self, *exc) -> None:
        if self.active:
            import signal

            if self.seconds:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, self.old)


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Signals:
    """SIGTERM/SIGHUP handlers for the whole of ``run()`` (CLI only).

    While the vCPU runs (``stopping``), a signal asks the loop to stop; the
    run then returns with status 128+signal and everything is torn down as
    on any other ending. Before or after that, the handler raises
    SystemExit(128+signal), so ``finally`` blocks and atexit handlers
    (temporary files, the terminal) still run. Without handlers the default
    action would kill the process with none of that.
    """

    def __init__(self, enabled: bool, *, quiet: bool = True) -> None:
        # Off the main thread signal.signal raises ValueError: then no handlers.
        self.enabled = enabled
        self.quiet = quiet
        self.old = {}
        self.control = None
        self.signum = None

    def __enter__(self):
        if self.enabled:
            # _signal, not signal: the latter builds its enums on import (about
            # 1 ms with enum itself), which a run without --timeout never paid.
            import _signal

            for sig in (_signal.SIGTERM, _signal.SIGHUP):
                try:
                    self.old[sig] = _signal.signal(sig, self._on_signal)
                except (OSError, ValueError):
                    pass
        return self

    def __exit__(self, *exc) -> None:
        if self.old:
            import _signal

            for sig, old in self.old.items():
                _signal.signal(sig, old)
            self.old = {}

    def _on_signal(self, signum, frame) -> None:
        if self.control is not None:
            if self.signum is None:
                self.signum = signum
            self.control.request_stop("signal")
            return
        if not self.quiet:  # the same line a signal during the run gets
            import sys

            sys.stderr.write(f"pvhboot: stopped by {_signal_name(signum)}\n")
        raise SystemExit(128 + signum)

    def stopping(self, control):
        return _SignalsStopping(self, control)


class _SignalsStopping:
    def __init__(self, signals: _Signals, control) -> None:
        self.signals = signals
        self.control = control

    def __enter__(self):
        self.signals.control = self.control
        return self

    def __exit__(self, *exc) -> None:
        self.signals.control = None


def _open_console_log(path: str):
    """The console log, opened for writing; else BootError, one line."""
    from .errors import BootError

    try:
        return open(path, "wb")  # noqa: SIM115  (closed by _Console.close)
    except OSError as exc:
        raise BootError(
            f"cannot write the console log {path}: {exc.strerror or exc}; "
            "give a writable file path"
        ) from None
