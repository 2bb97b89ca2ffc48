"""Control pilot and contactor inputs: IEC 61851-1 decoding, debouncing, and the input monitor.

The charger's hardware reaches the core as a *pin bank*: any object whose ``read()`` returns
a ``PinSample`` (the raw physical sample; the bank may reuse one object). The CPython port
has ``ports.cpython.sim_pins.SimPinBank`` (the vehicle simulator's pin file) and
``ports.cpython.gpio.GpiodPinBank`` (Linux GPIO + IIO ADC).

``InputMonitor`` reads the bank, decodes the pilot (voltage or comparator lines, as
``io.pilot.source`` says), debounces everything, and tells its listener
``on_inputs(state, now_ms)`` once per accepted change. A bank that can *announce* changes
has an ``async wait_change(timeout_ms)`` that returns once the inputs may have changed (an
edge on a level line, a new pin file) or when ``timeout_ms`` passed: the monitor then reads
only at an announcement, at a debounce deadline after one, and once every ``IDLE_LOOK_MS``
(for what the bank does not announce, e.g. a PWM duty). A bank without it is sampled every
``io.pilot.sample_ms``.

Pilot levels are the positive (high) level of the pilot: the board's ADC channel or
comparators must see the PWM's high level (a peak-hold or synchronised sampling front end).

Voltage detection ranges: IEC 61851-1:2017 Annex A, Table A.4 ("System states detected by
the charging station"), as applied by EVerest's chargebyte board driver (``CPUtils.cpp``):
nominal +-1 V. State E (0 V) uses -1..+1 V here. Readings between the ranges are ambiguous
and decode to None. Duty cycle to current: IEC 61851-1:2017 Table A.8 (the same breakpoints
appear in the Fluke FEV300 test adapter manual, Table 4).
"""

import asyncio

from . import log

A = "A"  # +12 V: no vehicle
B = "B"  # +9 V: vehicle connected, not charging
C = "C"  # +6 V: charging
D = "D"  # +3 V: charging, ventilation required
E = "E"  # 0 V: error (pilot shorted to PE)
F = "F"  # -12 V: EVSE unavailable

STATES = (A, B, C, D, E, F)  # in order of falling pilot voltage

NOMINAL_VOLTS = {A: 12.0, B: 9.0, C: 6.0, D: 3.0, E: 0.0, F: -12.0}

# (state, lowest volts, highest volts), both ends included; gaps are ambiguous.
VOLTAGE_RANGES = (
    (A, 11.0, 13.0),
    (B, 8.0, 10.0),
    (C, 5.0, 7.0),
    (D, 2.0, 4.0),
    (E, -1.0, 1.0),
    (F, -13.0, -11.0),
)

# A comparator decoder board: line i is high while the pilot is below LINE_THRESHOLDS_V[i].
LINE_THRESHOLDS_V = (10.5, 7.5, 4.5, 1.5, -10.5)

DIGITAL = "digital"  # current_from_duty: 3-7 % duty, the current is negotiated digitally (ISO 15118)

DUTY_TOLERANCE_PCT = 0.5  # measured duty jitter up to this is not a change

IDLE_LOOK_MS = 1000  # an announcing bank is still read this often while nothing is announced


def state_from_voltage(volts):
    """The pilot state for a measured high level in volts; None when it is in no range."""
    if volts is None:
        return None
    for state, low, high in VOLTAGE_RANGES:
        if low <= volts <= high:
            return state
    return None


def state_from_lines(bits):
    """The pilot state for the 5 comparator outputs; None for an impossible code.

    Thresholds fall with the index, so a valid code is a run of high lines followed by low
    ones (a thermometer code): 00000 = A, 10000 = B, ... 11111 = F.
    """
    if bits is None or len(bits) != len(LINE_THRESHOLDS_V):
        return None
    level = 0
    while level < 5 and bits[level]:
        level += 1
    for index in range(level, 5):
        if bits[index]:
            return None
    return STATES[level]


