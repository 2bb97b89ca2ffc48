"""Modbus RTU framing (CRC, requests, response checks) and RtuMaster edge timing.

Framing is checked against published frames and against pymodbus as an independent
implementation. RtuMaster is driven by an in-memory stream and a fake clock only for the
timing and chunking cases a real pty cannot produce deterministically.
"""

import asyncio
import struct

import pytest
from hypothesis import given, settings, strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
)

from evse_agent import modbus_rtu
from evse_agent.modbus_rtu import (
    ModbusCrcError,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusTimeout,
    RtuMaster,
    build_read_request,
    check_read_response,
    crc16,
)

FAST = settings(max_examples=200, deadline=None)
SLOW = settings(max_examples=60, deadline=None)

units = st.integers(min_value=1, max_value=247)
functions = st.sampled_from([3, 4])
counts = st.integers(min_value=1, max_value=125)
register_values = st.lists(st.integers(min_value=0, max_value=0xFFFF), min_size=1, max_size=125)

# Published frames (hex, CRC low byte first as sent on the wire).
PUBLISHED_FRAMES = [
    # Widely quoted "read 10 holding registers of unit 1 from 0" request (Modbus RTU tutorials,
    # e.g. the Modbus Poll / modbus.org FAQ examples).
    "01 03 00 00 00 0A C5 CD",
    # Eastron SDM meter example: read input registers 30001-30002 (voltage L1) of unit 1.
    "01 04 00 00 00 02 71 CB",
    # Simply Modbus, "Function Code 03 Read Holding Registers" (simplymodbus.ca/FC03.htm):
    # request and response of device 17 (0x11), registers 40108-40110.
    "11 03 00 6B 00 03 76 87",
    "11 03 06 AE 41 56 52 43 40 49 AD",
    # Simply Modbus, "Function Code 04 Read Input Registers" (simplymodbus.ca/FC04.htm).
    "11 04 00 08 00 01 B2 98",
    "11 04 02 00 0A F8 F4",
    # Simply Modbus, "Exception Responses" page: device 10, function 01, code 02.
    "0A 81 02 B0 53",
    # MODBUS over Serial Line Specification V1.02, Appendix B (CRC generation example):
    # message 02 07, CRC 0x1241 sent low byte first.
    "02 07 41 12",
]


def _framer():
    return FramerRTU(DecodePDU(is_server=False))


def _pymodbus_response(unit, function, values):
    cls = ReadHoldingRegistersResponse if function == 3 else ReadInputRegistersResponse
    return _framer().buildFrame(cls(registers=list(values), dev_id=unit))


def _with_crc(body):
    crc = crc16(body)
    return bytes(body) + bytes((crc & 0xFF, crc >> 8))


