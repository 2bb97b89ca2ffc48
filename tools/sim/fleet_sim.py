"""Fleet simulation: N stations in one process against one mosquitto, and what it costs.

Each station is a full agent core built exactly as ``evse-agent`` builds it
(``ports.cpython.main.build_agent``, then ``station.build_station``: RTU master, meter,
session engine, power monitor, input monitor, journal on disk, forwarder, paho publisher
with its own connection, signing key), but its hardware is simulated in memory: a meter that
answers Modbus RTU frames with the wire time of the bytes (``SimulatedMeterLine``) and a car
that plugs in, charges and leaves on a seeded schedule (``ScriptedCar``). All stations share
one asyncio loop.

Stations run in worker processes of at most ``STATIONS_PER_PROCESS`` (paho's select()
loop cannot use descriptors above 1023). Reports, per fleet size, messages/s arriving at a
subscriber of ``evse/#``, the broker's CPU (from ``/proc``), the stations' CPU, and the
poll cycles the stations achieved against their 1 Hz schedule (below 1.0: they could not
keep up).

``python -m evse_tools.sim.fleet_sim --stations 10 100 500 --duration 20``

Larger fleets (thousands of stations) are ``fleet_replay``'s: these stations' messages
recorded once and replayed by lighter publishers.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time

from evse_agent import log
from evse_agent.config import validate
from evse_agent.meter_models import model_named
from evse_agent.modbus_rtu import char_time_us, crc16
from evse_agent.pilot import NOMINAL_VOLTS, PinSample, duty_from_current
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.main import build_agent

from ..bench.cpu import cpu_seconds
from ..testkit.broker import Mosquitto
from ..testkit.subscriber import subscribed_client
from .meter_sim import LoadProfile, MeterPhysics, encode_register

STATION_FORMAT = "fleet-%04d"


class SimulatedMeterLine:
    """The byte stream ``RtuMaster`` expects, answered by a simulated meter in memory.

    A request is parsed and checked like a meter would (unit id, CRC); the response is
    built from ``MeterPhysics`` and becomes readable after the wire time of the request and
    the response at ``baudrate``, as on a real line.
    """

    def __init__(self, model, physics, unit_id=1, baudrate=9600):
        self.model = model
        self.physics = physics
        self.unit_id = unit_id
        self.char_s = char_time_us(baudrate) / 1000000
        self.requests = 0
        self._pending = b""
        self._ready_at = 0.0

    def write(self, data):
        data = bytes(data)
        if len(data) != 8 or data[0] != self.unit_id or crc16(data[:6]) != data[6] | data[7] << 8:
            self._pending = b""  # not for this meter, or damaged: a meter stays silent
            return
        function, address, count = data[1], data[2] << 8 | data[3], data[4] << 8 | data[5]
        self.requests += 1
        self.physics.update()
        words = [0] * count
        for reg in self.model.registers:
            if reg.function == function and reg.address < address + count and reg.end > address:
                encoded = encode_register(reg, self.physics.values.get(reg.name), self.physics.energy_wh)
                for i, word in enumerate(encoded):
                    if 0 <= reg.address - address + i < count:
                        words[reg.address - address + i] = word
        body = bytes([self.unit_id, function, 2 * count]) + b"".join(bytes((w >> 8, w & 0xFF)) for w in words)
        crc = crc16(body)
        self._pending = body + bytes((crc & 0xFF, crc >> 8))
        self._ready_at = time.monotonic() + (len(data) + len(self._pending)) * self.char_s

    def reset_input(self):
        self._pending = b""

    async def read(self, max_bytes, timeout_ms):
        if not self._pending:
            if timeout_ms > 0:
                await asyncio.sleep(timeout_ms / 1000)
            return b""
        wait = self._ready_at - time.monotonic()
        if wait > 0:
            if timeout_ms <= 0:
                return b""
            await asyncio.sleep(min(wait, timeout_ms / 1000))
            if self._ready_at > time.monotonic():
                return b""
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    def close(self):
        pass


class ScriptedCar:
    """A pin bank whose car arrives, charges and leaves on a seeded schedule, and pulls the
    simulated meter's load while the contactor is closed."""

    def __init__(self, physics, seed, advertised_a=16.0):
        self.physics = physics
        self.random = random.Random(seed)
        self.advertised_a = advertised_a
        self.sample = PinSample()
        self.plugs = 0
        self._state = "A"
        self._state_before = "A"  # where the car came from into the current state
        self._next_change = time.monotonic() + self.random.uniform(1, 20)
        self._apply()

    def _apply(self):
        state = self._state
        self.sample.pilot_volts = NOMINAL_VOLTS[state]
        self.sample.duty_pct = 100.0 if state == "A" else duty_from_current(self.advertised_a)
        closed = state == "C"
        self.sample.contactor_command = closed
        self.sample.contactor_feedback = closed
        self.physics.set_load(self.advertised_a if closed else 0.0)

    def read(self):
        now = time.monotonic()
        if now >= self._next_change:
            # A: 5-40 s away; B: 2 s plugged in before and after charging; C: 10-60 s charging.
            following = {"A": "B", "B": "C" if self._state_before != "C" else "A", "C": "B"}
            previous = self._state
            self._state = following[previous]
            self._state_before = previous
            if self._state == "B" and previous == "A":
                self.plugs += 1
            span = {"A": (5, 40), "B": (2, 2), "C": (10, 60)}[self._state]
            self._next_change = now + self.random.uniform(*span)
            self._apply()
        return self.sample

    def close(self):
        pass


