"""`run`'s argparse-free option parser must agree with argparse, or step aside."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pvhboot import cli
from pvhboot.commands import run as run_command

AGREE = [
    ["--kernel", "vmlinux"],
    ["--kernel=vmlinux", "--quiet"],
    ["--kernel", "k", "--initrd", "i.cpio", "--cmdline", "console=ttyS0 panic=-1", "--memory",
     "256M", "--timeout", "30", "--console-log", "log", "--boot", "pvh", "--no-cache",
     "--no-host-quirks", "--system-map", "System.map", "--stop-on", "Run /init",
     "--timeline", "--dry-run", "--json", "--quiet"],
    ["--cmdline=", "--kernel", "k"],
    ["--kernel", "a", "--kernel", "b"],  # the last one wins, as in argparse
    ["--boot=linux", "--kernel", "k", "--cmdline", "a=b c=d"],
    ["--memory", "12Q", "--kernel", "k"],  # values are checked later, by Machine
]

STEP_ASIDE = [
    [],
    ["--kernel"],
    ["--help"],
    ["-h"],
    ["--kern", "k"],  # an abbreviation: argparse's business
    ["--kernel", "k", "--cmdline", "-x"],
    ["--kernel", "k", "--quiet=1"],
    ["--kernel", "k", "extra"],
    ["--kernel", "k", "--bogus"],
    ["--initrd", "i"],  # --kernel is required
    ["--kernel", "k", "--", "x"],
]


def _argparse(argv):
    args = cli.build_parser().parse_args(["run", *argv])
    values = vars(args)
    values.pop("_module")
    return values


@pytest.mark.parametrize("argv", AGREE, ids=lambda a: " ".join(a) or "empty")
def test_fast_parse_agrees_with_argparse(argv):
    fast = run_command.fast_parse(argv)
    assert fast is not None
    assert vars(fast) == _argparse(argv)


@pytest.mark.parametrize("argv", STEP_ASIDE, ids=lambda a: " ".join(a) or "empty")
def test_fast_parse_leaves_the_rest_to_argparse(argv):
    assert run_command.fast_parse(argv) is None


def test_every_run_option_is_in_the_table():
    parser = cli.build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    flags = {s for a in run_parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {flag for flag, *_ in run_command.OPTIONS}


def test_run_path_does_not_import_argparse(tmp_path):
    # `run --dry-run` on a missing kernel fails in Machine, after parsing; the
    # point is what parsing imported by then.
    code = (
        "import sys; from pvhboot import cli\n"
        "try:\n"
        "    cli.main(['run', '--kernel', '/nonexistent/vmlinux', '--dry-run', '--quiet'])\n"
        "finally:\n"
        "    print('argparse' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_help_and_errors_still_come_from_argparse():
    out = subprocess.run([sys.executable, "-m", "pvhboot", "run", "--help"], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and "--stop-on" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pvhboot", "run", "--initrd", "x"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "--kernel" in out.stderr
