"""Durable agent state that must survive restarts and power loss: the open session and counters.

Small JSON documents, each replaced atomically through the port's file system object
(``fs.write_atomic`` writes a temporary file, syncs it and renames it over the old one),
so a crash leaves either the old or the new document, never a torn one.

The file system object is the port's (``read``, ``write_atomic``, ``remove``; contract in
``ports/__init__.py``); names are relative to the agent's state directory.

Damage is recovered, not believed: the counters are also kept in a second directory
(``backup_fs``, the journal's) and each counter starts from the higher copy; after the
journal is recovered, ``recover_from_journal`` raises every counter to what the journal shows
was issued (session ids, OCMF pages, event numbers) and, when the open-session file is
damaged or gone, rebuilds the open session from its journaled records (flagged
``recovered_from_journal``). A state write the disk refuses (full, failing) is logged and
kept in memory: numbering and alarms never need the disk. Damage found is listed in
``damage`` for the operator's events (``state_damaged``).
"""

import json

from . import log
from .journal import EVENT, SESSION

COUNTERS = "counters.json"
OPEN_SESSION = "open-session.json"
CONSOLE_LOCK = "console-lock.json"  # the console's wrong-PIN back-off, across restarts


class StateStore:
    """Counters (session number, OCMF pagination) and the open session, kept durable."""

    def __init__(self, fs, backup_fs=None):
        self.fs = fs
        self.backup_fs = backup_fs
        self.damage = []  # ("state_damaged", values) found at start, reported as events
        self.unsaved = False  # a counter change the disk refused (kept in memory, written later)
        self.recovered_session = None  # the open session rebuilt from the journal, if any
        self._open_doc = None  # (document,) once recover_from_journal read the file
        main = self._load(COUNTERS) or {}
        backup = (self._load(COUNTERS, backup_fs) or {}) if backup_fs is not None else {}
        self.counters = {}
        for name in ("session", "transaction_page", "fiscal_page", "event"):
            best = 0
            for doc in (main, backup):
                value = doc.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > best:
                    best = value
            self.counters[name] = best

    def _load(self, name, fs=None):
        fs = fs or self.fs
        try:
            data = fs.read(name)
        except OSError as error:
            log.error("cannot read state file %s (%s)" % (name, error))
            self.damage.append(("state_damaged", {"file": name, "error": str(error)[:80]}))
            return None
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except ValueError as error:
            # write_atomic never leaves a torn file; this is outside damage. Keep a copy.
            log.error("state file %s is damaged (%s); keeping it as %s.damaged" % (name, error, name))
            self.damage.append(("state_damaged", {"file": name, "error": str(error)[:80]}))
            try:
                fs.write_atomic(name + ".damaged", data)
            except OSError as write_error:
                log.error("cannot keep %s.damaged (%s)" % (name, write_error))
            return None
        if not isinstance(doc, dict):
            log.error("state file %s does not hold an object; ignoring it" % name)
            self.damage.append(("state_damaged", {"file": name, "error": "not an object"}))
            return None
        return doc

    def next_number(self, counter):
        """The next value of ``counter`` (session, transaction_page, fiscal_page, event), saved."""
        value = self.counters[counter] + 1
        self.counters[counter] = value
        self._save_counters()
        return value

    def _save_counters(self):
        """Write the counters; a refusing disk (full, failing) keeps them in memory only —
        numbering never needs the disk, so an alarm can still be raised on a full disk."""
        data = json.dumps(self.counters).encode()
        try:
            self.fs.write_atomic(COUNTERS, data)
            if self.backup_fs is not None:
                self.backup_fs.write_atomic(COUNTERS, data)
            self.unsaved = False
        except OSError as error:
            if not self.unsaved:
                log.error("cannot save %s (%s); counters kept in memory" % (COUNTERS, error))
            self.unsaved = True

    def raise_floor(self, floors, source):
        """Counters at least ``floors`` ({name: highest value ever used}): what the journal
        shows was issued, when the counter file was damaged, lost or behind it."""
        changed = []
        for name in floors:
            if name in self.counters and floors[name] > self.counters[name]:
                changed.append("%s %d -> %d" % (name, self.counters[name], floors[name]))
                self.counters[name] = floors[name]
        if changed:
            log.warning("counters behind %s, raised: %s" % (source, ", ".join(changed)))
            self.damage.append(("state_damaged", {"file": COUNTERS, "error": "behind " + source,
                                                  "raised": changed}))
            self._save_counters()
        return changed

    def load_pin_backoff(self):
        """``(failures, retry_at)`` of the console's PIN lock as last saved: wrong PINs in a
        row and the wall-clock time (epoch s) before which no PIN is tried; (0, 0.0) if none."""
        doc = self._load(CONSOLE_LOCK) or {}
        failures, retry_at = doc.get("failures"), doc.get("retry_at")
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0 \
                or isinstance(retry_at, bool) or not isinstance(retry_at, (int, float)):
            return 0, 0.0
        return failures, float(retry_at)

    def save_pin_backoff(self, failures, retry_at):
        """Keep the PIN back-off, so that a restart gives no fresh fast tries. A refusing
        disk is logged; the back-off then holds until the next restart only."""
        try:
            self.fs.write_atomic(CONSOLE_LOCK, json.dumps({"failures": failures, "retry_at": retry_at}).encode())
        except OSError as error:
            log.error("cannot save %s (%s); PIN back-off kept in memory" % (CONSOLE_LOCK, error))

    def load_open_session(self):
        """The open session's saved document (or the one rebuilt from the journal), or None."""
        if self._open_doc is not None:
            doc, self._open_doc = self._open_doc[0], None  # read once by recover_from_journal
        else:
            doc = self._load(OPEN_SESSION)
        if doc is None and self.recovered_session is not None:
            log.warning("open session %s rebuilt from the journal" % self.recovered_session["id"])
            doc = self.recovered_session
        return doc

    def recover_from_journal(self, journal):
        """Raise the counters to what the journal shows was issued and, if the open-session
        file is damaged or gone, rebuild the open session from its records."""
        floors = {"session": 0, "transaction_page": 0, "fiscal_page": 0, "event": 0}
        last = {}  # session id -> (first record time ms, last session record body)
        seq = 0
        while True:
            records = journal.read_after(seq, 256)
            if not records:
                break
            for record in records:
                seq = record.seq
                if record.type not in (SESSION, EVENT):
                    continue
                try:
                    body = json.loads(record.payload)
                    if record.type == EVENT:
                        number = body["event_number"]
                        if isinstance(number, int) and number > floors["event"]:
                            floors["event"] = number
                        continue
                    _session_floors(body, floors)
                    sid = body["session_id"]
                    first = last[sid][0] if sid in last else record.time_ms
                    last[sid] = (first, body)
                except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                    continue
        self.raise_floor(floors, "the journal")
        self._open_doc = (self._load(OPEN_SESSION),)
        if self._open_doc[0] is not None:
            return
        open_ones = [(first, body) for first, body in last.values() if body.get("event") != "end"]
        if not open_ones:
            return
        first, body = max(open_ones, key=lambda item: item[0])
        try:
            self.recovered_session = _session_from_record(body, first / 1000.0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            log.error("cannot rebuild session %s from the journal (%s)" % (body.get("session_id"), error))
            return
        self.damage.append(("state_damaged", {"file": OPEN_SESSION, "error": "rebuilt from the journal",
                                              "session_id": body["session_id"]}))

    def save_open_session(self, doc):
        try:
            self.fs.write_atomic(OPEN_SESSION, json.dumps(doc).encode())
        except OSError as error:
            # The journal holds the session's records; the engine carries on in memory.
            log.error("cannot save %s (%s)" % (OPEN_SESSION, error))

    def clear_open_session(self):
        try:
            self.fs.remove(OPEN_SESSION)
        except OSError as error:
            log.error("cannot remove %s (%s)" % (OPEN_SESSION, error))


def _session_floors(body, floors):
    """Raise ``floors`` to the session number and OCMF pages a session record carries."""
    number = int(body["session_id"].rsplit("-", 1)[1])
    if number > floors["session"]:
        floors["session"] = number
    for document in body.get("ocmf_documents") or []:
        page = json.loads(document.split("|")[1]).get("PG", "")
        name = "transaction_page" if page[:1] == "T" else "fiscal_page" if page[:1] == "F" else None
        if name is not None and page[1:].isdigit() and int(page[1:]) > floors[name]:
            floors[name] = int(page[1:])


def _session_from_record(body, plug_in_time):
    """An open-session document rebuilt from the session's last journaled record. A
    single-segment session continues from its begin reading; otherwise (or without one) it
    takes a new begin reading — energy before it is not billed, and the flag says so."""
    sid = body["session_id"]
    begin = body.get("begin")
    flags = list(body.get("flags") or []) + ["recovered_from_journal"]
    segments = []
    pending = "begin"
    if isinstance(begin, dict) and body.get("segments") == 1 and isinstance(begin.get("energy_wh"), int):
        segments = [{"begin": begin, "end": None, "serial": begin.get("serial")}]
        pending = None
    else:
        flags.append("begin_delayed")  # the next good reading is the begin
        if body.get("segments"):
            flags.append("energy_before_recovery_unbilled")
    return {
        "v": 1, "id": sid, "number": int(sid.rsplit("-", 1)[1]), "plug_in_time": plug_in_time,
        "unplug_time": None, "segments": segments, "charging_ms": 0, "period": "idle",
        "period_start_time": None, "max_power_w": body.get("max_power_w"),
        "max_current_a": body.get("max_current_a") or [], "events": body.get("events") or [],
        "flags": flags, "documents": list(body.get("ocmf_documents") or []) if segments else [],
        "pending": pending, "last_reading": begin if segments else None, "advertised_a": None,
    }
