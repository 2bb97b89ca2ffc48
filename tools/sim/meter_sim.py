"""Meter simulator: a pymodbus RTU server on a pseudo-terminal serving any meter map.

``evse-meter-sim --model sdm630`` prints the device path the agent should open (and, with
``--link PATH``, makes a stable symlink to it). Values are plausible and changing: mains
voltage with a slow drift, per-phase load following a load profile (idle, a charging ramp,
load steps), power = V x I x cos(phi), and a cumulative import register that grows exactly
with the power served. Faults can be switched on and off at any time:

- ``silent``    — no answer at all;
- ``late``      — the answer comes after ``late_ms`` (longer than the agent's timeout);
- ``crc``       — the answer's CRC is corrupted;
- ``exception`` — a Modbus exception response (``exception_code``, default 4);
- ``garbage``   — random bytes instead of an answer.

A hostile register: ``set_register(kwh)`` serves that float32 in the import-energy register
instead of the true count (``nan``, ``inf``, ``-5``, ``3e38``, a dip or a jump), while the
true count goes on growing underneath; ``set_register(None)`` serves the truth again.

Interactive commands on stdin: ``load <amps>``, ``fault <name>|off``, ``register <kWh>|off``,
``hold``, ``release``, ``status``, ``quit``.
"""

import argparse
import asyncio
import json
import logging
import math
import os
import random
import struct
import sys
import threading
import time

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from evse_agent.meter_models import model_named
from evse_agent.registers import FLOAT32, FN_READ_HOLDING, FN_READ_INPUT

from .pty_link import PtyLink

FAULTS = ("silent", "late", "crc", "exception", "garbage")

NOMINAL_VOLTAGE = 230.0
NOMINAL_FREQUENCY = 50.0


class LoadProfile:
    """Per-phase current (A) over time: keyframes ``(seconds, amps)``, linear in between."""

    def __init__(self, keyframes, loop=False):
        if not keyframes:
            raise ValueError("a load profile needs at least one keyframe")
        self.keyframes = sorted(keyframes)
        self.loop = loop

    def amps_at(self, t):
        frames = self.keyframes
        if self.loop and frames[-1][0] > 0:
            t = t % frames[-1][0]
        if t <= frames[0][0]:
            return frames[0][1]
        for (t0, a0), (t1, a1) in zip(frames, frames[1:]):
            if t <= t1:
                return a0 + (a1 - a0) * (t - t0) / (t1 - t0) if t1 > t0 else a1
        return frames[-1][1]


class PinFileLoad:
    """Load that follows the vehicle simulator's pin file: the car's current flows only while
    the contactor feedback is closed (physics: no closed contactor, no current)."""

    def __init__(self, path):
        self.path = path
        self._stamp = None
        self._amps = 0.0
        self._phases = 3

    def amps_at(self, t):
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                with open(self.path) as handle:
                    pins = json.load(handle)
                closed = bool(pins.get("contactor_feedback"))
                self._amps = float(pins.get("ev_current_a") or 0.0) if closed else 0.0
                self._phases = int(pins.get("ev_phases") or 3)
                self._stamp = stamp
        except (OSError, ValueError, TypeError):
            pass  # no vehicle simulator yet, or a file being replaced: keep the last load
        return [self._amps if i < self._phases else 0.0 for i in range(3)]


PROFILES = {
    # Idle, an EV's ramp to 16 A, a load step down to 10 A, back to 16 A, ramp down, repeat.
    "charging": LoadProfile([(0, 0.0), (3, 0.0), (7, 16.0), (20, 16.0), (21, 10.0), (30, 10.0),
                             (31, 16.0), (40, 16.0), (43, 0.0), (50, 0.0)], loop=True),
    "idle": LoadProfile([(0, 0.0)]),
    "steady": LoadProfile([(0, 16.0)]),
}


