"""The technician console's serial side on Linux, and the board file it edits.

``ConsoleStream`` is the byte stream ``evse_agent.console.Console`` reads and writes: a
serial port opened with pyserial (115200 8N1 by default), or — ``console.port`` "pty" — a
pseudo-terminal the agent makes itself, for the host: the agent keeps the master side and
the technician (or a test) opens the other, ``/dev/pts/N``, which ``console.pty_link``
names. Both are watched by the asyncio loop (``add_reader`` / ``add_writer``, as
``serial_link``), so the console never blocks the poller: output waits in a bounded queue
while the terminal is slow or absent, and what does not fit is dropped and counted.

``BoardFile`` keeps the board file as written (without command-line overrides) for
``config set`` and writes it back atomically for ``config save``, keeping a ``.bak``.
"""

import asyncio
import json
import os
import termios
import tty

import serial

from ... import log
from .fs import replace_file

# Console output kept while the terminal does not read (beyond it, output is dropped and
# the terminal told how much). A pasted block of a few kB of commands can answer with
# hundreds of kB while the terminal is busy sending; an SBC has room for that.
MAX_PENDING = 1024 * 1024
REOPEN_S = 5.0


class ConsoleStream:
    """``await read(max_bytes, timeout_ms)`` -> bytes (b"" on timeout) and a ``write(data)``
    that never blocks; each newline leaves as CRLF."""

    def __init__(self, port, baudrate=115200, pty_link=None):
        self.port = port
        self.baudrate = baudrate
        self.pty_link = pty_link
        self.device = None
        self.dropped = 0
        self._serial = None
        self._fd = None
        self._keep = None  # the pty's other side, held so reads never see a hang-up
        self._out = bytearray()
        self._writer_fd = None
        self._loop = None
        self._retry_at = 0.0
        self._open()

    # -- opening -----------------------------------------------------------------------

    def _open(self):
        try:
            if self.port == "pty":
                self._open_pty()
            else:
                self._serial = serial.Serial(port=self.port, baudrate=self.baudrate, bytesize=8,
                                             parity=serial.PARITY_NONE, stopbits=1, timeout=0,
                                             exclusive=True)
                self._fd = self._serial.fileno()
                self.device = self.port
            os.set_blocking(self._fd, False)
        except (OSError, serial.SerialException) as error:
            self._close_fds()
            log.error("console: cannot open %s (%s); trying again every %d s" % (self.port, error, REOPEN_S))
            return False
        log.info("console on %s at %d 8N1%s" % (
            self.device, self.baudrate, ", link %s" % self.pty_link if self.port == "pty" and self.pty_link else ""))
        return True

    def _open_pty(self):
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        self._fd, self._keep = master, slave
        self.device = os.ttyname(slave)
        if self.pty_link:
            directory = os.path.dirname(os.path.abspath(self.pty_link))
            os.makedirs(directory, exist_ok=True)
            temp = "%s.tmp-%d" % (self.pty_link, os.getpid())
            os.symlink(self.device, temp)
            os.replace(temp, self.pty_link)

    def _reopen_if_due(self, loop):
        if loop.time() >= self._retry_at:
            self._retry_at = loop.time() + REOPEN_S
            self._open()

    def _lost(self, error):
        log.warning("console: lost %s (%s); trying again every %d s" % (self.device, error, REOPEN_S))
        self._close_fds()

    # -- reading -----------------------------------------------------------------------

    async def read(self, max_bytes, timeout_ms):
        loop = self._loop = asyncio.get_running_loop()
        if self._fd is None:
            await asyncio.sleep(timeout_ms / 1000)
            self._reopen_if_due(loop)
            return b""
        data = self._read_now(max_bytes)
        if data or timeout_ms <= 0 or self._fd is None:
            return data
        readable = loop.create_future()

        def on_readable():
            if not readable.done():
                readable.set_result(None)

        fd = self._fd
        loop.add_reader(fd, on_readable)
        try:
            await asyncio.wait_for(readable, timeout_ms / 1000)
        except asyncio.TimeoutError:
            return b""
        finally:
            loop.remove_reader(fd)
        return self._read_now(max_bytes)

    def _read_now(self, max_bytes):
        try:
            data = os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as error:
            self._lost(error)
            return b""
        if not data:  # end of file: the serial device hung up
            self._lost("end of file")
        return data

    # -- writing -----------------------------------------------------------------------

    def write(self, data):
        if self._fd is None:
            return
        data = data.replace(b"\n", b"\r\n")
        if len(self._out) + len(data) > MAX_PENDING:
            self.dropped += len(data)
            return
        self._out.extend(data)
        self._flush()

    def _flush(self):
        while self._out and self._fd is not None:
            try:
                written = os.write(self._fd, self._out)
            except BlockingIOError:
                written = 0
            except OSError as error:
                self._lost(error)
                return
            if not written:
                self._watch_writable()
                return
            del self._out[:written]
            if not self._out and self.dropped:
                note = "\r\n[console: %d bytes of output dropped while the terminal did not read]\r\n" % self.dropped
                self.dropped = 0
                self._out.extend(note.encode())
        self._unwatch_writable()

    def _watch_writable(self):
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (yet): the queue is sent by the next write
        if self._writer_fd is None:
            self._writer_fd = self._fd
            self._loop.add_writer(self._fd, self._flush)

    def _unwatch_writable(self):
        if self._writer_fd is not None:
            if not self._loop.is_closed():  # at exit the loop may be gone already
                self._loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    async def drain(self, timeout_ms):
        """Wait until the queued output has left (or ``timeout_ms`` passed)."""
        waited = 0
        while self._out and self._fd is not None and waited < timeout_ms:
            await asyncio.sleep(0.02)
            waited += 20

    # -- closing -----------------------------------------------------------------------

    def close(self):
        """Send what is queued if the line takes it now, and close."""
        if self._fd is not None and self._out:
            try:
                os.write(self._fd, self._out)
            except OSError:
                pass
        if self.port == "pty" and self.pty_link and self.device:
            try:
                if os.readlink(self.pty_link) == self.device:
                    os.remove(self.pty_link)
            except OSError:
                pass
        self._close_fds()

    def _close_fds(self):
        self._unwatch_writable()
        if self._serial is not None:
            try:
                self._serial.close()
            except (OSError, serial.SerialException):
                pass
        elif self._fd is not None:
            os.close(self._fd)
        if self._keep is not None:
            os.close(self._keep)
        self._serial = self._fd = self._keep = None
        self._out = bytearray()


class BoardFile:
    """The board file as written: ``doc`` (the parsed JSON), ``overrides`` (the command
    line's ``section.field=value`` list) and ``save(doc)``."""

    def __init__(self, path, overrides):
        self.path = path
        self.overrides = list(overrides)
        with open(path) as handle:
            self.doc = json.load(handle)

    def save(self, doc):
        """Replace the board file with ``doc`` (temp file, fsync, rename, directory fsync),
        the previous file copied to ``<path>.bak`` first; returns the backup's path."""
        target = os.path.realpath(self.path)
        backup = self.path + ".bak"
        mode = os.stat(target).st_mode & 0o777
        with open(target, "rb") as handle:
            replace_file(os.path.realpath(backup), handle.read(), mode)
        replace_file(target, (json.dumps(doc, indent=2) + "\n").encode(), mode)
        return backup


def open_console(config):
    """The console stream the board names (``console.port``), or None when it has none."""
    config = config["console"]
    if config["port"] is None:
        return None
    return ConsoleStream(config["port"], config["baudrate"], config["pty_link"])
