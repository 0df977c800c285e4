"""Choosing the boot path: the one entry point the VMM calls.

``prepare_boot`` looks at the kernel file and picks the protocol (issue 4,
``--boot auto|pvh|linux``):

- an ELF with the PVH note boots through PVH;
- an ELF without it boots through its 64-bit entry (Linux boot protocol);
- a bzImage whose payload ELF has the PVH note is decompressed on the host
  (in a child process, cached by SHA-256 in ``image.vmlinux_cache``) and the
  extracted vmlinux boots through PVH;
- any other bzImage boots through the Linux 64-bit boot protocol.

For a bzImage without a PVH note the extracted ELF stays in the cache too,
so the next boot learns "no PVH" from it without decompressing again.

The result carries one line for stderr that says which path and why.
"""

from __future__ import annotations

import os
import stat

from .._record import Record
from ..errors import BootError, ImageError, UsageError

# The `typing` module costs import time on the boot path; this idiom needs none.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image.kernel import KernelImage
    from .plan import BootPlan

BOOT_MODES = ("auto", "pvh", "linux")
DEFAULT_MEMORY = 128 << 20

_NO_PVH_HINT = (
    "rebuild the kernel with CONFIG_PVH=y (`pvhboot kconfig` checks a .config), "
    "or use --boot auto"
)


class PreparedBoot(Record):
    """What prepare_boot chose: the plan, the one stderr line saying which
    path and why, and the image as read.

    ``vmlinux``: the image.vmlinux_cache.CachedVmlinux the plan maps kernel
    segments from, when the kernel was extracted (else None). With
    use_cache=False it is a private temporary: the VMM calls its cleanup()
    as soon as guest memory has mapped the segments (a MAP_PRIVATE mapping
    keeps the unlinked file's data), so a killed run leaves nothing behind.
    """

    __slots__ = ("plan", "message", "image", "vmlinux")

    def __init__(
        self, plan: BootPlan, message: str, image: KernelImage, vmlinux=None
    ) -> None:
        self.plan = plan
        self.message = message
        self.image = image
        self.vmlinux = vmlinux


