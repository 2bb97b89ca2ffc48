"""Per-driver billing in the collector: sessions signed by the real engine, stored by the
real ingest path, attributed by the signed tag, priced in integer cents, exported as
statements whose verification bundles an independent reader (pyocmf's Transparenzsoftware
XML reader) opens and verifies."""

import csv
import datetime
import json
import os
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyocmf.utils.xml import OcmfContainer

from evse_tools.collector import billing
from evse_tools.collector.ingest import Ingestor, Message
from evse_tools.collector.keys import register_key
from evse_tools.collector.store import open_store
from test_identification import attach
from test_session_engine import Station

UTC = datetime.timezone.utc
TAGS = ("04A1B2C3D4E5F6", "0A0B0C0D", "11223344", "04FFEEDDCCBBAA")


class Fleet:
    """One station (engine, real signer) whose records go through the collector's ingest."""

    def __init__(self, tmp_path):
        self.station = Station(tmp_path)
        self.desk = attach(self.station, allow_list=[TAGS[0]])
        self.store = open_store(str(tmp_path / "fleet.db"))
        billing.ensure_schema(self.store)
        register_key(self.store, "t-001", self.station.signer.public_key_pem())
        self.sent = 0
        self.seq = 0
        self.truth = []  # (tag or None, energy_wh)

    def session(self, tag, charge_s):
        st_ = self.station
        st_.unplugged()
        st_.idle(2)
        if tag:
            self.desk.tap(tag)
        st_.idle(1)
        begin = st_.register_wh
        st_.plugged()
        st_.idle(1)
        st_.charging()
        st_.flow(charge_s)
        st_.paused()
        st_.idle(1)
        st_.unplugged()
        st_.idle(1)
        self.truth.append((tag, st_.register_wh - begin))
        self.flush()

    def flush(self):
        messages = []
        for kind, doc in self.station.published[self.sent:]:
            self.sent += 1
            if kind != "session":
                continue
            self.seq += 1
            doc = dict(doc, station="t-001", seq=self.seq)
            messages.append(Message("evse/t-001/session", json.dumps(doc).encode()))
        Ingestor(self.store).store_batch(messages)


def expected_cents(energy_wh, tariff_units):
    """Half-up cents of energy at a tariff given in 1/10000 of the currency per kWh, in
    integer arithmetic: cents = energy_wh * units / 100000."""
    return (2 * energy_wh * tariff_units + 100000) // 200000


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(TAGS + (None,)), st.integers(1, 40)), min_size=1, max_size=6),
       st.lists(st.integers(0, 9999), min_size=3, max_size=3))
def test_statement_totals_equal_ground_truth(tmp_path_factory, sessions, tariffs):
    tmp = tmp_path_factory.mktemp("bill")
    fleet = Fleet(tmp)
    names = {}
    for index, tag in enumerate(TAGS[:3]):  # the fourth tag belongs to nobody
        names[tag] = "Driver %d" % index
        billing.add_driver(fleet.store, tag, names[tag], "%d.%04d" % divmod(tariffs[index], 10000),
                           vehicle="car %d" % index, group="pool")
    for tag, charge_s in sessions:
        fleet.session(tag, charge_s)
    start = datetime.datetime(2000, 1, 1, tzinfo=UTC)
    doc = billing.statement(fleet.store, start, datetime.datetime(2100, 1, 1, tzinfo=UTC))
    for index, tag in enumerate(TAGS[:3]):
        mine = [energy for t, energy in fleet.truth if t == tag]
        entry = doc["drivers"].get(names[tag])
        if not mine:
            assert entry is None
            continue
        assert entry["energy_wh"] == sum(mine)
        assert entry["price_cents"] == sum(expected_cents(e, tariffs[index]) for e in mine)
    reasons = sorted((s["tag"] or "", s["reason"]) for s in doc["not_billed"])
    assert reasons == sorted((t or "", "unknown_tag" if t else "unidentified")
                             for t, _ in fleet.truth if t not in TAGS[:3])


