#!/usr/bin/env python3
"""Boot benchmark: pvhboot against QEMU, side by side, in one run (issue 3).

What it measures, each as the median of N interleaved repetitions:

1. **Probe, exec -> exit**: a PVH ELF whose first instruction is
   ``out %al, $0xf4``; QEMU runs it as
   ``qemu-system-x86_64 -M microvm -enable-kvm -kernel probe.elf
   -device isa-debug-exit,iobase=0xf4 -display none`` (``-display none``
   only stops it from starting a VNC server on a machine with no screen).
   Wall time from fork+exec to process exit, and peak RSS (``ru_maxrss``).
2. **Kernel size**: pvhboot on the same probe padded into a 15 MB and a
   50 MB ELF (one big PT_LOAD of file bytes, entry unchanged), up to the
   first guest exit: loading must cost the same whatever the size.
3. (``--first-line KERNEL ...``, issue 4) time to the guest kernel's first
   console line for a bzImage through ``--boot linux``, through PVH with a
   cold and a warm vmlinux cache, and for its vmlinux through PVH.

Timing and RSS come from a tiny C launcher built here (fork, execvp,
wait4): measuring from Python would charge the child with the parent's
RSS (exec keeps the old mm's high-water mark) and with Python's own
process start-up. pvhboot is run through its installed console script
(``.venv/bin/pvhboot``), never through a pyenv shim, with its bytecode
compiled beforehand, as an installed package has it.

Usage: bench/boot.py [-n 20] [--json] [--first-line BZIMAGE [--vmlinux VMLINUX]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- the probe ----------------------------------------------------------------

# Xen ELF note 18 (XEN_ELFNOTE_PHYS32_ENTRY) with the 32-bit entry; the first
# instruction at that entry leaves through QEMU's isa-debug-exit port.
PROBE_ASM = """
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
    outb %al, $0xf4
1:  hlt
    jmp 1b
{padding}
"""

PADDING_ASM = """
    .section .kernel_body, "a", @progbits
    .balign 4096
    .incbin "{blob}"
"""

LAUNCHER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
/* launcher OUT ERR CMD...: run CMD with stdout/stderr redirected; print
   "<wall ns> <ru_maxrss KiB> <exit status> <user+sys us>" on our stdout. */
int main(int argc, char **argv) {
    struct timespec a, b; struct rusage ru; int st; pid_t pid;
    if (argc < 4) return 2;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pid = fork();
    if (pid == 0) {
        int o = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int e = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int n = open("/dev/null", O_RDONLY);
        dup2(n, 0); dup2(o, 1); dup2(e, 2);
        execvp(argv[3], argv + 3);
        _exit(127);
    }
    if (wait4(pid, &st, 0, &ru) < 0) return 3;
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%lld %ld %d %lld\n",
           (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec),
           ru.ru_maxrss, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st),
           (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL
               + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    return 0;
}
"""


def build_launcher(work: Path) -> Path:
    src = work / "launcher.c"
    src.write_text(LAUNCHER_C)
    exe = work / "launcher"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def build_probe(work: Path, name: str = "probe", pad_bytes: int = 0) -> Path:
    """The 0xf4 probe as an ELF; ``pad_bytes`` of file-backed data make it a 'big kernel'."""
    padding = ""
    if pad_bytes:
        blob = work / f"{name}.blob"
        with open(blob, "wb") as f:
            # Incompressible, distinct pages: nothing can be deduplicated or skipped.
            chunk = 1 << 20
            for _ in range(pad_bytes // chunk):
                f.write(os.urandom(chunk))
        padding = PADDING_ASM.format(blob=blob)
    src = work / f"{name}.S"
    src.write_text(PROBE_ASM.format(padding=padding))
    obj, elf = work / f"{name}.o", work / f"{name}.elf"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none",
         "-z", "noexecstack", "-z", "max-page-size=4096", "-Ttext-segment=0x100000",
         "-e", "_start", "-o", str(elf), str(obj)],
        check=True,
    )  # fmt: skip
    return elf


# --- running ------------------------------------------------------------------


def pvhboot_script() -> str:
    """The installed console script beside this interpreter (not a pyenv shim)."""
    for cand in (Path(sys.executable).parent / "pvhboot", ROOT / ".venv" / "bin" / "pvhboot"):
        if cand.exists():
            return str(cand)
    found = shutil.which("pvhboot")
    if not found:
        sys.exit("bench/boot.py: no pvhboot console script found (run scripts/setup)")
    return found


