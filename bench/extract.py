#!/usr/bin/env python3
"""Time `pvhboot extract` against Linux's scripts/extract-vmlinux and the bare
codec CLI, side by side in one run, on every codec Linux uses.

    .venv/bin/python bench/extract.py [--repeat N] [--only CODEC,...] [--no-synthetic]

Images:
- Debian's cloud-amd64 (lz4) and amd64 (xz) kernels (scripts/fetch-debian-kernel);
- the project's test kernels, for each codec already built by
  scripts/build-test-kernel (the bench never starts a kernel build);
- synthetic bzImages: the Debian cloud kernel's payload ELF re-compressed with
  each codec CLI exactly as Linux's scripts/Makefile.lib does, size trailer
  appended, put back behind the cloud kernel's own setup code. They are built
  once and kept under $PVHBOOT_CACHE/bench-extract/, so all seven codecs get a
  row at the size of a real distribution kernel.

Per image, four contenders write the vmlinux ELF to a file in the same
directory (removed before each run, so nobody pays to truncate the last one):
- pvhboot:   .venv/bin/pvhboot extract IMG -o OUT --force (the console script,
             Python start-up included);
- library:   .venv/bin/python -m pvhboot.image._extract_worker ... (the codec
             layer alone in a fresh interpreter, as the boot path's child runs
             it: what the decoders cost without the CLI's start-up);
- extract-vmlinux: sh $(scripts/fetch-linux-source)/scripts/extract-vmlinux IMG > OUT;
- bare:      the codec CLI on the payload stream pre-cut to a file (without
             Linux's 4-byte size trailer, which the CLIs reject): `lz4 -dc P > OUT`.
The runs are interleaved (one of each, N times) so that load from anything
else on the machine hits all of them alike, and the median of N is reported.
All outputs must be byte-identical, or the row says so. Wall and CPU
(user+sys, wait4) medians are both reported: on a shared machine CPU time is
the steadier of the two.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pvhboot.image.bzimage import parse_bzimage  # noqa: E402
from pvhboot.image.compression import CODECS, decompress_to  # noqa: E402

CACHE_BASE = Path(os.environ.get("PVHBOOT_CACHE") or Path.home() / ".cache" / "pvhboot")
BENCH_CACHE = CACHE_BASE / "bench-extract"
PVHBOOT = ROOT / ".venv" / "bin" / "pvhboot"

# How Linux 6.1 compresses the x86 payload (scripts/Makefile.lib cmd_*,
# scripts/xz_wrap.sh, arch/x86/boot/compressed/Makefile: zstd22, lz4 -l).
LINUX_COMPRESS = {
    "gzip": ["gzip", "-n", "-f", "-9", "-c"],
    "bzip2": ["bzip2", "-9", "-c"],
    "lzma": ["lzma", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB", "-c"],
    "lzo": ["lzop", "-9", "-c"],
    "lz4": ["lz4", "-l", "-9", "-c"],
    "zstd": ["zstd", "-22", "--ultra", "-q", "-c"],
}
BARE_DECOMPRESS = {
    "gzip": ["gzip", "-dc"],
    "bzip2": ["bzip2", "-dc"],
    "lzma": ["lzma", "-dc"],
    "xz": ["xz", "-dc"],
    "lzo": ["lzop", "-dc"],
    "lz4": ["lz4", "-dc"],
    "zstd": ["zstd", "-dc", "-q"],
}


def script_lines(*cmd: str) -> list[str]:
    proc = subprocess.run([str(ROOT / "scripts" / cmd[0]), *cmd[1:]], capture_output=True,
                          text=True, check=True)
    return proc.stdout.splitlines()


def debian_images() -> list[tuple[str, Path]]:
    out = []
    for flavour in ("cloud-amd64", "amd64"):
        try:
            out.append((f"Debian {flavour}", Path(script_lines("fetch-debian-kernel",
                                                               flavour)[0])))
        except (subprocess.CalledProcessError, IndexError, OSError) as exc:
            print(f"bench: skipping Debian {flavour}: {exc}", file=sys.stderr)
    return out


def test_kernel_images() -> list[tuple[str, Path]]:
    out = []
    root = CACHE_BASE / "test-kernel"
    for codec in CODECS:
        built = sorted(root.glob(f"{codec}-*/bzImage"), key=lambda p: p.stat().st_mtime)
        if built:
            out.append((f"test kernel ({codec})", built[-1]))
    return out


def synthetic_images(cloud: Path, codecs) -> list[tuple[str, Path]]:
    """The cloud kernel's payload ELF re-compressed with every codec CLI."""
    data = cloud.read_bytes()
    bz = parse_bzimage(data)
    key = hashlib.sha256(data).hexdigest()[:16]
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    elf_path = BENCH_CACHE / f"{key}.vmlinux"
    if not elf_path.exists():
        payload = memoryview(data)[bz.payload_offset : bz.payload_offset + bz.payload_length]
        tmp = elf_path.with_suffix(".part")
        with open(tmp, "wb") as f:
            decompress_to(bz.codec, payload, f, max_output=1 << 30)
        tmp.rename(elf_path)
    elf = elf_path.read_bytes()
    out = []
    for codec in codecs:
        path = BENCH_CACHE / f"{key}-{codec}.bzImage"
        if not path.exists():
            cmd = LINUX_COMPRESS[codec]
            if shutil.which(cmd[0]) is None:
                print(f"bench: skipping synthetic {codec}: {cmd[0]} not installed",
                      file=sys.stderr)
                continue
            print(f"bench: building synthetic {codec} bzImage ({' '.join(cmd)}) ...",
                  file=sys.stderr, flush=True)
            stream = subprocess.run(cmd, input=elf, capture_output=True, check=True).stdout
            if codec != "gzip":  # scripts/Makefile.lib size_append (gzip has ISIZE)
                stream += len(elf).to_bytes(4, "little")
            image = bytearray(data[: bz.payload_offset]) + stream
            # payload_length (boot.rst 0x24c) and syssize (0x1f4, 16-byte units)
            image[0x24C:0x250] = len(stream).to_bytes(4, "little")
            pad = -(len(image) - bz.pm_offset) % 16
            image += bytes(pad)
            image[0x1F4:0x1F8] = ((len(image) - bz.pm_offset) // 16).to_bytes(4, "little")
            tmp = path.with_suffix(".part")
            tmp.write_bytes(image)
            tmp.rename(path)
        out.append((f"synthetic ({codec}, Debian cloud ELF)", path))
    return out


def timed(cmd: list[str], stdout_path: Path | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run; CPU is user+sys of the process
    and every descendant it waited for (wait4), which load on the machine
    from other jobs does not inflate the way it does wall time."""
    fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) \
        if stdout_path is not None else subprocess.DEVNULL
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.PIPE)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
    finally:
        if stdout_path is not None:
            os.close(fd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace').strip()[:300]}")
    return elapsed, usage.ru_utime + usage.ru_stime


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bench_image(label: str, image: Path, extract_vmlinux: Path | None, repeat: int,
                work: Path) -> dict:
    data = image.read_bytes()
    bz = parse_bzimage(data)
    codec = bz.codec
    # Linux appends a 4-byte size to every codec's stream but gzip's, whose
    # own ISIZE field serves (scripts/Makefile.lib: cmd_gzip has no size_append).
    trailer = 0 if codec == "gzip" else 4
    stream = data[bz.payload_offset : bz.payload_offset + bz.payload_length - trailer]
    payload = work / f"payload.{codec}"
    payload.write_bytes(stream)
    names = ("pvhboot", "library", "extract-vmlinux", "bare")
    outs = {name: work / f"out-{name}" for name in names}
    cmds = {
        "pvhboot": ([str(PVHBOOT), "extract", str(image), "-o", str(outs["pvhboot"]),
                     "--force"], None),
        # The codec layer alone, as the boot path's fresh-interpreter child
        # runs it: start-up, limits, mmap, decode, write; no CLI around it.
        "library": ([str(PVHBOOT.parent / "python"), "-m", "pvhboot.image._extract_worker",
                     str(image), codec, str(bz.payload_offset), str(bz.payload_length),
                     str(outs["library"]), str(4 << 30), "600"], None),
        "bare": ([*BARE_DECOMPRESS[codec], str(payload)], outs["bare"]),
    }
    if extract_vmlinux is not None:
        cmds["extract-vmlinux"] = (["sh", str(extract_vmlinux), str(image)],
                                   outs["extract-vmlinux"])
    times: dict[str, list[float]] = {name: [] for name in cmds}
    cpus: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeat):
        for name, (cmd, stdout_path) in cmds.items():
            for p in outs.values():
                p.unlink(missing_ok=True)
            outs["library"].touch()  # the worker writes into an existing file
            wall, cpu = timed(cmd, stdout_path)
            times[name].append(wall)
            cpus[name].append(cpu)
    # One more run each, untimed, to compare what they wrote.
    digests = {}
    outs["library"].touch()
    for name, (cmd, stdout_path) in cmds.items():
        timed(cmd, stdout_path)
        digests[name] = digest(outs[name])
    size = outs["pvhboot"].stat().st_size
    for p in [*outs.values(), payload]:
        p.unlink(missing_ok=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpus.items()}
    return {
        "label": label,
        "codec": codec,
        "payload": len(stream) + trailer,
        "vmlinux": size,
        "median": med,
        "cpu": med_cpu,
        "identical": len(set(digests.values())) == 1,
    }


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _ms(v: float | None) -> str:
    return f"{v * 1e3:.0f}" if v is not None else "-"


def table(rows: list[dict]) -> str:
    head = ("| image | codec | payload → vmlinux "
            "| wall ms: pvhboot / library / extract-vmlinux / bare "
            "| **pvhboot ÷ extract-vmlinux** | **pvhboot ÷ bare** | library ÷ bare "
            "| CPU ms: pvhboot / library / extract-vmlinux / bare "
            "| CPU: pvhboot ÷ e-v, pvhboot ÷ bare, library ÷ bare | same bytes |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        m, c = r["median"], r["cpu"]
        ev, cev = m.get("extract-vmlinux"), c.get("extract-vmlinux")
        lines.append(
            f"| {r['label']} | {r['codec']} "
            f"| {r['payload'] / 1e6:.1f} → {r['vmlinux'] / 1e6:.1f} MB "
            f"| {_ms(m['pvhboot'])} / {_ms(m['library'])} / {_ms(ev)} / {_ms(m['bare'])} "
            f"| {_ratio(m['pvhboot'], ev)} | {_ratio(m['pvhboot'], m['bare'])} "
            f"| {_ratio(m['library'], m['bare'])} "
            f"| {_ms(c['pvhboot'])} / {_ms(c['library'])} / {_ms(cev)} / {_ms(c['bare'])} "
            f"| {_ratio(c['pvhboot'], cev)}, {_ratio(c['pvhboot'], c['bare'])}, "
            f"{_ratio(c['library'], c['bare'])} "
            f"| {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per contender (median)")
    ap.add_argument("--only", default="", help="comma-separated codecs to keep")
    ap.add_argument("--no-synthetic", action="store_true", help="real kernels only")
    args = ap.parse_args()
    if not PVHBOOT.exists():
        print(f"bench: {PVHBOOT} is missing; run scripts/setup first", file=sys.stderr)
        return 1
    try:
        ev = Path(script_lines("fetch-linux-source")[0]) / "scripts" / "extract-vmlinux"
    except (subprocess.CalledProcessError, IndexError, OSError) as exc:
        print(f"bench: no extract-vmlinux column: {exc}", file=sys.stderr)
        ev = None
    only = set(filter(None, args.only.split(",")))
    images = debian_images() + test_kernel_images()
    if not args.no_synthetic and images and images[0][0] == "Debian cloud-amd64":
        images += synthetic_images(images[0][1], [c for c in CODECS if not only or c in only])
    rows = []
    with tempfile.TemporaryDirectory(dir=BENCH_CACHE if BENCH_CACHE.exists() else None,
                                     prefix="run-") as tmp:
        for label, image in images:
            codec = parse_bzimage(image.read_bytes()).codec
            if only and codec not in only:
                continue
            print(f"bench: {label} ({codec}) x{args.repeat} ...", file=sys.stderr, flush=True)
            rows.append(bench_image(label, image, ev, args.repeat, Path(tmp)))
    print(f"median of {args.repeat} runs, wall time including process start-up; "
          f"{os.cpu_count()} CPUs")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
