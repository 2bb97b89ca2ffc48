"""Modbus RTU master: CRC-16/MODBUS, request framing, response validation, transactions.

Framing is pure and works on bytes (``crc16``, ``build_read_request``,
``check_read_response``). ``RtuMaster`` runs transactions over any
byte stream the port hands it, with inter-frame silence, a response timeout, an
inter-character gap limit, and a bounded number of retries.

The stream is the port's byte stream (``write``, ``await read``, ``reset_input``; the
contract is in ``ports/__init__.py``).
"""

import asyncio

from .registers import FN_READ_HOLDING, FN_READ_INPUT

MAX_READ_REGISTERS = 125  # Modbus application protocol limit for functions 3 and 4

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


def _make_crc_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16(data, crc=0xFFFF):
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF) of ``data``; sent low byte first."""
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


class ModbusError(Exception):
    """Any failed Modbus transaction. ``kind`` names the failure for counters and reports."""

    kind = "error"


class ModbusTimeout(ModbusError):
    """The meter did not answer (or stopped mid-frame) within the time allowed."""

    kind = "timeout"


class ModbusCrcError(ModbusError):
    """A response arrived whose CRC does not match its bytes."""

    kind = "crc"


class ModbusFrameError(ModbusError):
    """A response arrived that is not the answer to the request (address, function, length)."""

    kind = "frame"


class ModbusExceptionResponse(ModbusError):
    """The meter answered with a Modbus exception code."""

    kind = "exception"

    def __init__(self, function, code):
        self.function = function
        self.code = code
        # super(): MicroPython's exception types have no unbound ``__init__`` to call.
        super().__init__("exception %d (%s) for function %d"
                         % (code, EXCEPTION_NAMES.get(code, "unknown"), function))


def build_read_request(unit, function, address, count):
    """The RTU frame reading ``count`` registers from ``address`` with function 3 or 4."""
    if not 1 <= unit <= 247:
        raise ValueError("unit id %r is outside 1..247" % (unit,))
    if function not in (FN_READ_HOLDING, FN_READ_INPUT):
        raise ValueError("function %r is not a register read (3 or 4)" % (function,))
    if not 0 <= address <= 0xFFFF:
        raise ValueError("register address %r is outside 0..65535" % (address,))
    if not 1 <= count <= MAX_READ_REGISTERS or address + count > 0x10000:
        raise ValueError("register count %r is outside 1..125 or past 0xFFFF" % (count,))
    frame = bytearray(8)
    frame[0] = unit
    frame[1] = function
    frame[2] = address >> 8
    frame[3] = address & 0xFF
    frame[4] = count >> 8
    frame[5] = count & 0xFF
    crc = crc16(memoryview(frame)[:6])
    frame[6] = crc & 0xFF
    frame[7] = crc >> 8
    return bytes(frame)


def check_read_response(frame, unit, function, count):
    """The register bytes of a read response, after checking every field of the frame.

    Raises ``ModbusExceptionResponse`` for an exception frame, ``ModbusCrcError`` for a
    bad CRC, ``ModbusFrameError`` for a frame that does not answer this request.
    """
    if len(frame) < 5:
        raise ModbusFrameError("response of %d bytes is shorter than 5" % len(frame))
    received = frame[-2] | (frame[-1] << 8)
    computed = crc16(memoryview(frame)[:-2])
    if received != computed:
        raise ModbusCrcError("response CRC 0x%04X, computed 0x%04X" % (received, computed))
    if frame[0] != unit:
        raise ModbusFrameError("response from unit %d, expected %d" % (frame[0], unit))
    if frame[1] == function | 0x80:
        if len(frame) != 5:
            raise ModbusFrameError("exception response of %d bytes, expected 5" % len(frame))
        raise ModbusExceptionResponse(function, frame[2])
    if frame[1] != function:
        raise ModbusFrameError("response function %d, expected %d" % (frame[1], function))
    if frame[2] != 2 * count:
        raise ModbusFrameError("response byte count %d, expected %d" % (frame[2], 2 * count))
    if len(frame) != 5 + 2 * count:
        raise ModbusFrameError("response of %d bytes, expected %d" % (len(frame), 5 + 2 * count))
    return bytes(memoryview(frame)[3:-2])


class MasterStats:
    """Counters of one master's transactions, for status reports."""

    __slots__ = ("requests", "ok", "timeouts", "crc_errors", "frame_errors", "exceptions", "retries")

    def __init__(self):
        self.requests = 0
        self.ok = 0
        self.timeouts = 0
        self.crc_errors = 0
        self.frame_errors = 0
        self.exceptions = 0
        self.retries = 0

    def count_error(self, error):
        kind = error.kind
        if kind == "timeout":
            self.timeouts += 1
        elif kind == "crc":
            self.crc_errors += 1
        elif kind == "exception":
            self.exceptions += 1
        else:
            self.frame_errors += 1

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


def char_time_us(baudrate):
    """Time of one character on the wire: 11 bits (start, 8 data, parity or 2nd stop, stop)."""
    return 11000000 // baudrate


# Reading a frame: sleep through the bytes still on the wire and wake when all but the last
# one are in, to read them in one go and then wake again as the last lands (a timer can only
# be late, by up to a millisecond of the event loop's resolution; the last byte's arrival is
# not); shorter sleeps are not worth a wake-up.
MIN_SLEEP_US = 1000


