"""The plan and image records are plain classes (no ``dataclasses``): they
must still compare, hash, print, copy and pickle as the dataclasses did, and
the modules that define them must stay free of heavy imports."""

import copy
import pickle
import subprocess
import sys

import pytest

from pvhboot.boot.plan import BootPlan, Chunk, CpuState, FileRange, MemoryRange, Segment
from pvhboot.image.elf import ElfSegment
from pvhboot.image.kernel import EntryPoints
from pvhboot.image.notes import ElfNote


def test_frozen_records_compare_and_hash_by_value():
    a = MemoryRange(0x100000, 0x1000, 1)
    b = MemoryRange(0x100000, 0x1000, 1)
    assert a == b and hash(a) == hash(b)
    assert a != MemoryRange(0x100000, 0x1000, 2)
    assert len({a, b, MemoryRange(0, 0x1000, 1)}) == 2
    src = FileRange("/k", 0x1000, 0x200)
    assert {Chunk(0x1000, 0x400, src, "kernel"): 1}[Chunk(0x1000, 0x400, src, "kernel")] == 1
    # Same fields, different class: not equal (as with dataclasses).
    assert ElfSegment(1, 0, 0, 0, 0, 0, 0, 0) != MemoryRange(1, 0, 0)


def test_frozen_records_refuse_assignment():
    seg = Segment(0x10, 0, 0xFFFFF, 0xB)
    with pytest.raises(AttributeError, match="immutable"):
        seg.base = 1
    with pytest.raises(AttributeError):
        del seg.limit


def test_defaults_and_positional_order():
    seg = Segment(0x10, 0, 0xFFFFF, 0xB)
    assert (seg.s, seg.dpl, seg.present, seg.avl, seg.l, seg.db, seg.g, seg.unusable) == (
        1, 0, 1, 0, 0, 1, 1, 0)  # fmt: skip
    cpu = CpuState(0x1000)
    assert cpu.rflags == 0x2 and cpu.cs is None and cpu.idt_limit == 0
    plan = BootPlan("pvh", 128 << 20, [], [], cpu, "")
    other = BootPlan("pvh", 128 << 20, [], [], CpuState(0x1000), "")
    assert plan.notes == [] and plan.notes is not other.notes  # no shared default list
    assert plan == other
    assert EntryPoints() == EntryPoints(None, None, None, None, False)


def test_mutable_records_are_unhashable_and_mutable():
    cpu = CpuState(0x1000)
    cpu.rsp = 0x8000
    assert cpu == CpuState(0x1000, rsp=0x8000)
    with pytest.raises(TypeError):
        hash(cpu)


def test_replace_makes_a_changed_copy():
    cpu = CpuState(0x1000, cr0=0x11)
    new = cpu.replace(rflags=0x46)
    assert (new.rip, new.cr0, new.rflags) == (0x1000, 0x11, 0x46) and cpu.rflags == 0x2
    chunk = Chunk(0x1000, 16, b"a" * 16, "gdt")
    changed = chunk.replace(source=b"b" * 16)
    assert changed.source == b"b" * 16 and chunk.source == b"a" * 16
    with pytest.raises(TypeError, match="no field"):
        chunk.replace(bogus=1)


def test_repr_names_fields_and_abbreviates_big_bytes():
    chunk = Chunk(0x1000, 4096, bytes(4096), "boot params")
    text = repr(chunk)
    assert text.startswith("Chunk(addr=4096, size=4096, source=<4096 bytes>")
    assert "'boot params'" in text
    assert repr(ElfNote("Xen", 18, "PHYS32_ENTRY", b"\0" * 4)) == (
        "ElfNote(owner='Xen', type=18, type_name='PHYS32_ENTRY', desc=b'\\x00\\x00\\x00\\x00')")
    assert repr(MemoryRange(0x100000, 0x1000, 1)) == (
        "MemoryRange(addr=0x100000, size=0x1000, type=1)")


@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy,
                                   lambda o: pickle.loads(pickle.dumps(o))])
def test_records_copy_and_pickle(clone):
    seg = Segment(0x18, 0, 0xFFFFF, 0x9, s=0)
    cpu = CpuState(0x1000, tr=seg)
    for obj in (seg, cpu, FileRange("/k", 1, 2)):
        dup = clone(obj)
        assert dup == obj and type(dup) is type(obj)
    with pytest.raises(AttributeError):
        clone(seg).base = 1


def test_plan_and_elf_modules_stay_light(tmp_path):
    """Opening an ELF's headers and planning needs none of dataclasses,
    typing, re or the bzImage reader (each costs milliseconds per boot)."""
    code = (
        "import sys\n"
        "import pvhboot.boot.plan, pvhboot.boot.pvh, pvhboot.boot.describe\n"
        "import pvhboot.devices.base, pvhboot.image.kernel, pvhboot.commands.extract\n"
        "from pvhboot.image.kernel import open_image\n"
        f"open_image({sys.executable!r}, load_payload=False)\n"
        "heavy = ('dataclasses', 'typing', 're', 'inspect', 'pvhboot.image.bzimage',\n"
        "         'pvhboot.image.compression')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == ""
