"""Page walks over hand-built guest page tables in real GuestMemory."""

from __future__ import annotations

import struct

import pytest

from pvhboot.errors import GuestError
from pvhboot.kvm.structs import kvm_sregs
from pvhboot.machine import pagewalk as pw
from pvhboot.machine.memory import GuestMemory

P, RW, PS = 1, 2, 0x80


@pytest.fixture
def mem():
    with GuestMemory(16 << 20) as m:
        yield m


def sregs(cr0=pw.CR0_PG | 1, cr3=0, cr4=0, efer=0):
    s = kvm_sregs()
    s.cr0, s.cr3, s.cr4, s.efer = cr0, cr3, cr4, efer
    return s


def put64(mem, addr, value):
    mem.write(addr, struct.pack("<Q", value))


def put32(mem, addr, value):
    mem.write(addr, struct.pack("<I", value))


def test_paging_off_is_identity(mem):
    s = sregs(cr0=1)
    assert pw.paging_mode(s) == "off"
    assert pw.translate(mem, s, 0x123456) == 0x123456


def test_four_level_4k_2m_1g(mem):
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    s = sregs(cr3=pml4, cr4=pw.CR4_PAE, efer=pw.EFER_LMA | 0x500)
    linear = 0xFFFF_FFFF_8020_3ABC  # PML4 511, PDPT 510, PD 1, PT 3
    put64(mem, pml4 + 511 * 8, pdpt | P | RW)
    put64(mem, pdpt + 510 * 8, pd | P | RW)
    put64(mem, pd + 1 * 8, pt | P | RW)
    put64(mem, pt + 3 * 8, 0x0077_7000 | P | RW | (1 << 63))  # NX bit must be masked off
    assert pw.paging_mode(s) == "4level"
    assert pw.translate(mem, s, linear) == 0x777ABC
    # 2 MiB page in PD slot 2
    put64(mem, pd + 2 * 8, 0x0060_0000 | P | PS)
    assert pw.translate(mem, s, 0xFFFF_FFFF_8045_6789) == 0x65_6789
    # 1 GiB page in PDPT slot 0 of PML4 slot 0
    put64(mem, pml4, 0x5000 | P)
    put64(mem, 0x5000 + 8, 0x4000_0000 | P | PS)
    assert pw.translate(mem, s, 0x4123_4567) == 0x4123_4567


def test_five_level(mem):
    s = sregs(cr3=0x1000, cr4=pw.CR4_PAE | pw.CR4_LA57, efer=pw.EFER_LMA)
    put64(mem, 0x1000, 0x2000 | P)  # PML5[0]
    put64(mem, 0x2000, 0x3000 | P)  # PML4[0]
    put64(mem, 0x3000, 0x4000 | P)  # PDPT[0]
    put64(mem, 0x4000, 0x20_0000 | P | PS)  # PD[0]: 2 MiB page at 2 MiB
    assert pw.paging_mode(s) == "5level"
    assert pw.translate(mem, s, 0x1234) == 0x20_1234


def test_pae(mem):
    s = sregs(cr3=0x1000, cr4=pw.CR4_PAE)
    put64(mem, 0x1000 + 3 * 8, 0x2000 | P)  # PDPTE 3: 0xC0000000..
    put64(mem, 0x2000 + 1 * 8, 0x3000 | P)  # PD[1]
    put64(mem, 0x3000 + 5 * 8, 0x9000 | P)  # PT[5]
    assert pw.paging_mode(s) == "pae"
    assert pw.translate(mem, s, 0xC020_5123) == 0x9123
    put64(mem, 0x2000 + 2 * 8, 0x40_0000 | P | PS)
    assert pw.translate(mem, s, 0xC045_0000) == 0x45_0000


def test_32bit_4k_and_4m(mem):
    s = sregs(cr3=0x1000)
    put32(mem, 0x1000 + 0x300 * 4, 0x2000 | P)  # 0xC0000000
    put32(mem, 0x2000 + 7 * 4, 0x8000 | P)
    assert pw.paging_mode(s) == "32bit"
    assert pw.translate(mem, s, 0xC000_7FFF) == 0x8FFF
    put32(mem, 0x1000 + 0x301 * 4, 0x0080_0000 | P | PS)
    s.cr4 = pw.CR4_PSE
    assert pw.translate(mem, s, 0xC050_0010) == 0x90_0010
    # PSE-36: physical bits 39:32 from PDE bits 20:13
    put32(mem, 0x1000 + 0x302 * 4, 0x0040_0000 | (0x3 << 13) | P | PS)
    assert pw.translate(mem, s, 0xC080_0004) == 0x3_0040_0004


def test_not_present_raises_guest_error(mem):
    s = sregs(cr3=0x1000, cr4=pw.CR4_PAE, efer=pw.EFER_LMA)
    with pytest.raises(GuestError, match="not mapped.*PML4"):
        pw.translate(mem, s, 0x1000)


def test_table_outside_ram_raises_guest_error(mem):
    s = sregs(cr3=0x1000, cr4=pw.CR4_PAE, efer=pw.EFER_LMA)
    put64(mem, 0x1000, 0x7_0000_0000 | P)
    with pytest.raises(GuestError, match="outside guest RAM"):
        pw.translate(mem, s, 0x1000)


def test_read_write_linear_across_pages(mem):
    s = sregs(cr3=0x1000, cr4=pw.CR4_PAE, efer=pw.EFER_LMA)
    put64(mem, 0x1000, 0x2000 | P)
    put64(mem, 0x2000, 0x3000 | P)
    put64(mem, 0x3000, 0x4000 | P)
    # two adjacent linear pages mapped to non-adjacent frames
    put64(mem, 0x4000 + 0 * 8, 0xA000 | P)
    put64(mem, 0x4000 + 1 * 8, 0x6000 | P)
    pw.write_linear(mem, s, 0xFFC, b"ABCDEFGH")
    assert mem.read(0xAFFC, 4) == b"ABCD"
    assert mem.read(0x6000, 4) == b"EFGH"
    assert pw.read_linear(mem, s, 0xFFC, 8) == b"ABCDEFGH"
