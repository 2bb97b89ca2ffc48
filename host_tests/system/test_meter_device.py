"""A missing or vanished serial device is "meter offline", never a dead agent.

The agent opens the meter through a symlink (as a udev rule names a USB RS-485 adapter).
Before the simulator exists the link is missing; stopping the simulator closes its pty and
removes the link (an adapter pulled out); a new simulator recreates it.
"""

FAST = ("--quiet", "--set", "meter.poll_interval_s=0.25", "--set", "meter.timeout_ms=150",
        "--set", "meter.retries=1", "--set", "meter.offline_after=2",
        "--set", "mqtt.telemetry_interval_s=0.25")


def _meter_status(message):
    return message.topic == "evse/sim-001/meter"


def test_meter_device_missing_at_start_and_vanishing_later_is_reported_offline(
        broker, collector, meter_sim, agent_process, tmp_path):
    link = str(tmp_path / "ttyMETER")
    agent = agent_process(broker, link, *FAST)
    offline = collector.wait_for(lambda m: _meter_status(m) and not m.body["online"]
                                 and m.body["consecutive_failures"] >= 2, timeout_s=20)
    assert offline is not None, agent.log()
    assert "cannot open meter port %s" % link in offline.body["last_error"]
    assert agent.alive()

    sim = meter_sim("sdm630", profile="steady", link_path=link)  # the adapter is plugged in
    online = collector.wait_for(lambda m: _meter_status(m) and m.body["online"], timeout_s=20)
    assert online is not None, agent.log()
    assert online.body["serial"] == 12345678

    sim.stop()  # pulled out: the pty closes under the agent, the link is gone
    gone = collector.wait_for(lambda m: _meter_status(m) and not m.body["online"]
                              and m.received > online.received, timeout_s=20)
    assert gone is not None, agent.log()
    assert gone.body["last_error"].startswith("link:"), gone.body["last_error"]
    assert agent.alive()
    event = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "meter_offline"
                               and m.body["state"] == "active", timeout_s=10)
    assert event is not None, agent.log()

    meter_sim("sdm630", profile="steady", link_path=link)  # plugged in again
    back = collector.wait_for(lambda m: _meter_status(m) and m.body["online"] and m.received > gone.received,
                              timeout_s=20)
    assert back is not None, agent.log()
    assert collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.received > back.received)
    assert agent.stop() == 0
    assert "Traceback" not in agent.log()
