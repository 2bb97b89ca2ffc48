"""Who charged, end to end: tags tapped on the PN532 simulator, sessions charged through the
vehicle and meter simulators by a real evse-agent process, published through a real
mosquitto into the collector, billed per driver. Totals equal the meter's ground truth to
the Wh and the cent; every bundle is verified by code other than the signer (pyocmf's
Transparenzsoftware XML reader and tools/cli/ocmf_verify)."""

import datetime
import json
import os
import random
import threading
import time
import xml.etree.ElementTree as ET

import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt import publish
from pyocmf.utils.xml import OcmfContainer

from conftest import wait_for
from evse_tools.cli import ocmf_verify
from evse_tools.collector import billing
from evse_tools.collector.keys import register_key
from evse_tools.collector.service import BrokerSettings, CollectorService
from evse_tools.collector.store import open_store
from evse_tools.sim.reader_sim import ReaderSimulator
from test_billing import expected_cents
from test_sessions import FAST, public_key
from evse_tools.sim.vehicle_sim import VehicleSim

DRIVERS = {"04A1B2C3D4E5F6": ("Ada", 3950), "0A0B0C0D": ("Bo", 2999), "CAFEF00D": ("Cy", 4100)}
STRANGER = "04DEADBEEF0001"  # a tag no driver has, and not on the station's allow-list


@pytest.fixture
def reader():
    sim = ReaderSimulator()
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def fleet_db(tmp_path, broker):
    store = open_store(str(tmp_path / "fleet.db"))
    service = CollectorService(BrokerSettings(host=broker.host, port=broker.port,
                                              client_id="collector-billing"), store)
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    assert service.wait_subscribed(10), "the collector did not subscribe"
    yield str(tmp_path / "fleet.db")
    service.stop()
    thread.join(10)
    store.close()


def test_statements_per_driver_equal_ground_truth(broker, collector, meter_sim, agent_process, station_dir,
                                                  reader, fleet_db, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    station_dir.mkdir(parents=True, exist_ok=True)
    pin_file = str(station_dir / "pins.json")
    vehicle = VehicleSim(pin_file, advertised_a=16.0)
    meter = meter_sim("sdm630", pin_file=pin_file, energy_wh=rng.randrange(1_000_000, 9_000_000))
    meter.physics.noise = False
    listed = sorted(DRIVERS)[:2]  # the third driver's tag is billed although the station does not list it
    agent = agent_process(broker, meter.device, *FAST, "--set", "identification.enabled=true",
                          "--set", "identification.port=" + reader.device,
                          "--set", "identification.poll_interval_ms=50",
                          "--set", "identification.debounce_ms=400",
                          "--set", "identification.tap_before_s=30",
                          "--set", "identification.tap_after_s=4",
                          "--set", "identification.allow_list=%s" % json.dumps(listed))
    assert agent.wait_for_log("id reader: PN532 online", 20), agent.log()
    store = open_store(fleet_db)
    register_key(store, "sim-001", _pem(public_key(station_dir)))
    billing.ensure_schema(store)
    for tag, (name, units) in DRIVERS.items():
        billing.add_driver(store, tag, name, "%d.%04d" % divmod(units, 10000))

    plan = [rng.choice(sorted(DRIVERS) + [STRANGER, None]) for _ in range(5)]
    truth = []
    for number, tag in enumerate(plan, 1):
        when = rng.choice(("before", "after")) if tag else None
        taps = len(reader.reported)
        if when == "before":
            reader.tap(tag, rng.uniform(0.1, 0.6))
            assert agent.wait_for_log("id: tag %s" % tag, 15), agent.log()
        begin_wh = meter.snapshot()["energy_wh"]
        vehicle.plug()
        assert collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "start"
                                  and m.body["session_id"].endswith("%06d" % number)), agent.log()
        if when == "after":
            time.sleep(rng.uniform(0, 1.5))  # the driver taps some time after plugging in
            reader.tap(tag, rng.uniform(0.1, 0.6))
            assert wait_for(lambda: len(reader.reported) > taps, 15)
        vehicle.charge()
        time.sleep(rng.uniform(0.6, 2.0))
        vehicle.pause()
        end_wh = wait_for(lambda: _settled(meter), 10)
        vehicle.unplug()
        end = collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "end"
                                 and m.body["session_id"].endswith("%06d" % number), timeout_s=20)
        assert end is not None, agent.log()
        assert end.body["energy_wh"] == end_wh - begin_wh
        bound = end.body["identification"]
        assert (bound and bound["uid"]) == (tag or None), (seed, number, tag, when, agent.log())
        truth.append((tag, end_wh - begin_wh, end.body["session_id"]))

    ended = "SELECT COUNT(*) FROM sessions WHERE verified = 1 AND seq_end IS NOT NULL"
    assert wait_for(lambda: store.scalar(ended) == len(plan), 30), \
        store.query("SELECT session_id, verified, verify_error FROM sessions")
    out = tmp_path / "statements"
    written = billing.export_due(store, str(out), "day",
                                 now=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2))
    assert len(written) == 1, written  # the test runs within one UTC day, or spans two
    summary = json.loads(open(os.path.join(written[0], "statement.json")).read())
    for tag, (name, units) in DRIVERS.items():
        mine = [energy for t, energy, _ in truth if t == tag]
        if not mine:
            assert name not in summary["drivers"]
            continue
        assert summary["drivers"][name]["energy_wh"] == sum(mine), seed
        assert summary["drivers"][name]["price_cents"] == sum(expected_cents(e, units) for e in mine), seed
    assert sorted((s["tag"] or "", s["reason"]) for s in summary["not_billed"]) == sorted(
        (t or "", "unknown_tag" if t else "unidentified") for t, _, _ in truth if t not in DRIVERS)

    key = ocmf_verify.load_public_key(public_key(station_dir))
    for tag, energy, session_id in truth:
        bundle = os.path.join(written[0], "bundles", session_id + ".xml")
        container = OcmfContainer.from_xml(bundle, strict=True)
        assert all(record.verify_signature() for record in container)
        # Errors none; the host's clock is not NTP-synchronised, so TM carries U (a warning).
        assert container[-1].ocmf.check_eichrecht(errors_only=True) == []
        documents = [ocmf_verify.Document(_raw(bundle, i)) for i in range(len(container))]
        for document in documents:
            document.verify(key)
        billed, _ = ocmf_verify.check_session(documents)
        assert billed == energy
        users = [dict(ocmf_verify.user_assignment(document)) for document in documents]
        assert all(user == users[0] for user in users) and users[0]["ID"] == (tag or "")
        level = users[0]["IL"]
        assert level == ("TRUSTED" if tag in listed else "HEARSAY" if tag else "NONE")
    assert agent.alive()
    agent.stop()
    assert "Traceback" not in agent.log()


