"""Who charged: RFID taps bound to sessions, with the OCMF user-assignment fields.

A tag tapped on the reader (``pn532.Pn532Reader`` calls ``tap(uid)``) identifies a session:

- a tap at most ``identification.tap_before_s`` before plug-in identifies the session that
  plug-in opens;
- a tap while a session is open, at most ``identification.tap_after_s`` after its plug-in,
  identifies that session if it has no identification yet. Until then the session's begin
  document waits unsigned (its reading is taken and kept as usual), so that the begin and
  end documents carry the same identification; it is signed when the tag is bound, when
  the window closes, or before any other transaction document of the session.

The first tag bound wins; later taps are logged and kept for the next plug-in.

OCMF user assignment (OCMF-en.md, Tables 4, 11, 13, 17) of a bound tag:

- ``IT`` ``ISO14443``, ``ID`` the UID as 8 or 14 upper-case hex digits (4 or 7 bytes);
- ``IF`` ``["RFID_PLAIN"]``: "assignment via external RFID card reader". A PN532 reading a
  card's UID is not a protected reader (``RFID_RELATED``) and uses no key (``RFID_PSK``);
- ``IS`` true and ``IL`` by the allow-list: a listed UID is ``TRUSTED`` ("can be trusted to
  some extent, but there is no absolute reliability. Example: authorization by backend" —
  the list comes from the board file, the technician or the backend). It is not
  ``VERIFIED`` ("verified by the signature component and special measures"): a UID is
  readable and copyable by anyone, and matching it against a list is no special measure.
  An unlisted UID is ``HEARSAY`` ("unsecured; e.g. by reading an RFID UID"): recorded with
  its UID, never dropped, and the collector lists it as unknown rather than billing it.

A session without a tag carries ``IS`` false, ``IL`` NONE, ``IT`` NONE.

The allow-list comes from the board file (``identification.allow_list``), the console
(``id allow`` / ``id deny``, until restart) and the retained MQTT topic
``<prefix>/<station>/allow_list`` (``{"tags": ["04A1B2C3D4E5F6", ...]}``), which replaces
the board file's list when it arrives. Anyone who may publish there decides the level
written into signed documents: restrict that topic to the backend with broker ACLs.

This module only identifies: it never switches the contactor.
"""

import json

from . import log
from .messages import iso_utc
from .ocmf import Identification

ID_TYPE = "ISO14443"
ID_FLAGS = ("RFID_PLAIN",)
LEVEL_LISTED = "TRUSTED"
LEVEL_UNLISTED = "HEARSAY"


def parse_uid(value, where="tag"):
    """An ISO 14443 UID as upper-case hex of 4 or 7 bytes; ValueError naming ``where``."""
    if not isinstance(value, str):
        raise ValueError("%s: %r is not a hex string" % (where, value))
    text = value.strip().upper()
    if len(text) not in (8, 14) or any(ch not in "0123456789ABCDEF" for ch in text):
        raise ValueError("%s: %r is not an ISO 14443 UID (8 or 14 hex digits)" % (where, value))
    return text


def parse_allow_list(entries, where="identification.allow_list"):
    """The set of UIDs in ``entries`` (a list of hex strings); ValueError naming the entry."""
    if not isinstance(entries, list):
        raise ValueError("%s: expected a list of tag UIDs, got %r" % (where, entries))
    listed = set()
    for index, entry in enumerate(entries):
        listed.add(parse_uid(entry, "%s[%d]" % (where, index)))
    return listed


def identification_doc(uid, listed, time):
    """The identification kept in the session record: UID, OCMF level and flags, tap time."""
    return {
        "type": ID_TYPE,
        "uid": uid,
        "level": LEVEL_LISTED if listed else LEVEL_UNLISTED,
        "listed": listed,
        "flags": list(ID_FLAGS),
        "tapped": iso_utc(time),
    }


def ocmf_identification(doc):
    """The OCMF user assignment of a session's identification doc (None: no user)."""
    if doc is None:
        return None
    return Identification(True, doc["level"], doc["flags"], doc["type"], doc["uid"])


