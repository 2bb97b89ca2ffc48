"""Look at a journal directory offline: stats, dump, verify, export.

    evse-journal --dir run/journal stats
    evse-journal --board boards/sim.json dump --type session --from-seq 100
    evse-journal --dir run/journal verify --key station-public.pem
    evse-journal --dir run/journal export --since 2026-11-25T00:00:00Z > backlog.jsonl

The directory is ``--dir``, or the ``journal.dir`` of the board file given with ``--board``
(a relative path counts from the current directory, as it does for the agent).

Read-only: the tool never truncates, rewrites or deletes anything. A torn final record is
reported here and cut off by the agent's own ``recover()`` at its next start. Frames are
decoded with the journal's own code (``journal.scan``), so the tool and the agent agree on
what a valid record is; records whose seq does not follow the one before are left out,
as ``recover()`` leaves them out. ``verify`` is the core's ``journal_check`` (the check
the console's ``journal verify`` runs, in the same words) with the OCMF signatures checked
by ``ocmf_verify``; it reports missing seqs between the records present (numbers before
the first one were in segments deleted after acknowledgement) and ends with one summary
line (on stderr when there are problems).

Exit status: 0 fine, 1 ``verify`` found problems (one line each on stdout), 2 usage
errors, a missing directory, an unreadable file or an unusable key.
"""

import argparse
import datetime
import json
import os
import sys

from evse_agent import journal
from evse_agent.config import ConfigError, load_board
from evse_agent.journal_check import JournalCheck, report_lines
from evse_agent.messages import iso_utc

from .ocmf_verify import Document, Invalid, load_public_key

PROG = "evse-journal"
TYPE_BY_NAME = {name: rtype for rtype, name in journal.TYPE_NAMES.items()}


class ToolError(Exception):
    """A problem that stops the tool: the message is printed as one line, exit status 2."""


# -- reading the directory (never writing) ------------------------------------------------


class SegmentScan:
    """One segment file as the journal's scanner sees it."""

    def __init__(self, name, size, records, torn, corrupt):
        self.name = name
        self.size = size
        self.records = records  # valid frames, in file order
        self.torn = torn  # offset where a torn / unreadable tail starts, or None
        self.corrupt = corrupt
        self.damaged = _damaged_stretches(records, torn, size)

    @property
    def torn_bytes(self):
        return 0 if self.torn is None else self.size - self.torn


def _damaged_stretches(records, torn, size):
    """(start, end) byte ranges between valid frames that ``scan`` skipped as damaged."""
    stretches = []
    position = 0
    for record in records:
        if record.offset > position:
            stretches.append((position, record.offset))
        position = record.offset + record.size
    end = torn if torn is not None else size
    if end > position:  # cannot happen with scan's contract; reported rather than hidden
        stretches.append((position, end))
    return stretches


class JournalView:
    """Everything in a journal directory: segments, accepted records, cursor, leftovers."""

    def __init__(self, directory):
        self.directory = directory
        if not os.path.exists(directory):
            raise ToolError("journal directory %s does not exist" % directory)
        if not os.path.isdir(directory):
            raise ToolError("journal directory %s is not a directory" % directory)
        try:
            names = os.listdir(directory)
        except OSError as error:
            raise ToolError("cannot list journal directory %s: %s" % (directory, _reason(error)))
        segment_names = sorted(n for n in names if journal._segment_first_seq(n) is not None)
        self.leftovers = sorted(n for n in names if n.endswith(".tmp"))
        # Damaged final records the agent moved aside at start (journal.QUARANTINE_PREFIX).
        self.quarantined = sorted(n for n in names if n.startswith(journal.QUARANTINE_PREFIX))
        self.segments = []
        self.records = []  # accepted records, in seq order
        self.out_of_order = []  # (segment name, record) that do not follow the seq before
        highest = 0
        for name in segment_names:
            data = self._read(name)
            records, torn, corrupt = journal.scan(data)
            segment = SegmentScan(name, len(data), records, torn, corrupt)
            segment.damaged_tail = torn is not None and journal.damaged_tail(data, torn)
            self.segments.append(segment)
            for record in records:
                record.segment = name
                if record.seq <= highest:
                    self.out_of_order.append(record)
                    continue
                highest = record.seq
                self.records.append(record)
        self.cursor, self.cursor_state = self._read_cursor()

    def _read(self, name):
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as error:
            raise ToolError("cannot read %s: %s" % (path, _reason(error)))

    def _read_cursor(self):
        """(acknowledged seq, "ok" | "missing" | "damaged"), by the journal's own rules."""
        path = os.path.join(self.directory, journal.CURSOR_FILE)
        if not os.path.exists(path):
            return 0, "missing"
        data = self._read(journal.CURSOR_FILE)
        try:
            acked = json.loads(data)["acked"]
        except (ValueError, KeyError, TypeError):
            return 0, "damaged"
        if isinstance(acked, bool) or not isinstance(acked, int) or acked < 0:
            return 0, "damaged"
        return acked, "ok"

    @property
    def total_bytes(self):
        return sum(segment.size for segment in self.segments)


