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


# Reading a frame: sleep through the bytes still on the wire, look a little before the answer's
# end is due, and take its last bytes as they land. A timer can only be late (by up to the
# event loop's resolution, a millisecond); a byte's arrival wakes the reader at once. So the
# master looks one character plus that slack before the end (``look_ahead_us``) and never
# leaves a frame's end to a timer. Sleeps shorter than a millisecond are not worth a wake-up.
TIMER_SLACK_US = 1000
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
        # so the master looks ``look_ahead_us`` before an answer's end is due (``_learn_turnaround``).
        self.turnaround_us = 0
        self.look_ahead_us = char_us + TIMER_SLACK_US
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
        clock = self.clock
        wait = self.silence_ms - (clock.monotonic_ms() - self._last_activity_ms)
        if wait > 0:
            await asyncio.sleep(wait / 1000)
        stream.reset_input()
        self.stats.requests += 1
        stream.write(request)
        sent_ms = clock.monotonic_ms()
        char_us = self.char_us
        # The request itself takes time on the wire before the meter can start answering.
        wire_ms = (len(request) * char_us + 999) // 1000
        deadline = sent_ms + wire_ms + self.timeout_ms
        answer = 5 + 2 * count  # the normal answer's length (an exception answer is 5 bytes)
        try:
            # No whole answer can be here before the request and the answer crossed the wire
            # (and the meter's turnaround): sleep through that, then look at what has arrived.
            await self._sleep_us((len(request) + answer) * char_us + self.turnaround_us - self.look_ahead_us)
            looked_ms = clock.monotonic_ms()
            frame = bytearray(await stream.read(3, 0))
            expected = await self._expected(frame, unit, function, count)
            if len(frame) == 3 and expected > 3:
                frame.extend(await stream.read(expected - 3, 0))
            ahead_us = (answer - len(frame)) * char_us  # how long before the answer's end it looked
            while len(frame) < expected:
                if frame:
                    # Sleep through the bytes still on the wire but the last look-ahead's worth,
                    # then take them as they land (or within the gap limit).
                    missing = (expected if expected > 3 else answer) - len(frame)
                    await self._sleep_us(missing * char_us - self.look_ahead_us)
                    chunk = await stream.read(expected - len(frame), self.gap_ms)
                else:
                    remaining = deadline - clock.monotonic_ms()
                    # Past the deadline, what has arrived still counts (a long answer's
                    # wire time can outlast the response timeout).
                    chunk = await stream.read(expected, remaining if remaining > 0 else 0)
                    if chunk:  # the answer began after the look: it was that much earlier still
                        ahead_us += (clock.monotonic_ms() - looked_ms) * 1000
                if not chunk:
                    if not frame:
                        raise ModbusTimeout("no response within %d ms" % self.timeout_ms)
                    raise ModbusTimeout("response stopped after %d of %d bytes" % (len(frame), expected))
                frame.extend(chunk)
                expected = await self._expected(frame, unit, function, count)
            if expected == answer:
                self._learn_turnaround(ahead_us)
            return check_read_response(frame, unit, function, count)
        finally:
            self._last_activity_ms = clock.monotonic_ms()

    async def _expected(self, frame, unit, function, count):
        """Bytes the frame needs: 3 until its header is in, then its whole length. A header
        that cannot start the answer to this request is drained and raised as a frame error."""
        if len(frame) < 3:
            return 3
        expected = self._length_from_header(frame, unit, function, count)
        if not expected:
            await self._drain()
            raise ModbusFrameError("response header %s does not answer unit %d function %d for %d registers"
                                   % (_hex(frame[:3]), unit, function, count))
        return expected

    def _learn_turnaround(self, ahead_us):
        """Move the learned turnaround halfway to where the next look lands ``look_ahead_us``
        before the answer's end. ``ahead_us`` is how long before its end this answer was
        looked at, 0 when it was already whole (late by an unknown amount: taken as on time,
        which still moves the look a half look-ahead earlier). Bounded by half the response
        timeout; one late answer (a busy machine) moves it only halfway."""
        limit = self.timeout_ms * 500
        turnaround = self.turnaround_us + (ahead_us - self.look_ahead_us) // 2
        self.turnaround_us = 0 if turnaround < 0 else limit if turnaround > limit else turnaround

    async def _sleep_us(self, wait_us):
        """Sleep ``wait_us`` microseconds, unless that is too short to be worth a wake-up."""
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
