"""Stand-ins the scenarios share (portable: they run under MicroPython and CPython)."""

import asyncio
import struct

from evse_agent.modbus_rtu import crc16
from evse_agent.ports.micropython.p256 import Signer

# A fixed station key (a test key, never used on a station).
STATION_KEY = 0x3A1F5C7E9B2D4F6081A3C5E7092B4D6F8A1C3E5079B2D4F6183A5C7E9B0D2F41


def signer():
    return Signer(STATION_KEY)


class FakeClock:
    """Wall and monotonic time moved by hand; wall time in whole seconds (as on a board)."""

    def __init__(self, start=1795000000):
        self.now_ms = 0
        self.start = start
        self.is_synced = True

    def monotonic_ms(self):
        return self.now_ms

    def time(self):
        return self.start + self.now_ms // 1000

    def synced(self):
        return self.is_synced

    def advance(self, ms):
        self.now_ms += ms


class ScriptedStream:
    """The byte stream RtuMaster talks to: answers each request from a script.

    ``answers`` is a list of bytes (the whole response, delivered at once), None (silence:
    a timeout) or a callable ``f(request) -> bytes``. The requests written are kept while
    ``keep`` (a long scenario only counts them).
    """

    def __init__(self, clock, answers, always=None, keep=True):
        self.clock = clock
        self.answers = list(answers)
        self.always = always  # answers every request once the script is used up
        self.keep = keep
        self.count = 0
        self.requests = []
        self._pending = b""

    def write(self, data):
        self.count += 1
        if self.keep:
            self.requests.append(bytes(data))
        answer = self.answers.pop(0) if self.answers else self.always
        if callable(answer):
            answer = answer(bytes(data))
        self._pending = answer or b""

    def reset_input(self):
        self._pending = b""

    async def read(self, max_bytes, timeout_ms):
        if not self._pending:
            self.clock.advance(timeout_ms)
            await asyncio.sleep(0)
            return b""
        chunk = self._pending[:max_bytes]
        self._pending = self._pending[max_bytes:]
        self.clock.advance(1)
        return chunk


def with_crc(body):
    crc = crc16(body)
    return bytes(body) + bytes([crc & 0xFF, crc >> 8])


def float32_words(value):
    """The two big-endian registers of an IEEE-754 single (high word first)."""
    return struct.pack(">f", value)


class RegisterMeter:
    """Answers Modbus read requests from a register image (address -> 2 bytes)."""

    def __init__(self, unit=1):
        self.unit = unit
        self.input = {}
        self.holding = {}

    def set_float(self, address, value, function=4):
        data = float32_words(value)
        table = self.input if function == 4 else self.holding
        table[address] = data[0:2]
        table[address + 1] = data[2:4]

    def set_uint32(self, address, value, function=3):
        table = self.input if function == 4 else self.holding
        table[address] = bytes([(value >> 24) & 0xFF, (value >> 16) & 0xFF])
        table[address + 1] = bytes([(value >> 8) & 0xFF, value & 0xFF])

    def set_raw32(self, address, bits, function=4):
        self.set_uint32(address, bits, function)

    def answer(self, request):
        unit, function = request[0], request[1]
        address = (request[2] << 8) | request[3]
        count = (request[4] << 8) | request[5]
        table = self.input if function == 4 else self.holding
        body = bytearray([unit, function, 2 * count])
        for i in range(count):
            body.extend(table.get(address + i, b"\x00\x00"))
        return with_crc(body)


class Link:
    def __init__(self):
        self.online = True


class Model:
    def __init__(self, phases=3):
        self.phases = phases


class FakeMeter:
    """What the session engine asks of the meter: its link state and model."""

    def __init__(self, phases=3):
        self.link = Link()
        self.model = Model(phases)


class Publisher:
    """Counts what the outbox posts per channel (keeping only session records, so a long
    scenario does not fill the heap); acknowledges QoS 1 tokens when drained."""

    def __init__(self):
        self.counts = {}
        self.sessions = []
        self.connected = True  # one connection, never lost
        self.connects = 1
        self._next = 1
        self._acked = []

    def publish(self, topic, payload, qos=0, retain=False):
        channel = topic[topic.rfind("/") + 1:]
        self.counts[channel] = self.counts.get(channel, 0) + 1
        if channel == "session":
            self.sessions.append(payload)
        token = self._next
        self._next += 1
        if qos:
            self._acked.append(token)
        return token

    def drain_acked(self):
        acked = self._acked
        self._acked = []
        return acked


class Pins:
    """A pin bank whose sample the scenario sets (pilot volts, duty, contactor lines)."""

    def __init__(self):
        from evse_agent.pilot import PinSample
        self.sample = PinSample(12.0, None, 100.0, False, False)

    def set(self, volts, duty, command, feedback):
        sample = self.sample
        sample.pilot_volts = volts
        sample.duty_pct = duty
        sample.contactor_command = command
        sample.contactor_feedback = feedback

    def read(self):
        return self.sample
