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

Billing follows the register's true monotonic progress. The engine keeps an anchor, the
last reading that continued the register plausibly (never backwards, never more than a
charge point could draw since, nor what the power measured since then allows).
A reading that does not (``register_backwards`` / ``register_jump``) is held as suspect
and used for nothing, and ``meter_register_anomaly`` is raised. If the register comes back to plausible progress from the anchor, the excursion
was a glitch: the segment simply goes on, so a dip and recovery costs nothing and the energy
charged during a glitch is billed by the next good reading. Only a level that holds for
``REGISTER_CONFIRM_READINGS`` readings over ``REGISTER_CONFIRM_S`` (a reset register) — or
a changed serial number (``meter_replaced``, at once) — closes the running segment at the
anchor and begins a new one at the first reading of the new level. The session then bills
the sum of its segments and carries a flag; the energy that may have flowed between the
anchor and that first reading is not billed but stated as ``uncertain_wh`` (an upper bound
from the largest power measured around it). The record's ``register_delta_wh`` (signed end
minus begin) equals ``energy_wh`` unless a flag says why not. Readings without a valid
register (the meter module rejects NaN, negative and absurd values) are never used for energy.
A rise within those bounds but beyond what the measured powers explain without the room for
ripple (``register_unexplained``) is held the same way, without the alarm, until the powers
explain it or it holds as long as a new level must (then billed in the same segment); if the
register comes back instead, it was a glitch and the alarm is raised and cleared.

