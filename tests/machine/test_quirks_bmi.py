"""Host quirks: BMI1/BMI2, LZCNT/TZCNT/POPCNT and MOVBE finished by the VMM.

The PVM emulator stops on these (a bzImage's zstd decompressor picks its BMI2
path from CPUID before any command line applies). Each case runs the quirk
layer on hand-built long-mode state: a plain vCPU object holding kvm structs,
guest memory identity-mapped by one 1 GiB page. Encodings are from GNU as.
"""

from __future__ import annotations

import ctypes
import struct

import pytest
from quirks_fakes import FakeVcpu

from pvhboot.kvm.structs import kvm_regs, kvm_sregs
from pvhboot.machine import quirks as q
from pvhboot.machine.memory import GuestMemory
from pvhboot.machine.quirks import HostQuirks

PML4, PDPT = 0x1000, 0x2000
CODE = 0x20_0000
DATA = 0x30_0000
M64 = 2**64 - 1
# Flags set before each instruction, so that "cleared" and "left alone" differ.
FLAGS_IN = 0x2 | q.RFLAGS_ARITH
UNDEFINED_KEPT = q.RFLAGS_PF | q.RFLAGS_AF


@pytest.fixture
def mem():
    with GuestMemory(8 << 20) as m:
        m.write(PML4, struct.pack("<Q", PDPT | 3))
        m.write(PDPT, struct.pack("<Q", 0x83))  # 1 GiB identity
        yield m


def vcpu_with(mem, code: bytes, flags: int = FLAGS_IN, **values) -> FakeVcpu:
    mem.write(CODE, code)
    regs = kvm_regs()
    regs.rip, regs.rsp, regs.rflags = CODE, 0x10_0000, flags
    for name, value in values.items():
        setattr(regs, name, value & M64)
    s = kvm_sregs()
    s.cr0, s.cr3, s.cr4, s.efer = 0x8005_0033, PML4, 0x20, 0x500
    s.cs.selector, s.cs.l, s.cs.present, s.cs.s, s.cs.type = 0x10, 1, 1, 1, 0xB
    return FakeVcpu(regs, s)


def run(mem, code: bytes, *, flags: int = FLAGS_IN, **values) -> tuple[FakeVcpu, HostQuirks]:
    vcpu = vcpu_with(mem, code, flags, **values)
    hq = HostQuirks(True, pvm_host=True)
    msg = hq.handle_internal_error(vcpu, mem)
    assert msg and "emulated" in msg
    assert vcpu.regs.rip == CODE + len(code)
    return vcpu, hq


SHLX_R13D = bytes.fromhex("c46241f7ed")  # shlx r13d, ebp, edi
SHLX_RAX = bytes.fromhex("c4e2f1f7c3")  # shlx rax, rbx, rcx
SHRX_EAX_MEM = bytes.fromhex("c4e24bf701")  # shrx eax, dword ptr [rcx], esi
SHRX_RAX_MEM = bytes.fromhex("c4e2f3f74308")  # shrx rax, qword ptr [rbx+8], rcx
SARX_RAX = bytes.fromhex("c4e2f2f7c3")  # sarx rax, rbx, rcx
SARX_EAX = bytes.fromhex("c4e272f7c3")  # sarx eax, ebx, ecx


def test_shlx_32bit_zero_extends_and_masks_count(mem):
    # count 33 & 31 = 1; the old upper half of r13 must be cleared.
    vcpu, hq = run(mem, SHLX_R13D, rbp=0xFFFF_FFFF_C000_0001, rdi=33, r13=-1)
    assert vcpu.regs.r13 == 0x8000_0002
    assert vcpu.regs.rflags == FLAGS_IN  # flags unaffected
    assert hq.counts == {"shlx": 1}


def test_shlx_64bit_masks_count_to_6_bits(mem):
    vcpu, _ = run(mem, SHLX_RAX, rbx=0x8000_0000_0000_0003, rcx=64 + 4)
    assert vcpu.regs.rax == 0x30
    vcpu, _ = run(mem, SHLX_RAX, rbx=3, rcx=63)
    assert vcpu.regs.rax == 1 << 63


