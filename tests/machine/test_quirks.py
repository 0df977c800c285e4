"""Host quirks: instruction finishing and #BP delivery, on hand-built guest state.

The vCPU here is a plain object holding kvm structs (get_regs/set_regs...):
the logic under test is what the quirk layer computes and writes into guest
memory and registers, not KVM.
"""

from __future__ import annotations

import struct

import pytest
from quirks_fakes import FakeVcpu

from pvhboot.kvm.structs import kvm_regs, kvm_sregs
from pvhboot.machine import quirks as q
from pvhboot.machine.memory import GuestMemory
from pvhboot.machine.quirks import HostQuirks

KERNEL = 0xFFFF_FFFF_8000_0000  # mapped to physical 0 by a 1 GiB page
PML4, PDPT_LOW, PDPT_HIGH = 0x1000, 0x2000, 0x3000
GDT, TSS, IDT = 0x5000, 0x6000, 0x7000
CODE = 0x20_0000
STACK_TOP = 0x10_0008  # deliberately not 16-byte aligned
IST1_TOP = 0x9_0000
RSP0_TOP = 0xA_0000
HANDLER = 0x40_0100
KERNEL_CS, KERNEL_DS, OTHER_CS = 0x10, 0x18, 0x20


def put64(mem, addr, value):
    mem.write(addr, struct.pack("<Q", value))


def gate64(handler, selector, ist, gate_type, dpl=0):
    attrs = 0x80 | (dpl << 5) | gate_type
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, selector, ist, attrs, (handler >> 16) & 0xFFFF,
        handler >> 32, 0,
    )


@pytest.fixture
def mem():
    with GuestMemory(16 << 20) as m:
        yield m


def long_mode(mem, code: bytes, *, ist=0, gate_type=q.GATE_TYPE_INTERRUPT, selector=KERNEL_CS):
    put64(mem, PML4 + 0 * 8, PDPT_LOW | 3)
    put64(mem, PDPT_LOW + 0 * 8, 0 | 0x83)  # 1 GiB identity
    put64(mem, PML4 + 511 * 8, PDPT_HIGH | 3)
    put64(mem, PDPT_HIGH + 510 * 8, 0 | 0x83)  # KERNEL -> 0
    put64(mem, GDT + KERNEL_CS, 0x00AF_9B00_0000_FFFF)
    put64(mem, GDT + KERNEL_DS, 0x00CF_9300_0000_FFFF)
    put64(mem, GDT + OTHER_CS, 0x00AF_9B00_0000_FFFF)
    put64(mem, TSS + q.TSS64_RSP0, KERNEL + RSP0_TOP)
    put64(mem, TSS + q.TSS64_IST1, KERNEL + IST1_TOP)
    mem.write(IDT + 3 * 16, gate64(KERNEL + HANDLER, selector, ist, gate_type, dpl=3))
    mem.write(CODE, code)

    regs = kvm_regs()
    regs.rip = KERNEL + CODE
    regs.rsp = KERNEL + STACK_TOP
    regs.rflags = 0x246 | q.RFLAGS_TF | q.RFLAGS_RF  # IF ZF PF, plus bits delivery clears
    regs.rax = 0x1234
    s = kvm_sregs()
    s.cr0 = 0x8005_0033
    s.cr3 = PML4
    s.cr4 = 0x20  # PAE
    s.efer = 0x500  # LME | LMA
    s.cs.selector, s.cs.l, s.cs.present, s.cs.s, s.cs.type = KERNEL_CS, 1, 1, 1, 0xB
    s.ss.selector, s.ss.present, s.ss.s, s.ss.type, s.ss.db = KERNEL_DS, 1, 1, 3, 1
    s.gs.base = KERNEL + 0x8_0000
    s.gdt.base, s.gdt.limit = KERNEL + GDT, 0x7F
    s.idt.base, s.idt.limit = KERNEL + IDT, 0xFFF
    s.tr.base, s.tr.limit, s.tr.type, s.tr.present = KERNEL + TSS, 0x67, 0xB, 1
    return FakeVcpu(regs, s)


def quirks():
    return HostQuirks(True, pvm_host=True)


def frame_at(mem, linear):
    return struct.unpack("<5Q", mem.read(linear - KERNEL, 40))


