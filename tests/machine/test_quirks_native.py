"""Host quirks' BMI/LZCNT/POPCNT/MOVBE emulation checked against this host's CPU.

The emulation is meant to be exact, so the best oracle is a processor that
has these instructions: each case runs once natively (a small harness loads
registers and flags from a buffer, executes the instruction, stores them back)
and once through HostQuirks on the same values, and the results must agree in
every register and in every flag the SDM defines for the instruction. Skipped
where the host CPU lacks BMI1/BMI2/ABM/MOVBE/POPCNT (the emulation is still
covered by test_quirks_bmi.py there).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import random
import struct

import pytest
from quirks_fakes import FakeVcpu

from pvhboot.kvm.structs import kvm_regs, kvm_sregs
from pvhboot.machine import quirks as q
from pvhboot.machine.memory import GuestMemory
from pvhboot.machine.quirks import HostQuirks

NEEDED_CPU_FLAGS = {"bmi1", "bmi2", "abm", "movbe", "popcnt"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not NEEDED_CPU_FLAGS <= _cpu_flags(),
    reason="host CPU lacks BMI1/BMI2/ABM/MOVBE/POPCNT: no native oracle",
)

# The registers the harness loads and stores, in buffer order.
STATE_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "r8", "r9")
# push rbx; push r12; mov r11, rdi; load rax rbx rcx rdx rsi r8 r9 from [r11+8*i];
# push qword [r11+56]; popfq   (GNU as, from the listing in the commit message)
HARNESS_PRE = bytes.fromhex(
    "5341544989fb498b03498b5b08498b4b10498b5318498b73204d8b43284d8b4b3041ff73389d"
)
# pushfq; pop qword [r11+56]; store the seven registers back; pop r12; pop rbx; ret
HARNESS_POST = bytes.fromhex(
    "9c418f433849890349895b0849894b1049895318498973204d8943284d894b30415c5bc3"
)

# (encoding, GNU as listing); memory operands are always [rsi].
CASES = [
    ("c4e271f7c3", "shlx eax,ebx,ecx"),
    ("c4e2f1f706", "shlx rax,QWORD PTR [rsi],rcx"),
    ("c46233f7c3", "shrx r8d,ebx,r9d"),
    ("c4e2f3f7c3", "shrx rax,rbx,rcx"),
    ("c4e272f706", "sarx eax,DWORD PTR [rsi],ecx"),
    ("c462f2f7cb", "sarx r9,rbx,rcx"),
    ("c4e37bf0c307", "rorx eax,ebx,0x7"),
    ("c463fbf0063f", "rorx r8,QWORD PTR [rsi],0x3f"),
    ("c4e260f2c1", "andn eax,ebx,ecx"),
    ("c4e2e0f206", "andn rax,rbx,QWORD PTR [rsi]"),
    ("c4e270f5c3", "bzhi eax,ebx,ecx"),
    ("c4e2f0f506", "bzhi rax,QWORD PTR [rsi],rcx"),
    ("c4e278f3cb", "blsr eax,ebx"),
    ("c4e2f8f30e", "blsr rax,QWORD PTR [rsi]"),
    ("c4e278f31e", "blsi eax,DWORD PTR [rsi]"),
    ("c4e2f8f3db", "blsi rax,rbx"),
    ("c4e278f3d3", "blsmsk eax,ebx"),
    ("c4e2f8f3d3", "blsmsk rax,rbx"),
    ("c4e263f5c1", "pdep eax,ebx,ecx"),
    ("c4e2e3f506", "pdep rax,rbx,QWORD PTR [rsi]"),
    ("c4e262f506", "pext eax,ebx,DWORD PTR [rsi]"),
    ("c4e2e2f5c1", "pext rax,rbx,rcx"),
    ("c4e263f6c1", "mulx eax,ebx,ecx"),
    ("c462b3f606", "mulx r8,r9,QWORD PTR [rsi]"),
    ("c4e2fbf6c3", "mulx rax,rax,rbx"),
    ("66f30fbdc3", "lzcnt ax,bx"),
    ("f30fbdc3", "lzcnt eax,ebx"),
    ("f3480fbd06", "lzcnt rax,QWORD PTR [rsi]"),
    ("66f30fbc06", "tzcnt ax,WORD PTR [rsi]"),
    ("f30fbcc3", "tzcnt eax,ebx"),
    ("f3480fbcc3", "tzcnt rax,rbx"),
    ("66f30fb8c3", "popcnt ax,bx"),
    ("f30fb806", "popcnt eax,DWORD PTR [rsi]"),
    ("f3480fb8c3", "popcnt rax,rbx"),
    ("660f38f006", "movbe ax,WORD PTR [rsi]"),
    ("0f38f006", "movbe eax,DWORD PTR [rsi]"),
    ("480f38f006", "movbe rax,QWORD PTR [rsi]"),
    ("660f38f11e", "movbe WORD PTR [rsi],bx"),
    ("0f38f11e", "movbe DWORD PTR [rsi],ebx"),
    ("480f38f11e", "movbe QWORD PTR [rsi],rbx"),
]

_BITS4 = q.RFLAGS_CF | q.RFLAGS_ZF | q.RFLAGS_SF | q.RFLAGS_OF
# Flags the SDM defines per instruction; the others (PF, AF) are undefined and
# not compared. Instructions not listed leave all flags unaffected.
DEFINED_FLAGS = {
    "andn": _BITS4, "bzhi": _BITS4, "blsr": _BITS4, "blsi": _BITS4, "blsmsk": _BITS4,
    "lzcnt": q.RFLAGS_CF | q.RFLAGS_ZF, "tzcnt": q.RFLAGS_CF | q.RFLAGS_ZF,
}

PML4, PDPT, CODE, DATA = 0x1000, 0x2000, 0x20_0000, 0x30_0000
M64 = 2**64 - 1
EDGES = (0, 1, 2, 7, 31, 32, 33, 63, 64, 65, 0xFF, 0x100, 0x8000, 0xFFFF, 0x7FFF_FFFF,
         0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 2**63, M64, M64 - 1)


class _Native:
    """An executable page holding HARNESS_PRE + instruction + HARNESS_POST."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                              | mmap.PROT_EXEC)
        self.state = (ctypes.c_uint64 * 8)()
        self.data = (ctypes.c_uint8 * 16)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        self.func = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)

    def run(self, code: bytes, values: dict[str, int], flags: int, data: bytes):
        self.page.seek(0)
        self.page.write(HARNESS_PRE + code + HARNESS_POST)
        ctypes.memmove(self.data, data, len(data))
        for i, name in enumerate(STATE_REGS):
            self.state[i] = values[name]
        self.state[4] = ctypes.addressof(self.data)  # rsi: the memory operand
        self.state[7] = flags
        self.func(ctypes.addressof(self.state))
        out = {name: self.state[i] for i, name in enumerate(STATE_REGS) if name != "rsi"}
        return out, self.state[7], bytes(self.data)


