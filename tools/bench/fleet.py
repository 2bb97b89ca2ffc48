"""The fleet side at scale: records/s the collector stores, and a large fleet held exactly once.

Every run feeds ``evse-collector run`` processes (the shipped command, one per member of an
MQTT 5 shared-subscription group) from replayed stations (``fleet_replay``: records of real
agent cores under many station ids) through one private mosquitto, and checks the store
against what the broker acknowledged to each station: every seq 1..n stored once, none
missing, none extra.

- **Ingest**: a backlog drained. The collectors are subscribed and stopped (SIGSTOP) while
  a fleet's stream is played ``INGEST_SPEED`` times faster than real time; then they are
  continued, and records/s = records stored / time from continuing until the last is
  stored. The publishers have finished by then, so neither their CPU nor their pace is in
  the figure. On SQLite (one collector) and PostgreSQL (1, 2 and 4 collectors of one
  group), with the CPU each part used while draining. Baselines, by programs that share no
  code with the collector: the database's own bulk load of the same rows (Python's
  ``sqlite3`` ``executemany`` in one transaction; ``psql``'s ``\\copy``), and the broker's
  delivery of the same backlog on the same topics to ``mosquitto_sub``.
- **Fleet**: 5,000 stations replayed at the agent's default rates for 60 s into one collector
  on PostgreSQL (``--full``: 10,000 for 120 s into a group of 2): published, stored, lost,
  duplicated, and the collector lag (from the last publish until the last record is stored).

``python -m evse_tools.bench.fleet [--full]``.
"""

import argparse
import csv
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

from .cpu import cpu_seconds
from ..testkit.broker import Mosquitto, find_mosquitto
from ..collector.ingest import SUBSCRIBED_CHANNELS
from ..collector.service import subscription_topics
from ..collector.store import SCHEMA, open_store
from ..sim.fleet_replay import ReplayFleet, record
from ..testkit.postgres import PostgresCluster

INGEST_SPEED = 20.0
INGEST_S = 15.0  # of publishing at INGEST_SPEED: 300 s of the fleet's stream
SHARE_GROUP = "bench"


class Collectors:
    """``count`` ``evse-collector run`` processes of one share group on ``db``."""

    def __init__(self, broker, db, count, workdir, group=SHARE_GROUP):
        self.broker = broker
        self.db = db
        self.group = group if count > 1 else None
        self.client_ids = ["bench-collector-%d" % i for i in range(count)]
        self.workdir = workdir
        self.processes = {}

    def start(self, client_id):
        command = [sys.executable, "-m", "evse_tools.collector.main", "run", "--broker",
                   "%s:%d" % (self.broker.host, self.broker.port), "--db", self.db, "--client-id", client_id]
        if self.group:
            command += ["--group", self.group]
        log = open(os.path.join(self.workdir, client_id + ".log"), "ab")
        before = len(self.broker.subscriptions(client_id))
        self.processes[client_id] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while len(self.broker.subscriptions(client_id)) <= before:
            if self.processes[client_id].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("collector %s did not subscribe; see %s" % (client_id, self.workdir))
            time.sleep(0.1)

    def __enter__(self):
        for client_id in self.client_ids:
            self.start(client_id)
        return self

    def restart(self, client_id):
        """Kill -9 and start again with the same client id (its broker session resumes)."""
        process = self.processes[client_id]
        process.kill()
        process.wait(30)
        self.start(client_id)

    def __exit__(self, *exc):
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def stored_by_station(db):
    """{station: set of seqs} in the collector's ``records``."""
    with open_store(db, create=False) as store:
        seqs = {}
        for station, seq in store.query("SELECT station, seq FROM records"):
            seqs.setdefault(station, []).append(seq)
        return seqs


def record_count(db):
    with open_store(db, create=False) as store:
        return store.scalar("SELECT COUNT(*) FROM records") or 0


def exactly_once(acked, db):
    """(stored, lost, duplicated, extra) of the store against ``acked`` {station: n}."""
    stored = stored_by_station(db)
    lost = duplicated = extra = total = 0
    for station in set(acked) | set(stored):
        seqs = stored.get(station, [])
        unique = set(seqs)
        total += len(seqs)
        duplicated += len(seqs) - len(unique)
        expected = acked.get(station, 0)
        lost += sum(1 for seq in range(1, expected + 1) if seq not in unique)
        extra += sum(1 for seq in unique if seq > expected)
    return total, lost, duplicated, extra


