"""Host console: raw mode on a real pseudo-terminal, restored on every way out."""

from __future__ import annotations

import os
import signal
import termios
import threading
import time

import pytest

from pvhboot.machine import console as c
from pvhboot.machine.console import Console


@pytest.fixture
def pty():
    master, slave = os.openpty()
    yield master, slave
    c.restore_all()
    os.close(master)
    os.close(slave)


def lflag(fd):
    return termios.tcgetattr(fd)[c.LFLAG]


class Collector:
    def __init__(self):
        self.data = bytearray()
        self.event = threading.Event()

    def __call__(self, b):
        self.data += b
        self.event.set()

    def wait_for(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.data) < n and time.monotonic() < deadline:
            self.event.wait(0.05)
            self.event.clear()
        return bytes(self.data)


def test_raw_mode_and_restore_on_normal_exit(pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    assert lflag(slave) & termios.ICANON
    with Console(None, fd=slave) as con:
        assert con.is_tty
        now = termios.tcgetattr(slave)
        assert not now[c.LFLAG] & (termios.ICANON | termios.ECHO)
        assert now[c.LFLAG] & termios.ISIG  # Ctrl-C still reaches pvhboot
        assert now[c.OFLAG] & termios.OPOST
        assert not now[c.IFLAG] & termios.ICRNL
    assert termios.tcgetattr(slave) == before


def test_restore_on_exception(pty):
    _, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError), Console(None, fd=slave):
        assert not lflag(slave) & termios.ICANON
        raise RuntimeError("guest fault")
    assert termios.tcgetattr(slave) == before


def test_restore_on_sigterm(pty):
    _, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(SystemExit) as exc, Console(None, fd=slave):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs before this returns
    assert exc.value.code == 128 + signal.SIGTERM
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_restore_all_is_what_atexit_runs(pty):
    _, slave = pty
    before = termios.tcgetattr(slave)
    assert c.enter_raw_mode(slave)
    assert not lflag(slave) & termios.ICANON
    c.restore_all()
    assert termios.tcgetattr(slave) == before


def test_reader_feeds_input_and_ctrl_a_x_quits(pty):
    master, slave = pty
    got = Collector()
    quits = []
    with Console(got, fd=slave, on_quit=lambda: quits.append(1)) as con:
        os.write(master, b"ls\r")
        assert got.wait_for(3) == b"ls\r"
        os.write(master, b"\x01\x01a\x01b")
        assert got.wait_for(6) == b"ls\r\x01a\x01b"
        os.write(master, b"\x01x")
        deadline = time.monotonic() + 5
        while not quits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert quits == [1] and con.quit_requested


def test_pipe_input_is_passed_through_untouched():
    r, w = os.pipe()
    got = Collector()
    try:
        with Console(got, fd=r) as con:
            assert not con.is_tty
            os.write(w, b"\x01x plain")
            assert got.wait_for(8) == b"\x01x plain"
            assert not con.quit_requested
    finally:
        os.close(r)
        os.close(w)


def test_stop_does_not_hang_on_idle_input(pty):
    _, slave = pty
    con = Console(lambda b: None, fd=slave)
    con.start()
    thread = con._thread
    assert thread is not None and thread.is_alive()
    con.stop()
    assert not thread.is_alive()  # woken through the stop pipe, not left behind