class MeterPhysics:
    """The simulated installation: voltages, load, and an exact cumulative energy counter."""

    def __init__(self, phases, profile, serial=12345678, energy_wh=1234567, seed=7):
        self.phases = phases
        self.profile = profile
        self.serial = serial
        self.energy_uwh = energy_wh * 1000000  # integer micro-Wh: the counter never drifts
        self.fixed_amps = None
        self.power_factor = 0.99
        self.noise = True
        self.voltage_offset = [0.0, 0.0, 0.0]  # fault injection: sag, swell, lost phase
        self._random = random.Random(seed)
        self._t0 = time.monotonic()
        self._last = self._t0
        self.values = {}
        self.update()

    def set_load(self, amps):
        """Hold the per-phase current at ``amps`` (None: follow the profile again)."""
        self.fixed_amps = amps

    def update(self, now=None):
        """Advance to ``now``: integrate the previous power into energy, then new values."""
        now = time.monotonic() if now is None else now
        dt = now - self._last
        if dt > 0 and self.values:
            self.energy_uwh += int(self.values["power_total"] * dt * 1000000 / 3600)
        self._last = now
        t = now - self._t0
        amps = self.profile.amps_at(t) if self.fixed_amps is None else self.fixed_amps
        if not isinstance(amps, list):
            amps = [amps] * 3
        values = {}
        total = 0.0
        for i in range(self.phases):
            phase = "l%d" % (i + 1)
            volts = NOMINAL_VOLTAGE + 2.0 * math.sin(t / 20.0 + i) + self._jitter(0.3)
            volts = max(0.0, volts + self.voltage_offset[i])
            current = max(0.0, amps[i] + self._jitter(0.05)) if amps[i] > 0 else 0.0
            power = volts * current * self.power_factor
            values["voltage_" + phase] = volts
            values["current_" + phase] = current
            values["power_" + phase] = power
            total += power
        values["power_total"] = total
        values["frequency"] = NOMINAL_FREQUENCY + 0.02 * math.sin(t / 7.0) + self._jitter(0.005)
        values["serial"] = self.serial
        self.values = values

    @property
    def energy_wh(self):
        return self.energy_uwh // 1000000

    def _jitter(self, scale):
        return self._random.uniform(-scale, scale) if self.noise else 0.0


def encode_register(reg, value, energy_wh=None):
    """Raw register words (list of ints) for ``value`` as the meter would send it."""
    if reg.name == "energy_import":
        exp10 = reg.exp10 + (3 if reg.unit == "kWh" else 0)
        if reg.dtype == FLOAT32:
            value = energy_wh / 10.0 ** exp10
        else:
            raw = energy_wh // 10 ** exp10 if exp10 >= 0 else energy_wh * 10 ** -exp10
            return _int_words(raw, reg)
    if value is None:
        return _int_words(reg.invalid, reg) if reg.invalid is not None else [0] * reg.count
    if reg.dtype == FLOAT32:
        words = list(struct.unpack(">HH", struct.pack(">f", value)))
    else:
        return _int_words(int(round(value / 10.0 ** reg.exp10)), reg)
    return words if reg.word_order == "big" else words[::-1]


def _int_words(raw, reg):
    raw &= (1 << (16 * reg.count)) - 1
    words = [(raw >> (16 * (reg.count - 1 - i))) & 0xFFFF for i in range(reg.count)]
    return words if reg.word_order == "big" else words[::-1]