def test_shrx_memory_source_32bit(mem):
    mem.write(DATA, struct.pack("<II", 0xF000_0010, 0xDEAD_BEEF))
    vcpu, hq = run(mem, SHRX_EAX_MEM, rcx=DATA, rsi=0x24, rax=-1)  # 0x24 & 31 = 4
    assert vcpu.regs.rax == 0x0F00_0001  # only 4 bytes read, zero-extended
    assert hq.counts == {"shrx": 1}


def test_shrx_memory_source_64bit_with_displacement(mem):
    mem.write(DATA + 8, struct.pack("<Q", 0x8000_0000_0000_0000))
    vcpu, _ = run(mem, SHRX_RAX_MEM, rbx=DATA, rcx=63)
    assert vcpu.regs.rax == 1


def test_sarx_sign_fills(mem):
    vcpu, _ = run(mem, SARX_RAX, rbx=0x8000_0000_0000_0000, rcx=4)
    assert vcpu.regs.rax == 0xF800_0000_0000_0000
    vcpu, _ = run(mem, SARX_EAX, rbx=0x1_8000_0000, rcx=32 + 31, rax=-1)
    assert vcpu.regs.rax == 0xFFFF_FFFF  # sign of the 32-bit source, zero-extended
    vcpu, _ = run(mem, SARX_EAX, rbx=0x7FFF_FFFF, rcx=30)
    assert vcpu.regs.rax == 1


def test_unreadable_memory_source_leaves_vcpu_alone(mem):
    vcpu = vcpu_with(mem, SHRX_EAX_MEM, rcx=0x7F_0000_0000)  # not mapped
    assert HostQuirks(True, pvm_host=True).handle_internal_error(vcpu, mem) is None
    assert vcpu.calls == []


def test_rorx(mem):
    code = bytes.fromhex("c4e37bf0c324")  # rorx eax, ebx, 36 -> 36 & 31 = 4
    vcpu, _ = run(mem, code, rbx=0x1234_5678, rax=-1)
    assert vcpu.regs.rax == 0x8123_4567 and vcpu.regs.rflags == FLAGS_IN
    code = bytes.fromhex("c4e3fbf0c308")  # rorx rax, rbx, 8
    vcpu, _ = run(mem, code, rbx=0x0102_0304_0506_07FF)
    assert vcpu.regs.rax == 0xFF01_0203_0405_0607


def arith(flags: int) -> int:
    """The flags these tests check: the defined ones (CF ZF SF OF); PF/AF must stay."""
    assert flags & UNDEFINED_KEPT == UNDEFINED_KEPT
    return flags & (q.RFLAGS_CF | q.RFLAGS_ZF | q.RFLAGS_SF | q.RFLAGS_OF)


def test_andn_result_and_flags(mem):
    code = bytes.fromhex("c4e2e0f2c1")  # andn rax, rbx, rcx
    vcpu, hq = run(mem, code, rbx=0x0F, rcx=0x8000_0000_0000_00FF)
    assert vcpu.regs.rax == 0x8000_0000_0000_00F0
    assert arith(vcpu.regs.rflags) == q.RFLAGS_SF  # CF and OF cleared
    assert hq.counts == {"andn": 1}
    vcpu, _ = run(mem, code, rbx=-1, rcx=0x1234)
    assert vcpu.regs.rax == 0 and arith(vcpu.regs.rflags) == q.RFLAGS_ZF


def test_andn_32bit_memory_operand(mem):
    code = bytes.fromhex("c4e260f206")  # andn eax, ebx, dword ptr [rsi]
    mem.write(DATA, struct.pack("<I", 0xFFFF_0000))
    vcpu, _ = run(mem, code, rbx=0x00FF_FFFF, rsi=DATA, rax=-1)
    assert vcpu.regs.rax == 0xFF00_0000 and arith(vcpu.regs.rflags) == 0 | q.RFLAGS_SF


@pytest.mark.parametrize(
    "index,expect,cf",
    [(0, 0, 0), (4, 0xF, 0), (63, 2**63 - 1, 0), (64, M64, 1), (0x1_04, 0xF, 0)],
)
def test_bzhi_64(mem, index, expect, cf):
    code = bytes.fromhex("c4e2f0f5c3")  # bzhi rax, rbx, rcx
    vcpu, _ = run(mem, code, rbx=-1, rcx=index)  # index: bits 7:0 of rcx only
    assert vcpu.regs.rax == expect
    f = arith(vcpu.regs.rflags)
    assert bool(f & q.RFLAGS_CF) == bool(cf)
    assert bool(f & q.RFLAGS_ZF) == (expect == 0)
    assert bool(f & q.RFLAGS_SF) == bool(expect >> 63)
    assert not f & q.RFLAGS_OF


