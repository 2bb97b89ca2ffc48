"""A simulated week of a charging fleet, published through a real broker, with exact ground truth.

    python -m evse_tools.sim.fleet_week --broker 127.0.0.1:1883 --out DIR [--stations 4] [--days 7] [--seed 7]

Each station is the agent's own core, built by ``station.build_station`` (session engine,
power monitor, the outbox, a journal on disk, the forwarder) on the Linux port's MQTT
publisher and file-key signer (a P-256 key per station, its public key also written as PEM).
Only the meter's readings and the pins are synthetic: a world timeline says, minute by minute, what the
pilot, the contactor, the advertised current, the car's draw, the supply voltage and the meter
link do, and a fast clock steps through it without waiting. The import register advances by
exactly power x time in integer Wh (charging powers are multiples of 60 W, so a minute at
constant power is a whole number of Wh).

The schedule is seeded per station: weekday evening peaks (some cars stay overnight, some
charge past midnight), some daytime charging, weekend sessions, pauses, one charger type per session (3.72 kW and 7.38 kW
single-phase, 11.04 kW three-phase), and faults the monitor raises deterministically:
overcurrent (the advertised current lowered while the car keeps drawing), meter offline (the
meter stops answering for three polls), supply voltage out of band, pilot error (state E) and
station unavailable (state F). The third station has markedly more faults.

Everything is derived twice: the ground truth from the timeline alone, and the records the
core actually produced; ``generate`` refuses to return if they disagree on any session's
energy or any event. Inputs and readings happen on whole minutes (inputs first, then the
minute's reading), aggregates cover ``AGGREGATE_INTERVAL_S``.
"""

import argparse
import json
import os
import random
import sys
import time

from evse_agent.config import validate
from evse_agent.journal import AGGREGATE
from evse_agent.messages import Topics, iso_utc
from evse_agent.meter_models import SDM630
from evse_agent.pilot import InputState
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.mqtt import MqttPublisher
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_agent.reading import Reading
from evse_agent.registers import energy_resolution_mwh
from evse_agent.station import Ports, build_station

from ..bench.main import FastClock

WEEK_START = 1795392000  # Monday 2026-11-23T00:00:00Z
MINUTE_S = 60  # the reading step: one poll per simulated minute
DAY_MIN = 1440
AGGREGATE_INTERVAL_S = 900
NOMINAL_V = 230.0
HIGH_V = 262.0  # above the default band's 253 V
# (charging power W, phases used, advertised current A): multiples of 60 W, whole Wh per minute
CHARGERS = ((3720.0, 1, 16.0), (7380.0, 1, 32.0), (11040.0, 3, 16.0))
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# Event types during which a station cannot charge: "faulted" time in the utilisation figures.
STOPPING_EVENTS = ("pilot_error", "evse_unavailable", "contactor_welded", "contactor_failed_to_close")
TIMEOUT_TEXT = "timeout: no response within 500 ms"


class PlannedSession:
    """One plug-in to unplug of the schedule, in minutes from the start of the week."""

    __slots__ = ("plug", "unplug", "periods", "power_w", "phases", "advertised_a")

    def __init__(self, plug, unplug, periods, charger):
        self.plug = plug
        self.unplug = unplug
        self.periods = periods  # [(first charging minute, first minute after)]
        self.power_w, self.phases, self.advertised_a = charger


class World:
    """What happens at a station, minute by minute (each list has one entry per minute,
    plus one for the instant the simulated span ends)."""

    def __init__(self, minutes):
        self.minutes = minutes
        size = minutes + 1
        self.pilot = ["A"] * size
        self.advertised_a = [None] * size
        self.draw_w = [0.0] * size
        self.phases = [3] * size
        self.l1_voltage = [NOMINAL_V] * size
        self.meter_answers = [True] * size
        self.faults = []  # (type, start minute, end minute)
        self.busy = [False] * size  # minutes a fault already uses

    def free(self, first, last):
        return all(not self.busy[m] for m in range(max(0, first), min(self.minutes, last)))

    def claim(self, first, last):
        for m in range(first, last):
            self.busy[m] = True


