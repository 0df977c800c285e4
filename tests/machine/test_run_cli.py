"""`pvhboot run` end to end: tiny PVH ELF probes built here with gcc and ld,
run through the CLI as a user runs it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pvhtest import requires_kvm, run_cli

needs_toolchain = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("ld") is None, reason="needs gcc and ld"
)

# Xen's ELF note 18 (XEN_ELFNOTE_PHYS32_ENTRY) carries the 32-bit entry.
PROBE_TEMPLATE = """
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long _start
    .text
    .code32
    .globl _start
_start:
{body}
"""


def build_probe(tmp_path, body: str, name: str = "probe") -> str:
    src = tmp_path / f"{name}.S"
    src.write_text(PROBE_TEMPLATE.format(body=body))
    obj, elf = tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    subprocess.run(["gcc", "-c", "-o", obj, src], check=True)
    subprocess.run(
        [
            "ld", "-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none",
            "-z", "max-page-size=4096", "-Ttext-segment=0x100000", "-e", "_start",
            "-o", elf, obj,
        ],
        check=True,
    )  # fmt: skip
    return str(elf)


HELLO = """
    mov $0x3f8, %dx
    mov $'h', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $0x2a, %al
    out %al, $0xf4
"""


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    return build_probe(tmp_path_factory.mktemp("probe"), HELLO, "hello")


@contextlib.contextmanager
def _running(*args, env=None):
    """``pvhboot run ARGS`` as a child with piped output; killed if still alive at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvhboot", "run", *map(str, args)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gzip_wrapped_no_cache(tmp_path, elf):
    """(ELF.gz, an empty TMPDIR, the env pointing at it): a --no-cache run
    extracts to a temporary file there, which the tests watch."""
    import gzip

    wrapped = tmp_path / (os.path.basename(str(elf)) + ".gz")
    wrapped.write_bytes(gzip.compress(open(elf, "rb").read()))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return wrapped, tmp, dict(os.environ, TMPDIR=str(tmp), PVHBOOT_CACHE=str(tmp_path / "cache"))


def _err_lines(proc) -> list[str]:
    return [line for line in proc.stderr.decode().splitlines() if line.strip()]


@requires_kvm
@needs_toolchain
def test_probe_prints_and_exits_through_the_debug_port(hello):
    proc = run_cli("run", "--kernel", hello, "--no-host-quirks", timeout=120)
    assert proc.returncode == (0x2A << 1) | 1, proc.stderr
    assert proc.stdout == b"hi"


@requires_kvm
@needs_toolchain
def test_quiet_run_says_nothing_on_stderr(hello):
    proc = run_cli("run", "--kernel", hello, "--quiet", "--no-host-quirks", timeout=120)
    assert proc.returncode == 85
    assert proc.stderr == b""


@requires_kvm
@needs_toolchain
def test_qemu_style_aliases(hello):
    proc = run_cli("run", "-kernel", hello, "-m", "64M", "-append", "x=1", "--quiet", timeout=120)
    assert proc.returncode == 85, proc.stderr


@requires_kvm
@needs_toolchain
def test_console_log_and_timeline(hello, tmp_path):
    log = tmp_path / "console.txt"
    proc = run_cli(
        "run", "--kernel", hello, "--console-log", log, "--timeline", "--quiet", timeout=120
    )
    assert proc.returncode == 85
    assert log.read_bytes() == b"hi"
    assert proc.stdout == b""
    err = proc.stderr.decode()
    for phase in ("exec", "kvm-ready", "kernel-mapped", "first-kvm-run", "first-serial-byte", "exit"):
        assert f"\n{phase} " in "\n" + err, err


@requires_kvm
@needs_toolchain
def test_timeout_exits_124(tmp_path):
    spin = build_probe(tmp_path, "1: jmp 1b", "spin")
    proc = run_cli("run", "--kernel", spin, "--timeout", "0.5", "--no-host-quirks", timeout=120)
    assert proc.returncode == 124
    assert "--timeout" in proc.stderr.decode()


@requires_kvm
@needs_toolchain
def test_triple_fault_exits_1_with_one_line_and_a_register_dump(tmp_path):
    # PVH enters with no IDT: the #UD from ud2 cannot be delivered.
    crash = build_probe(tmp_path, "ud2", "crash")
    proc = run_cli("run", "--kernel", crash, "--quiet", "--no-host-quirks", timeout=120)
    assert proc.returncode == 1
    lines = _err_lines(proc)
    assert "triple-faulted" in lines[0] and lines[0].startswith("pvhboot: ")
    assert any(line.startswith("RIP=") for line in lines[1:]), lines
    assert "Traceback" not in proc.stderr.decode()