def test_bzhi_32_index_past_size(mem):
    code = bytes.fromhex("c4e270f5c3")  # bzhi eax, ebx, ecx
    vcpu, _ = run(mem, code, rbx=0x1_8000_0001, rcx=32, rax=-1)
    assert vcpu.regs.rax == 0x8000_0001
    assert arith(vcpu.regs.rflags) == q.RFLAGS_CF | q.RFLAGS_SF


BLSR_EAX = bytes.fromhex("c4e278f3cb")  # blsr eax, ebx
BLSR_RAX = bytes.fromhex("c4e2f8f3cb")  # blsr rax, rbx
BLSI_RAX = bytes.fromhex("c4e2f8f3db")  # blsi rax, rbx
BLSMSK_EAX = bytes.fromhex("c4e278f3d3")  # blsmsk eax, ebx


@pytest.mark.parametrize(
    "code,src,result,defined",
    [
        (BLSR_RAX, 0b1011000, 0b1010000, 0),
        (BLSR_RAX, 0x8000_0000_0000_0000, 0, q.RFLAGS_ZF),
        (BLSR_RAX, 0, 0, q.RFLAGS_ZF | q.RFLAGS_CF),
        (BLSR_RAX, 0xC000_0000_0000_0000, 0x8000_0000_0000_0000, q.RFLAGS_SF),
        (BLSR_EAX, 0x1_0000_0000, 0, q.RFLAGS_ZF | q.RFLAGS_CF),  # 32-bit source is 0
        (BLSR_EAX, 0xC000_0000, 0x8000_0000, q.RFLAGS_SF),
        (BLSI_RAX, 0b1011000, 0b0001000, q.RFLAGS_CF),
        (BLSI_RAX, 0, 0, q.RFLAGS_ZF),
        (BLSI_RAX, 0x8000_0000_0000_0000, 0x8000_0000_0000_0000, q.RFLAGS_SF | q.RFLAGS_CF),
        (BLSMSK_EAX, 0b1011000, 0b0001111, 0),
        (BLSMSK_EAX, 0, 0xFFFF_FFFF, q.RFLAGS_SF | q.RFLAGS_CF),
        (BLSMSK_EAX, 0x8000_0000, 0xFFFF_FFFF, q.RFLAGS_SF),
    ],
)
def test_bls_family(mem, code, src, result, defined):
    vcpu, _ = run(mem, code, rbx=src, rax=-1)
    assert vcpu.regs.rax == result
    assert arith(vcpu.regs.rflags) == defined
    # and from a clear start, nothing undefined appears
    vcpu, _ = run(mem, code, flags=0x2, rbx=src)
    assert vcpu.regs.rflags == 0x2 | defined


def test_pdep_pext(mem):
    pdep = bytes.fromhex("c4e2e3f5c1")  # pdep rax, rbx, rcx
    vcpu, hq = run(mem, pdep, rbx=0b101, rcx=0xF000_0000_0000_0F00)
    assert vcpu.regs.rax == 0x0000_0000_0000_0500
    vcpu, _ = run(mem, pdep, rbx=0b1111_0001, rcx=0xF000_0000_0000_00F0)
    assert vcpu.regs.rax == 0xF000_0000_0000_0010
    pext = bytes.fromhex("c4e262f5c1")  # pext eax, ebx, ecx
    vcpu, hq = run(mem, pext, rbx=0x1234_5678, rcx=0xF0F0_0000_FF00_000F, rax=-1)
    assert vcpu.regs.rax == 0x128  # mask 0xFF00000F: 0x8 (bits 3:0), then 0x12 above it
    assert vcpu.regs.rflags == FLAGS_IN and hq.counts == {"pext": 1}