def precompile() -> None:
    """Write pvhboot's bytecode, as an installed package has it.

    Some environments set PYTHONDONTWRITEBYTECODE; then every run would
    compile every module from source, which is not what a user pays.
    """
    import compileall

    import pvhboot

    compileall.compile_dir(str(Path(pvhboot.__file__).parent), quiet=1)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


class Sample:
    __slots__ = ("wall_ms", "rss_mb", "status", "stderr", "cpu_ms")

    def __init__(
        self, wall_ms: float, rss_mb: float, status: int, stderr: str, cpu_ms: float
    ) -> None:
        self.wall_ms = wall_ms
        self.rss_mb = rss_mb
        self.status = status
        self.stderr = stderr
        self.cpu_ms = cpu_ms  # user + system CPU time: less sensitive to a busy machine


def launch(launcher: Path, work: Path, cmd: list[str]) -> Sample:
    out, err = work / "child.out", work / "child.err"
    proc = subprocess.run(
        [str(launcher), str(out), str(err), *cmd],
        capture_output=True, text=True, check=True, env=child_env(),
    )  # fmt: skip
    ns, kib, status, cpu_us = proc.stdout.split()
    return Sample(
        int(ns) / 1e6, int(kib) / 1024, int(status), err.read_text(errors="replace"),
        int(cpu_us) / 1e3,
    )  # fmt: skip


def qemu_cmd(kernel: Path) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-kernel", str(kernel),
        "-device", "isa-debug-exit,iobase=0xf4", "-display", "none",
    ]  # fmt: skip


def pvhboot_cmd(kernel: Path, *extra: str) -> list[str]:
    return [pvhboot_script(), "run", "--kernel", str(kernel), "--quiet", *extra]


def timeline_ms(stderr: str, phase: str) -> float | None:
    """A phase's time from `pvhboot run --timeline` output on stderr."""
    for line in stderr.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == phase:
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_probe(launcher: Path, work: Path, probe: Path, n: int, with_qemu: bool) -> dict:
    """pvhboot and QEMU on the 0xf4 probe, interleaved: exec->exit and peak RSS."""
    runs: dict[str, list[Sample]] = {"pvhboot": [], "qemu": [], "python -c pass": []}
    # The floor: the same interpreter starting and doing nothing (site included,
    # as the console script has it).
    python = str(Path(pvhboot_script()).parent / "python")
    for _ in range(n):
        runs["pvhboot"].append(launch(launcher, work, pvhboot_cmd(probe)))
        if with_qemu:
            runs["qemu"].append(launch(launcher, work, qemu_cmd(probe)))
        runs["python -c pass"].append(launch(launcher, work, [python, "-c", "pass"]))
    result = {}
    for name, samples in runs.items():
        if not samples:
            continue
        statuses = sorted({s.status for s in samples})
        result[name] = {
            "wall_ms": median([s.wall_ms for s in samples]),
            "wall_ms_min": min(s.wall_ms for s in samples),
            "rss_mb": median([s.rss_mb for s in samples]),
            "cpu_ms": median([s.cpu_ms for s in samples]),
            "statuses": statuses,
        }
        bad = [s for s in samples if s.status in (1, 127) and name == "pvhboot" and s.stderr]
        if bad:
            result[name]["error"] = bad[0].stderr.strip().splitlines()[-1]
    return result


def bench_kernel_size(launcher: Path, work: Path, kernels: dict[str, Path], n: int) -> dict:
    """pvhboot up to the first guest exit (the probe entry) for each kernel size."""
    samples: dict[str, list[Sample]] = {k: [] for k in kernels}
    for _ in range(n):
        for label, path in kernels.items():
            samples[label].append(launch(launcher, work, pvhboot_cmd(path, "--timeline")))
    out = {}
    for label, ss in samples.items():
        exits = [t for s in ss if (t := timeline_ms(s.stderr, "exit")) is not None]
        out[label] = {
            "file_mb": kernels[label].stat().st_size / 1e6,
            "wall_ms": median([s.wall_ms for s in ss]),
            "first_exit_ms": median(exits),
            "rss_mb": median([s.rss_mb for s in ss]),
        }
    return out


# --- issue 4: time to the guest kernel's first console line ---------------------


