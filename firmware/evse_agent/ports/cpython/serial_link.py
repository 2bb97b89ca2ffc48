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
