"""What is this kernel file? One entry point for every format pvhboot reads.

``open_image(path)`` recognises, in this order:

- an ELF (``vmlinux``, ``xen-syms``): format ``"elf"``;
- a bzImage, "HdrS" at 0x202 (also when it is a PE/EFI image): ``"bzimage"``;
- a PE image that is not a bzImage: ``"pe"``;
- a whole file compressed with one of Linux's codecs that holds an ELF
  (``vmlinux.gz``, ``xen.gz``): ``"compressed-elf"``.

For a bzImage (and a compressed ELF) it decompresses the payload in memory,
unless ``load_payload=False``, and reports the payload ELF's facts. The
``--json`` schema of :meth:`KernelImage.to_json` is documented in
docs/inspect-json.md; change it only together with that file and
``SCHEMA_VERSION``.
"""

from __future__ import annotations

import mmap
import os
import stat

from .._record import Record
from ..errors import CodecError, ImageError
from .elf import ELF_MAGIC, EM_X86_64, PT_LOAD, ElfInfo, is_elf, parse_elf

# The bzImage and PE readers are imported only for files that are not ELF:
# the boot path opens a vmlinux with nothing but the ELF reader.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .bzimage import BzImageInfo

SCHEMA_VERSION = 1
# Decompressed payloads are held in memory; no real vmlinux is near this, and
# a corrupt size or a bomb stops here instead of exhausting the host.
MAX_PAYLOAD = 512 << 20
BANNER_PREFIX = b"Linux version "  # init/version.c linux_banner
MAX_BANNER = 512


class EntryPoints(Record):
    __slots__ = ("pvh", "linux64", "xen_pv", "efi_handover", "efi_pe")

    def __init__(
        self,
        pvh: int | None = None,  # 32-bit physical entry (Xen note 18)
        linux64: int | None = None,  # 64-bit boot protocol entry (physical)
        xen_pv: int | None = None,  # XEN_ELFNOTE_ENTRY (virtual)
        efi_handover: int | None = None,  # handover_offset, relative to the protected-mode code
        efi_pe: bool = False,  # the file is a PE image firmware can start
    ) -> None:
        self.pvh = pvh
        self.linux64 = linux64
        self.xen_pv = xen_pv
        self.efi_handover = efi_handover
        self.efi_pe = efi_pe

    def to_json(self) -> dict:
        return {
            "pvh": self.pvh,
            "linux64": self.linux64,
            "xen_pv": self.xen_pv,
            "efi_handover": self.efi_handover,
            "efi_pe": self.efi_pe,
        }


