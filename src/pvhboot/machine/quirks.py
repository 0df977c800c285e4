"""Work-arounds for KVM backends that run guests but have gaps (KVM-HOST-NOTES).

The development and CI machines run KVM's PVM backend (``/sys/module/kvm_pvm``):
CPUID is not filtered and its instruction emulator lacks some instructions,
so a run stops with KVM_EXIT_INTERNAL_ERROR where real hardware would go on.
On such a host, and only there, pvhboot:

- hides the CPU features whose instructions the emulator lacks, with
  ``clearcpuid=`` on the kernel command line (CPUID masks have no effect);
- finishes the instructions that still reach the emulator itself: ``int3``
  is delivered as #BP through the guest's IDT, ``wait``/``fwait`` is
  skipped, ``clac``/``stac`` set EFLAGS.AC, ``ldmxcsr`` loads MXCSR
  through KVM_SET_FPU, and the BMI1/BMI2, LZCNT/POPCNT and MOVBE
  instructions (BIT_INSNS) are computed here, since a bzImage's own
  decompressor uses them before any command line takes effect.

Anything else is left to the VMM to report. Capstone is imported only when
an instruction has to be decoded.
"""

from __future__ import annotations

import os
import struct

from ..errors import GuestError, KvmError
from .pagewalk import read_linear, write_linear

PVM_MODULE = "/sys/module/kvm_pvm"
FORCE_ENV = "PVHBOOT_FORCE_PVM_QUIRKS"

# Features whose instructions this emulator cannot run (KVM-HOST-NOTES gap 2).
# Linux >= 5.19 takes feature names here (arch/x86/kernel/cpu/common.c,
# cpu_parse_early_param, with CONFIG_X86_FEATURE_NAMES); the names are the
# lower-cased X86_FEATURE_* of cpufeatures.h. Bit numbers would also do:
# xsave 4*32+26, cx16 4*32+13, smap 9*32+20, erms 9*32+9, fsrm 18*32+4,
# popcnt 4*32+23.
CLEARCPUID_FEATURES = ("xsave", "cx16", "smap", "erms", "fsrm", "popcnt")
CLEARCPUID = "clearcpuid=" + ",".join(CLEARCPUID_FEATURES)

# EFLAGS bits (SDM vol. 1, 3.4.3).
RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_OF = 1 << 11
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
# The flags the bit-manipulation instructions define (SDM vol. 1, 3.4.3.1).
RFLAGS_ARITH = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF
# What an interrupt or exception clears on entry (SDM vol. 3A, 6.12.1.3);
# IF only through an interrupt gate.
RFLAGS_CLEARED_ON_EVENT = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM

BP_VECTOR = 3  # #BP, raised by int3 (SDM vol. 3A, table 6-1)
GATE64_SIZE = 16  # IA-32e IDT gate (SDM vol. 3A, 6.14.1)
GATE32_SIZE = 8
GATE_TYPE_INTERRUPT = 0xE  # IF cleared on entry
GATE_TYPE_TRAP = 0xF
# 64-bit TSS (SDM vol. 3A, 8.7): RSP0 at 4, IST1..IST7 at 0x24 + 8*(n-1).
TSS64_RSP0 = 0x04
TSS64_IST1 = 0x24
# MXCSR bits a guest may set (DAZ included); others make ldmxcsr #GP.
MXCSR_WRITABLE = 0xFFFF

# kvm_regs fields by the register names capstone prints, with their width in
# bytes: the 64-bit registers and their 32- and 16-bit sub-registers.
_GPR_FIELDS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
_GPR_WIDTH: dict[str, tuple[str, int]] = {
    **{f: (f, 8) for f in _GPR_FIELDS},
    **{"e" + f[1:]: (f, 4) for f in _GPR_FIELDS},
    **{f[1:]: (f, 2) for f in _GPR_FIELDS},
    **{f"r{i}": (f"r{i}", 8) for i in range(8, 16)},
    **{f"r{i}d": (f"r{i}", 4) for i in range(8, 16)},
    **{f"r{i}w": (f"r{i}", 2) for i in range(8, 16)},
}