def _reason(error):
    return error.strerror or str(error)


def _json_payload(record):
    """The record's payload as JSON, or None when it is not JSON."""
    try:
        return json.loads(record.payload)
    except (ValueError, UnicodeDecodeError):
        return None


def _type_name(rtype):
    return journal.TYPE_NAMES.get(rtype, "type-%d" % rtype)


def _record_line(record, with_place):
    body = _json_payload(record)
    line = {"seq": record.seq, "type": _type_name(record.type), "time": iso_utc(record.time_ms / 1000),
            "time_ms": record.time_ms}
    if with_place:
        line["segment"] = record.segment
        line["offset"] = record.offset
    if body is None:
        line["payload"] = None
        line["payload_hex"] = record.payload.hex()
    else:
        line["payload"] = body
    return line


# -- subcommands -----------------------------------------------------------------------------


def stats_of(view):
    """The numbers ``stats`` prints, as a dict."""
    by_type = {}
    for record in view.records:
        name = _type_name(record.type)
        by_type[name] = by_type.get(name, 0) + 1
    backlog = [r.seq for r in view.records if r.seq > view.cursor]
    return {
        "directory": view.directory,
        "segments": len(view.segments),
        "segment_files": [{"name": s.name, "bytes": s.size, "records": len(s.records),
                           "first_seq": s.records[0].seq if s.records else None,
                           "last_seq": s.records[-1].seq if s.records else None}
                          for s in view.segments],
        "bytes": view.total_bytes,
        "records": len(view.records),
        "records_by_type": by_type,
        "first_seq": view.records[0].seq if view.records else None,
        "last_seq": view.records[-1].seq if view.records else None,
        "acked": view.cursor,
        "cursor": view.cursor_state,
        "backlog": len(backlog),
        "backlog_seq": [backlog[0], backlog[-1]] if backlog else None,
        "torn_tail": [{"segment": s.name, "offset": s.torn, "bytes": s.torn_bytes,
                       "last_segment": s is view.segments[-1]}
                      for s in view.segments if s.torn is not None],
        "damaged": [{"segment": s.name, "start": start, "end": end}
                    for s in view.segments for start, end in s.damaged],
        "out_of_order": [{"segment": r.segment, "offset": r.offset, "seq": r.seq} for r in view.out_of_order],
        "leftover_files": view.leftovers,
    }


def cmd_stats(view, args, out):
    stats = stats_of(view)
    if args.json:
        out.write(json.dumps(stats) + "\n")
        return 0
    lines = ["directory: %s" % stats["directory"],
             "segments: %d, %d bytes" % (stats["segments"], stats["bytes"])]
    for segment in stats["segment_files"]:
        lines.append("  %s  %8d bytes  %6d records%s" % (
            segment["name"], segment["bytes"], segment["records"],
            "  seq %d..%d" % (segment["first_seq"], segment["last_seq"]) if segment["records"] else ""))
    by_type = ", ".join("%s %d" % (name, stats["records_by_type"].get(name, 0))
                        for name in journal.TYPE_NAMES.values())
    lines.append("records: %d (%s)" % (stats["records"], by_type))
    lines.append("seq: %s" % ("%d..%d" % (stats["first_seq"], stats["last_seq"]) if stats["records"] else "none"))
    cursor = {"ok": "%d" % stats["acked"],
              "missing": "0 (no %s: the agent replays everything)" % journal.CURSOR_FILE,
              "damaged": "0 (%s is damaged: the agent replays everything)" % journal.CURSOR_FILE}
    lines.append("acknowledged: %s" % cursor[stats["cursor"]])
    lines.append("backlog: %d records%s" % (
        stats["backlog"], " (seq %d..%d)" % tuple(stats["backlog_seq"]) if stats["backlog_seq"] else ""))
    if stats["torn_tail"]:
        for torn in stats["torn_tail"]:
            lines.append("torn tail: %d bytes at offset %d of %s (%s)" % (
                torn["bytes"], torn["offset"], torn["segment"],
                "the agent cuts it off at its next start" if torn["last_segment"]
                else "not the last segment: the agent skips these bytes"))
    else:
        lines.append("torn tail: none")
    lines.append("damaged stretches: %s" % (", ".join(
        "%s bytes %d..%d" % (d["segment"], d["start"], d["end"]) for d in stats["damaged"]) or "none"))
    if stats["out_of_order"]:
        lines.append("out of order (left out): %s" % ", ".join(
            "seq %d in %s" % (r["seq"], r["segment"]) for r in stats["out_of_order"]))
    if stats["leftover_files"]:
        lines.append("leftover temporary files: %s" % ", ".join(stats["leftover_files"]))
    out.write("\n".join(lines) + "\n")
    return 0


