"""Fault injection with real parts: promises 1 and 2 of DESIGN.md under broker crashes, agent
crashes (kill -9) and a full disk.

Every scenario runs the real evse-agent process against the pty meter simulator, the vehicle
simulator's pin file and real mosquitto processes. A consumer de-duplicates the journaled
records (session, event, aggregate) by ``seq`` with tools/collector/consumer.SequenceTracker and keeps
the first payload of each seq, so a redelivery with different content is caught.
"""

import errno
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SIM_BOARD, mounted_tmpfs, station_args, wait_for
from evse_agent import journal as journal_mod
from evse_tools.cli import ocmf_verify
from evse_tools.testkit.broker import Mosquitto
from evse_tools.collector.consumer import SequenceTracker
from evse_tools.testkit.subscriber import Collector
from evse_tools.sim.vehicle_sim import VehicleSim

STATION = "sim-001"
JOURNALED = ("session", "event", "aggregate")

FAST = ("--quiet", "--set", "meter.poll_interval_s=0.2", "--set", "meter.timeout_ms=150",
        "--set", "meter.retries=1", "--set", "meter.offline_after=2",
        "--set", "mqtt.telemetry_interval_s=1", "--set", "io.pilot.sample_ms=10",
        "--set", "io.pilot.debounce_ms=40", "--set", "events.overcurrent_grace_s=1",
        "--set", "events.contactor_check_ms=300")

RECOVERY_LINE = re.compile(r"journal: (\d+) segments, (\d+) records, next seq (\d+), "
                           r"acknowledged up to (\d+)(?:, torn tail (\d+) bytes)?(?:, (\d+) damaged)?")


# -- helpers ---------------------------------------------------------------------------------

class JournalConsumer:
    """What a fleet consumer sees of one station's journaled records (any thread)."""

    def __init__(self):
        self.tracker = SequenceTracker()
        self.lock = threading.Lock()
        self.payloads = {}  # seq -> raw payload of its first delivery
        self.conflicts = []  # (seq, first payload, later different payload)
        self.accepted = []  # (seq, channel, body) of first deliveries, in arrival order
        self.deliveries = 0
        self.malformed = []
        self.live_journal_seq = []  # (monotonic time, journal_seq) of live telemetry

    def __call__(self, message):
        channel = message.topic.rsplit("/", 1)[-1]
        body = message.body
        if channel == "telemetry" and isinstance(body, dict):
            with self.lock:
                self.live_journal_seq.append((time.monotonic(), body.get("journal_seq")))
            return
        if channel not in JOURNALED:
            return
        with self.lock:
            self.deliveries += 1
            if not isinstance(body, dict) or not isinstance(body.get("seq"), int) \
                    or body.get("station") != STATION:
                self.malformed.append(message.payload)
                return
            seq = body["seq"]
            first = self.payloads.setdefault(seq, bytes(message.payload))
            if first != bytes(message.payload):
                self.conflicts.append((seq, first, bytes(message.payload)))
            if self.tracker.accept_message(body):
                self.accepted.append((seq, channel, body))

    # -- views --

    def state(self):
        return self.tracker.stations.get(STATION)

    def contiguous(self):
        state = self.state()
        return 0 if state is None else state.contiguous

    def records(self, channel):
        with self.lock:
            return sorted(((seq, body) for seq, ch, body in self.accepted if ch == channel),
                          key=lambda item: item[0])

    def events(self):
        return [body for _, body in self.records("event")]

    def latest_live_seq(self, after):
        with self.lock:
            seqs = [seq for received, seq in self.live_journal_seq if received > after and seq is not None]
        return seqs[-1] if seqs else None

    def wait_caught_up(self, timeout_s=60, settle_s=1.5):
        """Wait until every seq up to what the agent had journaled ``settle_s`` ago (its live
        telemetry says so) has been received; returns that seq."""
        deadline = time.monotonic() + timeout_s
        mark = time.monotonic()
        target = None
        while time.monotonic() < deadline:
            if target is None:
                if time.monotonic() - mark >= settle_s:
                    target = self.latest_live_seq(mark)
            elif self.contiguous() >= target:
                return target
            time.sleep(0.1)
        return target if target is not None and self.contiguous() >= target else None

    def assert_gapless(self):
        """Every seq from 1 to the highest received at least once, accepted exactly once, with
        the same payload every time."""
        state = self.state()
        assert state is not None, "no journaled record received at all"
        highest = self.tracker.highest(STATION)
        assert self.tracker.gaps(STATION) == [], "missing seqs %s" % self.tracker.gaps(STATION)
        assert state.contiguous == highest
        assert state.accepted == highest, "accepted %d records for seqs 1..%d" % (state.accepted, highest)
        with self.lock:
            seqs = [seq for seq, _, _ in self.accepted]
            assert sorted(seqs) == list(range(1, highest + 1))
            assert not self.conflicts, "seq delivered twice with different content: %r" % (self.conflicts[:2],)
            assert not self.malformed, "journaled message without seq/station: %r" % (self.malformed[:2],)
        return highest