class IdentificationDesk:
    """Takes taps, keeps the allow-list, and binds tags to the engine's sessions."""

    def __init__(self, config, clock, engine, allow_list_topic=None):
        self.tap_before_ms = int(config["tap_before_s"] * 1000)
        self.tap_after_s = config["tap_after_s"]
        self.clock = clock
        self.engine = engine
        self.allow_list_topic = allow_list_topic
        self.allowed = parse_allow_list(config["allow_list"])
        self.allow_list_source = "board file"
        self.reader = None
        self.waiting = None  # (identification doc, monotonic ms of the tap) for the next plug-in
        self.taps = 0
        self.bound = 0
        self.unlisted = 0
        self.expired = 0
        self.rejected_lists = 0
        self.last_tag = None

    # -- taps ------------------------------------------------------------------------

    def tap(self, uid):
        """A new tap from the reader: bind it to the open session, or keep it for plug-in."""
        self.taps += 1
        listed = uid in self.allowed
        if not listed:
            self.unlisted += 1
        doc = identification_doc(uid, listed, self.clock.time())
        self.last_tag = doc
        if self.engine.identify(doc):
            self.bound += 1
            return
        self.waiting = (doc, self.clock.monotonic_ms())
        log.info("id: tag %s (%s) waits for a plug-in within %d s"
                 % (uid, "listed" if listed else "not listed", self.tap_before_ms // 1000))

    def claim_for_plug_in(self):
        """The tag tapped within ``tap_before_s`` before now (plug-in), used up; or None."""
        waiting = self.waiting
        if waiting is None:
            return None
        self.waiting = None
        doc, tapped_ms = waiting
        if self.clock.monotonic_ms() - tapped_ms > self.tap_before_ms:
            self.expired += 1
            log.info("id: tag %s was tapped too long before plug-in; not used" % doc["uid"])
            return None
        self.bound += 1
        return doc

    # -- allow-list ------------------------------------------------------------------

    def allow(self, uid, source):
        """Add a tag to the allow-list; ``source`` names who changed the list (``status``)."""
        uid = parse_uid(uid)
        self.allowed = self.allowed | {uid}
        self.allow_list_source = source
        return uid

    def deny(self, uid, source):
        """Take a tag off the allow-list; ``source`` as for ``allow``."""
        uid = parse_uid(uid)
        self.allowed = self.allowed - {uid}
        self.allow_list_source = source
        return uid

    def on_allow_list_message(self, payload):
        """The retained allow-list from the backend (MQTT thread on CPython: it only swaps a
        reference). A bad message is logged with what is wrong and the list kept."""
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict) or "tags" not in doc:
                raise ValueError("expected {\"tags\": [UID, ...]}")
            allowed = parse_allow_list(doc["tags"], "allow_list message tags")
        except ValueError as error:
            self.rejected_lists += 1
            log.error("id: allow-list message refused, keeping %d tag(s): %s" % (len(self.allowed), error))
            return
        self.allowed = allowed
        self.allow_list_source = "backend"
        log.info("id: allow-list from the backend: %d tag(s)" % len(allowed))

    # -- the reader task -------------------------------------------------------------

    async def run(self):
        if self.reader is not None:
            await self.reader.run()

    def stop(self):
        if self.reader is not None:
            self.reader.stop()

    def status(self):
        return {
            "reader": None if self.reader is None else self.reader.status(),
            "allow_list": sorted(self.allowed),
            "allow_list_source": self.allow_list_source,
            "taps": self.taps, "bound": self.bound, "unlisted": self.unlisted,
            "expired": self.expired, "rejected_lists": self.rejected_lists,
            "waiting": None if self.waiting is None else self.waiting[0]["uid"],
            "last_tag": self.last_tag,
        }


def identification_desk(config, clock, engine, publisher, topics, stream):
    """The desk that binds an RFID reader's taps to ``engine``'s sessions, with the reader on
    ``stream`` (the port's serial line to the PN532); the agent builds it when the board has one."""
    from .pn532 import Pn532Reader

    config = config["identification"]
    topic = topics.base + "/allow_list"
    desk = IdentificationDesk(config, clock, engine, topic)
    desk.reader = Pn532Reader(stream, clock, desk.tap, config["poll_interval_ms"],
                              config["debounce_ms"])
    engine.identifier = desk
    if config["allow_list_topic"] and hasattr(publisher, "subscribe"):
        publisher.subscribe(topic, desk.on_allow_list_message)
    return desk
