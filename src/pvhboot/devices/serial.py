"""A 16550A UART, as the Linux 8250 driver sees it at 0x3f8 (COM1, IRQ 4).

Register semantics follow the National/TI PC16550D data sheet ("Register
Summary", "Interrupt Identification Register", "FIFO Control Register"),
plus the one behaviour of real 8250-family parts that the data sheet leaves
implicit and Linux relies on: turning IER.THRI on while the transmitter is
empty raises the THRE interrupt again, even if an IIR read had cleared it
(the 8250 driver's "THRE re-assert" test at startup checks exactly this, and
falls back to a polling timer when it fails).

Transmission is instant: every THR write goes straight to ``out``, so LSR
always shows THRE|TEMT and the THRE interrupt is pending again right after
each THR write. The IRQ line is level-triggered and driven through
``irq.set`` only when the pending state changes.

Host input goes through ``feed_input``; bytes beyond what the receive FIFO
holds wait in a host-side backlog and move into the FIFO as the guest reads,
so pasted text is never dropped as an overrun.

The device knows nothing of KVM; ``feed_input`` may be called from another
thread (the console reader), so state changes happen under a lock.
"""

from __future__ import annotations

import _thread
import time

from .base import Device, IrqLine

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections costs ~0.5 ms of start-up on the boot path
    from collections.abc import Callable

# Register offsets from the base port (PC16550D "Register Summary").
RBR_THR = 0  # receive buffer (read) / transmit holding (write); DLL when DLAB=1
IER = 1  # interrupt enable; DLM when DLAB=1
IIR_FCR = 2  # interrupt identification (read) / FIFO control (write)
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits.
IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F  # the upper nibble reads back 0 on a 16550A (Linux's XScale test writes bit 6)

# IIR values, highest priority first (PC16550D table "Interrupt Control Functions").
IIR_NO_INT = 0x01
IIR_RLSI = 0x06
IIR_RDI = 0x04
IIR_RX_TIMEOUT = 0x0C
IIR_THRI = 0x02
IIR_MSI = 0x00
IIR_FIFO_ENABLED = 0xC0  # bits 7:6 both set: a working 16550A FIFO (Linux autoconfig)

# FCR bits.
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_TRIGGER_MASK = 0xC0
# Receive trigger levels selected by FCR bits 7:6 on a 16-byte FIFO.
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR bits.
LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits.
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits: deltas in the low nibble, line states in the high one.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of RI
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
# Outside loopback the "cable" reports carrier, DSR and CTS asserted, so a
# guest that honours modem lines never waits on them.
MSR_IDLE_LINES = MSR_DCD | MSR_DSR | MSR_CTS

FIFO_SIZE = 16  # 16550A
# Host input waiting beyond the FIFO; past this the UART reports an overrun.
MAX_BACKLOG = 1 << 20
# Divisor the BIOS leaves for 115200 baud (1.8432 MHz / 16 / 115200).
DEFAULT_DIVISOR = 1


def _loopback_msr(mcr: int) -> int:
    """MSR line states in loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD (PC16550D MCR bit 4)."""
    lines = 0
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


