"""Per-driver billing: drivers and vehicles by RFID tag, statements per period, and
verification bundles a driver can check with the S.A.F.E. transparency software.

Who charged is read from the session's signed OCMF documents (``IT`` ``ISO14443`` and
``ID`` of the last document, the same in every document of the session: tools/cli/ocmf_verify
refuses a session whose documents disagree), not from unsigned record fields. A session
is billed when the collector verified it (``sessions.verified = 1``: every signature
checks with the station's registered key and the energy equals the signed registers).

- ``drivers`` (table, created here): ``tag`` (UID hex) -> ``name``, ``vehicle``,
  ``group_name``, ``tariff`` (price per kWh, decimal text in the currency unit, e.g.
  ``0.39``). One row per card: a driver with two cards, or a pool car's card, is two rows.
- Price of a session, in integer cents: ``energy_wh * tariff * 100 / 1000`` rounded half
  up to a whole cent, per session; a statement's total is the sum of its sessions' rounded
  prices (so every line of the CSV adds up to the total exactly). Energy is integer Wh from
  the signed registers; no floating point anywhere.
- Sessions belong to the period their plug-in falls in (UTC). Not billed, and listed in
  ``not-billed.csv`` with the reason: a tag no driver has (``unknown_tag``), no tag
  (``unidentified``), not verified (``unverified``), not ended (``open``).
- A statement is a folder ``<out>/<period>/``: ``<driver>.csv`` per driver with sessions,
  ``not-billed.csv``, ``statement.json`` (totals) and ``bundles/<session>.xml``. It is
  written into a temporary folder and renamed into place: a statement exists whole or not
  at all, and an existing one is never rewritten.

Verification bundle: the Transparenzsoftware reads XML ``<values><value ...><publicKey
encoding="hex">..</publicKey><signedData format="OCMF" encoding="plain">OCMF|..
</signedData></value></values>`` (SAFE-eV/transparenzsoftware ``src/main/resources/
values.xsd``: ``value`` holds an optional ``publicKey`` then an optional ``signedData``;
``context`` and integer ``transactionId`` attributes pair a ``Transaction.Begin`` with a
``Transaction.End`` record). The agent's end document repeats the begin reading, which
makes it a complete transaction by itself — the software and pyocmf refuse it as the
partner of the begin document — so each document is a ``value`` of its own without
``transactionId``; the end document verifies and shows the billed energy on its own.
"""

import csv
import datetime
import io
import json
import os
import re
import shutil
import time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives import serialization

from .store import add_db_argument, open_store

DRIVERS_SCHEMA = """CREATE TABLE IF NOT EXISTS drivers (
    tag TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    vehicle TEXT,
    group_name TEXT,
    tariff TEXT NOT NULL
)"""
ROUNDING = "per session, half up to a whole cent; totals are sums of the rounded session prices"
TAG_PATTERN = re.compile(r"^(?:[0-9A-F]{8}|[0-9A-F]{14})$")
CSV_FIELDS = ("session_id", "station", "plug_in", "unplug", "tag", "vehicle", "energy_wh",
              "tariff_per_kwh", "price_cents", "bundle")


def ensure_schema(store):
    with store.transaction():
        store.execute(DRIVERS_SCHEMA)


def parse_tag(text):
    tag = (text or "").strip().upper()
    if not TAG_PATTERN.match(tag):
        raise ValueError("tag %r is not an ISO 14443 UID (8 or 14 hex digits)" % (text,))
    return tag


def parse_tariff(text):
    try:
        tariff = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError("tariff %r is not a number (price per kWh, e.g. 0.39)" % (text,)) from None
    if not tariff.is_finite() or tariff < 0 or tariff.as_tuple().exponent < -6:
        raise ValueError("tariff %r must be a price per kWh >= 0 with at most 6 decimals" % (text,))
    return tariff