def wait_stored(db, expected, timeout_s=600):
    """Seconds (monotonic) when ``expected`` records are stored; raises on a stall."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = record_count(db)
        if count >= expected:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError("only %d of %d records stored after %s s" % (count, expected, timeout_s))
        time.sleep(0.2)


def postgres_cpu_seconds(cluster):
    """CPU seconds of ``cluster``'s server: the postmaster and its children still running."""
    with open(os.path.join(cluster.data_dir, "postmaster.pid")) as handle:
        postmaster = int(handle.readline())
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            if int(entry) == postmaster or parent == postmaster:
                total += cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return total


def subscribed_messages(figures):
    """How many of a replay's messages a collector subscribes to (all but the telemetry)."""
    return sum(n for channel, n in figures["by_channel"].items() if channel in SUBSCRIBED_CHANNELS)


def _cpu_now(group, broker, cluster):
    """CPU seconds so far: {"collectors", "broker", "database" (given ``cluster``)}."""
    cpu = {"collectors": sum(cpu_seconds(p.pid) for p in group.processes.values()),
           "broker": cpu_seconds(broker.process.pid)}
    if cluster is not None:
        cpu["database"] = postgres_cpu_seconds(cluster)
    return cpu


def run_collected(scripts, db, collectors, stations, duration_s, workdir, speed, kill_one=False, cluster=None,
                  backlog=False):
    """Replay ``stations`` into ``collectors`` collectors on ``db``; the figures (CPU as %
    of one core over the run: the collectors', the broker's and, given ``cluster``, the
    database server's).

    ``backlog``: the collectors are stopped (SIGSTOP, their connections open) while the
    fleet publishes, so the broker queues everything for them; then they are continued and
    timed until the last record is stored. The publishers are done by then, so the figure
    is the collectors' and the database's alone, not a share of a machine the publishers
    also use."""
    with Mosquitto(max_connections=stations + 100) as broker:
        with Collectors(broker, db, collectors, workdir) as group:
            fleet = ReplayFleet(broker, scripts, stations, processes=2, speed=speed)
            started = {}

            def on_started():
                started["t"] = started["publish"] = time.monotonic()
                if backlog:
                    for process in group.processes.values():
                        os.kill(process.pid, signal.SIGSTOP)
                if kill_one:  # the first collector is killed halfway through and started again
                    started["restart"] = threading.Timer(duration_s / 2, group.restart, (group.client_ids[0],))
                    started["restart"].start()

            try:
                figures = fleet.run(duration_s, on_started=on_started)
            finally:
                if backlog:
                    before = _cpu_now(group, broker, cluster)
                    started["stored_while_stopped"] = record_count(db)
                    for process in group.processes.values():
                        os.kill(process.pid, signal.SIGCONT)
                    started["t"] = time.monotonic()
            published_end = time.monotonic()
            if kill_one:
                started["restart"].join()
            expected = sum(figures["acked"].values())
            done = wait_stored(db, expected)
            span = done - started["t"]
            after = _cpu_now(group, broker, cluster)
            if not backlog:
                before = dict.fromkeys(after, 0.0)
            cpu = {"%s_cpu_pct" % name: 100 * (after[name] - before[name]) / span for name in after}
    stored, lost, duplicated, extra = exactly_once(figures["acked"], db)
    delivered = subscribed_messages(figures)
    return {"stations": stations, "collectors": collectors, "messages": figures["messages"],
            "delivered": delivered, "published": expected, "stored": stored, "lost": lost,
            "duplicated": duplicated, "extra": extra, "backlog": backlog,
            "stored_while_stopped": started.get("stored_while_stopped"),
            "records_per_s": round(stored / span, 1), "messages_per_s": round(delivered / span, 1),
            "lag_s": round(max(0.0, done - published_end), 2),
            "publish_s": round(published_end - started["publish"], 1),
            **{name: round(value, 1) for name, value in cpu.items()}}


# -- baselines: programs that share no code with the collector ------------------------------


def _rows(db, table):
    with open_store(db, create=False) as store:
        return store.query("SELECT * FROM %s" % table)


def sqlite_bulk_rate(db, workdir):
    """Rows/s of the ``records`` and ``aggregates`` rows of ``db`` into a fresh SQLite file
    (same schema, WAL, synchronous FULL) by ``executemany`` in one transaction."""
    rows = {table: _rows(db, table) for table in ("records", "aggregates", "events")}
    path = os.path.join(workdir, "bulk.db")
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    for statement in SCHEMA:
        connection.execute(statement)
    started = time.monotonic()
    connection.execute("BEGIN")
    for table, values in rows.items():
        if values:
            connection.executemany("INSERT INTO %s VALUES (%s)" % (table, ",".join("?" * len(values[0]))), values)
    connection.execute("COMMIT")
    elapsed = time.monotonic() - started
    connection.close()
    return round(len(rows["records"]) / elapsed, 1)