def _emulate(mem, code: bytes, values: dict[str, int], flags: int, data: bytes):
    mem.write(CODE, code + b"\x90" * 15)
    mem.write(DATA, data)
    regs = kvm_regs()
    for name in STATE_REGS:
        setattr(regs, name, values[name])
    regs.rsi, regs.rip, regs.rflags = DATA, CODE, flags
    s = kvm_sregs()
    s.cr0, s.cr3, s.cr4, s.efer = 0x8005_0033, PML4, 0x20, 0x500
    s.cs.selector, s.cs.l, s.cs.present, s.cs.s, s.cs.type = 0x10, 1, 1, 1, 0xB
    vcpu = FakeVcpu(regs, s)
    assert HostQuirks(True, pvm_host=True).handle_internal_error(vcpu, mem)
    assert vcpu.regs.rip == CODE + len(code)
    out = {name: getattr(vcpu.regs, name) for name in STATE_REGS if name != "rsi"}
    return out, vcpu.regs.rflags, mem.read(DATA, len(data))


def _value(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(EDGES)
    if pick < 0.5:
        return rng.getrandbits(rng.choice((8, 16, 32, 64)))
    if pick < 0.6:  # few bits set: exercises bls*, tzcnt, pdep/pext masks
        return sum(1 << rng.randrange(64) for _ in range(rng.randrange(4)))
    return rng.getrandbits(64)


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(8 << 20) as m:
        m.write(PML4, struct.pack("<Q", PDPT | 3))
        m.write(PDPT, struct.pack("<Q", 0x83))  # 1 GiB identity
        yield m


@pytest.fixture(scope="module")
def native():
    return _Native()


@pytest.mark.parametrize("hexcode,listing", CASES, ids=[c[1] for c in CASES])
def test_matches_host_cpu(mem, native, hexcode, listing):
    code = bytes.fromhex(hexcode)
    kind = listing.split()[0]
    defined = DEFINED_FLAGS.get(kind, q.RFLAGS_ARITH)
    if kind == "popcnt":
        defined = q.RFLAGS_ARITH  # all six: ZF from the source, the rest cleared
    rng = random.Random(hexcode)
    for _ in range(300):
        values = {name: _value(rng) for name in STATE_REGS}
        flags = 0x2 | (rng.getrandbits(12) & q.RFLAGS_ARITH)
        data = _value(rng).to_bytes(8, "little") + bytes(8)
        want_regs, want_flags, want_data = native.run(code, values, flags, data)
        got_regs, got_flags, got_data = _emulate(mem, code, values, flags, data)
        case = f"{listing} with {values} flags={flags:#x} data={data[:8].hex()}"
        assert got_regs == want_regs, case
        assert got_flags & defined == want_flags & defined, case
        # (user space runs with IF set whatever popfq asks: compare with the input)
        assert got_flags & ~q.RFLAGS_ARITH == flags & ~q.RFLAGS_ARITH, case
        assert got_data == want_data, case
