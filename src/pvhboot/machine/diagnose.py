"""Turning a stopped vCPU into a message a person can act on.

Register dumps for a triple fault, the decoded instruction behind an
emulation failure, a ``func+0x12`` symbol from a System.map, and one-line
texts for the KVM exits that end a run. Capstone is imported only when an
instruction is actually decoded: this module sits on the ``run`` path.
"""

from __future__ import annotations

import bisect
import functools

from ..errors import GuestError
from .pagewalk import EFER_LMA, read_linear

MAX_INSN_LEN = 15  # SDM vol. 2, 2.3.11: no x86 instruction is longer
PAGE_SIZE = 4096

RFLAGS_BITS = (
    (0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
    (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (21, "ID"),
)

# KVM_INTERNAL_ERROR_* suberrors (<linux/kvm.h>).
INTERNAL_SUBERRORS = {
    1: "emulation failure",  # KVM_INTERNAL_ERROR_EMULATION
    2: "simultaneous exceptions",  # KVM_INTERNAL_ERROR_SIMUL_EX
    3: "exception during event delivery",  # KVM_INTERNAL_ERROR_DELIVERY_EV
    4: "unexpected exit reason",  # KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
}


# --- CPU mode and code fetch ---------------------------------------------------


def code_bits(sregs) -> int:
    """Default operand size of the code segment: 64, 32 or 16 (CS.L, CS.D/B; SDM 3.4.5)."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


def code_linear(sregs, rip: int) -> int:
    """Linear address of CS:RIP (CS base is ignored in 64-bit mode)."""
    if code_bits(sregs) == 64:
        return rip & 0xFFFF_FFFF_FFFF_FFFF
    return (sregs.cs.base + rip) & 0xFFFF_FFFF


def fetch_code(mem, sregs, rip: int, n: int = MAX_INSN_LEN) -> bytes:
    """Up to ``n`` bytes at CS:RIP; shorter if the next page is unmapped. GuestError if none."""
    linear = code_linear(sregs, rip)
    first = min(n, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
    code = read_linear(mem, sregs, linear, first)
    if first < n:
        try:
            code += read_linear(mem, sregs, linear + first, n - first)
        except GuestError:
            pass  # the instruction may well end before the unmapped page
    return code


@functools.cache
def _disassembler(bits: int, detail: bool):
    import capstone  # lazy: only an emulation failure or a crash report needs it

    mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = detail
    return md


def disassemble(code: bytes, address: int, bits: int, *, detail: bool = False):
    """The first capstone instruction in ``code``, or None if it does not decode."""
    for insn in _disassembler(bits, detail).disasm(code, address, 1):
        return insn
    return None


def format_insn(insn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


def decode_at(mem, sregs, rip: int, n: int = MAX_INSN_LEN) -> str:
    """'mov eax, dword ptr [rbx]' for the instruction at CS:RIP, or why it cannot be shown."""
    try:
        code = fetch_code(mem, sregs, rip, n)
    except GuestError as exc:
        return f"<code not readable: {exc}>"
    insn = disassemble(code, rip, code_bits(sregs))
    if insn is None:
        return f"<not a valid instruction: {code.hex(' ')}>"
    return format_insn(insn)


# --- registers -------------------------------------------------------------------


def rflags_names(rflags: int) -> str:
    return " ".join(name for bit, name in RFLAGS_BITS if rflags >> bit & 1)


def _segment(name: str, seg) -> str:
    return (
        f"{name.upper():<3}={seg.selector:04x} base={seg.base:016x} limit={seg.limit:08x} "
        f"type={seg.type:x} s={seg.s} dpl={seg.dpl} p={seg.present} db={seg.db} l={seg.l} "
        f"g={seg.g}{' unusable' if seg.unusable else ''}"
    )


def register_dump(regs, sregs) -> str:
    """A multi-line dump of general, segment and control registers."""
    r = regs
    lines = [
        f"RAX={r.rax:016x} RBX={r.rbx:016x} RCX={r.rcx:016x} RDX={r.rdx:016x}",
        f"RSI={r.rsi:016x} RDI={r.rdi:016x} RBP={r.rbp:016x} RSP={r.rsp:016x}",
        f"R8 ={r.r8:016x} R9 ={r.r9:016x} R10={r.r10:016x} R11={r.r11:016x}",
        f"R12={r.r12:016x} R13={r.r13:016x} R14={r.r14:016x} R15={r.r15:016x}",
        f"RIP={r.rip:016x} RFLAGS={r.rflags:016x} [{rflags_names(r.rflags)}]",
    ]
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        lines.append(_segment(name, getattr(sregs, name)))
    lines += [
        f"GDT base={sregs.gdt.base:016x} limit={sregs.gdt.limit:04x}  "
        f"IDT base={sregs.idt.base:016x} limit={sregs.idt.limit:04x}",
        f"CR0={sregs.cr0:016x} CR2={sregs.cr2:016x} CR3={sregs.cr3:016x} CR4={sregs.cr4:016x}",
        f"CR8={sregs.cr8:016x} EFER={sregs.efer:016x} APIC_BASE={sregs.apic_base:016x}",
    ]
    return "\n".join(lines)


# --- symbols ---------------------------------------------------------------------

# System.map symbol types that name code (nm(1): t/T text, w/W weak).
_TEXT_TYPES = frozenset("tTwW")


class SymbolMap:
    """Text symbols of a System.map, for ``addr -> 'func+0x12'``."""

    def __init__(self, symbols: list[tuple[int, str]]) -> None:
        symbols = sorted(symbols)
        self._addrs = [a for a, _ in symbols]
        self._names = [n for _, n in symbols]
        self._end: int | None = None

    @classmethod
    def load(cls, path) -> SymbolMap:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            raise GuestError(
                f"cannot read System.map {path}: {exc.strerror}: check --system-map"
            ) from None
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> SymbolMap:
        symbols = []
        end = None
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            try:
                addr = int(parts[0], 16)
            except ValueError:
                continue
            # _end closes the image; init text lies past _etext, so that will not do.
            if parts[2] == "_end":
                end = addr
            if parts[1] in _TEXT_TYPES:
                symbols.append((addr, parts[2]))
        smap = cls(symbols)
        smap._end = end
        return smap

    def __len__(self) -> int:
        return len(self._addrs)

    def lookup(self, addr: int) -> str | None:
        """'func+0x12' for the text symbol at or below ``addr``; None outside kernel text."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or (self._end is not None and addr >= self._end):
            return None
        offset = addr - self._addrs[i]
        return self._names[i] if offset == 0 else f"{self._names[i]}+{offset:#x}"


# --- exit messages ---------------------------------------------------------------
# One line each; the register dump goes beside the message, not into it.


def where(rip: int | None, symbols: SymbolMap | None = None) -> str:
    """'at RIP 0xffffffff81000203 (do_one+0x3)', or '' when RIP is unknown."""
    if rip is None:
        return ""
    sym = symbols.lookup(rip) if symbols is not None else None
    return f"at RIP {rip:#x}" + (f" ({sym})" if sym else "")


def shutdown_message(rip: int | None, symbols: SymbolMap | None = None) -> str:
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (an exception while delivering a double fault)."""
    return f"the guest triple-faulted (KVM_EXIT_SHUTDOWN) {where(rip, symbols)}".rstrip()


# Basic exit reasons for VM-entry failures (SDM vol. 3C, 27.8 and appendix C):
# bit 31 of the reason marks a failed entry; the low 16 bits say why.
_ENTRY_FAILURE_REASONS = {
    33: "invalid guest state",
    34: "MSR loading failed",
    41: "machine-check event",
}


def fail_entry_message(hardware_entry_failure_reason: int, cpu: int | None = None) -> str:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""
    reason = hardware_entry_failure_reason
    what = _ENTRY_FAILURE_REASONS.get(reason & 0xFFFF)
    detail = f", {what}" if what else ""
    on_cpu = f" on host CPU {cpu}" if cpu is not None else ""
    return (
        f"KVM could not enter the guest{on_cpu} (KVM_EXIT_FAIL_ENTRY, hardware reason "
        f"{reason:#x}{detail}): the initial vCPU state is invalid for this CPU "
        "(check the boot protocol with --dry-run)"
    )


def internal_error_name(suberror: int) -> str:
    return INTERNAL_SUBERRORS.get(suberror, f"suberror {suberror}")


def internal_error_message(
    suberror: int,
    data: list[int] | tuple[int, ...] = (),
    *,
    rip: int | None = None,
    insn: str | None = None,
    symbols: SymbolMap | None = None,
    quirks_active: bool = False,
) -> str:
    """KVM_EXIT_INTERNAL_ERROR that nothing handled: what, which instruction, where, what to do."""
    msg = f"KVM internal error: {internal_error_name(suberror)}"
    if insn:
        msg += f": {insn}"
    if rip is not None:
        msg += f" {where(rip, symbols)}"
    if data:
        msg += " [data " + " ".join(f"{d:#x}" for d in data) + "]"
    if suberror == 1:  # KVM_INTERNAL_ERROR_EMULATION
        if quirks_active:
            msg += (
                ": if the kernel proper runs it, hide its CPU feature with clearcpuid=...; "
                "otherwise run on a host with VMX/SVM"
            )
        else:
            # The quirks layer emulates what the PVM backend is known to lack.
            msg += (
                ": on a PVM host leave the host quirks on (no --no-host-quirks), "
                "or run on a host with VMX/SVM"
            )
    return msg
