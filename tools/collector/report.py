"""``evse-collector report``: fleet figures from the collector's database.

    evse-collector report sessions-per-day   --db URL [--station S ...] [--since T] [--until T] [--out FILE]
    evse-collector report energy-per-day     billed (signed readings) and metered (register) Wh
    evse-collector report peak-hours         7 x 24 hour-of-week: plugged / charging / power
    evse-collector report utilisation        charging, connected idle, available, faulted
    evse-collector report maintenance        fault and meter-error rates, worst station first
    evse-collector report billing-csv        one row per ended session, signatures checked now
    evse-collector report plots --out DIR [--session ID]

Times are UTC; ``--since`` / ``--until`` take a date (``2026-11-23``) or an ISO time, the
window is ``[since, until)`` and defaults to the span of the data. ``--out`` writes the table
as CSV (for ``plots`` it names the directory of the PNG files).

Where each figure comes from, and how exact it is:

- sessions are counted, and their billed energy summed, on the UTC day of their plug-in;
  billed energy is the session's ``energy_wh`` (end − begin of the signed register), exact;
- metered energy per day is the import register's increase from the first reading of the
  day to the first reading of the next (from the aggregates' first and last registers):
  exact when a reading falls on midnight, otherwise off by what one poll interval around
  midnight carried;
- plugged-in time comes from the sessions' plug-in and unplug times (exact); charging time
  and power come from the aggregates: an interval counts as charging for the share
  ``avg / max`` of its total power when the power crosses ``CHARGING_W`` inside it (all of
  it when the minimum is above, none when the maximum is below). That share is exact for a
  car drawing a constant power, on or off, with evenly spaced readings; otherwise it is
  good to about one reading step per start or stop of charging;
- faulted time is the time an event that stops charging (``STOPPING_EVENTS``) is active;
  it takes precedence over connected idle; available is the rest of the window;
- billing rows are checked again when the report runs, with the station's registered key
  (``verify.verify_session``), on exactly the documents the CSV holds.

Figures are computed in Python from plain ``SELECT``s, so the same code serves SQLite and
PostgreSQL.
"""

import argparse
import bisect
import calendar
import csv
import datetime
import json
import os
import sys

from evse_agent.messages import iso_utc

from .fleet import (DAY_S, UTILISATION_STATES, WEEKDAYS, days_in, energy_per_day, maintenance, peak_hours,
                    sessions_per_day, utilisation)
from .store import add_db_argument
from .verify import verify_session

BILLING_COLUMNS = ("session_id", "station", "start", "end", "energy_wh", "begin_wh", "end_wh",
                   "ocmf_begin", "ocmf_end", "verified", "verify_error")

REPORTS = (
    ("sessions-per-day", "sessions per station per UTC day (by plug-in)"),
    ("energy-per-day", "billed and metered energy per station per UTC day, in Wh"),
    ("peak-hours", "hour-of-week heat map: cars plugged in, charging, mean fleet power"),
    ("utilisation", "seconds and share charging, connected idle, available, faulted"),
    ("maintenance", "events and meter errors per station, ranked worst first"),
    ("billing-csv", "ended sessions with energy, OCMF documents and their verification"),
    ("plots", "PNG charts: daily load profile, peak-hour heat map, a session's power curve"),
)


# -- time ------------------------------------------------------------------------------------

