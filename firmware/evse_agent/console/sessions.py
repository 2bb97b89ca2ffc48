"""Console commands ``session`` and ``sessions``: the open session and finished ones read back from the journal.

Bound to ``Console`` when a command of this group is first used (see the package
docstring): ``self`` is the console."""

import asyncio

from ..journal import SESSION
from . import (CommandError, WIDTH, _count_arg, _date_time, _duration, _fit, _pad, _record_doc,
    _rpad, _shown, match)


async def cmd_session(self, args):
    if args:
        match(args[0], ("show",), "session command")
        if len(args) != 2:
            raise CommandError("usage: session show <id or number>")
        await self._show_session(self._session_id(args[1]))
        return
    engine = self.agent.engine
    if engine is None:
        raise CommandError("this agent has no session engine")
    session = engine.session
    if session is None:
        self._say("no open session; 'sessions' lists the last ones")
    else:
        self._show_open(session)
    for ending in engine.ending:
        self._say("%s: unplugged, waiting for its end reading (%s)" % (ending.id, ending.pending or "-"))

def _session_id(self, text):
    if text.isdigit() and len(text) <= 9:
        return "%s-%06d" % (self.agent.config["station_id"], int(text))
    return text

def _show_open(self, session):
    begin = session.segments[0]["begin"] if session.segments else None
    energy = self.agent.engine.energy_so_far()
    self._table((
        ("session", "%s (open, %s)" % (session.id, session.period)),
        ("plug-in", "%s UTC" % _date_time(session.plug_in_time)),
        ("begin", "-" if begin is None else "%d Wh at %s UTC" % (begin["energy_wh"], _date_time(begin["time"]))),
        ("so far", "%s Wh in %d segment(s)" % ("-" if energy is None else energy, len(session.segments))),
        ("waiting", "for the %s reading" % session.pending if session.pending else "for nothing"),
        ("events", ", ".join("#%d %s" % (e["number"], e["type"]) for e in session.events) or "none"),
        ("flags", ", ".join(session.flags) or "none"),
        ("documents", "%d OCMF document(s) signed so far" % len(session.documents)),
    ))

async def _scan_sessions(self, visit):
    """Call ``visit(seq, doc)`` for every session record still in the journal, in seq
    order; yields to the other tasks between chunks (a journal can be large)."""
    seq = 0
    while True:
        records = self.journal.read_after(seq, 128)
        if not records:
            return
        for record in records:
            seq = record.seq
            if record.type == SESSION:
                doc = _record_doc(record)
                if doc is not None:
                    visit(record.seq, doc)
        await asyncio.sleep(0)

async def cmd_sessions(self, args):
    count = _count_arg(args, "sessions", 10, 1000)
    latest = {}
    order = []

    def visit(seq, doc):
        sid = doc.get("session_id")
        if sid not in latest:
            order.append(sid)
        latest[sid] = {"event": doc.get("event"), "plug_in": doc.get("plug_in"),
                       "plugged_s": doc.get("plugged_s"), "energy_wh": doc.get("energy_wh"),
                       "flags": doc.get("flags") or []}

    await self._scan_sessions(visit)
    if not order:
        self._say("no session records in the journal (acknowledged segments are deleted)")
        return
    shown = order[-count:]
    width = max(8, min(24, max(len(str(sid)) for sid in shown)))
    self._say(_pad("session", width) + "  plug-in (UTC)     plugged    energy Wh  state, flags")
    for sid in shown:
        doc = latest[sid]
        plug_in = doc["plug_in"] or ""
        ended = doc["event"] == "end"
        plugged = _duration(doc["plugged_s"]) if ended and isinstance(doc["plugged_s"], (int, float)) else "-"
        energy = doc["energy_wh"] if ended and doc["energy_wh"] is not None else "-"
        notes = ", ".join(["ended" if ended else "open"] + doc["flags"])
        self._say(_pad(str(sid), width) + "  " + _pad(plug_in[:10] + " " + plug_in[11:16], 16)
                  + "  " + _pad(plugged, 9) + _rpad(str(energy), 11) + "  "
                  + _fit(notes, WIDTH - 1 - width - 42))
    self._say("%d of %d session(s) still in the journal; 'session show <id>' for one"
              % (len(shown), len(order)))

async def _show_session(self, sid):
    engine = self.agent.engine
    found = []

    def visit(seq, doc):
        if doc.get("session_id") == sid:
            found[:] = [seq, doc]

    await self._scan_sessions(visit)
    if engine is not None and engine.session is not None and engine.session.id == sid:
        self._show_open(engine.session)
        if not found:
            return
    if not found:
        raise CommandError("no session %s in the journal (acknowledged segments are deleted)" % _shown(sid))
    seq, doc = found
    begin = doc.get("begin") or {}
    end = doc.get("end") or {}
    self._table((
        ("session", "%s (%s record, journal seq %d)" % (sid, doc.get("event"), seq)),
        ("plug-in", str(doc.get("plug_in"))),
        ("unplug", str(doc.get("unplug"))),
        ("begin", "%s Wh at %s, meter %s" % (begin.get("energy_wh"), begin.get("ts"), begin.get("serial"))
         if begin else "-"),
        ("end", "%s Wh at %s, meter %s" % (end.get("energy_wh"), end.get("ts"), end.get("serial"))
         if end else "-"),
        ("energy", "%s Wh in %s segment(s)" % (doc.get("energy_wh"), doc.get("segments"))),
        ("time", "plugged %s s, charging %s s, idle %s s" % (doc.get("plugged_s"), doc.get("charging_s"),
                                                            doc.get("idle_s"))),
        ("power", "max %s W, average %s W" % (doc.get("max_power_w"), doc.get("avg_power_w"))),
        ("current", "max %s A" % " ".join(str(c) for c in doc.get("max_current_a") or [])),
        ("events", ", ".join("#%s %s" % (e.get("number"), e.get("type")) for e in doc.get("events") or [])
         or "none"),
        ("flags", ", ".join(doc.get("flags") or []) or "none"),
    ))
    documents = doc.get("ocmf_documents") or []
    self._say("OCMF documents (%d), one per line, for an OCMF verifier:" % len(documents))
    for document in documents:
        self._say(str(document))


METHODS = (cmd_session, _session_id, _show_open, _scan_sessions, cmd_sessions, _show_session)