class KernelImage(Record):
    __slots__ = ("path", "format", "compression", "kernel_version", "entry_points",
                 "pvh_capable", "elf", "bzimage", "pe", "size", "payload_size",
                 "_payload", "_raw", "_config")

    def __init__(
        self,
        path: str,
        format: str,  # noqa: A002  "elf" | "bzimage" | "pe" | "compressed-elf"
        compression: str | None,
        kernel_version: str | None,
        entry_points: EntryPoints,
        pvh_capable: bool | None,
        elf: ElfInfo | None = None,
        bzimage: BzImageInfo | None = None,
        pe: object | None = None,  # pe.PeInfo for any PE image (bzImage with EFI stub included)
        size: int = 0,
        payload_size: int | None = None,  # bytes of the decompressed ELF, when read
        _payload: bytes | None = None,
        _raw: bytes | None = None,  # for images not read from a file
        _config: object = False,  # False = not searched yet
    ) -> None:
        self.path = path
        self.format = format
        self.compression = compression
        self.kernel_version = kernel_version
        self.entry_points = entry_points
        self.pvh_capable = pvh_capable
        self.elf = elf
        self.bzimage = bzimage
        self.pe = pe
        self.size = size
        self.payload_size = payload_size
        self._payload = _payload
        self._raw = _raw
        self._config = _config

    @property
    def kernel_release(self) -> str | None:
        """The first word of the version (``uname -r``), e.g. ``6.1.0-56-amd64``."""
        return self.kernel_version.split()[0] if self.kernel_version else None

    def config_text(self) -> str | None:
        """The embedded .config (CONFIG_IKCONFIG), or None when the image has none.

        Searches the raw file first, then the decompressed payload. A bzImage
        opened with load_payload=False only has its raw bytes searched.
        """
        if self._config is False:
            from .ikconfig import find_config

            # Marker bytes also turn up by chance inside compressed data (a
            # bzImage payload, the decompressor ELF, a built-in initramfs), so
            # a marker whose stream does not decode is skipped, not an error.
            if self._raw is not None:
                text = find_config(self._raw, strict=False)
            else:
                with map_image(self.path) as mm:
                    text = find_config(mm, strict=False)
            if text is None and self._payload is not None:
                text = find_config(self._payload, strict=False)
            self._config = text
        return self._config

    @property
    def config_embedded(self) -> bool | None:
        """True/False, or None when the answer is inside a payload that was not read."""
        if self.config_text() is not None:
            return True
        if self.format in ("bzimage", "compressed-elf") and self._payload is None:
            return None
        return False

    @property
    def warnings(self) -> list[str]:
        """Odd header values worth a reader's attention; the file is still described."""
        return self.bzimage.warnings if self.bzimage is not None else []

    def to_json(self) -> dict:
        doc = self._json()
        # "warnings" (list of one-line strings) appears only when there is
        # something to say, so a well-formed image's document is unchanged.
        warnings = self.warnings
        if warnings:
            doc["warnings"] = warnings
        return doc

    def _json(self) -> dict:
        elf = self.elf
        bz = self.bzimage
        return {
            "schema_version": SCHEMA_VERSION,
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "compression": self.compression,
            "boot_protocol": bz.protocol_str if bz else None,
            "kernel_version": self.kernel_version,
            "kernel_release": self.kernel_release,
            "entry_points": self.entry_points.to_json(),
            "pvh_capable": self.pvh_capable,
            "config_embedded": self.config_embedded,
            "elf": None if elf is None else {
                "class": elf.elf_class,
                "machine": elf.machine,
                "entry": elf.entry,
                "entry_paddr": elf.entry_paddr,
                "size": elf.size,
            },
            "load_segments": [] if elf is None else [
                {"paddr": s.paddr, "vaddr": s.vaddr, "offset": s.offset,
                 "filesz": s.filesz, "memsz": s.memsz, "flags": s.flags_str}
                for s in elf.segments if s.type == PT_LOAD
            ],
            "notes": [] if elf is None else [
                {"owner": n.owner, "type": n.type, "type_name": n.type_name,
                 "desc": n.desc.hex()}
                for n in elf.notes
            ],
            "bzimage": None if bz is None else {
                "protocol": bz.protocol,
                "setup_sects": bz.setup_sects,
                "loadflags": bz.loadflag_names,
                "xloadflags": bz.xloadflag_names,
                "pref_address": bz.pref_address,
                "load_address": bz.load_address,
                "init_size": bz.init_size,
                "kernel_alignment": bz.kernel_alignment,
                "relocatable": bz.relocatable,
                "handover_offset": bz.handover_offset,
                "cmdline_size": bz.cmdline_size,
                "initrd_addr_max": bz.initrd_addr_max,
                "pm_offset": bz.pm_offset,
                "pm_size": bz.pm_size,
                "payload_offset": bz.payload_offset,
                "payload_length": bz.payload_length,
                "is_pe": bz.is_pe,
            },
        }


class map_image:
    """Read-only mmap of a file as a context manager; ImageError for an empty file."""

    def __init__(self, path: str):
        self.path = path
        self.mm = None

    def __enter__(self):
        # Refuse before opening: open() of a FIFO blocks until a writer comes,
        # and opening a device can have side effects (a tape rewinds).
        _require_regular(self.path, os.stat(self.path))
        # O_NONBLOCK: should the path become a FIFO between stat and open,
        # open returns at once and the fstat below refuses it.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            _require_regular(self.path, os.fstat(fd))
            try:
                self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except ValueError:
                raise ImageError(f"{self.path}: the file is empty; not a kernel image") from None
        finally:
            os.close(fd)
        return self.mm

    def __exit__(self, *exc):
        close_quietly(self.mm)


