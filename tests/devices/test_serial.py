"""16550A register semantics, with no VM: a fake IRQ line records every level."""

from __future__ import annotations

import threading

from pvhboot.devices import serial as u
from pvhboot.devices.serial import Serial16550


class RecordingIrq:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    @property
    def level(self) -> bool:
        return bool(self.levels) and self.levels[-1]

    def set(self, level: bool) -> None:
        self.levels.append(level)

    def pulse(self) -> None:
        raise AssertionError("the UART's line is level-triggered")


def make():
    irq = RecordingIrq()
    out: list[bytes] = []
    uart = Serial16550(irq, out.append)
    return uart, irq, out


def test_transmit_goes_to_out_and_lsr_stays_empty():
    uart, irq, out = make()
    for b in b"hi\n":
        uart.write(u.RBR_THR, 1, b)
    assert b"".join(out) == b"hi\n"
    lsr = uart.read(u.LSR, 1)
    assert lsr & u.LSR_THRE and lsr & u.LSR_TEMT
    assert not lsr & u.LSR_DR
    assert irq.levels == []  # no interrupt enabled: the line never moved
    assert uart.bytes_out == 3


def test_first_byte_hook_called_once():
    seen = []
    uart = Serial16550(RecordingIrq(), lambda b: None, on_first_byte=seen.append)
    uart.write(0, 1, ord("a"))
    uart.write(0, 1, ord("b"))
    assert len(seen) == 1 and seen[0] == uart.first_byte_time


def test_enabling_thri_raises_and_iir_read_clears():
    uart, irq, _ = make()
    assert uart.read(u.IIR_FCR, 1) == u.IIR_NO_INT
    uart.write(u.IER, 1, u.IER_THRI)
    assert irq.levels == [True]
    assert uart.read(u.IIR_FCR, 1) == u.IIR_THRI
    assert irq.levels == [True, False]
    # Acknowledged: stays quiet until the next THR write or THRI re-enable.
    assert uart.read(u.IIR_FCR, 1) == u.IIR_NO_INT
    uart.write(u.RBR_THR, 1, ord("x"))
    assert irq.levels == [True, False, True]
    assert uart.read(u.IIR_FCR, 1) == u.IIR_THRI


def test_linux_thre_reassert_test_passes():
    # serial8250_do_startup: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
    # A UART whose second read shows no interrupt gets UART_BUG_THRE.
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_THRI)
    iir1 = uart.read(u.IIR_FCR, 1)
    uart.write(u.IER, 1, 0)
    uart.write(u.IER, 1, u.IER_THRI)
    iir2 = uart.read(u.IIR_FCR, 1)
    uart.write(u.IER, 1, 0)
    assert not iir1 & u.IIR_NO_INT and not iir2 & u.IIR_NO_INT
    assert not irq.level


def test_writing_ier_with_thri_already_set_does_not_rearm():
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_THRI)
    uart.read(u.IIR_FCR, 1)
    uart.write(u.IER, 1, u.IER_THRI | u.IER_RDI)
    assert uart.read(u.IIR_FCR, 1) == u.IIR_NO_INT


def test_disabling_thri_drops_the_line():
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_THRI)
    uart.write(u.IER, 1, 0)
    assert irq.levels == [True, False]


def test_receive_sets_dr_and_rda_interrupt():
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_RDI)
    assert irq.levels == []
    assert uart.feed_input(b"ab") == 2
    assert irq.levels == [True]
    assert uart.read(u.IIR_FCR, 1) == u.IIR_RDI  # FIFO off: holding register of 1
    assert uart.read(u.LSR, 1) & u.LSR_DR
    assert uart.read(u.RBR_THR, 1) == ord("a")
    assert irq.level  # "b" moved up from the backlog
    assert uart.read(u.RBR_THR, 1) == ord("b")
    assert not irq.level
    assert not uart.read(u.LSR, 1) & u.LSR_DR
    assert uart.read(u.RBR_THR, 1) == 0  # empty: reads do not underflow


def test_rda_has_priority_over_thre():
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_THRI | u.IER_RDI)
    uart.feed_input(b"z")
    assert uart.read(u.IIR_FCR, 1) == u.IIR_RDI
    uart.read(u.RBR_THR, 1)
    assert uart.read(u.IIR_FCR, 1) == u.IIR_THRI