A begin still wanted while current flows (the car was charging when the agent started:
``plugged_in_before_start``; or it began charging before an exact reading came) is taken
from the first good reading and flagged ``begin_while_charging``; the meter keeps its
normal cadence meanwhile.
"""

from . import log
from .messages import iso_utc
from .identification import ocmf_identification
from .ocmf import OcmfReading, build_payload, sign_document

SESSION_KEYS_VERSION = 1
MAX_AC_CURRENT_A = 80.0  # IEC 61851-1: the largest current a PWM duty can advertise
REGISTER_CONFIRM_READINGS = 3  # a new register level must hold this many readings ...
REGISTER_CONFIRM_S = 10.0  # ... over at least this long before it is billed from
MEASURED_POWER_FACTOR = 1.5  # a rise between close readings may exceed their power by this much ...
MEASURED_POWER_MARGIN_W = 500.0  # ... plus this


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
                 "advertised_a", "uncertain_wh", "identification", "held_begin")

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
        self.uncertain_wh = 0  # energy that may have flowed across register faults, not billed
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
            "advertised_a": self.advertised_a, "uncertain_wh": self.uncertain_wh,
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
        session.uncertain_wh = doc.get("uncertain_wh", 0)
        if not isinstance(session.max_current_a, list) or len(session.max_current_a) != phases:
            session.max_current_a = [None] * phases
        if not isinstance(session.segments, list) or not isinstance(session.flags, list):
            raise TypeError("segments and flags must be lists")
        for segment in session.segments:
            if not isinstance(segment["begin"]["energy_wh"], int):
                raise TypeError("a segment without an integer begin register")
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
        self.latest = None  # latest Reading
        self.good = None  # latest Reading whose register continued the anchor
        self.anchor = None  # record of the last reading that continued the register plausibly
        self.suspect = None  # readings that did not: {"problem", "first", "last", "count", "power_w"}
        self._anchor_power_w = None
        # What the measured power allows the register to have counted since the anchor (Wh),
        # summed over every reading since (also those whose register was unusable: their
        # power is still a measurement); None while a gap was not measured.
        self._measured_wh = None
        self._explained_wh = None  # what the measured powers explain since the anchor (``_unexplained``)
        self._previous_power = None  # (time, power_w) of the latest reading
        self.alarm = None  # alarm(type, active, values): meter_register_anomaly
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
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            log.error("open session file is not a session (%s); starting without it" % error)
            return None
        session.flag("agent_restarted")
        session.period_start_ms = None
        if session.period == "charging" and session.period_start_time is not None:
            # The charging period that was running continues; the time the agent was down
            # counts as charging (the inputs will say at once whether it still is).
            elapsed_ms = int(max(0.0, self.clock.time() - session.period_start_time) * 1000)
            session.period_start_ms = self.clock.monotonic_ms() - elapsed_ms
        last = session.last_reading
        if session.segments and session.segments[-1]["end"] is None and isinstance(last, dict) \
                and isinstance(last.get("energy_wh"), int) and isinstance(last.get("time"), (int, float)):
            self.anchor = last  # the register must continue from here
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
        """A meter reading: register checks, session statistics, pending begin/end."""
        self.latest = reading
        usable = self._check_register(reading)
        if usable:
            self.good = reading
            for session in list(self.ending):
                self._resolve_pending(session, reading)
        session = self.session
        if session is None:
            return
        if session.period == "charging":
            self._track_maxima(session, reading)
            if usable and session.fiscal_due_ms is not None and reading.monotonic_ms >= session.fiscal_due_ms:
                session.fiscal_due_ms = reading.monotonic_ms + self.fiscal_ms
                self._sign_fiscal(session, reading)
        if session.held_begin is not None and not self._identification_open(session):
            self._release_begin(session)
        if not usable:
            return
        if session.pending is not None:
            self._resolve_pending(session, reading)
        elif session.segments:
            session.last_reading = self.anchor

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
        if self._exact_now(self.good):
            self._resolve_pending(session, self.good)
            return
        if not self.meter.link.online and getattr(self.meter.link, "cycles", 1):
            session.flag(which + "_delayed")  # offline (not merely before the first poll answered)
        self.request_reading()
        self._save(session)

    def _resolve_pending(self, session, reading):
        which = session.pending
        if which is None and session in self.ending:
            self._finish(session)  # its end record was refused before: journal it now
            return
        if which is None or reading.energy_wh is None:
            return
        if not self._exact_now(reading) and not self._acceptable_late(session, reading):
            if self.inputs is None or not self._current_can_flow(self.inputs):
                self.request_reading()  # the next reading will be exact: ask for it now
            return  # current flows: the poll's own cadence brings the next readings
        session.pending = None
        flags = [f for f in session.flags if f == which + "_delayed"]
        if which == "begin" and "begin_while_charging" in session.flags:
            flags.append("begin_while_charging")
        record = _reading_record(reading, self.clock.synced(), flags)
        if which == "begin":
            self._begin_segment(session, record, tx_status="G")
            self._save(session)
        else:
            if self.suspect is not None:
                session.flag("register_suspect")  # ended on the anchor while a fault was unresolved
            segment = session.segments[-1]
            segment["end"] = record
            segment_begin = segment["begin"]
            self._sign(session, [(segment_begin, "B", "G"), (record, "E", "G")], "T")
            self._finish(session)

    def _acceptable_late(self, session, reading):
        """Without contactor information or after an outage, the next good reading is taken;
        so is the first good one when the begin is still wanted while current flows (the car
        was charging when the agent started, or began before an exact reading came): no
        exact one can come before the car stops, and waiting would bill nothing of this charge."""
        if session.pending + "_delayed" in session.flags:
            return True
        inputs = self.inputs
        if (session.pending == "begin" and not session.segments
                and inputs is not None and self._current_can_flow(inputs)):
            session.flag("begin_while_charging")
            return True
        return inputs is not None and inputs.contactor_feedback is None and inputs.contactor_command is None \
            and inputs.pilot not in ("C", "D")

    def _begin_segment(self, session, record, tx_status):
        session.segments.append({"begin": record, "end": None, "serial": record["serial"]})
        session.last_reading = record
        log.info("session %s: begin reading %d Wh (%s)" % (session.id, record["energy_wh"], record["ts"]))
        if len(session.segments) == 1 and self._identification_open(session):
            session.held_begin = tx_status  # signed once the tag is known or the window closes
            return
        self._sign(session, [(record, "B", tx_status)], "T")
        self._publish_session(session, "begin")

    def _register_problem(self, last, reading, measured_wh=None):
        """Why ``reading`` cannot continue the register from record ``last``, or None.

        The rise may not exceed what the charge point could draw since ``last``, nor, when
        every step since was measured (``measured_wh``, see ``_measure_power``), what the
        measured power allows."""
        if last["serial"] is not None and reading.serial is not None and reading.serial != last["serial"]:
            return "meter_replaced"
        if reading.energy_wh < last["energy_wh"]:
            return "register_backwards"
        # More than the most an AC charge point can draw (80 A per phase at the top of the
        # voltage band) over the time between the readings cannot have been charged —
        # also across an agent restart, when nothing was watching in between.
        dt_s = max(0.0, reading.time - last["time"])
        resolution_wh = (reading.energy_resolution_mwh or 0) / 1000.0
        allowed = self.max_power_w * dt_s / 3600.0 + 10 + resolution_wh
        if measured_wh is not None:
            # With room for a rounding Wh and the register's steps at both ends.
            allowed = min(allowed, measured_wh + 1 + 2 * resolution_wh)
        if reading.energy_wh - last["energy_wh"] > allowed:
            return "register_jump"
        return None

    def _check_register(self, reading):
        """True when the reading's register may be used (it continues the anchor, or a new
        level is confirmed now); False for a reading without register or a suspect one."""
        self._measure_power(reading)
        if reading.energy_wh is None:
            return False
        record = _reading_record(reading, self.clock.synced())
        anchor = self.anchor
        problem = None if anchor is None else self._register_problem(anchor, reading, self._measured_wh)
        if problem is None and anchor is not None and self._unexplained(anchor, reading):
            problem = "register_unexplained"
        suspect = self.suspect
        if problem is None:
            if suspect is not None:
                self.suspect = None
                explained = suspect["problem"] == "register_unexplained" and reading.energy_wh >= suspect["high_wh"]
                self._anomaly_over(suspect, "explained" if explained else "glitch", 0)
            self._set_anchor(record, reading.power_total)
            return True
        if problem == "meter_replaced":
            if suspect is not None:
                self.suspect = None
                self._anomaly_over(suspect, "replaced", 0)
            self._new_level(problem, record, [reading.power_total])
            self._set_anchor(record, reading.power_total)
            return True
        if suspect is None or self._register_problem(suspect["last"], reading) is not None:
            alarmed = suspect is not None and suspect["alarmed"]
            self.suspect = {"problem": problem, "first": record, "last": record, "count": 1,
                            "power_w": [reading.power_total], "alarmed": alarmed,
                            "high_wh": reading.energy_wh}
            came_back = suspect is not None and reading.energy_wh < suspect["high_wh"]
            self._raise_anomaly(self.suspect, reading.energy_wh, came_back)
            return False
        suspect["last"] = record
        suspect["count"] += 1
        suspect["power_w"].append(reading.power_total)
        suspect["high_wh"] = max(suspect["high_wh"], reading.energy_wh)
        if problem != "register_unexplained":
            suspect["problem"] = problem  # no longer a plausible rise: a new level if it holds
            self._raise_anomaly(suspect, reading.energy_wh)
        if suspect["count"] >= REGISTER_CONFIRM_READINGS and \
                record["time"] - suspect["first"]["time"] >= REGISTER_CONFIRM_S:
            self.suspect = None
            if suspect["problem"] == "register_unexplained":
                self._anomaly_over(suspect, "held", 0)  # a plausible rise that held: billed
                self._set_anchor(record, reading.power_total)
                return True
            uncertain = self._new_level(suspect["problem"], suspect["first"], suspect["power_w"])
            self._anomaly_over(suspect, "new_level", uncertain)
            self._set_anchor(record, reading.power_total)
            return True
        return False

    def _unexplained(self, anchor, reading):
        """True when the register rose since ``anchor`` by more than the measured powers
        explain: the bound of ``_register_problem`` without ``MEASURED_POWER_FACTOR``, whose
        room for ripple over a step at the larger power can hide a glitch after the power fell."""
        if self._explained_wh is None:
            return False
        resolution_wh = (reading.energy_resolution_mwh or 0) / 1000.0
        return reading.energy_wh - anchor["energy_wh"] > self._explained_wh + 1 + 2 * resolution_wh

    def _raise_anomaly(self, suspect, to_wh, glitch=False):
        """Raise ``meter_register_anomaly`` once per suspect; for a rise only unexplained,
        once it turned out a ``glitch``."""
        if suspect["alarmed"] or (suspect["problem"] == "register_unexplained" and not glitch):
            return
        suspect["alarmed"] = True
        anchor = self.anchor
        log.warning("meter register %s: %s -> %s Wh; held until it returns or holds"
                    % (suspect["problem"], anchor["energy_wh"], to_wh))
        if self.alarm is not None:
            self.alarm("meter_register_anomaly", True, {
                "problem": suspect["problem"], "from_wh": anchor["energy_wh"], "to_wh": to_wh})

    def _measure_power(self, reading):
        """Add what the measured power allows over the step since the previous reading: the
        register integrates the power between two samples, so at most the larger one, with
        room for ripple (``MEASURED_POWER_FACTOR`` and ``_MARGIN_W``). A step longer than
        ``REGISTER_CONFIRM_S`` or without a power value is not measured: from then on only
        the charge point's maximum bounds the rise, until the next anchor."""
        previous = self._previous_power
        power_w = reading.power_total
        self._previous_power = (reading.time, power_w)
        if self._measured_wh is None or previous is None:
            return
        dt_s = reading.time - previous[0]
        if power_w is None or previous[1] is None or dt_s < 0 or dt_s > REGISTER_CONFIRM_S:
            self._measured_wh = None
            self._explained_wh = None
            return
        step_w = max(previous[1], power_w, 0.0) * MEASURED_POWER_FACTOR + MEASURED_POWER_MARGIN_W
        self._measured_wh += step_w * dt_s / 3600.0
        # The same without the room for ripple: what the readings' powers explain.
        self._explained_wh += (max(previous[1], power_w, 0.0) + MEASURED_POWER_MARGIN_W) * dt_s / 3600.0

    def _set_anchor(self, record, power_w):
        self.anchor = record
        self._anchor_power_w = power_w
        self._measured_wh = 0.0
        self._explained_wh = 0.0
        self._previous_power = (record["time"], power_w)
        for session in self._open_segments():
            session.last_reading = record

    def _open_segments(self):
        sessions = ([self.session] if self.session is not None else []) + self.ending
        return [s for s in sessions if s.segments and s.segments[-1]["end"] is None]

    def _anomaly_over(self, suspect, outcome, uncertain_wh):
        if not suspect["alarmed"]:
            if outcome != "glitch":  # a plausible rise, now explained or held: no anomaly
                log.info("meter register rise %s -> %s Wh %s" % (
                    self.anchor["energy_wh"], suspect["last"]["energy_wh"], outcome))
                return
            self._raise_anomaly(suspect, suspect["high_wh"], True)  # it came back: a glitch
        log.warning("meter register %s over: %s after %d reading(s)" % (suspect["problem"], outcome, suspect["count"]))
        if self.alarm is not None:
            self.alarm("meter_register_anomaly", False, {
                "problem": suspect["problem"], "outcome": outcome, "readings": suspect["count"],
                "from_wh": self.anchor["energy_wh"], "to_wh": suspect["last"]["energy_wh"],
                "uncertain_wh": uncertain_wh})

    def _new_level(self, problem, first, powers):
        """The register continues from ``first`` (a reset or another meter): every open
        segment ends at the anchor and a new one begins at ``first``. Returns the energy
        that may have flowed between the two readings (unbilled, stated as uncertain)."""
        anchor = self.anchor
        known = [p for p in powers + [self._anchor_power_w] if p is not None]
        power_w = max(known) if known else self.max_power_w
        gap_h = max(0.0, first["time"] - anchor["time"]) / 3600.0
        uncertain = 0 if power_w <= 0 else int(power_w * gap_h) + 1
        for session in self._open_segments():
            log.warning("session %s: %s (register %s -> %s Wh, serial %s -> %s); billing in segments"
                        % (session.id, problem, anchor["energy_wh"], first["energy_wh"],
                           anchor["serial"], first["serial"]))
            session.flag(problem)
            segment = session.segments[-1]
            end = anchor if anchor["time"] >= segment["begin"]["time"] else segment["begin"]
            segment["end"] = end
            segment["end_reason"] = problem
            session.uncertain_wh += uncertain
            self._sign(session, [(segment["begin"], "B", "G"), (end, "X", "G")], "T")
            begin = dict(first)
            begin["flags"] = [problem]
            self._begin_segment(session, begin, tx_status="X" if problem == "meter_replaced" else "G")
            self._save(session)
        return uncertain

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
        """Journal the end record first, then forget the session. If the journal refuses it
        (``MemoryError``, a disk error), the error propagates with the session still in
        ``ending`` and on file, its end reading taken: the next reading, or the restart,
        journals the record again."""
        owns_file = self.session is None  # else the file holds a newer session
        try:
            self._publish_session(session, "end")
        except Exception:
            if session not in self.ending:
                self.ending.append(session)
            if owns_file:
                self._save(session)  # its end reading is taken: a restart takes no other
            raise
        if session in self.ending:
            self.ending.remove(session)
        if owns_file:
            self.store.clear_open_session()
        self.completed += 1
        log.info("session %s ended: %s Wh, flags %s" % (session.id, session.energy_wh, session.flags or "none"))

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
            "register_delta_wh": session.segments[-1]["end"]["energy_wh"] - session.segments[0]["begin"]["energy_wh"]
            if event == "end" and session.segments and session.segments[-1]["end"] is not None else None,
            "uncertain_wh": session.uncertain_wh,
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

    def open_session_id(self):
        """The session an event raised now belongs to: the plugged-in one, else the last
        unplugged one still waiting for its end record; None between sessions."""
        if self.session is not None:
            return self.session.id
        return self.ending[-1].id if self.ending else None

    def note_event(self, event):
        """List a raised power/safety event (instant ones too) in the session it names, so
        the end record lists every event raised while the session was open."""
        if event.end is not None or event.session_id is None:
            return
        for session in [self.session] + self.ending:
            if session is not None and session.id == event.session_id:
                session.events.append({"number": event.number, "type": event.type, "severity": event.severity,
                                       "instant": bool(getattr(event, "instant", False))})
                self._save(session)
                return

    def energy_so_far(self):
        """Energy of the open session up to the latest reading, integer Wh: its closed
        segments plus the open one so far; None without an open session or before its begin
        reading. For live display (telemetry, console): the billed energy is the end record's."""
        session = self.session
        if session is None or not session.segments:
            return None
        total = session.energy_wh
        segment = session.segments[-1]
        anchor = self.anchor
        if segment["end"] is None and anchor is not None:
            total += max(0, anchor["energy_wh"] - segment["begin"]["energy_wh"])
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
        if not getattr(self.meter.link, "cycles", 1):
            return  # the first poll cycle has not yet told whether the meter answers
        self.publish("state", self.state_doc())
