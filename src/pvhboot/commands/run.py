"""`pvhboot run`: boot a kernel on KVM (PVH, or the Linux 64-bit protocol).

``register`` only declares arguments: ``pvhboot.cli`` imports every command
to build its parser, and this module is on the boot path, so nothing heavy
is imported at module level. ``run`` hands everything to ``pvhboot.api``.
"""


# Every option of `run`, in one table: register() builds the argparse parser
# from it, and fast_parse() reads the same options without argparse.
# --memory, --timeout and --boot are checked by Machine, which raises a
# one-line UsageError (exit 2); argparse's type/choices would print the whole
# usage block, and --memory would import machine.memory to parse.
# (flag, "value" or "flag", default, metavar, help)
OPTIONS = (
    ("--kernel", "value", None, "PATH", "vmlinux or bzImage"),
    ("--initrd", "value", None, "PATH", "initramfs (module 0 / ramdisk)"),
    ("--cmdline", "value", "", "STR", "kernel command line"),
    ("--memory", "value", "128M", "SIZE", "guest RAM (default 128M)"),
    (
        "--timeout",
        "value",
        None,
        "SEC",
        "stop after SEC seconds of wall time from start, set-up included (exit status 124)",
    ),
    ("--console-log", "value", None, "FILE", "write the console here, not stdout"),
    (
        "--boot",
        "value",
        "auto",
        "auto|pvh|linux",
        "entry point: auto (default), pvh, or linux (64-bit boot protocol)",
    ),
    ("--no-cache", "flag", False, None, "do not use the vmlinux cache"),
    ("--no-host-quirks", "flag", False, None, "do not apply this host's KVM workarounds"),
    ("--system-map", "value", None, "FILE", "System.map, to name symbols in faults"),
    ("--stop-on", "value", None, "REGEX", "end (status 0) when the console matches"),
    ("--timeline", "flag", False, None, "print boot phase times at exit"),
    ("--dry-run", "flag", False, None, "print the boot plan and exit"),
    ("--json", "flag", False, None, "with --dry-run: the plan as JSON"),
    ("--quiet", "flag", False, None, "no pvhboot lines on stderr"),
)


class Args:
    """What argparse's Namespace would hold for `run` (see fast_parse)."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def __eq__(self, other) -> bool:
        return vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Args({vars(self)!r})"


def fast_parse(argv: list[str]):
    """Parse `run`'s options without argparse, or return None.

    Building and running the argparse parser costs about 4 ms and its imports
    about 3 ms more, a sixth of a probe boot. This handles the plain forms
    only: exact long options, `--opt VALUE` and `--opt=VALUE`, flags. Anything
    else (help, an abbreviation, a value that starts with '-', a missing or
    unknown option) returns None, and argparse handles it, with its messages.
    A test checks that both give the same result.
    """
    table = {flag: (kind, default) for flag, kind, default, _, _ in OPTIONS}
    values = {flag[2:].replace("-", "_"): default for flag, (_, default) in table.items()}
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        spec = table.get(flag)
        if spec is None:
            return None
        dest = flag[2:].replace("-", "_")
        if spec[0] == "flag":
            if eq:
                return None
            values[dest] = True
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 2
        if value.startswith("-"):
            return None
        values[dest] = value
    if values["kernel"] is None:
        return None
    return Args(command="run", **values)


# Endings that are not failures; their message is printed only when not --quiet.
_NOT_FAULTS = ("reset", "poweroff", "console-match", "debug-exit", "timeout", "quit", "signal")


def register(sub):
    p = sub.add_parser(
        "run",
        help="boot a kernel on KVM",
        description="Boot a kernel (ELF vmlinux or bzImage) on KVM, with a serial console on "
        "stdout. Exit status: 0 when the guest resets or powers off, the debug-exit code "
        "when it writes port 0xf4, 124 on --timeout, 1 on a fault, 130 on Ctrl-C, 128+N on "
        "signal N (SIGTERM, SIGHUP). On a "
        "terminal, keys go to the guest; Ctrl-A x quits (status 0).",
    )
    for flag, kind, default, metavar, text in OPTIONS:
        if kind == "flag":
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(
                flag, default=default, metavar=metavar, help=text, required=flag == "--kernel"
            )
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

    if args.json and not args.dry_run:
        from ..errors import UsageError

        raise UsageError("--json describes the plan of --dry-run: add --dry-run, or drop --json")

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
    machine.handle_signals = True
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