def test_fifo_enable_reports_in_iir_and_holds_16():
    uart, irq, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO | 0xC0)  # trigger at 14
    assert uart.read(u.IIR_FCR, 1) & 0xC0 == 0xC0
    uart.write(u.IER, 1, u.IER_RDI)
    uart.feed_input(bytes(range(40)))
    assert len(uart.rx) == u.FIFO_SIZE
    assert uart.pending_input == 40
    assert uart.read(u.IIR_FCR, 1) == 0xC0 | u.IIR_RDI
    got = bytes(uart.read(u.RBR_THR, 1) for _ in range(40))
    assert got == bytes(range(40))  # nothing lost to overrun
    assert not uart.read(u.LSR, 1) & u.LSR_OE
    assert not irq.level


def test_fifo_below_trigger_reports_timeout():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO | 0x80)  # trigger at 8
    uart.write(u.IER, 1, u.IER_RDI)
    uart.feed_input(b"abc")
    assert uart.read(u.IIR_FCR, 1) == 0xC0 | u.IIR_RX_TIMEOUT


def test_fcr_clears_receive_fifo():
    uart, irq, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO)
    uart.write(u.IER, 1, u.IER_RDI)
    uart.feed_input(b"abc")
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO | u.FCR_CLEAR_RCVR)
    assert not uart.read(u.LSR, 1) & u.LSR_DR
    assert not irq.level


def test_dlab_exposes_divisor_latch():
    uart, _, out = make()
    uart.write(u.LCR, 1, 0x83)
    uart.write(u.RBR_THR, 1, 0x0C)  # 9600 baud
    uart.write(u.IER, 1, 0x00)
    assert uart.read(u.RBR_THR, 1) == 0x0C and uart.read(u.IER, 1) == 0
    assert uart.divisor == 12
    uart.write(u.LCR, 1, 0x03)
    assert out == []  # the divisor write did not transmit
    assert uart.read(u.IER, 1) == 0
    assert uart.read(u.LCR, 1) == 0x03


def test_ier_upper_bits_read_zero():
    # Linux autoconfig writes 0x0F and expects it back; XScale test writes bit 6.
    uart, _, _ = make()
    uart.write(u.IER, 1, 0xFF)
    assert uart.read(u.IER, 1) == 0x0F


def test_scratch_register():
    uart, _, _ = make()
    uart.write(u.SCR, 1, 0xA5)
    assert uart.read(u.SCR, 1) == 0xA5


def test_loopback_modem_lines_match_linux_autoconfig():
    uart, _, out = make()
    save = uart.read(u.MCR, 1)
    uart.write(u.MCR, 1, u.MCR_LOOP | 0x0A)
    assert uart.read(u.MSR, 1) & 0xF0 == 0x90  # what serial8250 autoconfig checks
    uart.write(u.MCR, 1, u.MCR_LOOP | u.MCR_DTR | u.MCR_OUT1)
    assert uart.read(u.MSR, 1) & 0xF0 == u.MSR_DSR | u.MSR_RI
    uart.write(u.MCR, 1, save)
    assert uart.read(u.MSR, 1) & 0xF0 == u.MSR_IDLE_LINES
    assert out == []


def test_loopback_thr_feeds_rbr_not_out():
    uart, irq, out = make()
    uart.write(u.MCR, 1, u.MCR_LOOP)
    uart.write(u.IER, 1, u.IER_RDI)
    uart.write(u.RBR_THR, 1, 0x42)
    assert out == []
    assert irq.level
    assert uart.read(u.LSR, 1) & u.LSR_DR
    assert uart.read(u.RBR_THR, 1) == 0x42
    # Overrun: a second byte into a full holding register (FIFO off)
    uart.write(u.RBR_THR, 1, 1)
    uart.write(u.RBR_THR, 1, 2)
    assert uart.read(u.LSR, 1) & u.LSR_OE
    assert not uart.read(u.LSR, 1) & u.LSR_OE  # cleared by the read


def test_host_input_waits_while_in_loopback():
    uart, _, _ = make()
    uart.write(u.MCR, 1, u.MCR_LOOP)
    uart.feed_input(b"k")
    assert not uart.read(u.LSR, 1) & u.LSR_DR
    uart.write(u.MCR, 1, u.MCR_OUT2)
    assert uart.read(u.RBR_THR, 1) == ord("k")