def parse_time(text):
    """Epoch seconds of a date (``2026-11-23``) or an ISO-8601 time (UTC unless it says
    otherwise); ValueError naming the text."""
    value = text.strip()
    try:
        if len(value) == 10:
            moment = datetime.datetime.strptime(value, "%Y-%m-%d")
        else:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("time %r is neither a date YYYY-MM-DD nor an ISO-8601 time" % text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def time_argument(text):
    """``parse_time`` for argparse: its message names the bad text."""
    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def epoch(stamp):
    """Epoch seconds of a stored time (``2026-11-23T06:42:10.213Z``, as the agent writes)."""
    if stamp is None:
        return None
    if len(stamp) == 24 and stamp[-1] == "Z" and stamp[10] == "T":
        return calendar.timegm((int(stamp[0:4]), int(stamp[5:7]), int(stamp[8:10]), int(stamp[11:13]),
                                int(stamp[14:16]), int(stamp[17:19]))) + int(stamp[20:23]) / 1000.0
    return parse_time(stamp)


# -- loading ---------------------------------------------------------------------------------

class Window:
    """The report's time window ``[since, until)`` in epoch seconds (None: open)."""

    def __init__(self, since=None, until=None):
        if since is not None and until is not None and until <= since:
            raise ValueError("--until %s is not after --since %s" % (iso_utc(until), iso_utc(since)))
        self.since = since
        self.until = until


class FleetData:
    """The rows a report needs, for the chosen stations and window, times as epoch seconds.

    ``sessions``: dicts per session; ``aggregates``: station -> interval dicts sorted by start
    (summaries only where no aggregate covers their span); ``events``: one dict per event
    number (raise and clear merged); ``keys``: station -> registered public key PEM."""

    def __init__(self, sessions, aggregates, events, keys, since, until):
        self.sessions = sessions
        self.aggregates = aggregates
        self.events = events
        self.keys = keys
        self.since = since
        self.until = until

    @property
    def stations(self):
        names = set(self.keys)
        names.update(s["station"] for s in self.sessions)
        names.update(self.aggregates)
        names.update(e["station"] for e in self.events)
        return sorted(names)


def _station_filter(stations, column="station"):
    if not stations:
        return "", ()
    return " AND %s IN (%s)" % (column, ", ".join("?" * len(stations))), tuple(stations)


def load(store, stations=None, window=None, progress=False):
    """Read sessions, aggregates, events and keys; the window is resolved to the data's span
    where it is open."""
    window = window or Window()
    since, until = window.since, window.until
    where, params = _station_filter(stations)
    keys = dict(store.query("SELECT station, public_key_pem FROM stations WHERE 1 = 1" + where, params))
    session_sql = ("SELECT station, session_id, plug_in, unplug, begin_wh, end_wh, energy_wh, charging_s, "
                   "flags, ocmf_begin, ocmf_end, ocmf_documents, verified, verify_error, seq_end "
                   "FROM sessions WHERE 1 = 1" + where)
    session_params = params
    if until is not None:
        session_sql += " AND plug_in < ?"
        session_params += (iso_utc(until),)
    if since is not None:
        session_sql += " AND (unplug IS NULL OR unplug > ?)"
        session_params += (iso_utc(since),)
    names = ("station", "session_id", "plug_in", "unplug", "begin_wh", "end_wh", "energy_wh", "charging_s",
             "flags", "ocmf_begin", "ocmf_end", "ocmf_documents", "verified", "verify_error", "seq_end")
    sessions = []
    for row in _progress(store.query(session_sql, session_params), progress, "sessions"):
        session = dict(zip(names, row))
        session["plug_in_s"] = epoch(session["plug_in"])
        session["unplug_s"] = epoch(session["unplug"])
        session["flags"] = json.loads(session["flags"]) if session["flags"] else []
        sessions.append(session)
    # Aggregates a day beyond the window on each side: the register at the next midnight.
    aggregate_sql = ('SELECT station, kind, start, "end", samples, energy_wh_start, energy_wh_end, '
                     "power_min_w, power_avg_w, power_max_w FROM aggregates WHERE 1 = 1" + where)
    aggregate_params = params
    if until is not None:
        aggregate_sql += " AND start < ?"
        aggregate_params += (iso_utc(until + DAY_S),)
    if since is not None:
        aggregate_sql += ' AND "end" > ?'
        aggregate_params += (iso_utc(since - DAY_S),)
    aggregates = _aggregates(store.query(aggregate_sql, aggregate_params), progress)
    event_sql = ('SELECT station, event_number, type, severity, state, start, "end", session_id '
                 "FROM events WHERE 1 = 1" + where)
    event_params = params
    if until is not None:
        event_sql += " AND start < ?"
        event_params += (iso_utc(until),)
    events = _events(store.query(event_sql, event_params))
    if since is None or until is None:
        starts = [s["plug_in_s"] for s in sessions] + [a[0]["start"] for a in aggregates.values() if a] \
            + [e["start"] for e in events if e["start"] is not None]
        ends = [s["unplug_s"] for s in sessions if s["unplug_s"] is not None] \
            + [a[-1]["end"] for a in aggregates.values() if a] + [e["end"] for e in events if e["end"] is not None]
        if since is None:
            since = min(starts) if starts else 0.0
        if until is None:
            until = max(ends + starts) if starts else since + DAY_S
            if until <= since:
                until = since + 1.0
    if since is not None:
        events = [e for e in events if e["end"] is None or e["end"] > since]
    return FleetData(sessions, aggregates, events, keys, since, until)


def _aggregates(rows, progress):
    by_station = {}
    summaries = {}
    for station, kind, start, end, samples, first_wh, last_wh, low, avg, high in _progress(rows, progress, "aggregates"):
        item = {"start": epoch(start), "end": epoch(end), "samples": samples, "energy_first_wh": first_wh,
                "energy_last_wh": last_wh, "power_min_w": low, "power_avg_w": avg, "power_max_w": high,
                "kind": kind}
        (summaries if kind == "summary" else by_station).setdefault(station, []).append(item)
    for items in by_station.values():
        items.sort(key=lambda item: item["start"])
    for station, items in summaries.items():
        plain = by_station.setdefault(station, [])
        starts = [item["start"] for item in plain]
        for item in items:
            # A summary stands for aggregates folded on the station; use it only where none
            # of those aggregates arrived, so nothing is counted twice.
            index = bisect.bisect_left(starts, item["start"])
            if index < len(starts) and starts[index] < item["end"]:
                continue
            plain.append(item)
        plain.sort(key=lambda item: item["start"])
    return by_station


def _events(rows):
    """One dict per event: the raise and the clear record share the event number."""
    events = {}
    for station, number, etype, severity, state, start, end, session_id in rows:
        key = (station, number) if number is not None else (station, etype, start)
        event = events.get(key)
        if event is None:
            event = events[key] = {"station": station, "number": number, "type": etype, "severity": severity,
                                   "start": epoch(start), "end": None, "session_id": session_id}
        if end is not None:
            event["end"] = epoch(end)
    return sorted(events.values(), key=lambda e: (e["station"], e["start"] or 0))


def _progress(rows, enabled, what):
    if not enabled:
        return rows
    from tqdm import tqdm
    return tqdm(rows, desc=what, unit=" rows", leave=False, file=sys.stderr, disable=None)


# -- figures ---------------------------------------------------------------------------------

def verify_billing(session, public_key_pem):
    """(verified 0/1, reason) of a session's billing row, checked now on the documents and
    figures the row holds."""
    documents = json.loads(session["ocmf_documents"]) if session["ocmf_documents"] else []
    if not documents:
        documents = [text for text in (session["ocmf_begin"], session["ocmf_end"]) if text]
    if documents and (session["ocmf_begin"] != documents[0]
                      or (session["ocmf_end"] is not None and session["ocmf_end"] != documents[-1])):
        return 0, "ocmf_begin / ocmf_end are not the session's first / last signed documents"
    doc = {"event": "end", "energy_wh": session["energy_wh"],
           "begin": {"energy_wh": session["begin_wh"]}, "end": {"energy_wh": session["end_wh"]},
           "ocmf_begin": session["ocmf_begin"], "ocmf_end": session["ocmf_end"], "ocmf_documents": documents}
    verified, reason = verify_session(doc, session["station"], public_key_pem)
    if verified is None:
        return 0, "no signed reading"
    return verified, reason


def billing_rows(data, progress=False):
    """One row per ended session plugged in within the window, oldest first."""
    ended = [s for s in data.sessions if s["seq_end"] is not None and s["energy_wh"] is not None
             and data.since <= s["plug_in_s"] < data.until]
    ended.sort(key=lambda s: (s["plug_in_s"], s["station"], s["session_id"]))
    rows = []
    for session in _progress(ended, progress, "verifying"):
        verified, reason = verify_billing(session, data.keys.get(session["station"]))
        rows.append({"session_id": session["session_id"], "station": session["station"],
                     "start": session["plug_in"], "end": session["unplug"], "energy_wh": session["energy_wh"],
                     "begin_wh": session["begin_wh"], "end_wh": session["end_wh"],
                     "ocmf_begin": session["ocmf_begin"], "ocmf_end": session["ocmf_end"],
                     "verified": "yes" if verified == 1 else "no", "verify_error": reason or ""})
    return rows


# -- output ----------------------------------------------------------------------------------

def format_table(headers, rows):
    """Plain aligned text: text columns left, numbers right."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows if row[i] is not None) and bool(rows)
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [line([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.1f" % value
    return str(value)


def write_csv(path, headers, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def _percent(part, whole):
    return 100.0 * part / whole if whole else 0.0


def tables(name, data, progress=False):
    """[(title, headers, rows)] of one report."""
    if name == "sessions-per-day":
        figures = sessions_per_day(data)
        stations = sorted(figures["counts"])
        rows = [[day] + [figures["counts"][s][day] for s in stations] + [sum(figures["counts"][s][day] for s in stations)]
                for day in figures["days"]]
        rows.append(["total"] + [sum(figures["counts"][s].values()) for s in stations]
                    + [sum(sum(c.values()) for c in figures["counts"].values())])
        return [("Sessions per UTC day (by plug-in)", ["day"] + stations + ["fleet"], rows)]
    if name == "energy-per-day":
        figures = energy_per_day(data)
        rows = []
        for station in sorted(figures):
            for day, cell in figures[station].items():
                rows.append([day, station, cell["sessions"], cell["billed_wh"], cell["metered_wh"]])
        days = days_in(data.since, data.until)
        for day in days:
            rows.append([day, "fleet", sum(figures[s][day]["sessions"] for s in figures),
                         sum(figures[s][day]["billed_wh"] for s in figures),
                         sum(figures[s][day]["metered_wh"] for s in figures)])
        return [("Energy per UTC day: billed on the plug-in day, metered by the register",
                 ["day", "station", "sessions", "billed_wh", "metered_wh"], rows)]
    if name == "peak-hours":
        figures = peak_hours(data)
        result = []
        for key, title, scale in (("charging", "Stations charging (mean)", 1.0),
                                  ("plugged", "Cars plugged in (mean)", 1.0),
                                  ("power_w", "Fleet power (mean kW)", 0.001)):
            table = figures[key]
            rows = [["%02d:00" % hour] + [None if table[d][hour] is None else round(table[d][hour] * scale, 2)
                                          for d in range(7)] for hour in range(24)]
            result.append((title + " by hour of week, UTC", ["hour"] + list(WEEKDAYS), rows))
        return result
    if name == "utilisation":
        figures = utilisation(data)
        rows = []
        for station in sorted(figures):
            cell = figures[station]
            row = [station]
            for state in UTILISATION_STATES:
                row += [round(cell[state]), round(_percent(cell[state], cell["window_s"]), 1)]
            rows.append(row)
        headers = ["station"]
        for state in UTILISATION_STATES:
            headers += [state + "_s", state + "_%"]
        return [("Utilisation %s to %s" % (iso_utc(data.since), iso_utc(data.until)), headers, rows)]
    if name == "maintenance":
        rows = [[r["rank"], r["station"], r["sessions"], r["events"], r["critical"], r["warning"],
                 round(r["critical_per_day"], 2), round(r["events_per_day"], 2),
                 None if r["events_per_100_sessions"] is None else round(r["events_per_100_sessions"], 1),
                 r["meter_offline"], round(r["meter_offline_per_day"], 2), round(r["meter_offline_s"]),
                 r["meter_flagged_sessions"], r["unverified_sessions"],
                 ", ".join("%s %d" % item for item in sorted(r["by_type"].items(), key=lambda i: (-i[1], i[0])))]
                for r in maintenance(data)]
        return [("Maintenance candidates, worst first",
                 ["rank", "station", "sessions", "events", "critical", "warning", "critical/day", "events/day",
                  "events/100 sessions", "meter_offline", "offline/day", "offline_s", "meter-flagged sessions",
                  "unverified", "by type"], rows)]
    if name == "billing-csv":
        rows = billing_rows(data, progress)
        return [("Billing", list(BILLING_COLUMNS), [[row[c] for c in BILLING_COLUMNS] for row in rows])]
    raise ValueError("unknown report %r" % (name,))


# -- command line ----------------------------------------------------------------------------

def add_parser(subparsers):
    """The ``report`` command and its subcommands, on the collector's argparse subparsers."""
    parser = subparsers.add_parser("report", help="fleet reports from the database",
                                   description=__doc__.split("\n\n")[0])
    reports = parser.add_subparsers(dest="report", metavar="REPORT", required=True)
    for name, help_text in REPORTS:
        sub = reports.add_parser(name, help=help_text, description=help_text)
        add_db_argument(sub)
        sub.add_argument("--station", action="append", default=[], metavar="ID",
                         help="only this station (repeatable)")
        sub.add_argument("--since", type=time_argument, metavar="TIME", help="window start (date or ISO time, UTC)")
        sub.add_argument("--until", type=time_argument, metavar="TIME", help="window end, exclusive")
        if name == "plots":
            sub.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files")
            sub.add_argument("--session", metavar="ID", help="also draw this session's power curve")
        else:
            sub.add_argument("--out", metavar="FILE",
                             help="write the table(s) as CSV here (billing-csv: the CSV; default: print it)")
    return parser


def run(args, store, stdout=None):
    """Run the report ``args.report``; returns the exit status."""
    out = stdout or sys.stdout
    progress = getattr(args, "progress", True) and sys.stderr.isatty()
    try:
        window = Window(args.since, args.until)
        data = load(store, args.station, window, progress)
    except ValueError as error:
        print("evse-collector report: %s" % error, file=sys.stderr)
        return 2
    if args.station:
        unknown = [s for s in args.station if s not in data.stations]
        if unknown:
            print("evse-collector report: no data for station(s) %s" % ", ".join(unknown), file=sys.stderr)
            return 2
    if args.report == "plots":
        from . import plots
        try:
            written = plots.write_plots(data, args.out, args.session)
        except ValueError as error:
            print("evse-collector report plots: %s" % error, file=sys.stderr)
            return 2
        for path in written:
            print(path, file=out)
        return 0
    results = tables(args.report, data, progress)
    if args.report == "billing-csv":
        _, headers, rows = results[0]
        if args.out:
            write_csv(args.out, headers, rows)
            print("%d sessions, %d verified, written to %s" % (
                len(rows), sum(1 for r in rows if r[headers.index("verified")] == "yes"), args.out), file=out)
        else:
            writer = csv.writer(out)
            writer.writerow(headers)
            writer.writerows(rows)
        return 0
    for number, (title, headers, rows) in enumerate(results):
        if number:
            print(file=out)
        print(title, file=out)
        print(format_table(headers, rows), file=out)
    if args.out:
        if len(results) == 1:
            write_csv(args.out, results[0][1], results[0][2])
        else:
            base, ext = os.path.splitext(args.out)
            for title, headers, rows in results:
                slug = title.split(" by ")[0].split(" (")[0].lower().replace(" ", "-")
                write_csv("%s-%s%s" % (base, slug, ext or ".csv"), headers, rows)
    return 0
