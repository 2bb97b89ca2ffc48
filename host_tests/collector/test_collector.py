"""The fleet collector (evse-collector) against real mosquitto brokers, fed by the agent's own
core objects (session engine, journal, outbox, forwarder, MQTT publisher, a real P-256 key)
and by raw paho clients for what an agent never sends (redeliveries out of order, garbage).

The ingest tests run on SQLite and on a throwaway PostgreSQL cluster; the scale tests kill
a collector process mid-stream, split a fleet between two collectors of one MQTT 5 shared
subscription writing to one database, and collect through a bridged second broker.
"""

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from evse_agent.agent import event_doc
from evse_agent.aggregate import Aggregator
from evse_agent.config import validate
from evse_agent.events import Event
from evse_agent.forwarder import Forwarder
from evse_agent.journal import AGGREGATE, EVENT, SESSION, Journal
from evse_agent.messages import Outbox, Topics, iso_utc
from evse_agent.meter_models import SDM630
from evse_agent.pilot import InputState
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.mqtt import MqttPublisher
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_agent.reading import Reading
from evse_agent.session import SessionEngine
from evse_agent.store import StateStore
from evse_tools.testkit.broker import Mosquitto
from evse_tools.collector.ingest import Ingestor, Message
from evse_tools.collector.keys import pem_of, register_key
from evse_tools.collector.main import main as collector_main
from evse_tools.collector.main import status_doc
from evse_tools.collector.service import BrokerSettings, CollectorService
from evse_tools.collector.store import SQLITE_BUSY_TIMEOUT_MS, open_store
from evse_tools.testkit.postgres import PostgresCluster, find_bin_dir
from test_session_engine import Clock, Meter

SERIAL = 12345678


# -- a station made of the agent's core objects ---------------------------------------------------


class FleetStation:
    """One station's agent core on a real broker: a SessionEngine signing with a real key,
    events and aggregates, all journaled through the Outbox and published by the Forwarder
    over an MqttPublisher (QoS 1, cursor on PUBACK)."""

    def __init__(self, root, broker, station_id, signer=None):
        self.station_id = station_id
        self.clock = Clock()
        self.register_wh = 1_234_567
        config = validate({"station_id": station_id, "meter": {"model": "sdm630", "port": "x"},
                           "journal": {"dir": str(root / station_id / "journal")},
                           "session": {"state_dir": str(root / station_id / "state")},
                           "mqtt": {"port": broker.port}})
        self.topics = Topics("evse", station_id)
        self.journal = Journal(FileSystem(config["journal"]["dir"]), config["journal"], self.clock)
        self.journal.recover()
        self.publisher = MqttPublisher(config["mqtt"], self.topics.status)
        self.outbox = Outbox(self.publisher, station_id, self.journal)
        self.forwarder = Forwarder(self.journal, self.publisher, self.topics, self.clock, window=16)
        self.signer = signer or FileKeySigner(str(root / station_id / "key.pem"))
        identity = {"gateway_vendor": "evse-agent", "gateway_serial": station_id, "gateway_version": "0.1.0",
                    "meter_vendor": SDM630.vendor, "meter_model": SDM630.product}
        self.engine = SessionEngine(config, StateStore(FileSystem(config["session"]["state_dir"])),
                                    self.signer, self.clock, Meter(self.clock), self._publish,
                                    lambda: None, identity)
        self.aggregator = Aggregator(10, 3)
        self.events = 0
        self.publisher.start()
        assert self.publisher.wait_connected(10)

    def _publish(self, kind, doc):
        if kind == "session":
            self.outbox.record(SESSION, doc)
        else:
            self.outbox.post(self.topics.state, doc, qos=1, retain=True)

    def public_key_pem(self, root):
        path = root / ("%s.pem" % self.station_id)
        path.write_text(self.signer.public_key_pem())
        return path

    # -- the physical world, one second at a time -------------------------------------------

    def _inputs(self, pilot, closed):
        now = self.clock.monotonic_ms()
        self.engine.on_inputs(InputState(pilot, None, 16.0, False, closed, closed, now), now)

    def _second(self, power_w):
        self.clock.advance(1000)
        self.register_wh += int(power_w) // 3600
        reading = Reading(self.clock.time(), self.clock.monotonic_ms(), [230.0] * 3, [power_w / 690.0] * 3,
                          [power_w / 3] * 3, power_w, 50.0, self.register_wh, 1, SERIAL)
        self.engine.on_reading(reading)
        finished = self.aggregator.add(reading)
        if finished is not None:
            self.outbox.record(AGGREGATE, finished)

    def session(self, charge_s=10):
        """Plug in, charge at 10.8 kW (3 Wh/s), unplug: start, begin and end records."""
        self._inputs("A", False)
        self._second(0.0)
        self._inputs("B", False)
        self._second(0.0)
        self._inputs("C", True)
        for _ in range(charge_s):
            self._second(10800.0)
        self._inputs("B", False)
        self._second(0.0)
        self._inputs("A", False)
        self._second(0.0)

    def event(self, type_="voltage_out_of_band"):
        """An event raised and cleared: two records."""
        self.events += 1
        event = Event(self.events, type_, self.clock.time(), {"voltage_v": [199.0, 230.0, 230.0]})
        self.outbox.record(EVENT, event_doc(event))
        event.end = self.clock.time() + 2
        self.outbox.record(EVENT, event_doc(event))

    def idle(self, seconds):
        for _ in range(seconds):
            self._second(0.0)

    def telemetry(self):
        self.outbox.post(self.topics.telemetry, {"ts": iso_utc(self.clock.time()), "power_total_w": 0.0})

    def state(self):
        self.outbox.post(self.topics.state, {"pilot": "A", "charging": False})

    @property
    def written(self):
        return self.journal.next_seq - 1

    def flush(self, timeout_s=120):
        """Publish everything journaled and wait for the broker's PUBACKs."""
        self.journal.sync()
        deadline = time.monotonic() + timeout_s
        while self.journal.acked < self.written:
            assert time.monotonic() < deadline, "broker acknowledged %d of %d" % (self.journal.acked, self.written)
            self.forwarder.pump()
            time.sleep(0.005)

    def close(self):
        self.publisher.stop()
        self.journal.close()