def price_cents(energy_wh, tariff):
    """Integer cents of ``energy_wh`` at ``tariff`` per kWh, rounded half up."""
    cents = Decimal(energy_wh) * tariff * 100 / 1000
    return int(cents.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def add_driver(store, tag, name, tariff, vehicle=None, group=None):
    tag = parse_tag(tag)
    tariff = parse_tariff(tariff)
    if not name or not name.strip():
        raise ValueError("driver of tag %s has no name" % tag)
    with store.transaction():
        store.execute(
            "INSERT INTO drivers (tag, name, vehicle, group_name, tariff) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (tag) DO UPDATE SET name = excluded.name, vehicle = excluded.vehicle, "
            "group_name = excluded.group_name, tariff = excluded.tariff",
            (tag, name.strip(), vehicle or None, group or None, str(tariff)))
    return tag


def import_drivers(store, path):
    """Add every row of a CSV file (tag,name,vehicle,group,tariff); ValueError names the line."""
    count = 0
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), 2):
            try:
                add_driver(store, row.get("tag"), row.get("name"), row.get("tariff"),
                           row.get("vehicle"), row.get("group"))
            except ValueError as error:
                raise ValueError("%s line %d: %s" % (path, line, error)) from None
            count += 1
    return count


def drivers(store):
    rows = store.query("SELECT tag, name, vehicle, group_name, tariff FROM drivers ORDER BY name, tag")
    return {tag: {"tag": tag, "name": name, "vehicle": vehicle, "group": group,
                  "tariff": Decimal(tariff)} for tag, name, vehicle, group, tariff in rows}


# -- periods -----------------------------------------------------------------------------


def _iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def period_of(kind, moment):
    """(label, start, end) of the period of ``kind`` (month, day, or ``<N>s``) holding
    ``moment`` (an aware UTC datetime)."""
    utc = datetime.timezone.utc
    if kind == "month":
        start = datetime.datetime(moment.year, moment.month, 1, tzinfo=utc)
        end = datetime.datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=utc)
        return start.strftime("%Y-%m"), start, end
    if kind == "day":
        start = datetime.datetime(moment.year, moment.month, moment.day, tzinfo=utc)
        return start.strftime("%Y-%m-%d"), start, start + datetime.timedelta(days=1)
    match = re.match(r"^(\d+)s$", kind or "")
    if not match or int(match.group(1)) < 1:
        raise ValueError("period %r is not month, day or <seconds>s (e.g. 3600s)" % (kind,))
    length = int(match.group(1))
    epoch = int(moment.timestamp()) // length * length
    start = datetime.datetime.fromtimestamp(epoch, utc)
    return start.strftime("%Y-%m-%dT%H%M%SZ"), start, start + datetime.timedelta(seconds=length)


def _parse_iso(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)


# -- the statement -----------------------------------------------------------------------


def _user_of(documents):
    """(type, id, level) of the user assignment in the last document, or None."""
    if not documents:
        return None
    payload = json.loads(documents[-1].split("|")[1])
    if not payload.get("IS"):
        return None
    return payload.get("IT"), payload.get("ID"), payload.get("IL")


def statement(store, start, end):
    """Sessions plugged in within [start, end) (aware datetimes), attributed and priced."""
    known = drivers(store)
    rows = store.query(
        "SELECT station, session_id, plug_in, unplug, energy_wh, verified, verify_error, ocmf_documents "
        "FROM sessions WHERE plug_in >= ? AND plug_in < ? ORDER BY plug_in, station, session_id",
        (_iso(start), _iso(end)))
    per_driver = {}
    not_billed = []
    for station, session_id, plug_in, unplug, energy_wh, verified, verify_error, documents_json in rows:
        documents = json.loads(documents_json) if documents_json else []
        user = _user_of(documents)
        item = {"session_id": session_id, "station": station, "plug_in": plug_in, "unplug": unplug,
                "energy_wh": energy_wh, "tag": user[1] if user and user[0] == "ISO14443" else None,
                "level": user[2] if user else None, "documents": documents}
        if unplug is None:
            item["reason"] = "open"
        elif energy_wh is None:
            item["reason"] = "no_energy"
        elif verified != 1:
            item["reason"] = "unverified: %s" % (verify_error or "no signed reading")
        elif item["tag"] is None:
            item["reason"] = "unidentified"
        elif item["tag"] not in known:
            item["reason"] = "unknown_tag"
        if "reason" in item:
            not_billed.append(item)
            continue
        driver = known[item["tag"]]
        item["vehicle"] = driver["vehicle"]
        item["tariff"] = driver["tariff"]
        item["price_cents"] = price_cents(energy_wh, driver["tariff"])
        per_driver.setdefault(driver["name"], {"name": driver["name"], "group": driver["group"],
                                               "sessions": []})["sessions"].append(item)
    for entry in per_driver.values():
        entry["energy_wh"] = sum(s["energy_wh"] for s in entry["sessions"])
        entry["price_cents"] = sum(s["price_cents"] for s in entry["sessions"])
    return {"start": _iso(start), "end": _iso(end), "drivers": per_driver, "not_billed": not_billed,
            "rounding": ROUNDING}


