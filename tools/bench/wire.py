"""What the bench knows about the Modbus RTU line, written apart from the agent's own code.

The baselines of ``make bench`` must not be computed by the code they judge, so nothing
here imports ``evse_agent.registers``' planner or ``evse_agent.modbus_rtu``:

- ``minimal_reads``: the fewest line bytes that fetch every value a meter map lists, from
  the map's register list and limits alone (largest read; a read may cross only addresses
  of its registers or of the ranges the meter answers) and the RTU
  frame layout (request 8 bytes; response: unit, function, byte count, 2 bytes a register,
  CRC), found by exhaustive dynamic programming over the address-ordered registers;
- ``contiguous_runs``: one read per maximal run of adjacent registers (what a reader
  without a planner writes by hand);
- ``wire_floor_ms``: the line's floor for a set of reads: every character's wire time both
  ways plus the 3.5-character silence before each request, plus a measured turnaround;
- ``raw_turnaround_ms``: the simulated meter's turnaround measured by a bare client (frames
  built here, CRC included, ``os.read``/``os.write`` on the pty);
- ``CountingRelay``: a relay between a client's pty and the simulated meter's device that
  counts request and response frames and bytes by parsing the RTU layout, and notes when
  each response's last byte was handed to the client.
"""

import os
import select
import struct
import threading
import time
import tty

REQUEST_FRAME_BYTES = 8  # unit, function, address (2), count (2), CRC (2)
RESPONSE_OVERHEAD_BYTES = 5  # unit, function, byte count, CRC (2)
BITS_PER_CHARACTER = 11  # RTU: start, 8 data, parity (or a second stop), stop


def crc16(data):
    """CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF) of ``data``."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def read_request(unit, function, address, count):
    """A read request frame, CRC low byte first."""
    body = struct.pack(">BBHH", unit, function, address, count)
    return body + struct.pack("<H", crc16(body))


def read_bytes(count):
    """Line bytes of one read of ``count`` registers: the request and its response."""
    return REQUEST_FRAME_BYTES + RESPONSE_OVERHEAD_BYTES + 2 * count


def measured(model):
    """The map's registers the poll reads (the serial number is read once, not per poll)."""
    return sorted((reg for reg in model.registers if reg.name != "serial"),
                  key=lambda reg: (reg.function, reg.address))


def _answers(model, function, low, high):
    """True when the meter answers every address from ``low`` to ``high``: each lies in a
    register of the map or in a range the map says the meter answers."""
    spans = [(reg.address, reg.address + reg.count - 1) for reg in model.registers if reg.function == function]
    spans += [(lo, hi) for fn, lo, hi in model.answered if fn == function]
    return all(any(lo <= address <= hi for lo, hi in spans) for address in range(low, high + 1))


def minimal_reads(model):
    """The cheapest set of reads (fewest bytes, then fewest requests) that covers every
    measured register of ``model``: list of (function, address, count)."""
    registers = measured(model)
    best = [(0, 0, [])] + [None] * len(registers)  # best[i]: cover registers[:i]
    for end in range(1, len(registers) + 1):
        last = registers[end - 1]
        for first in range(end - 1, -1, -1):
            head = registers[first]
            if head.function != last.function:
                break
            span = last.address + last.count - head.address
            if span > model.max_registers:
                break
            if not _answers(model, head.function, head.address, head.address + span - 1):
                continue
            cost, requests, reads = best[first]
            candidate = (cost + read_bytes(span), requests + 1, reads + [(head.function, head.address, span)])
            if best[end] is None or candidate[:2] < best[end][:2]:
                best[end] = candidate
    return best[-1][2]


def contiguous_runs(model):
    """One read per maximal run of adjacent measured registers, split at the read limit:
    list of (function, address, count, registers)."""
    runs = []
    for reg in measured(model):
        if runs:
            function, address, count, members = runs[-1]
            if function == reg.function and reg.address == address + count \
                    and count + reg.count <= model.max_registers:
                runs[-1] = (function, address, count + reg.count, members + [reg])
                continue
        runs.append((reg.function, reg.address, reg.count, [reg]))
    return runs


def reads_bytes(reads):
    return sum(read_bytes(read[2]) for read in reads)


def character_ms(baudrate):
    return BITS_PER_CHARACTER * 1000.0 / baudrate


def silence_ms(baudrate):
    """The 3.5-character silence before a frame (1.75 ms fixed above 19200 baud)."""
    return 3.5 * character_ms(baudrate) if baudrate <= 19200 else 1.75


