"""``evse-collector``: store a fleet's MQTT records in SQLite or PostgreSQL.

    evse-collector run --broker HOST:PORT --db URL [--group NAME] [--client-id ID] [--keys DIR]
    evse-collector register-key --db URL STATION PEMFILE
    evse-collector status --db URL [--json]

``--db`` is a SQLite file path (or ``sqlite:///PATH``) or a ``postgresql://`` URL.

Subcommands from ``report.py``: its ``add_parser(subparsers)`` adds them (each with
``add_db_argument(parser)`` from this package's ``store`` module, so ``args.db`` is set), and
``main`` calls ``report.run(args, store)`` for any subcommand that did not set a ``handler``
of its own.
"""

import argparse
import json
import logging
import os
import signal
import sys
import threading

from . import report
from .keys import pem_of, register_key, register_key_dir
from .service import DEFAULT_SESSION_EXPIRY_S, BrokerSettings, CollectorService, parse_broker
from .store import add_db_argument, open_store, redacted

log = logging.getLogger("evse.collector")

PASSWORD_ENV = "EVSE_COLLECTOR_PASSWORD"


# -- status ----------------------------------------------------------------------------------


def status_doc(store):
    """What the database holds: stations with counts and gaps, unverified sessions,
    message counters."""
    stations = []
    for station, status, first_seen, last_seen, has_key, malformed in store.query(
            "SELECT station, status, first_seen, last_seen, public_key_pem IS NOT NULL, malformed "
            "FROM stations ORDER BY station"):
        counts = dict(store.query("SELECT type, COUNT(*) FROM records WHERE station = ? GROUP BY type",
                                  (station,)))
        gaps = store.query("SELECT first_seq, last_seq, detected_at FROM gaps WHERE station = ? "
                           "ORDER BY first_seq", (station,))
        stations.append({
            "station": station, "status": status, "first_seen": first_seen, "last_seen": last_seen,
            "key": bool(has_key), "records": counts,
            "highest_seq": store.scalar("SELECT MAX(seq) FROM records WHERE station = ?", (station,)),
            "sessions": store.scalar("SELECT COUNT(*) FROM sessions WHERE station = ?", (station,)),
            "gaps": [{"first_seq": f, "last_seq": last, "detected_at": d} for f, last, d in gaps],
            "missing": sum(last - f + 1 for f, last, _ in gaps),
            "malformed": malformed,
        })
    unverified = [{"station": s, "session_id": i, "verify_error": e} for s, i, e in store.query(
        "SELECT station, session_id, verify_error FROM sessions WHERE verified = 0 "
        "ORDER BY station, session_id")]
    return {"stations": stations, "unverified_sessions": unverified,
            "counters": dict(store.query("SELECT name, value FROM counters ORDER BY name"))}


def print_status(doc, out=sys.stdout):
    stations = doc["stations"]
    print("stations: %d" % len(stations), file=out)
    for entry in stations:
        records = entry["records"]
        print("  %-20s %-8s last seen %-24s records %d (%s) highest seq %s, sessions %d, "
              "missing %d in %d gap(s), key %s, malformed %d" % (
                  entry["station"], entry["status"] or "-", entry["last_seen"] or "-",
                  sum(records.values()), ", ".join("%s %d" % item for item in sorted(records.items())) or "-",
                  entry["highest_seq"] or "-", entry["sessions"], entry["missing"], len(entry["gaps"]),
                  "yes" if entry["key"] else "NO", entry["malformed"]), file=out)
    gaps = [(entry["station"], gap) for entry in stations for gap in entry["gaps"]]
    print("gaps: %d" % len(gaps), file=out)
    for station, gap in gaps:
        print("  %-20s seq %d..%d (%d) since %s" % (station, gap["first_seq"], gap["last_seq"],
                                                    gap["last_seq"] - gap["first_seq"] + 1,
                                                    gap["detected_at"]), file=out)
    unverified = doc["unverified_sessions"]
    print("unverified sessions: %d" % len(unverified), file=out)
    for entry in unverified:
        print("  %-20s %-24s %s" % (entry["station"], entry["session_id"], entry["verify_error"]), file=out)
    counters = doc["counters"]
    print("messages: %s" % (", ".join("%s %d" % item for item in sorted(counters.items())) or "none"),
          file=out)