def PersistentCollector(host, port, client_id, on_message=None, topic="evse/#"):
    """A Collector with a persistent MQTT session (fixed client id, clean_session False), so the
    broker queues QoS 1 messages for it while it reconnects; it reconnects quickly."""
    return Collector(host, port, topic, qos=1, on_message=on_message, client_id=client_id,
                     clean_session=False, reconnect_delay=(0.1, 0.3))


def public_key(station_dir):
    """The station's public key (hex DER) as ``evse-agent --public-key`` prints it."""
    result = subprocess.run([sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", SIM_BOARD,
                             "--public-key"] + station_args(station_dir),
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return ocmf_verify.load_public_key(result.stdout.strip())


def assert_session_verifies(end, key):
    """Every OCMF document of the session verifies (tools/cli/ocmf_verify), the documents form
    one session, and the signed energy is the billed energy."""
    documents = end["ocmf_documents"]
    assert documents, end
    parsed = []
    for text in documents:
        document = ocmf_verify.Document(text)
        document.verify(key)  # raises ocmf_verify.Invalid
        parsed.append(document)
    billed, _ = ocmf_verify.check_session(parsed)
    assert billed == end["energy_wh"]


def assert_one_session(consumer):
    """Exactly one start, begin and end after de-duplication, in seq order, one session id."""
    sessions = consumer.records("session")
    assert [body["event"] for _, body in sessions] == ["start", "begin", "end"], \
        [(seq, body["event"]) for seq, body in sessions]
    assert len({body["session_id"] for _, body in sessions}) == 1
    return {body["event"]: body for _, body in sessions}


def assert_events_once_in_order(consumer):
    """Each event's raise and clear arrive once (after de-duplication), the raise first."""
    events = consumer.records("event")
    keys = [(body["event_number"], body["state"]) for _, body in events]
    assert len(keys) == len(set(keys)), keys
    seq_of = {(body["event_number"], body["state"]): seq for seq, body in events}
    for (number, state), seq in seq_of.items():
        if state == "cleared" and (number, "active") in seq_of:
            assert seq_of[(number, "active")] < seq, "event %d cleared (seq %d) before raised (seq %d)" % (
                number, seq, seq_of[(number, "active")])


def agent_tail(agent, lines=60):
    return "\n".join(agent.stderr[-lines:])


def register_wh(meter):
    return meter.snapshot()["energy_wh"]


def wait_register_settled(meter, timeout_s=60):
    """The register once it stopped moving (contactor open: the last power step is counted)."""
    last = register_wh(meter)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = register_wh(meter)
        if now == last:
            return now
        last = now
    return last


@pytest.fixture
def vehicle_and_meter(meter_sim, station_dir):
    """The vehicle simulator's pin file and a meter simulator whose load follows it."""
    station_dir.mkdir(parents=True, exist_ok=True)
    pin_file = str(station_dir / "pins.json")
    vehicle = VehicleSim(pin_file, advertised_a=16.0)
    meter = meter_sim("sdm630", pin_file=pin_file)
    meter.physics.noise = False
    return vehicle, meter


# -- 1. broker killed and restarted ----------------------------------------------------------

@pytest.fixture
def persistent_broker():
    """mosquitto with persistence whose saved state holds the consumer's persistent session,
    taken once (clean stop) before the faults: every kill -9 / restart brings the consumer's
    subscription back before any client reconnects. No limit on QoS 1 messages in flight to
    the consumer, so the broker passes each message on as it accepts it instead of holding
    it in a queue that a crash would lose: a record lost in a crash is the agent's to re-send."""
    broker = Mosquitto(persistence=True)
    with open(broker.config_path, "a") as conf:
        conf.write("max_inflight_messages 0\nmax_queued_messages 0\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_broker_killed_and_restarted_20_times_during_a_session(persistent_broker, vehicle_and_meter,
                                                                 agent_process, station_dir):
    """Promises 1 and 2 across 20 broker crashes (kill -9) at random moments of a session:
    every journaled seq arrives (gapless, each accepted once, identical on redelivery), the
    session records and events arrive exactly once in seq order, billing equals the register
    delta and every OCMF document verifies."""
    broker = persistent_broker
    vehicle, meter = vehicle_and_meter
    consumer = JournalConsumer()
    collector = PersistentCollector(broker.host, broker.port, "durability-consumer", consumer)
    try:
        # Save the consumer's session in the broker's persistence file (clean stop writes it).
        broker.stop()
        broker.start()
        assert wait_for(collector.client.is_connected, 60)
        agent = agent_process(broker, meter.device, *FAST,
                              "--set", "journal.aggregate_interval_s=0.2",
                              "--set", "journal.sync_interval_s=0.2",
                              "--set", "journal.cursor_sync_s=0.5",
                              "--set", "mqtt.reconnect_min_s=0.5", "--set", "mqtt.reconnect_max_s=1")
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"],
                                  timeout_s=60) is not None, agent.log()
        assert wait_for(lambda: consumer.contiguous() >= 2, 60), agent.log()

        rng = random.Random(20240611)
        kills = []
        killer_error = []

        def killer():
            try:
                for _ in range(20):
                    time.sleep(rng.uniform(0.3, 1.5))
                    # The consumer is back (its queued messages were written to it) before the
                    # next crash: what the broker lost in a crash is the agent's to re-send.
                    if not wait_for(collector.client.is_connected, 60):
                        raise AssertionError("consumer did not reconnect")
                    broker.kill()
                    kills.append(time.monotonic())
                    time.sleep(rng.uniform(0.05, 0.8))
                    broker.start()
            except BaseException as error:  # reported by the main thread
                killer_error.append(error)

        register_at_plug = register_wh(meter)
        thread = threading.Thread(target=killer, name="broker-killer", daemon=True)
        thread.start()
        script = random.Random(7)
        vehicle.plug()
        time.sleep(1.0)
        overcurrent_done = False
        started = time.monotonic()
        while thread.is_alive() and time.monotonic() - started < 60:
            if not overcurrent_done and time.monotonic() - started > 8:
                # The car draws more than advertised: an overcurrent event raised and cleared.
                vehicle.advertise(10.0)
                vehicle.draw(16.0)
                raised = sum("event overcurrent raised" in line for line in agent.stderr)
                vehicle.charge()
                # Until the agent raised it (past its grace time), however slow the machine.
                assert wait_for(lambda: sum("event overcurrent raised" in line for line in agent.stderr) > raised,
                                60), agent_tail(agent)
                vehicle.pause()
                vehicle.draw(None)
                vehicle.advertise(16.0)
                overcurrent_done = True
            else:
                vehicle.charge()
                time.sleep(script.uniform(0.8, 2.5))
                vehicle.pause()
            time.sleep(script.uniform(0.4, 1.2))
        vehicle.unplug()
        thread.join(60)
        assert not thread.is_alive(), "broker killer did not finish"
        assert not killer_error, killer_error
        assert len(kills) == 20
        register_at_end = wait_register_settled(meter)

        assert collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "end",
                                  timeout_s=60) is not None, agent_tail(agent)
        caught_up = consumer.wait_caught_up(timeout_s=60)
        assert caught_up is not None, "consumer has seqs up to %d only\n%s" % (consumer.contiguous(),
                                                                               agent_tail(agent))
        assert agent.alive(), agent_tail(agent)
        highest = consumer.assert_gapless()
        assert highest >= caught_up
        assert consumer.deliveries >= highest

        records = assert_one_session(consumer)
        end = records["end"]
        assert end["begin"]["energy_wh"] == register_at_plug
        assert end["end"]["energy_wh"] == register_at_end
        assert end["energy_wh"] == register_at_end - register_at_plug > 0

        # Every event exactly once (raise and clear), raise before clear in seq order; the
        # session record lists the events raised during it.
        assert_events_once_in_order(consumer)
        events = consumer.events()
        overcurrent = [e["state"] for e in events if e["type"] == "overcurrent"]
        assert overcurrent == ["active", "cleared"], [(e["type"], e["state"]) for e in events]
        raised = {e["event_number"] for e in events if e["state"] == "active"}
        assert {e["number"] for e in end["events"]} <= raised

        key = public_key(station_dir)
        for record in records.values():
            for text in record["ocmf_documents"]:
                ocmf_verify.Document(text).verify(key)
        assert_session_verifies(end, key)
        assert records["begin"]["ocmf_begin"] == end["ocmf_begin"]
        print("broker kills: %d, highest seq %d, %d deliveries (%d redelivered), agent connects %d"
              % (len(kills), highest, consumer.deliveries, consumer.deliveries - highest,
                 sum("MQTT connected" in line for line in agent.stderr)))
    finally:
        collector.close()


