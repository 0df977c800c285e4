"""`pvhboot run`: boot a kernel on KVM (PVH, or the Linux 64-bit protocol).

``register`` only declares arguments: ``pvhboot.cli`` imports every command
to build its parser, and this module is on the boot path, so nothing heavy
is imported at module level. ``run`` hands everything to ``pvhboot.api``.
"""


# Endings that are not failures; their message is printed only when not --quiet.
_NOT_FAULTS = ("reset", "poweroff", "console-match", "debug-exit", "timeout", "quit")


def register(sub):
    p = sub.add_parser(
        "run",
        help="boot a kernel on KVM",
        description="Boot a kernel (ELF vmlinux or bzImage) on KVM, with a serial console on "
        "stdout. Exit status: 0 when the guest resets or powers off, the debug-exit code "
        "when it writes port 0xf4, 124 on --timeout, 1 on a fault, 130 on Ctrl-C. On a "
        "terminal, keys go to the guest; Ctrl-A x quits (status 0).",
    )
    p.add_argument("--kernel", required=True, metavar="PATH", help="vmlinux or bzImage")
    p.add_argument("--initrd", metavar="PATH", help="initramfs (module 0 / ramdisk)")
    p.add_argument("--cmdline", default="", metavar="STR", help="kernel command line")
    p.add_argument(
        "--memory", default="128M", metavar="SIZE", help="guest RAM (default 128M)"
    )
    # --memory, --timeout and --boot are checked by Machine, which raises a
    # one-line UsageError (exit 2); argparse's type/choices would print the
    # whole usage block, and --memory would import machine.memory to parse.
    p.add_argument("--timeout", metavar="SEC", help="stop after SEC seconds (exit status 124)")
    p.add_argument("--console-log", metavar="FILE", help="write the console here, not stdout")
    p.add_argument(
        "--boot",
        default="auto",
        metavar="auto|pvh|linux",
        help="entry point: auto (default), pvh, or linux (64-bit boot protocol)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not use the vmlinux cache")
    p.add_argument(
        "--no-host-quirks", action="store_true", help="do not apply this host's KVM workarounds"
    )
    p.add_argument("--system-map", metavar="FILE", help="System.map, to name symbols in faults")
    p.add_argument("--stop-on", metavar="REGEX", help="end (status 0) when the console matches")
    p.add_argument("--timeline", action="store_true", help="print boot phase times at exit")
    p.add_argument("--dry-run", action="store_true", help="print the boot plan and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--quiet", action="store_true", help="no pvhboot lines on stderr")
    return p


def run(args) -> int:
    import gc

    # Setup allocates many objects that live until exit (modules, classes,
    # the plan), so cyclic GC passes only cost time (about 2 ms of ~26 ms of
    # setup CPU, measured); the run loop turns it back on (gc_paused below),
    # and an in-process caller gets it back as it was.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(args)
    finally:
        if was_enabled:
            gc.enable()


def _run(args) -> int:
    import sys

    from ..api import Machine

    machine = Machine(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        memory=args.memory,
        boot=args.boot,
        timeout=args.timeout,
        console_log=args.console_log,
        capture_console=False,
        echo_console=args.console_log is None,
        host_quirks=not args.no_host_quirks,
        use_cache=not args.no_cache,
        system_map=args.system_map,
        stop_on=args.stop_on,
        quiet=args.quiet,
    )
    if args.dry_run:
        plan = machine.plan()
        if args.json:
            import json

            from ..boot.describe import plan_to_json

            print(json.dumps(plan_to_json(plan), indent=2))
        else:
            from ..boot.describe import format_plan

            if not args.quiet and machine.prepared.message:
                print(f"pvhboot: {machine.prepared.message}", file=sys.stderr)
            print(format_plan(plan))
        return 0

    # Only when this process is pvhboot itself: the fast exit ends the process.
    machine.defer_teardown = _is_program_entry()
    machine.timeline_from_exec = True
    machine.gc_paused = True
    result = machine.run()
    fault = result.reason not in _NOT_FAULTS
    if result.message and (fault or (result.status != 0 and not args.quiet)):
        print(f"pvhboot: {result.message}", file=sys.stderr)
    if result.detail:
        print(result.detail, file=sys.stderr)
    if args.timeline:
        from ..machine.timeline import format_timeline

        print(format_timeline(result.timeline), file=sys.stderr)
    if machine._open_vm is not None:
        from ..api import exit_leaving_teardown

        exit_leaving_teardown(result.status, machine._open_fds)  # does not return
    return result.status


def _is_program_entry() -> bool:
    """True when the process runs pvhboot (console script or ``python -m pvhboot``).

    A caller that runs ``cli.main([...])`` inside its own process (a test
    runner, a script) must get a return value, not an exit.
    """
    import os
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name in ("pvhboot", "pvhboot.__main__"):
        return True
    return os.path.basename(getattr(main, "__file__", None) or "") == "pvhboot"