def readable_file(path, what: str) -> str:
    """The path as str; BootError (one line) when it is missing, not a file or unreadable.

    For every file a boot reads: the kernel, the initrd, a System.map.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BootError(
            f"cannot read the {what} {path}: {exc.strerror or exc}; give the right path"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise BootError(f"the {what} {path} is not a regular file: give the path of the file")
    if not os.access(path, os.R_OK):
        raise BootError(f"cannot read the {what} {path}: permission denied")
    return str(path)


# Names of the ELF e_machine values (System V gABI) that a PC guest cannot run.
_MACHINE_NAMES = {
    2: "SPARC", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390", 40: "ARM",
    50: "IA-64", 183: "AArch64", 243: "RISC-V", 258: "LoongArch",
}


def _check_elf(elf, path: str, memory_size: int) -> None:
    """Refuse an ELF no x86 guest can run, or whose segments no --memory can hold.

    The planners check their own entry point against the segments; this runs
    first so that a foreign ELF is named as such, and so that the advice for
    a kernel beyond RAM only suggests a --memory that exists and would work.
    """
    from ..image.elf import EM_386, EM_X86_64
    from . import layout

    if elf.machine not in (EM_386, EM_X86_64):
        name = _MACHINE_NAMES.get(elf.machine, "not x86")
        raise BootError(
            f"{path} is an ELF for machine {elf.machine} ({name}), not x86-64 or i386: "
            "give an x86 kernel"
        )
    loads = [seg for seg in elf.load_segments if seg.memsz > 0]
    for i, seg in enumerate(loads):
        layout.check_region_possible(f"{path}: kernel segment {i}", seg.paddr, seg.memsz)
    if not loads:
        return
    start = min(seg.paddr for seg in loads)
    end = max(seg.paddr + seg.memsz for seg in loads)
    layout.check_region_possible(f"{path}: the kernel", start, end - start)
    layout.check_kernel_fits(start, end, memory_size)


def _describe_bz(img: KernelImage) -> str:
    """'bzImage 6.1.192 (zstd)' from what the header says."""
    version = (img.kernel_version or "").split()
    parts = ["bzImage"]
    if version:
        parts.append(version[0])
    codec = img.bzimage.codec if img.bzimage is not None else img.compression
    if codec:
        parts.append(f"({codec})")
    return " ".join(parts)


def prepare_boot(
    kernel: str,
    *,
    initrd: str | None = None,
    cmdline: str = "",
    memory_size: int = DEFAULT_MEMORY,
    boot: str = "auto",
    use_cache: bool = True,
) -> PreparedBoot:
    """Pick the boot path for ``kernel`` and plan it. See the module docstring."""
    if boot not in BOOT_MODES:
        raise UsageError(f"--boot {boot!r} is not a boot path: choose one of {', '.join(BOOT_MODES)}")
    kernel = readable_file(kernel, "kernel")
    if initrd is not None:
        initrd = readable_file(initrd, "initrd")

    from ..image.kernel import open_image

    # Headers only: a bzImage's payload is read through the cache below.
    img = open_image(kernel, load_payload=False)
    args = {"initrd": initrd, "cmdline": cmdline, "memory_size": memory_size}

    if img.format == "elf":
        return _prepare_elf(img, kernel, boot, args)
    if img.format == "bzimage":
        return _prepare_bzimage(img, kernel, boot, use_cache, args)
    if img.format == "compressed-elf":
        return _prepare_compressed_elf(img, kernel, boot, use_cache, args)
    raise BootError(
        f"{kernel} is a {img.format} image with no Linux boot header and no ELF: "
        "give a bzImage or a vmlinux"
    )


def _prepare_elf(img: KernelImage, path: str, boot: str, args: dict) -> PreparedBoot:
    # Import only the planner the chosen path needs: a PVH boot never loads
    # linux.py and its zero-page and page-table modules.
    elf = img.elf
    _check_elf(elf, path, args["memory_size"])
    if boot != "linux" and elf.pvh_entry is not None:
        from .pvh import plan_pvh

        plan = plan_pvh(elf, path, **args)
        return PreparedBoot(plan, "vmlinux has a PVH entry: booting through PVH", img)
    if boot == "pvh":
        raise BootError(
            f"--boot pvh: {path} has no PVH entry (no Xen ELF note 18): {_NO_PVH_HINT}"
        )
    from .linux import plan_linux_elf

    plan = plan_linux_elf(elf, path, **args)
    if boot == "linux":
        msg = "--boot linux: booting the vmlinux through its 64-bit entry (Linux boot protocol)"
    else:
        msg = "vmlinux has no PVH entry: booting through its 64-bit entry (Linux boot protocol)"
    return PreparedBoot(plan, msg, img)


def _extract(path: str, use_cache: bool):
    """(ElfInfo, CachedVmlinux) of the vmlinux inside a bzImage or compressed ELF."""
    from ..image.elf import read_elf_file
    from ..image.vmlinux_cache import get_vmlinux

    cached = get_vmlinux(path, use_cache=use_cache)
    return read_elf_file(cached.path), cached


def _adopt_payload(img: KernelImage, elf) -> None:
    """Record the extracted ELF on the header-only image, as open_image would have."""
    img.elf = elf
    img.pvh_capable = elf.pvh_entry is not None
    img.entry_points.pvh = elf.pvh_entry
    img.entry_points.xen_pv = elf.xen_pv_entry


def _prepare_bzimage(
    img: KernelImage, path: str, boot: str, use_cache: bool, args: dict
) -> PreparedBoot:
    bz = img.bzimage
    what = _describe_bz(img)
    if boot == "linux":
        from .linux import check_64bit_entry, plan_linux_bzimage

        # Fail on an old header before anything else is looked at.
        check_64bit_entry(bz)
        plan = plan_linux_bzimage(bz, path, **args)
        return PreparedBoot(
            plan, f"--boot linux: {what}: booting through the Linux 64-bit boot protocol", img
        )

    try:
        elf, cached = _extract(path, use_cache)
    except ImageError as exc:
        if boot == "pvh":
            raise BootError(
                f"--boot pvh: cannot read the vmlinux inside {path} ({exc}); "
                "without it there is no PVH entry"
            ) from None
        # auto: the payload is unreadable to us, but the kernel may still
        # decompress itself; say why we did not take PVH.
        from .linux import plan_linux_bzimage

        plan = plan_linux_bzimage(bz, path, **args)
        reason = str(exc).split(": ", 1)[-1]
        return PreparedBoot(
            plan,
            f"{what}: payload not readable on the host ({reason}): "
            "booting through the Linux 64-bit boot protocol",
            img,
        )

    _adopt_payload(img, elf)
    if elf.pvh_entry is not None:
        _check_elf(elf, cached.path, args["memory_size"])
        from .pvh import plan_pvh

        plan = plan_pvh(elf, cached.path, **args)
        how = "cached" if cached.hit else "extracted now"
        return PreparedBoot(
            plan,
            f"{what} has a PVH entry: booting the extracted vmlinux through PVH ({how})",
            img,
            cached,
        )
    # The Linux protocol boots the bzImage itself: a --no-cache temporary
    # vmlinux has served its purpose (cleanup() leaves cache entries alone).
    cached.cleanup()
    if boot == "pvh":
        raise BootError(f"--boot pvh: {what} ({path}) has no PVH entry: {_NO_PVH_HINT}")
    from .linux import plan_linux_bzimage

    plan = plan_linux_bzimage(bz, path, **args)
    return PreparedBoot(
        plan, f"{what} has no PVH entry: booting through the Linux 64-bit boot protocol", img
    )


def _prepare_compressed_elf(
    img: KernelImage, path: str, boot: str, use_cache: bool, args: dict
) -> PreparedBoot:
    """A gzip/xz/zstd-wrapped vmlinux: extract it once (cached), then as an ELF."""
    elf, cached = _extract(path, use_cache)
    _adopt_payload(img, elf)
    _check_elf(elf, path, args["memory_size"])
    how = "cached" if cached.hit else "extracted now"
    what = f"{img.compression}-compressed vmlinux" if img.compression else "compressed vmlinux"
    if boot != "linux" and elf.pvh_entry is not None:
        from .pvh import plan_pvh

        plan = plan_pvh(elf, cached.path, **args)
        return PreparedBoot(
            plan, f"{what} has a PVH entry: booting it through PVH ({how})", img, cached
        )
    if boot == "pvh":
        raise BootError(f"--boot pvh: {what} {path} has no PVH entry: {_NO_PVH_HINT}")
    from .linux import plan_linux_elf

    plan = plan_linux_elf(elf, cached.path, **args)
    prefix = "--boot linux: " if boot == "linux" else f"{what} has no PVH entry: "
    return PreparedBoot(
        plan,
        f"{prefix}booting it through its 64-bit entry (Linux boot protocol, {how})",
        img,
        cached,
    )