def lines_from_voltage(volts):
    """The 5 comparator outputs a decoder board shows for a pilot at ``volts``."""
    return tuple(volts < threshold for threshold in LINE_THRESHOLDS_V)


def current_from_duty(duty_pct):
    """The maximum current (A) a pilot duty cycle (%) offers, per IEC 61851-1 Table A.8.

    Returns a float rounded to 0.1 A; 0.0 when the duty offers no current (below 3 %,
    7-8 %, above 97 %, so also 0 % and 100 %); ``DIGITAL`` for 3-7 % (digital
    communication, nominal 5 %); None when the duty is unknown.
    """
    if duty_pct is None:
        return None
    d = duty_pct
    if d < 3.0:
        return 0.0
    if d <= 7.0:
        return DIGITAL
    if d < 8.0:
        return 0.0
    if d < 10.0:
        return 6.0
    if d <= 85.0:
        return round(d * 0.6, 1)
    if d <= 96.0:
        return round((d - 64.0) * 2.5, 1)
    if d <= 97.0:
        return 80.0
    return 0.0


def duty_from_current(amps):
    """The duty cycle (%) advertising ``amps`` (6-80 A), for the EVSE side of the pilot.

    Currents above 51 A up to 52.5 A have no duty of their own (85 % offers 51 A, just
    above 85 % offers just above 52.5 A): they get 85 %, so the vehicle is never offered
    more than ``amps``.
    """
    if not 6.0 <= amps <= 80.0:
        raise ValueError("%s A cannot be advertised on the pilot: the duty cycle offers 6 to 80 A" % amps)
    if amps <= 52.5:
        return min(amps / 0.6, 85.0)
    return amps / 2.5 + 64.0


def duty_from_edges(edges, max_periods=8):
    """PWM duty (%) from a line's edge times, or None without one complete period.

    ``edges`` is a time-ordered sequence of ``(timestamp, rising)``; the unit of the
    timestamps does not matter. Uses the latest complete periods (rising, falling, rising),
    at most ``max_periods`` of them, and stops at a missed edge.
    """
    i = len(edges) - 1
    while i >= 0 and not edges[i][1]:
        i -= 1
    high = 0
    total = 0
    periods = 0
    while i >= 2 and periods < max_periods:
        close, close_rising = edges[i]
        fall, fall_rising = edges[i - 1]
        start, start_rising = edges[i - 2]
        if not close_rising or fall_rising or not start_rising:
            break
        if not start <= fall <= close or close == start:
            break
        high += fall - start
        total += close - start
        periods += 1
        i -= 2
    if total == 0:
        return None
    return 100.0 * high / total


class PinSample:
    """One raw sample of the pin bank; None wherever the board cannot measure the value.

    ``pilot_volts``: the pilot's high level; ``pilot_lines``: the 5 comparator outputs;
    ``duty_pct``: measured PWM duty (100 = steady high, 0 = steady low);
    ``contactor_command`` / ``contactor_feedback``: True = closed.
    """

    __slots__ = ("pilot_volts", "pilot_lines", "duty_pct", "contactor_command", "contactor_feedback")

    def __init__(self, pilot_volts=None, pilot_lines=None, duty_pct=None,
                 contactor_command=None, contactor_feedback=None):
        self.pilot_volts = pilot_volts
        self.pilot_lines = pilot_lines
        self.duty_pct = duty_pct
        self.contactor_command = contactor_command
        self.contactor_feedback = contactor_feedback

    def __repr__(self):
        return "PinSample(%s V, lines %s, duty %s %%, command %s, feedback %s)" % (
            self.pilot_volts, self.pilot_lines, self.duty_pct, self.contactor_command,
            self.contactor_feedback)


