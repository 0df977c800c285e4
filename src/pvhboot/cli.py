"""Command-line entry point: ``pvhboot COMMAND ...``.

Each command lives in ``pvhboot.commands.<name>`` and provides
``register(subparsers)`` (argparse only, no heavy imports) and
``run(args) -> int``. Heavy modules are imported inside ``run`` so that the
boot path pays only for what it uses.
"""

import sys

COMMANDS = ("inspect", "extract", "kconfig", "run")


def build_parser():
    import argparse
    import importlib

    class Parser(argparse.ArgumentParser):
        """argparse with usage errors on one line: what is wrong, then what to do."""

        def error(self, message: str):
            hint = f"see '{self.prog} --help'"
            if "expected one argument" in message:
                # `--cmdline -x` reads -x as an option; the = form is unambiguous.
                hint = f"a value that starts with '-' is written OPTION=VALUE; {hint}"
            self.exit(2, f"{self.prog}: error: {message}; {hint}\n")

    parser = Parser(
        prog="pvhboot",
        description="Boot and inspect x86-64 Linux kernels through the PVH entry point.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"pvhboot.commands.{name}")
        p = module.register(sub)
        p.set_defaults(_module=module)
    return parser


def _version() -> str:
    from . import __version__

    return f"pvhboot {__version__}"


def main(argv: list[str] | None = None) -> int:
    from .errors import PvhbootError

    argv = _qemu_aliases(sys.argv[1:] if argv is None else argv)
    args = None
    if argv and argv[0] == "run":
        # The boot path: plain `run` options skip argparse (see fast_parse).
        from .commands import run as run_command

        args = run_command.fast_parse(argv[1:])
        if args is not None:
            args._module = run_command
    elif argv and argv[0] == "extract":
        # Likewise `extract IMAGE -o OUT [-f]`: argparse is ~11 ms of a 30 ms extract.
        from .commands import extract as extract_command

        args = extract_command.fast_parse(argv[1:])
        if args is not None:
            args._module = extract_command
    if args is None:
        args = build_parser().parse_args(argv)
    try:
        status = args._module.run(args)
    except PvhbootError as exc:
        print(f"pvhboot: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("pvhboot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # A reader such as `head` went away; that is not our failure.
        sys.stderr.close()
        return 0
    except OSError as exc:
        # Files that cannot be opened or written: one line, no traceback.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pvhboot: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return int(status or 0)


# QEMU spells these with one dash; people type them from muscle memory.
_ALIASES = {"-kernel": "--kernel", "-initrd": "--initrd", "-append": "--cmdline", "-m": "--memory"}


def _qemu_aliases(argv: list[str]) -> list[str]:
    if "--" in argv:
        cut = argv.index("--")
        return [_ALIASES.get(a, a) for a in argv[:cut]] + argv[cut:]
    return [_ALIASES.get(a, a) for a in argv]


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