def test_export_writes_each_period_once_with_bundles_pyocmf_verifies(tmp_path):
    fleet = Fleet(tmp_path)
    billing.add_driver(fleet.store, TAGS[0], "Ada Lovelace", "0.3950", vehicle="B-AL 123", group="staff")
    fleet.session(TAGS[0], 20)
    fleet.session(TAGS[3], 5)   # a tag nobody registered: listed, not billed
    fleet.session(None, 5)      # nobody tapped
    out = tmp_path / "statements"
    plug_in = datetime.datetime.fromtimestamp(fleet.station.clock.time(), UTC)
    written = billing.export_due(fleet.store, str(out), "day", now=plug_in + datetime.timedelta(days=2))
    assert len(written) == 1
    assert billing.export_due(fleet.store, str(out), "day", now=plug_in + datetime.timedelta(days=3)) == []
    folder = written[0]
    summary = json.loads(open(os.path.join(folder, "statement.json")).read())
    energy = fleet.truth[0][1]
    assert summary["drivers"]["Ada Lovelace"]["energy_wh"] == energy
    assert summary["drivers"]["Ada Lovelace"]["price_cents"] == expected_cents(energy, 3950)
    assert sorted(s["reason"] for s in summary["not_billed"]) == ["unidentified", "unknown_tag"]
    lines = list(csv.reader(open(os.path.join(folder, "ada-lovelace.csv"))))
    assert lines[-1][0] == "TOTAL" and int(lines[-1][8]) == expected_cents(energy, 3950)
    bundle = os.path.join(folder, lines[2][9])
    # The container as the Transparenzsoftware's values.xsd lays it out: publicKey, then signedData.
    root = ET.parse(bundle).getroot()
    assert root.tag == "values"
    for value in root:
        assert [child.tag for child in value] == ["publicKey", "signedData"]
        assert value.find("signedData").get("format") == "OCMF"
    container = OcmfContainer.from_xml(bundle, strict=True)
    assert len(container) == 2 and all(record.verify_signature() for record in container)
    end = container[-1].ocmf
    assert end.payload.ID == TAGS[0] and end.payload.IL == "TRUSTED"
    assert end.check_eichrecht() == []
    rv = [r.RV for r in end.payload.RD]
    assert rv[1] - rv[0] == energy
    for name in os.listdir(out):
        assert not name.startswith(".")  # no half-written statement left behind


def test_bad_driver_input_names_the_value(tmp_path):
    store = open_store(str(tmp_path / "d.db"))
    billing.ensure_schema(store)
    with pytest.raises(ValueError, match="tag '12' is not an ISO 14443 UID"):
        billing.add_driver(store, "12", "X", "0.3")
    with pytest.raises(ValueError, match="tariff 'cheap' is not a number"):
        billing.add_driver(store, TAGS[0], "X", "cheap")
    path = tmp_path / "drivers.csv"
    path.write_text("tag,name,vehicle,group,tariff\n%s,Ann,,,0.30\n%s,Bob,,,-1\n" % (TAGS[0], TAGS[1]))
    with pytest.raises(ValueError, match="drivers.csv line 3: tariff '-1'"):
        billing.import_drivers(store, str(path))
    with pytest.raises(ValueError, match="period 'weekly'"):
        billing.period_of("weekly", datetime.datetime.now(UTC))


def test_command_line_adds_drivers_reports_and_exports(tmp_path, capsys):
    from evse_tools.collector.main import main

    fleet = Fleet(tmp_path)
    fleet.session(TAGS[1], 12)
    db = str(tmp_path / "fleet.db")
    drivers_csv = tmp_path / "drivers.csv"
    drivers_csv.write_text("tag,name,vehicle,group,tariff\n%s,Bo Builder,Van 7,crew,0.2999\n" % TAGS[1])
    assert main(["drivers", "import", "--db", db, "--file", str(drivers_csv)]) == 0
    assert main(["drivers", "list", "--db", db]) == 0
    assert "Bo Builder" in capsys.readouterr().out
    at = datetime.datetime.fromtimestamp(fleet.station.clock.time(), UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert main(["billing", "report", "--db", db, "--period", "day", "--at", at, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    energy = fleet.truth[0][1]
    assert report["drivers"]["Bo Builder"] == {"sessions": 1, "energy_wh": energy,
                                                "price_cents": expected_cents(energy, 2999)}
    out = tmp_path / "statements"
    assert main(["billing", "export", "--db", db, "--period", "day", "--grace", "0", "--out", str(out)]) == 0
    assert "statement %s" % out in capsys.readouterr().out
    assert main(["drivers", "add", "--db", db, "--tag", "XYZ", "--name", "N", "--tariff", "1"]) == 2
    assert "tag 'XYZ' is not an ISO 14443 UID" in capsys.readouterr().err