class RtuMaster:
    """Runs Modbus RTU read transactions on one serial line.

    ``clock`` supplies ``monotonic_ms()``. Timing follows the Modbus serial line spec:
    3.5 character times of silence before each request (1.75 ms above 19200 baud), a
    response timeout for the first byte, and a gap limit between bytes of one frame
    (kept generous, as USB-RS485 adapters deliver bytes in bursts).
    """

    def __init__(self, stream, clock, baudrate, timeout_ms=500, retries=2, gap_ms=20):
        if retries < 0 or retries > 10:
            raise ValueError("retries %r is outside 0..10" % (retries,))
        self.stream = stream
        self.clock = clock
        char_us = char_time_us(baudrate)
        self.silence_ms = 2 if baudrate > 19200 else (35 * char_us + 9999) // 10000
        self.char_us = char_us
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.gap_ms = gap_ms
        self.stats = MasterStats()
        # Learned: how much later than their wire time the meter's answers end (its turnaround),
        # so the master wakes as an answer's last byte is due; nudged down while answers are
        # complete on waking.
        self.turnaround_us = 0
        self._last_activity_ms = clock.monotonic_ms() - self.silence_ms
        self._lock = asyncio.Lock()

    def set_timeout_ms(self, timeout_ms):
        """Wait this long for a response from the next request on."""
        self.timeout_ms = timeout_ms

    def set_retries(self, retries):
        """Retry a failed request this many times (0..10) from the next request on."""
        if retries < 0 or retries > 10:
            raise ValueError("retries %r is outside 0..10" % (retries,))
        self.retries = retries

    async def read_registers(self, unit, function, address, count):
        """Register bytes (2 per register) read with retries; raises the last ModbusError."""
        request = build_read_request(unit, function, address, count)
        async with self._lock:
            attempt = 0
            while True:
                try:
                    data = await self._transact(request, unit, function, count)
                    self.stats.ok += 1
                    return data
                except ModbusExceptionResponse as error:
                    self.stats.count_error(error)
                    if error.code not in (5, 6) or attempt >= self.retries:
                        raise
                except ModbusError as error:
                    self.stats.count_error(error)
                    if attempt >= self.retries:
                        raise
                attempt += 1
                self.stats.retries += 1

    async def _transact(self, request, unit, function, count):
        stream = self.stream
        wait = self.silence_ms - (self.clock.monotonic_ms() - self._last_activity_ms)
        if wait > 0:
            await asyncio.sleep(wait / 1000)
        stream.reset_input()
        self.stats.requests += 1
        stream.write(request)
        sent_ms = self.clock.monotonic_ms()
        # The request itself takes time on the wire before the meter can start answering.
        wire_ms = (len(request) * self.char_us + 999) // 1000
        frame = bytearray()
        expected = 3  # until the header tells the frame's length
        deadline = sent_ms + wire_ms + self.timeout_ms
        try:
            # No whole answer can be here before the request and the answer crossed the
            # wire: sleep through that (an exception answer, shorter, waits a little longer).
            await self._await_wire(len(request) + 5 + 2 * count, self.turnaround_us)
            late = False
            while len(frame) < expected:
                if frame:
                    chunk = await stream.read(expected - len(frame), 0)  # what has arrived
                    if not chunk:
                        missing = expected - len(frame)
                        if not late:
                            late = True
                            if missing > 1:
                                self._learn_turnaround(True)
                        # Sleep through all but the last byte, then wake as it lands.
                        await self._await_wire(missing - 1)
                        chunk = await stream.read(missing, self.gap_ms)
                else:
                    remaining = deadline - self.clock.monotonic_ms()
                    # Past the deadline, what has arrived still counts (a long answer's
                    # wire time can outlast the response timeout).
                    chunk = await stream.read(expected - len(frame), remaining if remaining > 0 else 0)
                if not chunk:
                    if not frame:
                        raise ModbusTimeout("no response within %d ms" % self.timeout_ms)
                    raise ModbusTimeout("response stopped after %d of %d bytes" % (len(frame), expected))
                frame.extend(chunk)
                if expected == 3 and len(frame) >= 3:
                    expected = self._length_from_header(frame, unit, function, count)
                    if not expected:
                        await self._drain()
                        raise ModbusFrameError("response header %s does not answer unit %d function %d"
                                               " for %d registers" % (_hex(frame[:3]), unit, function, count))
            if not late:
                self._learn_turnaround(False)
            return check_read_response(frame, unit, function, count)
        finally:
            self._last_activity_ms = self.clock.monotonic_ms()

    def _learn_turnaround(self, short):
        """An answer lacked more than its last byte on waking (``short``) or was complete:
        move the learned turnaround up by one character, or down by an eighth of one to keep
        probing (one late answer, e.g. the machine was busy, cannot make every later wake-up
        late). An answer lacking only its last byte is on target: it leaves it alone."""
        if short:
            limit = self.timeout_ms * 500  # never more than half the response timeout
            self.turnaround_us = min(self.turnaround_us + self.char_us, limit)
        elif self.turnaround_us:
            self.turnaround_us = max(self.turnaround_us - self.char_us // 8, 0)

    async def _await_wire(self, pending, extra_us=0):
        """Sleep while ``pending`` more bytes of a frame travel the wire (and ``extra_us``), so
        the rest is read in one go rather than with a wake-up per byte (or per early wake-up)."""
        wait_us = pending * self.char_us + extra_us
        if wait_us >= MIN_SLEEP_US:
            await asyncio.sleep(wait_us / 1000000)

    @staticmethod
    def _length_from_header(header, unit, function, count):
        """Expected frame length, or 0 when the header cannot start the answer to this request."""
        if header[0] != unit:
            return 0
        if header[1] == function | 0x80:
            return 5
        if header[1] != function or header[2] != 2 * count:
            return 0
        return 5 + 2 * count

    async def _drain(self):
        """Discard bytes until the line has been silent for one gap (bounded by the timeout)."""
        start = self.clock.monotonic_ms()
        while self.clock.monotonic_ms() - start < self.timeout_ms:
            if not await self.stream.read(256, self.gap_ms):
                return


def _hex(data):
    return " ".join("%02X" % b for b in data)