# -- 2. agent killed with SIGKILL 100 times --------------------------------------------------

def scan_journal(directory):
    """Every segment of a journal directory through journal.scan: (records by seq, problems).

    A problem is a damaged stretch anywhere, a torn frame in any segment but the last, or seqs
    not increasing across segments."""
    names = sorted(n for n in os.listdir(directory)
                   if n.startswith(journal_mod.SEGMENT_PREFIX) and n.endswith(journal_mod.SEGMENT_SUFFIX))
    by_seq = {}
    problems = []
    torn_last = 0
    previous = 0
    for index, name in enumerate(names):
        with open(os.path.join(directory, name), "rb") as handle:
            data = handle.read()
        records, torn, corrupt = journal_mod.scan(data)
        if corrupt:
            problems.append("%s: %d damaged stretch(es)" % (name, corrupt))
        if torn is not None:
            if index == len(names) - 1:
                torn_last = len(data) - torn
            else:
                problems.append("%s: torn frame at %d in a segment that is not the last" % (name, torn))
        for record in records:
            if record.seq <= previous:
                problems.append("%s: seq %d after %d" % (name, record.seq, previous))
            previous = max(previous, record.seq)
            if json.loads(record.payload).get("seq") != record.seq:
                problems.append("%s: record seq %d holds a message with seq %r"
                                % (name, record.seq, json.loads(record.payload).get("seq")))
            by_seq[record.seq] = record.payload
    return by_seq, problems, torn_last