class MeterSimulator:
    """A simulated meter on a pty: pymodbus serves the registers, this class decides values.

    Runs its own event loop in a thread (``start``/``stop``), so tests and the demo can
    drive it from ordinary code. ``device`` is the path the agent opens.
    """

    def __init__(self, model_name="sdm630", unit_id=1, profile="charging", baudrate=None,
                 link_path=None, serial=12345678, energy_wh=1234567, seed=7, pin_file=None):
        self.model = model_named(model_name)
        self.unit_id = unit_id
        load = PinFileLoad(pin_file) if pin_file else PROFILES[profile]
        self.physics = MeterPhysics(self.model.phases, load, serial, energy_wh, seed)
        self.baudrate = baudrate
        self.link_path = link_path
        self.fault = None
        self.late_ms = 1500
        self.exception_code = 4
        self.hold = False
        self.register_override = None  # float32 kWh served instead of the true import register
        self.requests_seen = 0
        self.responses_sent = 0
        self.device = None
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._server = None
        self._link = None
        self._ready = threading.Event()
        self._error = None
        self._garbage = random.Random(seed + 1)

    # -- control (any thread) ------------------------------------------------------------

    def set_fault(self, fault):
        """Switch a fault on (one of FAULTS) or off (None)."""
        if fault is not None and fault not in FAULTS:
            raise ValueError("unknown fault %r (known: %s)" % (fault, ", ".join(FAULTS)))
        self.fault = fault

    def set_register(self, kwh):
        """Serve ``kwh`` (any float, NaN and infinities included) in the import-energy
        register instead of the true count; None serves the truth again."""
        self.register_override = None if kwh is None else float(kwh)

    def set_load(self, amps):
        with self._lock:
            self.physics.set_load(amps)

    def replace_meter(self, serial, energy_wh):
        """Swap in another meter: new serial number and register value (a technician's job)."""
        with self._lock:
            self.physics.serial = serial
            self.physics.energy_uwh = energy_wh * 1000000
            self.physics.update()

    def set_voltage_offset(self, phase, volts):
        """Shift one phase's voltage (phase 1..3): a sag, a swell, or -230 for a lost phase."""
        with self._lock:
            self.physics.voltage_offset[phase - 1] = volts

    def snapshot(self):
        """The values currently served: dict of field name to value, plus ``energy_wh``."""
        with self._lock:
            values = dict(self.physics.values)
            values["energy_wh"] = self.physics.energy_wh
        return values

    def set_hold(self, hold):
        """Freeze (True) or resume (False) the values served; energy does not grow while held."""
        with self._lock:
            if not hold:
                self.physics._last = time.monotonic()
            self.hold = hold

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout_s=10):
        """Open the ptys and start serving; returns the device path for the agent."""
        self._thread = threading.Thread(target=self._run, name="meter-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("meter simulator did not start within %s s" % timeout_s)
        if self._error is not None:
            raise self._error
        return self.device

    def stop(self):
        """Stop serving and close the pty (a meter pulled off the line); a second call does nothing."""
        if self._loop is not None and self._thread is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self.link_path and os.path.islink(self.link_path):
            os.unlink(self.link_path)

    def _run(self):
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_serving())
        except Exception as error:  # reported to the starting thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._link.close()
            if self._server is not None:
                loop.run_until_complete(self._server.shutdown())
            loop.close()

    async def _start_serving(self):
        self._link = PtyLink(self.baudrate)
        self._link.start()
        self.device = self._link.device_b
        if self.link_path:
            tmp = self.link_path + ".tmp"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(self.device, tmp)
            os.replace(tmp, self.link_path)
        device = SimDevice(
            id=self.unit_id,
            simdata=([SimData(0, datatype=DataType.BITS)], [SimData(0, datatype=DataType.BITS)],
                     self._blocks(FN_READ_HOLDING), self._blocks(FN_READ_INPUT)),
            action=self._action,
        )
        self._server = ModbusSerialServer(
            device, framer=FramerType.RTU, port=self._link.device_a,
            baudrate=self.baudrate or 9600, trace_packet=self._trace_packet)
        await self._server.serve_forever(background=True)

    def _blocks(self, function):
        """SimData blocks: the ranges the real meter answers, and every mapped register."""
        spans = [(lo, hi + 1) for fn, lo, hi in self.model.answered if fn == function]
        spans += [(r.address, r.end) for r in self.model.registers if r.function == function]
        spans.sort()
        merged = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        fill = 0xFFFF if self.model.name.startswith("abb") else 0
        blocks = [SimData(lo, count=hi - lo, values=fill, datatype=DataType.REGISTERS)
                  for lo, hi in merged]
        if not blocks:  # pymodbus needs at least one block per table
            blocks = [SimData(0xFFFE, datatype=DataType.INVALID)]
        return blocks

    # -- serving (simulator loop) --------------------------------------------------------

    async def _action(self, function_code, start_address, address, count, registers, set_values):
        self.requests_seen += 1
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # a meter's measurement registers are read-only
        fault = self.fault
        if fault == "late":
            await asyncio.sleep(self.late_ms / 1000)
        elif fault == "exception":
            return ExcCodes(self.exception_code)
        with self._lock:
            if not self.hold:
                self.physics.update()
            values = self.physics.values
            energy_wh = self.physics.energy_wh
        end = address + count
        for reg in self.model.registers:
            if reg.function == function_code and reg.address < end and reg.end > address:
                words = encode_register(reg, values.get(reg.name), energy_wh)
                override = self.register_override
                if override is not None and reg.name == "energy_import" and reg.dtype == FLOAT32:
                    words = list(struct.unpack(">HH", struct.pack(">f", override)))
                offset = reg.address - start_address
                registers[offset:offset + reg.count] = words
        return None

    def _trace_packet(self, sending, data):
        if not sending:
            return data
        if data and data[0] != self.unit_id:
            # A request for another unit id: on a real bus that meter stays silent.
            # (pymodbus 3.16's simulator answers those with exception 4 instead.)
            return b""
        fault = self.fault
        if fault == "silent":
            return b""
        if fault == "crc":
            return data[:-1] + bytes([data[-1] ^ 0x5A])
        if fault == "garbage":
            return bytes(self._garbage.getrandbits(8) for _ in range(len(data)))
        self.responses_sent += 1
        return data


