"""Console commands ``events``, ``journal`` (and ``journal verify``), ``mqtt`` and ``log``.

Bound to ``Console`` when a command of this group is first used (see the package
docstring): ``self`` is the console."""

import asyncio
import binascii
import json

from .. import log
from ..ocmf import parse_document
from . import (CommandError, WIDTH, _count_arg, _date_time, _duration, _fit, _no_args, _pad,
    _size, match)


async def cmd_events(self, args):
    count = _count_arg(args, "events", 10, 1000)
    monitor = self.agent.monitor
    if monitor is None:
        raise CommandError("this agent has no power monitor")
    events = []
    for event in reversed(monitor.recent):  # a raised-then-cleared event is listed twice
        if event not in events:
            events.insert(0, event)
    events = events[-count:]
    if not events:
        self._say("no events since the agent started")
    else:
        self._say("    #  start (UTC)          lasted    severity  type")
        for event in events:
            if event.end is None:
                lasted = "active"
            elif event.end == event.start:
                lasted = "once"
            else:
                lasted = _duration(event.end - event.start)
            self._say("%5d  %s  %s%s%s" % (event.number, _date_time(event.start), _pad(lasted, 10),
                                           _pad(event.severity, 10), _fit(event.type, 28)))
            values = " ".join("%s=%s" % (k, json.dumps(v)) for k, v in sorted(event.values.items())) \
                if isinstance(event.values, dict) else str(event.values)
            if values:
                self._say("       " + _fit(values, WIDTH - 8))
    active = sorted(monitor.active)
    self._say("active now: %s" % (", ".join(active) if active else "none"))

async def cmd_journal(self, args):
    if args:
        sub = match(args[0], ("stats", "verify"), "journal command")
        _no_args(args[1:], "journal " + sub)
        if sub == "verify":
            await self._verify_journal()
            return
    journal = self.journal
    stats = journal.stats()
    forwarder = self.agent.forwarder
    rows = [
        ("size", "%s of %s in %d segment(s), %s" % (_size(stats["bytes"]), _size(stats["max_bytes"]),
                                                    stats["segments"], self.agent.config["journal"]["dir"])),
        ("sequence", "next %d, acknowledged up to %d, on disk up to %d"
         % (stats["next_seq"], stats["acked"], journal.synced_seq)),
        ("backlog", "%d record(s) not yet acknowledged, %d held in memory"
         % (stats["backlog"], stats["pending_in_memory"])),
    ]
    if forwarder is not None:
        fstats = forwarder.stats()
        rows.append(("forwarder", "%d in flight (window %d), %d published since start"
                     % (fstats["inflight"], forwarder.window, fstats["published"])))
    rows.append(("written", "%s since start; %d aggregate(s) folded or refused"
                 % (_size(stats["bytes_written"]), stats["dropped_records"])))
    rows.append(("alarms", ", ".join(stats["alarms"]) or "none"))
    report = journal.report
    if report is not None:
        rows.append(("at start", "%d segment(s), %d record(s), torn tail %d bytes, %d damaged"
                     % (report.segments, report.records, report.torn_bytes, report.corrupt)))
    self._table(rows)

async def _verify_journal(self):
    """The core's journal check (``journal_check``), segment by segment with a yield
    between them; OCMF signatures checked with the station's own key."""
    from ..journal_check import JournalCheck, report_lines
    journal = self.journal
    signer = self.agent.engine.signer if self.agent.engine is not None else None
    check_document = None
    if signer is not None and hasattr(signer, "verify"):
        def check_document(text):
            return self._ocmf_problem(text, signer)
    check = JournalCheck(check_document)
    for segment in list(journal.segments):
        check.segment(segment.name, journal.fs.read(segment.name))
        await asyncio.sleep(0)
    check.finish()
    for line in report_lines(check, 20, WIDTH):
        self._say(line)

def _ocmf_problem(self, text, signer):
    """Why an OCMF document does not verify with the station's key, or None."""
    try:
        _, signature, payload_text = parse_document(text)
        sd = binascii.unhexlify(signature["SD"])
    except (ValueError, TypeError) as error:
        return "malformed: %s" % error
    if not signer.verify(payload_text.encode(), sd):
        return "signature INVALID: does not verify with the station key"
    return None

async def cmd_mqtt(self, args):
    _no_args(args, "mqtt")
    config = self.agent.config["mqtt"]
    publisher = self.publisher
    stats = self.journal.stats()
    forwarder = self.agent.forwarder
    inflight = forwarder.stats()["inflight"] if forwarder is not None else 0
    self._table((
        ("broker", "%s:%d, TLS %s, login %s" % (config["host"], config["port"],
                                               "on" if config["tls"]["enabled"] else "off",
                                               config["username"] or "none")),
        ("client id", config["client_id"]),
        ("link", "%s (%d connect(s) since start)" % ("connected" if publisher.connected else "DISCONNECTED",
                                                     getattr(publisher, "connects", 0))),
        ("last error", publisher.last_error or "none"),
        ("backlog", "%d journal record(s) not yet acknowledged, %d in flight" % (stats["backlog"], inflight)),
        ("published", "%d journal record(s) and %d live message(s) since start"
         % (forwarder.published if forwarder is not None else 0, self.agent.outbox.posted)),
        ("topics", self.agent.topics.base + "/..."),
    ))

async def cmd_log(self, args):
    count = _count_arg(args, "log", 20, log.RING_SIZE)
    lines = log.recent(count)
    if not lines:
        self._say("no log lines yet")
    for level, text in lines:
        self._say("%s %s" % (_pad(log.LEVEL_NAMES.get(level, str(level)), 8), text))


METHODS = (cmd_events, cmd_journal, _verify_journal, _ocmf_problem, cmd_mqtt, cmd_log)