class Serial16550(Device):
    """16550A UART; attach at 0x3f8 with 8 ports, IRQ 4."""

    name = "serial"
    SIZE = 8

    def __init__(
        self,
        irq: IrqLine,
        out: Callable[[bytes], object],
        *,
        on_first_byte: Callable[[float], object] | None = None,
    ) -> None:
        self.irq = irq
        self.out = out
        self.on_first_byte = on_first_byte
        self.first_byte_time: float | None = None  # time.monotonic() of the first byte sent
        self.bytes_out = 0
        # _thread's lock is threading.Lock without importing threading
        # (0.4 ms on the boot path, where no other thread may ever exist).
        self._lock = _thread.allocate_lock()
        self.ier = 0
        self.lcr = 0x03  # 8N1, as firmware leaves it
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_IDLE_LINES
        self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self.fifo_enabled = False
        self.rx_trigger = 1
        # At most FIFO_SIZE bytes (_capacity), so a bytearray's pop(0) is cheap.
        self.rx = bytearray()
        self.backlog = bytearray()
        self.thr_pending = False  # THRE interrupt pending (cleared by an IIR read reporting it)
        self.irq_level = False

    # --- guest side -----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        # Wider accesses see the register in the low byte, as on an ISA bus
        # the upper lanes float high.
        if size > 1:
            value |= ((1 << (8 * size)) - 1) & ~0xFF
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.divisor & 0xFF
            return self._pop_rx()
        if offset == IER:
            if dlab:
                return (self.divisor >> 8) & 0xFF
            return self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            # Reading IIR while it reports THRE acknowledges that interrupt
            # (PC16550D: "THRE ... reset by reading IIR (if source of interrupt)").
            if iir == IIR_THRI:
                self.thr_pending = False
            return iir | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_ERRORS  # error bits clear on read
            return lsr
        if offset == MSR:
            msr = self.msr
            self.msr &= ~MSR_DELTAS  # deltas clear on read
            return msr
        if offset == SCR:
            return self.scr
        return 0xFF

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            old = self.ier
            self.ier = value & IER_MASK
            # A rising edge of THRI with the transmitter empty re-arms the
            # THRE interrupt (8250 behaviour Linux's startup test depends on).
            if (self.ier & IER_THRI) and not (old & IER_THRI):
                self.thr_pending = bool(self.lsr & LSR_THRE)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self._write_mcr(value & MCR_MASK)
        elif offset == SCR:
            self.scr = value
        # LSR and MSR writes are ignored: factory-test registers on the part.

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE_FIFO)
        if enable != self.fifo_enabled:
            # Switching FIFO mode resets both FIFOs (PC16550D FCR bit 0).
            self.rx.clear()
        self.fifo_enabled = enable
        if value & FCR_CLEAR_RCVR:
            self.rx.clear()
        # The transmit FIFO is always empty: nothing to clear for FCR_CLEAR_XMIT.
        self.rx_trigger = RX_TRIGGER_LEVELS[(value & FCR_TRIGGER_MASK) >> 6]
        self._refill()

    def _write_mcr(self, value: int) -> None:
        old_lines = self.msr & 0xF0
        self.mcr = value
        if value & MCR_LOOP:
            new_lines = _loopback_msr(value)
        else:
            new_lines = MSR_IDLE_LINES
        self._set_msr_lines(old_lines, new_lines)
        self._refill()

    def _set_msr_lines(self, old: int, new: int) -> None:
        deltas = 0
        changed = old ^ new
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if (old & MSR_RI) and not (new & MSR_RI):
            deltas |= MSR_TERI
        self.msr = new | (self.msr & MSR_DELTAS) | deltas

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            # Loopback: the transmitter feeds the receiver, nothing leaves the chip.
            self._push_rx(value)
        else:
            if self.first_byte_time is None:
                self.first_byte_time = time.monotonic()
                if self.on_first_byte is not None:
                    self.on_first_byte(self.first_byte_time)
            self.bytes_out += 1
            self.out(bytes((value,)))
        # Sent at once: THR is empty again and THRE interrupts anew.
        self.lsr |= LSR_THRE | LSR_TEMT
        self.thr_pending = True

    # --- receive FIFO ---------------------------------------------------------

    def _capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _push_rx(self, value: int) -> None:
        if len(self.rx) >= self._capacity():
            self.lsr |= LSR_OE
            return
        self.rx.append(value)

    def _pop_rx(self) -> int:
        if not self.rx:
            return 0
        value = self.rx.pop(0)
        self._refill()
        return value

    def _refill(self) -> None:
        """Move backlogged host input into the FIFO (not in loopback: SIN is cut off)."""
        if self.mcr & MCR_LOOP or not self.backlog:
            return
        room = self._capacity() - len(self.rx)
        if room <= 0:
            return
        take = self.backlog[:room]
        del self.backlog[:room]
        self.rx.extend(take)

    # --- interrupts -----------------------------------------------------------

    def _iir(self) -> int:
        if (self.ier & IER_RLSI) and (self.lsr & LSR_ERRORS):
            return IIR_RLSI
        if (self.ier & IER_RDI) and self.rx:
            if self.fifo_enabled and len(self.rx) < self.rx_trigger:
                # Below the trigger level a real part waits four character
                # times and reports a timeout; we report it at once.
                return IIR_RX_TIMEOUT
            return IIR_RDI
        if (self.ier & IER_THRI) and self.thr_pending:
            return IIR_THRI
        if (self.ier & IER_MSI) and (self.msr & MSR_DELTAS):
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            self.irq.set(level)

    # --- host side ------------------------------------------------------------

    def feed_input(self, data: bytes) -> int:
        """Queue host bytes for the guest to read; returns how many were accepted."""
        with self._lock:
            room = MAX_BACKLOG - len(self.backlog)
            accepted = data[: max(room, 0)]
            if len(accepted) < len(data):
                self.lsr |= LSR_OE
            self.backlog += accepted
            self._refill()
            self._update_irq()
            return len(accepted)

    @property
    def pending_input(self) -> int:
        """Bytes fed but not yet read by the guest."""
        return len(self.rx) + len(self.backlog)
