"""Charging sessions: plug-in to unplug, charging and idle periods, exact billing energy.

``SessionEngine`` owns the session lifecycle. Its inputs are the debounced charge-point
inputs (``on_inputs``: pilot state, advertised current, contactor lines) and the meter's
good readings (``on_reading``). Its outputs are session records and OCMF-signed begin /
end readings, handed to ``publish(kind, doc)``, and the durable open-session document in
the ``StateStore`` that lets a session survive an agent restart with its energy exact.

Billing energy is end reading minus begin reading of the meter's cumulative import
register, in integer Wh — never integrated power. A reading is *exact for now* when the
contactor has been open since before the reading was taken: no current can have flowed
since, so the register still holds that value. Begin and end use such a reading at once
when there is one; otherwise the engine asks the meter for a fresh reading and takes the
next good one (flagged ``begin_delayed`` / ``end_delayed`` if the meter was offline).

If the register goes backwards, jumps by more than a charge point could draw in the time
between two readings, or the meter's serial number changes (meter reset or replaced), the running segment is closed at
the last good reading and a new one begins at the next: the session bills the sum of its
segments and carries a flag, so it never bills a negative or implausible amount.
"""

from . import log
from .messages import iso_utc
from .identification import ocmf_identification
from .ocmf import OcmfReading, build_payload, sign_document

SESSION_KEYS_VERSION = 1
MAX_AC_CURRENT_A = 80.0  # IEC 61851-1: the largest current a PWM duty can advertise


def _reading_record(reading, synced, flags=None):
    """The part of a meter reading that billing keeps: time (and whether the clock was
    synchronised then), register, serial."""
    return {
        "time": reading.time,
        "ts": iso_utc(reading.time),
        "synced": synced,
        "energy_wh": reading.energy_wh,
        "resolution_mwh": reading.energy_resolution_mwh,
        "serial": reading.serial,
        "flags": flags or [],
    }


class Session:
    """One plug-in to unplug. Plain data, saved as a dict while open."""

    __slots__ = ("id", "number", "plug_in_time", "unplug_time", "segments", "charging_ms",
                 "period", "period_start_ms", "period_start_time", "max_power_w", "max_current_a",
                 "events", "flags", "documents", "pending", "last_reading", "fiscal_due_ms",
                 "advertised_a", "identification", "held_begin")

    def __init__(self, number, session_id, plug_in_time, phases):
        self.id = session_id
        self.number = number
        self.plug_in_time = plug_in_time
        self.unplug_time = None
        self.segments = []  # each {"begin": record, "end": record or None, "serial": n}
        self.charging_ms = 0
        self.period = "idle"
        self.period_start_ms = None
        self.period_start_time = None  # wall clock: survives a restart, unlike monotonic time
        self.max_power_w = None
        self.max_current_a = [None] * phases
        self.events = []
        self.flags = []
        self.documents = []  # every OCMF document of the session, in signing order
        self.pending = None  # "begin" or "end" while waiting for a usable reading
        self.last_reading = None  # record of the last good reading inside the session
        self.fiscal_due_ms = None
        self.advertised_a = None
        self.identification = None  # the bound tag (identification.identification_doc)
        self.held_begin = None  # TX status of a begin document waiting for identification

    def flag(self, name):
        if name not in self.flags:
            self.flags.append(name)

    @property
    def energy_wh(self):
        """Billed energy: the sum of closed segments, plus the open one up to its end."""
        if not self.segments:
            return None
        total = 0
        for segment in self.segments:
            end = segment["end"]
            if end is not None:
                total += end["energy_wh"] - segment["begin"]["energy_wh"]
        return total

    def to_doc(self):
        return {
            "v": SESSION_KEYS_VERSION,
            "id": self.id, "number": self.number, "plug_in_time": self.plug_in_time,
            "unplug_time": self.unplug_time, "segments": self.segments,
            "charging_ms": self.charging_ms, "period": self.period,
            "period_start_time": self.period_start_time, "max_power_w": self.max_power_w, "max_current_a": self.max_current_a,
            "events": self.events, "flags": self.flags, "documents": self.documents,
            "pending": self.pending, "last_reading": self.last_reading,
            "advertised_a": self.advertised_a,
            "identification": self.identification, "held_begin": self.held_begin,
        }

    @classmethod
    def from_doc(cls, doc, phases):
        session = cls(doc["number"], doc["id"], doc["plug_in_time"], phases)
        for name in ("unplug_time", "segments", "charging_ms", "period", "max_power_w",
                     "max_current_a", "events", "flags", "documents", "pending",
                     "last_reading", "advertised_a"):
            setattr(session, name, doc[name])
        session.period_start_time = doc.get("period_start_time")
        session.identification = doc.get("identification")
        session.held_begin = doc.get("held_begin")
        return session


