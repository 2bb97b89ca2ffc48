"""Fleet reports against a week whose right answers are known exactly.

Once per module: ``evse_tools.sim.fleet_week`` runs four stations' real agent cores through a
simulated week (Monday 2026-11-23 to Monday 2026-11-30 UTC) and their forwarders publish it
through a real mosquitto; two collectors (``CollectorService``) store it, one in SQLite and
one in PostgreSQL; the stations' public keys are then registered from the PEM files the
generator wrote. Every report is checked on both databases against the generator's ground
truth: counts and energy exactly, charging time within the tolerance stated where it is
checked.
"""

import contextlib
import csv
import io
import json
import os
import sqlite3
import struct
import threading
import time

import pytest

from evse_tools.sim import fleet_week
from evse_tools.testkit.broker import Mosquitto
from evse_tools.collector import report
from evse_tools.collector.keys import register_key_dir
from evse_tools.collector.main import main as collector_main
from evse_tools.collector.service import BrokerSettings, CollectorService
from evse_tools.collector.store import open_store
from evse_tools.testkit.postgres import PostgresCluster

WEEK = ("--since", "2026-11-23", "--until", "2026-11-30")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Fleet:
    def __init__(self, truth, urls, work):
        self.truth = truth
        self.urls = urls
        self.work = work