def test_mulx(mem):
    code = bytes.fromhex("c462b3f6c1")  # mulx r8, r9, rcx: r8:r9 = rdx * rcx
    vcpu, _ = run(mem, code, rdx=M64, rcx=M64)
    assert (vcpu.regs.r8, vcpu.regs.r9) == (M64 - 1, 1)
    assert vcpu.regs.rflags == FLAGS_IN
    code = bytes.fromhex("c4e27bf6c3")  # mulx eax, eax, ebx: one register: the high half
    vcpu, _ = run(mem, code, rdx=0x5_8000_0000, rbx=4)
    assert vcpu.regs.rax == 2


@pytest.mark.parametrize(
    "code,src,result,defined",
    [
        (bytes.fromhex("f3480fbdc3"), 1, 63, 0),  # lzcnt rax, rbx
        (bytes.fromhex("f3480fbdc3"), 0, 64, q.RFLAGS_CF),
        (bytes.fromhex("f3480fbdc3"), 2**63, 0, q.RFLAGS_ZF),
        (bytes.fromhex("f30fbcc3"), 0x1_0000_0000, 32, q.RFLAGS_CF),  # tzcnt eax, ebx
        (bytes.fromhex("f30fbcc3"), 0x50, 4, 0),
        (bytes.fromhex("f30fbcc3"), 1, 0, q.RFLAGS_ZF),
    ],
)
def test_lzcnt_tzcnt(mem, code, src, result, defined):
    vcpu, _ = run(mem, code, flags=0x2, rbx=src, rax=-1)
    assert vcpu.regs.rax == result
    assert vcpu.regs.rflags == 0x2 | defined


def test_tzcnt_16bit_keeps_upper_bits(mem):
    code = bytes.fromhex("66f30fbcc3")  # tzcnt ax, bx
    vcpu, _ = run(mem, code, rbx=0x1_0000, rax=0x1234_5678_9ABC_DEF0)
    assert vcpu.regs.rax == 0x1234_5678_9ABC_0010  # bx == 0: 16, CF
    assert vcpu.regs.rflags & q.RFLAGS_CF


def test_popcnt_memory_and_flags(mem):
    code = bytes.fromhex("f3480fb803")  # popcnt rax, qword ptr [rbx]
    mem.write(DATA, struct.pack("<Q", 0x8000_0000_F000_0001))
    vcpu, hq = run(mem, code, rbx=DATA)
    assert vcpu.regs.rax == 6
    assert vcpu.regs.rflags & q.RFLAGS_ARITH == 0  # all cleared
    mem.write(DATA, bytes(8))
    vcpu, _ = run(mem, code, rbx=DATA)
    assert vcpu.regs.rax == 0 and vcpu.regs.rflags & q.RFLAGS_ARITH == q.RFLAGS_ZF
    assert hq.counts == {"popcnt": 1}


def test_movbe_load_and_store(mem):
    mem.write(DATA, bytes.fromhex("0102030405060708"))
    vcpu, _ = run(mem, bytes.fromhex("0f38f003"), rbx=DATA, rax=-1)  # movbe eax, [rbx]
    assert vcpu.regs.rax == 0x0102_0304
    vcpu, _ = run(mem, bytes.fromhex("66440f38f00b"), rbx=DATA, r9=-1)  # movbe r9w, [rbx]
    assert vcpu.regs.r9 == 0xFFFF_FFFF_FFFF_0102
    code = bytes.fromhex("480f38f10b")  # movbe qword ptr [rbx], rcx
    vcpu, hq = run(mem, code, rbx=DATA, rcx=0x1122_3344_5566_7788)
    assert mem.read(DATA, 8) == bytes.fromhex("1122334455667788")
    assert vcpu.regs.rflags == FLAGS_IN and hq.counts == {"movbe": 1}


def test_shrx_in_32bit_protected_mode_uses_ds_base():
    with GuestMemory(4 << 20) as m:
        code, ds_base = 0x2000, 0x10_0000
        m.write(code, SHRX_EAX_MEM)  # shrx eax, dword ptr [ecx], esi
        m.write(ds_base + 0x40, struct.pack("<I", 0x8000_0000))
        regs = kvm_regs()
        regs.rip, regs.rcx, regs.rsi, regs.rflags = code, 0x40, 31, 0x202
        s = kvm_sregs()
        s.cr0 = 1  # protected mode, paging off: linear = physical
        s.cs.selector, s.cs.db, s.cs.present = 0x10, 1, 1
        s.ds.base = ds_base
        vcpu = FakeVcpu(regs, s)
        hq = HostQuirks(True, pvm_host=True)
        assert hq.handle_internal_error(vcpu, m)
        assert vcpu.regs.rax == 1 and vcpu.regs.rip == code + len(SHRX_EAX_MEM)


