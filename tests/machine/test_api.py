"""Machine.run_plan on real KVM with tiny hand-assembled guests.

Each guest is a few 32-bit instructions, assembled here with gcc and placed
by a BootPlan built by hand (PVH entry state from boot/cpu_state), so these
tests exercise machine/ and api.py without any kernel image code.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pvhboot.api import Machine, RunResult
from pvhboot.boot.cpu_state import pvh_cpu_state
from pvhboot.boot.layout import memory_map
from pvhboot.boot.plan import BootPlan, Chunk
from pvhtest import requires_kvm

pytestmark = [
    requires_kvm,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to assemble guests"),
]

MEM = 128 << 20
CODE = 0x100000
DATA = 0x200000


def asm32(tmp_path, body: str) -> bytes:
    """Assemble 32-bit code (AT&T syntax) to raw bytes linked at CODE."""
    src = tmp_path / "g.S"
    src.write_text(f"    .code32\n    .text\n    .globl _start\n_start:\n{body}\n")
    obj, elf, raw = tmp_path / "g.o", tmp_path / "g.elf", tmp_path / "g.bin"
    subprocess.run(["gcc", "-c", "-m32", "-o", obj, src], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-Ttext", hex(CODE), "-e", "_start", "-o", elf, obj], check=True
    )
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", elf, raw], check=True)
    return raw.read_bytes()


def plan_for(code: bytes, *, data: bytes = b"", **cpu) -> BootPlan:
    chunks = [Chunk(CODE, len(code), code, "code")]
    if data:
        chunks.append(Chunk(DATA, len(data), data, "data"))
    state = pvh_cpu_state(CODE, 0, 0, 0)
    for name, value in cpu.items():
        setattr(state, name, value)
    return BootPlan("pvh", MEM, memory_map(MEM), chunks, state, "")


def run(plan: BootPlan, **kw) -> RunResult:
    kw.setdefault("host_quirks", False)
    return Machine(kernel="(hand-built)", **kw).run_plan(plan)


def test_serial_byte_then_debug_exit(tmp_path):
    code = asm32(
        tmp_path,
        """
        mov $0x3f8, %dx
        mov $'O', %al
        out %al, %dx
        mov $'K', %al
        out %al, %dx
        mov $0x2a, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code))
    assert result.reason == "debug-exit"
    assert result.status == (0x2A << 1) | 1
    assert result.console == "OK"
    assert "debug-exit port: status 85" in result.message
    assert {"exec", "kvm-ready", "kernel-mapped", "first-kvm-run", "first-serial-byte", "exit"} <= set(
        result.timeline
    )
    assert list(result.timeline.values()) == sorted(result.timeline.values())


def test_rep_outsb_delivers_every_byte_in_order(tmp_path):
    # A string OUT exits once with count > 1: the loop must walk data_offset.
    msg = b"hello, string I/O\n"
    code = asm32(
        tmp_path,
        f"""
        mov ${DATA:#x}, %esi
        mov ${len(msg)}, %ecx
        mov $0x3f8, %dx
        cld
        rep outsb
        mov $0, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code, data=msg))
    assert result.console == msg.decode()
    assert result.status == 1


@pytest.mark.parametrize("width,insn,ones", [(1, "inb", 0xFF), (2, "inw", 0xFFFF), (4, "inl", 0xFFFFFFFF)])
def test_unclaimed_port_reads_all_ones_and_is_counted(tmp_path, width, insn, ones):
    reg = {1: "%al", 2: "%ax", 4: "%eax"}[width]
    code = asm32(
        tmp_path,
        f"""
        xor %eax, %eax
        mov $0x510, %dx
        {insn} %dx, {reg}
        cmp ${ones:#x}, {reg}
        jne 1f
        mov $0x10, %al
        out %al, $0xf4
    1:  mov $0x20, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code))
    assert result.status == (0x10 << 1) | 1, result.message
    assert result.unhandled_port_reads == 1