def _command(sim, line):
    """Apply one interactive command; returns a reply line (or None to quit)."""
    words = line.split()
    if not words:
        return ""
    verb = words[0].lower()
    if verb == "quit":
        return None
    if verb == "load" and len(words) == 2:
        if words[1] == "auto":
            sim.set_load(None)
            return "load follows the profile"
        try:
            amps = float(words[1])
        except ValueError:
            return "error: load %r is not a number of amps" % words[1]
        sim.set_load(amps)
        return "load %.1f A per phase" % amps
    if verb == "fault" and len(words) == 2:
        name = None if words[1] == "off" else words[1]
        try:
            sim.set_fault(name)
        except ValueError as error:
            return "error: %s" % error
        return "fault %s" % (name or "off")
    if verb == "register" and len(words) == 2:
        if words[1] == "off":
            sim.set_register(None)
            return "register follows the true count"
        try:
            kwh = float(words[1])
        except ValueError:
            return "error: register %r is not a number of kWh (nan and inf allowed)" % words[1]
        sim.set_register(kwh)
        return "register serves %r kWh" % kwh
    if verb in ("hold", "release"):
        sim.set_hold(verb == "hold")
        return "values %s" % ("held" if verb == "hold" else "live")
    if verb == "status":
        snap = sim.snapshot()
        return "P %.0f W  E %d Wh  fault %s  requests %d" % (
            snap["power_total"], snap["energy_wh"], sim.fault or "off", sim.requests_seen)
    return "error: unknown command %r (load <A>|auto, fault <%s>|off, register <kWh>|off, hold, release, status, quit)" % (
        line.strip(), "|".join(FAULTS))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-meter-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdm630", help="meter map: sdm630, sdm120, abb_b23")
    parser.add_argument("--unit", type=int, default=1, help="Modbus unit id")
    parser.add_argument("--profile", default="charging", choices=sorted(PROFILES))
    parser.add_argument("--pin-file", default=None,
                        help="follow the vehicle simulator's pin file instead of a profile")
    parser.add_argument("--baudrate", type=int, default=None,
                        help="pace bytes at this baud rate (default: as fast as the pty)")
    parser.add_argument("--link", default=None, help="also make this symlink to the device")
    parser.add_argument("--fault", default=None, choices=FAULTS)
    parser.add_argument("--energy-wh", type=int, default=1234567, help="initial import register")
    args = parser.parse_args(argv)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    try:
        sim = MeterSimulator(args.model, args.unit, args.profile, args.baudrate, args.link,
                             energy_wh=args.energy_wh, pin_file=args.pin_file)
    except ValueError as error:
        parser.error(str(error))
    sim.set_fault(args.fault)
    device = sim.start()
    print("meter %s unit %d on %s%s" % (args.model, args.unit, device,
                                        " (link %s)" % args.link if args.link else ""), flush=True)
    try:
        for line in sys.stdin:
            reply = _command(sim, line)
            if reply is None:
                break
            if reply:
                print(reply, flush=True)
        else:
            # stdin closed (e.g. run in the background): keep serving until interrupted.
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