@pytest.fixture
def stations(tmp_path):
    """Factory: ``stations(broker, "st-1")`` -> a FleetStation, closed after the test."""
    made = []

    def make(broker, station_id, **options):
        station = FleetStation(tmp_path, broker, station_id, **options)
        made.append(station)
        return station

    yield make
    for station in made:
        station.close()


# -- databases ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_cluster():
    try:
        find_bin_dir()
    except RuntimeError as error:
        pytest.skip(str(error))
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty collector database: a SQLite file, or a database of its own on the
    module's PostgreSQL cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    cluster = request.getfixturevalue("postgres_cluster")
    import psycopg
    name = "fleet_%d" % (int(time.monotonic() * 1e6) % 10 ** 12)
    with psycopg.connect(cluster.url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE %s" % name)
    return cluster.url.rsplit("/", 1)[0] + "/" + name


def rows(url, sql, params=()):
    with open_store(url) as store:
        return store.query(sql, params)


def scalar(url, sql, params=()):
    return rows(url, sql, params)[0][0]


def wait_until(predicate, timeout_s=120, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.05)


def stored_seqs(url, station):
    return [seq for (seq,) in rows(url, "SELECT seq FROM records WHERE station = ? ORDER BY seq", (station,))]


# -- collectors --------------------------------------------------------------------------------------


@pytest.fixture
def collector(db_url):
    """Factory: ``collector(broker, **settings)`` -> a CollectorService running in a thread
    (its own connection to ``db_url``), stopped after the test."""
    running = []

    def start(broker, **settings):
        settings.setdefault("client_id", "collector-test-%d" % len(running))
        store = open_store(db_url)
        service = CollectorService(BrokerSettings(host=broker.host, port=broker.port, **settings), store)
        service.start()
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        running.append((service, thread, store))
        assert service.wait_subscribed(60), "the collector did not subscribe"
        return service

    yield start
    for service, thread, store in running:
        service.stop()
        thread.join(10)
        store.close()


class CollectorProcess:
    """``evse-collector run`` as a process of its own."""

    def __init__(self, broker, db, *extra):
        self.args = [sys.executable, "-m", "evse_tools.collector.main", "run",
                     "--broker", "%s:%d" % (broker.host, broker.port), "--db", db] + list(extra)
        self.broker = broker
        self.client_id = extra[list(extra).index("--client-id") + 1]
        self.log = []
        self.start()

    def start(self):
        """Start the process and wait until the broker has its subscription in place."""
        subscribed_before = len(self.broker.subscriptions(self.client_id))
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._pump, args=(self.process.stderr,), daemon=True)
        self._reader.start()
        wait_until(lambda: len(self.broker.subscriptions(self.client_id)) > subscribed_before
                   or self.process.poll() is not None, timeout_s=60, what="collector process to subscribe")
        assert self.process.poll() is None, "\n".join(self.log)

    def _pump(self, stream):
        for line in stream:
            self.log.append(line.rstrip("\n"))

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(60) == 0, "\n".join(self.log)
        self._reader.join(5)