def _words(data):
    return list(struct.unpack(">%dH" % (len(data) // 2), data))


# --- CRC ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_hex", PUBLISHED_FRAMES)
def test_crc_matches_published_frames(frame_hex):
    """crc16 of each published frame's body equals its transmitted CRC (low byte first)."""
    frame = bytes.fromhex(frame_hex)
    crc = crc16(frame[:-2])
    assert bytes((crc & 0xFF, crc >> 8)) == frame[-2:]


def test_crc_catalogue_check_value():
    """CRC-16/MODBUS check value from the CRC catalogue (reveng): "123456789" -> 0x4B37."""
    assert crc16(b"123456789") == 0x4B37


def test_crc_of_empty_input_is_init_value():
    """No bytes leave the initial value 0xFFFF."""
    assert crc16(b"") == 0xFFFF


@pytest.mark.parametrize("unit,function,address,count,frame_hex", [
    (1, 3, 0, 10, "01 03 00 00 00 0A C5 CD"),
    (1, 4, 0, 2, "01 04 00 00 00 02 71 CB"),
    (0x11, 3, 0x006B, 3, "11 03 00 6B 00 03 76 87"),
    (0x11, 4, 0x0008, 1, "11 04 00 08 00 01 B2 98"),
])
def test_build_read_request_matches_published_frames(unit, function, address, count, frame_hex):
    """build_read_request produces the published request frames byte for byte."""
    assert build_read_request(unit, function, address, count) == bytes.fromhex(frame_hex)


@pytest.mark.parametrize("frame_hex,unit,function,values", [
    ("11 03 06 AE 41 56 52 43 40 49 AD", 0x11, 3, [0xAE41, 0x5652, 0x4340]),
    ("11 04 02 00 0A F8 F4", 0x11, 4, [0x000A]),
])
def test_check_read_response_accepts_published_responses(frame_hex, unit, function, values):
    """Published response frames decode to the register values the source lists."""
    data = check_read_response(bytes.fromhex(frame_hex), unit, function, len(values))
    assert _words(data) == values


def test_published_exception_frame_raises_with_its_code():
    """The published exception frame 0A 81 02 raises code 2 (illegal data address)."""
    with pytest.raises(ModbusExceptionResponse) as info:
        check_read_response(bytes.fromhex("0A 81 02 B0 53"), 0x0A, 1, 1)
    assert info.value.code == 2
    assert info.value.function == 1
    assert "illegal data address" in str(info.value)


@FAST
@given(st.binary(max_size=300))
def test_crc_agrees_with_pymodbus(data):
    """crc16 equals pymodbus's compute_CRC (which returns the CRC byte-swapped, high byte = wire low byte)."""
    crc = crc16(data)
    swapped = ((crc & 0xFF) << 8) | (crc >> 8)
    assert FramerRTU.compute_CRC(data) == swapped
    assert FramerRTU.check_CRC(data, swapped)


@FAST
@given(st.binary(max_size=100), st.binary(max_size=100))
def test_crc_can_be_computed_incrementally(head, tail):
    """Feeding the CRC of a prefix as the start value continues the computation."""
    assert crc16(tail, crc16(head)) == crc16(head + tail)


# --- requests -----------------------------------------------------------------------------


@FAST
@given(units, functions, st.integers(min_value=0, max_value=0xFFFF), counts)
def test_build_read_request_agrees_with_pymodbus(unit, function, address, count):
    """Our request frame equals pymodbus's RTU frame of the same read request."""
    if address + count > 0x10000:
        with pytest.raises(ValueError):
            build_read_request(unit, function, address, count)
        return
    cls = ReadHoldingRegistersRequest if function == 3 else ReadInputRegistersRequest
    expected = _framer().buildFrame(cls(address=address, count=count, dev_id=unit))
    assert build_read_request(unit, function, address, count) == expected


@pytest.mark.parametrize("args,bad", [
    ((0, 3, 0, 1), "0"),
    ((248, 3, 0, 1), "248"),
    ((-1, 3, 0, 1), "-1"),
    ((1, 1, 0, 1), "1"),
    ((1, 6, 0, 1), "6"),
    ((1, 16, 0, 1), "16"),
    ((1, 3, -1, 1), "-1"),
    ((1, 3, 0x10000, 1), "65536"),
    ((1, 4, 0, 0), "0"),
    ((1, 4, 0, 126), "126"),
    ((1, 4, 0xFFFF, 2), "2"),
])
def test_build_read_request_rejects_out_of_range(args, bad):
    """Out-of-range unit, function, address or count raises ValueError naming the value."""
    with pytest.raises(ValueError) as info:
        build_read_request(*args)
    message = str(info.value)
    assert bad in message.split()


def test_build_read_request_rejects_names_the_field():
    """The ValueError says which argument was wrong."""
    with pytest.raises(ValueError, match="unit id 0"):
        build_read_request(0, 3, 0, 1)
    with pytest.raises(ValueError, match="function 5"):
        build_read_request(1, 5, 0, 1)
    with pytest.raises(ValueError, match="address 70000"):
        build_read_request(1, 3, 70000, 1)
    with pytest.raises(ValueError, match="count 200"):
        build_read_request(1, 3, 0, 200)


# --- responses ----------------------------------------------------------------------------


@FAST
@given(units, functions, register_values)
def test_pymodbus_response_decodes_to_its_values(unit, function, values):
    """A response built by pymodbus decodes with check_read_response to exactly its registers."""
    frame = _pymodbus_response(unit, function, values)
    data = check_read_response(frame, unit, function, len(values))
    assert _words(data) == values


@FAST
@given(units, functions, register_values, st.data())
def test_single_byte_corruption_is_rejected(unit, function, values, data):
    """Changing any one byte of a valid response (CRC bytes included) is rejected."""
    frame = bytearray(_pymodbus_response(unit, function, values))
    position = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    frame[position] ^= data.draw(st.integers(min_value=1, max_value=0xFF))
    with pytest.raises((ModbusCrcError, ModbusFrameError)):
        check_read_response(bytes(frame), unit, function, len(values))


@FAST
@given(units, functions, register_values, st.data())
def test_truncated_response_is_rejected(unit, function, values, data):
    """Dropping trailing bytes of a valid response is rejected."""
    frame = _pymodbus_response(unit, function, values)
    keep = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises((ModbusCrcError, ModbusFrameError)):
        check_read_response(frame[:keep], unit, function, len(values))


@FAST
@given(units, functions, st.integers(min_value=0, max_value=0xFF), counts)
def test_exception_frame_raises_with_its_code(unit, function, code, count):
    """An exception frame (function | 0x80, code) built by pymodbus raises ModbusExceptionResponse(code)."""
    frame = _framer().buildFrame(ExceptionResponse(function, code, device_id=unit))
    assert frame[1] == function | 0x80
    with pytest.raises(ModbusExceptionResponse) as info:
        check_read_response(frame, unit, function, count)
    assert info.value.code == code
    assert info.value.function == function
    assert info.value.kind == "exception"


@SLOW
@given(units, units, functions, register_values)
def test_response_from_wrong_unit_is_frame_error(unit, other, function, values):
    """A valid response from another unit is a frame error, not data."""
    if other == unit:
        other = unit % 247 + 1
    frame = _pymodbus_response(other, function, values)
    with pytest.raises(ModbusFrameError, match="unit"):
        check_read_response(frame, unit, function, len(values))


@SLOW
@given(units, functions, register_values)
def test_response_with_wrong_function_is_frame_error(unit, function, values):
    """A valid response for the other read function is a frame error."""
    frame = _pymodbus_response(unit, 7 - function, values)
    with pytest.raises(ModbusFrameError, match="function"):
        check_read_response(frame, unit, function, len(values))


@SLOW
@given(units, functions, register_values, st.integers(min_value=1, max_value=125))
def test_response_with_wrong_byte_count_is_frame_error(unit, function, values, count):
    """A valid response carrying a different number of registers is a frame error."""
    if count == len(values):
        count = len(values) % 125 + 1
    frame = _pymodbus_response(unit, function, values)
    with pytest.raises(ModbusFrameError, match="byte count"):
        check_read_response(frame, unit, function, count)


def test_response_longer_than_its_byte_count_is_frame_error():
    """A CRC-valid frame whose length disagrees with its byte count is a frame error."""
    frame = _with_crc(bytes([1, 3, 2, 0x12, 0x34, 0x56]))
    with pytest.raises(ModbusFrameError, match="response of 8 bytes, expected 7"):
        check_read_response(frame, 1, 3, 1)


def test_exception_frame_of_wrong_length_is_frame_error():
    """A CRC-valid exception frame longer than 5 bytes is a frame error."""
    frame = _with_crc(bytes([1, 0x83, 2, 0]))
    with pytest.raises(ModbusFrameError, match="exception response of 6 bytes"):
        check_read_response(frame, 1, 3, 1)


def test_exception_from_wrong_unit_is_frame_error():
    """An exception frame from another unit is a frame error, not an exception answer."""
    frame = _framer().buildFrame(ExceptionResponse(3, 2, device_id=9))
    with pytest.raises(ModbusFrameError, match="unit 9"):
        check_read_response(frame, 1, 3, 1)


def test_short_frame_is_frame_error():
    """Fewer than 5 bytes can never be a response."""
    with pytest.raises(ModbusFrameError, match="shorter than 5"):
        check_read_response(bytes.fromhex("02 07 41 12"), 2, 7, 1)


# --- RtuMaster on a fake stream -----------------------------------------------------------


class FakeClock:
    """Milliseconds that move only when the fake stream or fake sleep moves them."""

    def __init__(self):
        self.now_ms = 100000

    def monotonic_ms(self):
        return self.now_ms

    def time(self):
        return 1_700_000_000 + self.now_ms / 1000


SILENT = object()
_real_sleep = asyncio.sleep  # captured before any test patches asyncio.sleep


class FakeStream:
    """Replies to each write with the next scripted answer, delivered in the given chunks.

    A script entry is a list of chunks (bytes; an empty chunk: nothing has arrived yet at
    that read), or SILENT for no answer. ``late`` bytes appear after a read with a timeout
    returned nothing (an answer arriving after the master gave up).
    """

    def __init__(self, clock, script, late=None):
        self.clock = clock
        self.script = list(script)
        self.late = dict(late or {})
        self.pending = []
        self.writes = []
        self.reads = []  # (max_bytes, timeout_ms, returned bytes)
        self.resets = 0

    def write(self, data):
        self.writes.append(bytes(data))
        answer = self.script.pop(0) if self.script else SILENT
        if answer is not SILENT:
            self.pending.extend(bytes(chunk) for chunk in answer)

    async def read(self, max_bytes, timeout_ms):
        await _real_sleep(0)
        if self.pending:
            chunk = self.pending.pop(0)
            if len(chunk) > max_bytes:
                self.pending.insert(0, chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            self.reads.append((max_bytes, timeout_ms, chunk))
            return chunk
        self.clock.now_ms += timeout_ms
        self.reads.append((max_bytes, timeout_ms, b""))
        late = self.late.pop(len(self.writes), None) if timeout_ms else None
        if late is not None:
            self.pending.append(late)
        return b""

    def reset_input(self):
        self.resets += 1
        self.pending.clear()


def _response(unit, function, values):
    return _pymodbus_response(unit, function, values)


def _run(master_args, script, call=(1, 4, 0, 2), late=None):
    """Run one read_registers on a fake stream; returns (result or exception, stream, master)."""
    clock = FakeClock()
    stream = FakeStream(clock, script, late)

    async def go():
        master = RtuMaster(stream, clock, **master_args)
        try:
            result = await master.read_registers(*call)
        except modbus_rtu.ModbusError as error:
            result = error
        return result, master

    result, master = asyncio.run(go())
    return result, stream, master


def _stats(master, **expected):
    stats = master.stats.as_dict()
    base = dict(requests=0, ok=0, timeouts=0, crc_errors=0, frame_errors=0, exceptions=0, retries=0)
    base.update(expected)
    assert stats == base


def test_frame_in_one_byte_chunks_is_assembled():
    """A response delivered one byte per read is reassembled and decoded."""
    frame = _response(1, 4, [0x4366, 0x0000])
    result, stream, master = _run(dict(baudrate=9600), [[bytes([b]) for b in frame]])
    assert result == bytes.fromhex("4366 0000")
    assert b"".join(r[2] for r in stream.reads) == frame
    _stats(master, requests=1, ok=1)


def test_first_read_waits_timeout_plus_request_wire_time_then_gap():
    """The first look takes what has arrived (timeout 0); an answer not begun by then may
    take timeout + the request's wire time; later bytes within the gap limit."""
    frame = _response(1, 4, [1, 2])
    result, stream, master = _run(dict(baudrate=9600, timeout_ms=500, gap_ms=20),
                                  [[b""] + [bytes([b]) for b in frame]])
    assert result == bytes.fromhex("0001 0002")
    assert stream.reads[0] == (3, 0, b"")
    # 8 request bytes * 11 bits at 9600 baud = 9.17 ms -> 10 ms on the wire.
    assert stream.reads[1][:2] == (3, 510)
    assert all(timeout == 20 for _, timeout, _ in stream.reads[2:])
    # After the 3-byte header the master asks for exactly the rest of the frame.
    assert stream.reads[4][0] == len(frame) - 3


@SLOW
@given(register_values, st.data())
def test_any_chunking_of_a_frame_decodes_the_same(values, data):
    """However the bytes of a valid frame are split into reads, the same registers come out."""
    frame = _response(7, 3, values)
    cuts = sorted(data.draw(st.sets(st.integers(min_value=1, max_value=len(frame) - 1), max_size=12)))
    chunks = [frame[a:b] for a, b in zip([0] + cuts, cuts + [len(frame)])]
    result, stream, master = _run(dict(baudrate=19200, retries=0), [chunks], call=(7, 3, 100, len(values)))
    assert _words(result) == values
    _stats(master, requests=1, ok=1)


def test_frame_stopping_midway_times_out():
    """A response that stops after some bytes raises ModbusTimeout after one gap."""
    frame = _response(1, 4, [1, 2])
    result, stream, master = _run(dict(baudrate=9600, retries=0, gap_ms=20), [[frame[:5]]])
    assert isinstance(result, ModbusTimeout)
    assert "stopped after 5 of 9 bytes" in str(result)
    assert stream.reads[-1] == (4, 20, b"")
    _stats(master, requests=1, timeouts=1)


def test_no_answer_times_out():
    """Silence raises ModbusTimeout after the response timeout."""
    result, stream, master = _run(dict(baudrate=9600, retries=0, timeout_ms=300), [SILENT])
    assert isinstance(result, ModbusTimeout)
    assert "no response within 300 ms" in str(result)
    _stats(master, requests=1, timeouts=1)


def test_garbage_header_is_frame_error_then_retry_succeeds():
    """A header that cannot answer the request is drained, counted as a frame error, and retried."""
    garbage = bytes.fromhex("07 07 07 55 AA 55 AA 01 02")
    good = _response(1, 4, [0xABCD, 0x0123])
    result, stream, master = _run(dict(baudrate=9600, retries=2), [[garbage[:4], garbage[4:]], [good]])
    assert result == bytes.fromhex("ABCD 0123")
    assert len(stream.writes) == 2
    assert stream.writes[0] == stream.writes[1] == build_read_request(1, 4, 0, 2)
    # The whole garbage burst was read (drained) before the retry.
    assert b"".join(r[2] for r in stream.reads[:-2]).startswith(garbage)
    _stats(master, requests=2, ok=1, frame_errors=1, retries=1)


def test_garbage_header_without_retries_raises_frame_error():
    """With no retries left the frame error reaches the caller."""
    result, stream, master = _run(dict(baudrate=9600, retries=0), [[bytes.fromhex("01 03 04 00 00")]])
    assert isinstance(result, ModbusFrameError)
    assert "01 03 04" in str(result)
    _stats(master, requests=1, frame_errors=1)


@pytest.mark.parametrize("retries", [0, 1, 2, 5, 10])
def test_retries_are_bounded_and_counted(retries):
    """A silent meter is asked exactly 1 + retries times; each attempt is one timeout."""
    result, stream, master = _run(dict(baudrate=9600, retries=retries), [SILENT] * 20)
    assert isinstance(result, ModbusTimeout)
    assert len(stream.writes) == retries + 1
    _stats(master, requests=retries + 1, timeouts=retries + 1, retries=retries)


def test_crc_error_then_success():
    """A corrupted answer is a CRC error; the retry returns the good answer."""
    good = _response(1, 4, [5, 6])
    bad = bytearray(good)
    bad[4] ^= 0x10
    result, stream, master = _run(dict(baudrate=9600, retries=1), [[bytes(bad)], [good]])
    assert result == bytes.fromhex("0005 0006")
    _stats(master, requests=2, ok=1, crc_errors=1, retries=1)


def test_mixed_failures_are_counted_by_kind():
    """Timeout, CRC error and frame error on three attempts are each counted once."""
    good = _response(1, 4, [5, 6])
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    wrong_unit = _response(2, 4, [5, 6])
    result, stream, master = _run(dict(baudrate=9600, retries=2), [SILENT, [bytes(bad)], [wrong_unit]])
    assert isinstance(result, ModbusFrameError)
    _stats(master, requests=3, timeouts=1, crc_errors=1, frame_errors=1, retries=2)


def test_busy_exception_is_retried():
    """Exception 6 (server busy) is retried; the next answer is returned."""
    busy = _framer().buildFrame(ExceptionResponse(4, 6, device_id=1))
    good = _response(1, 4, [7, 8])
    result, stream, master = _run(dict(baudrate=9600, retries=2), [[busy], [good]])
    assert result == bytes.fromhex("0007 0008")
    _stats(master, requests=2, ok=1, exceptions=1, retries=1)


def test_illegal_address_exception_is_not_retried():
    """Exception 2 (illegal data address) is final: raised at once, no retry."""
    error = _framer().buildFrame(ExceptionResponse(4, 2, device_id=1))
    result, stream, master = _run(dict(baudrate=9600, retries=2), [[error]] * 3)
    assert isinstance(result, ModbusExceptionResponse)
    assert result.code == 2
    assert len(stream.writes) == 1
    _stats(master, requests=1, exceptions=1)


def test_late_answer_to_timed_out_attempt_is_discarded():
    """Bytes arriving after a timeout are dropped before the retry; the fresh answer is returned."""
    stale = _response(1, 4, [0xDEAD, 0xBEEF])
    fresh = _response(1, 4, [0x0001, 0x0002])
    result, stream, master = _run(dict(baudrate=9600, retries=1), [SILENT, [fresh]], late={1: stale})
    assert result == bytes.fromhex("0001 0002")
    assert stream.resets == 2
    _stats(master, requests=2, ok=1, timeouts=1, retries=1)


@pytest.mark.parametrize("baudrate,silence_ms", [(9600, 5), (19200, 3), (38400, 2), (115200, 2)])
def test_silence_before_next_request(monkeypatch, baudrate, silence_ms):
    """Right after a response the next request waits the 3.5-character silence (2 ms above 19200)."""
    clock = FakeClock()
    frame = _response(1, 4, [1, 2])
    stream = FakeStream(clock, [[frame], [frame]])
    sleeps = []

    async def fake_sleep(seconds):
        sleeps.append((len(stream.writes), seconds))
        clock.now_ms += int(round(seconds * 1000))
        await _real_sleep(0)

    async def go():
        master = RtuMaster(stream, clock, baudrate)
        monkeypatch.setattr(modbus_rtu.asyncio, "sleep", fake_sleep)
        first = await master.read_registers(1, 4, 0, 2)
        before_second = len(sleeps)
        second = await master.read_registers(1, 4, 0, 2)
        return first, second, before_second

    first, second, before_second = asyncio.run(go())
    assert first == second == bytes.fromhex("0001 0002")
    assert not [s for writes, s in sleeps if writes == 0]  # nothing before the first request
    # The second request waits the silence first (any later sleeps wait for response bytes).
    assert sleeps[before_second] == (1, silence_ms / 1000)
    assert all(writes == 2 for writes, _ in sleeps[before_second + 1:])


def test_retries_outside_range_are_refused():
    """RtuMaster refuses a retry count outside 0..10."""
    clock = FakeClock()
    with pytest.raises(ValueError, match="11"):
        RtuMaster(FakeStream(clock, []), clock, 9600, retries=11)
    with pytest.raises(ValueError, match="-1"):
        RtuMaster(FakeStream(clock, []), clock, 9600, retries=-1)