def test_rep_insb_fills_memory_from_an_unclaimed_port(tmp_path):
    code = asm32(
        tmp_path,
        f"""
        mov ${DATA:#x}, %edi
        mov $16, %ecx
        mov $0x512, %dx
        cld
        rep insb
        mov ${DATA:#x}, %esi
        mov (%esi), %eax
        and 12(%esi), %eax
        cmp $0xffffffff, %eax
        jne 1f
        mov $0x11, %al
        out %al, $0xf4
    1:  mov $0x22, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code, data=bytes(16)))
    assert result.status == (0x11 << 1) | 1
    assert result.unhandled_port_reads == 16


def test_timeout_ends_a_spinning_guest_with_124(tmp_path):
    code = asm32(tmp_path, "1: jmp 1b")
    result = run(plan_for(code), timeout=0.5)
    assert (result.reason, result.status) == ("timeout", 124)


def test_timeout_interrupts_a_halted_guest(tmp_path):
    # HLT with interrupts off sleeps inside KVM (in-kernel LAPIC): only the
    # timer signal can end KVM_RUN.
    code = asm32(tmp_path, "cli\n1: hlt\njmp 1b")
    result = run(plan_for(code), timeout=0.5)
    assert (result.reason, result.status) == ("timeout", 124)


def test_triple_fault_is_a_fault_with_a_register_dump(tmp_path):
    # No IDT (limit 0): the #UD cannot be delivered, nor the #DF: shutdown.
    code = asm32(tmp_path, "ud2")
    result = run(plan_for(code))
    assert (result.reason, result.status) == ("triple-fault", 1), result.message
    assert "triple" in result.message and f"{CODE:#x}" in result.message
    assert f"RIP={CODE:016x}" in result.detail.replace(" ", "")


def test_stop_on_matches_console_output(tmp_path):
    msg = b"booting...\nRun /init as init process\nmore\n"
    code = asm32(
        tmp_path,
        f"""
        mov ${DATA:#x}, %esi
        mov ${len(msg)}, %ecx
        mov $0x3f8, %dx
    2:  lodsb
        out %al, %dx
        loop 2b
        mov $0x7f, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code, data=msg), stop_on=r"Run /init")
    assert (result.reason, result.status) == ("console-match", 0)
    assert result.console.endswith("Run /init")


def test_console_log_file_gets_the_output(tmp_path):
    code = asm32(
        tmp_path,
        """
        mov $0x3f8, %dx
        mov $'z', %al
        out %al, %dx
        out %al, $0xf4
        """,
    )
    log = tmp_path / "console.log"
    result = run(plan_for(code), console_log=log, capture_console=False)
    assert log.read_bytes() == b"z"
    assert result.console == ""


def test_i8042_reset_ends_with_status_0(tmp_path):
    code = asm32(
        tmp_path,
        """
        mov $0xfe, %al
        out %al, $0x64
        1: jmp 1b
        """,
    )
    result = run(plan_for(code), timeout=10)
    assert (result.reason, result.status) == ("reset", 0)


def test_bad_memory_size_is_a_usage_error():
    from pvhboot.errors import UsageError

    with pytest.raises(UsageError, match="12Q"):
        Machine(kernel="x", memory="12Q")
    with pytest.raises(UsageError, match="boot path"):
        Machine(kernel="x", boot="bios")