# st_mode file types other than a regular file, as a user would name them.
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(path: str, st: os.stat_result) -> None:
    """ImageError unless ``st`` (symlinks followed) describes a regular file."""
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "something other than a regular file")
    where = path
    if os.path.islink(path):
        where = f"{path} (a link to {os.path.realpath(path)})"
    raise ImageError(f"{where} is {kind}, not a kernel image file; give the path of a vmlinux, "
                     "bzImage or compressed kernel file")


def release_quietly(view) -> None:
    try:
        view.release()
    except BufferError:  # see close_quietly
        pass


def close_quietly(mm) -> None:
    """Close an mmap, unless views of it are still alive.

    A decoder that raised keeps views of the input alive in its traceback;
    close() would then raise BufferError and hide the real error. The
    mapping is released when the last view goes.
    """
    try:
        mm.close()
    except BufferError:
        pass


def open_image(path, *, load_payload: bool = True) -> KernelImage:
    """Identify the kernel image at ``path`` and collect its facts.

    load_payload=False reads headers only: no decompression, so a bzImage's
    payload ELF (elf, pvh entry, pvh_capable) stays unknown (None).
    """
    path = str(path)
    with map_image(path) as mm:
        return image_from_buffer(mm, path, load_payload=load_payload, _keep_raw=False)