def test_decoded_plan_is_reused_only_for_the_same_bytes(mem):
    shrx_rip = bytes.fromhex("c4e2f3f70501000000")  # shrx rax, qword ptr [rip+1], rcx
    hq = HostQuirks(True, pvm_host=True)
    for where, tail in ((CODE, b"\x90"), (CODE, b"\xcc"), (CODE + 0x100, b"\x90")):
        # RIP-relative: the operand follows the RIP of each execution.
        mem.write(where, shrx_rip + tail)
        mem.write(where + len(shrx_rip) + 1, struct.pack("<Q", where << 4))
        vcpu = vcpu_with(mem, b"", rcx=4)
        vcpu.regs.rip = where
        assert hq.handle_internal_error(vcpu, mem)
        assert vcpu.regs.rax == where and vcpu.regs.rip == where + len(shrx_rip)
    assert hq.counts == {"shrx": 3} and len(hq._plans) == 2
    # New bytes at a known address are decoded afresh, not run as the old plan.
    mem.write(CODE, SHLX_RAX)
    vcpu = vcpu_with(mem, b"", rbx=1, rcx=4)
    assert hq.handle_internal_error(vcpu, mem)
    assert vcpu.regs.rax == 16 and hq.counts == {"shrx": 3, "shlx": 1}


def test_sync_regs_area_replaces_the_register_ioctls(mem):
    from pvhboot.kvm.structs import kvm_run

    vcpu = vcpu_with(mem, SHLX_RAX, rbx=3, rcx=2)
    vcpu.kvm_run = run = kvm_run()
    vcpu.vm = FakeVm(offered=q.KVM_SYNC_X86_REGS | q.KVM_SYNC_X86_SREGS | 4)
    hq = HostQuirks(True, pvm_host=True)
    # First failure: the ioctls, and KVM is asked to sync regs/sregs from now on.
    assert hq.handle_internal_error(vcpu, mem)
    assert vcpu.regs.rax == 12 and vcpu.calls == ["set_regs"]
    assert run.kvm_valid_regs == q.KVM_SYNC_X86_REGS | q.KVM_SYNC_X86_SREGS
    assert run.kvm_dirty_regs == 0
    # Next exit: KVM stored the registers in kvm_run.s (struct kvm_sync_regs).
    base = ctypes.addressof(run) + kvm_run.s.offset
    regs = kvm_regs.from_address(base)
    ctypes.pointer(regs)[0] = vcpu.regs
    regs.rip, regs.rbx, regs.rcx = CODE, 5, 64 + 1
    ctypes.pointer(kvm_sregs.from_address(base + ctypes.sizeof(kvm_regs)))[0] = vcpu.sregs
    vcpu.calls.clear()
    assert hq.handle_internal_error(vcpu, mem)
    assert vcpu.calls == []  # no get/set ioctls
    assert regs.rax == 10 and regs.rip == CODE + len(SHLX_RAX)
    assert run.kvm_dirty_regs == q.KVM_SYNC_X86_REGS  # KVM loads them on KVM_RUN
    assert hq.counts == {"shlx": 2}


class FakeVm:
    def __init__(self, offered: int) -> None:
        self.offered = offered

    def check_extension(self, cap: int) -> int:
        assert cap == q.KVM_CAP_SYNC_REGS
        return self.offered


def test_no_sync_regs_where_kvm_does_not_offer_them(mem):
    from pvhboot.kvm.structs import kvm_run

    vcpu = vcpu_with(mem, SHLX_RAX, rbx=3, rcx=2)
    vcpu.kvm_run = run = kvm_run()
    vcpu.vm = FakeVm(offered=0)
    hq = HostQuirks(True, pvm_host=True)
    for _ in range(2):
        vcpu.regs.rip = CODE
        assert hq.handle_internal_error(vcpu, mem)
        assert vcpu.regs.rax == 12
    assert run.kvm_valid_regs == 0 and vcpu.calls == ["set_regs", "set_regs"]
