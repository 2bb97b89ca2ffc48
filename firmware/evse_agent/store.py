"""Durable agent state that must survive restarts and power loss: the open session and counters.

Small JSON documents, each replaced atomically through the port's file system object
(``fs.write_atomic`` writes a temporary file, syncs it and renames it over the old one),
so a crash leaves either the old or the new document, never a torn one.

The file system object offers ``read(name) -> bytes or None``, ``write_atomic(name, data)``
and ``remove(name)``; names are relative to the agent's state directory.
"""

import json

from . import log

COUNTERS = "counters.json"
OPEN_SESSION = "open-session.json"


class StateStore:
    """Counters (session number, OCMF pagination) and the open session, kept durable."""

    def __init__(self, fs):
        self.fs = fs
        self.damage = []  # ("state_damaged", values) found at start, reported as events
        self.unsaved = False  # a counter change the disk refused (kept in memory, written later)
        self.counters = self._load(COUNTERS) or {}
        for name in ("session", "transaction_page", "fiscal_page", "event"):
            value = self.counters.get(name)
            if not isinstance(value, int) or value < 0:
                self.counters[name] = 0

    def _load(self, name):
        data = self.fs.read(name)
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except ValueError as error:
            # write_atomic never leaves a torn file; this is outside damage. Keep a copy.
            log.error("state file %s is damaged (%s); keeping it as %s.damaged" % (name, error, name))
            self.damage.append(("state_damaged", {"file": name, "error": str(error)[:80]}))
            try:
                self.fs.write_atomic(name + ".damaged", data)
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
        try:
            self.fs.write_atomic(COUNTERS, json.dumps(self.counters).encode())
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

    def load_open_session(self):
        """The open session's saved document, or None."""
        return self._load(OPEN_SESSION)

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