def image_from_buffer(data, path: str = "<memory>", *, load_payload: bool = True,
                      _keep_raw: bool = True) -> KernelImage:
    """open_image over bytes or an mmap (tests and fuzzing use bytes)."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    size = len(data)
    if size == 0:
        raise ImageError(f"{path}: the file is empty; not a kernel image")
    raw = data if _keep_raw else None
    if is_elf(data):
        # The banner scan reads the whole file: skip it on the headers-only (boot) path.
        img = _from_elf(parse_elf(data, what=path), path, "elf", None,
                        data if load_payload else None)
    else:
        from .bzimage import is_bzimage, is_pe

        if is_bzimage(data):
            img = _from_bzimage(data, path, load_payload)
        elif is_pe(data):
            from .pe import parse_pe

            pe = parse_pe(data, what=path)
            img = KernelImage(path, "pe", None, None, EntryPoints(efi_pe=True), False, pe=pe)
        else:
            img = _from_compressed(data, path, load_payload)
    img.size = size
    img._raw = raw
    return img


def _from_elf(elf: ElfInfo, path: str, fmt: str, codec: str | None, data) -> KernelImage:
    entries = EntryPoints(
        pvh=elf.pvh_entry,
        # Only a 64-bit x86 ELF offers the 64-bit entry; a 32-bit ELF's e_entry is not one.
        linux64=elf.entry_paddr if elf.elf_class == 64 and elf.machine == EM_X86_64 else None,
        xen_pv=elf.xen_pv_entry,
    )
    version = _banner_version(data) if data is not None else None
    return KernelImage(path, fmt, codec, version, entries,
                       elf.pvh_entry is not None, elf=elf, payload_size=elf.size)


def _banner_version(data) -> str | None:
    """The version from linux_banner ("Linux version 6.1.0 (...) #1 ..."), if the ELF has one.

    Since 6.1 a vmlinux holds two banners: a placeholder from init/version.c
    ("... # SMP ...") and the real one from init/version-timestamp.c with the
    build number; prefer the one with "#<digit>".
    """
    found = None
    at = data.find(BANNER_PREFIX)
    for _ in range(8):  # a handful of candidates at most; stop scanning after that
        if at < 0:
            break
        start = at + len(BANNER_PREFIX)
        chunk = bytes(data[start : start + MAX_BANNER])
        line = chunk.split(b"\n", 1)[0].split(b"\0", 1)[0].decode("ascii", "replace").strip()
        # Format strings such as "Linux version %s" also match; a banner starts with a digit.
        if line[:1].isdigit():
            if _has_build_number(line):
                return line
            found = found or line
        at = data.find(BANNER_PREFIX, start)
    return found


def _has_build_number(line: str) -> bool:
    at = line.find("#")
    return at >= 0 and line[at + 1 : at + 2].isdigit()


def _from_bzimage(data, path: str, load_payload: bool) -> KernelImage:
    from .bzimage import parse_bzimage

    bz = parse_bzimage(data, what=path)
    pe = None
    if bz.is_pe:
        from .pe import parse_pe

        try:
            pe = parse_pe(data, what=path)
        except ImageError:
            pe = None
    entries = EntryPoints(
        linux64=bz.linux64_entry,
        efi_handover=bz.efi_handover_offset,
        efi_pe=bz.is_pe,
    )
    img = KernelImage(path, "bzimage", bz.codec, bz.kernel_version, entries, None,
                      bzimage=bz, pe=pe)
    if not load_payload or not bz.payload_length:
        if not bz.payload_length:
            # Protocol < 2.08 or no payload field: nothing to look into.
            img.pvh_capable = False if load_payload else None
        return img
    payload = decompress_payload(data, bz, path)
    elf = parse_elf(payload, what=f"{path}: payload ELF")
    img.elf = elf
    img._payload = payload
    img.payload_size = len(payload)
    entries.pvh = elf.pvh_entry
    entries.xen_pv = elf.xen_pv_entry
    img.pvh_capable = elf.pvh_entry is not None
    return img


def payload_view(data, bz: BzImageInfo, path: str = "bzImage"):
    """The compressed payload as a memoryview of ``data`` (no copy) and its codec."""
    reason = bz.no_payload_reason()
    if reason:
        raise ImageError(f"{path}: {reason}; there is no payload ELF to read")
    if bz.codec is None:
        head = bytes(data[bz.payload_offset : bz.payload_offset + 4]).hex()
        raise ImageError(f"{path}: payload at {bz.payload_offset:#x} starts with {head}, "
                         "which is no codec Linux uses (gzip bzip2 lzma xz lzo lz4 zstd)")
    return memoryview(data)[bz.payload_offset : bz.payload_offset + bz.payload_length]


class _ElfBuffer:
    """A write target that gives up at once when the output does not start with \\x7fELF.

    Non-kernel data is refused after its first chunk instead of after being
    decompressed whole (up to MAX_PAYLOAD) into memory.
    """

    def __init__(self, what: str):
        self.what = what
        import io

        self.buf = io.BytesIO()
        self.head = b""

    def write(self, chunk) -> int:
        if len(self.head) < 4:
            self.head += bytes(chunk[: 4 - len(self.head)])
            if len(self.head) >= 4 and self.head != ELF_MAGIC:
                # A CodecError passes through the decoder loop unchanged.
                raise CodecError(_not_elf(self.what))
        return self.buf.write(chunk)

    def value(self) -> bytes:
        return self.buf.getvalue()


def _decompress_elf(codec: str, data, start: int, length: int, what: str) -> bytes:
    from .compression import decompress_to

    view = memoryview(data)[start : start + length]
    out = _ElfBuffer(what)
    try:
        decompress_to(codec, view, out, max_output=MAX_PAYLOAD)
    finally:
        release_quietly(view)
    if out.head != ELF_MAGIC:
        raise ImageError(_not_elf(what))
    return out.value()


def _not_elf(what: str) -> str:
    return f"{what} does not decompress to an ELF (no \\x7fELF magic); not a Linux kernel"


def decompress_payload(data, bz: BzImageInfo, path: str) -> bytes:
    payload_view(data, bz, path).release()  # validates the payload and its codec
    return _decompress_elf(bz.codec, data, bz.payload_offset, bz.payload_length,
                           f"{path}: the {bz.codec} payload")


def _from_compressed(data, path: str, load_payload: bool) -> KernelImage:
    from .compression import detect_codec

    codec = detect_codec(data[:16])
    if codec is None:
        raise ImageError(f"{path}: not a kernel image: no ELF magic, no bzImage 'HdrS' header, "
                         "no PE header and no known compression magic")
    if not load_payload:
        return KernelImage(path, "compressed-elf", codec, None, EntryPoints(), None)
    inner = _decompress_elf(codec, data, 0, len(data), f"{path}: the {codec} data")
    img = _from_elf(parse_elf(inner, what=f"{path}: decompressed ELF"), path,
                    "compressed-elf", codec, inner)
    img._payload = inner
    return img


__all__ = ["EntryPoints", "KernelImage", "open_image", "image_from_buffer"]
