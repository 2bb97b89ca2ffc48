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
            self.fs.write_atomic(name + ".damaged", data)
            return None
        if not isinstance(doc, dict):
            log.error("state file %s does not hold an object; ignoring it" % name)
            return None
        return doc

    def next_number(self, counter):
        """The next value of ``counter`` (session, transaction_page, fiscal_page, event), saved."""
        value = self.counters[counter] + 1
        self.counters[counter] = value
        self.fs.write_atomic(COUNTERS, json.dumps(self.counters).encode())
        return value

    def load_open_session(self):
        """The open session's saved document, or None."""
        return self._load(OPEN_SESSION)

    def save_open_session(self, doc):
        self.fs.write_atomic(OPEN_SESSION, json.dumps(doc).encode())

    def clear_open_session(self):
        self.fs.remove(OPEN_SESSION)