class Debouncer:
    """Accepts a new value only after it was sampled unchanged for ``debounce_ms``.

    None samples (ambiguous) restart the wait and never become the accepted value.
    With a ``tolerance``, numbers within it of each other count as unchanged.
    """

    __slots__ = ("debounce_ms", "tolerance", "value", "since_ms", "_candidate", "_candidate_ms")

    def __init__(self, debounce_ms, tolerance=0):
        self.debounce_ms = debounce_ms
        self.tolerance = tolerance
        self.value = None  # the accepted value
        self.since_ms = None  # when the accepted value was first sampled
        self._candidate = None
        self._candidate_ms = 0

    def _same(self, a, b):
        if a is None or b is None:
            return a is b
        if self.tolerance:
            return abs(a - b) <= self.tolerance
        return a == b

    def update(self, sample, now_ms):
        """Feed one sample; True when it made a new value accepted."""
        if sample is None or self._same(sample, self.value):
            self._candidate = None
            return False
        if self._candidate is None or not self._same(sample, self._candidate):
            self._candidate = sample
            self._candidate_ms = now_ms
        if now_ms - self._candidate_ms < self.debounce_ms:
            return False
        self.value = sample
        self.since_ms = self._candidate_ms
        self._candidate = None
        return True


class InputState:
    """The accepted (debounced) inputs: what the session engine reasons about.

    ``pilot``: "A".."F" or None before the first accepted state; ``duty_pct``: measured
    duty or None; ``advertised_a``: current offered by the duty (0.0 = none; None when the
    duty is unknown or digital); ``digital``: the duty asks for digital communication;
    ``contactor_command`` / ``contactor_feedback``: True = closed, None = no such line;
    ``since_ms``: monotonic ms when the current pilot state was first sampled.
    """

    __slots__ = ("pilot", "duty_pct", "advertised_a", "digital", "contactor_command",
                 "contactor_feedback", "since_ms")

    def __init__(self, pilot=None, duty_pct=None, advertised_a=None, digital=False,
                 contactor_command=None, contactor_feedback=None, since_ms=None):
        self.pilot = pilot
        self.duty_pct = duty_pct
        self.advertised_a = advertised_a
        self.digital = digital
        self.contactor_command = contactor_command
        self.contactor_feedback = contactor_feedback
        self.since_ms = since_ms

    def copy(self):
        return InputState(self.pilot, self.duty_pct, self.advertised_a, self.digital,
                          self.contactor_command, self.contactor_feedback, self.since_ms)

    def __eq__(self, other):
        return isinstance(other, InputState) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self):
        return "InputState(%s, duty %s %%, %s, command %s, feedback %s, since %s ms)" % (
            self.pilot, self.duty_pct, DIGITAL if self.digital else "%s A" % self.advertised_a,
            _closed(self.contactor_command), _closed(self.contactor_feedback), self.since_ms)


def _closed(value):
    return "-" if value is None else ("closed" if value else "open")