def test_unbacked_memory_is_mmio_reads_all_ones(tmp_path):
    # Above the 128 MiB of RAM nothing is mapped: accesses exit as MMIO to
    # the bus, where nobody claims them.
    code = asm32(
        tmp_path,
        """
        mov $0x10000000, %esi
        movl $0x12345678, (%esi)
        mov (%esi), %eax
        cmp $0xffffffff, %eax
        jne 1f
        mov $0x12, %al
        out %al, $0xf4
    1:  mov $0x24, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code))
    assert result.status == (0x12 << 1) | 1, result.message


def test_an_instruction_kvm_cannot_emulate_is_one_clear_line(tmp_path):
    # crc32 with an MMIO operand must be emulated, and KVM's emulator has no
    # crc32: KVM_EXIT_INTERNAL_ERROR. The message decodes the instruction and
    # names the symbol from the System.map given.
    code = asm32(
        tmp_path,
        """
        mov $0x10000000, %esi
        crc32l (%esi), %eax
        out %al, $0xf4
        """,
    )
    system_map = tmp_path / "System.map"
    system_map.write_text(f"{CODE:016x} T probe_start\n{CODE + 0x100:016x} T probe_end\n")
    result = run(plan_for(code), system_map=system_map, timeout=30)
    if result.reason == "debug-exit":
        pytest.skip("this host's KVM emulates crc32 on MMIO")
    assert (result.reason, result.status) == ("internal-error", 1), result.message
    msg = result.message
    assert "\n" not in msg
    assert "crc32" in msg and f"{CODE + 5:#x}" in msg and "probe_start+0x5" in msg


@pytest.mark.parametrize("quirks_on", [True, False])
def test_host_quirks_step_over_wait_on_a_pvm_host(tmp_path, quirks_on):
    # KVM-HOST-NOTES gap 2: PVM's emulator lacks `wait`; the quirks layer skips
    # it. On VMX/SVM `wait` simply runs.
    from pvhboot.machine.quirks import HostQuirks, is_pvm_host

    code = asm32(tmp_path, "wait\nmov $0x33, %al\nout %al, $0xf4")
    machine = Machine(kernel="(hand-built)", host_quirks=quirks_on, timeout=30)
    quirks = HostQuirks(enabled=quirks_on)
    result = machine.run_plan(plan_for(code), quirks=quirks if quirks.active else None)
    if not is_pvm_host():
        assert (result.status, result.quirks_handled) == ((0x33 << 1) | 1, 0)
    elif quirks_on:
        assert (result.reason, result.status) == ("debug-exit", (0x33 << 1) | 1), result.message
        assert result.quirks_handled == 1
    else:
        assert result.reason == "internal-error" and "wait" in result.message


@pytest.mark.parametrize("bad", ["soon", -1, 0, float("nan"), float("inf")])
def test_bad_timeouts_are_usage_errors(bad):
    from pvhboot.errors import UsageError

    with pytest.raises(UsageError, match="timeout"):
        Machine(kernel="x", timeout=bad)


def test_timeout_outside_the_main_thread_is_refused_clearly(tmp_path):
    import threading

    from pvhboot.errors import UsageError

    code = asm32(tmp_path, "1: jmp 1b")
    caught = []

    def body():
        try:
            run(plan_for(code), timeout=1)
        except UsageError as exc:
            caught.append(str(exc))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(60)
    assert caught and "main thread" in caught[0]


def test_boot_timer_port_marks_the_timeline(tmp_path):
    code = asm32(
        tmp_path,
        """
        mov $0x3f0, %dx
        mov $123, %al
        out %al, %dx
        mov $1, %al
        out %al, $0xf4
        """,
    )
    result = run(plan_for(code))
    assert result.status == 3
    assert result.timeline["first-kvm-run"] <= result.timeline["boot-timer"] <= result.timeline["exit"]


def test_timeout_counts_from_the_start_not_the_first_kvm_run(tmp_path):
    # A guest that prints forever; the run "started" 10 s ago with a 1 s
    # budget, so the budget is spent before the guest could print anything.
    from pvhboot.machine.timeline import Timeline, now

    code = asm32(tmp_path, "mov $0x3f8, %dx\n1: mov $0x78, %al\nout %al, %dx\njmp 1b")
    machine = Machine(kernel="(hand-built)", host_quirks=False, timeout=1)
    result = machine.run_plan(plan_for(code), timeline=Timeline(start=now() - 10))
    assert (result.reason, result.status) == ("timeout", 124)
    assert result.console == ""


def test_run_announces_nothing_when_the_input_is_bad(tmp_path, capfd):
    # The host-quirks line (on a PVM host) must not precede the error.
    from pvhboot.errors import PvhbootError

    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    with pytest.raises(PvhbootError):
        Machine(kernel=kernel, host_quirks=True).run()
    assert capfd.readouterr().err == ""