@pytest.fixture
def collector_processes():
    started = []

    def start(*args):
        process = CollectorProcess(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.kill()


# -- raw MQTT --------------------------------------------------------------------------------------


class RawPublisher:
    """A plain paho client for messages an agent would never send as they are."""

    def __init__(self, broker):
        self.client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="")
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        self.sent = 0

    def publish(self, topic, payload, qos=1):
        if not isinstance(payload, (bytes, str)):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(5)
        self.sent += 1

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw(broker):
    publisher = RawPublisher(broker)
    yield publisher
    publisher.close()


def aggregate(station, seq, minute):
    start = "2026-11-25T06:%02d:00.000Z" % minute
    return {"kind": "aggregate", "start": start, "end": start.replace(":00.000Z", ":10.000Z"), "samples": 10,
            "power_total_w": {"min": 1.0, "avg": 2.0, "max": 3.0}, "energy_wh_first": 100,
            "energy_wh_last": 101, "station": station, "seq": seq}


def counter(url, name):
    found = rows(url, "SELECT value FROM counters WHERE name = ?", (name,))
    return found[0][0] if found else 0


# -- ingest: SQLite and PostgreSQL ------------------------------------------------------------------


def test_every_record_type_is_stored_once_and_sessions_verify(broker, stations, collector, db_url, tmp_path):
    """Sessions (start, begin, end with signed readings), events (raise and clear),
    aggregates and the live messages of one station: every journaled record stored once,
    the session merged into one verified row whose energy is the signed register delta."""
    station = stations(broker, "st-1")
    with open_store(db_url) as store:
        register_key(store, "st-1", pem_of(str(station.public_key_pem(tmp_path))))
    collector(broker)
    station.session(charge_s=12)
    station.event()
    station.idle(25)
    station.session(charge_s=5)
    station.state()
    station.flush()
    written = station.written
    wait_until(lambda: len(stored_seqs(db_url, "st-1")) == written, what="all records stored")

    assert stored_seqs(db_url, "st-1") == list(range(1, written + 1))
    types = dict(rows(db_url, "SELECT type, COUNT(*) FROM records GROUP BY type"))
    assert types["session"] == 6 and types["event"] == 2 and types["aggregate"] >= 4
    sessions = rows(db_url, "SELECT session_id, seq_start, seq_end, energy_wh, end_wh - begin_wh, verified, "
                            "verify_error, charging_s, flags FROM sessions ORDER BY session_id")
    assert [s[0] for s in sessions] == ["st-1-000001", "st-1-000002"]
    first, second = sessions
    assert first[3] == first[4] == 36 and second[3] == second[4] == 15  # 3 Wh per charging second
    assert [s[5] for s in sessions] == [1, 1] and [s[6] for s in sessions] == [None, None]
    assert first[1] < first[2] and first[7] == pytest.approx(12.0, abs=1.0)
    assert json.loads(first[8]) == []
    events = rows(db_url, 'SELECT event_number, type, state, "end" IS NULL FROM events ORDER BY seq')
    assert events == [(1, "voltage_out_of_band", "active", 1), (1, "voltage_out_of_band", "cleared", 0)]
    power = rows(db_url, "SELECT MAX(power_max_w), SUM(energy_wh_end - energy_wh_start) FROM aggregates "
                         "WHERE kind = 'aggregate'")
    assert power[0][0] == 10800.0 and 0 < power[0][1] <= 51
    assert rows(db_url, "SELECT * FROM gaps") == []
    wait_until(lambda: scalar(db_url, "SELECT journal_seq FROM stations WHERE station = 'st-1'") == written,
               what="the state message's journal_seq")
    assert scalar(db_url, "SELECT status FROM stations WHERE station = 'st-1'") == "online"
    assert counter(db_url, "stored") == written and counter(db_url, "duplicates") == 0
    assert counter(db_url, "malformed") == 0


