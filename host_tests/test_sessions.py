"""Charging sessions end to end: vehicle simulator + pty meter + real mosquitto + evse-agent.

Each scenario checks the published session record, that billing energy is exactly the
meter register's delta, and that every OCMF document verifies with the station's public
key — with a verifier written here on `cryptography`, not the agent's signing code — and
fails after a one-byte change.
"""

import json
import subprocess
import sys
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from conftest import ROOT, SIM_BOARD, station_args
from evse_tools.vehicle_sim import VehicleSim

FAST = ("--quiet", "--set", "meter.poll_interval_s=0.2", "--set", "meter.timeout_ms=150",
        "--set", "meter.retries=1", "--set", "meter.offline_after=2",
        "--set", "mqtt.telemetry_interval_s=1", "--set", "io.pilot.sample_ms=10",
        "--set", "io.pilot.debounce_ms=40", "--set", "events.overcurrent_grace_s=1",
        "--set", "events.contactor_check_ms=300")


def verify_ocmf(document, public_key_hex):
    """True if the OCMF document's signature verifies over its payload section."""
    assert document.startswith("OCMF|"), document[:20]
    payload, signature = document[len("OCMF|"):].rsplit("|", 1)
    signature = json.loads(signature)
    assert signature.get("SA", "ECDSA-secp256r1-SHA256") == "ECDSA-secp256r1-SHA256"
    key = load_der_public_key(bytes.fromhex(public_key_hex))
    try:
        key.verify(bytes.fromhex(signature["SD"]), payload.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def ocmf_readings(document):
    payload = document[len("OCMF|"):].rsplit("|", 1)[0]
    return json.loads(payload)["RD"]


def public_key(station_dir):
    result = subprocess.run([sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", SIM_BOARD,
                             "--public-key"] + station_args(station_dir),
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_documents_verify(record, key_hex):
    documents = record["ocmf_documents"]
    assert documents and record["ocmf_begin"] == documents[0] and record["ocmf_end"] == documents[-1]
    for document in documents:
        assert verify_ocmf(document, key_hex), document
        # One changed byte inside the payload breaks the signature.
        cut = document.index('"RV":') + 5
        tampered = document[:cut] + ("9" if document[cut] != "9" else "8") + document[cut + 1:]
        assert not verify_ocmf(tampered, key_hex)


class Station:
    """One simulated charge point: meter simulator, vehicle, agent and a subscriber."""

    def __init__(self, broker, collector, meter_sim, agent_process, station_dir, model="sdm630",
                 energy_wh=1234567, extra=()):
        station_dir.mkdir(parents=True, exist_ok=True)
        self.pin_file = str(station_dir / "pins.json")
        self.vehicle = VehicleSim(self.pin_file, advertised_a=16.0)
        self.meter = meter_sim(model, pin_file=self.pin_file, energy_wh=energy_wh)
        self.meter.physics.noise = False
        self.broker = broker
        self.collector = collector
        self.agent_process = agent_process
        self.extra = tuple(extra)
        self.agent = self.start_agent()

    def start_agent(self):
        agent = self.agent_process(self.broker, self.meter.device, *(FAST + self.extra))
        state = self.collector.wait_for(lambda m: m.topic.endswith("/state") and m.body
                                        and m.body["meter_online"], timeout_s=15)
        assert state is not None, agent.log()
        return agent

    def session_message(self, event, after=0.0, timeout_s=15):
        message = self.collector.wait_for(
            lambda m: m.topic.endswith("/session") and m.body["event"] == event and m.received > after,
            timeout_s=timeout_s)
        assert message is not None, "no session %s message\n%s" % (event, self.agent.log())
        return message

    def event(self, type_, timeout_s=10):
        message = self.collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == type_,
                                          timeout_s=timeout_s)
        assert message is not None, "no %s event\n%s" % (type_, self.agent.log())
        return message.body

    def register_wh(self):
        return self.meter.snapshot()["energy_wh"]


@pytest.fixture
def station(broker, collector, meter_sim, agent_process, station_dir):
    def make(**options):
        return Station(broker, collector, meter_sim, agent_process, station_dir, **options)
    return make


def _charge(station, seconds):
    station.vehicle.charge()
    time.sleep(seconds)


def test_normal_session(station, station_dir):
    """Plug in, charge, car full (pause), unplug: durations, maxima, exact energy, signed readings."""
    st = station()
    register_at_plug = st.register_wh()
    st.vehicle.plug()
    start = st.session_message("start").body
    begin = st.session_message("begin").body
    assert begin["begin"]["energy_wh"] == register_at_plug
    _charge(st, 2.0)
    st.vehicle.pause()
    time.sleep(0.6)
    unplugged = time.monotonic()
    st.vehicle.unplug()
    end = st.session_message("end").body
    register_at_end = st.register_wh()

    assert end["session_id"] == start["session_id"] == begin["session_id"]
    assert end["begin"]["energy_wh"] == register_at_plug
    assert end["end"]["energy_wh"] == register_at_end
    assert end["energy_wh"] == register_at_end - register_at_plug > 0
    assert 1.5 <= end["charging_s"] <= 2.6
    assert end["idle_s"] == pytest.approx(end["plugged_s"] - end["charging_s"], abs=0.15)
    assert 10000 < end["max_power_w"] < 12000
    assert all(15.5 < c < 16.5 for c in end["max_current_a"])
    assert end["avg_power_w"] == pytest.approx(end["energy_wh"] * 3600 / end["charging_s"], rel=0.01)
    assert end["flags"] == []
    key = public_key(station_dir)
    assert_documents_verify(end, key)
    begin_rd = ocmf_readings(end["ocmf_begin"])
    end_rd = ocmf_readings(end["ocmf_end"])
    assert [r["TX"] for r in begin_rd] == ["B"] and begin_rd[0]["RV"] == register_at_plug
    assert [r["TX"] for r in end_rd] == ["B", "E"] and end_rd[1]["RV"] == register_at_end
    # The retained state goes out live as the unplug is seen; the end record goes through the
    # journal, so either may reach the broker first.
    state = st.collector.wait_for(lambda m: m.topic.endswith("/state") and m.body["pilot"] == "A"
                                  and m.body["session_id"] is None and m.received > unplugged)
    assert state is not None and state.body["charging"] is False


def test_pause_and_resume_counts_both_charging_periods(station):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    _charge(st, 1.0)
    st.vehicle.pause()
    time.sleep(1.0)
    _charge(st, 1.0)
    st.vehicle.pause()
    time.sleep(0.5)
    st.vehicle.unplug()
    end = st.session_message("end").body
    assert 1.6 <= end["charging_s"] <= 2.6
    assert end["idle_s"] >= 1.0
    assert end["segments"] == 1
    assert end["energy_wh"] == end["end"]["energy_wh"] - end["begin"]["energy_wh"] == \
        st.register_wh() - end["begin"]["energy_wh"]


def test_unplug_while_charging_takes_the_end_reading_after_the_contactor_opens(station):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    _charge(st, 1.5)
    st.vehicle.unplug()
    end = st.session_message("end").body
    time.sleep(0.5)
    assert end["end"]["energy_wh"] == st.register_wh()  # nothing flowed after the end reading
    assert end["energy_wh"] == st.register_wh() - end["begin"]["energy_wh"] > 0


def test_meter_offline_at_end_takes_the_next_good_reading_and_flags_it(station, station_dir):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    _charge(st, 1.0)
    st.vehicle.pause()
    time.sleep(0.5)
    st.meter.set_fault("silent")
    time.sleep(1.2)  # declared offline
    st.vehicle.unplug()
    time.sleep(1.0)
    assert not st.collector.on("session") or all(m.body["event"] != "end" for m in st.collector.on("session"))
    st.meter.set_fault(None)
    end = st.session_message("end").body
    assert "end_delayed" in end["flags"]
    assert end["end"]["energy_wh"] == st.register_wh()
    assert end["energy_wh"] == st.register_wh() - end["begin"]["energy_wh"]
    assert_documents_verify(end, public_key(station_dir))


def test_meter_replaced_mid_session_bills_each_meter_separately(station, station_dir):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    _charge(st, 1.0)
    st.meter.set_fault("silent")  # a technician swaps the meter: the line is dead meanwhile
    time.sleep(1.2)
    old_last = st.register_wh()
    st.meter.replace_meter(serial=87654321, energy_wh=500)
    st.meter.set_fault(None)
    time.sleep(1.0)
    st.vehicle.pause()
    time.sleep(0.5)
    st.vehicle.unplug()
    end = st.session_message("end").body
    assert "meter_replaced" in end["flags"]
    assert end["segments"] == 2
    old_part = end["begin"]["energy_wh"]
    new_end = st.register_wh()
    assert end["end"]["energy_wh"] == new_end
    assert end["end"]["serial"] == 87654321
    # The old meter is billed up to its last reading, the new one from its first: what flowed
    # while the line was dead is not billed (and flagged), nothing is billed twice or negative.
    assert end["energy_wh"] <= (old_last - old_part) + (new_end - 500)
    assert end["energy_wh"] >= new_end - 500 - 2
    assert len(end["ocmf_documents"]) == 4
    assert_documents_verify(end, public_key(station_dir))


def test_agent_killed_mid_session_continues_with_exact_energy(station):
    st = station()
    st.vehicle.plug()
    begin = st.session_message("begin").body
    _charge(st, 1.0)
    st.agent.kill()
    time.sleep(1.0)  # the car keeps charging while the agent is down
    st.agent = st.start_agent()
    time.sleep(1.0)
    st.vehicle.pause()
    time.sleep(0.5)
    st.vehicle.unplug()
    end = st.session_message("end").body
    assert end["session_id"] == begin["session_id"]
    assert "agent_restarted" in end["flags"]
    assert end["begin"]["energy_wh"] == begin["begin"]["energy_wh"]
    assert end["energy_wh"] == st.register_wh() - begin["begin"]["energy_wh"]
    # The restart may send records again whose acknowledgement was not yet saved (QoS 1,
    # at least once); by seq there is exactly one start.
    starts = {m.body["seq"] for m in st.collector.on("session") if m.body["event"] == "start"}
    assert len(starts) == 1


def test_welded_contactor_is_reported(station):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    st.vehicle.weld(True)
    _charge(st, 0.5)
    st.vehicle.pause()
    event = st.event("contactor_welded")
    assert event["severity"] == "critical" and event["state"] == "active"
    assert event["values"] == {"command": False, "feedback": True}
    st.vehicle.weld(False)
    st.vehicle.unplug()
    end = st.session_message("end").body
    assert "contactor_welded" in [e["type"] for e in end["events"]]


def test_overcurrent_beyond_the_grace_time_is_reported(station):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    st.vehicle.advertise(10.0)
    st.vehicle.draw(16.0)
    _charge(st, 0.2)
    event = st.event("overcurrent")
    assert event["severity"] == "critical"
    assert event["values"]["advertised_a"] == pytest.approx(10.0, abs=0.1)
    assert event["values"]["current_a"] > 11.0
    st.vehicle.pause()
    cleared = st.collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "overcurrent"
                                    and m.body["state"] == "cleared")
    assert cleared is not None
