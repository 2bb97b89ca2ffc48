"""Power and safety monitoring: turns readings and input changes into events.

An event has a type, a severity, a start time, values, and — for conditions that last —
an end time when it clears. ``PowerMonitor`` owns the conditions and their thresholds
(board section ``events``); whoever receives its events (the agent) publishes them.

Conditions watched:

- ``voltage_out_of_band`` (per phase): supply voltage outside [voltage_min_v, voltage_max_v];
- ``phase_loss``: a phase below phase_loss_v while another phase is up (three-phase meters);
- ``power_drop``: charging power falls by more than power_drop_pct between two readings
  while the vehicle still asks to charge (one-shot);
- ``power_fluctuation``: (max - min) / max of charging power over fluctuation_window_s
  above fluctuation_pct;
- ``overcurrent``: a phase current above the advertised current + overcurrent_pct for
  longer than overcurrent_grace_s (IEC 61851 gives the vehicle 5 s to follow a change);
- ``contactor_welded``: feedback closed while the command is open, for contactor_check_ms;
- ``contactor_failed_to_close``: command closed, no feedback within contactor_check_ms;
- ``pilot_error`` (state E) and ``evse_unavailable`` (state F);
- ``meter_offline``: the meter link is declared offline;
- ``journal_full`` and ``disk_error``: alarms of the journal (``alarm``);
- ``console_unlock_failed``: a wrong PIN on the technician console (``notice``);
- ``meter_value_invalid``: the meter sends an unusable import register (NaN, negative, absurd);
- ``meter_register_anomaly``: the register went backwards or jumped, until it returns or holds;
- ``meter_replaced``: the meter's serial number changed (``notice``);
- ``journal_damaged`` and ``state_damaged``: damage found at start (``notice``);
- ``agent_fault``: the session engine ran out of memory or met a disk error handling an
  input change or a reading (``alarm``; its work, e.g. a session's end record, is retried at
  each reading and the alarm clears when that succeeds).

Every event is reported when raised (``end`` None: *active*) and when it ends (*cleared*).
An instantaneous event (``power_drop`` and every ``notice``; ``instant`` True) is
reported active and at once cleared with ``end == start``. ``session_of()`` (set by the
wiring) names the session open when an event is raised; the event keeps that id.

Power and current are judged against the inputs that held when a reading was taken. A
reading waits (``_pending``) until the input monitor has sampled past it by the debounce
time and two samples more (``sampled_ms``): by then any pilot or contactor change that was
under way while the meter was read has been accepted. An accepted input change discards
the readings still waiting and starts a quiet time (``contactor_check_ms``, or
``overcurrent_grace_s`` when the advertised current changed: IEC 61851 gives the vehicle
that long to follow) in which readings are no evidence of a power drop or fluctuation; it
also restarts the drop baseline, the fluctuation window and the overcurrent grace (which
is itself the vehicle's time to follow, so confirmed readings count for it at once). So
an ordinary start or stop never raises a power event, and a drop while the inputs stay as
they are is raised once the reading after it is confirmed.
"""

INFO = "info"
WARNING = "warning"
CRITICAL = "critical"

SEVERITY = {
    "voltage_out_of_band": WARNING,
    "phase_loss": CRITICAL,
    "power_drop": WARNING,
    "power_fluctuation": WARNING,
    "overcurrent": CRITICAL,
    "contactor_welded": CRITICAL,
    "contactor_failed_to_close": CRITICAL,
    "pilot_error": CRITICAL,
    "evse_unavailable": WARNING,
    "meter_offline": WARNING,
    "journal_full": CRITICAL,
    "disk_error": CRITICAL,
    "console_unlock_failed": WARNING,
    "meter_value_invalid": WARNING,
    "meter_register_anomaly": WARNING,
    "meter_replaced": WARNING,
    "journal_damaged": CRITICAL,
    "state_damaged": WARNING,
    "agent_fault": CRITICAL,
}