class SessionEngine:
    """Runs the charging-session state machine on top of inputs and meter readings.

    ``publish(kind, doc)`` sends "session" (start/end records) and "state" (retained
    charge-point state) documents. ``request_reading()`` asks the poller for a fresh
    meter reading now. ``identity`` gives the OCMF gateway and meter identification.
    """

    def __init__(self, config, store, signer, clock, meter, publish, request_reading, identity):
        self.config = config
        self.station_id = config["station_id"]
        self.begin_at = config["session"]["begin_at"]
        self.fiscal_ms = int(config["session"]["fiscal_interval_s"] * 1000)
        self.store = store
        self.signer = signer
        self.clock = clock
        self.meter = meter
        self.phases = meter.model.phases
        self.max_power_w = self.phases * MAX_AC_CURRENT_A * config["events"]["voltage_max_v"]
        self.publish = publish
        self.request_reading = request_reading
        self.identity = identity
        self.session = None
        self.ending = []  # unplugged sessions still waiting for their end reading
        self.inputs = None
        self.latest = None  # latest good Reading
        self._open_since_ms = None  # monotonic ms since when no current can flow
        self.completed = 0
        self.identifier = None  # identification.IdentificationDesk, when the board has a reader

    # -- start-up --------------------------------------------------------------------

    def restore(self):
        """Continue the session that was open when the agent stopped, if any."""
        doc = self.store.load_open_session()
        if doc is None:
            return None
        try:
            session = Session.from_doc(doc, self.phases)
        except (KeyError, TypeError) as error:
            log.error("open session file is not a session (%s); starting without it" % error)
            return None
        session.flag("agent_restarted")
        session.period_start_ms = None
        if session.period == "charging" and session.period_start_time is not None:
            # The charging period that was running continues; the time the agent was down
            # counts as charging (the inputs will say at once whether it still is).
            elapsed_ms = int(max(0.0, self.clock.time() - session.period_start_time) * 1000)
            session.period_start_ms = self.clock.monotonic_ms() - elapsed_ms
        if session.unplug_time is not None:
            self.ending.append(session)
            self.request_reading()
        else:
            self.session = session
        log.info("continuing session %s after restart (energy so far: %s Wh, pending: %s)"
                 % (session.id, session.energy_wh, session.pending))
        return session

    # -- inputs ----------------------------------------------------------------------

    def on_inputs(self, inputs, now_ms):
        """Debounced pilot / contactor change."""
        previous = self.inputs
        self.inputs = inputs
        pilot = inputs.pilot
        session = self.session
        if session is None and pilot in ("B", "C", "D"):
            session = self._start(now_ms, ["plugged_in_before_start"] if previous is None else [])
        elif session is not None and pilot == "A":
            self._unplug(session, now_ms)
            session = None
        if session is not None:
            session.advertised_a = inputs.advertised_a
            self._update_period(session, inputs, now_ms)
        # Only now note whether current can flow from here on: a begin reading wanted at this
        # very change (first charge) may still use a reading taken while nothing flowed.
        if self._current_can_flow(inputs):
            self._open_since_ms = None
        elif self._open_since_ms is None:
            self._open_since_ms = now_ms
        self._publish_state()

    def _current_can_flow(self, inputs):
        """False when no vehicle is connected or the contactor (feedback, else command, else
        the pilot state) says open: then the import register cannot move."""
        if inputs.pilot == "A":
            return False
        if inputs.contactor_feedback is not None:
            return bool(inputs.contactor_feedback)
        if inputs.contactor_command is not None:
            return bool(inputs.contactor_command)
        return inputs.pilot in ("C", "D")

    def _charging(self, inputs):
        if inputs.pilot not in ("C", "D"):
            return False
        closed = inputs.contactor_feedback if inputs.contactor_feedback is not None else inputs.contactor_command
        return closed is not False

    def _start(self, now_ms, flags):
        number = self.store.next_number("session")
        session = Session(number, "%s-%06d" % (self.station_id, number), self.clock.time(), self.phases)
        for name in flags:
            session.flag(name)
        self.session = session
        log.info("session %s: plug-in (pilot %s)" % (session.id, self.inputs.pilot))
        if self.identifier is not None:
            session.identification = self.identifier.claim_for_plug_in()
            if session.identification is not None:
                log.info("session %s: identified by tag %s tapped before plug-in"
                         % (session.id, session.identification["uid"]))
        self._save(session)
        self._publish_session(session, "start")
        if self.begin_at == "plugin":
            self._want(session, "begin")
        return session

    def _update_period(self, session, inputs, now_ms):
        charging = self._charging(inputs)
        if charging and session.period != "charging":
            session.period = "charging"
            session.period_start_ms = now_ms
            session.period_start_time = self.clock.time()
            if not session.segments and session.pending is None:
                self._want(session, "begin")  # begin_at == "charge": first charge
            if self.fiscal_ms and session.fiscal_due_ms is None:
                session.fiscal_due_ms = now_ms + self.fiscal_ms
            self._save(session)
        elif not charging and session.period == "charging":
            self._close_period(session, now_ms)
            session.period = "idle"
            self._save(session)

    def _close_period(self, session, now_ms):
        if session.period_start_ms is not None:
            session.charging_ms += now_ms - session.period_start_ms
        session.period_start_ms = None
        session.period_start_time = None

    def _unplug(self, session, now_ms):
        self._close_period(session, now_ms)
        session.period = "idle"
        session.unplug_time = self.clock.time()
        self.session = None
        log.info("session %s: unplug" % session.id)
        if not session.segments:
            # Never charged with begin_at == "charge", or the begin reading never came.
            if session.pending == "begin":
                session.flag("no_begin_reading")
            session.pending = None
            self._finish(session)
            return
        self.ending.append(session)
        self._save(session)
        self._want(session, "end")  # may finish the session at once (and clear its file)

    # -- readings --------------------------------------------------------------------

    def on_reading(self, reading):
        """A good meter reading: session statistics, register checks, pending begin/end."""
        self.latest = reading
        for session in list(self.ending):
            self._resolve_pending(session, reading)
        session = self.session
        if session is None:
            return
        if session.segments and session.segments[-1]["end"] is None:
            self._check_register(session, reading)
        if session.period == "charging":
            self._track_maxima(session, reading)
            if session.fiscal_due_ms is not None and reading.monotonic_ms >= session.fiscal_due_ms:
                session.fiscal_due_ms = reading.monotonic_ms + self.fiscal_ms
                self._sign_fiscal(session, reading)
        if session.held_begin is not None and not self._identification_open(session):
            self._release_begin(session)
        if session.pending is not None:
            self._resolve_pending(session, reading)
        elif session.segments:
            session.last_reading = _reading_record(reading, self.clock.synced())

    def on_meter_link(self, online, first=False):
        """The meter link came up or went down (``first``: the agent's first poll told its
        state): the retained state says so at once, and a begin/end that waits for a
        reading while the meter went away will be flagged."""
        if not online and not first:
            for session in ([self.session] if self.session else []) + self.ending:
                if session.pending is not None:
                    session.flag(session.pending + "_delayed")
        if self.inputs is not None:
            self._publish_state()

    def _exact_now(self, reading):
        """A reading is exact for now if no current could flow since it was taken."""
        if reading is None or reading.energy_wh is None or not self.meter.link.online:
            return False
        return self._open_since_ms is not None and self._open_since_ms <= reading.monotonic_ms

    def _want(self, session, which):
        """Take the begin/end reading now if the latest one is exact, else wait for one."""
        session.pending = which
        if self._exact_now(self.latest):
            self._resolve_pending(session, self.latest)
            return
        if not self.meter.link.online:
            session.flag(which + "_delayed")
        self.request_reading()
        self._save(session)

    def _resolve_pending(self, session, reading):
        which = session.pending
        if which is None or reading.energy_wh is None:
            return
        if not self._exact_now(reading) and not self._acceptable_late(session, reading):
            self.request_reading()
            return
        session.pending = None
        record = _reading_record(reading, self.clock.synced(), [f for f in session.flags if f == which + "_delayed"])
        if which == "begin":
            self._begin_segment(session, reading, record, tx_status="G")
            self._save(session)
        else:
            segment = session.segments[-1]
            segment["end"] = record
            segment_begin = segment["begin"]
            self._sign(session, [(segment_begin, "B", "G"), (record, "E", "G")], "T")
            self.ending.remove(session)
            self._finish(session)

    def _acceptable_late(self, session, reading):
        """Without contactor information or after an outage, the next good reading is taken."""
        if session.pending + "_delayed" in session.flags:
            return True
        inputs = self.inputs
        return inputs is not None and inputs.contactor_feedback is None and inputs.contactor_command is None \
            and inputs.pilot not in ("C", "D")

    def _begin_segment(self, session, reading, record, tx_status):
        session.segments.append({"begin": record, "end": None, "serial": reading.serial})
        session.last_reading = record
        log.info("session %s: begin reading %d Wh (%s)" % (session.id, reading.energy_wh, record["ts"]))
        if len(session.segments) == 1 and self._identification_open(session):
            session.held_begin = tx_status  # signed once the tag is known or the window closes
            return
        self._sign(session, [(record, "B", tx_status)], "T")
        self._publish_session(session, "begin")

    def _check_register(self, session, reading):
        """Detect a reset, jump or replaced meter; close the segment and start a new one."""
        segment = session.segments[-1]
        last = session.last_reading
        if reading.energy_wh is None or last is None:
            return
        problem = None
        if segment["serial"] is not None and reading.serial is not None and reading.serial != segment["serial"]:
            problem = "meter_replaced"
        elif reading.energy_wh < last["energy_wh"]:
            problem = "register_backwards"
        else:
            # More than the most an AC charge point can draw (80 A per phase at the top of the
            # voltage band) over the time between the readings cannot have been charged —
            # also across an agent restart, when nothing was watching in between.
            dt_h = max(0.0, reading.time - last["time"]) / 3600.0
            allowed = self.max_power_w * dt_h + 10 + (reading.energy_resolution_mwh or 0) / 1000.0
            if reading.energy_wh - last["energy_wh"] > allowed:
                problem = "register_jump"
        if problem is None:
            return
        log.warning("session %s: %s (register %s -> %s Wh, serial %s -> %s); billing in segments"
                    % (session.id, problem, last["energy_wh"], reading.energy_wh, segment["serial"], reading.serial))
        session.flag(problem)
        segment["end"] = last
        segment["end_reason"] = problem
        self._sign(session, [(segment["begin"], "B", "G"), (last, "X", "G")], "T")
        record = _reading_record(reading, self.clock.synced(), [problem])
        self._begin_segment(session, reading, record, tx_status="X" if problem == "meter_replaced" else "G")
        self._save(session)

    def _track_maxima(self, session, reading):
        if reading.power_total is not None and (session.max_power_w is None or reading.power_total > session.max_power_w):
            session.max_power_w = reading.power_total
        for i, current in enumerate(reading.current):
            if current is not None and (session.max_current_a[i] is None or current > session.max_current_a[i]):
                session.max_current_a[i] = current

    # -- signing ---------------------------------------------------------------------

    def _sign(self, session, entries, kind):
        """Sign readings ``[(record, tx, status)]`` as one OCMF document of the session."""
        if kind == "T" and session.held_begin is not None:
            self._release_begin(session)  # the begin document keeps its place in the pagination
        page = self.store.next_number("transaction_page" if kind == "T" else "fiscal_page")
        # The time-sync flag (S/U) in TM says whether the clock was synchronised when the
        # reading was taken; it travels with the reading into every document that repeats it.
        readings = [OcmfReading(record["time"], record.get("synced", False), tx, record["energy_wh"], status)
                    for record, tx, status in entries]
        ident = self.identity
        serial = entries[-1][0]["serial"]
        payload = build_payload(
            ident["gateway_vendor"], ident["gateway_serial"], ident["gateway_version"],
            "%s%d" % (kind, page), ident["meter_vendor"], ident["meter_model"],
            "UNKNOWN" if serial is None else str(serial), readings,
            identification=ocmf_identification(session.identification) if kind == "T" else None)
        document = sign_document(payload, self.signer)
        session.documents.append(document)
        return document

    def _sign_fiscal(self, session, reading):
        record = _reading_record(reading, self.clock.synced())
        self._sign(session, [(record, None, "G")], "F")  # fiscal readings carry no TX
        self._save(session)

    # -- records ---------------------------------------------------------------------

    def _finish(self, session):
        self.store.clear_open_session()
        self.completed += 1
        log.info("session %s ended: %s Wh, flags %s" % (session.id, session.energy_wh, session.flags or "none"))
        self._publish_session(session, "end")

    def _save(self, session):
        self.store.save_open_session(session.to_doc())

    def record(self, session, event):
        """The session document published at start, begin and end."""
        now = self.clock.time()
        end_time = session.unplug_time if session.unplug_time is not None else now
        charging_ms = session.charging_ms
        if session.period_start_ms is not None:
            charging_ms += self.clock.monotonic_ms() - session.period_start_ms
        plugged_s = max(0.0, end_time - session.plug_in_time)
        charging_s = min(plugged_s, charging_ms / 1000.0)
        energy = session.energy_wh if event == "end" else None
        avg = None
        if energy is not None and charging_s > 0:
            avg = round(energy * 3600.0 / charging_s, 1)
        documents = session.documents
        return {
            "event": event,
            "session_id": session.id,
            "ts": iso_utc(now),
            "plug_in": iso_utc(session.plug_in_time),
            "unplug": None if session.unplug_time is None else iso_utc(session.unplug_time),
            "begin": session.segments[0]["begin"] if session.segments else None,
            "end": session.segments[-1]["end"] if session.segments and event == "end" else None,
            "segments": len(session.segments),
            "energy_wh": energy,
            "plugged_s": round(plugged_s, 1),
            "charging_s": round(charging_s, 1),
            "idle_s": round(plugged_s - charging_s, 1),
            "max_power_w": None if session.max_power_w is None else round(session.max_power_w, 1),
            "avg_power_w": avg if event == "end" else None,
            "max_current_a": [None if c is None else round(c, 3) for c in session.max_current_a],
            "events": session.events,
            "flags": session.flags,
            "identification": session.identification,
            "ocmf_begin": documents[0] if documents else None,
            "ocmf_end": documents[-1] if event == "end" and len(documents) > 1 else None,
            "ocmf_documents": documents,
        }

    # -- identification --------------------------------------------------------------

    def _identification_open(self, session):
        """True while a tap may still identify ``session`` (reader present, no tag yet,
        within ``identification.tap_after_s`` of plug-in)."""
        return (self.identifier is not None and session.identification is None and session.unplug_time is None
                and self.clock.time() - session.plug_in_time <= self.identifier.tap_after_s)

    def identify(self, doc):
        """A tag was tapped: bind it to the open session if that may still be identified.
        False when there is no such session (the desk keeps the tap for the next plug-in)."""
        session = self.session
        if session is None or not self._identification_open(session):
            return False
        session.identification = doc
        log.info("session %s: identified by tag %s (%s)" % (session.id, doc["uid"], doc["level"]))
        if session.held_begin is not None:
            self._release_begin(session)
        self._save(session)
        return True

    def _release_begin(self, session):
        """Sign the begin document that waited for the identification window."""
        tx_status = session.held_begin
        session.held_begin = None
        self._sign(session, [(session.segments[0]["begin"], "B", tx_status)], "T")
        self._publish_session(session, "begin")
        self._save(session)

    def _publish_session(self, session, event):
        self.publish("session", self.record(session, event))

    def note_event(self, event):
        """Attach a raised power/safety event to the open session."""
        session = self.session
        if session is not None and event.end is None:
            session.events.append({"number": event.number, "type": event.type, "severity": event.severity})

    def energy_so_far(self):
        """Energy of the open session up to the latest reading, integer Wh: its closed
        segments plus the open one so far; None without an open session or before its begin
        reading. For live display (telemetry, console): the billed energy is the end record's."""
        session = self.session
        if session is None or not session.segments:
            return None
        total = session.energy_wh
        segment = session.segments[-1]
        latest = self.latest
        if segment["end"] is None and latest is not None and latest.energy_wh is not None:
            total += max(0, latest.energy_wh - segment["begin"]["energy_wh"])
        return total

    def state_doc(self):
        inputs = self.inputs
        session = self.session
        return {
            "pilot": None if inputs is None else inputs.pilot,
            "duty_pct": None if inputs is None else inputs.duty_pct,
            "advertised_a": None if inputs is None else inputs.advertised_a,
            "contactor_command": None if inputs is None else inputs.contactor_command,
            "contactor_feedback": None if inputs is None else inputs.contactor_feedback,
            "charging": inputs is not None and self._charging(inputs),
            "session_id": None if session is None else session.id,
            "meter_online": self.meter.link.online,
            "ts": iso_utc(self.clock.time()),
        }

    def _publish_state(self):
        self.publish("state", self.state_doc())