# -- commands --------------------------------------------------------------------------------


def cmd_run(args):
    host, port = parse_broker(args.broker)
    settings = BrokerSettings(
        host=host, port=port, prefix=args.prefix, group=args.group, client_id=args.client_id,
        username=args.username, password=os.environ.get(PASSWORD_ENV) if args.username else None,
        tls=args.tls, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
        tls_insecure=args.tls_insecure, session_expiry_s=args.session_expiry)
    store = open_store(args.db)
    try:
        if args.keys:
            for station, (changed, reverified) in register_key_dir(store, args.keys).items():
                if changed:
                    log.info("key of station %s registered from %s (%d sessions re-verified)",
                             station, args.keys, reverified)
        service = CollectorService(settings, store)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: service.stop())
        log.info("collector %s: broker %s:%d, topics %s, database %s", settings.client_id, host, port,
                 ", ".join(settings.topics), redacted(args.db))
        service.start()
        worker = threading.Thread(target=service.run, name="collector-writer")
        worker.start()
        while worker.is_alive():
            worker.join(0.5)  # the main thread stays free for signals
        totals = service.totals.as_dict()
        log.info("collector stopped: %s", ", ".join("%s %d" % item for item in totals.items()))
    finally:
        store.close()
    return 0


def cmd_register_key(args):
    pem = pem_of(args.pemfile)
    with open_store(args.db) as store:
        changed, reverified = register_key(store, args.station, pem)
    if changed:
        print("registered the key of station %s; %d session(s) changed their verification"
              % (args.station, reverified))
    else:
        print("station %s already has this key" % args.station)
    return 0


def cmd_status(args):
    with open_store(args.db) as store:
        doc = status_doc(store)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_status(doc)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="evse-collector",
        description="Store what a fleet of evse-agents publishes: every journaled record once, "
                    "sequence gaps, verified OCMF sessions.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subparsers.add_parser("run", help="subscribe and store until stopped (SIGTERM, Ctrl-C)")
    run.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default %(default)s)")
    add_db_argument(run)
    run.add_argument("--prefix", default="evse", help="topic prefix of the agents (default %(default)s)")
    run.add_argument("--group", help="share group: subscribe to $share/GROUP/PREFIX/+/CHANNEL so "
                                     "the collectors of a group split the fleet")
    run.add_argument("--client-id", help="fixed MQTT client id, one per collector (default "
                                         "evse-collector[-GROUP]-<host name>)")
    run.add_argument("--keys", metavar="DIR", help="register every <station>.pem in DIR at start")
    run.add_argument("--session-expiry", type=int, default=DEFAULT_SESSION_EXPIRY_S, metavar="S",
                     help="how long the broker keeps the collector's session and messages while "
                          "it is away (default %(default)s s)")
    run.add_argument("--username", help="broker login; the password is read from $%s" % PASSWORD_ENV)
    run.add_argument("--tls", action="store_true", help="connect with TLS (system CAs unless --ca-file)")
    run.add_argument("--ca-file", help="CA bundle for the broker's certificate (implies --tls)")
    run.add_argument("--cert-file", help="client certificate")
    run.add_argument("--key-file", help="client key")
    run.add_argument("--tls-insecure", action="store_true", help="skip the host name check (testing only)")
    run.set_defaults(handler=cmd_run)

    register = subparsers.add_parser("register-key", help="register a station's public key and "
                                                          "verify its sessions again")
    add_db_argument(register)
    register.add_argument("station")
    register.add_argument("pemfile", help="PEM public key (or hex of DER), e.g. from "
                                          "evse-agent --public-key")
    register.set_defaults(handler=cmd_register_key)

    status = subparsers.add_parser("status", help="stations, record counts, gaps, unverified sessions")
    add_db_argument(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)

    report.add_parser(subparsers)
    from . import billing
    billing.add_parser(subparsers)
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    try:
        if handler is not None:
            return handler(args)
        with open_store(args.db) as store:
            return report.run(args, store) or 0
    except (ValueError, OSError) as error:
        print("evse-collector: error: %s" % error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