def plan_sessions(rng, days):
    """A seeded week of sessions for one station, in time order and never overlapping."""
    sessions = []
    free_from = 30
    end = days * DAY_MIN
    for day in range(days):
        base = day * DAY_MIN
        weekday = day % 7 < 5
        starts = []
        if weekday:
            if rng.random() < 0.55:
                starts.append(("day", base + rng.randint(8 * 60, 13 * 60)))
            if rng.random() < 0.9:
                starts.append(("evening", base + rng.randint(16 * 60 + 30, 19 * 60 + 30)))
            if rng.random() < 0.3:
                starts.append(("late", base + rng.randint(21 * 60 + 30, 23 * 60)))  # charges past midnight
        else:
            for _ in range(rng.choice((1, 2, 2))):
                starts.append(("weekend", base + rng.randint(9 * 60, 17 * 60)))
        for kind, plug in sorted(starts, key=lambda item: item[1]):
            if plug < free_from + 20:
                continue
            charger = rng.choice(CHARGERS)
            charge_min = rng.randint(60, 240) if kind in ("evening", "late") else rng.randint(30, 150)
            begin = plug + rng.randint(1, 4)
            if charge_min >= 60 and rng.random() < 0.3:
                first = rng.randint(20, charge_min - 20)
                resume = begin + first + rng.randint(10, 40)
                periods = [(begin, begin + first), (resume, resume + charge_min - first)]
            else:
                periods = [(begin, begin + charge_min)]
            charged_until = periods[-1][1]
            if kind in ("evening", "late") and day + 1 < days and (kind == "late" or rng.random() < 0.45):
                unplug = (day + 1) * DAY_MIN + rng.randint(6 * 60 + 30, 8 * 60)  # overnight
            elif rng.random() < 0.1:
                unplug = charged_until  # unplugged while still charging
            else:
                unplug = charged_until + rng.randint(5, 90)
            if unplug >= end - 10:
                continue
            sessions.append(PlannedSession(plug, unplug, periods, charger))
            free_from = unplug
    return sessions


def build_world(sessions, days):
    world = World(days * DAY_MIN)
    for session in sessions:
        for m in range(session.plug, session.unplug):
            world.pilot[m] = "B"
            world.advertised_a[m] = session.advertised_a
        for first, after in session.periods:
            for m in range(first, after):
                world.pilot[m] = "C"
                world.draw_w[m] = session.power_w
                world.phases[m] = session.phases
    return world


