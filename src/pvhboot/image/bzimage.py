"""bzImage setup header reader (Linux Documentation/arch/x86/boot.rst).

A bzImage is real-mode setup code (``setup_sects`` 512-byte sectors after
the boot sector) followed by protected-mode code: the decompressor plus a
compressed ``vmlinux`` payload. The setup header at 0x1f1 says where
everything is. This module only reads it; nothing here decompresses.
"""

from __future__ import annotations

import ctypes
import struct

from .._record import Record
from ..errors import ImageError

# boot.rst "The real-mode kernel header": the offsets checked before the header is trusted
# (the rest is read through SetupHeader below).
SETUP_HEADER_OFFSET = 0x1F1
OFF_SETUP_SECTS = 0x1F1  # u8, 0 means 4
OFF_BOOT_FLAG = 0x1FE  # u16, 0xAA55
OFF_JUMP = 0x200  # u8 0xEB + u8 offset: the header ends at 0x202 + that offset
OFF_HEADER = 0x202  # "HdrS"
OFF_VERSION = 0x206  # u16 protocol version
HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
SECTOR = 512
DEFAULT_SETUP_SECTS = 4  # boot.rst: "if this field is 0, the real value is 4"
DEFAULT_LOAD_ADDRESS = 0x100000  # code32_start default for a bzImage
KERNEL_VERSION_BASE = 0x200
MAX_VERSION_LEN = 512