def test_redelivered_and_out_of_order_records_are_stored_once_and_gaps_tracked(broker, raw, collector, db_url):
    """QoS 1 duplicates and records arriving out of order (raw paho) are stored once; the
    seqs never received are gaps until they arrive, and a summary's covers_seq accounts
    for the aggregates it folded."""
    collector(broker)
    topic = "evse/st-2/aggregate"
    for seq in (3, 1, 2, 2, 3, 1, 5, 8):
        raw.publish(topic, aggregate("st-2", seq, seq))
    wait_until(lambda: counter(db_url, "received") == 8, what="8 deliveries")
    assert stored_seqs(db_url, "st-2") == [1, 2, 3, 5, 8]
    assert counter(db_url, "duplicates") == 3
    assert rows(db_url, "SELECT first_seq, last_seq FROM gaps ORDER BY first_seq") == [(4, 4), (6, 7)]
    detected = scalar(db_url, "SELECT detected_at FROM gaps WHERE first_seq = 6")

    raw.publish(topic, aggregate("st-2", 7, 7))  # late: the gap shrinks, keeps its first sighting
    wait_until(lambda: rows(db_url, "SELECT first_seq, last_seq, detected_at FROM gaps ORDER BY first_seq")
               == [(4, 4, rows(db_url, "SELECT detected_at FROM gaps WHERE first_seq = 4")[0][0]), (6, 6, detected)],
               what="the gap 6..7 to shrink to 6")
    summary = {"kind": "summary", "covers_seq": [[4, 4], [6, 6]], "aggregates": 2, "start": "2026-11-25T06:04:00.000Z",
               "end": "2026-11-25T06:06:10.000Z", "power_total_w": {"min": 1, "avg": 2, "max": 3},
               "station": "st-2", "seq": 9}
    raw.publish(topic, summary)
    raw.publish(topic, summary)
    wait_until(lambda: rows(db_url, "SELECT * FROM gaps") == [], what="the summary to close the gaps")
    assert rows(db_url, "SELECT kind, aggregates, covers_seq FROM aggregates WHERE seq = 9") == [
        ("summary", 2, "[[4, 4], [6, 6]]")]
    assert stored_seqs(db_url, "st-2") == [1, 2, 3, 5, 7, 8, 9]


def test_a_lasting_gap_is_logged_and_a_passing_one_is_not(broker, raw, collector, db_url, caplog):
    """A hole closed before the report interval (a late record, or a share-group neighbour's
    batch) is not logged; one still open after it is, with the stations and records missing."""
    caplog.set_level(logging.WARNING, logger="evse.collector")
    service = collector(broker)
    raw.publish("evse/st-8/aggregate", aggregate("st-8", 1, 0))
    raw.publish("evse/st-8/aggregate", aggregate("st-8", 3, 0))
    wait_until(lambda: stored_seqs(db_url, "st-8") == [1, 3], what="the records around the hole")
    raw.publish("evse/st-8/aggregate", aggregate("st-8", 2, 0))  # late: the hole closes
    raw.publish("evse/st-8/aggregate", aggregate("st-8", 6, 0))  # a new hole of 4..5 that stays
    wait_until(lambda: stored_seqs(db_url, "st-8") == [1, 2, 3, 6], what="the late record")
    assert rows(db_url, "SELECT first_seq, last_seq FROM gaps WHERE station = 'st-8'") == [(4, 5)]
    assert not [r for r in caplog.records if "st-8" in r.getMessage() or "miss" in r.getMessage()]
    service.gap_report_s = 0.2  # from the next report on
    service._next_gap_report = 0
    wait_until(lambda: any("1 station(s) miss 2 record(s)" in r.getMessage() for r in caplog.records),
               what="the lasting gap's report")


def test_a_restarted_collector_takes_up_the_gaps_from_the_database(db_url):
    """A new Ingestor (a restarted or second collector, empty cache) on a database with
    gaps: records filling them, and a summary covering the rest, bring the gaps to none."""
    def deliver(*seqs, summary=None):
        messages = [Message("evse/st-9/aggregate", json.dumps(aggregate("st-9", seq, seq)).encode()) for seq in seqs]
        if summary is not None:
            messages.append(Message("evse/st-9/aggregate", json.dumps(summary).encode()))
        with open_store(db_url) as store:
            return Ingestor(store).store_batch(messages)

    deliver(1, 2, 3, 5, 8, 10)
    assert rows(db_url, "SELECT first_seq, last_seq FROM gaps ORDER BY first_seq") == [(4, 4), (6, 7), (9, 9)]
    result = deliver(6, 6, 2)
    assert (result.stored, result.duplicates) == (1, 2)
    assert rows(db_url, "SELECT first_seq, last_seq FROM gaps ORDER BY first_seq") == [(4, 4), (7, 7), (9, 9)]
    deliver(summary={"kind": "summary", "covers_seq": [[4, 4], [7, 7]], "aggregates": 2, "station": "st-9",
                     "seq": 11, "start": "2026-11-25T06:04:00.000Z", "end": "2026-11-25T06:07:10.000Z"})
    assert rows(db_url, "SELECT first_seq, last_seq FROM gaps") == [(9, 9)]
    deliver(9)
    assert rows(db_url, "SELECT * FROM gaps") == []
    assert stored_seqs(db_url, "st-9") == [1, 2, 3, 5, 6, 8, 9, 10, 11]