def test_agent_killed_100_times_loses_and_alters_nothing(broker, vehicle_and_meter, agent_process, station_dir):
    """Promise 1 across 100 kill -9 of the agent (tiny segments, journal traffic every poll):
    each restart recovers (only a torn tail is ever cut, nothing damaged), no seq is reused
    with other content on disk or on the wire, the consumer's seqs are gapless, and the one
    session survives every crash with billing equal to the register delta."""
    vehicle, meter = vehicle_and_meter
    consumer = JournalConsumer()
    collector = Collector(broker.host, broker.port, "evse/#", on_message=consumer)
    journal_dir = str(station_dir / "journal")
    extra = FAST + ("--set", "meter.poll_interval_s=0.1",
                    "--set", "journal.aggregate_interval_s=0.1", "--set", "journal.segment_bytes=2048",
                    "--set", "journal.cursor_sync_s=0.1", "--set", "journal.sync_interval_s=0.1",
                    "--set", "mqtt.reconnect_min_s=0.2", "--set", "mqtt.reconnect_max_s=1")
    rng = random.Random(100)
    recoveries = []  # the parsed "journal:" recovery line of every start
    on_disk = {}  # seq -> payload ever seen in a segment file
    reused = []
    disk_problems = []
    torn_tails = []  # bytes of torn final frame found after each kill (and after the clean stop)
    agents = []

    def start():
        """Start the agent; returns once it logged its recovery ("journal: ...")."""
        agent = agent_process(broker, meter.device, *extra)
        agents.append(agent)
        line = wait_for(lambda: next((m for m in map(RECOVERY_LINE.search, list(agent.stderr)) if m), None), 60,
                        interval_s=0.01)
        assert line is not None, "no 'journal:' line\n%s" % agent.log()
        recoveries.append(line)
        return agent

    def check_disk(when):
        by_seq, problems, torn = scan_journal(journal_dir)
        disk_problems.extend("%s: %s" % (when, p) for p in problems)
        torn_tails.append(torn)
        for seq, payload in by_seq.items():
            if on_disk.setdefault(seq, payload) != payload:
                reused.append((when, seq))

    try:
        agent = start()
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"],
                                  timeout_s=60) is not None, agent.log()
        register_at_plug = register_wh(meter)
        vehicle.plug()
        begin = collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "begin",
                                   timeout_s=60)
        assert begin is not None, agent.log()
        session_id = begin.body["session_id"]
        vehicle.charge()
        charging = True
        for run in range(100):
            time.sleep(rng.uniform(0.1, 0.6))
            agent.kill()
            check_disk("after kill %d" % (run + 1))
            if rng.random() < 0.25:  # the car goes on charging / pausing while the agent is down
                (vehicle.pause if charging else vehicle.charge)()
                charging = not charging
            agent = start()
        if charging:
            vehicle.pause()
        time.sleep(1.0)
        vehicle.unplug()
        register_at_end = wait_register_settled(meter)
        assert collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "end",
                                  timeout_s=60) is not None, agent_tail(agent)
        if consumer.wait_caught_up(timeout_s=60) is None:
            pytest.fail("consumer has seqs up to %d only, missing %s, collector connected %s, %d messages, "
                        "last %.1f s ago\nrecoveries:\n%s\nlogs:\n%s" % (
                consumer.contiguous(), consumer.tracker.gaps(STATION), collector.client.is_connected(),
                len(collector.messages), time.monotonic() - collector.messages[-1].received,
                "\n".join(m.group(0) for m in recoveries),
                "\n----\n".join(a.log() for a in agents[-3:])))
        assert agent.stop() == 0, agent_tail(agent)
        check_disk("after the clean stop")
    finally:
        collector.close()

    # Every restart reported its recovery, never a damaged record, never a reused seq.
    assert len(recoveries) == 101
    highest = consumer.assert_gapless()
    for run, match in enumerate(recoveries):
        segments, records, next_seq, acked, torn, damaged = match.groups()
        assert damaged is None, "run %d: %s" % (run, match.group(0))
        assert int(acked) < int(next_seq)
        if run:  # the torn tail left by kill number ``run`` is what this recovery cut
            assert int(torn or 0) == torn_tails[run - 1], "run %d: %s" % (run, match.group(0))
    assert torn_tails[-1] == 0  # after the clean stop
    next_seqs = [int(m.group(3)) for m in recoveries]
    assert next_seqs == sorted(next_seqs)
    assert not disk_problems, disk_problems[:5]
    assert not reused, "seqs on disk rewritten with other content: %s" % reused[:5]
    for seq, payload in on_disk.items():
        if seq in consumer.payloads:
            assert consumer.payloads[seq] == payload, "seq %d differs between disk and wire" % seq

    assert_events_once_in_order(consumer)
    records = assert_one_session(consumer)
    end = records["end"]
    assert end["session_id"] == session_id
    assert "agent_restarted" in end["flags"]
    assert end["begin"]["energy_wh"] == register_at_plug
    assert end["end"]["energy_wh"] == register_at_end
    assert end["energy_wh"] == register_at_end - register_at_plug > 0
    assert_session_verifies(end, public_key(station_dir))
    print("agent kills: %d restarts (%d with unacknowledged records to replay), highest seq %d, "
          "%d deliveries, torn tails %d" % (
              len(recoveries) - 1, sum(1 for m in recoveries if int(m.group(4)) < int(m.group(3)) - 1),
              highest, consumer.deliveries, sum(1 for t in torn_tails if t)))


