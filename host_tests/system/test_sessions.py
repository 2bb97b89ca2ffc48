"""Charging sessions end to end: vehicle simulator + pty meter + real mosquitto + evse-agent.

Each scenario checks the published session record, that billing energy is exactly the
meter register's delta, and that every OCMF document verifies with the station's public
key — with a verifier written here on `cryptography`, not the agent's signing code — and
fails after a one-byte change.
"""

import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from conftest import ROOT, SIM_BOARD, station_args, wait_for
from evse_tools.sim.vehicle_sim import VehicleSim

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
        seen = len(self.collector.messages)  # this agent's state, not a previous one's
        state = self.collector.wait_for(lambda m: m.topic.endswith("/state") and m.body
                                        and m.body["meter_online"] and m in self.collector.messages[seen:],
                                        timeout_s=60)
        assert state is not None, agent.log()
        return agent

    def session_message(self, event, after=0.0, timeout_s=60):
        message = self.collector.wait_for(
            lambda m: m.topic.endswith("/session") and m.body["event"] == event and m.received > after,
            timeout_s=timeout_s)
        assert message is not None, "no session %s message\n%s" % (event, self.agent.log())
        return message

    def event(self, type_, timeout_s=60):
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


def _charge(station, wh=2):
    """The car charges until the agent has read ``wh`` of session energy flowing at power."""
    station.vehicle.charge()
    _latest_state(station, lambda state: state["charging"], "charging")
    first = [m for m in station.collector.on("telemetry")]
    telemetry = _wait(lambda: next((m for m in station.collector.on("telemetry")[len(first):]
                                    if m.body["session_energy_wh"] is not None
                                    and m.body["session_energy_wh"] >= wh
                                    and (m.body["power_total_w"] or 0) > 1000), None),
                      "telemetry with %s Wh charged" % wh, station)
    return telemetry.body


def _pause(station):
    """The car stops; returns once the agent reports the contactor open."""
    station.vehicle.pause()
    return _latest_state(station, lambda state: state["pilot"] == "B" and not state["charging"]
                         and state["contactor_feedback"] is False, "paused")


def _latest_state(station, predicate, what, after=0):
    """Wait until the newest retained state the agent published (beyond the first ``after``)
    satisfies ``predicate``."""
    def newest():
        states = station.collector.on("state")
        return len(states) > after and states[-1].body and predicate(states[-1].body) and states[-1].body
    return _wait(newest, "state %s" % what, station)


def _charging_s(station, session_id):
    """Seconds charging by the agent's own state timestamps: from each state that said
    charging to the next that did not."""
    states = [m.body for m in station.collector.on("state") if m.body["session_id"] == session_id]
    total, since = 0.0, None
    for state in states:
        if state["charging"] and since is None:
            since = _epoch(state["ts"])
        elif not state["charging"] and since is not None:
            total += _epoch(state["ts"]) - since
            since = None
    return total


def _wait(predicate, what, station, timeout_s=60):
    value = wait_for(predicate, timeout_s)
    assert value, "no %s within %d s\n%s" % (what, timeout_s, station.agent.log())
    return value


def _epoch(ts):
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_normal_session(station, station_dir):
    """Plug in, charge, car full (pause), unplug: durations, maxima, exact energy, signed readings."""
    st = station()
    register_at_plug = st.register_wh()
    st.vehicle.plug()
    start = st.session_message("start").body
    begin = st.session_message("begin").body
    assert begin["begin"]["energy_wh"] == register_at_plug
    _charge(st, wh=5)
    _pause(st)
    st.vehicle.unplug()
    end = st.session_message("end").body
    register_at_end = st.register_wh()

    assert end["session_id"] == start["session_id"] == begin["session_id"]
    assert end["begin"]["energy_wh"] == register_at_plug
    assert end["end"]["energy_wh"] == register_at_end
    assert end["energy_wh"] == register_at_end - register_at_plug > 0
    # Durations against the agent's own state timestamps (charging from the state that
    # said so to the next that did not; exact figures are tested with a moved clock in
    # test_session_engine.py), not against how long this machine took.
    assert end["charging_s"] == pytest.approx(_charging_s(st, end["session_id"]), abs=0.5)
    assert 0 < end["charging_s"] < end["plugged_s"]
    assert end["idle_s"] == pytest.approx(end["plugged_s"] - end["charging_s"], abs=0.15)
    assert 10000 < end["max_power_w"] < 12000
    assert all(15.5 < c < 16.5 for c in end["max_current_a"])
    # avg = energy / unrounded charging time; charging_s is rounded to 0.1 s.
    assert end["energy_wh"] * 3600 / (end["charging_s"] + 0.05) - 0.1 <= end["avg_power_w"] \
        <= end["energy_wh"] * 3600 / (end["charging_s"] - 0.05) + 0.1
    assert end["flags"] == []
    key = public_key(station_dir)
    assert_documents_verify(end, key)
    begin_rd = ocmf_readings(end["ocmf_begin"])
    end_rd = ocmf_readings(end["ocmf_end"])
    assert [r["TX"] for r in begin_rd] == ["B"] and begin_rd[0]["RV"] == register_at_plug
    assert [r["TX"] for r in end_rd] == ["B", "E"] and end_rd[1]["RV"] == register_at_end
    # The retained state says "no session" from the unplug on: it goes straight out, while
    # the end record goes through the journal, so either may reach the broker first.
    state = _latest_state(st, lambda state: state["pilot"] == "A" and state["session_id"] is None, "unplugged")
    assert state["charging"] is False


