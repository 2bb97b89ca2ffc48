"""The composition root: ``build_station`` builds the whole agent from the platform parts, and
the settings the console changes at once reach those parts through their setters."""

import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from evse_agent.config import validate
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_agent.ports.cpython.sim_pins import SimPinBank
from evse_agent.station import Ports, build_station


class Publisher:
    """Keeps what it is given; no broker acknowledges anything here."""

    def __init__(self):
        self.sent = []
        self.connected = True  # one connection, never lost
        self.connects = 1

    def publish(self, topic, payload, qos=0, retain=False):
        self.sent.append((topic, payload, qos, retain))
        return len(self.sent)

    def drain_acked(self):
        return []


def station(root, **sections):
    """A station on the host board's parts in ``root``; the meter's line is never used."""
    board = {"station_id": "st-001", "meter": {"model": "sdm630", "port": "unused"},
             "io": {"driver": "sim", "sim_file": str(root / "pins.json")},
             "journal": {"dir": str(root / "journal")}, "session": {"state_dir": str(root / "state")},
             "signing": {"key_file": str(root / "station.pem")}}
    board.update(sections)
    config = validate(board)
    ports = Ports(None, FileSystem, Publisher(), SimPinBank(config["io"]),
                  FileKeySigner(config["signing"]["key_file"]))
    return build_station(config, SystemClock("always"), ports)


def test_the_station_is_built_whole_and_wired(tmp_path):
    agent = station(tmp_path, homeassistant={"enabled": False})
    journal = agent.outbox.journal
    assert agent.forwarder is agent.outbox.forwarder and agent.forwarder.journal is journal
    assert agent.engine.meter is agent.meter and agent.inputs.listener is agent
    assert agent.inputs.pins.path == str(tmp_path / "pins.json")
    # Meter faults, journal alarms and register anomalies become the power monitor's events.
    assert agent.meter.alarm == agent.monitor.alarm == agent.engine.alarm
    assert agent.meter.notice == agent.monitor.notice and journal.alarm == agent.on_journal_alarm
    # Parts the board does not ask for are absent, not half built.
    assert (agent.console, agent.discovery, agent.identification, agent.restored) == (None, None, None, None)
    assert journal.report is not None and journal.report.next_seq == 1


@settings(max_examples=25, deadline=None)
@given(timeout_ms=st.integers(20, 5000), retries=st.integers(0, 10), window=st.integers(1, 1000),
       sync_s=st.floats(0.1, 3600), cursor_s=st.floats(0.1, 3600), poll_s=st.floats(0.1, 3600))
def test_live_settings_reach_the_parts(timeout_ms, retries, window, sync_s, cursor_s, poll_s):
    with tempfile.TemporaryDirectory() as root:
        agent = station(Path(root))
        changes = (("meter.timeout_ms", timeout_ms), ("meter.retries", retries), ("journal.window", window),
                   ("journal.sync_interval_s", sync_s), ("journal.cursor_sync_s", cursor_s),
                   ("meter.poll_interval_s", poll_s))
        for path, value in changes:
            assert agent.apply_setting(path, value), path
        master, journal = agent.meter.master, agent.outbox.journal
        assert (master.timeout_ms, master.retries, agent.forwarder.window) == (timeout_ms, retries, window)
        assert (journal.sync_ms, journal.cursor_sync_ms) == (int(sync_s * 1000), int(cursor_s * 1000))
        assert agent.config["meter"]["poll_interval_s"] == poll_s
        assert not agent.apply_setting("meter.model", "sdm120")  # needs a restart
        journal.close()
