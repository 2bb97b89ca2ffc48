"""The technician console on the MicroPython REPL UART (``sys.stdin`` / ``sys.stdout``).

With ``console.port`` "repl" in the board file, the console core (``evse_agent.console``)
reads the REPL UART and writes with CRLF line ends, at the UART's own speed (115200 8N1 on
ESP32 boards). Keyboard interrupt is switched off while the console runs: a 0x03 byte in
line noise must not stop the agent (the console's Ctrl-C drops the line instead).

Taking the board back (mpremote): mpremote enters the raw REPL by sending CR Ctrl-C, then
at once CR Ctrl-A. The console recognises CR Ctrl-C followed by more input within
``ESCAPE_WINDOW_MS``: it leaves that input unread, stops the agent and switches keyboard
interrupt back on, so ``main()`` returns and the REPL reads mpremote's CR Ctrl-A itself —
``mpremote`` gets its raw REPL at the first try, while the agent runs. A technician's Ctrl-C
(not right after Enter, or with nothing typed at once after it) only drops the line. The
input is read one byte at a time and never past a Ctrl-C, so the REPL's bytes stay unread.
"""

import sys

import asyncio
import select

from ... import log

ESCAPE_WINDOW_MS = 200  # mpremote sends CR Ctrl-A right after CR Ctrl-C


class ReplStream:
    """The byte stream the console core expects, over the REPL UART.

    ``on_escape()`` is called once when mpremote's raw-REPL entry arrives (the agent stops)."""

    def __init__(self, on_escape=None):
        self._stdin = getattr(sys.stdin, "buffer", sys.stdin)
        self._reader = asyncio.StreamReader(self._stdin)
        self._poll = select.poll()
        self._poll.register(self._stdin, select.POLLIN)
        self._out = getattr(sys.stdout, "buffer", None)
        self._last = -1  # the last byte read
        self.on_escape = on_escape
        self.escaped = False
        _keyboard_interrupt(False)

    async def read(self, max_bytes, timeout_ms):
        """Bytes typed within ``timeout_ms`` (b"" when none); never reads past a Ctrl-C."""
        if self.escaped:
            await asyncio.sleep(timeout_ms / 1000)
            return b""
        try:
            first = await asyncio.wait_for(self._reader.read(1), timeout_ms / 1000)
        except asyncio.TimeoutError:
            return b""
        data = bytearray(first.encode() if isinstance(first, str) else first)
        while data and data[-1] != 0x03 and len(data) < max_bytes and self._poll.poll(0):
            more = self._stdin.read(1)
            if not more:
                break
            data.extend(more.encode() if isinstance(more, str) else more)
        if not data:
            return b""
        before = data[-2] if len(data) > 1 else self._last
        self._last = data[-1]
        if data[-1] == 0x03 and before == 0x0D and self._poll.poll(ESCAPE_WINDOW_MS):
            self._hand_back()
            return b""
        return bytes(data)

    def _hand_back(self):
        self.escaped = True
        _keyboard_interrupt(True)
        log.warning("console: raw REPL requested (mpremote): stopping the agent, the REPL is yours")
        if self.on_escape is not None:
            self.on_escape()

    def write(self, data):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._out is not None:
            self._out.write(data)
        else:
            sys.stdout.write(data.decode())

    def close(self):
        _keyboard_interrupt(True)


def _keyboard_interrupt(on):
    try:
        import micropython
        micropython.kbd_intr(3 if on else -1)
    except (ImportError, AttributeError):
        pass


def open_console(config, on_escape):
    """The REPL console stream if the board file asks for it (``console.port`` "repl"), else None;
    ``on_escape()`` is called on the technician's Ctrl-C."""
    if config["console"]["port"] != "repl":
        return None
    return ReplStream(on_escape=on_escape)
