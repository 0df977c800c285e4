"""The host side of the guest's serial console: raw terminal and a stdin reader.

On a TTY, stdin goes into raw mode so every key reaches the guest as typed
(no line editing, no echo: the guest echoes). The saved terminal state is
put back on every way out: leaving the ``with`` block normally or by an
exception, SIGTERM/SIGHUP (the handler restores, then ends the process with
status 128+signal through SystemExit so ``finally`` blocks still run), and
interpreter exit (atexit), whichever comes first. Output post-processing
(OPOST) stays on so the VMM's own messages keep their line breaks, and
Ctrl-C still signals pvhboot unless ``signals=False``.

Like QEMU's ``-nographic``, Ctrl-A x quits and Ctrl-A Ctrl-A sends a
literal Ctrl-A; escapes apply only to a TTY, piped input passes through.

The reader thread waits in select() on stdin and a stop pipe, so it never
blocks shutdown and stdin never needs O_NONBLOCK (which, on a terminal,
would leak into stdout and stderr that share its open file description).
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import threading
from collections.abc import Callable

try:
    import termios
except ImportError:  # not on Linux; raw mode is then simply unavailable
    termios = None  # type: ignore[assignment]

ESCAPE = 0x01  # Ctrl-A, as in QEMU
QUIT_KEY = ord("x")
READ_SIZE = 4096
RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# termios.tcgetattr list indices.
IFLAG, OFLAG, CFLAG, LFLAG, ISPEED, OSPEED, CC = range(7)

# Terminals currently in raw mode: fd -> saved attributes. atexit and the
# signal handlers restore every one of them.
_saved: dict[int, list] = {}
_saved_lock = threading.Lock()
_atexit_registered = False


def _restore(fd: int) -> None:
    with _saved_lock:
        attrs = _saved.pop(fd, None)
    if attrs is not None and termios is not None:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
        except (termios.error, OSError):
            pass  # the terminal went away (hangup): nothing left to restore


def restore_all() -> None:
    """Put every terminal this module changed back as it was."""
    for fd in list(_saved):
        _restore(fd)


def _raw_attrs(attrs: list, *, signals: bool) -> list:
    """cfmakeraw(3), but keeping OPOST and (optionally) ISIG."""
    t = termios
    new = [list(a) if isinstance(a, list) else a for a in attrs]
    new[IFLAG] &= ~(
        t.IGNBRK | t.BRKINT | t.PARMRK | t.ISTRIP | t.INLCR | t.IGNCR | t.ICRNL | t.IXON
    )
    new[LFLAG] &= ~(t.ECHO | t.ECHONL | t.ICANON | t.IEXTEN)
    if not signals:
        new[LFLAG] &= ~t.ISIG
    new[CFLAG] = (new[CFLAG] & ~(t.CSIZE | t.PARENB)) | t.CS8
    new[CC][t.VMIN] = 1
    new[CC][t.VTIME] = 0
    return new


def enter_raw_mode(fd: int, *, signals: bool = True) -> bool:
    """Put ``fd`` in raw mode if it is a TTY; False (and no change) otherwise."""
    global _atexit_registered
    if termios is None or not os.isatty(fd):
        return False
    try:
        attrs = termios.tcgetattr(fd)
    except termios.error:
        return False
    with _saved_lock:
        if fd in _saved:
            return True
        _saved[fd] = attrs
        if not _atexit_registered:
            atexit.register(restore_all)
            _atexit_registered = True
    termios.tcsetattr(fd, termios.TCSADRAIN, _raw_attrs(attrs, signals=signals))
    return True


class Console:
    """Raw mode plus a stdin reader feeding ``on_input`` (e.g. the UART's feed_input)."""

    def __init__(
        self,
        on_input: Callable[[bytes], object] | None,
        *,
        fd: int = 0,
        on_quit: Callable[[], object] | None = None,
        raw: bool = True,
        signals: bool = True,
    ) -> None:
        self.fd = fd
        self.on_input = on_input
        self.on_quit = on_quit
        self.raw = raw
        self.signals = signals
        self.is_tty = False
        self.quit_requested = False
        self._thread: threading.Thread | None = None
        self._stop_r = self._stop_w = -1
        self._old_handlers: dict[int, object] = {}
        self._escape_pending = False

    # --- lifetime --------------------------------------------------------------

    def __enter__(self) -> Console:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self.is_tty = os.isatty(self.fd)
        except OSError:
            self.is_tty = False
        if self.raw and self.is_tty:
            enter_raw_mode(self.fd, signals=self.signals)
            self._install_signal_handlers()
        if self.on_input is not None and self._readable():
            self._stop_r, self._stop_w = os.pipe()
            self._thread = threading.Thread(target=self._reader, name="pvhboot-stdin", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        try:
            if self._thread is not None:
                os.write(self._stop_w, b"x")
                self._thread.join(timeout=2)
                self._thread = None
            for fd in (self._stop_r, self._stop_w):
                if fd >= 0:
                    os.close(fd)
            self._stop_r = self._stop_w = -1
        finally:
            _restore(self.fd)
            self._uninstall_signal_handlers()

    def _readable(self) -> bool:
        try:
            os.fstat(self.fd)
        except OSError:
            return False
        return True

    # --- signals ---------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works there; atexit and finally still restore
        for sig in RESTORE_SIGNALS:
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _uninstall_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)  # type: ignore[arg-type]
            except (ValueError, OSError, TypeError):
                pass
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        restore_all()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
            return
        raise SystemExit(128 + signum)

    # --- input -----------------------------------------------------------------

    def _reader(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError:
                return  # e.g. EIO after the terminal hung up
            if not data:
                return  # EOF: the guest simply gets no more input
            data = self._filter(data) if self.is_tty else data
            if data and self.on_input is not None:
                self.on_input(data)
            if self.quit_requested:
                return

    def _filter(self, data: bytes) -> bytes:
        """Handle Ctrl-A escapes; returns the bytes meant for the guest."""
        out = bytearray()
        for byte in data:
            if self._escape_pending:
                self._escape_pending = False
                if byte == QUIT_KEY:
                    self._quit()
                    break
                if byte != ESCAPE:
                    out.append(ESCAPE)  # not an escape after all: pass both on
                out.append(byte)
            elif byte == ESCAPE:
                self._escape_pending = True
            else:
                out.append(byte)
        return bytes(out)

    def _quit(self) -> None:
        self.quit_requested = True
        if self.on_quit is not None:
            self.on_quit()
        else:
            # Best effort without a VMM hook: interrupt the main thread.
            os.kill(os.getpid(), signal.SIGINT)
