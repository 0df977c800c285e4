"""The PS/2 (8042) keyboard controller, just enough for Linux.

Linux touches the 8042 for two reasons here: the i8042 driver probes it at
boot, and ``reboot=k`` (the x86 default) resets the machine by pulsing the
CPU reset line with command 0xFE. The controller answers every command the
probe sends at once, through the output buffer the driver polls, so the
probe never waits out a timeout; no keyboard or mouse is attached, so
nothing answers bytes sent to the devices. Command 0xFE (or an output-port
write that drops the reset line) ends the run with ``StopGuest("reset", 0)``.

Attach at 0x60 with 5 ports: offset 0 is the data port (0x60), offset 4 the
status/command port (0x64). Offset 1 (0x61, system control port B) is
answered too, in case the in-kernel PIT does not claim it: its refresh bit
toggles on every read, which is what delay-calibration loops watch.

Command numbers and status bits: IBM PC/AT Technical Reference, "Keyboard
Controller", as used by Linux drivers/input/serio/i8042.h.
"""

from __future__ import annotations

from .base import Device, StopGuest

DATA = 0  # 0x60
PORT_B = 1  # 0x61
COMMAND = 4  # 0x64: status on read, command on write

# Status register bits.
STR_OBF = 0x01  # output buffer full: a byte waits at 0x60
STR_IBF = 0x02  # input buffer full: the controller is busy (never, here)
STR_SYS = 0x04  # system flag: POST passed
STR_CMDDAT = 0x08  # last write went to 0x64
STR_KEYLOCK = 0x10  # 1 = keyboard not inhibited
STR_AUXDATA = 0x20  # the byte at 0x60 came from the aux (mouse) port

# Controller command byte (CTR) bits.
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
INITIAL_CTR = CTR_XLATE | CTR_SYS | CTR_KBDINT  # what PC firmware leaves behind

# Controller commands (writes to 0x64).
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3  # Linux's AUX loopback test
CMD_WRITE_AUX = 0xD4
CMD_PULSE_BASE = 0xF0  # 0xF0..0xFF: pulse output lines whose bit is 0 in the low nibble
CMD_RESET = 0xFE  # pulse line 0: the CPU reset

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
# AUX interface test answer: "clock line stuck high", i.e. no mouse port; Linux
# then leaves AUX alone instead of probing a mouse that never answers.
AUX_ABSENT = 0x02
# Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
OUTPUT_RESET_LINE = 0x01
OUTPUT_A20 = 0x02
INITIAL_OUTPUT = OUTPUT_RESET_LINE | OUTPUT_A20

# Port B (0x61) bit 4 toggles with every DRAM refresh cycle (~15 us).
PORT_B_REFRESH = 0x10

RESET_STATUS = 0  # a guest reset ends the run successfully


class I8042(Device):
    name = "i8042"
    BASE = 0x60
    SIZE = 5

    def __init__(self) -> None:
        self.ctr = INITIAL_CTR
        self.output_port = INITIAL_OUTPUT
        # The 8042 has a single output byte: a new reply replaces an unread
        # one, so a reply Linux gave up on never shifts the next answer.
        self.outbuf: tuple[int, bool] | None = None  # (byte, came from aux)
        self.pending: int | None = None  # command waiting for its data byte
        self.last_was_command = False
        self.port_b = 0
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if offset == DATA:
            if self.outbuf is not None:
                byte, self.outbuf = self.outbuf[0], None
                return byte
            return 0
        if offset == COMMAND:
            return self._status()
        if offset == PORT_B:
            self.port_b ^= PORT_B_REFRESH
            return self.port_b
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            self.last_was_command = True
            self._command(value)
        elif offset == DATA:
            self.last_was_command = False
            self._data(value)
        elif offset == PORT_B:
            # Speaker/gate bits are writable; refresh (bit 4) and the read-only
            # status bits 5..7 are not.
            self.port_b = (self.port_b & 0xF0) | (value & 0x0F)

    def _status(self) -> int:
        status = STR_SYS | STR_KEYLOCK
        if self.last_was_command:
            status |= STR_CMDDAT
        if self.outbuf is not None:
            status |= STR_OBF
            if self.outbuf[1]:
                status |= STR_AUXDATA
        return status

    def _reply(self, byte: int, aux: bool = False) -> None:
        self.outbuf = (byte & 0xFF, aux)

    def _command(self, cmd: int) -> None:
        self.pending = None
        if cmd == CMD_READ_CTR:
            self._reply(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OUTBUF,
                     CMD_WRITE_AUX_OUTBUF, CMD_WRITE_AUX):
            self.pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif cmd == CMD_AUX_TEST:
            self._reply(AUX_ABSENT)
        elif cmd == CMD_SELF_TEST:
            self._reply(SELF_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._reply(INTERFACE_OK)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT:
            self._reply(self.output_port)
        elif cmd >= CMD_PULSE_BASE:
            # Lines whose bit is 0 in the low nibble are pulsed; line 0 is reset.
            if not (cmd & OUTPUT_RESET_LINE):
                self._reset()
        # Anything else: accepted and ignored, like a controller with no
        # vendor extensions.

    def _data(self, value: int) -> None:
        cmd, self.pending = self.pending, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTPUT:
            self.output_port = value
            if not (value & OUTPUT_RESET_LINE):
                self._reset()
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._reply(value)
        elif cmd == CMD_WRITE_AUX_OUTBUF:
            # No mouse port: the byte comes back without the AUXDATA flag, so
            # Linux's AUX loopback test fails at once and it moves on.
            self._reply(value)
        # Bytes for the keyboard (cmd None) or the mouse (CMD_WRITE_AUX) go
        # to devices that are not there: nothing answers.

    def _reset(self) -> None:
        self.resets += 1
        raise StopGuest("reset", RESET_STATUS)