def _wait_for_records(url, expected, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    with open_store(url) as store:
        while True:
            count = store.scalar("SELECT COUNT(*) FROM records")
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The week, generated once for the module and stored in SQLite and PostgreSQL."""
    work = tmp_path_factory.mktemp("fleet-week")
    with Mosquitto() as broker, PostgresCluster() as postgres:
        urls = {"sqlite": str(work / "fleet.sqlite"), "postgresql": postgres.url}
        running = []
        for name, url in urls.items():
            store = open_store(url)
            service = CollectorService(BrokerSettings(host=broker.host, port=broker.port,
                                                      client_id="reports-" + name), store)
            service.start()
            assert service.wait_subscribed(60), "collector on %s did not subscribe" % name
            thread = threading.Thread(target=service.run)
            thread.start()
            running.append((service, thread, store))
        try:
            truth = fleet_week.generate(broker.host, broker.port, str(work / "stations"))
            expected = sum(station["records"] for station in truth["stations"].values())
            for url in urls.values():
                assert _wait_for_records(url, expected) == expected
        finally:
            for service, thread, store in running:
                service.stop()
                thread.join(30)
                store.close()
        for url in urls.values():
            with open_store(url) as store:
                register_key_dir(store, str(work / "stations" / "keys"))
        yield Fleet(truth, urls, work)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, fleet):
    return fleet.urls[request.param]


def _data(url, since="2026-11-23", until="2026-11-30", stations=None):
    with open_store(url) as store:
        return report.load(store, stations, report.Window(report.parse_time(since), report.parse_time(until)))


def _cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = collector_main(list(argv))
    return status, out.getvalue()


def test_the_week_arrives_whole_and_every_session_verifies(fleet, db):
    truth = fleet.truth
    with open_store(db) as store:
        for station, expected in truth["stations"].items():
            assert store.scalar("SELECT COUNT(*) FROM records WHERE station = ?", (station,)) == expected["records"]
            assert store.scalar("SELECT MAX(seq) FROM records WHERE station = ?", (station,)) == expected["records"]
            assert store.query("SELECT first_seq, last_seq FROM gaps WHERE station = ?", (station,)) == []
        verdicts = store.query("SELECT session_id, verified, verify_error FROM sessions ORDER BY session_id")
    assert len(verdicts) == len(truth["sessions"]) > 30
    assert [(sid, 1, None) for sid, _, _ in verdicts] == verdicts


def test_sessions_per_day_are_exact(fleet, db):
    figures = report.sessions_per_day(_data(db))
    assert figures["days"] == sorted(fleet.truth["stations"]["fleet-01"]["sessions_per_day"])
    assert figures["counts"] == {station: expected["sessions_per_day"]
                                 for station, expected in fleet.truth["stations"].items()}


def test_energy_per_day_billed_and_metered_are_exact_in_wh(fleet, db):
    figures = report.energy_per_day(_data(db))
    for station, expected in fleet.truth["stations"].items():
        assert {day: cell["billed_wh"] for day, cell in figures[station].items()} == expected["billed_wh_per_day"]
        assert {day: cell["metered_wh"] for day, cell in figures[station].items()} == expected["metered_wh_per_day"]
        assert sum(expected["metered_wh_per_day"].values()) == expected["register_end_wh"] - expected["register_start_wh"]
    # Overnight sessions bill on their plug-in day but meter on both: the two views differ.
    billed = [sum(c["billed_wh"] for c in figures[s].values()) for s in figures]
    metered = [sum(c["metered_wh"] for c in figures[s].values()) for s in figures]
    assert billed == metered  # every session lies inside the week
    assert any(figures[s][d]["billed_wh"] != figures[s][d]["metered_wh"] for s in figures for d in figures[s])


def test_utilisation_matches_within_the_aggregates_resolution(fleet, db):
    """Plugged-in and faulted time come from session and event times: exact. Charging time
    comes from 15-minute aggregates (share avg/max of an interval whose power crosses the
    threshold). In general that is good to one reading step per start or stop of charging;
    here cars draw a constant power and charging starts and stops on the generator's
    60 s reading instants, so the share is exact but for the rounding of each stored mean
    power to 0.1 W: under 0.05 W / 3720 W x 900 s = 0.012 s per interval with a start or
    stop, two of them per charging period (0.03 s each allowed)."""
    figures = report.utilisation(_data(db))
    for station, expected in fleet.truth["stations"].items():
        got = figures[station]
        tolerance = 2 * 0.03 * expected["charge_periods"]
        assert got["window_s"] == 7 * 86400
        assert got["faulted"] == expected["utilisation_s"]["faulted"]
        for state in ("charging", "connected_idle", "available"):
            assert got[state] == pytest.approx(expected["utilisation_s"][state], abs=tolerance), (station, state)
        assert sum(got[state] for state in report.UTILISATION_STATES) == pytest.approx(7 * 86400, abs=1e-6)
    assert figures["fleet-03"]["faulted"] > 7200  # two hours out of service, and pilot errors


def test_peak_hours_match_the_hour_of_week_ground_truth(fleet, db):
    """Plugged cars from session times (exact); charging stations and power from aggregates
    whose 15-minute intervals nest in hours, exact but for the rounding of each stored mean
    to 0.1 W: an hour cell sums four quarter-hour means of four stations, each off by at
    most 0.05 W, so the hour's mean power by at most 4 x 4 x 0.05 / 4 = 0.2 W, and the
    stations charging by at most 0.2 W / 3720 W."""
    figures = report.peak_hours(_data(db))
    expected = fleet.truth["hour_of_week"]
    for day in range(7):
        for hour in range(24):
            assert figures["plugged"][day][hour] == pytest.approx(expected["plugged"][day][hour], abs=1e-9)
            assert figures["charging"][day][hour] == pytest.approx(expected["charging"][day][hour], abs=0.2 / 3720)
            assert figures["power_w"][day][hour] == pytest.approx(expected["power_w"][day][hour], abs=0.2)
    busiest = max((figures["power_w"][d][h], d, h) for d in range(7) for h in range(24))
    assert busiest[1] < 5 and 16 <= busiest[2] <= 21  # a weekday evening


def test_maintenance_ranks_the_station_with_most_faults_first(fleet, db):
    rows = report.maintenance(_data(db))
    by_station = {row["station"]: row for row in rows}
    for station, expected in fleet.truth["stations"].items():
        row = by_station[station]
        assert row["by_type"] == expected["faults"]["by_type"]
        assert row["events"] == expected["faults"]["total"]
        assert row["meter_offline"] == expected["faults"]["by_type"].get("meter_offline", 0)
        assert row["meter_offline_s"] == 60 * row["meter_offline"]
        assert row["critical"] == sum(n for t, n in expected["faults"]["by_type"].items()
                                      if t in ("overcurrent", "pilot_error"))
        assert row["sessions"] == sum(expected["sessions_per_day"].values())
    assert rows[0]["station"] == "fleet-03" and rows[0]["rank"] == 1
    assert rows[0]["critical_per_day"] > 2 * rows[1]["critical_per_day"]


def test_billing_csv_rows_are_the_ground_truth_sessions_all_verified(fleet, db, tmp_path):
    path = tmp_path / "billing.csv"
    status, out = _cli("report", "billing-csv", "--db", db, *WEEK, "--out", str(path))
    assert status == 0
    count = len(fleet.truth["sessions"])
    assert "%d sessions, %d verified" % (count, count) in out
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(report.BILLING_COLUMNS)
    expected = {s["session_id"]: s for s in fleet.truth["sessions"]}
    assert sorted(row["session_id"] for row in rows) == sorted(expected)
    for row in rows:
        truth = expected[row["session_id"]]
        assert (row["station"], row["start"], row["end"]) == (truth["station"], truth["plug_in"], truth["unplug"])
        assert (int(row["energy_wh"]), int(row["begin_wh"]), int(row["end_wh"])) == (
            truth["energy_wh"], truth["begin_wh"], truth["end_wh"])
        assert row["verified"] == "yes" and row["verify_error"] == ""
        assert row["ocmf_begin"].startswith("OCMF|") and '"TX":"E"' in row["ocmf_end"].replace(" ", "")
    assert [row["start"] for row in rows] == sorted(row["start"] for row in rows)


def _tampered_copy(fleet, tmp_path):
    copy = str(tmp_path / "tampered.sqlite")
    source = sqlite3.connect(fleet.urls["sqlite"])
    target = sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.close()
    return copy


def test_a_tampered_document_or_figure_in_the_database_bills_as_not_verified(fleet, tmp_path):
    copy = _tampered_copy(fleet, tmp_path)
    connection = sqlite3.connect(copy)
    (document,) = connection.execute(
        "SELECT ocmf_end FROM sessions WHERE session_id = 'fleet-02-000003'").fetchone()
    payload = json.loads(document.split("|")[1])
    reading = payload["RD"][-1]
    changed = document.replace('"RV":%s' % json.dumps(reading["RV"]), '"RV":%s' % json.dumps(reading["RV"] + 1000))
    assert changed != document
    connection.execute("UPDATE sessions SET ocmf_end = ? WHERE session_id = 'fleet-02-000003'", (changed,))
    connection.execute("UPDATE sessions SET energy_wh = energy_wh + 1 WHERE session_id = 'fleet-04-000002'")
    connection.commit()
    connection.close()
    status, out = _cli("report", "billing-csv", "--db", copy, *WEEK)
    assert status == 0
    rows = {row["session_id"]: row for row in csv.DictReader(io.StringIO(out))}
    assert rows["fleet-02-000003"]["verified"] == "no"
    assert "first / last signed documents" in rows["fleet-02-000003"]["verify_error"]
    assert rows["fleet-04-000002"]["verified"] == "no"
    assert "differs from the signed registers" in rows["fleet-04-000002"]["verify_error"]
    assert len(rows) == len(fleet.truth["sessions"])
    assert sum(1 for row in rows.values() if row["verified"] == "yes") == len(rows) - 2


def test_a_tampered_document_kept_consistent_fails_its_signature(fleet, tmp_path):
    """The same change made everywhere the document is stored: only the signature catches it."""
    copy = _tampered_copy(fleet, tmp_path)
    connection = sqlite3.connect(copy)
    document, documents = connection.execute(
        "SELECT ocmf_end, ocmf_documents FROM sessions WHERE session_id = 'fleet-01-000002'").fetchone()
    changed = document.replace('"ST":"G"', '"ST":"G" ', 1)
    assert changed != document
    documents = json.dumps([changed if text == document else text for text in json.loads(documents)])
    connection.execute("UPDATE sessions SET ocmf_end = ?, ocmf_documents = ? WHERE session_id = 'fleet-01-000002'",
                       (changed, documents))
    connection.commit()
    connection.close()
    rows = report.billing_rows(_data(copy))
    bad = [row for row in rows if row["verified"] == "no"]
    assert [row["session_id"] for row in bad] == ["fleet-01-000002"]
    assert "signature INVALID" in bad[0]["verify_error"]


def _png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plots_are_written_as_real_images(fleet, db, tmp_path):
    out = tmp_path / "plots"
    status, printed = _cli("report", "plots", "--db", db, *WEEK, "--out", str(out), "--session", "fleet-03-000002")
    assert status == 0
    names = sorted(os.listdir(out))
    assert names == ["load-profile.png", "peak-hours.png", "session-fleet-03-000002.png"]
    assert printed.split() == [str(out / name) for name in ("load-profile.png", "peak-hours.png",
                                                             "session-fleet-03-000002.png")]
    sizes = {name: _png_size(out / name) for name in names}
    assert sizes["load-profile.png"] == (1100, 550)
    assert sizes["peak-hours.png"] == (1100, 700)
    assert sizes["session-fleet-03-000002.png"] == (1100, 550)
    for name in names:
        assert os.path.getsize(out / name) > 15000, name


def test_plots_refuse_an_unknown_session_before_writing(fleet, tmp_path, capsys):
    out = tmp_path / "plots"
    status, _ = _cli("report", "plots", "--db", fleet.urls["sqlite"], "--out", str(out), "--session", "fleet-09-000001")
    assert status == 2
    assert "fleet-09-000001" in capsys.readouterr().err
    assert not out.exists()


def test_report_tables_in_the_terminal_and_as_csv(fleet, tmp_path):
    path = tmp_path / "utilisation.csv"
    status, out = _cli("report", "utilisation", "--db", fleet.urls["sqlite"], *WEEK, "--station", "fleet-03",
                       "--out", str(path))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "Utilisation 2026-11-23T00:00:00.000Z to 2026-11-30T00:00:00.000Z"
    assert lines[1].split()[:3] == ["station", "charging_s", "charging_%"]
    assert lines[3].split()[0] == "fleet-03" and len(lines) == 4
    with open(path, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    expected = fleet.truth["stations"]["fleet-03"]["utilisation_s"]
    assert int(row["faulted_s"]) == expected["faulted"]
    assert abs(int(row["charging_s"]) - expected["charging"]) <= 1
    status, out = _cli("report", "sessions-per-day", "--db", fleet.urls["sqlite"], *WEEK)
    assert status == 0
    totals = [sum(fleet.truth["stations"][s]["sessions_per_day"].values()) for s in sorted(fleet.truth["stations"])]
    assert out.splitlines()[-1].split() == ["total"] + [str(n) for n in totals] + [str(sum(totals))]


def test_report_options_name_the_bad_value(fleet, capsys):
    with pytest.raises(SystemExit) as stop:
        collector_main(["report", "utilisation", "--db", fleet.urls["sqlite"], "--since", "last tuesday"])
    assert stop.value.code == 2
    assert "'last tuesday'" in capsys.readouterr().err
    status, _ = _cli("report", "maintenance", "--db", fleet.urls["sqlite"], "--station", "fleet-99")
    assert status == 2
    assert "fleet-99" in capsys.readouterr().err
    status, _ = _cli("report", "energy-per-day", "--db", fleet.urls["sqlite"], "--since", "2026-11-30",
                     "--until", "2026-11-23")
    assert status == 2
    assert "2026-11-23T00:00:00.000Z is not after" in capsys.readouterr().err


def test_summaries_count_only_where_no_aggregate_arrived(tmp_path):
    """A summary stands for folded aggregates: where some of them were delivered anyway the
    summary is left out, elsewhere its mean power and share of charging count."""
    with open_store(str(tmp_path / "summaries.sqlite")) as store:
        rows = [
            # two delivered aggregates, charging 11.04 kW throughout
            (1, "aggregate", "2026-11-23T10:00:00.000Z", "2026-11-23T10:15:00.000Z", 11040.0, 11040.0, 11040.0),
            (2, "aggregate", "2026-11-23T10:15:00.000Z", "2026-11-23T10:30:00.000Z", 11040.0, 11040.0, 11040.0),
            # a summary of the same hour: already counted through its aggregates
            (3, "summary", "2026-11-23T10:00:00.000Z", "2026-11-23T11:00:00.000Z", 0.0, 5520.0, 11040.0),
            # a summary whose aggregates never arrived: half an hour charging of one
            (4, "summary", "2026-11-23T12:00:00.000Z", "2026-11-23T13:00:00.000Z", 0.0, 5520.0, 11040.0),
        ]
        for seq, kind, start, end, low, avg, high in rows:
            store.execute('INSERT INTO aggregates (station, seq, kind, start, "end", power_min_w, power_avg_w, '
                          "power_max_w) VALUES ('s-1', ?, ?, ?, ?, ?, ?, ?)", (seq, kind, start, end, low, avg, high))
        data = report.load(store, None, report.Window(report.parse_time("2026-11-23"), report.parse_time("2026-11-24")))
    assert [(item["kind"], item["start"]) for item in data.aggregates["s-1"]] == [
        ("aggregate", report.parse_time("2026-11-23T10:00Z")), ("aggregate", report.parse_time("2026-11-23T10:15Z")),
        ("summary", report.parse_time("2026-11-23T12:00Z"))]
    figures = report.utilisation(data)["s-1"]
    assert figures["charging"] == 1800 + 1800
    assert figures["available"] == 86400 - 3600  # no session records: the charging is still not available time
    power = report.peak_hours(data)["power_w"][0]  # Monday
    assert (power[10], power[12]) == (5520.0, 5520.0)