def _settled(meter):
    """The register once the contactor is open and it has stopped moving."""
    first = meter.snapshot()["energy_wh"]
    time.sleep(0.3)
    second = meter.snapshot()["energy_wh"]
    return second if second == first else None


def _raw(bundle, index):
    """The OCMF text of the bundle's ``index``-th value, read with the standard library."""
    return ET.parse(bundle).getroot()[index].find("signedData").text


def _pem(key_hex):
    key = serialization.load_der_public_key(bytes.fromhex(key_hex))
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_a_reader_missing_at_start_is_retried_and_found(broker, collector, meter_sim, agent_process, tmp_path):
    """The agent starts without its reader (unplugged USB adapter), bills on, and takes the
    reader into use when it appears; a silent reader is reported and recovered from."""
    link = str(tmp_path / "reader.pty")
    meter = meter_sim("sdm630", profile="steady")
    agent = agent_process(broker, meter.device, *FAST, "--set", "identification.enabled=true",
                          "--set", "identification.port=" + link,
                          "--set", "identification.poll_interval_ms=50",
                          "--set", "identification.debounce_ms=300")
    assert collector.wait_for(lambda m: m.topic.endswith("/telemetry")), agent.log()
    assert agent.wait_for_log("id reader: PN532 not answering", 15), agent.log()
    sim = ReaderSimulator()
    sim.start()
    try:
        os.symlink(sim.device, link)
        assert agent.wait_for_log("id reader: PN532 online", 20), agent.log()
        sim.set_fault("silent")
        assert wait_for(lambda: agent.log().count("id reader: PN532 not answering") >= 2, 20), agent.log()
        sim.set_fault(None)
        assert wait_for(lambda: agent.log().count("id reader: PN532 online") >= 2, 20), agent.log()
        sim.tap("CAFEF00D")
        assert agent.wait_for_log("id: tag CAFEF00D (not listed)", 15), agent.log()
        # The backend pushes a retained allow-list: the next tap of that tag is listed.
        publish.single("evse/sim-001/allow_list", json.dumps({"tags": ["cafef00d"]}), qos=1, retain=True,
                       hostname=broker.host, port=broker.port)
        assert agent.wait_for_log("id: allow-list from the backend: 1 tag(s)", 15), agent.log()
        publish.single("evse/sim-001/allow_list", "[not a list", qos=1, hostname=broker.host, port=broker.port)
        assert agent.wait_for_log("id: allow-list message refused, keeping 1 tag(s)", 15), agent.log()
        assert wait_for(lambda: not sim.card_present(), 10)
        time.sleep(0.5)  # the card stays away longer than debounce_ms: the next tap is a new one
        sim.tap("CAFEF00D")
        assert agent.wait_for_log("id: tag CAFEF00D (listed)", 15), agent.log()
    finally:
        sim.stop()
    assert agent.alive() and "Traceback" not in agent.log()
