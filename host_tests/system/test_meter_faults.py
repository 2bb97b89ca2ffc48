"""Each simulator fault: the agent reports it, keeps running, and recovers when it clears."""

import pytest

EXPECTED_ERROR = {
    "silent": ("timeout",),
    "late": ("timeout", "frame", "crc"),
    "crc": ("crc",),
    "exception": ("exception",),
    "garbage": ("frame", "crc", "timeout"),
}

FAST = ("--quiet", "--set", "meter.poll_interval_s=0.25", "--set", "meter.timeout_ms=150",
        "--set", "meter.retries=1", "--set", "meter.offline_after=2",
        "--set", "mqtt.telemetry_interval_s=0.25")


def _meter_status(message):
    return message.topic == "evse/sim-001/meter"


@pytest.mark.parametrize("fault", sorted(EXPECTED_ERROR))
def test_fault_is_reported_and_the_agent_recovers(broker, collector, meter_sim, agent_process, fault):
    sim = meter_sim("sdm630", profile="steady")
    sim.late_ms = 400
    agent = agent_process(broker, sim.device, *FAST)
    assert collector.wait_for(lambda m: _meter_status(m) and m.body["online"]), agent.log()

    sim.set_fault(fault)
    offline = collector.wait_for(lambda m: _meter_status(m) and not m.body["online"], timeout_s=60)
    assert offline is not None, agent.log()
    body = offline.body
    assert body["last_error"].split(":")[0] in EXPECTED_ERROR[fault], body["last_error"]
    assert body["consecutive_failures"] >= 2
    counters = body["modbus"]
    failures = counters["timeouts"] + counters["crc_errors"] + counters["frame_errors"] + counters["exceptions"]
    assert failures >= 2
    if fault == "exception":
        # A definite answer from the meter: not retried (only "busy"/"acknowledge" are).
        assert "exception 4" in body["last_error"]
        assert counters["exceptions"] >= 2 and counters["retries"] == 0
    else:
        assert counters["retries"] >= 1
    if fault == "crc":
        assert counters["crc_errors"] >= 2
    assert agent.wait_for_log("offline"), agent.log()
    telemetry_during_fault = len(collector.on("telemetry"))

    sim.set_fault(None)
    online = collector.wait_for(lambda m: _meter_status(m) and m.body["online"] and m.received > offline.received,
                                timeout_s=60)
    assert online is not None, agent.log()
    assert collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.received > online.received), \
        agent.log() + str([(m.topic, m.received) for m in collector.messages][-12:]) + " online at %s" % online.received
    assert len(collector.on("telemetry")) > telemetry_during_fault
    assert agent.alive()
    assert agent.stop() == 0
    assert "Traceback" not in agent.log()


def test_meter_missing_at_start_is_reported_offline(broker, collector, meter_sim, agent_process):
    """No meter on the line from the start: the agent runs, says offline, and comes up later."""
    sim = meter_sim("sdm630", profile="idle")
    sim.set_fault("silent")
    agent = agent_process(broker, sim.device, *FAST)
    offline = collector.wait_for(lambda m: _meter_status(m) and m.body["consecutive_failures"] >= 2
                                 and not m.body["online"], timeout_s=60)
    assert offline is not None, agent.log()
    assert offline.body["serial"] is None
    sim.set_fault(None)
    assert collector.wait_for(lambda m: _meter_status(m) and m.body["online"], timeout_s=60), agent.log()
    assert agent.alive()