def test_tampered_and_unkeyed_documents_are_stored_but_flagged(broker, raw, stations, collector, db_url,
                                                               tmp_path):
    """A session record with one changed byte in a signed reading, one whose energy does not
    match its signed registers, and the sessions of a station without a registered key:
    all stored, each flagged with the reason; registering the key later verifies them."""
    keyed = stations(broker, "st-3")
    unkeyed = stations(broker, "st-4")
    with open_store(db_url) as store:
        register_key(store, "st-3", pem_of(str(keyed.public_key_pem(tmp_path))))
    collector(broker)
    keyed.session()
    unkeyed.session()
    keyed.flush()
    unkeyed.flush()
    wait_until(lambda: scalar(db_url, "SELECT COUNT(*) FROM sessions WHERE seq_end IS NOT NULL") == 2,
               what="both sessions ended")
    end = json.loads(scalar(db_url, "SELECT payload FROM records WHERE station = 'st-3' AND seq = "
                                    "(SELECT seq_end FROM sessions WHERE station = 'st-3')"))

    tampered = dict(end, session_id="st-3-900001", seq=1001)
    document = end["ocmf_end"]
    at = document.rindex('"RV":') + len('"RV":') + 1
    tampered["ocmf_end"] = document[:at] + ("0" if document[at] != "0" else "1") + document[at + 1:]
    tampered["ocmf_documents"] = [end["ocmf_begin"], tampered["ocmf_end"]]
    raw.publish("evse/st-3/session", tampered)
    inflated = dict(end, session_id="st-3-900002", seq=1002, energy_wh=end["energy_wh"] + 1)
    raw.publish("evse/st-3/session", inflated)
    wait_until(lambda: scalar(db_url, "SELECT COUNT(*) FROM sessions") == 4, what="the forged sessions")

    verdicts = dict((sid, (verified, error)) for sid, verified, error in rows(
        db_url, "SELECT session_id, verified, verify_error FROM sessions"))
    assert verdicts["st-3-000001"] == (1, None)
    assert verdicts["st-3-900001"][0] == 0 and "document 2 of 2: signature INVALID" in verdicts["st-3-900001"][1]
    assert verdicts["st-3-900002"][0] == 0 and "differs from the signed registers" in verdicts["st-3-900002"][1]
    assert verdicts["st-4-000001"] == (0, "no public key registered for station st-4")
    status = status_doc(open_store(db_url))
    assert {u["session_id"] for u in status["unverified_sessions"]} == {"st-3-900001", "st-3-900002", "st-4-000001"}

    assert collector_main(["register-key", "--db", db_url, "st-4", str(unkeyed.public_key_pem(tmp_path))]) == 0
    assert rows(db_url, "SELECT verified, verify_error FROM sessions WHERE station = 'st-4'") == [(1, None)]


def test_malformed_messages_are_counted_and_skipped(broker, raw, collector, db_url):
    """Garbage between good records: each bad message is logged and counted (fleet-wide and
    for its station), the collector keeps running and every good record is stored."""
    service = collector(broker)
    bad = [
        ("evse/st-5/aggregate", b"{not json"),
        ("evse/st-5/aggregate", b"[1, 2, 3]"),
        ("evse/st-5/aggregate", {"kind": "aggregate", "station": "st-5"}),  # no seq
        ("evse/st-5/aggregate", dict(aggregate("st-5", 1, 1), seq="2")),  # seq as text
        ("evse/st-5/aggregate", aggregate("st-6", 3, 1)),  # another station's record on st-5's topic
        ("evse/st-5/aggregate", dict(aggregate("st-5", 4, 1), start=None)),  # no start
        ("evse/st-5/session", {"event": "end", "station": "st-5", "seq": 5}),  # no session_id
        ("evse/st-5/event", {"type": 7, "station": "st-5", "seq": 6}),  # type not text
        ("evse/st-5/status", b"maybe"),
        ("evse/st-5/state", b"\xff\xfe"),
        ("evse/st-5/session", '{"event": "start", "session_id": "\\ud800", "station": "st-5", "seq": 7}'),
        ("evse/st-5/aggregate", "[" * 100000 + "]" * 100000),
    ]
    good = 0
    for number, (topic, payload) in enumerate(bad):
        raw.publish(topic, payload)
        good += 1
        raw.publish("evse/st-5/aggregate", aggregate("st-5", 100 + number, number))
    raw.publish("evse/st-5/selftest", b"probe")  # the console's round trip: not subscribed
    raw.publish("evse/st-5/telemetry", b"\xff\xfe")  # live values: not subscribed either
    raw.publish("evse/st-5/aggregate", aggregate("st-5", 150, 0))
    good += 1
    # one writer stores and counts batches in order: once the last is counted, so is all before it
    wait_until(lambda: counter(db_url, "received") >= len(bad) + good and 150 in stored_seqs(db_url, "st-5"),
               what="the record after the unsubscribed channels")
    assert counter(db_url, "received") == len(bad) + good
    assert counter(db_url, "malformed") == len(bad)
    assert counter(db_url, "ignored") == 0
    assert stored_seqs(db_url, "st-5") == list(range(100, 100 + good - 1)) + [150]
    assert scalar(db_url, "SELECT malformed FROM stations WHERE station = 'st-5'") == len(bad)
    assert service.totals.malformed == len(bad)
    raw.publish("evse/st-5/aggregate", aggregate("st-5", 200, 0))  # still collecting
    wait_until(lambda: 200 in stored_seqs(db_url, "st-5"), what="a record after the garbage")