def first_line(launcher: Path, work: Path, kernel: Path, *extra: str, timeout: int = 600) -> dict:
    """One boot of a real kernel, ended at its first complete console line.

    Returns wall ms (exec -> exit) and the timeline's kvm-ready (host-side
    preparation: image, extraction or cache, plan), first-serial-byte and
    exit (= the first newline) phases.
    """
    cmd = pvhboot_cmd(
        kernel, "--timeline", "--cmdline", "console=ttyS0", "--stop-on", "\n",
        "--timeout", str(timeout), *extra,
    )  # fmt: skip
    s = launch(launcher, work, cmd)
    result = {
        "wall_ms": s.wall_ms,
        "kvm_ready_ms": timeline_ms(s.stderr, "kvm-ready"),
        "first_serial_byte_ms": timeline_ms(s.stderr, "first-serial-byte"),
        # the exit phase is the first line only if the run ended on the match
        "first_line_ms": timeline_ms(s.stderr, "exit") if s.status == 0 else None,
        "status": s.status,
    }
    if s.status != 0:
        errors = [line for line in s.stderr.splitlines() if line.startswith("pvhboot:")]
        result["error"] = errors[-1] if errors else s.stderr.strip()[-200:]
    return result


def bench_linux_via_protocol(launcher, work, bzimage: Path) -> dict:
    """bzImage through the Linux 64-bit boot protocol: the guest decompresses itself."""
    return first_line(launcher, work, bzimage, "--boot", "linux")


def bench_bzimage_pvh_cold(launcher, work, bzimage: Path) -> dict:
    """bzImage through PVH without the vmlinux cache: host-side decompression every time."""
    return first_line(launcher, work, bzimage, "--boot", "pvh", "--no-cache")


def bench_bzimage_pvh_warm(launcher, work, bzimage: Path) -> dict:
    """bzImage through PVH with a warm cache (one boot first fills it)."""
    # --dry-run plans the boot, which extracts into the cache, and stops there.
    subprocess.run(
        [pvhboot_script(), "run", "--kernel", str(bzimage), "--boot", "pvh", "--dry-run"],
        capture_output=True, check=True, env=child_env(),
    )  # fmt: skip
    return first_line(launcher, work, bzimage, "--boot", "pvh")


def bench_vmlinux_pvh(launcher, work, vmlinux: Path) -> dict:
    """The same build's vmlinux through PVH."""
    return first_line(launcher, work, vmlinux, "--boot", "pvh")


def bench_host_prep(launcher, work, bzimage: Path, vmlinux: Path, n: int) -> dict:
    """Host-side cost of the warm-cache path against the plain vmlinux.

    Both run `--dry-run` (image, cache lookup, plan; no guest), interleaved,
    n times each: one guest boot varies by seconds here, so the few
    milliseconds the cache adds can only be seen without one.
    """
    subprocess.run(
        [pvhboot_script(), "run", "--kernel", str(bzimage), "--boot", "pvh", "--dry-run"],
        capture_output=True, check=True, env=child_env(),
    )  # fmt: skip
    walls: dict[str, list[float]] = {"bzImage, warm cache": [], "vmlinux": []}
    kernels = {"bzImage, warm cache": bzimage, "vmlinux": vmlinux}
    for _ in range(n):
        for label, kernel in kernels.items():
            s = launch(launcher, work, pvhboot_cmd(kernel, "--boot", "pvh", "--dry-run"))
            walls[label].append(s.wall_ms)
    out = {label: median(ws) for label, ws in walls.items()}
    out["difference_ms"] = out["bzImage, warm cache"] - out["vmlinux"]
    return out


# --- report -------------------------------------------------------------------