# BMI1/BMI2/LZCNT/POPCNT/MOVBE: register-to-register (or memory-source)
# instructions the PVM emulator lacks but that a guest uses before it parses
# its command line (the zstd decompressor of a bzImage picks its BMI2 path
# from CPUID, which this host does not filter), so clearcpuid= cannot help.
# Each is finished here, exactly as the SDM (vol. 2) defines it.
BIT_INSNS = frozenset({
    "shlx", "shrx", "sarx", "rorx", "andn", "bzhi", "blsr", "blsi", "blsmsk",
    "pdep", "pext", "mulx", "lzcnt", "tzcnt", "popcnt", "movbe",
})


def is_pvm_host() -> bool:
    """True on a KVM PVM host; PVHBOOT_FORCE_PVM_QUIRKS=0/1 overrides the detection."""
    forced = os.environ.get(FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return os.path.exists(PVM_MODULE)


_diagnose_module = None


def _diagnose():
    """machine.diagnose, imported on the first emulation failure.

    It pulls in functools and collections (~0.7 ms of start-up) that a boot
    which never needs an emulation must not pay for; the handler runs up to
    millions of times per boot, so the module is kept once imported.
    """
    global _diagnose_module
    if _diagnose_module is None:
        from . import diagnose

        _diagnose_module = diagnose
    return _diagnose_module


class HostQuirks:
    def __init__(self, enabled: bool = True, *, pvm_host: bool | None = None) -> None:
        self.enabled = enabled
        self.pvm_host = is_pvm_host() if pvm_host is None else pvm_host
        self.counts: dict[str, int] = {}  # handled instructions per kind
        # (code bits, RIP) -> (the instruction's bytes, its _BitPlan or None for
        # anything else); used only while the bytes at RIP are still the same.
        self._plans: dict[tuple[int, int], tuple[bytes, _BitPlan | None]] = {}
        # Registers through kvm_run's sync area: None until the first failure
        # decides it (on, when KVM offers KVM_CAP_SYNC_REGS), then True/False.
        self._sync_regs: bool | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.pvm_host

    @property
    def cmdline_suffix(self) -> str:
        return CLEARCPUID if self.active else ""

    def apply_cmdline(self, cmdline: str) -> str:
        """``cmdline`` with the suffix appended (unless the user already set clearcpuid=)."""
        if not self.active or "clearcpuid=" in cmdline:
            return cmdline
        return f"{cmdline} {CLEARCPUID}".strip()

    def announce(self) -> str | None:
        """The one stderr line; the caller adds the "pvhboot: " prefix, as for every message."""
        if not self.active:
            return None
        return (
            f"PVM host detected: applying host quirks ({CLEARCPUID}, "
            "int3/wait/clac/stac/BMI emulation, MXCSR via KVM_SET_FPU); "
            "--no-host-quirks turns them off"
        )

    # --- emulation failures ------------------------------------------------------

    def handle_internal_error(self, vcpu, mem) -> str | None:
        """Finish the instruction KVM could not; a short description, or None if not ours."""
        if not self.active:
            return None
        diagnose = _diagnose()
        synced = _SyncedRegs.attach(vcpu) if self._sync_regs else None
        if synced is None and self._sync_regs is None:
            self._sync_regs = _SyncedRegs.enable(vcpu)
        if synced is not None:
            vcpu = synced
            regs, sregs = synced.regs, synced.sregs
        else:
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
        bits = diagnose.code_bits(sregs)
        try:
            code = diagnose.fetch_code(mem, sregs, regs.rip)
        except GuestError:
            return None
        key = (bits, regs.rip)
        cached = self._plans.get(key)
        insn = None
        if cached is not None and code.startswith(cached[0]):
            plan = cached[1]
        else:
            insn = diagnose.disassemble(code, regs.rip, bits, detail=True)
            if insn is None:
                return None
            plan = None
            if insn.mnemonic in BIT_INSNS:
                try:
                    plan = _plan_bit_insn(insn, bits)
                except GuestError:
                    return None
            if len(self._plans) >= PLAN_CACHE_MAX:
                self._plans.clear()
            self._plans[key] = (code[: insn.size], plan)
        try:
            if plan is not None:
                kind = plan.kind
                done = _run_bit_plan(vcpu, mem, regs, sregs, plan, bits)
            else:
                if insn is None:
                    insn = diagnose.disassemble(code, regs.rip, bits, detail=True)
                kind = insn.mnemonic
                done = self._other_insn(vcpu, mem, regs, sregs, insn, bits)
        except GuestError:
            # A guest structure we need (IDT, TSS, stack, operand) is not
            # reachable: let the VMM report the original failure.
            return None
        if done is None:
            return None
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return done

    def _other_insn(self, vcpu, mem, regs, sregs, insn, bits: int) -> str | None:
        kind = insn.mnemonic
        if kind == "int3":
            return self._deliver_bp(vcpu, mem, regs, sregs, insn.size, bits)
        if kind in ("wait", "fwait"):
            return self._skip(vcpu, regs, insn.size)
        if kind in ("clac", "stac"):
            if kind == "stac":
                regs.rflags |= RFLAGS_AC
            else:
                regs.rflags &= ~RFLAGS_AC
            return self._skip(vcpu, regs, insn.size)
        if kind in ("ldmxcsr", "vldmxcsr"):
            return self._ldmxcsr(vcpu, mem, regs, sregs, insn, bits)
        return None

    @staticmethod
    def _skip(vcpu, regs, length: int) -> str:
        rip = regs.rip
        regs.rip = rip + length
        vcpu.set_regs(regs)
        return f"skipped {length}-byte instruction at {rip:#x}"

    def _ldmxcsr(self, vcpu, mem, regs, sregs, insn, bits: int) -> str | None:
        ops = [op for op in insn.operands if op.type == _x86_op_mem()]
        if len(ops) != 1:
            return None
        addr = _effective_address(insn, ops[0].mem, regs, sregs, bits)
        value = struct.unpack("<I", read_linear(mem, sregs, addr, 4))[0]
        if value & ~MXCSR_WRITABLE:
            return None  # the CPU would raise #GP; leave it to the VMM to report
        fpu = vcpu.get_fpu()
        fpu.mxcsr = value
        vcpu.set_fpu(fpu)
        rip = regs.rip
        self._skip(vcpu, regs, insn.size)
        return f"loaded MXCSR={value:#x} at {rip:#x}"

    # --- #BP delivery ------------------------------------------------------------

    def _deliver_bp(self, vcpu, mem, regs, sregs, length: int, bits: int) -> str | None:
        if bits == 64:
            return _deliver_long_mode(vcpu, mem, regs, sregs, BP_VECTOR, regs.rip + length)
        if bits == 32:
            return _deliver_protected_mode(vcpu, mem, regs, sregs, BP_VECTOR, regs.rip + length)
        return None


# KVM_CAP_SYNC_REGS (Documentation/virt/kvm/api.rst, "kvm_valid_regs"): with
# these bits in kvm_run.kvm_valid_regs, KVM stores the registers into
# kvm_run.s on every exit, and loads the classes named in kvm_dirty_regs on
# the next KVM_RUN. A zstd decompressor brings about 1.5 million BMI2 exits
# per boot; reading regs and sregs there instead of three ioctls per exit
# (KVM_GET_REGS, KVM_GET_SREGS, KVM_SET_REGS) saves tens of seconds.
KVM_CAP_SYNC_REGS = 74  # <linux/kvm.h>; KVM_CHECK_EXTENSION returns the classes
KVM_SYNC_X86_REGS = 1 << 0  # <asm/kvm.h>
KVM_SYNC_X86_SREGS = 1 << 1
SYNC_WANTED = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS


class _SyncedRegs:
    """The vCPU seen through kvm_run's sync-regs area (struct kvm_sync_regs).

    ``regs``/``sregs`` are views of that area, valid because KVM stored them at
    this exit. set_regs marks the registers dirty instead of an ioctl; every
    other call goes to the vCPU. The first emulation failure of a run turns
    the syncing on (HostQuirks._sync_regs; that exit still uses the ioctls).
    """

    def __init__(self, vcpu, run, regs, sregs) -> None:
        self._vcpu, self._run = vcpu, run
        self.regs, self.sregs = regs, sregs

    @staticmethod
    def enable(vcpu) -> bool:
        """Ask KVM to sync regs/sregs from the next exit on; False where it cannot."""
        run = getattr(vcpu, "kvm_run", None)
        vm = getattr(vcpu, "vm", None)
        if run is None or not hasattr(run, "kvm_valid_regs") or vm is None:
            return False
        try:
            offered = vm.check_extension(KVM_CAP_SYNC_REGS)
        except (KvmError, OSError):
            return False
        if offered & SYNC_WANTED != SYNC_WANTED:
            return False
        run.kvm_valid_regs |= SYNC_WANTED
        return True

    @classmethod
    def attach(cls, vcpu):
        """The synced view for this exit, or None if KVM did not sync this vCPU."""
        run = getattr(vcpu, "kvm_run", None)
        if run is None or run.kvm_valid_regs & SYNC_WANTED != SYNC_WANTED:
            return None
        import ctypes

        from ..kvm.structs import kvm_regs, kvm_sregs

        base = ctypes.addressof(run) + type(run).s.offset
        regs = kvm_regs.from_address(base)
        # struct kvm_sync_regs: kvm_regs (144 bytes, 8-aligned), then kvm_sregs.
        sregs = kvm_sregs.from_address(base + ctypes.sizeof(kvm_regs))
        return cls(vcpu, run, regs, sregs)

    def set_regs(self, regs) -> None:
        if regs is not self.regs:
            import ctypes

            ctypes.pointer(self.regs)[0] = regs
        self._run.kvm_dirty_regs |= KVM_SYNC_X86_REGS

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def __getattr__(self, name):
        return getattr(self._vcpu, name)


def _x86_op_mem() -> int:
    from capstone import x86  # lazy, as everywhere on the run path

    return x86.X86_OP_MEM


def _effective_address(insn, mem_op, regs, sregs, bits: int) -> int:
    """Linear address of a memory operand (SDM vol. 1, 3.7.5), from capstone's details."""
    addr = mem_op.disp
    if mem_op.base:
        name = insn.reg_name(mem_op.base)
        if name in ("rip", "eip"):
            addr += regs.rip + insn.size
        else:
            addr += _reg(regs, name)
    if mem_op.index:
        addr += _reg(regs, insn.reg_name(mem_op.index)) * mem_op.scale
    addr_size = getattr(insn, "addr_size", bits // 8) or bits // 8
    addr &= (1 << (8 * addr_size)) - 1
    seg = insn.reg_name(mem_op.segment) if mem_op.segment else None
    if bits == 64:
        # Only FS and GS have bases in 64-bit mode.
        if seg in ("fs", "gs"):
            addr += getattr(sregs, seg).base
        return addr & 0xFFFF_FFFF_FFFF_FFFF
    if seg is None:
        base = insn.reg_name(mem_op.base) if mem_op.base else ""
        seg = "ss" if base in ("esp", "ebp") else "ds"
    return (getattr(sregs, seg).base + addr) & 0xFFFF_FFFF


def _reg(regs, name: str) -> int:
    field_width = _GPR_WIDTH.get(name)
    if field_width is None:
        raise GuestError(f"cannot evaluate register {name}")
    field, width = field_width
    return getattr(regs, field) & ((1 << (8 * width)) - 1)


# --- BMI1/BMI2/LZCNT/POPCNT/MOVBE ------------------------------------------------
#
# A zstd decompressor runs these in its inner loop, so one boot brings tens of
# thousands of exits per second here. Capstone's decode (with operand details)
# is the dearest part of handling one, so each distinct instruction is decoded
# once into a _BitPlan: plain tuples the executor reads without capstone.

# Operand descriptors in a plan:
#   ("r", kvm_regs field, width in bytes)
#   ("i", value)
#   ("m", base, base_mask, index, index_mask, scale, disp, segment, addr_mask, size)
# where base is a kvm_regs field, "rip" or None; index a field or None;
# segment "fs"/"gs"/"ds"/"ss"/... or None.
PLAN_CACHE_MAX = 4096  # instructions kept decoded (by address)


class _BitPlan:
    __slots__ = ("kind", "size", "text", "ops", "width")

    def __init__(self, kind: str, size: int, text: str, ops: tuple, width: int) -> None:
        self.kind, self.size, self.text, self.ops, self.width = kind, size, text, ops, width


def _plan_bit_insn(insn, bits: int) -> _BitPlan | None:
    """Capstone's decode of one of BIT_INSNS as a _BitPlan; None if its shape is unexpected."""
    from capstone import x86  # lazy, as everywhere on the run path

    ops = []
    for op in insn.operands:
        if op.type == x86.X86_OP_REG:
            field_width = _GPR_WIDTH.get(insn.reg_name(op.reg))
            if field_width is None:
                return None
            ops.append(("r", *field_width))
        elif op.type == x86.X86_OP_IMM:
            ops.append(("i", op.imm))
        elif op.type == x86.X86_OP_MEM:
            ops.append(_plan_mem(insn, op, bits))
        else:
            return None
    if not ops or ops[0][0] == "i":
        return None
    width = insn.operands[0].size * 8
    if width not in (16, 32, 64):
        return None
    kind = insn.mnemonic
    expected = {"blsr": 2, "blsi": 2, "blsmsk": 2, "lzcnt": 2, "tzcnt": 2, "popcnt": 2,
                "movbe": 2}.get(kind, 3)
    if len(ops) != expected:
        return None
    if kind != "movbe" and ops[0][0] != "r":
        return None
    return _BitPlan(kind, insn.size, _diagnose().format_insn(insn), tuple(ops), width)


def _plan_mem(insn, op, bits: int) -> tuple:
    m = op.mem
    base = base_mask = index = index_mask = None
    if m.base:
        name = insn.reg_name(m.base)
        if name in ("rip", "eip"):
            base, base_mask = "rip", (1 << 64) - 1
        else:
            base, base_width = _GPR_WIDTH.get(name, (None, 0))
            if base is None or base_width == 2:
                raise GuestError(f"cannot evaluate register {name} in a memory operand")
            base_mask = (1 << (8 * base_width)) - 1
    if m.index:
        name = insn.reg_name(m.index)
        index, index_width = _GPR_WIDTH.get(name, (None, 0))
        if index is None or index_width == 2:
            raise GuestError(f"cannot evaluate register {name} in a memory operand")
        index_mask = (1 << (8 * index_width)) - 1
    addr_size = getattr(insn, "addr_size", bits // 8) or bits // 8
    seg = insn.reg_name(m.segment) if m.segment else None
    if bits != 64 and seg is None:
        base_name = insn.reg_name(m.base) if m.base else ""
        seg = "ss" if base_name in ("esp", "ebp") else "ds"
    addr_mask = (1 << (8 * addr_size)) - 1
    return ("m", base, base_mask, index, index_mask, m.scale, m.disp, seg, addr_mask, op.size)


def _plan_address(op: tuple, regs, sregs, next_rip: int, bits: int) -> int:
    """Linear address of a planned memory operand (SDM vol. 1, 3.7.5)."""
    _m, base, base_mask, index, index_mask, scale, disp, seg, addr_mask, _size = op
    addr = disp
    if base == "rip":
        addr += next_rip
    elif base is not None:
        addr += getattr(regs, base) & base_mask
    if index is not None:
        addr += (getattr(regs, index) & index_mask) * scale
    addr &= addr_mask
    if bits == 64:
        # Only FS and GS have bases in 64-bit mode.
        if seg in ("fs", "gs"):
            addr += getattr(sregs, seg).base
        return addr & 0xFFFF_FFFF_FFFF_FFFF
    return (getattr(sregs, seg).base + addr) & 0xFFFF_FFFF


def _run_bit_plan(vcpu, mem, regs, sregs, plan: _BitPlan, bits: int) -> str:
    """Finish one of BIT_INSNS: read its sources, compute, write, advance RIP.

    Every source is read (and a memory destination's pages translated) before
    anything is written, so a GuestError leaves the vCPU untouched. Flags an
    instruction leaves undefined keep their old values.
    """
    kind, ops, width = plan.kind, plan.ops, plan.width
    rip = regs.rip
    next_rip = rip + plan.size

    def value(op) -> int:
        tag = op[0]
        if tag == "r":
            return getattr(regs, op[1]) & ((1 << (8 * op[2])) - 1)
        if tag == "i":
            return op[1]
        addr = _plan_address(op, regs, sregs, next_rip, bits)
        return int.from_bytes(read_linear(mem, sregs, addr, op[9]), "little")

    mask = (1 << width) - 1
    sign = 1 << (width - 1)
    flags = None  # (new bits, the flags the instruction defines)
    writes: list[tuple[tuple, int]] = []  # (register operand, value) in write order
    dest = ops[0]
    if kind in ("shlx", "shrx", "sarx"):
        # dest = src1 shifted by src2, the count masked to 5 or 6 bits (SDM SHLX).
        src, count = value(ops[1]), value(ops[2]) & (width - 1)
        if kind == "shlx":
            result = src << count
        elif kind == "shrx":
            result = src >> count
        else:
            result = (src - (1 << width) if src & sign else src) >> count
        writes.append((dest, result & mask))
    elif kind == "rorx":
        src, count = value(ops[1]), value(ops[2]) & (width - 1)
        writes.append((dest, ((src >> count) | (src << (width - count))) & mask))
    elif kind == "andn":
        # Intel order: andn dest, src1 (inverted, VEX.vvvv), src2 (r/m).
        result = ~value(ops[1]) & value(ops[2]) & mask
        writes.append((dest, result))
        flags = (_zs(result, sign), RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF | RFLAGS_CF)
    elif kind == "bzhi":
        # Index from bits 7:0 of VEX.vvvv; CF when it is past the operand size.
        src, index = value(ops[1]), value(ops[2]) & 0xFF
        if index < width:
            result, cf = src & ((1 << index) - 1), 0
        else:
            result, cf = src, RFLAGS_CF
        writes.append((dest, result))
        flags = (_zs(result, sign) | cf, RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF | RFLAGS_CF)
    elif kind in ("blsr", "blsi", "blsmsk"):
        src = value(ops[1])
        if kind == "blsr":
            result = src & (src - 1) & mask
            new = _zs(result, sign) | (RFLAGS_CF if src == 0 else 0)
        elif kind == "blsi":
            result = src & -src & mask
            new = _zs(result, sign) | (RFLAGS_CF if src != 0 else 0)
        else:  # blsmsk: ZF is always cleared (SDM BLSMSK)
            result = (src ^ (src - 1)) & mask
            new = (RFLAGS_SF if result & sign else 0) | (RFLAGS_CF if src == 0 else 0)
        writes.append((dest, result))
        flags = (new, RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF | RFLAGS_CF)
    elif kind in ("pdep", "pext"):
        # pdep/pext dest, src (VEX.vvvv), mask (r/m).
        src, sel = value(ops[1]), value(ops[2])
        result, k = 0, 0
        for bit in range(width):
            if sel >> bit & 1:
                if kind == "pdep":
                    result |= (src >> k & 1) << bit
                else:
                    result |= (src >> bit & 1) << k
                k += 1
        writes.append((dest, result))
    elif kind == "mulx":
        # mulx hi (ModRM.reg), lo (VEX.vvvv), src (r/m): EDX/RDX * src, no flags.
        # The high half is written last: if both name one register, it wins.
        product = (regs.rdx & mask) * value(ops[2])
        writes.append((ops[1], product & mask))
        writes.append((dest, product >> width))
    elif kind in ("lzcnt", "tzcnt"):
        src = value(ops[1])
        if kind == "lzcnt":
            result = width - src.bit_length()
        else:
            result = (src & -src).bit_length() - 1 if src else width
        writes.append((dest, result))
        new = (RFLAGS_CF if src == 0 else 0) | (RFLAGS_ZF if result == 0 else 0)
        flags = (new, RFLAGS_ZF | RFLAGS_CF)
    elif kind == "popcnt":
        src = value(ops[1])
        writes.append((dest, bin(src).count("1")))
        flags = (RFLAGS_ZF if src == 0 else 0, RFLAGS_ARITH)
    else:  # movbe
        data = value(ops[1]).to_bytes(width // 8, "little")[::-1]
        if dest[0] == "m":
            addr = _plan_address(dest, regs, sregs, next_rip, bits)
            write_linear(mem, sregs, addr, data)
        else:
            writes.append((dest, int.from_bytes(data, "little")))
    for (_r, field, nbytes), result in writes:
        if nbytes == 2:  # a 16-bit destination keeps bits 63:16 (SDM vol. 1, 3.4.1.1)
            result = (getattr(regs, field) & ~0xFFFF) | result
        setattr(regs, field, result)  # 32-bit results are already zero-extended
    if flags is not None:
        new, defined = flags
        regs.rflags = (regs.rflags & ~defined) | new
    regs.rip = next_rip
    vcpu.set_regs(regs)
    return f"emulated {plan.text} at {rip:#x}"


def _zs(result: int, sign: int) -> int:
    """ZF and SF for a result (SDM vol. 1, 3.4.3.1)."""
    return (RFLAGS_ZF if result == 0 else 0) | (RFLAGS_SF if result & sign else 0)


def _push_frame(mem, sregs, rsp: int, values: list[int], width: int, mask: int) -> int:
    """Push ``values`` in order (first ends highest); returns the new stack pointer."""
    data = b"".join(v.to_bytes(width, "little") for v in reversed([x & mask for x in values]))
    new_rsp = rsp - len(data)
    write_linear(mem, sregs, new_rsp, data)
    return new_rsp


def _read_gate64(mem, sregs, vector: int) -> tuple[int, int, int, int, int, bool]:
    """(offset, selector, ist, type, dpl, present) of a 16-byte IDT gate."""
    if sregs.idt.limit < vector * GATE64_SIZE + GATE64_SIZE - 1:
        raise GuestError(f"IDT limit {sregs.idt.limit:#x} does not cover vector {vector}")
    raw = read_linear(mem, sregs, sregs.idt.base + vector * GATE64_SIZE, GATE64_SIZE)
    off_lo, selector, ist, attrs, off_mid, off_hi = struct.unpack_from("<HHBBHI", raw)
    offset = off_lo | (off_mid << 16) | (off_hi << 32)
    return offset, selector, ist & 0x7, attrs & 0xF, (attrs >> 5) & 0x3, bool(attrs & 0x80)


def _deliver_long_mode(vcpu, mem, regs, sregs, vector: int, return_rip: int) -> str | None:
    """Deliver a software exception through a 64-bit IDT gate, as the CPU would.

    SDM vol. 3A, 6.14: the frame is always SS, RSP, RFLAGS, CS, RIP; the new
    stack is the gate's IST slot, else RSP0 on a privilege change, else the
    current stack; RSP is aligned down to 16 bytes before the pushes.
    """
    handler, selector, ist, gate_type, _dpl, present = _read_gate64(mem, sregs, vector)
    if not present or gate_type not in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP):
        return None
    cpl = sregs.cs.dpl
    same_cs = (selector & ~3) == (sregs.cs.selector & ~3)
    new_cs = None if same_cs else _load_code_segment(mem, sregs, selector)
    new_cpl = cpl if new_cs is None else new_cs.dpl
    if ist:
        rsp = _tss_u64(mem, sregs, TSS64_IST1 + 8 * (ist - 1))
    elif new_cpl < cpl:
        rsp = _tss_u64(mem, sregs, TSS64_RSP0)
    else:
        rsp = regs.rsp
    rsp &= ~0xF
    old_ss = sregs.ss.selector
    old_cs = sregs.cs.selector
    frame = [old_ss, regs.rsp, regs.rflags, old_cs, return_rip]
    mask = 0xFFFF_FFFF_FFFF_FFFF
    new_rsp = _push_frame(mem, sregs, rsp, frame, 8, mask)
    regs.rsp = new_rsp
    regs.rip = handler
    regs.rflags &= ~RFLAGS_CLEARED_ON_EVENT
    if gate_type == GATE_TYPE_INTERRUPT:
        regs.rflags &= ~RFLAGS_IF
    if new_cs is not None:
        sregs.cs = new_cs
        sregs.cs.selector = (selector & ~3) | new_cpl
        if new_cpl != cpl:
            # A privilege change in IA-32e mode loads SS with a NULL selector
            # whose RPL is the new CPL (SDM vol. 3A, 6.14.4).
            sregs.ss.selector = new_cpl
            sregs.ss.dpl = new_cpl
        vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
    return f"delivered #BP at {return_rip - 1:#x} to handler {handler:#x}"


def _deliver_protected_mode(vcpu, mem, regs, sregs, vector: int, return_eip: int) -> str | None:
    """Same-privilege delivery through a 32-bit gate: push EFLAGS, CS, EIP (SDM 6.12.1)."""
    if sregs.idt.limit < vector * GATE32_SIZE + GATE32_SIZE - 1:
        return None
    raw = read_linear(mem, sregs, sregs.idt.base + vector * GATE32_SIZE, GATE32_SIZE)
    off_lo, selector, _zero, attrs, off_hi = struct.unpack("<HHBBH", raw)
    gate_type = attrs & 0xF
    if not attrs & 0x80 or gate_type not in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP):
        return None
    if (selector & ~3) != (sregs.cs.selector & ~3):
        return None  # a far/privilege-changing gate: not something Linux does on int3
    esp_linear = (sregs.ss.base + (regs.rsp & 0xFFFF_FFFF)) & 0xFFFF_FFFF
    frame = [regs.rflags, sregs.cs.selector, return_eip]
    new_linear = _push_frame(mem, sregs, esp_linear, frame, 4, 0xFFFF_FFFF)
    regs.rsp = (regs.rsp & ~0xFFFF_FFFF) | ((new_linear - sregs.ss.base) & 0xFFFF_FFFF)
    regs.rip = off_lo | (off_hi << 16)
    regs.rflags &= ~RFLAGS_CLEARED_ON_EVENT
    if gate_type == GATE_TYPE_INTERRUPT:
        regs.rflags &= ~RFLAGS_IF
    vcpu.set_regs(regs)
    return f"delivered #BP at {return_eip - 1:#x} to handler {regs.rip:#x}"


def _tss_u64(mem, sregs, offset: int) -> int:
    if sregs.tr.limit < offset + 7:
        raise GuestError(f"TSS limit {sregs.tr.limit:#x} does not cover offset {offset:#x}")
    return struct.unpack("<Q", read_linear(mem, sregs, sregs.tr.base + offset, 8))[0]


def _load_code_segment(mem, sregs, selector: int):
    """A kvm_segment for a GDT code descriptor (SDM vol. 3A, 3.4.5)."""
    index = selector & ~7
    if selector & 4 or index == 0 or sregs.gdt.limit < index + 7:
        raise GuestError(f"IDT gate selector {selector:#x} is not a usable GDT entry")
    desc = struct.unpack("<Q", read_linear(mem, sregs, sregs.gdt.base + index, 8))[0]
    seg = type(sregs.cs)()
    seg.selector = selector
    seg.base = ((desc >> 16) & 0xFF_FFFF) | (((desc >> 56) & 0xFF) << 24)
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    seg.g = (desc >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.type = (desc >> 40) & 0xF
    seg.s = (desc >> 44) & 1
    seg.dpl = (desc >> 45) & 3
    seg.present = (desc >> 47) & 1
    seg.avl = (desc >> 52) & 1
    seg.l = (desc >> 53) & 1
    seg.db = (desc >> 54) & 1
    if not seg.present or not seg.s or not seg.type & 0x8:
        raise GuestError(f"IDT gate selector {selector:#x} does not name a present code segment")
    return seg