def test_int3_delivered_on_current_stack(mem):
    vcpu = long_mode(mem, b"\xcc\x90")
    hq = quirks()
    msg = hq.handle_internal_error(vcpu, mem)
    assert msg and "#BP" in msg
    r = vcpu.regs
    assert r.rip == KERNEL + HANDLER
    aligned = (KERNEL + STACK_TOP) & ~0xF
    assert r.rsp == aligned - 40
    rip, cs, rflags, rsp, ss = frame_at(mem, r.rsp)
    assert rip == KERNEL + CODE + 1  # the instruction after int3
    assert cs == KERNEL_CS and ss == KERNEL_DS
    assert rsp == KERNEL + STACK_TOP  # the unaligned original
    assert rflags == 0x246 | q.RFLAGS_TF | q.RFLAGS_RF  # pushed as it was
    assert not r.rflags & (q.RFLAGS_IF | q.RFLAGS_TF | q.RFLAGS_RF)  # interrupt gate
    assert r.rax == 0x1234
    assert hq.counts == {"int3": 1}
    assert "set_sregs" not in vcpu.calls  # same CS: segments untouched


def test_int3_trap_gate_keeps_if(mem):
    vcpu = long_mode(mem, b"\xcc", gate_type=q.GATE_TYPE_TRAP)
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.regs.rflags & q.RFLAGS_IF


def test_int3_uses_ist_stack(mem):
    vcpu = long_mode(mem, b"\xcc", ist=1)
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.regs.rsp == KERNEL + IST1_TOP - 40
    rip, _cs, _fl, rsp, _ss = frame_at(mem, vcpu.regs.rsp)
    assert rip == KERNEL + CODE + 1 and rsp == KERNEL + STACK_TOP


def test_int3_through_gate_with_other_selector_loads_cs(mem):
    vcpu = long_mode(mem, b"\xcc", selector=OTHER_CS)
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.sregs.cs.selector == OTHER_CS and vcpu.sregs.cs.l == 1
    _rip, cs, *_ = frame_at(mem, vcpu.regs.rsp)
    assert cs == KERNEL_CS


def test_int3_from_user_mode_switches_to_rsp0(mem):
    vcpu = long_mode(mem, b"\xcc")
    vcpu.sregs.cs.dpl = 3
    vcpu.sregs.cs.selector = OTHER_CS | 3
    vcpu.sregs.ss.selector = KERNEL_DS | 3
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.regs.rsp == KERNEL + RSP0_TOP - 40
    _rip, cs, _fl, rsp, ss = frame_at(mem, vcpu.regs.rsp)
    assert cs == OTHER_CS | 3 and ss == KERNEL_DS | 3 and rsp == KERNEL + STACK_TOP
    assert vcpu.sregs.cs.selector == KERNEL_CS and vcpu.sregs.cs.dpl == 0
    assert vcpu.sregs.ss.selector == 0


def test_int3_with_not_present_gate_is_not_handled(mem):
    vcpu = long_mode(mem, b"\xcc")
    mem.write(IDT + 3 * 16, bytes(16))
    assert quirks().handle_internal_error(vcpu, mem) is None
    assert vcpu.calls == []


def test_int3_in_32bit_protected_mode():
    with GuestMemory(4 << 20) as m:
        idt, code, esp = 0x1000, 0x2000, 0x8000
        m.write(idt + 3 * 8, struct.pack("<HHBBH", 0x3456, 0x10, 0, 0x8E, 0x0012))
        m.write(code, b"\xcc")
        regs = kvm_regs()
        regs.rip, regs.rsp, regs.rflags = code, esp, 0x202
        s = kvm_sregs()
        s.cr0 = 1
        s.cs.selector, s.cs.db, s.cs.present = 0x10, 1, 1
        s.idt.base, s.idt.limit = idt, 0x7FF
        vcpu = FakeVcpu(regs, s)
        assert quirks().handle_internal_error(vcpu, m)
        assert vcpu.regs.rip == 0x123456 and vcpu.regs.rsp == esp - 12
        assert struct.unpack("<3I", m.read(esp - 12, 12)) == (code + 1, 0x10, 0x202)
        assert not vcpu.regs.rflags & q.RFLAGS_IF