# -- 3. disk full ----------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(station_dir):
    """A 128 KiB tmpfs mounted at the station's journal directory (root only)."""
    with mounted_tmpfs(station_dir / "journal", "128k") as path:
        yield path


def fill(directory, name="filler"):
    """Write a file until the file system refuses (ENOSPC); returns its size."""
    path = os.path.join(directory, name)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
        # The last partial page: fill it byte-wise too.
        while True:
            try:
                if os.write(fd, b"\0") != 1:
                    break
                written += 1
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return path, written


def test_disk_full_keeps_records_in_memory_and_loses_nothing(broker, vehicle_and_meter, agent_process,
                                                             station_dir, small_tmpfs):
    """Promise 1 when the journal's disk is full: a disk_error event is published, polling and
    live telemetry go on, session records are still delivered (from memory); once space is
    freed the alarm clears, the held records reach the disk as they were sent, and no seq is
    missing. The alarm is raised once and cleared once, raise before clear."""
    vehicle, meter = vehicle_and_meter
    consumer = JournalConsumer()
    collector = Collector(broker.host, broker.port, "evse/#", on_message=consumer)
    journal_dir = str(small_tmpfs)
    segment = os.path.join(journal_dir, journal_mod.segment_name(1))
    agent = None

    def disk_errors():
        return [(seq, body["event_number"], body["state"]) for seq, body in consumer.records("event")
                if body["type"] == "disk_error"]

    try:
        # One big segment (never rotated, never deleted): the disk stays full until we free it.
        agent = agent_process(broker, meter.device, *FAST,
                              "--set", "journal.aggregate_interval_s=0.5",
                              "--set", "journal.max_bytes=16777216", "--set", "journal.reserve_bytes=1048576",
                              "--set", "journal.segment_bytes=15728640",
                              "--set", "journal.cursor_sync_s=0.1", "--set", "journal.sync_interval_s=0.1")
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"],
                                  timeout_s=60) is not None, agent.log()
        assert wait_for(lambda: consumer.contiguous() >= 3, 60), agent.log()
        journaled_before = consumer.contiguous()

        # The disk fills up while the segment's last page (tmpfs: 4 KiB) still has room for a
        # record or two, as it mostly will in the field.
        assert wait_for(lambda: os.path.getsize(segment) % 4096 <= 4096 - 1600, 60)
        filler, _ = fill(journal_dir)
        filled_at = time.monotonic()
        alarm = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] in ("disk_error", "journal_full")
                                   and m.body["state"] == "active", timeout_s=60)
        assert alarm is not None, "no disk_error event with the disk full\n%s" % agent_tail(agent)
        assert alarm.body["type"] == "disk_error", alarm.body
        assert wait_for(lambda: any("cannot write seq" in line for line in agent.stderr), 60), agent_tail(agent)

        register_at_plug = register_wh(meter)
        vehicle.plug()
        seen = len(collector.on("telemetry"))
        vehicle.charge()
        assert wait_for(lambda: any((m.body["power_total_w"] or 0) > 1000 and (m.body["session_energy_wh"] or 0) >= 2
                                    for m in collector.on("telemetry")[seen:]), 60), agent_tail(agent)
        seen = len(collector.on("state"))
        vehicle.pause()
        assert wait_for(lambda: any(m.body["contactor_feedback"] is False for m in collector.on("state")[seen:]),
                        60), agent_tail(agent)
        vehicle.unplug()
        register_at_end = wait_register_settled(meter)
        end = collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "end", timeout_s=60)
        assert end is not None, "session end not delivered while the disk is full\n%s" % agent_tail(agent)
        # Still full: the agent kept polling and publishing live telemetry all along.
        assert wait_for(lambda: len([m for m in collector.on("telemetry") if m.received > filled_at]) >= 6, 60)
        telemetry = [m for m in collector.on("telemetry") if m.received > filled_at]
        assert [m.body["ts"] for m in telemetry] == sorted({m.body["ts"] for m in telemetry})
        assert all(m.body["energy_wh"] is not None for m in telemetry)
        assert agent.alive()
        assert os.path.exists(filler)
        while_full = disk_errors()
        log_while_full = agent_tail(agent, 30)

        os.remove(filler)
        freed_at = time.monotonic()
        cleared = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "disk_error"
                                     and m.body["state"] == "cleared" and m.received > freed_at, timeout_s=60)
        assert cleared is not None, "disk_error not cleared after space was freed\n%s" % agent_tail(agent)
        assert consumer.wait_caught_up(timeout_s=60) is not None, agent_tail(agent)
        assert agent.stop() == 0, agent_tail(agent)
    finally:
        collector.close()
        if agent is not None and agent.alive():
            agent.stop()

    highest = consumer.assert_gapless()
    assert highest > journaled_before
    records = assert_one_session(consumer)
    end = records["end"]
    assert end["begin"]["energy_wh"] == register_at_plug
    assert end["end"]["energy_wh"] == register_at_end
    assert end["energy_wh"] == register_at_end - register_at_plug > 0
    assert_session_verifies(end, public_key(station_dir))
    # Everything the consumer got, held in memory or not, is now on disk as it was sent.
    by_seq, problems, torn = scan_journal(journal_dir)
    assert not problems and not torn, problems
    on_disk = sorted(by_seq)
    assert on_disk == list(range(1, on_disk[-1] + 1))
    assert on_disk[-1] >= highest
    for seq in range(1, highest + 1):
        assert by_seq[seq] == consumer.payloads[seq], "seq %d on disk differs from what was sent" % seq

    # The alarm: raised once while the disk was full, cleared once after space was freed, and
    # the raise of each event number comes before its clear.
    every = disk_errors()
    assert [state for _, _, state in while_full] == ["active"], \
        "disk_error events (seq, number, state) while the disk was still full: %s\n%s" % (while_full, log_while_full)
    assert [state for _, _, state in every] == ["active", "cleared"], every
    assert every[0][1] == every[1][1] == cleared.body["event_number"]
