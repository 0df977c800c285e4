"""The BootPlan: everything a hypervisor backend needs to start a guest.

It is plain data. ``boot/`` builds it from a ``KernelImage``; ``machine/``
(KVM) or any later backend applies it. Nothing here knows about KVM, so a
plan can be printed, compared and tested without /dev/kvm.
"""

from __future__ import annotations

from .._record import FrozenRecord, Record

# E820 / hvm_memmap_table_entry types (ACPI "Address Range Types"; Xen
# start_info.h uses the same numbers for XEN_HVM_MEMMAP_TYPE_*).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

E820_TYPE_NAMES = {
    E820_RAM: "usable",
    E820_RESERVED: "reserved",
    E820_ACPI: "ACPI data",
    E820_NVS: "ACPI NVS",
    E820_UNUSABLE: "unusable",
}


class MemoryRange(FrozenRecord):
    """One entry of the guest's physical memory map (e820 / hvm memmap)."""

    __slots__ = ("addr", "size", "type")

    def __init__(self, addr: int, size: int, type: int) -> None:  # noqa: A002 (e820 name)
        self._init(addr, size, type)

    @property
    def end(self) -> int:
        return self.addr + self.size

    def __repr__(self) -> str:
        return f"MemoryRange(addr={self.addr:#x}, size={self.size:#x}, type={self.type})"


class FileRange(FrozenRecord):
    """Bytes that live in a file: the backend may map them instead of copying."""

    __slots__ = ("path", "offset", "length")

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._init(path, offset, length)


class Chunk(FrozenRecord):
    """Guest-physical bytes to place before the first instruction.

    ``source`` is either ``bytes`` (built by the planner) or a ``FileRange``
    (a kernel segment the backend can mmap). ``size`` may exceed the source
    length; the rest is zero (ELF ``p_memsz > p_filesz``). Guest RAM starts
    zeroed, so a backend needs to write zeroes only over file mappings.
    """

    __slots__ = ("addr", "size", "source", "label")

    def __init__(self, addr: int, size: int, source: bytes | FileRange, label: str) -> None:
        self._init(addr, size, source, label)

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def data_length(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.length


class Segment(FrozenRecord):
    """A segment register as the CPU caches it (descriptor already decoded)."""

    __slots__ = ("selector", "base", "limit", "type", "s", "dpl", "present", "avl", "l", "db",
                 "g", "unusable")

    def __init__(
        self,
        selector: int,
        base: int,
        limit: int,
        type: int,  # noqa: A002  4-bit descriptor type (e.g. 0xb = execute/read, accessed)
        s: int = 1,  # 1 = code/data, 0 = system (TSS, LDT)
        dpl: int = 0,
        present: int = 1,
        avl: int = 0,
        l: int = 0,  # 64-bit code segment  # noqa: E741
        db: int = 1,  # default operand size 32-bit
        g: int = 1,  # limit in 4 KiB units
        unusable: int = 0,
    ) -> None:
        self._init(selector, base, limit, type, s, dpl, present, avl, l, db, g, unusable)


class CpuState(Record):
    """The boot vCPU's registers at the first guest instruction.

    Every argument after ``rip`` has a default; pass them by keyword.
    """

    __slots__ = ("rip", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "cr0", "cr3", "cr4", "efer", "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt",
                 "gdt_base", "gdt_limit", "idt_base", "idt_limit")

    def __init__(
        self,
        rip: int,
        rflags: int = 0x2,  # bit 1 is reserved and always set
        rax: int = 0,
        rbx: int = 0,
        rcx: int = 0,
        rdx: int = 0,
        rsi: int = 0,
        rdi: int = 0,
        rsp: int = 0,
        rbp: int = 0,
        cr0: int = 0,
        cr3: int = 0,
        cr4: int = 0,
        efer: int = 0,
        cs: Segment | None = None,
        ds: Segment | None = None,
        es: Segment | None = None,
        fs: Segment | None = None,
        gs: Segment | None = None,
        ss: Segment | None = None,
        tr: Segment | None = None,
        ldt: Segment | None = None,
        gdt_base: int = 0,
        gdt_limit: int = 0,
        idt_base: int = 0,
        idt_limit: int = 0,
    ) -> None:
        self.rip = rip
        self.rflags = rflags
        self.rax = rax
        self.rbx = rbx
        self.rcx = rcx
        self.rdx = rdx
        self.rsi = rsi
        self.rdi = rdi
        self.rsp = rsp
        self.rbp = rbp
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.efer = efer
        self.cs = cs
        self.ds = ds
        self.es = es
        self.fs = fs
        self.gs = gs
        self.ss = ss
        self.tr = tr
        self.ldt = ldt
        self.gdt_base = gdt_base
        self.gdt_limit = gdt_limit
        self.idt_base = idt_base
        self.idt_limit = idt_limit


class BootPlan(Record):
    """A prepared boot: memory contents, memory map and the boot vCPU state."""

    __slots__ = ("protocol", "memory_size", "memory_map", "chunks", "cpu", "cmdline", "notes")

    def __init__(
        self,
        protocol: str,  # "pvh" or "linux64"
        memory_size: int,  # bytes of guest RAM
        memory_map: list[MemoryRange],
        chunks: list[Chunk],
        cpu: CpuState,
        cmdline: str,
        # Human-readable lines: why this protocol, where things went.
        notes: list[str] | None = None,
    ) -> None:
        self.protocol = protocol
        self.memory_size = memory_size
        self.memory_map = memory_map
        self.chunks = chunks
        self.cpu = cpu
        self.cmdline = cmdline
        self.notes = [] if notes is None else notes