class FleetSubscriber:
    """Counts what the broker delivers on ``evse/#`` (QoS 0: the fleet's load, not ours)."""

    def __init__(self, broker):
        self.count = 0
        self.by_topic = {}
        self._lock = threading.Lock()
        self.client = subscribed_client(broker, "fleet-counter", "evse/#", self._on_message, 0)

    def _on_message(self, client, userdata, message):
        channel = message.topic.rsplit("/", 1)[-1]
        with self._lock:
            self.count += 1
            self.by_topic[channel] = self.by_topic.get(channel, 0) + 1

    def snapshot(self):
        with self._lock:
            return self.count, dict(self.by_topic)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def station_config(number, host, port, workdir):
    """Board settings of simulated station ``number`` (real defaults, its own directories)."""
    station = STATION_FORMAT % number
    base = os.path.join(workdir, station)
    return validate({
        "station_id": station,
        "meter": {"model": "sdm630", "port": "simulated", "baudrate": 9600},
        "io": {"driver": "sim", "sim_file": os.path.join(base, "pins.json"),
               "pilot": {"sample_ms": 100, "debounce_ms": 100}},
        "session": {"state_dir": os.path.join(base, "state")},
        "signing": {"key_file": os.path.join(base, "station-key.pem")},
        "journal": {"dir": os.path.join(base, "journal")},
        "clock": {"sync": "always"},
        "mqtt": {"host": host, "port": port},
        "homeassistant": {"enabled": False},
    })


# paho's network loop waits with select(), which refuses descriptors above 1023 (FD_SETSIZE),
# and each station holds three (its socket and paho's wake-up pair) plus journal files: one
# process hosts at most this many stations, so larger fleets run in several processes.
STATIONS_PER_PROCESS = 200


def _waker(loop, forwarder):
    return lambda: loop.call_soon_threadsafe(forwarder.wake)


async def _run_fleet(agents, publishers, duration_s):
    loop = asyncio.get_running_loop()
    for agent, publisher in zip(agents, publishers):
        publisher.on_activity = _waker(loop, agent.forwarder)
    try:
        await asyncio.gather(*(agent.run(duration_s) for agent in agents))
    finally:
        for publisher in publishers:
            publisher.on_activity = None  # the loop closes: nothing left to wake


def run_stations(host, port, numbers, duration_s, workdir, seed, ready, go, results):
    """One worker process: build the stations ``numbers``, connect them, report ready, wait
    for ``go``, run them for ``duration_s`` and put its figures on ``results``."""
    log.set_sink(lambda level, text: None, log.ERROR)
    clock = SystemClock("always")
    model = model_named("sdm630")
    agents, publishers, journals, cars = [], [], [], []
    try:
        for number in numbers:
            config = station_config(number, host, port, workdir)
            physics = MeterPhysics(model.phases, LoadProfile([(0, 0.0)]), serial=70000000 + number,
                                   energy_wh=1000000 + 1000 * number, seed=seed + number)
            car = ScriptedCar(physics, seed * 100003 + number)
            line = SimulatedMeterLine(model, physics)
            agent, publisher, _, journal = build_agent(config, clock, quiet=True, stream=line, pins=car)
            agents.append(agent)
            publishers.append(publisher)
            journals.append(journal)
            cars.append(car)
        for publisher in publishers:
            publisher.start()
        unconnected = [p for p in publishers if not p.wait_connected(30)]
        if unconnected:
            raise RuntimeError("%d stations could not connect: %s" % (len(unconnected), unconnected[0].last_error))
        ready.put(None)
        go.wait()
        cpu = cpu_seconds(os.getpid())
        asyncio.run(_run_fleet(agents, publishers, duration_s))
        results.put({"cycles": sum(a.cycles for a in agents), "plugs": sum(c.plugs for c in cars),
                     "cpu_s": cpu_seconds(os.getpid()) - cpu})
    except Exception as error:  # reported to the parent, which fails the run with it
        ready.put("station block %d-%d: %s" % (numbers[0], numbers[-1], error))
        results.put({"error": str(error)})
    finally:
        for publisher in publishers:
            publisher.stop()
        for journal in journals:
            journal.close()