def psql_copy_rate(cluster, db):
    """Records/s of the same rows loaded by ``psql``'s ``\\copy`` (CSV) into fresh tables."""
    rows = {table: _rows(db, table) for table in ("records", "aggregates", "events")}
    psql = os.path.join(cluster.bin_dir, "psql")
    setup = "".join("CREATE TABLE bulk_%s (LIKE %s INCLUDING ALL);" % (t, t) for t in rows)
    subprocess.run([psql, cluster.url, "-q", "-c", setup], check=True, capture_output=True)
    data = {}
    for table, values in rows.items():
        text = io.StringIO()
        csv.writer(text).writerows(values)
        data[table] = text.getvalue()
    directory = tempfile.mkdtemp(prefix="evse-copy-")
    try:
        for table, text in data.items():
            with open(os.path.join(directory, table + ".csv"), "w") as handle:
                handle.write(text)
        script = "BEGIN;\n" + "".join("\\copy bulk_%s FROM '%s' WITH (FORMAT csv)\n" % (t, os.path.join(directory, t + ".csv"))
                                      for t in rows) + "COMMIT;\n"
        started = time.monotonic()
        subprocess.run([psql, cluster.url, "-q", "-v", "ON_ERROR_STOP=1"], input=script, text=True,
                       check=True, capture_output=True)
        elapsed = time.monotonic() - started
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return round(len(rows["records"]) / elapsed, 1)


def bare_subscriber_rate(scripts, stations, duration_s, speed, workdir):
    """Messages/s ``mosquitto_sub`` drains of the same replayed backlog: its persistent QoS 1
    session subscribes to the collector's topics and leaves, the fleet publishes, then it
    comes back and is timed until it has every message the broker queued for it."""
    sub = os.path.join(os.path.dirname(find_mosquitto()), "mosquitto_sub")
    if not os.path.exists(sub):
        sub = shutil.which("mosquitto_sub") or "mosquitto_sub"
    with Mosquitto(max_connections=stations + 100) as broker:
        command = [sub, "-h", broker.host, "-p", str(broker.port), "-q", "1", "-c", "-i", "bench-bare"]
        for topic in subscription_topics("evse"):
            command += ["-t", topic]
        subprocess.run(command + ["-E"], check=True, timeout=60, stdout=subprocess.DEVNULL)
        figures = ReplayFleet(broker, scripts, stations, processes=2, speed=speed).run(duration_s)
        expected = subscribed_messages(figures)
        output_path = os.path.join(workdir, "bare-subscriber.out")
        with open(output_path, "wb") as output:
            started = time.monotonic()
            subprocess.run(command + ["-C", str(expected)], stdout=output, stderr=subprocess.DEVNULL, timeout=600)
            elapsed = time.monotonic() - started
        with open(output_path, "rb") as output:
            received = sum(1 for _ in output)  # one line per message (single-line payloads)
    if received != expected:
        raise RuntimeError("mosquitto_sub received %d of %d messages" % (received, expected))
    return round(received / elapsed, 1)


# The fleet run of make bench: one collector and the goal's 5,000 stations; --full: 10,000 and a group of 2.
FLEET_RUN = (5000, 60.0, 1)
FULL_FLEET_RUN = (10000, 120.0, 2)


def run(stations=1000, fleet_stations=5000, fleet_duration_s=60.0, fleet_collectors=1, ingest_duration_s=None,
        workdir=None):
    """All figures of the fleet bench, as a dict."""
    workdir = tempfile.mkdtemp(prefix="evse-bench-fleet-", dir=workdir)
    ingest_duration_s = ingest_duration_s or INGEST_S
    results = {"ingest_stations": stations, "speed": INGEST_SPEED}
    try:
        scripts = record()
        results["records_per_station_s"] = round(sum(s.records / s.period_s for s in scripts) / len(scripts), 3)
        results["messages_per_station_s"] = round(sum(len(s.entries) / s.period_s for s in scripts) / len(scripts), 3)
        sqlite_db = os.path.join(workdir, "fleet.db")
        results["sqlite"] = run_collected(scripts, sqlite_db, 1, stations, ingest_duration_s, workdir, INGEST_SPEED,
                                          backlog=True)
        results["sqlite_bulk"] = sqlite_bulk_rate(sqlite_db, workdir)
        results["bare_subscriber"] = bare_subscriber_rate(scripts, stations, ingest_duration_s, INGEST_SPEED, workdir)
        for collectors in (1, 2, 4):
            with PostgresCluster() as cluster:
                results["postgresql_%d" % collectors] = run_collected(
                    scripts, cluster.url, collectors, stations, ingest_duration_s, workdir, INGEST_SPEED,
                    cluster=cluster, backlog=True)
                if collectors == 1:
                    results["psql_copy"] = psql_copy_rate(cluster, cluster.url)
        with PostgresCluster() as cluster:
            results["fleet"] = run_collected(scripts, cluster.url, fleet_collectors, fleet_stations, fleet_duration_s,
                                             workdir, 1.0,
                                             cluster=cluster)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