def cmd_dump(view, args, out):
    wanted = set(TYPE_BY_NAME[name] for name in args.type) if args.type else None
    for record in view.records:
        if record.seq < args.from_seq or (wanted is not None and record.type not in wanted):
            continue
        out.write(json.dumps(_record_line(record, True)) + "\n")
    return 0


def verify_check(view, public_key):
    """The core's ``JournalCheck`` over every file of ``view``: frames, sequence, payloads,
    and OCMF signatures checked with ``ocmf_verify`` (not the signing code), required."""
    def check_document(text):
        try:
            Document(text).verify(public_key)
        except Invalid as error:
            return str(error)
        return None

    check = JournalCheck(None if public_key is None else check_document, signatures_required=True)
    for segment in view.segments:
        check.segment(segment.name, view._read(segment.name))
    for name in view.quarantined:
        check.quarantined(name, view._read(name))
    check.finish()
    return check


def cmd_verify(view, args, out):
    public_key = None
    if args.key is not None:
        try:
            public_key = load_public_key(args.key)
        except ValueError as error:
            raise ToolError(str(error))
    check = verify_check(view, public_key)
    lines = report_lines(check)
    for problem in lines[:-1]:
        out.write(problem + "\n")
    if check.problems:
        sys.stderr.write("%s: %s (%s)\n" % (PROG, lines[-1], view.directory))
        return 1
    out.write(lines[-1] + "\n")
    return 0


def parse_since(text):
    """("seq", n) for a number, ("time_ms", epoch ms) for an ISO-8601 time; ValueError otherwise."""
    text = text.strip()
    if text.isdigit():
        return "seq", int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("%r is neither a sequence number nor an ISO-8601 time "
                         "(e.g. 2026-11-25T06:50:00Z)" % text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return "time_ms", int(round(moment.timestamp() * 1000))


def cmd_export(view, args, out):
    key, bound = args.since
    skipped = 0
    for record in view.records:
        if (record.seq if key == "seq" else record.time_ms) < bound:
            continue
        body = _json_payload(record)
        if not isinstance(body, dict):
            skipped += 1
            continue
        out.write(json.dumps({"seq": record.seq, "type": _type_name(record.type),
                              "time": iso_utc(record.time_ms / 1000), "message": body}) + "\n")
    if skipped:
        sys.stderr.write("%s: %d record(s) without a JSON payload left out\n" % (PROG, skipped))
    return 0


# -- command line ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see %s --help)\n" % (PROG, message, PROG))


def _since(text):
    try:
        return parse_since(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _seq(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a sequence number" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not a sequence number" % text)
    return value


def build_parser():
    where = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the subcommand they override, else the values before it stand.
    where.add_argument("--dir", default=argparse.SUPPRESS, help="the journal directory")
    where.add_argument("--board", default=argparse.SUPPRESS,
                       help="board file whose journal.dir is the directory (when --dir is not given)")
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="exit status: 0 fine, 1 verify found problems, 2 usage or I/O errors")
    parser.add_argument("--dir", default=None, help="the journal directory")
    parser.add_argument("--board", default=None,
                        help="board file whose journal.dir is the directory (when --dir is not given)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    stats = commands.add_parser("stats", parents=[where],
                                help="segments, records by type, seq range, cursor, backlog, damage")
    stats.add_argument("--json", action="store_true", help="one JSON object instead of text")
    dump = commands.add_parser("dump", parents=[where], help="records as JSON lines")
    dump.add_argument("--type", action="append", choices=sorted(TYPE_BY_NAME),
                      help="only records of this type (repeat for several)")
    dump.add_argument("--from-seq", type=_seq, default=0, help="only records with seq >= this")
    verify = commands.add_parser("verify", parents=[where],
                                 help="CRCs, sequence without gaps, OCMF signatures; exit 1 on problems")
    verify.add_argument("--key", help="station public key: hex of its DER, or a file with PEM or that hex")
    export = commands.add_parser("export", parents=[where],
                                 help="records since a seq or time as JSON lines, for re-ingest")
    export.add_argument("--since", required=True, type=_since,
                        help="a seq (records with seq >= it) or an ISO-8601 time (records at or after it)")
    return parser


def journal_dir(args):
    if args.dir:
        return args.dir
    if args.board:
        try:
            return load_board(args.board)["journal"]["dir"]
        except ConfigError as error:
            raise ToolError(str(error))
    raise ToolError("no journal directory: give --dir DIR or --board BOARD_FILE")


COMMANDS = {"stats": cmd_stats, "dump": cmd_dump, "verify": cmd_verify, "export": cmd_export}


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        view = JournalView(journal_dir(args))
        return COMMANDS[args.command](view, args, out)
    except ToolError as error:
        sys.stderr.write("%s: error: %s\n" % (PROG, error))
        return 2
    except BrokenPipeError:  # e.g. `evse-journal dump | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