def report(probe: dict, sizes: dict, lines: dict | None) -> str:
    out = []
    p, q = probe.get("pvhboot"), probe.get("qemu")
    out.append("Probe (first instruction: out %al,$0xf4), exec -> exit, median")
    out.append(
        f"{'':15} {'wall ms':>9} {'min ms':>8} {'CPU ms':>8} {'peak RSS MB':>12}  statuses"
    )
    for name, r in probe.items():
        out.append(
            f"{name:15} {r['wall_ms']:9.1f} {r['wall_ms_min']:8.1f} {r['cpu_ms']:8.1f} "
            f"{r['rss_mb']:12.1f}  {r['statuses']}"
        )
    if p and q:
        out.append(
            f"ratio pvhboot/qemu: time {p['wall_ms'] / q['wall_ms']:.2f}x (target <= 0.5x), "
            f"min time {p['wall_ms_min'] / q['wall_ms_min']:.2f}x, "
            f"CPU {p['cpu_ms'] / q['cpu_ms']:.2f}x, "
            f"peak RSS {p['rss_mb'] / q['rss_mb']:.2f}x (target <= 0.4x)"
        )
    if p and "error" in p:
        out.append(f"pvhboot error: {p['error']}")
    if sizes:
        out.append("")
        out.append("Kernel size, pvhboot up to the first guest exit, median")
        out.append(f"{'kernel':10} {'file MB':>8} {'first exit ms':>14} {'wall ms':>9} {'RSS MB':>7}")
        for label, r in sizes.items():
            out.append(
                f"{label:10} {r['file_mb']:8.1f} {r['first_exit_ms']:14.1f} "
                f"{r['wall_ms']:9.1f} {r['rss_mb']:7.1f}"
            )
        labels = list(sizes)
        if len(labels) == 2:
            a, b = sizes[labels[0]], sizes[labels[1]]
            out.append(
                f"ratio {labels[1]}/{labels[0]}: first exit {b['first_exit_ms'] / a['first_exit_ms']:.2f}x"
                f" (target <= 1.1x), wall {b['wall_ms'] / a['wall_ms']:.2f}x"
            )
    if lines:
        out.append("")
        out.append("Time to the guest kernel's first console line (one boot each)")
        out.append(
            f"{'path':34} {'host prep ms':>12} {'first byte s':>12} {'first line s':>12} "
            f"{'wall s':>8}"
        )
        for label, r in lines.items():
            fb = r["first_serial_byte_ms"]
            fl = r["first_line_ms"]
            kr = r.get("kvm_ready_ms")
            out.append(
                f"{label:34} {kr if kr is not None else float('nan'):12.1f} "
                f"{fb / 1000 if fb else float('nan'):12.2f} "
                f"{fl / 1000 if fl else float('nan'):12.2f} {r['wall_ms'] / 1000:8.2f}"
            )
            if "error" in r:
                out.append(f"    status {r['status']}: {r['error']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="repetitions (default 20)")
    ap.add_argument("--no-qemu", action="store_true", help="skip QEMU (e.g. not installed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--first-line", metavar="BZIMAGE", help="issue 4 rows for this bzImage")
    ap.add_argument("--vmlinux", metavar="VMLINUX", help="with --first-line: its vmlinux")
    args = ap.parse_args(argv)

    with_qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
    precompile()
    with tempfile.TemporaryDirectory(prefix="pvhboot-bench-") as tmp:
        work = Path(tmp)
        launcher = build_launcher(work)
        probe = build_probe(work)
        big = {
            "15 MB": build_probe(work, "probe15", 15 << 20),
            "50 MB": build_probe(work, "probe50", 50 << 20),
        }
        # one untimed run each warms the page cache and the kernel's KVM paths
        launch(launcher, work, pvhboot_cmd(probe))
        if with_qemu:
            launch(launcher, work, qemu_cmd(probe))
        for path in big.values():
            launch(launcher, work, pvhboot_cmd(path))
        probe_res = bench_probe(launcher, work, probe, args.n, with_qemu)
        size_res = bench_kernel_size(launcher, work, big, args.n)
        line_res = None
        if args.first_line:
            bz = Path(args.first_line)
            line_res = {
                "bzImage, --boot linux": bench_linux_via_protocol(launcher, work, bz),
                "bzImage, PVH, cold cache": bench_bzimage_pvh_cold(launcher, work, bz),
                "bzImage, PVH, warm cache": bench_bzimage_pvh_warm(launcher, work, bz),
            }
            if args.vmlinux:
                line_res["vmlinux, PVH"] = bench_vmlinux_pvh(launcher, work, Path(args.vmlinux))
        prep_res = None
        if args.first_line and args.vmlinux:
            prep_res = bench_host_prep(
                launcher, work, Path(args.first_line), Path(args.vmlinux), args.n
            )
    if args.json:
        print(json.dumps({"probe": probe_res, "sizes": size_res, "first_line": line_res,
                          "host_prep": prep_res}, indent=2))
    else:
        print(report(probe_res, size_res, line_res))
        if prep_res:
            print(
                f"\nHost preparation (--dry-run, exec -> exit, median of {args.n}): "
                f"bzImage warm cache {prep_res['bzImage, warm cache']:.1f} ms, "
                f"vmlinux {prep_res['vmlinux']:.1f} ms, "
                f"difference {prep_res['difference_ms']:.1f} ms (target <= 5 ms)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
