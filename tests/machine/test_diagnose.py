"""Crash reports: decoding, register dumps, System.map symbols, exit messages."""

from __future__ import annotations

import struct

import pytest

from pvhboot.errors import GuestError
from pvhboot.kvm.structs import kvm_regs, kvm_sregs
from pvhboot.machine import diagnose as d
from pvhboot.machine.memory import GuestMemory

SYSTEM_MAP = """\
0000000001000000 A phys_startup_64
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81000100 t secondary_startup_64
ffffffff81000200 T do_one
ffffffff81001000 D some_data
ffffffff81002000 W weak_func
ffffffff81003000 T _etext
ffffffff81004000 T start_kernel
ffffffff81005000 B _end
"""


@pytest.fixture
def mem():
    with GuestMemory(4 << 20) as m:
        yield m


def flat32(rip_base=0):
    s = kvm_sregs()
    s.cr0 = 1
    s.cs.db = 1
    s.cs.base = rip_base
    return s


def test_decode_at_32bit(mem):
    mem.write(0x1000, b"\x8b\x03")  # mov eax, dword ptr [ebx]
    assert d.decode_at(mem, flat32(), 0x1000) == "mov eax, dword ptr [ebx]"


def test_decode_at_uses_cs_base(mem):
    mem.write(0x2010, b"\xf4")
    assert d.decode_at(mem, flat32(rip_base=0x2000), 0x10) == "hlt"


def test_decode_at_long_mode(mem):
    s = kvm_sregs()
    s.cr0, s.cr3, s.cr4, s.efer = 0x8000_0001, 0x1000, 0x20, 0x500
    s.cs.l = 1
    mem.write(0x1000, struct.pack("<Q", 0x2000 | 3))
    mem.write(0x2000, struct.pack("<Q", 0 | 0x83))  # 1 GiB identity page
    mem.write(0x3000, b"\x0f\xae\x20")
    assert d.code_bits(s) == 64
    assert d.decode_at(mem, s, 0x3000) == "xsave ptr [rax]"


def test_decode_at_instruction_at_end_of_ram(mem):
    end = 4 << 20
    mem.write(end - 1, b"\xcc")
    assert d.decode_at(mem, flat32(), end - 1) == "int3"


def test_decode_at_garbage_and_unreadable(mem):
    mem.write(0x1000, b"\xff\xff")
    assert d.decode_at(mem, flat32(), 0x1000).startswith("<not a valid instruction: ff ff")
    assert d.decode_at(mem, flat32(), 0x7000_0000).startswith("<code not readable")
    with pytest.raises(GuestError):
        d.fetch_code(mem, flat32(), 0x7000_0000)


def test_register_dump_names_everything():
    r = kvm_regs()
    r.rip, r.rsp, r.rflags, r.r15 = 0xFFFF_FFFF_8100_0000, 0x1000, 0x246, 0xABC
    s = kvm_sregs()
    s.cr3, s.efer = 0x5000, 0x500
    s.cs.selector = 0x10
    dump = d.register_dump(r, s)
    assert "RIP=ffffffff81000000" in dump and "R15=0000000000000abc" in dump
    assert "[PF ZF IF]" in dump
    assert "CS =0010" in dump and "CR3=0000000000005000" in dump
    assert "EFER=0000000000000500" in dump
    assert len(dump.splitlines()) == 5 + 8 + 3


def test_symbol_map_lookup(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    sm = d.SymbolMap.load(path)
    assert sm.lookup(0xFFFF_FFFF_8100_0000) in ("_stext", "startup_64")
    assert sm.lookup(0xFFFF_FFFF_8100_0212) == "do_one+0x12"
    assert sm.lookup(0xFFFF_FFFF_8100_0105) == "secondary_startup_64+0x5"
    assert sm.lookup(0xFFFF_FFFF_8100_1010) == "do_one+0xe10"  # data symbols are skipped
    assert sm.lookup(0xFFFF_FFFF_8100_2001) == "weak_func+0x1"
    assert sm.lookup(0xFFFF_FFFF_8100_4020) == "start_kernel+0x20"  # init text past _etext
    assert sm.lookup(0xFFFF_FFFF_8100_5000) is None  # past _end
    assert sm.lookup(0x1000) is None


def test_symbol_map_missing_file(tmp_path):
    with pytest.raises(GuestError, match="--system-map"):
        d.SymbolMap.load(tmp_path / "nope")


def test_exit_messages():
    sm = d.SymbolMap.parse(SYSTEM_MAP)
    msg = d.internal_error_message(
        1, [0x1, 0x2], rip=0xFFFF_FFFF_8100_0203, insn="xsave ptr [rax]", symbols=sm
    )
    assert msg.startswith("KVM internal error: emulation failure: xsave ptr [rax] at RIP ")
    assert "(do_one+0x3)" in msg and "[data 0x1 0x2]" in msg and "--no-host-quirks" in msg
    assert "\n" not in msg
    active = d.internal_error_message(1, quirks_active=True)
    assert "clearcpuid=" in active and "--no-host-quirks" not in active
    for sub, name in [(2, "simultaneous"), (3, "event delivery"), (4, "unexpected exit")]:
        assert name in d.internal_error_message(sub)
        assert "clearcpuid" not in d.internal_error_message(sub)
    assert "suberror 9" in d.internal_error_message(9)
    fe = d.fail_entry_message(0x8000_0021, cpu=1)
    assert "0x80000021" in fe and "invalid guest state" in fe and "host CPU 1" in fe
    assert "\n" not in fe
    assert "invalid guest state" not in d.fail_entry_message(0x8000_0022)
    sd = d.shutdown_message(0xFFFF_FFFF_8100_0200, sm)
    assert sd == "the guest triple-faulted (KVM_EXIT_SHUTDOWN) at RIP 0xffffffff81000200 (do_one)"
    assert d.shutdown_message(None) == "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"


def test_real_system_map_if_built():
    from pathlib import Path

    maps = sorted(Path.home().glob(".cache/pvhboot/test-kernel/*/System.map"))
    if not maps:
        pytest.skip("no test kernel built yet (scripts/build-test-kernel)")
    text = maps[0].read_text()
    sm = d.SymbolMap.parse(text)
    addr = next(int(line.split()[0], 16) for line in text.splitlines()
                if line.endswith(" start_kernel"))
    assert sm.lookup(addr + 5) == "start_kernel+0x5"


def test_internal_error_message_with_the_decoded_instruction(mem):
    mem.write(0x1000, b"\x0f\xae\x20")  # xsave [eax] in 32-bit mode
    insn = d.decode_at(mem, flat32(), 0x1000)
    msg = d.internal_error_message(1, [0x10], rip=0x1000, insn=insn)
    assert msg.startswith("KVM internal error: emulation failure: xsave ptr [eax] at RIP 0x1000")
    assert "[data 0x10]" in msg
