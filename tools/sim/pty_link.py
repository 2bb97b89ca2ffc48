"""A serial cable made of two pseudo-terminals, for running real serial code on the host.

``PtyLink`` opens two pty pairs and relays bytes between their master sides inside an
asyncio loop: whatever is written to ``device_a`` comes out of ``device_b`` and back.
Both device paths are ordinary ``/dev/pts/N`` files that pyserial opens like a USB
RS-485 adapter. With ``baudrate`` set, the relay paces bytes at the line's wire time
(11 bits per character), so timing behaves like a real RS-485 line.
"""

import asyncio
import os
import termios
import tty


def _open_raw_pty():
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class PtyLink:
    """Two pseudo-terminals joined back to back; start() inside a running event loop."""

    def __init__(self, baudrate=None):
        self.baudrate = baudrate
        self._a_master, self._a_slave, self.device_a = _open_raw_pty()
        self._b_master, self._b_slave, self.device_b = _open_raw_pty()
        self._loop = None
        self._queues = {}
        self._tasks = []
        self.bytes_relayed = 0

    def start(self):
        """Begin relaying in the running loop."""
        self._loop = asyncio.get_running_loop()
        for src, dst in ((self._a_master, self._b_master), (self._b_master, self._a_master)):
            queue = asyncio.Queue()
            self._queues[src] = queue
            self._loop.add_reader(src, self._on_readable, src, queue)
            self._tasks.append(asyncio.ensure_future(self._writer(dst, queue)))

    def _on_readable(self, fd, queue):
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            # The other side closed its end; the slave fd we hold keeps the pty alive.
            return
        if data:
            queue.put_nowait(data)

    async def _writer(self, fd, queue):
        char_s = 11.0 / self.baudrate if self.baudrate else 0.0
        loop = asyncio.get_running_loop()
        line_free_at = 0.0  # when the last character queued so far leaves the wire
        while True:
            data = await queue.get()
            if not char_s:
                self._write_all(fd, data)
                continue
            # Character i arrives when its last bit has: start + (i + 1) character times.
            # Waking up late (timer granularity) hands over every character that is due
            # by then in one write, so the average rate stays exactly the baud rate.
            start = max(line_free_at, loop.time())
            line_free_at = start + len(data) * char_s
            sent = 0
            while sent < len(data):
                due = min(len(data), int((loop.time() - start) / char_s))
                if due > sent:
                    self._write_all(fd, data[sent:due])
                    sent = due
                else:
                    await asyncio.sleep(start + (sent + 1) * char_s - loop.time())

    def _write_all(self, fd, data):
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except OSError:
                # Full buffer (nobody reading that end) or closed: like a bus with no
                # listener, the bytes are lost rather than stalling the relay.
                return
            view = view[written:]
            self.bytes_relayed += written

    def close(self):
        for fd in (self._a_master, self._b_master):
            if self._loop is not None:
                self._loop.remove_reader(fd)
        for task in self._tasks:
            task.cancel()
        for fd in (self._a_master, self._a_slave, self._b_master, self._b_slave):
            try:
                os.close(fd)
            except OSError:
                pass