class Event:
    """One occurrence of a condition. ``end`` is None while it is active."""

    __slots__ = ("number", "type", "severity", "start", "end", "values", "key", "session_id", "instant")

    def __init__(self, number, type_, start, values, key=None, session_id=None, instant=False):
        self.number = number
        self.type = type_
        self.severity = SEVERITY[type_]
        self.start = start
        self.end = None
        self.values = values
        self.key = key or type_
        self.session_id = session_id
        self.instant = instant

    @property
    def active(self):
        return self.end is None


class PowerMonitor:
    """Watches readings and inputs; reports each event once when raised and once when cleared.

    ``sink(event)`` is called for every raise and every clear. ``numbers()`` supplies event
    numbers (unique per station, from the durable counters). Times are wall-clock epoch
    seconds from ``clock.time()``; durations use ``clock.monotonic_ms()``.
    """

    def __init__(self, config, phases, clock, sink, numbers, sample_ms=20, debounce_ms=100, sampled_ms=None):
        self.config = config
        self.phases = phases
        self.clock = clock
        self.sink = sink
        self.numbers = numbers
        self.active = {}  # key -> Event
        self.session_id = None  # used when ``session_of`` is not set
        self.session_of = None  # callable: the id of the session open now, or None
        # Input sampling: ``sampled_ms()`` is when the input monitor last sampled (None: the
        # caller's time is taken, as for a monitor sampled regularly).
        self.sampled_ms = sampled_ms
        self.sample_ms = sample_ms
        self.confirm_ms = debounce_ms + 2 * sample_ms
        self._pending = []  # [reading, advertised_a, ended_ms, first sample after it or None]
        self._quiet_until_ms = None  # readings begun before this follow an input change
        self.judged = 0  # readings taken as evidence of charging power
        self.discarded = 0  # readings an input change made no evidence
        self._last_power = None
        self._window = []  # (monotonic_ms, power_w) while charging
        self._over_since_ms = None
        self._welded_since_ms = None
        self._close_commanded_ms = None
        self._charging = False
        self._inputs = None
        self.recent = []  # the last events raised or cleared, newest last, for the console
        self.recent_max = 50

    # -- raising and clearing --------------------------------------------------------

    def _raise(self, type_, values, key=None):
        key = key or type_
        if key in self.active:
            self.active[key].values = values
            return None
        event = Event(self.numbers(), type_, self.clock.time(), values, key, self._session())
        self.active[key] = event
        self._report(event)
        return event

    def _clear(self, key, values=None):
        event = self.active.pop(key, None)
        if event is None:
            return
        event.end = self.clock.time()
        if values is not None:
            event.values = values
        self._report(event)

    def _once(self, type_, values):
        """An instantaneous event: reported active, then at once cleared (end = start)."""
        event = Event(self.numbers(), type_, self.clock.time(), values, None, self._session(), True)
        self._report(event)
        event.end = event.start
        self._report(event)

    def _session(self):
        return self.session_of() if self.session_of is not None else self.session_id

    def _report(self, event):
        self.recent.append(event)
        if len(self.recent) > self.recent_max:
            del self.recent[0]
        self.sink(event)

    # -- inputs ----------------------------------------------------------------------

    def on_inputs(self, inputs, now_ms):
        """Pilot / contactor changes: E/F states and the start of contactor checks."""
        previous = self._inputs
        self._inputs = inputs
        self._settle(previous, inputs, now_ms)
        pilot = inputs.pilot
        if pilot == "E":
            self._raise("pilot_error", {"pilot": pilot})
        else:
            self._clear("pilot_error", {"pilot": pilot})
        if pilot == "F":
            self._raise("evse_unavailable", {"pilot": pilot})
        else:
            self._clear("evse_unavailable", {"pilot": pilot})
        self._charging = (pilot in ("C", "D") and inputs.contactor_command is not False
                          and inputs.contactor_feedback is not False)
        if not self._charging:
            self._clear("overcurrent")
            self._clear("power_fluctuation")
        command = inputs.contactor_command
        if command and (previous is None or not previous.contactor_command):
            self._close_commanded_ms = now_ms
        if not command:
            self._close_commanded_ms = None
            self._clear("contactor_failed_to_close", {"command": command, "feedback": inputs.contactor_feedback})
        self.tick(now_ms)

    def _settle(self, previous, inputs, now_ms):
        """An accepted input change: readings still waiting may have been taken while it was
        under way, and the vehicle and contactor need time to follow it."""
        self.discarded += len(self._pending)
        self._pending = []
        self._window = []
        self._last_power = None
        self._over_since_ms = None
        settle_ms = self.config["contactor_check_ms"]
        if previous is not None and previous.advertised_a != inputs.advertised_a:
            settle_ms = max(settle_ms, int(self.config["overcurrent_grace_s"] * 1000))
        self._quiet_until_ms = now_ms + settle_ms

    def tick(self, now_ms):
        """Time-based checks: waiting readings the input samples have confirmed, and the
        contactor; call when ``next_check_ms`` is due (and on every input change, which
        ``on_inputs`` does)."""
        self.confirm(now_ms)
        inputs = self._inputs
        if inputs is None:
            return
        check_ms = self.config["contactor_check_ms"]
        command = inputs.contactor_command
        feedback = inputs.contactor_feedback
        if command is None or feedback is None:
            return  # the board has no such line: nothing to compare
        if not command and feedback:
            if self._welded_since_ms is None:
                self._welded_since_ms = now_ms
            elif now_ms - self._welded_since_ms >= check_ms:
                self._raise("contactor_welded", {"command": False, "feedback": True})
        else:
            self._welded_since_ms = None
            if not feedback:
                self._clear("contactor_welded", {"command": command, "feedback": feedback})
        if command and not feedback:
            if self._close_commanded_ms is not None and now_ms - self._close_commanded_ms >= check_ms:
                self._raise("contactor_failed_to_close", {"command": True, "feedback": False})
        elif feedback:
            self._clear("contactor_failed_to_close", {"command": command, "feedback": True})

    def next_check_ms(self):
        """When ``tick`` next has a contactor check to decide, or None until the inputs
        change: the supervisor sleeps until then instead of ticking on a fixed beat."""
        due = None
        for entry in self._pending:
            # The oldest reading's confirmation, or the first sample after a newer one.
            if entry[3] is None:
                waiting = entry[2] + self.sample_ms
                due = waiting if due is None or waiting < due else due
                break
            if due is None:
                due = entry[3] + self.confirm_ms + 1
        inputs = self._inputs
        if inputs is None or inputs.contactor_command is None or inputs.contactor_feedback is None:
            return due
        check_ms = self.config["contactor_check_ms"]
        if self._welded_since_ms is not None and "contactor_welded" not in self.active:
            due = self._welded_since_ms + check_ms
        if (inputs.contactor_command and not inputs.contactor_feedback and self._close_commanded_ms is not None
                and "contactor_failed_to_close" not in self.active):
            closing = self._close_commanded_ms + check_ms
            due = closing if due is None or closing < due else due
        return due

    def alarm(self, type_, active, values):
        """An alarm of another part of the agent (the journal) starts or ends."""
        if active:
            self._raise(type_, values)
        else:
            self._clear(type_, values)

    def notice(self, type_, values):
        """A one-shot event of another part of the agent (the console's failed unlock)."""
        self._once(type_, values)

    def on_meter_link(self, online, last_error):
        if online:
            self._clear("meter_offline", {"online": True})
        else:
            self._raise("meter_offline", {"online": False, "last_error": last_error})

    # -- readings --------------------------------------------------------------------

    def on_reading(self, reading, advertised_a, ended_ms=None):
        """Supply checks on one good reading at once; power and current checks once the
        inputs are confirmed (``confirm``). ``ended_ms``: when the meter's answer was
        complete (default: now)."""
        cfg = self.config
        volts = reading.voltage
        up = [v for v in volts if v is not None and v >= cfg["phase_loss_v"]]
        for i, v in enumerate(volts):
            if v is None:
                continue
            key = "voltage_out_of_band:L%d" % (i + 1)
            if v >= cfg["phase_loss_v"] and (v < cfg["voltage_min_v"] or v > cfg["voltage_max_v"]):
                self._raise("voltage_out_of_band", {"phase": i + 1, "voltage_v": round(v, 1),
                                                    "min_v": cfg["voltage_min_v"], "max_v": cfg["voltage_max_v"]}, key)
            else:
                self._clear(key, {"phase": i + 1, "voltage_v": round(v, 1)})
        if self.phases > 1:
            lost = [i + 1 for i, v in enumerate(volts) if v is not None and v < cfg["phase_loss_v"]]
            if lost and up:
                self._raise("phase_loss", {"phases": lost, "voltage_v": [None if v is None else round(v, 1) for v in volts]})
            elif not lost:
                self._clear("phase_loss", {"voltage_v": [None if v is None else round(v, 1) for v in volts]})
        if self._charging and reading.power_total is not None:
            ended = self.clock.monotonic_ms() if ended_ms is None else ended_ms
            self._pending.append([reading, advertised_a, ended, None])
        self.confirm(self.clock.monotonic_ms())

    def confirm(self, now_ms):
        """Judge the waiting readings that the input samples taken since have confirmed."""
        sampled = None if self.sampled_ms is None else self.sampled_ms()
        if sampled is None:
            sampled = now_ms  # inputs fed directly, not sampled (a simulation): now is known
        pending = self._pending
        for entry in pending:
            if entry[3] is None and sampled >= entry[2]:
                entry[3] = sampled  # no earlier than the first sample after the reading
        while pending:
            entry = pending[0]
            if entry[3] is None or sampled < entry[3] + self.confirm_ms:
                return
            del pending[0]
            reading = entry[0]
            if not self._charging:
                continue
            # Overcurrent has its own grace for the vehicle to follow; power needs quiet inputs.
            self._check_current(reading.current, entry[1], reading.monotonic_ms)
            if self._quiet_until_ms is not None and reading.monotonic_ms >= self._quiet_until_ms:
                self.judged += 1
                self._check_power(reading.power_total, reading.monotonic_ms)

    def _check_power(self, power, now_ms):
        cfg = self.config
        last = self._last_power
        self._last_power = power
        if last is not None and last > 0 and power < last * (1 - cfg["power_drop_pct"] / 100.0):
            self._once("power_drop", {"from_w": round(last, 1), "to_w": round(power, 1)})
        window = self._window
        window.append((now_ms, power))
        horizon = now_ms - int(cfg["fluctuation_window_s"] * 1000)
        while window and window[0][0] < horizon:
            del window[0]
        if len(window) < 3:
            return
        high = max(p for _, p in window)
        low = min(p for _, p in window)
        swing_pct = 100.0 * (high - low) / high if high > 0 else 0.0
        if swing_pct > cfg["fluctuation_pct"]:
            self._raise("power_fluctuation", {"min_w": round(low, 1), "max_w": round(high, 1),
                                              "swing_pct": round(swing_pct, 1)})
        else:
            self._clear("power_fluctuation", {"min_w": round(low, 1), "max_w": round(high, 1),
                                              "swing_pct": round(swing_pct, 1)})

    def _check_current(self, currents, advertised_a, now_ms):
        cfg = self.config
        if not advertised_a:
            return
        limit = advertised_a * (1 + cfg["overcurrent_pct"] / 100.0)
        worst = max([c for c in currents if c is not None] or [0.0])
        if worst > limit:
            if self._over_since_ms is None:
                self._over_since_ms = now_ms
            if now_ms - self._over_since_ms >= cfg["overcurrent_grace_s"] * 1000:
                self._raise("overcurrent", {"current_a": round(worst, 2), "advertised_a": advertised_a,
                                            "limit_a": round(limit, 2)})
        else:
            self._over_since_ms = None
            self._clear("overcurrent", {"current_a": round(worst, 2), "advertised_a": advertised_a})
