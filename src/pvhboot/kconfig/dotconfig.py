"""Reading a kernel configuration: a ``.config`` file, or the config that a
kernel built with ``CONFIG_IKCONFIG=y`` carries inside itself.

A ``.config`` is recognised by content, not by name: people pass
``/boot/config-6.1.0-amd64`` as often as ``.config``. Anything that is not
text with ``CONFIG_`` lines is treated as a kernel image and handed to
:func:`pvhboot.image.kernel.open_image`; other binaries are scanned for the
IKCONFIG markers with :mod:`pvhboot.image.ikconfig`.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from dataclasses import dataclass, field

from ..errors import ConfigError

# Larger than any real .config (Debian's is ~270 KiB) by a wide margin, and
# small enough that reading a wrongly-passed file as text costs nothing.
MAX_CONFIG_BYTES = 16 << 20
# How much of a file decides "text or binary".
SNIFF_BYTES = 64 << 10

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set\s*$")
# First lines of every .config: "# Linux/x86 6.1.192 Kernel Configuration".
_HEADER = re.compile(r"^# Linux/(\S+) (\S+) Kernel Configuration", re.M)

NO_CONFIG_HINT = "pass a .config, or an image built with CONFIG_IKCONFIG=y"


@dataclass
class DotConfig:
    """A parsed ``.config``: option name (without ``CONFIG_``) -> value text.

    Values keep their spelling: ``"y"``, ``"m"``, ``"n"`` (from the ``is not
    set`` comments), quoted strings, numbers.
    """

    values: dict[str, str]
    text: str
    path: str
    origin: str = "config"  # "config" | "image"
    arch: str | None = None
    kernel_version: str | None = None
    duplicates: list[str] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def tristate(self, name: str) -> str:
        """``"y"``, ``"m"`` or ``"n"``; absent options count as ``"n"``."""
        value = self.values.get(name, "n")
        return value if value in ("y", "m") else "n"

    def is_on(self, name: str) -> bool:
        return self.tristate(name) == "y"


def parse_config_text(text: str, path: str = "<config>", origin: str = "config") -> DotConfig:
    """Parse .config text. Raises ConfigError when there is no CONFIG_ line at all."""
    values: dict[str, str] = {}
    duplicates: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        m = _SET.match(line)
        if m:
            name, value = m.group(1), m.group(2).strip()
        else:
            m = _UNSET.match(line)
            if not m:
                continue
            name, value = m.group(1), "n"
        if name in values:
            # Like Kconfig itself: the last assignment wins ("override").
            duplicates.append(name)
        values[name] = value
    if not values:
        raise ConfigError(f"{path} has no CONFIG_ lines: {NO_CONFIG_HINT}")
    header = _HEADER.search(text[:4096])
    return DotConfig(
        values=values,
        text=text,
        path=path,
        origin=origin,
        arch=header.group(1) if header else None,
        kernel_version=header.group(2) if header else None,
        duplicates=duplicates,
    )


def _looks_like_text(head: bytes) -> bool:
    # Kernel images are full of NUL bytes; a .config never has one. Encoding
    # does not matter (help texts are not in a .config, strings may be Latin-1).
    return b"\0" not in head


def read_config(path: str) -> DotConfig:
    """Read a .config, or the embedded config of a kernel image, from ``path``.

    Raises ConfigError (or ImageError for a recognised but broken image) with
    one line saying what to pass instead. OSError (missing, unreadable file)
    is left to the CLI, which prints it as one line.
    """
    # Refuse before opening: open() of a FIFO blocks until a writer comes,
    # and a device is never a config (/dev/zero would be read forever).
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is a directory: {NO_CONFIG_HINT}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file: {NO_CONFIG_HINT}")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise ConfigError(f"{path} is empty: {NO_CONFIG_HINT}")
    if not _is_kernel_image(head) and _looks_like_text(head):
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path} is {size} bytes of text, too large for a kernel .config: "
                f"{NO_CONFIG_HINT}"
            )
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
        return parse_config_text(text, path)
    text = config_from_image(path, head)
    return parse_config_text(text, path, origin="image")


# Magics that make a file a kernel image we should hand to the image reader:
# ELF (vmlinux), MZ (a bzImage built with the EFI stub), and "HdrS" at 0x202
# (Documentation/arch/x86/boot.rst, the setup header's `header` field).
_ELF_MAGIC = b"\x7fELF"
_MZ_MAGIC = b"MZ"
_HDRS_OFFSET = 0x202
_HDRS_MAGIC = b"HdrS"


def _is_kernel_image(head: bytes) -> bool:
    return (
        head.startswith(_ELF_MAGIC)
        or head.startswith(_MZ_MAGIC)
        or head[_HDRS_OFFSET : _HDRS_OFFSET + 4] == _HDRS_MAGIC
    )


def config_from_image(path: str, head: bytes) -> str:
    """The IKCONFIG text of a kernel image (``head``: its first bytes); ConfigError
    when it has none."""
    if not _is_kernel_image(head):
        # Not an image we know; a raw scan still finds IKCONFIG in odd wrappers.
        text = _scan_ikconfig(path)
        if text is None:
            raise ConfigError(
                f"{path} is neither a kernel .config nor a kernel image with an embedded "
                f"config: {NO_CONFIG_HINT}"
            )
        return text
    text = _config_via_image_reader(path)
    if text is None:
        raise ConfigError(
            f"{path} is a kernel image without an embedded config: pass its .config, "
            "or rebuild it with CONFIG_IKCONFIG=y"
        )
    return text


def _config_via_image_reader(path: str) -> str | None:
    from ..image.kernel import open_image

    return open_image(path).config_text()


def _scan_ikconfig(path: str) -> str | None:
    """The IKCONFIG text of a file we do not recognise (markers searched raw)."""
    from ..image.ikconfig import find_config

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            # Garbled marker copies are skipped, not errors: the file is not a
            # kernel image we know, so a stray marker proves nothing.
            return find_config(data, strict=False)