def test_wait_is_skipped(mem):
    vcpu = long_mode(mem, b"\x9b\x90")
    hq = quirks()
    assert hq.handle_internal_error(vcpu, mem)
    assert vcpu.regs.rip == KERNEL + CODE + 1
    assert hq.counts == {"wait": 1}


@pytest.mark.parametrize("code,ac", [(b"\x0f\x01\xca", False), (b"\x0f\x01\xcb", True)])
def test_clac_stac(mem, code, ac):
    vcpu = long_mode(mem, code)
    vcpu.regs.rflags |= 0 if ac else q.RFLAGS_AC
    assert quirks().handle_internal_error(vcpu, mem)
    assert bool(vcpu.regs.rflags & q.RFLAGS_AC) == ac
    assert vcpu.regs.rip == KERNEL + CODE + 3


def test_ldmxcsr_stack_operand(mem):
    vcpu = long_mode(mem, b"\x0f\xae\x54\x24\x08")  # ldmxcsr [rsp+8]
    mem.write(STACK_TOP + 8, struct.pack("<I", 0x1F80 | 0x40))
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.fpu.mxcsr == 0x1FC0
    assert vcpu.regs.rip == KERNEL + CODE + 5


def test_ldmxcsr_gs_rip_relative(mem):
    code = b"\x65\x0f\xae\x15\x10\x00\x00\x00"  # ldmxcsr gs:[rip+0x10]
    vcpu = long_mode(mem, code)
    next_rip = KERNEL + CODE + len(code)
    # choose GS base so that gs:[next_rip + 0x10] lands on 0x300000 (identity-mapped)
    vcpu.sregs.gs.base = (0x30_0000 - next_rip - 0x10) & (2**64 - 1)
    mem.write(0x30_0000, struct.pack("<I", 0x9F80))
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.fpu.mxcsr == 0x9F80


def test_ldmxcsr_indexed(mem):
    vcpu = long_mode(mem, b"\x0f\xae\x14\x8b")  # ldmxcsr [rbx+rcx*4]
    vcpu.regs.rbx, vcpu.regs.rcx = 0x30_0000, 4
    mem.write(0x30_0010, struct.pack("<I", 0x1F80))
    assert quirks().handle_internal_error(vcpu, mem)
    assert vcpu.fpu.mxcsr == 0x1F80 and vcpu.regs.rip == KERNEL + CODE + 4


def test_ldmxcsr_reserved_bits_not_handled(mem):
    vcpu = long_mode(mem, b"\x0f\xae\x14\x8b")
    vcpu.regs.rbx = 0x30_0000
    mem.write(0x30_0000, struct.pack("<I", 0x1_0000))
    assert quirks().handle_internal_error(vcpu, mem) is None
    assert vcpu.calls == []


def test_unknown_instruction_not_handled(mem):
    vcpu = long_mode(mem, b"\x0f\xae\x20")  # xsave [rax]
    hq = quirks()
    assert hq.handle_internal_error(vcpu, mem) is None
    assert vcpu.calls == [] and hq.counts == {}


def test_inactive_quirks_handle_nothing(mem):
    vcpu = long_mode(mem, b"\x9b")
    assert HostQuirks(False, pvm_host=True).handle_internal_error(vcpu, mem) is None
    assert HostQuirks(True, pvm_host=False).handle_internal_error(vcpu, mem) is None
    assert vcpu.calls == []


def test_cmdline_and_announcement():
    hq = quirks()
    assert hq.active
    assert hq.cmdline_suffix == "clearcpuid=xsave,cx16,smap,erms,fsrm,popcnt"
    assert hq.apply_cmdline("console=ttyS0") == "console=ttyS0 " + hq.cmdline_suffix
    assert hq.apply_cmdline("clearcpuid=pku") == "clearcpuid=pku"
    line = hq.announce()
    assert line.startswith("PVM host detected") and "--no-host-quirks" in line
    off = HostQuirks(False, pvm_host=True)
    assert not off.active and off.cmdline_suffix == "" and off.announce() is None


def test_detection_env_override(monkeypatch):
    monkeypatch.setenv(q.FORCE_ENV, "1")
    assert q.is_pvm_host() and HostQuirks(True).active
    monkeypatch.setenv(q.FORCE_ENV, "0")
    assert not q.is_pvm_host() and not HostQuirks(True).active