class InputMonitor:
    """Samples a pin bank, decodes and debounces it, and reports each accepted change.

    ``io_config`` is the board's ``io`` section; ``clock`` gives ``monotonic_ms()``;
    ``listener.on_inputs(state, now_ms)`` gets a fresh ``InputState`` copy per change.
    ``read_errors`` counts pin bank reads that raised; ``ambiguous`` counts pilot samples
    that decoded to no state.
    """

    def __init__(self, pins, io_config, clock, listener):
        pilot = io_config["pilot"]
        self.pins = pins
        self.clock = clock
        self.listener = listener
        self.sample_ms = pilot["sample_ms"]
        self.use_lines = pilot["source"] == "lines"
        debounce_ms = pilot["debounce_ms"]
        self._pilot = Debouncer(debounce_ms)
        self._duty = Debouncer(debounce_ms, DUTY_TOLERANCE_PCT)
        self._command = Debouncer(debounce_ms)
        self._feedback = Debouncer(debounce_ms)
        self._debouncers = (self._pilot, self._duty, self._command, self._feedback)
        self._state = InputState()
        self._stopping = False
        self._waiting = False  # waiting on the bank's announcement with no debounce running
        self.samples = 0
        self.ambiguous = 0
        self.read_errors = 0
        self.changes = 0
        self._sampled_ms = None

    @property
    def edge_driven(self):
        """True when the bank announces changes (the monitor waits instead of sampling)."""
        return getattr(self.pins, "wait_change", None) is not None

    @property
    def sampled_ms(self):
        """The time up to which the monitor has looked at the inputs (None before the first read).

        While it waits on an announcing bank with no debounce running, no announcement
        means no change: that is the clock's time, unless an announcement is still unread.
        """
        if self._waiting and not getattr(self.pins, "announced", False):
            return self.clock.monotonic_ms()
        return self._sampled_ms

    @sampled_ms.setter
    def sampled_ms(self, value):
        self._sampled_ms = value

    def current(self):
        """The last accepted inputs (a copy)."""
        return self._state.copy()

    def stop(self):
        """Ask ``run()`` to return after the current sample."""
        self._stopping = True

    def debounce_due_ms(self):
        """When a running debounce can accept its value; None when none is running."""
        due = None
        for debouncer in self._debouncers:
            if debouncer._candidate is not None:
                at = debouncer._candidate_ms + debouncer.debounce_ms
                if due is None or at < due:
                    due = at
        return due

    async def run(self):
        """Read the inputs until ``stop()``: at each announcement of an announcing bank, else
        every ``sample_ms`` (missed slots are skipped, not bursted)."""
        if self.edge_driven:
            await self._run_on_edges()
            return
        clock = self.clock
        next_ms = clock.monotonic_ms()
        while not self._stopping:
            now = clock.monotonic_ms()
            if now < next_ms:
                await asyncio.sleep((next_ms - now) / 1000)
                continue
            next_ms += self.sample_ms
            if next_ms <= now:
                next_ms = now + self.sample_ms
            self.poll(now)

    async def _run_on_edges(self):
        clock = self.clock
        wait_change = self.pins.wait_change
        try:
            while not self._stopping:
                now = clock.monotonic_ms()
                self.poll(now)
                due = self.debounce_due_ms()
                self._waiting = due is None
                await wait_change(IDLE_LOOK_MS if due is None else max(due - now, 1))
                self._waiting = False
        finally:
            self._waiting = False

    def poll(self, now_ms):
        """Take one sample at ``now_ms``; True when it produced an accepted change."""
        self.samples += 1
        self._sampled_ms = now_ms
        try:
            sample = self.pins.read()
        except Exception as error:  # a broken bank must not stop the monitor
            self.read_errors += 1
            if self.read_errors == 1 or self.read_errors % 1000 == 0:
                log.warning("pin bank read failed (%d so far): %s" % (self.read_errors, error))
            return False
        if self.use_lines:
            pilot = state_from_lines(sample.pilot_lines)
        else:
            pilot = state_from_voltage(sample.pilot_volts)
        if pilot is None:
            self.ambiguous += 1
        changed = self._pilot.update(pilot, now_ms)
        changed = self._duty.update(sample.duty_pct, now_ms) or changed
        changed = self._command.update(sample.contactor_command, now_ms) or changed
        changed = self._feedback.update(sample.contactor_feedback, now_ms) or changed
        if not changed:
            return False
        state = self._state
        state.pilot = self._pilot.value
        state.since_ms = self._pilot.since_ms
        state.duty_pct = self._duty.value
        offered = current_from_duty(state.duty_pct)
        state.digital = offered == DIGITAL
        state.advertised_a = None if state.digital else offered
        state.contactor_command = self._command.value
        state.contactor_feedback = self._feedback.value
        self.changes += 1
        try:
            self.listener.on_inputs(state.copy(), now_ms)
        except Exception as error:  # the listener's failure must not stop the sampling
            log.error("input listener failed on %r: %r" % (state, error))
            if isinstance(error, (MemoryError, OSError)):
                # Out of memory or a disk that refuses: an alarm the operator sees.
                on_fault = getattr(self.listener, "on_fault", None)
                if on_fault is not None:
                    on_fault("inputs", error)
        return True
