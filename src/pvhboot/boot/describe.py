"""A BootPlan for people (`pvhboot run --dry-run`) and for programs (JSON).

Only the plan is shown: nothing here reads the kernel or touches KVM.
"""

from __future__ import annotations

from .layout import fmt_size
from .plan import E820_TYPE_NAMES, BootPlan, Chunk, CpuState, FileRange, Segment

_SEGMENT_REGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_GENERAL_REGS = ("rip", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")
_CONTROL_REGS = ("cr0", "cr3", "cr4", "efer")


def _source_text(chunk: Chunk) -> str:
    src = chunk.source
    if isinstance(src, FileRange):
        text = f"{src.path} +{src.offset:#x}, {src.length} bytes"
    else:
        text = f"{len(src)} bytes built"
    zero = chunk.size - chunk.data_length
    if zero > 0:
        text += f", {zero} bytes zero-filled"
    return text


# System descriptor types (SDM Vol. 3A 3.5 Table 3-2) shown by name.
_SYSTEM_TYPES = {0x2: "LDT", 0x9: "TSS (available)", 0xB: "TSS (busy)"}


def _segment_text(seg: Segment) -> str:
    if seg.s:
        kind = "code" if seg.type & 0x8 else "data"
        mode = " 64-bit" if seg.l else (" 32-bit" if seg.db else " 16-bit")
    else:
        kind = _SYSTEM_TYPES.get(seg.type, "system")
        mode = ""
    return (
        f"sel={seg.selector:#06x} base={seg.base:#x} limit={seg.limit:#x} "
        f"type={seg.type:#x} {kind}{mode} dpl={seg.dpl}" + (" unusable" if seg.unusable else "")
    )


def format_plan(plan: BootPlan) -> str:
    """The plan as plain text, one fact per line."""
    lines = [f"protocol: {plan.protocol}", f"memory: {fmt_size(plan.memory_size)}"]
    lines.append(f"command line: {plan.cmdline!r}")
    lines.append("memory map:")
    for r in plan.memory_map:
        name = E820_TYPE_NAMES.get(r.type, f"type {r.type}")
        lines.append(f"  [{r.addr:#014x}, {r.end:#014x})  {fmt_size(r.size):>10}  {name}")
    lines.append("chunks:")
    for c in sorted(plan.chunks, key=lambda c: c.addr):
        lines.append(
            f"  [{c.addr:#014x}, {c.end:#014x})  {fmt_size(c.size):>10}  {c.label}: {_source_text(c)}"
        )
    lines.append("vCPU:")
    cpu = plan.cpu
    lines.append("  " + " ".join(f"{r}={getattr(cpu, r):#x}" for r in _GENERAL_REGS))
    lines.append("  " + " ".join(f"{r}={getattr(cpu, r):#x}" for r in _CONTROL_REGS))
    lines.append(f"  gdt base={cpu.gdt_base:#x} limit={cpu.gdt_limit:#x}")
    lines.append(f"  idt base={cpu.idt_base:#x} limit={cpu.idt_limit:#x}")
    for name in _SEGMENT_REGS:
        seg = getattr(cpu, name)
        if seg is not None:
            lines.append(f"  {name:<3} {_segment_text(seg)}")
    if plan.notes:
        lines.append("notes:")
        lines.extend(f"  {n}" for n in plan.notes)
    return "\n".join(lines) + "\n"


def _segment_json(seg: Segment | None) -> dict[str, int] | None:
    if seg is None:
        return None
    return {k: getattr(seg, k) for k in seg._fields}


def _cpu_json(cpu: CpuState) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in cpu._fields:
        value = getattr(cpu, name)
        out[name] = _segment_json(value) if name in _SEGMENT_REGS else value
    return out


def _chunk_json(c: Chunk) -> dict[str, object]:
    if isinstance(c.source, FileRange):
        source: dict[str, object] = {
            "file": c.source.path,
            "offset": c.source.offset,
            "length": c.source.length,
        }
    else:
        source = {"bytes": len(c.source)}
    return {"addr": c.addr, "size": c.size, "end": c.end, "label": c.label, "source": source}


def plan_to_json(plan: BootPlan) -> dict[str, object]:
    """The plan as a JSON-serialisable dict (addresses as integers)."""
    return {
        "protocol": plan.protocol,
        "memory_size": plan.memory_size,
        "cmdline": plan.cmdline,
        "memory_map": [
            {
                "addr": r.addr,
                "size": r.size,
                "type": r.type,
                "type_name": E820_TYPE_NAMES.get(r.type),
            }
            for r in plan.memory_map
        ],
        "chunks": [_chunk_json(c) for c in sorted(plan.chunks, key=lambda c: c.addr)],
        "cpu": _cpu_json(plan.cpu),
        "notes": list(plan.notes),
    }