def test_a_session_holding_the_whole_prefix_is_narrowed_to_the_stored_channels(broker, raw, collector, db_url):
    """A broker session made when the collector subscribed to every channel (``evse/+/#``)
    is resumed: the old filter is dropped, so telemetry no longer reaches the collector."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    former = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="collector-former",
                         protocol=paho.MQTTv5)
    former.connect(broker.host, broker.port, 30, clean_start=False, properties=properties)
    former.loop_start()
    subscribed = threading.Event()
    former.on_subscribe = lambda *args: subscribed.set()
    former.subscribe("evse/+/#", qos=1)
    assert subscribed.wait(30)
    former.disconnect()
    former.loop_stop()
    collector(broker, client_id="collector-former")
    raw.publish("evse/st-7/telemetry", {"power_total_w": 1.0, "station": "st-7"})
    raw.publish("evse/st-7/aggregate", aggregate("st-7", 1, 0))
    wait_until(lambda: counter(db_url, "received") >= 1 and stored_seqs(db_url, "st-7") == [1],
               what="the aggregate")
    assert counter(db_url, "received") == 1 and counter(db_url, "live") == 0


# -- scale: restarts, shared subscriptions, bridges ----------------------------------------------------------


def publish_in_background(station, records, stop):
    """Journal and publish ``records`` aggregates and events from a thread, paced, until done."""
    def work():
        for n in range(records):
            if stop.is_set():
                return
            if n % 10 == 0:
                station.event()
            station.idle(10)  # one aggregate per 10 s of station time
            station.journal.sync()
            station.forwarder.pump()
            time.sleep(0.004)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def join_publishers(threads):
    """Wait for the publishing threads; the stations' journals are not shared with them after."""
    for thread in threads:
        thread.join(300)
        assert not thread.is_alive(), "a station is still publishing after 300 s"


def test_collector_killed_while_the_fleet_publishes_loses_nothing(broker, stations, collector_processes, tmp_path):
    """SIGKILL of the collector process three times while two stations keep publishing, and
    once while it waits for a locked database; each restart resumes the persistent session
    and the broker delivers what it held: every record is stored once, without gaps."""
    db = str(tmp_path / "fleet.db")
    fleet = [stations(broker, "kill-1"), stations(broker, "kill-2")]
    process = collector_processes(broker, db, "--client-id", "collector-kill")
    stop = threading.Event()
    threads = [publish_in_background(station, 150, stop) for station in fleet]
    for _ in range(3):
        # Kill once the collector has stored something new, restart once the fleet has
        # published more meanwhile: each kill lands mid-stream, however slow the machine.
        stored = scalar(db, "SELECT COUNT(*) FROM records")
        wait_until(lambda: not all(thread.is_alive() for thread in threads)
                   or scalar(db, "SELECT COUNT(*) FROM records") > stored, what="the collector to store more")
        process.kill()
        published = [station.journal.next_seq for station in fleet]
        wait_until(lambda: not all(thread.is_alive() for thread in threads)
                   or [station.journal.next_seq for station in fleet] != published,
                   what="the fleet to publish while the collector is down")
        process.start()
    join_publishers(threads)
    # Now the kill comes while the collector holds delivered messages it cannot commit (the
    # database is locked): it must not have acknowledged them, so the broker delivers again.
    blocker = sqlite3.connect(db)
    blocker.execute("BEGIN IMMEDIATE")
    for station in fleet:
        station.event()
        station.idle(30)
        station.flush()
    failures = sum("storing" in line and "failed" in line for line in process.log)
    wait_until(lambda: sum("storing" in line and "failed" in line for line in process.log) > failures,
               timeout_s=SQLITE_BUSY_TIMEOUT_MS / 1000 + 120, what="the collector to meet the locked database")
    process.kill()
    blocker.rollback()
    blocker.close()
    process.start()
    for station in fleet:
        wait_until(lambda: len(stored_seqs(db, station.station_id)) == station.written,
                   what="every record of %s" % station.station_id)
        assert stored_seqs(db, station.station_id) == list(range(1, station.written + 1))
    assert rows(db, "SELECT * FROM gaps") == []
    process.stop()