# boot.rst "loadflags".
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
LOADFLAG_NAMES = {
    LOADED_HIGH: "LOADED_HIGH",
    KASLR_FLAG: "KASLR_FLAG",
    QUIET_FLAG: "QUIET_FLAG",
    KEEP_SEGMENTS: "KEEP_SEGMENTS",
    CAN_USE_HEAP: "CAN_USE_HEAP",
}
# boot.rst "xloadflags" (arch/x86/include/uapi/asm/bootparam.h).
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6
XLF_MEM_ENCRYPTION = 1 << 7
XLOADFLAG_NAMES = {
    XLF_KERNEL_64: "XLF_KERNEL_64",
    XLF_CAN_BE_LOADED_ABOVE_4G: "XLF_CAN_BE_LOADED_ABOVE_4G",
    XLF_EFI_HANDOVER_32: "XLF_EFI_HANDOVER_32",
    XLF_EFI_HANDOVER_64: "XLF_EFI_HANDOVER_64",
    XLF_EFI_KEXEC: "XLF_EFI_KEXEC",
    XLF_5LEVEL: "XLF_5LEVEL",
    XLF_5LEVEL_ENABLED: "XLF_5LEVEL_ENABLED",
    XLF_MEM_ENCRYPTION: "XLF_MEM_ENCRYPTION",
}
# The 64-bit entry is 0x200 past the start of the protected-mode code (boot.rst "64-bit BOOT PROTOCOL").
LINUX64_ENTRY_OFFSET = 0x200
# PE/COFF: "MZ" DOS stub, e_lfanew at 0x3c, then "PE\0\0".
MZ_MAGIC = b"MZ"
OFF_E_LFANEW = 0x3C
PE_MAGIC = b"PE\0\0"


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header`` (boot.rst "The real-mode kernel header"), file offset 0x1f1.

    Packed: the kernel declares it __attribute__((packed)). A kernel only
    defines the fields of its protocol version; :func:`parse_bzimage` reads
    newer ones as 0.
    """

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),  # 0x1f1
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),  # 2.04+
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),  # 0x1fe
        ("jump", ctypes.c_uint16),  # 0x200
        ("header", ctypes.c_uint32),  # 0x202 "HdrS"
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),  # 0x20e
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),  # 0x211
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),  # 0x214
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22c, 2.03+
        ("kernel_alignment", ctypes.c_uint32),  # 0x230, 2.05+
        ("relocatable_kernel", ctypes.c_uint8),  # 2.05+
        ("min_alignment", ctypes.c_uint8),  # 2.10+
        ("xloadflags", ctypes.c_uint16),  # 0x236, 2.12+
        ("cmdline_size", ctypes.c_uint32),  # 0x238, 2.06+
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),  # 0x248, 2.08+
        ("payload_length", ctypes.c_uint32),  # 0x24c, 2.08+
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),  # 0x258, 2.10+
        ("init_size", ctypes.c_uint32),  # 0x260, 2.10+
        ("handover_offset", ctypes.c_uint32),  # 0x264, 2.11+
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268, 2.15+
    ]


SETUP_HEADER_SIZE = ctypes.sizeof(SetupHeader)  # 0x7b: 0x1f1 up to 0x26c

# The protocol version that introduced each field we read (boot.rst).
FIELD_SINCE = {
    "syssize": 0x204, "initrd_addr_max": 0x203, "kernel_alignment": 0x205,
    "relocatable_kernel": 0x205, "cmdline_size": 0x206, "payload_offset": 0x208,
    "payload_length": 0x208, "pref_address": 0x20A, "init_size": 0x20A,
    "handover_offset": 0x20B, "xloadflags": 0x20C, "kernel_info_offset": 0x20F,
}


class BzImageInfo(Record):
    """The facts of a bzImage's setup header (Documentation/arch/x86/boot.rst)."""

    __slots__ = ("protocol", "protocol_str", "setup_sects", "loadflags", "xloadflags",
                 "pref_address", "init_size", "kernel_alignment", "relocatable",
                 "handover_offset", "cmdline_size", "initrd_addr_max", "kernel_version",
                 "pm_offset", "pm_size", "payload_offset", "payload_length", "codec",
                 "setup_header", "is_pe", "code32_start", "syssize")

    def __init__(
        self,
        protocol: int,  # e.g. 0x20f
        protocol_str: str,  # "2.15"
        setup_sects: int,  # effective value (0 in the file means 4)
        loadflags: int,
        xloadflags: int,
        pref_address: int,
        init_size: int,
        kernel_alignment: int,
        relocatable: bool,
        handover_offset: int,
        cmdline_size: int,
        initrd_addr_max: int,
        kernel_version: str | None,
        pm_offset: int,  # file offset of the protected-mode code
        pm_size: int,  # bytes of protected-mode code in the file
        payload_offset: int,  # absolute file offset of the compressed payload
        payload_length: int,
        codec: str | None,
        setup_header: bytes,
        is_pe: bool,
        code32_start: int = DEFAULT_LOAD_ADDRESS,
        syssize: int = 0,
    ) -> None:
        self.protocol = protocol
        self.protocol_str = protocol_str
        self.setup_sects = setup_sects
        self.loadflags = loadflags
        self.xloadflags = xloadflags
        self.pref_address = pref_address
        self.init_size = init_size
        self.kernel_alignment = kernel_alignment
        self.relocatable = relocatable
        self.handover_offset = handover_offset
        self.cmdline_size = cmdline_size
        self.initrd_addr_max = initrd_addr_max
        self.kernel_version = kernel_version
        self.pm_offset = pm_offset
        self.pm_size = pm_size
        self.payload_offset = payload_offset
        self.payload_length = payload_length
        self.codec = codec
        self.setup_header = setup_header
        self.is_pe = is_pe
        self.code32_start = code32_start
        self.syssize = syssize

    @property
    def loadflag_names(self) -> list[str]:
        return flag_names(self.loadflags, LOADFLAG_NAMES)

    @property
    def xloadflag_names(self) -> list[str]:
        return flag_names(self.xloadflags, XLOADFLAG_NAMES)

    @property
    def load_address(self) -> int:
        """Where a loader puts the protected-mode code.

        A relocatable kernel asks for pref_address (boot.rst: "a relocating
        bootloader should attempt to load at this address"); otherwise the
        kernel must sit at code32_start (0x100000 by default).
        """
        if self.relocatable and self.pref_address:
            return self.pref_address
        return self.code32_start or DEFAULT_LOAD_ADDRESS

    @property
    def linux64_entry(self) -> int | None:
        if self.xloadflags & XLF_KERNEL_64:
            return self.load_address + LINUX64_ENTRY_OFFSET
        return None

    @property
    def efi_handover_offset(self) -> int | None:
        if self.xloadflags & (XLF_EFI_HANDOVER_32 | XLF_EFI_HANDOVER_64):
            return self.handover_offset
        return None

    def no_payload_reason(self) -> str | None:
        """Why the header locates no compressed kernel (one clause), or None when it does.

        Two different cases: a protocol older than 2.08 has no payload
        fields at all; a newer one has them and says 0.
        """
        if self.payload_length:
            return None
        if self.protocol < FIELD_SINCE["payload_length"]:
            return (f"boot protocol {self.protocol_str} predates 2.08, which added the "
                    "payload_offset/payload_length fields that locate the compressed kernel")
        return (f"the setup header's payload_length is 0 (boot protocol {self.protocol_str}), "
                "so it locates no compressed kernel")

    @property
    def warnings(self) -> list[str]:
        """Header values no Linux build writes; ``inspect`` shows them, nothing refuses here.

        Describing an odd file is inspect's job; refusing to boot it is the
        boot path's, which checks what it needs itself.
        """
        out = []
        ka = self.kernel_alignment
        # boot.rst, kernel_alignment (2.05+): the physical alignment a
        # relocatable kernel needs, CONFIG_PHYSICAL_ALIGN, always a power of two.
        if self.protocol >= FIELD_SINCE["kernel_alignment"] and (
                ka & (ka - 1) or (ka == 0 and self.relocatable)):
            out.append(f"kernel_alignment {ka:#x} is not a power of two; "
                       "no boot loader can align the kernel to it")
        if self.protocol >= FIELD_SINCE["payload_length"] and not self.payload_length:
            out.append(self.no_payload_reason())
        return out


