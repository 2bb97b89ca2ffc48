"""The technician console on the MicroPython REPL UART (``sys.stdin`` / ``sys.stdout``).

With ``console.port`` "repl" in the board file, the console core (``evse_agent.console``)
reads the REPL UART through an asyncio stream reader and writes with CRLF line ends, at the
UART's own speed (115200 8N1 on ESP32 boards). Keyboard interrupt is switched off while the
console runs: a 0x03 byte in line noise must not stop the agent (the console's Ctrl-C drops
the line instead). To reach the REPL, use the console's ``restart`` while holding the
board's boot button, or erase ``/main.py`` with mpremote.
"""

import sys

import asyncio


class ReplStream:
    """The byte stream the console core expects, over the REPL UART."""

    def __init__(self):
        stdin = getattr(sys.stdin, "buffer", sys.stdin)
        self._reader = asyncio.StreamReader(stdin)
        self._out = getattr(sys.stdout, "buffer", None)
        try:
            import micropython
            micropython.kbd_intr(-1)
        except (ImportError, AttributeError):
            pass

    async def read(self, max_bytes, timeout_ms):
        """Bytes typed within ``timeout_ms`` (b"" when none)."""
        try:
            data = await asyncio.wait_for(self._reader.read(max_bytes), timeout_ms / 1000)
        except asyncio.TimeoutError:
            return b""
        if isinstance(data, str):
            data = data.encode()
        return data

    def write(self, data):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._out is not None:
            self._out.write(data)
        else:
            sys.stdout.write(data.decode())

    def close(self):
        try:
            import micropython
            micropython.kbd_intr(3)
        except (ImportError, AttributeError):
            pass


def attach_console(agent):
    """Give ``agent`` the REPL console if its board file asks for it (``console.port`` "repl")."""
    if agent.config["console"]["port"] != "repl":
        return None
    from ...console import Console
    import machine

    stream = ReplStream()
    agent.console = Console(agent, stream, board=None, restart=machine.reset)
    return stream