def test_modem_status_interrupt_and_delta_clear():
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_MSI)
    uart.write(u.MCR, 1, u.MCR_LOOP)  # lines drop: deltas
    assert irq.level
    assert uart.read(u.IIR_FCR, 1) == u.IIR_MSI
    msr = uart.read(u.MSR, 1)
    assert msr & u.MSR_DELTAS == u.MSR_DCTS | u.MSR_DDSR | u.MSR_DDCD
    assert not irq.level
    assert uart.read(u.MSR, 1) & u.MSR_DELTAS == 0


def test_line_status_interrupt_on_overrun():
    uart, irq, _ = make()
    uart.write(u.IER, 1, u.IER_RLSI)
    uart.write(u.MCR, 1, u.MCR_LOOP)
    uart.write(u.RBR_THR, 1, 1)
    uart.write(u.RBR_THR, 1, 2)
    assert uart.read(u.IIR_FCR, 1) == u.IIR_RLSI
    uart.read(u.LSR, 1)
    assert uart.read(u.IIR_FCR, 1) == u.IIR_NO_INT


def test_wide_read_floats_upper_lanes():
    uart, _, _ = make()
    uart.write(u.SCR, 1, 0x12)
    assert uart.read(u.SCR, 2) == 0xFF12


def test_feed_input_from_another_thread():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO)
    data = bytes(i & 0xFF for i in range(5000))
    t = threading.Thread(target=lambda: [uart.feed_input(data[i : i + 7]) for i in range(0, 5000, 7)])
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if uart.read(u.LSR, 1) & u.LSR_DR:
            got.append(uart.read(u.RBR_THR, 1))
    t.join()
    assert bytes(got) == data


def test_linux_autoconfig_sees_a_plain_16550a():
    # The register dance of drivers/tty/serial/8250/8250_port.c autoconfig()
    # and autoconfig_16550a(), reduced to what decides the port type.
    uart, _, out = make()
    # IER probe: 0 then 0x0F must read back.
    uart.write(u.IER, 1, 0)
    assert uart.read(u.IER, 1) & 0x0F == 0
    uart.write(u.IER, 1, 0x0F)
    assert uart.read(u.IER, 1) & 0x0F == 0x0F
    uart.write(u.IER, 1, 0)
    # Loopback: MCR=LOOP|0x0A must show CTS|DCD.
    uart.write(u.MCR, 1, u.MCR_LOOP | 0x0A)
    assert uart.read(u.MSR, 1) & 0xF0 == 0x90
    uart.write(u.MCR, 1, 0)
    # EFR probe (LCR=0xBF), then FIFO enable: IIR bits 7:6 == 3 -> 16550A family.
    uart.write(u.LCR, 1, 0xBF)
    uart.write(u.IIR_FCR, 1, 0)  # "EFR" write lands on FCR on a 16550A
    uart.write(u.LCR, 1, 0)
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO)
    assert uart.read(u.IIR_FCR, 1) >> 6 == 3
    # ST16C650 test: with DLAB set, offset 2 must not read 0 (it reads IIR).
    uart.write(u.LCR, 1, 0x80)
    assert uart.read(u.IIR_FCR, 1) != 0
    # 16750 test: IIR bit 5 (64-byte FIFO) must stay clear.
    uart.write(u.LCR, 1, 0)
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO | 0x20)
    assert (uart.read(u.IIR_FCR, 1) >> 5) & 1 == 0
    # XScale test: IER bit 6 (UUE) must not stick.
    uart.write(u.IER, 1, 0x40)
    assert not uart.read(u.IER, 1) & 0x40
    assert out == []


def test_interrupt_driven_transmit_drains_without_stalling():
    # The 8250 tty path: start_tx enables THRI, each interrupt the handler
    # reads IIR and refills up to a FIFO's worth, stop_tx clears THRI when empty.
    uart, irq, out = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE_FIFO)
    pending = bytearray(b"x" * 100)
    uart.write(u.IER, 1, u.IER_THRI)  # start_tx
    rounds = 0
    while irq.level:
        rounds += 1
        assert rounds < 50, "interrupt storm or stall"
        iir = uart.read(u.IIR_FCR, 1)
        if iir & u.IIR_NO_INT:
            break
        assert iir & 0x0F == u.IIR_THRI
        assert uart.read(u.LSR, 1) & u.LSR_THRE
        chunk, pending[:] = pending[:16], pending[16:]
        for b in chunk:
            uart.write(u.RBR_THR, 1, b)
        if not pending:
            uart.write(u.IER, 1, 0)  # stop_tx
    assert b"".join(out) == b"x" * 100
    assert rounds == 7 and not irq.level
