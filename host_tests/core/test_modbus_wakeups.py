"""When the Modbus master wakes to read an answer (``RtuMaster``), in virtual time.

A meter answers after its turnaround, which varies from answer to answer, and its bytes
land one character time apart. The event loop's timers fire late by up to a millisecond; a
byte's arrival wakes a reader at once. Whatever the meter's turnaround, its jitter, the baud
rate and the answer's length, once the master has learned the turnaround it must take an
answer's last byte as it lands (not a timer's lateness after it) with a few wake-ups per
answer, not one per byte.
"""

import asyncio
import random
import statistics

import pytest
from hypothesis import given, settings, strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import ReadInputRegistersResponse

from evse_agent import modbus_rtu
from evse_agent.modbus_rtu import RtuMaster, char_time_us

READER_LATENCY_US = 50  # a byte's arrival to the reader's wake-up
TIMER_LATENESS_US = 1000  # a timer fires up to this late (asyncio waits in whole milliseconds)
_yield = asyncio.sleep  # the real one, captured before a test patches the master's


class VirtualTime:
    """Microseconds that move only when the master sleeps or waits for bytes."""

    def __init__(self, rng):
        self.now_us = 10_000_000
        self.rng = rng
        self.wakeups = 0

    def monotonic_ms(self):
        return self.now_us // 1000

    async def sleep(self, seconds):
        self.wakeups += 1
        self.now_us += int(seconds * 1_000_000) + self.rng.randrange(TIMER_LATENESS_US)
        await _yield(0)


class TimedMeter:
    """A meter on a serial line: each request's answer begins ``turnaround()`` after the
    request has crossed the wire, its bytes land a character time apart."""

    def __init__(self, clock, baudrate, turnaround, count):
        self.clock = clock
        self.char_us = char_time_us(baudrate)
        self.turnaround = turnaround
        self.count = count
        self.arrivals = []  # (time, byte) not yet read
        self.last_byte_us = None  # when the current answer's last byte lands

    def write(self, request):
        frame = FramerRTU(DecodePDU(is_server=False)).buildFrame(
            ReadInputRegistersResponse(registers=list(range(self.count)), dev_id=1))
        start = self.clock.now_us + len(request) * self.char_us + self.turnaround()
        self.arrivals = [(start + (i + 1) * self.char_us, byte) for i, byte in enumerate(frame)]
        self.last_byte_us = self.arrivals[-1][0]

    def reset_input(self):
        self.arrivals = [item for item in self.arrivals if item[0] > self.clock.now_us]

    def _take(self, max_bytes):
        now = self.clock.now_us
        ready = [byte for at, byte in self.arrivals[:max_bytes] if at <= now]
        del self.arrivals[:len(ready)]
        return bytes(ready)

    async def read(self, max_bytes, timeout_ms):
        await _yield(0)
        data = self._take(max_bytes)
        if data or timeout_ms <= 0:
            return data
        self.clock.wakeups += 1
        if self.arrivals and self.arrivals[0][0] <= self.clock.now_us + timeout_ms * 1000:
            self.clock.now_us = self.arrivals[0][0] + READER_LATENCY_US
            return self._take(max_bytes)
        self.clock.now_us += timeout_ms * 1000
        return b""


def _run_answers(baudrate, count, base_us, jitter_us, seed, answers):
    """(microseconds from each answer's last byte to its read, wake-ups per answer) per answer."""
    rng = random.Random(seed)
    clock = VirtualTime(rng)
    meter = TimedMeter(clock, baudrate, lambda: base_us + rng.randrange(jitter_us + 1), count)
    results = []

    async def go():
        master = RtuMaster(meter, clock, baudrate, timeout_ms=500, retries=0)
        for _ in range(answers):
            clock.now_us += 1_000_000  # the next poll
            before = clock.wakeups
            data = await master.read_registers(1, 4, 0, count)
            assert len(data) == 2 * count
            results.append((clock.now_us - meter.last_byte_us, clock.wakeups - before))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modbus_rtu.asyncio, "sleep", clock.sleep)
        asyncio.run(go())
    return results


@settings(max_examples=80, deadline=None)
@given(baudrate=st.sampled_from([9600, 19200, 38400]), count=st.integers(1, 60),
       base_us=st.integers(0, 40_000), jitter_us=st.integers(0, 1500), seed=st.integers(0, 2 ** 32))
def test_learned_wake_takes_the_last_byte_as_it_lands(baudrate, count, base_us, jitter_us, seed):
    """After 20 answers to learn the turnaround, the next 60: the median answer is read as
    its last byte lands (reader latency, not a timer's), 9 in 10 within a millisecond of it.
    The master wakes for the silence before the request, the look and a sleep through the
    middle of a long answer, then once per byte landing within the look-ahead (a character
    and a millisecond): on average no more, however long the answer."""
    results = _run_answers(baudrate, count, base_us, jitter_us, seed, 80)[20:]
    delays = sorted(delay for delay, _ in results)
    assert delays[len(delays) // 2] <= READER_LATENCY_US, delays
    assert delays[int(len(delays) * 0.9)] <= 1000, delays
    char_us = char_time_us(baudrate)
    assert statistics.mean(wakes for _, wakes in results) <= 3 + (char_us + 1000) / char_us, results


def test_a_meter_that_answers_late_once_does_not_make_every_later_wake_late(monkeypatch):
    """One answer 20 ms late (a busy meter) moves the learned turnaround only halfway; a few
    answers later the master again reads each answer as its last byte lands."""
    rng = random.Random(7)
    clock = VirtualTime(rng)
    turnarounds = iter([3000] * 20 + [23000] + [3000] * 20)
    meter = TimedMeter(clock, 9600, lambda: next(turnarounds), 10)
    monkeypatch.setattr(modbus_rtu.asyncio, "sleep", clock.sleep)
    delays = []

    async def go():
        master = RtuMaster(meter, clock, 9600, timeout_ms=500, retries=0)
        for _ in range(41):
            clock.now_us += 1_000_000
            await master.read_registers(1, 4, 0, 10)
            delays.append(clock.now_us - meter.last_byte_us)

    asyncio.run(go())
    assert all(delay <= READER_LATENCY_US for delay in delays[31:]), delays
