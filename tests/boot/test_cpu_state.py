"""Initial vCPU state for PVH and the Linux 64-bit protocol, and the GDT
bytes that must describe the same segments."""

from __future__ import annotations

import struct

import pytest

from pvhboot.boot import cpu_state, gdt
from pvhboot.boot.plan import Segment
from pvhboot.errors import BootError


def _gdt_entries(blob: bytes) -> list[int]:
    return [struct.unpack_from("<Q", blob, i)[0] for i in range(0, len(blob), 8)]


def test_known_descriptor_encodings():
    # Flat 4 GiB 32-bit code/data: the classic 0x00cf9b000000ffff / 0x00cf93000000ffff.
    assert gdt.encode_descriptor(cpu_state.PVH_CODE) == 0x00CF9B000000FFFF
    assert gdt.encode_descriptor(cpu_state.PVH_DATA) == 0x00CF93000000FFFF
    # 64-bit code: L=1, D=0.
    assert gdt.encode_descriptor(cpu_state.LONG_MODE_CODE) == 0x00AF9B000000FFFF
    # Busy 32-bit TSS, base 0, limit 0x67, byte granular.
    assert gdt.encode_descriptor(cpu_state.PVH_TSS) == 0x00008B0000000067


def test_encode_decode_roundtrip():
    seg = Segment(selector=0x28, base=0x12345678, limit=0xABCDE, type=0x3, g=0, db=1, dpl=3)
    assert gdt.decode_descriptor(0x28, gdt.encode_descriptor(seg)) == seg


def test_limit_must_be_page_granular_when_g_set():
    with pytest.raises(BootError):
        gdt.encode_descriptor(Segment(selector=8, base=0, limit=0x1000, type=3, g=1))


def test_pvh_state_matches_pvh_pandoc():
    st = cpu_state.pvh_cpu_state(0x1000000, 0x3000, 0x1000, 0x1F)
    assert st.rip == 0x1000000
    assert st.rbx == 0x3000
    assert st.cr0 == 0x11  # PE | ET
    assert st.cr4 == 0 and st.efer == 0
    assert st.rflags == 0x2
    assert st.cs.l == 0 and st.cs.db == 1 and st.cs.type == 0xB
    for seg in (st.ds, st.es, st.ss):
        assert seg.base == 0 and seg.limit == 0xFFFFFFFF and seg.type == 0x3
    assert st.tr.s == 0 and st.tr.type == 0xB and st.tr.base == 0 and st.tr.limit == 0x67
    assert (st.gdt_base, st.gdt_limit) == (0x1000, 0x1F)


@pytest.mark.parametrize(
    "blob,state",
    [
        (cpu_state.pvh_gdt(), cpu_state.pvh_cpu_state(0, 0, 0, 0)),
        (cpu_state.long_mode_gdt(), cpu_state.long_mode_cpu_state(0, 0, 0, 0, 0)),
    ],
)
def test_gdt_and_segment_registers_agree(blob, state):
    entries = _gdt_entries(blob)
    assert entries[0] == 0
    for seg in (state.cs, state.ds, state.es, state.ss, state.tr):
        assert gdt.decode_descriptor(seg.selector, entries[seg.selector >> 3]) == seg


def test_long_mode_state():
    st = cpu_state.long_mode_cpu_state(0x1000200, 0x7000, 0x9000, 0x1000, 0x2F)
    assert st.cr0 & 0x80000001 == 0x80000001
    assert st.cr4 == 0x20 and st.efer == 0x500 and st.cr3 == 0x9000
    assert st.rsi == 0x7000
    assert st.cs.selector == 0x10 and st.cs.l == 1 and st.cs.db == 0
    assert st.ds.selector == st.ss.selector == st.es.selector == 0x18
    # The 64-bit TSS descriptor takes two slots; the upper one holds base[63:32].
    blob = cpu_state.long_mode_gdt()
    assert len(blob) == 6 * 8
    assert _gdt_entries(blob)[5] == 0


def test_gdt_slot_collision():
    a = Segment(selector=0x08, base=0, limit=0xFFFFFFFF, type=0xB)
    with pytest.raises(BootError, match="used twice"):
        gdt.build_gdt([a, a])