def test_two_collectors_of_a_share_group_store_the_union_once(broker, stations, collector_processes, db_url):
    """Two collector processes in one $share group on one database: the broker splits the
    messages between them, together they store every record exactly once."""
    first = collector_processes(broker, db_url, "--group", "fleet", "--client-id", "collector-a")
    second = collector_processes(broker, db_url, "--group", "fleet", "--client-id", "collector-b")
    fleet = [stations(broker, "share-%d" % n) for n in range(3)]
    stop = threading.Event()
    threads = [publish_in_background(station, 60, stop) for station in fleet]
    join_publishers(threads)
    for station in fleet:
        station.flush()
    total = sum(station.written for station in fleet)
    wait_until(lambda: scalar(db_url, "SELECT COUNT(*) FROM records") == total, what="the union")
    for station in fleet:
        assert stored_seqs(db_url, station.station_id) == list(range(1, station.written + 1))
    assert rows(db_url, "SELECT * FROM gaps") == []
    first.stop()
    second.stop()
    stored = [int(line.split(" stored ")[1].split(",")[0]) for process in (first, second)
              for line in process.log if "collector stopped:" in line]
    assert len(stored) == 2 and all(count > 0 for count in stored) and sum(stored) == total


def test_collector_on_a_bridged_broker_receives_every_record(broker, stations, collector, db_url):
    """Stations publish to one mosquitto; a second one bridges evse/# in from it (QoS 1) and
    the collector subscribes there: every record arrives."""
    with Mosquitto(bridge_to=broker) as edge:
        service = collector(edge)
        probe = RawPublisher(broker)  # the bridge is up once a message crosses it
        wait_until(lambda: probe.publish("evse/probe/aggregate", aggregate("probe", 1, 0)) or
                   service.totals.received > 0, what="the bridge")
        probe.close()
        station = stations(broker, "bridged-1")
        station.session()
        station.event()
        station.idle(40)
        station.flush()
        wait_until(lambda: len(stored_seqs(db_url, "bridged-1")) == station.written, what="bridged records")
        assert stored_seqs(db_url, "bridged-1") == list(range(1, station.written + 1))
        assert scalar(db_url, "SELECT COUNT(*) FROM sessions WHERE seq_end IS NOT NULL") == 1