def simulate(broker, stations, duration_s, workdir, seed=1):
    """Run ``stations`` simulated stations for ``duration_s`` seconds; returns the figures."""
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    numbers = list(range(1, stations + 1))
    blocks = [numbers[i:i + STATIONS_PER_PROCESS] for i in range(0, stations, STATIONS_PER_PROCESS)]
    workers = [context.Process(target=run_stations, daemon=True,
                               args=(broker.host, broker.port, block, duration_s, workdir, seed, ready, go, results))
               for block in blocks]
    for worker in workers:
        worker.start()
    counter = FleetSubscriber(broker)
    try:
        for _ in workers:
            problem = ready.get(timeout=300)
            if problem is not None:
                raise RuntimeError(problem)
        received, _ = counter.snapshot()
        broker_cpu = cpu_seconds(broker.process.pid)
        started = time.monotonic()
        go.set()
        figures = [results.get(timeout=duration_s + 120) for _ in workers]
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # the last messages on their way
        broker_cpu = cpu_seconds(broker.process.pid) - broker_cpu
        total, by_topic = counter.snapshot()
    finally:
        counter.close()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    errors = [f["error"] for f in figures if "error" in f]
    if errors:
        raise RuntimeError("; ".join(errors))
    messages = total - received
    return {
        "stations": stations, "processes": len(workers), "duration_s": round(elapsed, 1),
        "messages": messages, "messages_per_s": round(messages / elapsed, 1),
        "messages_per_station_s": round(messages / elapsed / stations, 2),
        "by_channel": by_topic,
        "broker_cpu_pct": round(100 * broker_cpu / elapsed, 1),
        "broker_cpu_ms_per_message": round(1000 * broker_cpu / max(1, messages), 4),
        "fleet_cpu_pct": round(100 * sum(f["cpu_s"] for f in figures) / elapsed, 1),
        "poll_cycles_ratio": round(sum(f["cycles"] for f in figures) / (stations * duration_s), 3),
        "plug_ins": sum(f["plugs"] for f in figures),
    }


def run_fleets(sizes, duration_s, workdir=None):
    """``simulate`` for each fleet size against a fresh broker; a list of figures."""
    results = []
    for stations in sizes:
        directory = tempfile.mkdtemp(prefix="evse-fleet-", dir=workdir)
        try:
            with Mosquitto() as broker:
                results.append(simulate(broker, stations, duration_s, directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return results


def fleet_table(results):
    lines = ["%8s %12s %14s %12s %14s %12s %12s" % ("stations", "messages/s", "per station/s", "broker CPU",
                                                     "broker ms/msg", "fleet CPU", "cycles/due")]
    for r in results:
        lines.append("%8d %12.1f %14.2f %11.1f%% %14.4f %11.1f%% %12.3f" % (
            r["stations"], r["messages_per_s"], r["messages_per_station_s"], r["broker_cpu_pct"],
            r["broker_cpu_ms_per_message"], r["fleet_cpu_pct"], r["poll_cycles_ratio"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-fleet-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, nargs="+", default=[10, 100, 500],
                        help="fleet sizes to run, one after the other (default: 10 100 500)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each fleet runs (default 20)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.stations):
        parser.error("--stations: fleet sizes must be at least 1, got %s" % args.stations)
    log.set_sink(lambda level, text: None, log.ERROR)
    results = run_fleets(args.stations, args.duration)
    print(json.dumps(results, indent=2) if args.json else fleet_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
