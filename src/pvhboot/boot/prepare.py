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
    path and why, and the image as read."""

    __slots__ = ("plan", "message", "image")

    def __init__(self, plan: BootPlan, message: str, image: KernelImage) -> None:
        self.plan = plan
        self.message = message
        self.image = image


def _check_file(path: str, what: str) -> str:
    """The path as str; BootError (one line) when it is missing, not a file or unreadable."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BootError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BootError(f"the {what} {path} is not a regular file: give the path of the file")
    if not os.access(path, os.R_OK):
        raise BootError(f"cannot read the {what} {path}: permission denied")
    return path


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
    kernel = _check_file(kernel, "kernel")
    if initrd is not None:
        initrd = _check_file(initrd, "initrd")

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

    img.elf = elf
    img.pvh_capable = elf.pvh_entry is not None
    img.entry_points.pvh = elf.pvh_entry
    if elf.pvh_entry is not None:
        from .pvh import plan_pvh

        plan = plan_pvh(elf, cached.path, **args)
        how = "cached" if cached.hit else "extracted now"
        return PreparedBoot(
            plan, f"{what} has a PVH entry: booting the extracted vmlinux through PVH ({how})", img
        )
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
    img.elf = elf
    img.pvh_capable = elf.pvh_entry is not None
    how = "cached" if cached.hit else "extracted now"
    what = f"{img.compression}-compressed vmlinux" if img.compression else "compressed vmlinux"
    if boot != "linux" and elf.pvh_entry is not None:
        from .pvh import plan_pvh

        plan = plan_pvh(elf, cached.path, **args)
        return PreparedBoot(plan, f"{what} has a PVH entry: booting it through PVH ({how})", img)
    if boot == "pvh":
        raise BootError(f"--boot pvh: {what} {path} has no PVH entry: {_NO_PVH_HINT}")
    from .linux import plan_linux_elf

    plan = plan_linux_elf(elf, cached.path, **args)
    prefix = "--boot linux: " if boot == "linux" else f"{what} has no PVH entry: "
    return PreparedBoot(
        plan, f"{prefix}booting it through its 64-bit entry (Linux boot protocol, {how})", img
    )
