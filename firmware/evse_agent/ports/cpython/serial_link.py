"""RS-485 serial line for the Modbus master, on pyserial, read through the asyncio loop.

The port is opened non-blocking and its file descriptor watched by the event loop, so
waiting for a meter's answer never blocks the other tasks (console, MQTT).

A missing or vanished device (a USB adapter unplugged, a pty whose other side closed) is
not fatal: the stream closes its descriptor and every transaction fails with
``SerialLinkError`` (a ``ModbusError`` of kind ``link``) until opening the device works
again, which is tried once per transaction — the meter is reported offline meanwhile and
comes back online by itself.
"""

import asyncio
import os
import termios

import serial

from ...modbus_rtu import ModbusError

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


class SerialLinkError(ModbusError):
    """The serial device is missing or failed: no transaction is possible now."""

    kind = "link"


class SerialStream:
    """The byte stream ``RtuMaster`` (and the RFID reader) expects, over a pyserial port."""

    def __init__(self, port, baudrate=9600, parity="N", stopbits=1, must_exist=False, role="meter port"):
        self.port = port
        self.role = role  # what the device is, for messages: "meter port", "reader port"
        self._settings = {"baudrate": baudrate, "parity": _PARITY[parity], "stopbits": stopbits}
        self._serial = None
        self._fd = None
        self.last_error = None
        self.opened = 0  # times the device was opened
        try:
            self._open()
        except SerialLinkError as error:
            if must_exist:
                raise OSError(str(error)) from error

    def _open(self):
        try:
            self._serial = serial.Serial(
                port=self.port, bytesize=8, timeout=0, write_timeout=2, exclusive=True, **self._settings)
        except (serial.SerialException, OSError, termios.error, ValueError) as error:
            self._fail("cannot open %s %s: %s" % (self.role, self.port, error))
        self._fd = self._serial.fileno()
        self.opened += 1
        self.last_error = None

    def _fail(self, text):
        """Close the device (it will be opened again) and raise SerialLinkError(text)."""
        self.close()
        self.last_error = text
        raise SerialLinkError(text)

    def _ready(self):
        if self._serial is None:
            self._open()

    def write(self, data):
        self._ready()
        try:
            self._serial.write(data)
        except (serial.SerialException, OSError, termios.error) as error:
            self._fail("%s %s: write failed: %s" % (self.role, self.port, error))

    def reset_input(self):
        self._ready()
        try:
            self._serial.reset_input_buffer()
        except (serial.SerialException, OSError, termios.error) as error:
            self._fail("%s %s: %s" % (self.role, self.port, error))

    async def read(self, max_bytes, timeout_ms):
        """Up to ``max_bytes`` bytes; waits at most ``timeout_ms`` for the first (b"" if none).

        Reads the non-blocking descriptor directly and waits on the event loop's reader
        callback with a plain timer: a poll cycle wakes this path a dozen times, so it
        avoids per-call tasks (``wait_for``) and pyserial's extra select().
        """
        self._ready()
        data = self._read_now(max_bytes)
        if data or timeout_ms <= 0:
            return data
        loop = asyncio.get_running_loop()
        readable = loop.create_future()

        def wake():
            if not readable.done():
                readable.set_result(None)

        fd = self._fd
        loop.add_reader(fd, wake)
        timer = loop.call_later(timeout_ms / 1000, wake)
        try:
            await readable
        finally:
            timer.cancel()
            loop.remove_reader(fd)
        if self._serial is None:
            return b""
        return self._read_now(max_bytes)

    def _read_now(self, max_bytes):
        try:
            return os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as error:
            self._fail("%s %s: read failed: %s" % (self.role, self.port, error))

    def close(self):
        handle = self._serial
        self._serial = None
        self._fd = None
        if handle is not None:
            try:
                handle.close()
            except (serial.SerialException, OSError, termios.error):
                pass