CORES = os.cpu_count() or 1


def per_record_us(cpu_pct, run):
    """Core-microseconds of CPU per record stored, from a run's CPU % of a core and records/s."""
    return cpu_pct / 100 / max(run["records_per_s"], 1e-9) * 1e6


def fleet_rows(results, row):
    """The bench table's rows, through ``row(figure, measured, baseline, ratio)``."""
    lines = []
    bulk = {"sqlite": results["sqlite_bulk"], "postgresql_1": results["psql_copy"],
            "postgresql_2": results["psql_copy"], "postgresql_4": results["psql_copy"]}
    names = {"sqlite": "ingest, SQLite, 1 collector", "postgresql_1": "ingest, PostgreSQL, 1 collector",
             "postgresql_2": "ingest, PostgreSQL, group of 2", "postgresql_4": "ingest, PostgreSQL, group of 4"}
    for key, name in names.items():
        r = results[key]
        lines.append(row("%s (records/s; its DB's bulk load)" % name, "%.0f" % r["records_per_s"],
                         "%.0f" % bulk[key], r["records_per_s"] / bulk[key]))
        if key in ("postgresql_2", "postgresql_4"):
            one = results["postgresql_1"]["records_per_s"]
            lines.append(row("  against 1 collector on PostgreSQL (linear: %d.00)" % r["collectors"],
                             "%.0f" % r["records_per_s"], "%.0f" % one, r["records_per_s"] / one))
        lines.append(row("  messages/s of it (bare mosquitto_sub, same topics)", "%.0f" % r["messages_per_s"],
                         "%.0f" % results["bare_subscriber"], r["messages_per_s"] / results["bare_subscriber"]))
        lines.append(row("  lost / duplicated / extra of %d" % r["published"],
                         "%d / %d / %d" % (r["lost"], r["duplicated"], r["extra"]), "0 / 0 / 0"))
        database = r.get("database_cpu_pct")
        lines.append(row("  CPU % of a core: collectors / broker / database",
                         "%.0f / %.0f / %s" % (r["collectors_cpu_pct"], r["broker_cpu_pct"],
                                               "-" if database is None else "%.0f" % database), ""))
        lines.append(row("  CPU per record stored, core-us: collectors / database",
                         "%.0f / %s" % (per_record_us(r["collectors_cpu_pct"], r),
                                        "-" if database is None else "%.0f" % per_record_us(database, r)), ""))
        used = r["collectors_cpu_pct"] + r["broker_cpu_pct"] + (database or 0)
        lines.append(row("  the machine's %d cores in use by these" % CORES, "%.0f %%" % (used / CORES),
                         "100 %", used / CORES / 100))
    f = results["fleet"]
    lines.append(row("fleet %d stations, %d s, %d collector(s) on PostgreSQL: records published / stored"
                     % (f["stations"], f["publish_s"], f["collectors"]), "%d / %d" % (f["published"], f["stored"]),
                     "%d" % f["published"], f["stored"] / max(1, f["published"])))
    lines.append(row("  lost / duplicated / extra", "%d / %d / %d" % (f["lost"], f["duplicated"], f["extra"]),
                     "0 / 0 / 0"))
    lines.append(row("  messages/s published; collector lag after the last (s)",
                     "%.0f; %.2f" % (f["messages"] / f["publish_s"], f["lag_s"]), ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-bench-fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the fleet run with 10,000 stations for 120 s into a "
                                                            "group of 2 (default: 5,000 for 60 s into one collector)")
    parser.add_argument("--stations", type=int, default=1000, help="stations of the ingest runs (default 1000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.stations, *(FULL_FLEET_RUN if args.full else FLEET_RUN))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        def row(figure, measured, baseline="", ratio=None):
            return "%-70s %14s %14s %8s" % (figure, measured, baseline, "" if ratio is None else "%.2f" % ratio)
        print("\n".join(fleet_rows(results, row)))


if __name__ == "__main__":
    main()
