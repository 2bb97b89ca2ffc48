"""End to end: evse-agent on boards/sim.json -> real mosquitto -> a paho subscriber."""

import struct
from datetime import datetime

import pytest

from conftest import wait_for
from evse_tools.testkit.subscriber import Collector


def _f32(value):
    return struct.unpack(">f", struct.pack(">f", value))[0]


def test_status_and_telemetry_match_what_the_simulator_served(broker, collector, meter_sim, agent_process):
    """Telemetry values are the simulator's served values; status is retained online, then offline."""
    sim = meter_sim("sdm630", profile="steady", energy_wh=4321987)
    sim.set_hold(True)
    served = sim.snapshot()
    agent = agent_process(broker, sim.device, "--quiet")

    status = collector.wait_for(lambda m: m.topic == "evse/sim-001/status" and m.text == "online")
    assert status is not None, agent.log()
    telemetry = collector.wait_for(lambda m: m.topic == "evse/sim-001/telemetry")
    assert telemetry is not None, agent.log()
    body = telemetry.body
    assert body["station"] == "sim-001"
    assert isinstance(body["journal_seq"], int) and "seq" not in body  # live, not journaled
    assert body["energy_wh"] == round(_f32(served["energy_wh"] / 1000) * 1000) == 4321987
    assert body["meter_serial"] == served["serial"]
    for i, phase in enumerate(("l1", "l2", "l3")):
        assert body["voltage_v"][i] == round(_f32(served["voltage_" + phase]), 2)
        assert body["current_a"][i] == round(_f32(served["current_" + phase]), 3)
        assert body["power_w"][i] == round(_f32(served["power_" + phase]), 1)
    assert body["power_total_w"] == round(_f32(served["power_total"]), 1)
    assert body["frequency_hz"] == round(_f32(served["frequency"]), 3)
    assert body["ts"].endswith("Z")

    # The status is retained: a subscriber arriving later still learns the station is online.
    late = Collector(broker.host, broker.port, "evse/sim-001/status")
    try:
        retained = late.wait_for(lambda m: m.retain, timeout_s=60)
        assert retained is not None and retained.text == "online"
    finally:
        late.close()

    meter = collector.wait_for(lambda m: m.topic == "evse/sim-001/meter" and m.body["online"])
    assert meter.body["model"] == "sdm630" and meter.body["serial"] == served["serial"]

    assert agent.stop() == 0
    offline = collector.wait_for(lambda m: m.topic == "evse/sim-001/status" and m.text == "offline")
    assert offline is not None


def test_sequence_numbers_grow_by_one_and_energy_follows_power(broker, collector, meter_sim, agent_process):
    """Journaled records carry seq (+1 each, no gaps); live messages carry the journal's
    position; the energy register grows consistently with power."""
    sim = meter_sim("sdm630", profile="steady")
    agent = agent_process(broker, sim.device, "--quiet", "--set", "meter.poll_interval_s=0.2",
                          "--set", "mqtt.telemetry_interval_s=0.2", "--set", "journal.aggregate_interval_s=0.5",
                          "--set", "journal.sync_interval_s=0.5")
    assert collector.wait_for(lambda m: len(collector.on("aggregate")) >= 6, timeout_s=60), agent.log()
    assert collector.wait_for(lambda m: len(collector.on("telemetry")) >= 15, timeout_s=60), agent.log()
    agent.stop()
    journaled = sorted({m.body["seq"] for m in collector.messages if m.body and "seq" in m.body})
    assert journaled == list(range(1, journaled[-1] + 1))
    positions = [m.body["journal_seq"] for m in collector.on("telemetry")]
    assert positions == sorted(positions) and positions[-1] >= 1  # where the journal stood
    aggregates = [m.body for m in collector.on("aggregate")]
    assert all(a["samples"] >= 1 and a["power_total_w"]["min"] <= a["power_total_w"]["avg"]
               <= a["power_total_w"]["max"] for a in aggregates)
    telemetry = [m.body for m in collector.on("telemetry")]
    energies = [t["energy_wh"] for t in telemetry]
    assert energies == sorted(energies)
    # Between the first and last message the register grows by the mean power times the time.
    first, last = telemetry[0], telemetry[-1]
    hours = (_epoch(last["ts"]) - _epoch(first["ts"])) / 3600
    mean_power = sum(t["power_total_w"] for t in telemetry) / len(telemetry)
    expected_wh = mean_power * hours
    gained = last["energy_wh"] - first["energy_wh"]
    assert expected_wh > 5
    assert abs(gained - expected_wh) <= 2 + 0.05 * expected_wh


def _epoch(iso):
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def test_agent_killed_leaves_the_last_will(broker, collector, meter_sim, agent_process):
    """A crashed agent (SIGKILL) is reported offline by the broker through the last will."""
    sim = meter_sim("sdm120", profile="idle")
    agent = agent_process(broker, sim.device, "--quiet", "--set", "meter.model=\"sdm120\"")
    assert collector.wait_for(lambda m: m.topic.endswith("/status") and m.text == "online")
    assert collector.wait_for(lambda m: m.topic.endswith("/telemetry")), agent.log()
    agent.kill()
    will = collector.wait_for(lambda m: m.topic.endswith("/status") and m.text == "offline", timeout_s=60)
    assert will is not None


def test_agent_keeps_polling_while_broker_is_down_and_reconnects(broker, collector, meter_sim, agent_process):
    """Broker restart: the agent keeps polling, reconnects, and says online again."""
    sim = meter_sim("sdm630", profile="steady")
    agent = agent_process(broker, sim.device, "--set", "mqtt.reconnect_min_s=1",
                          "--set", "mqtt.reconnect_max_s=2")
    assert collector.wait_for(lambda m: m.topic.endswith("/telemetry")), agent.log()
    collector.close()
    broker.kill()
    lines_before = len(agent.stdout)
    # Readings go on being printed while the broker is down.
    assert wait_for(lambda: len(agent.stdout) >= lines_before + 3 or not agent.alive(), 60), \
        "the agent stopped polling while the broker was down"
    assert agent.alive()
    broker.start()
    again = Collector(broker.host, broker.port, "evse/#")
    try:
        assert again.wait_for(lambda m: m.topic.endswith("/telemetry"), timeout_s=60), agent.log()
    finally:
        again.close()
    assert agent.wait_for_log("MQTT disconnected"), agent.log()
    assert wait_for(lambda: agent.log().count("MQTT connected") >= 2, 60), agent.log()


@pytest.mark.parametrize("model_name", ["sdm120", "abb_b23"])
def test_other_meter_models_end_to_end(broker, collector, meter_sim, agent_process, model_name):
    """The single-phase and ABB maps publish their phases and exact energy end to end."""
    sim = meter_sim(model_name, profile="steady", energy_wh=5000000)
    sim.set_hold(True)
    agent = agent_process(broker, sim.device, "--quiet", "--set", 'meter.model="%s"' % model_name)
    telemetry = collector.wait_for(lambda m: m.topic.endswith("/telemetry"))
    assert telemetry is not None, agent.log()
    phases = 1 if model_name == "sdm120" else 3
    assert len(telemetry.body["voltage_v"]) == phases
    assert telemetry.body["energy_wh"] == 5000000