@needs_toolchain
def test_dry_run_prints_the_plan_and_exits_0(hello):
    proc = run_cli("run", "--kernel", hello, "--dry-run", "--cmdline", "console=ttyS0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "pvh" in out and "console=ttyS0" in out


@pytest.mark.parametrize(
    "args,word",
    [
        (["--memory", "12Q"], "12Q"),
        (["--timeout", "soon"], "soon"),
        (["--timeout", "-3"], "-3"),
        (["--boot", "bios"], "bios"),
    ],
)
def test_bad_flags_are_usage_errors(tmp_path, args, word):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    proc = run_cli("run", "--kernel", kernel, *args)
    assert proc.returncode == 2
    lines = _err_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("pvhboot: error:"), lines
    assert word in lines[0]


@pytest.mark.parametrize(
    "args,words",
    [
        (["run", "--kernel", "K", "--cmdline", "-x"], ["--cmdline", "OPTION=VALUE"]),
        (["run", "--kernel", "K", "--memory", "-5M"], ["--memory", "OPTION=VALUE"]),
        (["run", "--kernel", "K", "--bogus"], ["--bogus", "--help"]),
        (["run"], ["--kernel", "--help"]),
        ([], ["COMMAND", "--help"]),
        (["frob"], ["frob", "--help"]),
        (["inspect"], ["IMAGE", "--help"]),
    ],
)
def test_argparse_usage_errors_are_one_line(tmp_path, args, words):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    proc = run_cli(*[str(kernel) if a == "K" else a for a in args])
    assert proc.returncode == 2
    lines = _err_lines(proc)
    assert len(lines) == 1 and ": error: " in lines[0], lines
    for word in words:
        assert word in lines[0], lines


def test_a_dash_value_goes_through_the_equals_form(hello):
    proc = run_cli("run", "--kernel", hello, "--dry-run", "--cmdline=-x foo", "--no-host-quirks")
    assert proc.returncode == 0, proc.stderr
    assert "'-x foo'" in proc.stdout.decode()


def test_missing_kernel_is_one_line_exit_1(tmp_path):
    proc = run_cli("run", "--kernel", tmp_path / "nope", "--quiet")
    assert proc.returncode == 1
    lines = _err_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("pvhboot: error:"), lines


@pytest.fixture(scope="module")
def spin(tmp_path_factory):
    return build_probe(tmp_path_factory.mktemp("spin"), "1: jmp 1b", "spin")


@requires_kvm
@needs_toolchain
def test_timeout_fires_while_a_stdin_reader_runs(spin):
    # Piped stdin starts the console reader thread; SIGALRM must still
    # reach the vCPU thread.
    proc = run_cli("run", "--kernel", spin, "--timeout", "0.5", "--quiet", input=b"abc", timeout=60)
    assert proc.returncode == 124


def _run_on_pty(args: list[str], keys: bytes) -> tuple[int, bytes, bool]:
    import pty
    import termios
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(sys.executable, [sys.executable, "-m", "pvhboot", *args])
    # wait until pvhboot has put the terminal in raw mode
    deadline = time.monotonic() + 30
    raw = False
    while time.monotonic() < deadline and not raw:
        raw = not termios.tcgetattr(fd)[3] & termios.ICANON
        time.sleep(0.05)
    time.sleep(0.3)
    os.write(fd, keys)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, raw


@requires_kvm
@needs_toolchain
def test_ctrl_c_on_a_terminal_exits_130(spin):
    status, out, raw = _run_on_pty(["run", "--kernel", spin, "--timeout", "30", "--quiet"], b"\x03")
    assert raw, "the terminal was never put in raw mode"
    assert status == 130, out
    assert b"Traceback" not in out


@requires_kvm
@needs_toolchain
def test_ctrl_a_x_quits_with_status_0(spin):
    status, out, _ = _run_on_pty(["run", "--kernel", spin, "--timeout", "30", "--quiet"], b"\x01x")
    assert status == 0, out


@requires_kvm
@needs_toolchain
def test_api_boots_the_same_probe_without_a_shell(hello):
    from pvhboot import Machine

    machine = Machine(kernel=hello, cmdline="probe=1", memory="64M", quiet=True)
    plan = machine.plan()
    assert plan.protocol == "pvh" and plan.memory_size == 64 << 20
    assert "probe=1" in plan.cmdline
    result = machine.run()
    assert (result.reason, result.status, result.console) == ("debug-exit", 85, "hi")
    assert result.timeline["exit"] >= result.timeline["first-kvm-run"] > 0


@requires_kvm
@needs_toolchain
def test_cli_main_in_process_returns_the_status(hello, capfd):
    # The fast exit (VM teardown left to a child) is only for the pvhboot
    # process itself; a caller of cli.main gets the status back.
    from pvhboot.cli import main

    assert main(["run", "--kernel", hello, "--quiet", "--no-host-quirks"]) == 85
    assert capfd.readouterr().out == "hi"


@requires_kvm
@needs_toolchain
def test_no_cache_temporary_is_removed_despite_the_fast_exit(hello, tmp_path):
    # A gzip-wrapped vmlinux with --no-cache is extracted to a temporary file
    # that atexit removes; the CLI's fast exit must still run that.
    wrapped, tmp, env = _gzip_wrapped_no_cache(tmp_path, hello)
    proc = subprocess.run(
        [sys.executable, "-m", "pvhboot", "run", "--kernel", str(wrapped), "--no-cache", "--quiet"],
        capture_output=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 85, proc.stderr
    assert list(tmp.iterdir()) == []


@needs_toolchain
def test_in_process_cli_leaves_gc_as_it_was(hello, capfd):
    import gc

    from pvhboot.cli import main

    assert gc.isenabled()
    assert main(["run", "--kernel", hello, "--dry-run", "--quiet"]) == 0
    assert gc.isenabled()


SPIN_AFTER_READY = """
    mov $0x3f8, %dx
    mov $'r', %al
    out %al, %dx
    mov $'\\n', %al
    out %al, %dx
    cli
1:  hlt
    jmp 1b
"""


@requires_kvm
@needs_toolchain
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_ends_the_run_cleanly_and_no_cache_temporary_is_gone(tmp_path, sig):
    # stdin is not a TTY, so machine/console.py's raw-mode handlers are not
    # installed: the run path's own handlers must end the run (128+signal),
    # and the --no-cache temporary must be unlinked once the kernel is mapped.
    probe = build_probe(tmp_path, SPIN_AFTER_READY, "ready")
    wrapped, tmp, env = _gzip_wrapped_no_cache(tmp_path, probe)
    with _running("--kernel", wrapped, "--no-cache", "--quiet", "--memory", "128M",
                  "--timeout", "120", env=env) as proc:
        assert proc.stdout.readline() == b"r\n"  # the guest runs (and then halts)
        assert list(tmp.iterdir()) == []  # unlinked while the guest still runs
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert list(tmp.iterdir()) == []
    assert err == b""  # --quiet: the status says it


@requires_kvm
@needs_toolchain
def test_signal_says_so_in_one_line_without_quiet(tmp_path):
    probe = build_probe(tmp_path, SPIN_AFTER_READY, "ready")
    with _running("--kernel", probe, "--no-host-quirks", "--memory", "128M") as proc:
        assert proc.stdout.readline() == b"r\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().splitlines()[-1] == "pvhboot: stopped by SIGTERM"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.mark.kernel
@pytest.mark.parametrize("quiet", [False, True])
def test_signal_during_preparation_says_so_and_leaves_nothing(tmp_path, debian_generic_kernel,
                                                              quiet):
    # SIGTERM while the vmlinux cache's child decompresses the xz payload:
    # one line (unless --quiet), 128+signal, the child gone, no cache files.
    cache = tmp_path / "cache"
    env = dict(os.environ, PVHBOOT_CACHE=str(cache))
    with _running("--kernel", debian_generic_kernel.vmlinuz, "--memory", "128M",
                  "--timeout", "20", *(["--quiet"] if quiet else []), env=env) as proc:
        child = []
        for _ in range(2000):  # the decompression child appears within ~0.1 s
            child = _children(proc.pid)
            if child or proc.poll() is not None:
                break
            time.sleep(0.005)
        assert child, "no decompression child was seen"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.decode().splitlines()
    if quiet:
        assert lines == []
    else:
        assert lines[-1] == "pvhboot: stopped by SIGTERM"
    for pid in child:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(pid), "the decompression child outlived pvhboot"
    left = [p.name for p in cache.rglob("*") if p.is_file()]
    assert left == [], left