def test_a_record_the_database_refuses_is_skipped_alone(postgres_cluster):
    """PostgreSQL refuses a NUL character in text: the batch's multi-row insert fails, the
    batch is stored again one record at a time, and only that record is counted malformed."""
    import psycopg
    name = "refuse_%d" % (int(time.monotonic() * 1e6) % 10 ** 12)
    with psycopg.connect(postgres_cluster.url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE %s" % name)
    url = postgres_cluster.url.rsplit("/", 1)[0] + "/" + name

    def event(seq, kind):
        body = {"station": "st-1", "seq": seq, "type": kind, "severity": "warning", "state": "raised",
                "start": "2026-11-01T00:00:00.000Z"}
        return Message("evse/st-1/event", json.dumps(body).encode())

    with open_store(url) as store:
        result = Ingestor(store).store_batch([event(1, "meter_offline"), event(2, "bad\u0000type"),
                                              event(3, "meter_online")])
        assert (result.stored, result.malformed) == (2, 1)
        assert store.query("SELECT seq FROM records ORDER BY seq") == [(1,), (3,)]
        assert store.query("SELECT seq, type FROM events ORDER BY seq") == [(1, "meter_offline"), (3, "meter_online")]
        assert store.query("SELECT first_seq, last_seq FROM gaps") == [(2, 2)]
        assert store.scalar("SELECT malformed FROM stations WHERE station = 'st-1'") == 1


@settings(max_examples=60, deadline=None)
@given(plan=st.data())
def test_session_rows_are_the_newest_record_whatever_the_order_and_batches(plan):
    """Start, begin and end records of several sessions delivered in any order, in batches of
    any size, some twice: each ``sessions`` row holds the values of its highest-seq record and
    the seqs of its start and end records, as if they had come one by one in order."""
    records = []
    seq = 0
    for number in range(plan.draw(st.integers(1, 3), label="sessions")):
        session_id = "st-1-%06d" % (number + 1)
        events = plan.draw(st.sets(st.sampled_from(("start", "begin", "end")), min_size=1), label="events")
        for event in ("start", "begin", "end"):
            seq += 1  # a record not delivered leaves its seq unused
            if event in events:
                records.append({"station": "st-1", "seq": seq, "event": event, "session_id": session_id,
                                "plug_in": "2026-11-01T00:%02d:00.000Z" % number, "energy_wh": seq * 10,
                                "flags": [event], "ts": "2026-11-01T01:00:00.000Z"})
    delivered = plan.draw(st.permutations(records), label="order")
    delivered += plan.draw(st.lists(st.sampled_from(records), max_size=3), label="redelivered")
    with tempfile.TemporaryDirectory() as directory:
        url = os.path.join(directory, "fleet.db")
        with open_store(url) as store:
            ingestor = Ingestor(store)
            while delivered:
                size = plan.draw(st.integers(1, len(delivered)), label="batch")
                batch, delivered = delivered[:size], delivered[size:]
                ingestor.store_batch([Message("evse/st-1/session", json.dumps(body).encode()) for body in batch])
            found = store.query("SELECT session_id, seq_start, seq_end, seq_last, energy_wh, plug_in, flags "
                                "FROM sessions ORDER BY session_id")
    expected = []
    for session_id in sorted({body["session_id"] for body in records}):
        mine = [body for body in records if body["session_id"] == session_id]
        newest = max(mine, key=lambda body: body["seq"])
        seqs = {body["event"]: body["seq"] for body in mine}
        expected.append((session_id, seqs.get("start"), seqs.get("end"), newest["seq"], newest["energy_wh"],
                         newest["plug_in"], json.dumps(newest["flags"])))
    assert found == expected


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.data())
def test_a_share_groups_collectors_storing_at_once_keep_each_record_once_and_the_gaps_current(
        postgres_cluster, plan):
    """Collectors of a share group get records of every station in any order, some twice (a
    redelivery to another member): storing at once on one PostgreSQL, every delivered record is
    stored once, ``gaps`` names exactly the seqs never delivered, and each session row merges
    its start and end whichever collector stored them."""
    import psycopg
    name = "group_%d" % (int(time.monotonic() * 1e6) % 10 ** 12)
    with psycopg.connect(postgres_cluster.url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE %s" % name)
    url = postgres_cluster.url.rsplit("/", 1)[0] + "/" + name
    members = plan.draw(st.integers(2, 4), label="collectors")
    stations = ["st-%d" % i for i in range(plan.draw(st.integers(1, 5), label="stations"))]
    delivered = {}
    session_end = {}
    deliveries = [[] for _ in range(members)]
    for station in stations:
        last = plan.draw(st.integers(2, 40), label="records")
        kept = plan.draw(st.sets(st.integers(1, last), min_size=1), label="delivered seqs")
        delivered[station] = kept
        session_end[station] = last
        for seq in range(1, last + 1):
            if seq not in kept:
                continue
            if seq in (1, last):
                body = {"station": station, "seq": seq, "event": "start" if seq == 1 else "end",
                        "session_id": "s-1", "ts": "2026-11-01T00:00:%02d.000Z" % (seq % 60)}
                channel = "session"
            else:
                body = {"station": station, "seq": seq, "type": "meter_offline", "severity": "warning",
                        "state": "raised", "start": "2026-11-01T00:00:00.000Z"}
                channel = "event"
            message = Message("evse/%s/%s" % (station, channel), json.dumps(body).encode())
            for member in plan.draw(st.sets(st.integers(0, members - 1), min_size=1, max_size=2), label="to"):
                deliveries[member].append(message)
    batches = []
    for member in range(members):
        order = plan.draw(st.permutations(deliveries[member]), label="order")
        sizes = []
        while sum(sizes) < len(order):
            sizes.append(plan.draw(st.integers(1, 30), label="batch"))
        batches.append([order[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))])
    failures = []
    ready = threading.Barrier(members)

    def collect(member):
        try:
            with open_store(url) as store:
                ingestor = Ingestor(store)
                ready.wait(timeout=60)
                for batch in batches[member]:
                    ingestor.store_batch(batch)
        except Exception as error:  # reported by the test below, not lost in the thread
            failures.append(error)

    threads = [threading.Thread(target=collect, args=(member,)) for member in range(members)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for station in stations:
        kept = delivered[station]
        assert [seq for (seq,) in rows(url, "SELECT seq FROM records WHERE station = ? ORDER BY seq",
                                       (station,))] == sorted(kept)
        missing = [seq for seq in range(1, max(kept)) if seq not in kept]
        runs = []
        for seq in missing:
            if runs and runs[-1][1] == seq - 1:
                runs[-1][1] = seq
            else:
                runs.append([seq, seq])
        assert [list(gap) for gap in rows(url, "SELECT first_seq, last_seq FROM gaps WHERE station = ? "
                                               "ORDER BY first_seq", (station,))] == runs
        session = rows(url, "SELECT seq_start, seq_end, seq_last FROM sessions WHERE station = ?", (station,))
        last = session_end[station]
        ends = [seq for seq in (1, last) if seq in kept]
        assert session == ([(1 if 1 in kept else None, last if last in kept else None, max(ends))]
                           if ends else [])
    received = sum(len(d) for d in deliveries)
    assert dict(rows(url, "SELECT name, value FROM counters")).get("received") == received