def wire_ms(reads, baudrate):
    """Wire time of every character of ``reads``, both directions."""
    return reads_bytes(reads) * character_ms(baudrate)


def wire_floor_ms(reads, baudrate, turnaround_ms):
    """Wire time, a silence before each request but the first, and a turnaround per read."""
    return wire_ms(reads, baudrate) + (len(reads) - 1) * silence_ms(baudrate) + len(reads) * turnaround_ms


def _open_raw(path):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    return fd


def _read_until(fd, size, deadline):
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                data += os.read(fd, size - len(data))
            except BlockingIOError:
                pass
    return data


def raw_turnaround_ms(device, baudrate, samples=15, unit=1, function=4, address=0, count=2):
    """Median time from a request's last character on the wire to the response's first,
    measured with frames built here (wire times at ``baudrate`` subtracted)."""
    fd = _open_raw(device)
    request = read_request(unit, function, address, count)
    answer_bytes = RESPONSE_OVERHEAD_BYTES + 2 * count
    try:
        values = []
        for _ in range(samples):
            sent = time.perf_counter()
            os.write(fd, request)
            first = _read_until(fd, 1, time.monotonic() + 2)
            arrived = time.perf_counter()
            rest = _read_until(fd, answer_bytes - 1, time.monotonic() + 2)
            if len(first + rest) != answer_bytes:
                raise RuntimeError("the simulated meter answered %r at %d baud" % (first + rest, baudrate))
            values.append((arrived - sent) * 1000 - (len(request) + 1) * character_ms(baudrate))
            time.sleep(0.01)
        values.sort()
        return values[len(values) // 2]
    finally:
        os.close(fd)


class _FrameCounter:
    """Splits one direction's byte stream into RTU frames by their layout."""

    def __init__(self, responses):
        self.responses = responses
        self.buffer = b""
        self.frames = 0
        self.bytes = 0
        self.ends = []  # perf_counter when each frame's last byte passed
        self.addresses = {}  # requests: (function, first address) -> frames

    def feed(self, data, when):
        self.bytes += len(data)
        self.buffer += data
        while len(self.buffer) >= 3:
            function = self.buffer[1]
            if not self.responses:
                size = REQUEST_FRAME_BYTES
            elif function & 0x80:
                size = 5
            else:
                size = RESPONSE_OVERHEAD_BYTES + self.buffer[2]
            if len(self.buffer) < size:
                return
            if not self.responses:
                key = (function, struct.unpack(">H", self.buffer[2:4])[0])
                self.addresses[key] = self.addresses.get(key, 0) + 1
            self.buffer = self.buffer[size:]
            self.frames += 1
            self.ends.append(when)


class CountingRelay:
    """A pty for the client, relayed to ``device`` (the simulated meter), counting frames.

    ``client_device`` is the path the program under test opens. ``requests``/``responses``
    count frames and bytes each way; ``responses.ends`` holds the ``time.perf_counter()``
    at which each response's last byte was handed to the client.
    """

    def __init__(self, device):
        self._meter = _open_raw(device)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.client_device = os.ttyname(self._slave)
        self.requests = _FrameCounter(False)
        self.responses = _FrameCounter(True)
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="counting-relay", daemon=True)
        self._thread.start()

    def counts(self):
        """(request frames, response frames, bytes both ways) so far."""
        with self._lock:
            return self.requests.frames, self.responses.frames, self.requests.bytes + self.responses.bytes

    def reads_of(self, function, address):
        """Request frames so far that read from ``address`` on: once per poll for a map's
        first register, whatever the program's plan."""
        with self._lock:
            return self.requests.addresses.get((function, address), 0)

    def response_ends(self):
        with self._lock:
            return list(self.responses.ends)

    def _pump(self, source, target, counter):
        try:
            data = os.read(source, 4096)
        except (BlockingIOError, OSError):
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(target, view):]
            except BlockingIOError:
                select.select([], [target], [], 0.1)
            except OSError:
                return  # the other side is gone: the bytes are lost, as on a dead bus
        with self._lock:
            counter.feed(data, time.perf_counter())

    def _run(self):
        while not self._stop:
            ready, _, _ = select.select([self._master, self._meter], [], [], 0.2)
            if self._master in ready:
                self._pump(self._master, self._meter, self.requests)
            if self._meter in ready:
                self._pump(self._meter, self._master, self.responses)

    def close(self):
        self._stop = True
        self._thread.join(5)
        for fd in (self._meter, self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
