"""The BootPlan: everything a hypervisor backend needs to start a guest.

It is plain data. ``boot/`` builds it from a ``KernelImage``; ``machine/``
(KVM) or any later backend applies it. Nothing here knows about KVM, so a
plan can be printed, compared and tested without /dev/kvm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class MemoryRange:
    """One entry of the guest's physical memory map (e820 / hvm memmap)."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class FileRange:
    """Bytes that live in a file: the backend may map them instead of copying."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """Guest-physical bytes to place before the first instruction.

    ``source`` is either ``bytes`` (built by the planner) or a ``FileRange``
    (a kernel segment the backend can mmap). ``size`` may exceed the source
    length; the rest is zero (ELF ``p_memsz > p_filesz``). Guest RAM starts
    zeroed, so a backend needs to write zeroes only over file mappings.
    """

    addr: int
    size: int
    source: bytes | FileRange
    label: str

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def data_length(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.length


@dataclass(frozen=True)
class Segment:
    """A segment register as the CPU caches it (descriptor already decoded)."""

    selector: int
    base: int
    limit: int
    type: int  # 4-bit descriptor type (e.g. 0xb = execute/read, accessed)
    s: int = 1  # 1 = code/data, 0 = system (TSS, LDT)
    dpl: int = 0
    present: int = 1
    avl: int = 0
    l: int = 0  # 64-bit code segment  # noqa: E741
    db: int = 1  # default operand size 32-bit
    g: int = 1  # limit in 4 KiB units
    unusable: int = 0


@dataclass
class CpuState:
    """The boot vCPU's registers at the first guest instruction."""

    rip: int
    rflags: int = 0x2  # bit 1 is reserved and always set
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    cs: Segment | None = None
    ds: Segment | None = None
    es: Segment | None = None
    fs: Segment | None = None
    gs: Segment | None = None
    ss: Segment | None = None
    tr: Segment | None = None
    ldt: Segment | None = None
    gdt_base: int = 0
    gdt_limit: int = 0
    idt_base: int = 0
    idt_limit: int = 0


@dataclass
class BootPlan:
    """A prepared boot: memory contents, memory map and the boot vCPU state."""

    protocol: str  # "pvh" or "linux64"
    memory_size: int  # bytes of guest RAM
    memory_map: list[MemoryRange]
    chunks: list[Chunk]
    cpu: CpuState
    cmdline: str
    # Human-readable lines: why this protocol, where things went.
    notes: list[str] = field(default_factory=list)
