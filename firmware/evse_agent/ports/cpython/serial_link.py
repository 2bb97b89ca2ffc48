"""RS-485 serial line for the Modbus master, on pyserial, read through the asyncio loop.

The port is opened non-blocking and its file descriptor watched by the event loop, so
waiting for a meter's answer never blocks the other tasks (console, MQTT).
"""

import asyncio
import os

import serial

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


class SerialStream:
    """The byte stream ``RtuMaster`` expects, over a pyserial port."""

    def __init__(self, port, baudrate=9600, parity="N", stopbits=1):
        try:
            self._serial = serial.Serial(
                port=port, baudrate=baudrate, parity=_PARITY[parity], stopbits=stopbits,
                bytesize=8, timeout=0, write_timeout=2, exclusive=True)
        except serial.SerialException as error:
            raise OSError("cannot open meter port %s: %s" % (port, error)) from error
        self.port = port
        self._fd = self._serial.fileno()

    def write(self, data):
        self._serial.write(data)

    def reset_input(self):
        self._serial.reset_input_buffer()

    async def read(self, max_bytes, timeout_ms):
        """Up to ``max_bytes`` bytes; waits at most ``timeout_ms`` for the first (b"" if none).

        Reads the non-blocking descriptor directly and waits on the event loop's reader
        callback with a plain timer: a poll cycle wakes this path a dozen times, so it
        avoids per-call tasks (``wait_for``) and pyserial's extra select().
        """
        data = self._read_now(max_bytes)
        if data or timeout_ms <= 0:
            return data
        loop = asyncio.get_running_loop()
        readable = loop.create_future()

        def wake():
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(self._fd, wake)
        timer = loop.call_later(timeout_ms / 1000, wake)
        try:
            await readable
        finally:
            timer.cancel()
            loop.remove_reader(self._fd)
        return self._read_now(max_bytes)

    def _read_now(self, max_bytes):
        try:
            return os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as error:
            raise OSError("meter port %s: read failed: %s" % (self.port, error)) from error

    def close(self):
        self._serial.close()


class ReopeningStream:
    """A SerialStream that may be missing: opened on first use and again after it failed.

    For a device that can be unplugged while the agent runs (a USB RFID reader): every
    call raises OSError while the device is not there, and ``reset_input`` (which a
    reader calls before it starts over) tries to open it again. The caller logs and
    retries; the agent itself never depends on the device being present.
    """

    def __init__(self, port, baudrate=115200, parity="N", stopbits=1):
        self.port = port
        self._options = (baudrate, parity, stopbits)
        self._stream = None

    def _open(self):
        if self._stream is None:
            try:
                self._stream = SerialStream(self.port, *self._options)
            except OSError as error:
                raise OSError("cannot open %s: %s" % (self.port, error.__cause__ or error)) from None
        return self._stream

    def _failed(self):
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:
                pass
            self._stream = None

    def reset_input(self):
        try:
            self._open().reset_input()
        except Exception as error:  # pyserial raises termios.error for a vanished tty
            self._failed()
            raise OSError("%s: %s" % (self.port, error)) from error

    def write(self, data):
        try:
            self._open().write(data)
        except Exception as error:
            self._failed()
            raise OSError("%s: write failed: %s" % (self.port, error)) from error

    async def read(self, max_bytes, timeout_ms):
        try:
            return await self._open().read(max_bytes, timeout_ms)
        except OSError:
            self._failed()
            raise

    def close(self):
        self._failed()
