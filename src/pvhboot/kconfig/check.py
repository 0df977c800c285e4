"""What a kernel config needs to boot in a pvhboot VM, checked without a
kernel tree.

Two boot paths are reported:

* PVH: ``CONFIG_PVH=y`` links ``arch/x86/platform/pvh/`` into the kernel,
  whose ``head.S`` emits the ``XEN_ELFNOTE_PHYS32_ENTRY`` note. Since the
  patch that split it out of Xen, ``PVH`` is its own option: ``XEN_PVH``
  only *selects* it, so Xen is not needed. In 6.1 it sits inside the
  ``if HYPERVISOR_GUEST`` block of ``arch/x86/Kconfig`` and has no other
  dependency.
* The 64-bit Linux boot protocol (``startup_64``): ``CONFIG_X86_64=y``,
  which follows ``CONFIG_64BIT``.

Then the options a direct-boot VM relies on (required) and those that make
it better (helpful), each with the one sentence a user needs to decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dotconfig import DotConfig

REQUIRED = "required"
HELPFUL = "helpful"

# Exit statuses of `pvhboot kconfig` (1 and 2 are the CLI's error statuses).
EXIT_OK = 0  # boots through PVH, every required option built in
EXIT_PARTIAL = 3  # boots through PVH, but a required option is missing or a module
EXIT_NO_PVH = 4  # cannot boot through PVH


@dataclass(frozen=True)
class Option:
    name: str
    level: str
    why: str  # one sentence: what goes wrong without it
    module_note: str | None = None  # what "=m" means, for tristates
    # Dependencies that 6.1 puts in front of it and that configs often lack;
    # only a hint (the --source solver computes the exact set).
    needs: tuple[str, ...] = ()


PVH_OPTION = Option(
    "PVH",
    REQUIRED,
    "Without it the kernel has no PVH entry note (Xen ELF note 18), so pvhboot can only "
    "boot it through the Linux boot protocol.",
    needs=("HYPERVISOR_GUEST",),
)
X86_64_OPTION = Option(
    "X86_64",
    REQUIRED,
    "Without it the kernel is 32-bit and has no 64-bit entry (startup_64) for the Linux "
    "boot protocol.",
    needs=("64BIT",),
)

OPTIONS: tuple[Option, ...] = (
    Option(
        "SERIAL_8250",
        REQUIRED,
        "The VM's only console is a 16550 UART at 0x3f8; without the 8250 driver the "
        "kernel prints nothing you can see.",
        needs=("TTY",),
    ),
    Option(
        "SERIAL_8250_CONSOLE",
        REQUIRED,
        "Lets console=ttyS0 put kernel messages on the UART from early boot on.",
        needs=("TTY", "SERIAL_8250"),
    ),
    Option(
        "BLK_DEV_INITRD",
        REQUIRED,
        "Without it the kernel ignores the initrd/initramfs that pvhboot loads.",
    ),
    Option(
        "DEVTMPFS",
        REQUIRED,
        "A minimal initramfs has no /dev; devtmpfs gives it device nodes such as "
        "/dev/ttyS0 and /dev/vda.",
    ),
    Option(
        "VIRTIO_MMIO",
        REQUIRED,
        "pvhboot's block, console and rng devices are virtio over MMIO; without this "
        "transport the guest never sees them.",
        module_note="it is a module: only an initrd that loads virtio_mmio.ko sees the devices",
        needs=("VIRTIO_MENU",),
    ),
    Option(
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        REQUIRED,
        "A PVH guest gets no device tree and no ACPI device entries, so virtio-mmio "
        "devices are described by virtio_mmio.device= on the command line.",
        needs=("VIRTIO_MMIO",),
    ),
    Option(
        "DEVTMPFS_MOUNT",
        HELPFUL,
        "Mounts devtmpfs on /dev by itself, so an init without mount calls still finds "
        "its console.",
        needs=("DEVTMPFS",),
    ),
    Option(
        "PRINTK",
        HELPFUL,
        "Without printk the kernel is silent, so a failed boot gives no clue.",
        needs=("EXPERT",),
    ),
    Option(
        "BINFMT_ELF",
        HELPFUL,
        "Without it the kernel cannot run ELF programs, such as the initramfs's /init.",
    ),
    Option(
        "PARAVIRT",
        HELPFUL,
        "KVM guest support (kvm-clock) is built on these paravirtual hooks and cannot be "
        "switched on without them.",
        needs=("HYPERVISOR_GUEST",),
    ),
    Option(
        "KVM_GUEST",
        HELPFUL,
        "Gives the guest kvm-clock and paravirtual spinlocks; without it the clock is "
        "calibrated slowly and less precisely.",
        needs=("HYPERVISOR_GUEST", "PARAVIRT"),
    ),
    Option(
        "VIRTIO_BLK",
        HELPFUL,
        "The driver for pvhboot's virtio disk, which appears as /dev/vda only with it.",
        module_note="it is a module: the disk appears only once an initrd loads it",
        needs=("BLOCK", "VIRTIO_MMIO"),
    ),
    Option(
        "VIRTIO_CONSOLE",
        HELPFUL,
        "The driver for pvhboot's virtio console (hvc0), a faster console than the UART.",
        module_note="it is a module: hvc0 appears only once an initrd loads it",
        needs=("TTY", "VIRTIO_MMIO"),
    ),
    Option(
        "HW_RANDOM_VIRTIO",
        HELPFUL,
        "Feeds the guest's entropy pool from pvhboot's virtio-rng, so early getrandom() "
        "calls do not block.",
        module_note="it is a module: it feeds entropy only once loaded",
        needs=("HW_RANDOM", "VIRTIO_MMIO"),
    ),
    Option(
        "IKCONFIG",
        HELPFUL,
        "Embeds this config in the kernel, so `pvhboot kconfig` and `inspect` can read it "
        "from the image alone.",
    ),
)

# The arch names a .config header carries for x86 ("# Linux/x86 6.1.0 ...").
X86_ARCHES = ("x86", "x86_64", "i386")

# Initrd codecs: init/Kconfig's RD_<codec> options, one per decompressor.
RD_CODECS = ("GZIP", "BZIP2", "LZMA", "XZ", "LZO", "LZ4", "ZSTD")


@dataclass
class OptionStatus:
    name: str
    level: str
    value: str  # "y" | "m" | "n" (absent counts as "n")
    ok: bool
    why: str
    note: str | None = None
    missing_needs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": f"CONFIG_{self.name}",
            "level": self.level,
            "value": self.value,
            "ok": self.ok,
            "why": None if self.ok else self.why,
            "note": self.note,
            "also_needs": [f"CONFIG_{n}" for n in self.missing_needs],
        }


@dataclass
class BootPath:
    name: str  # "pvh" | "linux64"
    ok: bool
    detail: str
    option: OptionStatus

    def to_json(self) -> dict:
        return {"ok": self.ok, "detail": self.detail, "option": self.option.to_json()}


@dataclass
class ConfigReport:
    config: DotConfig
    pvh: BootPath
    linux64: BootPath
    options: list[OptionStatus]
    initrd_codecs: list[str]

    @property
    def required_missing(self) -> list[OptionStatus]:
        return [o for o in self.options if o.level == REQUIRED and not o.ok]

    @property
    def exit_status(self) -> int:
        if not self.pvh.ok:
            return EXIT_NO_PVH
        if self.required_missing or not self.linux64.ok:
            return EXIT_PARTIAL
        return EXIT_OK

    @property
    def verdict(self) -> str:
        return {EXIT_OK: "ok", EXIT_PARTIAL: "partial", EXIT_NO_PVH: "no-pvh"}[self.exit_status]

    def to_json(self) -> dict:
        cfg = self.config
        return {
            "path": cfg.path,
            "origin": cfg.origin,
            "arch": cfg.arch,
            "kernel_version": cfg.kernel_version,
            "verdict": self.verdict,
            "exit_status": self.exit_status,
            "boot": {"pvh": self.pvh.to_json(), "linux64": self.linux64.to_json()},
            "options": [o.to_json() for o in self.options],
            "initrd_codecs": [c.lower() for c in self.initrd_codecs],
        }


def _status(cfg: DotConfig, opt: Option) -> OptionStatus:
    value = cfg.tristate(opt.name)
    note = None
    if value == "m":
        note = opt.module_note or "it is a module, but the VM needs it built in"
    missing = [n for n in opt.needs if not cfg.is_on(n)] if value != "y" else []
    return OptionStatus(opt.name, opt.level, value, value == "y", opt.why, note, missing)


def check_config(cfg: DotConfig) -> ConfigReport:
    """Check a parsed config; pure, no kernel tree needed."""
    pvh_status = _status(cfg, PVH_OPTION)
    if pvh_status.ok:
        detail = "CONFIG_PVH=y: vmlinux carries the PVH entry note"
        if cfg.is_on("XEN_PVH"):
            detail += " (XEN_PVH=y also selects it; PVH itself needs no Xen)"
    else:
        detail = (
            "CONFIG_PVH is not set: no PVH entry note. Switching on PVH alone is enough "
            "(XEN_PVH merely selects it; no Xen needed)"
        )
        if pvh_status.missing_needs:
            detail += "; in 6.1 it sits under 'Linux guest support' (CONFIG_HYPERVISOR_GUEST)"
    if cfg.arch and cfg.arch not in X86_ARCHES:
        detail += f"; this is a Linux/{cfg.arch} config, and pvhboot boots x86 kernels only"
    pvh = BootPath("pvh", pvh_status.ok, detail, pvh_status)

    x86_64 = _status(cfg, X86_64_OPTION)
    # A .config always spells out X86_64 for x86-64 builds; fall back on
    # 64BIT for hand-written fragments that only set the prompt.
    if not x86_64.ok and cfg.is_on("64BIT") and "X86_64" not in cfg.values:
        x86_64 = OptionStatus("X86_64", REQUIRED, "y", True, X86_64_OPTION.why)
    detail = (
        "CONFIG_X86_64=y: the bzImage has the 64-bit entry (startup_64)"
        if x86_64.ok
        else "CONFIG_X86_64 is not set: a 32-bit kernel, no 64-bit boot protocol entry"
    )
    linux64 = BootPath("linux64", x86_64.ok, detail, x86_64)

    options = [_status(cfg, opt) for opt in OPTIONS]
    codecs = [c for c in RD_CODECS if cfg.is_on(f"RD_{c}")]
    if cfg.is_on("BLK_DEV_INITRD"):
        rd = OptionStatus(
            "RD_*",
            HELPFUL,
            "y" if codecs else "n",
            bool(codecs),
            "With no RD_<codec> the kernel only takes an uncompressed initramfs; enable the "
            "codec your initrd uses (RD_GZIP for the ones pvhboot builds).",
            note=("initrd codecs: " + ", ".join(c.lower() for c in codecs)) if codecs else None,
        )
        options.append(rd)
    return ConfigReport(cfg, pvh, linux64, options, codecs)


def format_report(report: ConfigReport) -> str:
    """The human-readable report (no colour, stable wording)."""
    cfg = report.config
    lines = []
    what = "embedded config of" if cfg.origin == "image" else "config"
    version = f" (Linux/{cfg.arch} {cfg.kernel_version})" if cfg.kernel_version else ""
    lines.append(f"{what} {cfg.path}{version}")
    for path, label in ((report.pvh, "PVH boot"), (report.linux64, "64-bit boot protocol")):
        lines.append(f"  {label + ':':22s}{'yes' if path.ok else 'no'}  {path.detail}")
    lines.append("")
    for level, title in ((REQUIRED, "Required for a direct-boot VM"), (HELPFUL, "Helpful")):
        lines.append(f"{title}:")
        for opt in (o for o in report.options if o.level == level):
            mark = "ok  " if opt.ok else ("mod " if opt.value == "m" else "MISS")
            name = f"CONFIG_{opt.name}"
            shown = f"{name}={opt.value}" if opt.value != "n" else f"{name} is not set"
            if opt.name == "RD_*":
                shown = opt.note if opt.ok and opt.note else "no CONFIG_RD_<codec> is set"
            lines.append(f"  [{mark}] {shown}")
            if not opt.ok:
                lines.append(f"         {opt.why}")
                if opt.note:
                    lines.append(f"         Note: {opt.note}.")
                if opt.missing_needs:
                    needs = ", ".join(
                        f"CONFIG_{n} ({'a module' if cfg.tristate(n) == 'm' else 'off'} here)"
                        for n in opt.missing_needs
                    )
                    lines.append(f"         In 6.1 it also needs, built in: {needs}.")
    lines.append("")
    lines.append(f"Verdict: {_VERDICTS[report.exit_status]} (exit status {report.exit_status})")
    return "\n".join(lines)


_VERDICTS = {
    EXIT_OK: "boots through PVH with every required option built in",
    EXIT_PARTIAL: "boots through PVH, but some required options are missing",
    EXIT_NO_PVH: "cannot boot through PVH",
}