def place_faults(rng, world, sessions, heavy):
    """Put faults into the timeline where the monitor raises them deterministically."""
    counts = {"overcurrent": 4, "meter_offline": 4, "pilot_error": 2, "evse_unavailable": 1,
              "voltage_out_of_band": 2} if heavy else \
        {"overcurrent": 1, "meter_offline": 1, "pilot_error": rng.randint(0, 1), "evse_unavailable": 0,
         "voltage_out_of_band": 1}
    periods = [(s, p) for s in sessions for p in s.periods]
    order = list(range(len(periods)))
    rng.shuffle(order)
    # Overcurrent: the advertised current drops to 60 % for three minutes while the car keeps
    # drawing; raised at the second reading over the limit (grace 5 s), cleared on restore.
    placed = 0
    for index in order:
        session, (first, after) = periods[index]
        if placed == counts["overcurrent"]:
            break
        if after - first < 10 or not world.free(first + 3, first + 7):
            continue
        for m in range(first + 3, first + 6):
            world.advertised_a[m] = round(session.advertised_a * 0.6, 1)
        world.claim(first + 2, first + 7)
        world.faults.append(("overcurrent", first + 4, first + 6))
        placed += 1
    # Meter offline: three unanswered polls inside an aggregate interval that lies wholly in a
    # charging period (offline declared at the third, online again at the fourth poll).
    per_slot = AGGREGATE_INTERVAL_S // MINUTE_S
    placed = 0
    rng.shuffle(order)
    for index in order:
        if placed == counts["meter_offline"]:
            break
        _, (first, after) = periods[index]
        slot = -(-first // per_slot) * per_slot
        if slot + per_slot > after or not world.free(slot, slot + per_slot):
            continue
        for m in range(slot + 5, slot + 8):
            world.meter_answers[m] = False
        world.claim(slot, slot + per_slot)
        world.faults.append(("meter_offline", slot + 7, slot + 8))
        placed += 1
    # Pilot error: state E for two minutes while the car is connected and not charging.
    placed = 0
    rng.shuffle(order)
    for index in order:
        if placed == counts["pilot_error"]:
            break
        session, (first, after) = periods[index]
        if session.unplug - after < 6 or world.pilot[after + 4] != "B" or not world.free(after, after + 5):
            continue
        for m in range(after + 2, after + 4):
            world.pilot[m] = "E"
            world.advertised_a[m] = None
        world.claim(after, after + 5)
        world.faults.append(("pilot_error", after + 2, after + 4))
        placed += 1
    # Station unavailable: state F for two hours in a long daytime gap between sessions.
    gaps = [(a.unplug, b.plug) for a, b in zip(sessions, sessions[1:])]
    placed = 0
    for gap_start, gap_end in gaps:
        if placed == counts["evse_unavailable"]:
            break
        begin = gap_start + 30
        if gap_end - begin < 180 or not world.free(begin, begin + 121):
            continue
        for m in range(begin, begin + 120):
            world.pilot[m] = "F"
        world.claim(begin, begin + 121)
        world.faults.append(("evse_unavailable", begin, begin + 120))
        placed += 1
    # Supply voltage out of band on L1 for two readings, at a quiet moment.
    placed = 0
    for _ in range(200):
        if placed == counts["voltage_out_of_band"]:
            break
        m = rng.randint(60, world.minutes - 60)
        if world.pilot[m] != "A" or not world.free(m - 1, m + 3):
            continue
        world.l1_voltage[m] = world.l1_voltage[m + 1] = HIGH_V
        world.claim(m - 1, m + 3)
        world.faults.append(("voltage_out_of_band", m, m + 2))
        placed += 1
    world.faults.sort(key=lambda fault: fault[1])


class RecordingPublisher:
    """The station's publisher, also keeping the session end records and events the forwarder
    hands it; a record sent again after a reconnect counts once (by its seq)."""

    def __init__(self, publisher, topics):
        self.publisher = publisher
        self.session_topic = topics.session
        self.event_topic = topics.event
        self._ended = {}
        self._events = {}

    def __getattr__(self, name):  # start, stop, connected, connects, ...: the publisher's own
        return getattr(self.publisher, name)

    def publish(self, topic, payload, qos=0, retain=False):
        token = self.publisher.publish(topic, payload, qos, retain)
        if token is not None and topic in (self.session_topic, self.event_topic):
            doc = json.loads(payload)
            if topic == self.event_topic:
                self._events[doc["seq"]] = doc
            elif doc.get("event") == "end":
                self._ended[doc["seq"]] = doc
        return token

    def drain_acked(self):
        return self.publisher.drain_acked()

    @property
    def ended(self):
        """The session end records, in journal order."""
        return [self._ended[seq] for seq in sorted(self._ended)]

    @property
    def events(self):
        """Every event record (raised and cleared), in journal order."""
        return [self._events[seq] for seq in sorted(self._events)]


class NoMeterLine:
    """The meter's byte stream, never used: the readings come from the world, not over Modbus."""

    def write(self, data):
        raise RuntimeError("the simulated station feeds its readings directly")

    async def read(self, max_bytes, timeout_ms):
        raise RuntimeError("the simulated station feeds its readings directly")

    def reset_input(self):
        pass


class NoPins:
    """The pin bank handed to the input monitor, which is not run: inputs come from the world."""

    def read(self):
        raise RuntimeError("the simulated station feeds its inputs directly")


def _reading(world, minute, clock, register_wh, serial):
    draw = world.draw_w[minute]
    phases = world.phases[minute]
    volts = [world.l1_voltage[minute], NOMINAL_V, NOMINAL_V]
    power = [draw / phases if i < phases else 0.0 for i in range(3)]
    current = [power[i] / volts[i] for i in range(3)]
    return Reading(clock.time(), clock.monotonic_ms(), volts, current, power, draw, 50.0,
                   register_wh, energy_resolution_mwh(SDM630.energy_register, register_wh), serial)


def _deliver(agent, reading):
    """What the agent's poll loop does with a good reading (Agent._poll_loop)."""
    agent.latest = reading
    agent.engine.on_reading(reading)
    inputs = agent.engine.inputs
    agent.monitor.on_reading(reading, inputs.advertised_a if inputs else None)
    # The inputs come straight from the world, never half-way through a debounce: confirmed.
    agent.monitor.confirm(reading.monotonic_ms + agent.monitor.confirm_ms)
    finished = agent.aggregator.add(reading)
    if finished is not None:
        agent.outbox.record(AGGREGATE, finished)


def run_station(station_id, world, register_wh, station_dir, broker_host, broker_port, drain_timeout_s=60):
    """Drive one station's core through ``world``; returns (the recording publisher, journal last
    seq, signer)."""
    config = validate({
        "station_id": station_id,
        "meter": {"model": "sdm630", "port": "/dev/null"},
        "journal": {"dir": os.path.join(station_dir, "journal"),
                    "aggregate_interval_s": float(AGGREGATE_INTERVAL_S), "sync_interval_s": 900.0},
        "session": {"state_dir": os.path.join(station_dir, "state")},
        "signing": {"key_file": os.path.join(station_dir, "station-key.pem")},
        "mqtt": {"host": broker_host, "port": broker_port},
    })
    clock = FastClock(float(WEEK_START))
    signer = FileKeySigner(config["signing"]["key_file"])
    topics = Topics(config["mqtt"]["topic_prefix"], station_id)
    publisher = RecordingPublisher(MqttPublisher(config["mqtt"], topics.status), topics)
    publisher.start()
    journal = None
    try:
        if not publisher.wait_connected(10):
            raise RuntimeError("station %s: no connection to the broker at %s:%d (%s)"
                               % (station_id, broker_host, broker_port, publisher.last_error))
        agent = build_station(config, clock, Ports(NoMeterLine(), FileSystem, publisher, NoPins(), signer))
        journal = agent.outbox.journal
        forwarder = agent.forwarder
        outbox = agent.outbox
        meter = agent.meter
        link = meter.link
        reported = None
        last_inputs = None
        serial = 20000000 + sum(map(ord, station_id))
        meter.serial = serial
        for minute in range(world.minutes + 1):
            if minute:
                register_wh += int(world.draw_w[minute - 1]) // MINUTE_S
            clock.now = float(WEEK_START + minute * MINUTE_S)
            now_ms = clock.monotonic_ms()
            pilot = world.pilot[minute]
            closed = pilot == "C"
            key = (pilot, world.advertised_a[minute], closed)
            if key != last_inputs:
                agent.on_inputs(InputState(pilot, None, world.advertised_a[minute], False, closed, closed, now_ms),
                                now_ms)
                last_inputs = key
            agent.monitor.tick(now_ms)
            if world.meter_answers[minute]:
                link.record_success(now_ms)
            else:
                link.record_failure(TIMEOUT_TEXT, now_ms)
            if reported is not None and link.transitions != reported:
                agent._on_link_change(link)
            reported = link.transitions
            if world.meter_answers[minute]:
                _deliver(agent, _reading(world, minute, clock, register_wh, serial))
            journal.tick(now_ms)
            forwarder.pump()
        last = agent.aggregator.flush()
        if last is not None:
            outbox.record(AGGREGATE, last)
        journal.sync()
        written = journal.next_seq - 1
        deadline = time.monotonic() + drain_timeout_s
        while journal.acked < written:
            if time.monotonic() > deadline:
                raise RuntimeError("station %s: the broker acknowledged %d of %d records within %d s"
                                   % (station_id, journal.acked, written, drain_timeout_s))
            forwarder.pump()
            time.sleep(0.002)
        return publisher, written, signer
    finally:
        publisher.stop()
        if journal is not None:
            journal.close()


def _day_of(minute):
    return iso_utc(WEEK_START + (minute // DAY_MIN) * 86400)[:10]


def _iso_minute(minute):
    return iso_utc(WEEK_START + minute * MINUTE_S)


def ground_truth_of(station_id, sessions, world, register_wh, days):
    """The figures of one station, from its schedule and timeline only."""
    minutes = world.minutes
    day_names = [_day_of(d * DAY_MIN) for d in range(days)]
    truth_sessions = []
    sessions_per_day = dict.fromkeys(day_names, 0)
    billed_per_day = dict.fromkeys(day_names, 0)
    metered_per_day = dict.fromkeys(day_names, 0)
    register = [register_wh]
    for m in range(minutes):
        register.append(register[-1] + int(world.draw_w[m]) // MINUTE_S)
        metered_per_day[day_names[m // DAY_MIN]] += int(world.draw_w[m]) // MINUTE_S
    for number, session in enumerate(sessions, 1):
        charging_min = sum(1 for m in range(session.plug, session.unplug) if world.pilot[m] == "C")
        begin_wh = register[session.plug]
        end_wh = register[session.unplug]
        day = _day_of(session.plug)
        sessions_per_day[day] += 1
        billed_per_day[day] += end_wh - begin_wh
        truth_sessions.append({
            "session_id": "%s-%06d" % (station_id, number), "station": station_id,
            "plug_in": _iso_minute(session.plug), "unplug": _iso_minute(session.unplug),
            "begin_wh": begin_wh, "end_wh": end_wh, "energy_wh": end_wh - begin_wh,
            "plugged_s": (session.unplug - session.plug) * MINUTE_S,
            "charging_s": charging_min * MINUTE_S, "power_w": session.power_w,
            "charge_periods": len(session.periods)})
    connected = [False] * minutes
    for session in sessions:
        for m in range(session.plug, session.unplug):
            connected[m] = True
    faulted = [False] * minutes
    for kind, first, after in world.faults:
        if kind in STOPPING_EVENTS:
            for m in range(first, after):
                faulted[m] = True
    charging_min = sum(1 for m in range(minutes) if world.pilot[m] == "C")
    faulted_min = sum(faulted)
    idle_min = sum(1 for m in range(minutes) if connected[m] and not faulted[m] and world.pilot[m] != "C")
    utilisation = {"charging": charging_min * MINUTE_S, "connected_idle": idle_min * MINUTE_S,
                   "faulted": faulted_min * MINUTE_S,
                   "available": (minutes - charging_min - idle_min - faulted_min) * MINUTE_S}
    by_type = {}
    for kind, _, _ in world.faults:
        by_type[kind] = by_type.get(kind, 0) + 1
    events = [{"type": kind, "start": _iso_minute(first), "end": _iso_minute(after)}
              for kind, first, after in world.faults]
    return {
        "sessions": truth_sessions,
        "sessions_per_day": sessions_per_day,
        "billed_wh_per_day": billed_per_day,
        "metered_wh_per_day": metered_per_day,
        "utilisation_s": utilisation,
        "charge_periods": sum(len(s.periods) for s in sessions),
        "faults": {"total": len(world.faults), "by_type": by_type, "events": events},
        "register_start_wh": register_wh, "register_end_wh": register[-1],
    }


def hour_of_week(worlds, days):
    """7 x 24 figures (Monday first), each averaged over that hour's occurrences in the span:
    stations with a car plugged in, stations charging, and the fleet's mean power in W."""
    plugged = [[0.0] * 24 for _ in range(7)]
    charging = [[0.0] * 24 for _ in range(7)]
    power = [[0.0] * 24 for _ in range(7)]
    for world, sessions in worlds:
        connected = [False] * world.minutes
        for session in sessions:
            for m in range(session.plug, session.unplug):
                connected[m] = True
        for m in range(world.minutes):
            dow, hour = (m // DAY_MIN) % 7, (m % DAY_MIN) // 60
            if connected[m]:
                plugged[dow][hour] += 1
            if world.pilot[m] == "C":
                charging[dow][hour] += 1
            power[dow][hour] += world.draw_w[m]
    occurrences = [sum(1 for d in range(days) if d % 7 == dow) for dow in range(7)]
    result = {}
    for name, table in (("plugged", plugged), ("charging", charging), ("power_w", power)):
        result[name] = [[None if not occurrences[dow] else table[dow][hour] / 60.0 / occurrences[dow]
                         for hour in range(24)] for dow in range(7)]
    return result


def _check_against_core(station_id, truth, recorded):
    """Refuse a ground truth that the core's own records contradict."""
    ended = {doc["session_id"]: doc for doc in recorded.ended}
    for expected in truth["sessions"]:
        got = ended.get(expected["session_id"])
        if got is None:
            raise RuntimeError("station %s: session %s never ended in the core" % (station_id, expected["session_id"]))
        for field, value in (("energy_wh", expected["energy_wh"]), ("charging_s", expected["charging_s"]),
                             ("plugged_s", expected["plugged_s"]), ("plug_in", expected["plug_in"]),
                             ("unplug", expected["unplug"])):
            if got[field] != value:
                raise RuntimeError("station %s session %s: the core says %s=%r, the timeline %r"
                                   % (station_id, expected["session_id"], field, got[field], value))
        if got["begin"]["energy_wh"] != expected["begin_wh"] or got["end"]["energy_wh"] != expected["end_wh"]:
            raise RuntimeError("station %s session %s: core readings %s..%s Wh, timeline %s..%s Wh" % (
                station_id, expected["session_id"], got["begin"]["energy_wh"], got["end"]["energy_wh"],
                expected["begin_wh"], expected["end_wh"]))
        if got["flags"]:
            raise RuntimeError("station %s session %s: unexpected flags %s" % (station_id, expected["session_id"], got["flags"]))
    if len(ended) != len(truth["sessions"]):
        raise RuntimeError("station %s: the core ended %d sessions, the timeline has %d"
                           % (station_id, len(ended), len(truth["sessions"])))
    raised = {}
    for doc in recorded.events:
        raised.setdefault(doc["event_number"], doc)
        if doc["end"] is not None:
            raised[doc["event_number"]] = doc
    core = sorted((doc["type"], doc["start"], doc["end"]) for doc in raised.values())
    planned = sorted((e["type"], e["start"], e["end"]) for e in truth["faults"]["events"])
    if core != planned:
        raise RuntimeError("station %s: the core raised events %s, the timeline planned %s" % (station_id, core, planned))


def generate(broker_host, broker_port, workdir, stations=4, days=7, seed=7, progress=None):
    """Simulate ``stations`` stations for ``days`` days from Monday 2026-11-23T00:00Z and
    publish everything to the broker; returns the ground truth (also JSON-serialisable).

    ``workdir`` receives one directory per station (journal, state, private key) and the
    public keys as ``keys/<station>.pem``; it must not already hold those stations.
    ``progress(station_id)`` is called as each station is done.
    """
    if stations < 1:
        raise ValueError("stations must be at least 1, not %r" % (stations,))
    if days < 1:
        raise ValueError("days must be at least 1, not %r" % (days,))
    os.makedirs(os.path.join(workdir, "keys"), exist_ok=True)
    truth = {"start": iso_utc(WEEK_START), "end": iso_utc(WEEK_START + days * 86400), "days": days,
             "seed": seed, "reading_step_s": MINUTE_S, "aggregate_interval_s": AGGREGATE_INTERVAL_S,
             "weekdays": list(WEEKDAYS), "stopping_events": list(STOPPING_EVENTS),
             "stations": {}, "sessions": []}
    worlds = []
    heavy_index = 2 if stations > 2 else stations - 1
    for index in range(stations):
        station_id = "fleet-%02d" % (index + 1)
        station_dir = os.path.join(workdir, station_id)
        if os.path.exists(station_dir) and os.listdir(station_dir):
            raise ValueError("%s already holds a station's state: give an empty work directory" % station_dir)
        rng = random.Random("%s:%s" % (seed, station_id))
        sessions = plan_sessions(rng, days)
        world = build_world(sessions, days)
        place_faults(rng, world, sessions, heavy=index == heavy_index)
        register_wh = rng.randint(1000000, 5000000)
        station_truth = ground_truth_of(station_id, sessions, world, register_wh, days)
        recorded, written, signer = run_station(station_id, world, register_wh, station_dir, broker_host, broker_port)
        _check_against_core(station_id, station_truth, recorded)
        pem = signer.public_key_pem()
        key_path = os.path.join(workdir, "keys", station_id + ".pem")
        with open(key_path, "w") as handle:
            handle.write(pem)
        station_truth.update({"public_key_pem": pem, "public_key_hex": signer.public_key_hex(),
                              "public_key_file": key_path, "records": written,
                              "journal_dir": os.path.join(station_dir, "journal")})
        truth["sessions"].extend(station_truth.pop("sessions"))
        truth["stations"][station_id] = station_truth
        worlds.append((world, sessions))
        if progress is not None:
            progress(station_id)
    truth["hour_of_week"] = hour_of_week(worlds, days)
    return truth


def _broker_address(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("broker %r is not HOST:PORT" % text)
    return host, int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fleet_week", description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, type=_broker_address, help="HOST:PORT of the MQTT broker")
    parser.add_argument("--out", required=True, help="work directory: station journals, keys, ground_truth.json")
    parser.add_argument("--stations", type=int, default=4)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        truth = generate(args.broker[0], args.broker[1], args.out, args.stations, args.days, args.seed,
                         progress=lambda station: print("%s: published" % station, flush=True))
    except (ValueError, RuntimeError) as error:
        print("fleet_week: %s" % error, file=sys.stderr)
        return 1
    path = os.path.join(args.out, "ground_truth.json")
    with open(path, "w") as handle:
        json.dump(truth, handle, indent=1)
    print("%d sessions, %d records on %d stations in %.1f s; ground truth in %s" % (
        len(truth["sessions"]), sum(s["records"] for s in truth["stations"].values()),
        len(truth["stations"]), time.monotonic() - started, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