def _slug(name):
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return slug or "driver"


def _key_hex(store, station):
    pem = store.scalar("SELECT public_key_pem FROM stations WHERE station = ?", (station,))
    if not pem:
        return None
    key = serialization.load_pem_public_key(pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der.hex().upper()


def bundle_xml(documents, key_hex):
    """The Transparenzsoftware input file of one session's documents (see the module doc)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<values>"]
    for document in documents:
        out.append("  <value>")
        if key_hex:
            out.append('    <publicKey encoding="hex">%s</publicKey>' % key_hex)
        out.append('    <signedData format="OCMF" encoding="plain">%s</signedData>' % escape(document))
        out.append("  </value>")
    out.append("</values>")
    return "\n".join(out) + "\n"


def _csv_text(rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def write_statement(store, out_dir, label, start, end):
    """Write the statement of one period into ``out_dir/label`` (whole or not at all);
    returns its path, or None when it exists already."""
    target = os.path.join(out_dir, label)
    if os.path.exists(target):
        return None
    doc = statement(store, start, end)
    tmp = os.path.join(out_dir, ".%s.tmp-%d" % (label, os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "bundles"))
    keys = {}
    summary = {"period": label, "start": doc["start"], "end": doc["end"], "rounding": ROUNDING,
               "drivers": {}, "not_billed": []}
    for item in [s for d in doc["drivers"].values() for s in d["sessions"]] + doc["not_billed"]:
        if item["documents"]:
            if item["station"] not in keys:
                keys[item["station"]] = _key_hex(store, item["station"])
            item["bundle"] = "bundles/%s.xml" % item["session_id"]
            with open(os.path.join(tmp, item["bundle"]), "w") as handle:
                handle.write(bundle_xml(item["documents"], keys[item["station"]]))
        else:
            item["bundle"] = ""
    for name, entry in sorted(doc["drivers"].items()):
        rows = [CSV_FIELDS]
        for s in entry["sessions"]:
            rows.append((s["session_id"], s["station"], s["plug_in"], s["unplug"], s["tag"], s["vehicle"] or "",
                         s["energy_wh"], str(s["tariff"]), s["price_cents"], s["bundle"]))
        rows.append(("TOTAL", "", "", "", "", "", entry["energy_wh"], "", entry["price_cents"], ""))
        filename = _slug(name) + ".csv"
        with open(os.path.join(tmp, filename), "w", newline="") as handle:
            handle.write("# %s, %s to %s; price rounding: %s\n" % (name, doc["start"], doc["end"], ROUNDING))
            handle.write(_csv_text(rows))
        summary["drivers"][name] = {"group": entry["group"], "file": filename, "sessions": len(entry["sessions"]),
                                    "energy_wh": entry["energy_wh"], "price_cents": entry["price_cents"]}
    rows = [("session_id", "station", "plug_in", "unplug", "tag", "level", "energy_wh", "reason", "bundle")]
    for s in doc["not_billed"]:
        rows.append((s["session_id"], s["station"], s["plug_in"], s["unplug"] or "", s["tag"] or "",
                     s["level"] or "", "" if s["energy_wh"] is None else s["energy_wh"], s["reason"], s["bundle"]))
        summary["not_billed"].append({"session_id": s["session_id"], "tag": s["tag"], "reason": s["reason"]})
    with open(os.path.join(tmp, "not-billed.csv"), "w", newline="") as handle:
        handle.write(_csv_text(rows))
    with open(os.path.join(tmp, "statement.json"), "w") as handle:
        json.dump(summary, handle, indent=1, sort_keys=True)
    os.rename(tmp, target)
    return target


def export_due(store, out_dir, kind, now=None, grace_s=3600):
    """Write the statement of every period of ``kind`` that has sessions, ended at least
    ``grace_s`` before ``now`` and has no statement yet; returns the paths written."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    os.makedirs(out_dir, exist_ok=True)
    first = store.scalar("SELECT MIN(plug_in) FROM sessions")
    written = []
    if first is None:
        return written
    label, start, end = period_of(kind, _parse_iso(first))
    while end + datetime.timedelta(seconds=grace_s) <= now:
        has = store.scalar("SELECT COUNT(*) FROM sessions WHERE plug_in >= ? AND plug_in < ?",
                           (_iso(start), _iso(end)))
        if has:
            path = write_statement(store, out_dir, label, start, end)
            if path:
                written.append(path)
        label, start, end = period_of(kind, end)
    return written


# -- command line ------------------------------------------------------------------------


def add_parser(subparsers):
    drivers_cmd = subparsers.add_parser("drivers", help="drivers and vehicles by RFID tag, with tariffs")
    add_db_argument(drivers_cmd)
    drivers_cmd.add_argument("action", choices=("add", "import", "list"))
    drivers_cmd.add_argument("--tag")
    drivers_cmd.add_argument("--name")
    drivers_cmd.add_argument("--vehicle")
    drivers_cmd.add_argument("--group")
    drivers_cmd.add_argument("--tariff", help="price per kWh, e.g. 0.39")
    drivers_cmd.add_argument("--file", help="CSV with columns tag,name,vehicle,group,tariff")
    drivers_cmd.set_defaults(handler=cmd_drivers)

    bill = subparsers.add_parser("billing", help="per-driver statements: report, export, schedule")
    add_db_argument(bill)
    bill.add_argument("action", choices=("report", "export", "schedule"))
    bill.add_argument("--period", default="month", help="month, day or <seconds>s (default month)")
    bill.add_argument("--at", help="report: a UTC time inside the period (default now)")
    bill.add_argument("--out", help="export/schedule: folder of the statements")
    bill.add_argument("--grace", type=int, default=3600, help="seconds after a period ends before its "
                                                               "statement is written (default 3600)")
    bill.add_argument("--every", type=float, default=60.0, help="schedule: seconds between looks")
    bill.add_argument("--json", action="store_true")
    bill.set_defaults(handler=cmd_billing)


def cmd_drivers(args):
    with open_store(args.db) as store:
        ensure_schema(store)
        if args.action == "add":
            tag = add_driver(store, args.tag, args.name, args.tariff, args.vehicle, args.group)
            print("driver %s: tag %s" % (args.name, tag))
        elif args.action == "import":
            if not args.file:
                raise ValueError("drivers import needs --file")
            print("%d driver tag(s) imported" % import_drivers(store, args.file))
        else:
            for d in drivers(store).values():
                print("%-14s %-20s %-16s %-10s %s/kWh" % (d["tag"], d["name"], d["vehicle"] or "-",
                                                        d["group"] or "-", d["tariff"]))
    return 0


def cmd_billing(args):
    with open_store(args.db) as store:
        ensure_schema(store)
        if args.action == "report":
            moment = _parse_iso(args.at) if args.at else datetime.datetime.now(datetime.timezone.utc)
            label, start, end = period_of(args.period, moment)
            doc = statement(store, start, end)
            if args.json:
                print(json.dumps({"period": label, "drivers": {
                    n: {"sessions": len(e["sessions"]), "energy_wh": e["energy_wh"], "price_cents": e["price_cents"]}
                    for n, e in doc["drivers"].items()},
                    "not_billed": [{"session_id": s["session_id"], "tag": s["tag"], "reason": s["reason"]}
                                   for s in doc["not_billed"]]}, indent=1, sort_keys=True))
                return 0
            print("period %s (%s to %s); rounding %s" % (label, doc["start"], doc["end"], ROUNDING))
            for name, e in sorted(doc["drivers"].items()):
                print("%-24s %3d session(s) %10d Wh %8d.%02d" % (name, len(e["sessions"]), e["energy_wh"],
                                                                 e["price_cents"] // 100, e["price_cents"] % 100))
            for s in doc["not_billed"]:
                print("not billed: %s tag %s: %s" % (s["session_id"], s["tag"] or "-", s["reason"]))
            return 0
        if not args.out:
            raise ValueError("billing %s needs --out FOLDER" % args.action)
        while True:
            for path in export_due(store, args.out, args.period, grace_s=args.grace):
                print("statement %s" % path, flush=True)
            if args.action == "export":
                return 0
            time.sleep(args.every)