def test_pause_and_resume_counts_both_charging_periods(station):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    first = _charge(st)
    _pause(st)
    _charge(st, wh=first["session_energy_wh"] + 2)
    _pause(st)
    st.vehicle.unplug()
    end = st.session_message("end").body
    # Both periods count, the pause between them does not (by the agent's own timestamps).
    assert end["charging_s"] == pytest.approx(_charging_s(st, end["session_id"]), abs=0.5)
    assert end["charging_s"] > 0 and end["idle_s"] > 0
    assert end["idle_s"] == pytest.approx(end["plugged_s"] - end["charging_s"], abs=0.15)
    assert end["segments"] == 1
    assert end["energy_wh"] == end["end"]["energy_wh"] - end["begin"]["energy_wh"] == \
        st.register_wh() - end["begin"]["energy_wh"]


def test_unplug_while_charging_takes_the_end_reading_after_the_contactor_opens(station):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    _charge(st, wh=3)
    st.vehicle.unplug()
    end = st.session_message("end").body
    # A reading the agent took after the end reading shows the same register.
    after = _wait(lambda: next((m.body for m in st.collector.on("telemetry")
                                if _epoch(m.body["ts"]) > _epoch(end["end"]["ts"])), None),
                  "reading after the end", st)
    assert after["energy_wh"] == end["end"]["energy_wh"]
    assert end["end"]["energy_wh"] == st.register_wh()  # nothing flowed after the end reading
    assert end["energy_wh"] == st.register_wh() - end["begin"]["energy_wh"] > 0


def test_meter_offline_at_end_takes_the_next_good_reading_and_flags_it(station, station_dir):
    st = station()
    st.vehicle.plug()
    st.session_message("begin")
    _charge(st)
    _pause(st)
    st.meter.set_fault("silent")
    _latest_state(st, lambda state: not state["meter_online"], "meter offline")
    st.vehicle.unplug()
    _latest_state(st, lambda state: state["pilot"] == "A", "unplugged")
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
    _charge(st)
    st.meter.set_fault("silent")  # a technician swaps the meter: the line is dead meanwhile
    _latest_state(st, lambda state: not state["meter_online"], "meter offline")
    old_last = st.register_wh()
    st.meter.replace_meter(serial=87654321, energy_wh=500)
    seen = len(st.collector.on("telemetry"))
    st.meter.set_fault(None)
    _wait(lambda: any(m.body["meter_serial"] == 87654321 and (m.body["power_total_w"] or 0) > 1000
                      for m in st.collector.on("telemetry")[seen:]), "a reading of the new meter", st)
    _pause(st)
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
    _charge(st)
    st.agent.kill()  # the car keeps charging while the agent is down and starts again
    states = len(st.collector.on("state"))
    st.agent = st.start_agent()
    _latest_state(st, lambda state: state["charging"], "charging after the restart", after=states)
    _pause(st)
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
    _charge(st)
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
    _charge(st, wh=0)
    event = st.event("overcurrent")
    assert event["severity"] == "critical"
    assert event["values"]["advertised_a"] == pytest.approx(10.0, abs=0.1)
    assert event["values"]["current_a"] > 11.0
    st.vehicle.pause()
    cleared = st.collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "overcurrent"
                                    and m.body["state"] == "cleared")
    assert cleared is not None