def flag_names(value: int, names: dict[int, str]) -> list[str]:
    out = [name for bit, name in names.items() if value & bit]
    unknown = value & ~sum(names)
    if unknown:
        out.append(f"{unknown:#x}")
    return out


def is_bzimage(data) -> bool:
    return len(data) >= OFF_HEADER + 4 and bytes(data[OFF_HEADER : OFF_HEADER + 4]) == HDRS_MAGIC


def is_pe(data) -> bool:
    """True when data is a PE image: "MZ" and a "PE\\0\\0" signature at e_lfanew."""
    if len(data) < OFF_E_LFANEW + 4 or bytes(data[:2]) != MZ_MAGIC:
        return False
    (lfanew,) = struct.unpack_from("<I", data, OFF_E_LFANEW)
    return lfanew <= len(data) - 4 and bytes(data[lfanew : lfanew + 4]) == PE_MAGIC


def parse_bzimage(data, *, what: str = "bzImage") -> BzImageInfo:
    """Read the setup header of a bzImage held in bytes/memoryview/mmap."""
    size = len(data)
    if size < OFF_VERSION + 2:
        raise ImageError(f"{what}: {size} bytes is too short for a bzImage setup header")
    if bytes(data[OFF_HEADER : OFF_HEADER + 4]) != HDRS_MAGIC:
        raise ImageError(f"{what}: no 'HdrS' magic at {OFF_HEADER:#x}; not a bzImage")
    (boot_flag,) = struct.unpack_from("<H", data, OFF_BOOT_FLAG)
    if boot_flag != BOOT_FLAG:
        raise ImageError(f"{what}: boot_flag at {OFF_BOOT_FLAG:#x} is {boot_flag:#06x}, "
                         f"not {BOOT_FLAG:#06x}; not a bzImage")
    header_end = OFF_HEADER + data[OFF_JUMP + 1]
    if header_end > size:
        raise ImageError(f"{what}: setup header ends at {header_end:#x}, past the end of the "
                         f"{size}-byte file; truncated")
    (protocol,) = struct.unpack_from("<H", data, OFF_VERSION)
    if protocol < 0x200:
        raise ImageError(f"{what}: boot protocol {protocol:#x} predates 2.00; not a bzImage")

    # Copy what the kernel declares; zero-fill the rest of our structure.
    declared = bytes(data[SETUP_HEADER_OFFSET : min(header_end, SETUP_HEADER_OFFSET
                                                    + SETUP_HEADER_SIZE)])
    hdr = SetupHeader.from_buffer_copy(declared.ljust(SETUP_HEADER_SIZE, b"\0"))

    def field(name: str) -> int:
        # A field newer than the kernel's protocol, or past the header it
        # declares, reads as 0: older kernels keep code or data there.
        desc = getattr(SetupHeader, name)
        end = SETUP_HEADER_OFFSET + desc.offset + desc.size
        if protocol < FIELD_SINCE.get(name, 0x200) or end > header_end:
            return 0
        return getattr(hdr, name)

    raw_setup_sects = data[OFF_SETUP_SECTS]
    setup_sects = raw_setup_sects or DEFAULT_SETUP_SECTS
    pm_offset = (setup_sects + 1) * SECTOR
    if pm_offset > size:
        raise ImageError(f"{what}: setup code ({setup_sects} sectors) ends at {pm_offset:#x}, "
                         f"past the end of the {size}-byte file; truncated")
    syssize = field("syssize")
    pm_size = size - pm_offset
    if syssize and syssize * 16 <= pm_size:
        # Trailing data (signatures, padding) is not kernel code.
        pm_size = syssize * 16
    elif syssize and syssize * 16 > pm_size:
        raise ImageError(f"{what}: header says {syssize * 16} bytes of protected-mode code "
                         f"but the file holds {pm_size}; truncated")

    payload_rel = field("payload_offset")
    payload_length = field("payload_length")
    payload_offset = pm_offset + payload_rel if protocol >= 0x208 else 0
    if protocol >= 0x208 and (payload_length or payload_rel):
        if payload_offset > size or payload_length > size - payload_offset:
            raise ImageError(
                f"{what}: payload ({payload_length} bytes at file offset {payload_offset:#x}) "
                f"lies outside the {size}-byte file; truncated or corrupt header")

    codec = None
    if payload_length:
        codec = _detect_codec(data, payload_offset, payload_length)

    return BzImageInfo(
        protocol=protocol,
        protocol_str=f"{protocol >> 8}.{protocol & 0xFF:02d}",
        setup_sects=setup_sects,
        loadflags=field("loadflags"),
        xloadflags=field("xloadflags"),
        pref_address=field("pref_address"),
        init_size=field("init_size"),
        kernel_alignment=field("kernel_alignment"),
        relocatable=bool(field("relocatable_kernel")),
        handover_offset=field("handover_offset"),
        cmdline_size=field("cmdline_size"),
        initrd_addr_max=field("initrd_addr_max"),
        kernel_version=_kernel_version(data, field("kernel_version"), pm_offset),
        pm_offset=pm_offset,
        pm_size=pm_size,
        payload_offset=payload_offset,
        payload_length=payload_length,
        codec=codec,
        setup_header=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        is_pe=is_pe(data),
        code32_start=field("code32_start") or DEFAULT_LOAD_ADDRESS,
        syssize=syssize,
    )


def _kernel_version(data, pointer: int, limit: int) -> str | None:
    """The version string that kernel_version points at, inside the setup code."""
    if not pointer:
        return None
    start = pointer + KERNEL_VERSION_BASE
    if start >= limit:
        return None
    chunk = bytes(data[start : min(limit, start + MAX_VERSION_LEN)])
    text = chunk.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    return text or None


def _detect_codec(data, offset: int, length: int) -> str | None:
    # compression.py belongs to the codecs helper; import lazily so a header-only
    # parse stays cheap.
    from .compression import detect_codec

    # Magics are a few bytes; 64 covers every codec's header.
    return detect_codec(bytes(data[offset : offset + min(length, 64)]))
