"""PowerMonitor driven directly: readings, inputs and a clock the test controls.

Every condition of ``events.py`` is raised exactly once per occurrence and cleared exactly
once; numbers come from the ``numbers`` callable; severities are those of ``SEVERITY``.
No broker, no meter, no sleeps: time moves only when the test moves ``Clock``.
"""

import pytest

from evse_agent.config import validate
from evse_agent.events import CRITICAL, SEVERITY, WARNING, PowerMonitor
from evse_agent.pilot import InputState
from evse_agent.reading import Reading

EPOCH = 1_750_000_000.0


class Clock:
    """Monotonic ms and wall seconds that move only through ``advance``."""

    def __init__(self):
        self.mono = 5_000_000
        self.wall = EPOCH

    def monotonic_ms(self):
        return self.mono

    def time(self):
        return self.wall

    def advance(self, ms):
        self.mono += ms
        self.wall += ms / 1000.0


class Rig:
    """A PowerMonitor with a recording sink and a counting ``numbers`` callable."""

    def __init__(self, phases=3, **events):
        self.config = validate({"station_id": "t-001", "meter": {"model": "sdm630", "port": "x"},
                                "events": events})["events"]
        self.clock = Clock()
        self.reports = []  # snapshots: the monitor reuses the Event object for the clear
        self.issued = []
        self.monitor = PowerMonitor(self.config, phases, self.clock, self._sink, self._number)
        self.phases = phases

    def _number(self):
        number = 100 + len(self.issued)
        self.issued.append(number)
        return number

    def _sink(self, event):
        self.reports.append({"number": event.number, "type": event.type, "key": event.key,
                             "severity": event.severity, "start": event.start, "end": event.end,
                             "values": dict(event.values)})

    # -- driving -----------------------------------------------------------------------

    def inputs(self, pilot, command=None, feedback=None, advertised_a=16.0, ago_ms=0):
        """The inputs change, accepted ``ago_ms`` before now."""
        self.monitor.on_inputs(InputState(pilot, None, advertised_a, False, command, feedback, None),
                               self.clock.monotonic_ms() - ago_ms)

    def charge(self, advertised_a=16.0):
        """Charging, since long enough that the contactor and the vehicle have followed."""
        self.inputs("C", command=True, feedback=True, advertised_a=advertised_a,
                    ago_ms=self.config["contactor_check_ms"])

    def reading(self, voltage=None, current=None, power=None, advertised_a=16.0):
        """A reading now, confirmed by the input samples after it (inputs unchanged)."""
        voltage = voltage if voltage is not None else [230.0] * self.phases
        current = current if current is not None else [10.0] * self.phases
        reading = Reading(self.clock.time(), self.clock.monotonic_ms(), list(voltage), list(current),
                          [None] * self.phases, power, 50.0, 1_000_000, 1)
        self.monitor.on_reading(reading, advertised_a)
        self.monitor.confirm(self.clock.monotonic_ms() + self.monitor.confirm_ms)

    def tick(self):
        self.monitor.tick(self.clock.monotonic_ms())

    # -- looking -----------------------------------------------------------------------

    def of(self, type_):
        return [r for r in self.reports if r["type"] == type_]

    def raised(self, type_):
        return [r for r in self.of(type_) if r["end"] is None]

    def cleared(self, type_):
        return [r for r in self.of(type_) if r["end"] is not None]


def assert_well_formed(rig):
    """Numbers come from ``numbers()`` and are unique per raise; a clear keeps its raise's
    number; each raise is followed by at most one clear; severities match SEVERITY."""
    raises = [r for r in rig.reports if r["end"] is None]
    numbers = [r["number"] for r in raises]
    assert len(numbers) == len(set(numbers))
    assert sorted(numbers) == sorted(rig.issued)
    for report in rig.reports:
        assert report["severity"] == SEVERITY[report["type"]]
        if report["end"] is not None:
            same = [r for r in rig.reports if r["number"] == report["number"]]
            assert [r["end"] is None for r in same] == [True, False], same
            assert same[0]["key"] == report["key"]


# -- supply voltage --------------------------------------------------------------------

def test_voltage_out_of_band_per_phase_raises_once_and_clears_once():
    """A phase outside [207, 253] V raises one event per phase with its values; repeats do
    not report again; it clears once when back in band."""
    rig = Rig()
    rig.reading([230.0, 230.0, 230.0])
    assert rig.reports == []
    rig.clock.advance(1000)
    rig.reading([260.0, 230.0, 200.0])
    raised = rig.raised("voltage_out_of_band")
    assert [(r["key"], r["values"]) for r in raised] == [
        ("voltage_out_of_band:L1", {"phase": 1, "voltage_v": 260.0, "min_v": 207.0, "max_v": 253.0}),
        ("voltage_out_of_band:L3", {"phase": 3, "voltage_v": 200.0, "min_v": 207.0, "max_v": 253.0}),
    ]
    assert all(r["severity"] == WARNING and r["start"] == EPOCH + 1 for r in raised)
    for _ in range(5):
        rig.clock.advance(1000)
        rig.reading([261.0, 230.0, 199.0])
    assert len(rig.reports) == 2
    assert rig.monitor.active["voltage_out_of_band:L1"].values["voltage_v"] == 261.0  # kept current
    rig.clock.advance(1000)
    rig.reading([230.0, 230.0, 199.0])
    cleared = rig.cleared("voltage_out_of_band")
    assert [(c["key"], c["values"], c["end"]) for c in cleared] == [
        ("voltage_out_of_band:L1", {"phase": 1, "voltage_v": 230.0}, EPOCH + 7)]
    rig.clock.advance(1000)
    rig.reading([230.0, 230.0, 230.0])
    rig.reading([230.0, 230.0, 230.0])
    assert [c["key"] for c in rig.cleared("voltage_out_of_band")] == [
        "voltage_out_of_band:L1", "voltage_out_of_band:L3"]
    assert rig.monitor.active == {}
    assert_well_formed(rig)


def test_voltage_band_edges_are_inside():
    """207.0 V and 253.0 V are in band; just beyond them is not."""
    rig = Rig()
    rig.reading([207.0, 253.0, 230.0])
    assert rig.reports == []
    rig.reading([206.9, 253.1, 230.0])
    assert sorted(r["key"] for r in rig.raised("voltage_out_of_band")) == [
        "voltage_out_of_band:L1", "voltage_out_of_band:L2"]


def test_voltage_below_phase_loss_is_not_out_of_band():
    """A phase under phase_loss_v (100 V) is a lost phase, not a low voltage."""
    rig = Rig()
    rig.reading([230.0, 230.0, 0.0])
    assert rig.raised("voltage_out_of_band") == []
    rig.reading([230.0, 230.0, 99.9])
    assert rig.raised("voltage_out_of_band") == []
    assert len(rig.raised("phase_loss")) == 1


def test_voltage_missing_value_is_skipped():
    """A None voltage neither raises nor clears that phase's event."""
    rig = Rig()
    rig.reading([300.0, 230.0, 230.0])
    rig.reading([None, 230.0, 230.0])
    assert len(rig.raised("voltage_out_of_band")) == 1
    assert rig.cleared("voltage_out_of_band") == []


# -- phase loss ------------------------------------------------------------------------

def test_phase_loss_on_three_phase_raises_once_with_the_lost_phases_and_clears():
    """L3 below 100 V while L1/L2 are up: one critical phase_loss naming L3; cleared once when
    every phase is back."""
    rig = Rig()
    rig.reading([230.0, 230.0, 230.0])
    rig.clock.advance(1000)
    rig.reading([230.0, 231.0, 3.2])
    rig.clock.advance(1000)
    rig.reading([230.0, 231.0, 0.0])
    raised = rig.raised("phase_loss")
    assert len(raised) == 1
    assert raised[0]["severity"] == CRITICAL
    assert raised[0]["values"] == {"phases": [3], "voltage_v": [230.0, 231.0, 3.2]}
    rig.clock.advance(1000)
    rig.reading([230.0, 231.0, 229.0])
    rig.reading([230.0, 231.0, 229.0])
    cleared = rig.cleared("phase_loss")
    assert len(cleared) == 1 and cleared[0]["number"] == raised[0]["number"]
    assert cleared[0]["values"] == {"voltage_v": [230.0, 231.0, 229.0]}
    assert_well_formed(rig)


def test_phase_loss_not_raised_when_every_phase_is_down():
    """All phases below phase_loss_v is a supply outage, not a lost phase."""
    rig = Rig()
    rig.reading([0.0, 0.0, 0.0])
    assert rig.reports == []


def test_no_phase_loss_on_a_single_phase_meter():
    """A single-phase monitor never reports phase_loss, whatever the reading holds."""
    rig = Rig(phases=1)
    rig.reading([0.0], current=[0.0])
    rig.reading([230.0], current=[0.0])
    assert rig.reports == []
    gated = Rig(phases=1)
    gated.reading([230.0, 230.0, 0.0], current=[0.0, 0.0, 0.0])
    assert gated.of("phase_loss") == []


# -- power drop ------------------------------------------------------------------------

def test_power_drop_is_one_shot_while_charging():
    """A fall of more than 50 % between two readings while charging reports one instant
    event: active, then at once cleared with end = start; staying low does not report again;
    a new fall does."""
    rig = Rig()
    rig.charge()
    rig.reading(power=11000.0)
    rig.clock.advance(1000)
    rig.reading(power=5600.0)  # -49 %: not a drop
    assert rig.of("power_drop") == []
    rig.clock.advance(1000)
    rig.reading(power=2000.0)  # -64 %
    drops = rig.of("power_drop")
    assert [d["end"] for d in drops] == [None, EPOCH + 2]
    assert drops[0]["number"] == drops[1]["number"]
    assert drops[1]["start"] == EPOCH + 2
    assert drops[0]["values"] == {"from_w": 5600.0, "to_w": 2000.0}
    assert drops[0]["severity"] == WARNING
    assert "power_drop" not in rig.monitor.active
    assert all(e.instant for e in rig.monitor.recent if e.type == "power_drop")
    rig.clock.advance(1000)
    rig.reading(power=2000.0)
    assert len(rig.raised("power_drop")) == 1
    rig.clock.advance(1000)
    rig.reading(power=11000.0)
    rig.clock.advance(1000)
    rig.reading(power=100.0)
    assert len(rig.raised("power_drop")) == 2
    numbers = [d["number"] for d in rig.raised("power_drop")]
    assert len(set(numbers)) == 2
    assert_well_formed(rig)


def test_no_power_drop_when_not_charging():
    """Power falling while the vehicle does not ask to charge (B, or C with the contactor
    commanded open) is not a drop; nor is the first reading after a pause."""
    rig = Rig()
    rig.inputs("B", command=False, feedback=False)
    rig.reading(power=11000.0)
    rig.reading(power=0.0)
    rig.inputs("C", command=False, feedback=False)
    rig.reading(power=11000.0)
    rig.reading(power=0.0)
    assert rig.of("power_drop") == []
    rig.charge()
    rig.reading(power=11000.0)
    rig.inputs("B", command=False, feedback=False)
    rig.charge()
    rig.reading(power=1000.0)  # compared with nothing: the pause reset the history
    assert rig.of("power_drop") == []


# -- power fluctuation -----------------------------------------------------------------

def test_power_fluctuation_window_raises_once_and_clears_when_the_swing_leaves_the_window():
    """(max - min) / max over the 10 s window above 25 % raises once (needs 3 readings);
    it clears once the low reading is older than the window."""
    rig = Rig()
    rig.charge()
    rig.reading(power=10000.0)  # t = 0
    rig.clock.advance(1000)
    rig.reading(power=7000.0)  # t = 1 s: 30 % swing, but only 2 readings
    assert rig.of("power_fluctuation") == []
    rig.clock.advance(1000)
    rig.reading(power=10000.0)  # t = 2 s
    raised = rig.raised("power_fluctuation")
    assert len(raised) == 1
    assert raised[0]["values"] == {"min_w": 7000.0, "max_w": 10000.0, "swing_pct": 30.0}
    assert raised[0]["severity"] == WARNING
    for _ in range(9):  # t = 3 .. 11 s: the 7000 W reading (t = 1 s) is still inside
        rig.clock.advance(1000)
        rig.reading(power=10000.0)
    assert len(rig.of("power_fluctuation")) == 1
    rig.clock.advance(1000)  # t = 12 s: horizon 2 s, the 7000 W reading has left
    rig.reading(power=10000.0)
    cleared = rig.cleared("power_fluctuation")
    assert len(cleared) == 1 and cleared[0]["number"] == raised[0]["number"]
    assert cleared[0]["values"]["swing_pct"] == 0.0
    rig.clock.advance(1000)
    rig.reading(power=10000.0)
    assert len(rig.of("power_fluctuation")) == 2
    assert_well_formed(rig)


def test_power_fluctuation_within_tolerance_is_quiet():
    """Swings up to 25 % of max are normal."""
    rig = Rig()
    rig.charge()
    for power in (10000.0, 7500.0, 10000.0, 8000.0, 9000.0):
        rig.clock.advance(1000)
        rig.reading(power=power)
    assert rig.reports == []


def test_power_fluctuation_clears_when_charging_stops():
    """An active fluctuation ends when the vehicle stops charging."""
    rig = Rig()
    rig.charge()
    for power in (10000.0, 6000.0, 10000.0):
        rig.clock.advance(1000)
        rig.reading(power=power)
    assert len(rig.raised("power_fluctuation")) == 1
    rig.inputs("B", command=False, feedback=False)
    assert len(rig.cleared("power_fluctuation")) == 1
    assert_well_formed(rig)


# -- overcurrent -----------------------------------------------------------------------

def test_overcurrent_respects_the_grace_time_and_clears_when_back_under():
    """Above advertised + 10 % for less than 5 s: nothing; after 5 s: one critical event
    with the values; back under the limit: one clear."""
    rig = Rig()
    rig.charge()
    rig.reading(current=[17.6, 17.0, 16.0], power=11000.0)  # at the limit (16 A + 10 %)
    assert rig.of("overcurrent") == []
    rig.clock.advance(1000)
    rig.reading(current=[20.0, 16.0, 16.0], power=11000.0)  # over from here
    for _ in range(4):
        rig.clock.advance(1000)
        rig.reading(current=[20.0, 16.0, 16.0], power=11000.0)  # 4 s over
    rig.clock.advance(900)
    rig.reading(current=[16.0, 20.5, 16.0], power=11000.0)  # 4.9 s over
    assert rig.of("overcurrent") == []
    rig.clock.advance(200)
    rig.reading(current=[16.0, 20.5, 16.0], power=11000.0)  # 5.1 s over
    raised = rig.raised("overcurrent")
    assert len(raised) == 1
    assert raised[0]["severity"] == CRITICAL
    assert raised[0]["values"] == {"current_a": 20.5, "advertised_a": 16.0, "limit_a": 17.6}
    for _ in range(3):
        rig.clock.advance(1000)
        rig.reading(current=[21.0, 16.0, 16.0], power=11000.0)
    assert len(rig.of("overcurrent")) == 1
    rig.clock.advance(1000)
    rig.reading(current=[16.0, 16.0, 16.0], power=11000.0)
    cleared = rig.cleared("overcurrent")
    assert len(cleared) == 1 and cleared[0]["number"] == raised[0]["number"]
    assert cleared[0]["values"] == {"current_a": 16.0, "advertised_a": 16.0}
    assert_well_formed(rig)


def test_overcurrent_grace_restarts_after_a_dip_under_the_limit():
    """A reading under the limit restarts the grace time."""
    rig = Rig()
    rig.charge()
    rig.reading(current=[20.0] * 3, power=11000.0)
    rig.clock.advance(4000)
    rig.reading(current=[16.0] * 3, power=11000.0)
    rig.clock.advance(1000)
    rig.reading(current=[20.0] * 3, power=11000.0)  # 5 s after the first, 0 s into this one
    rig.clock.advance(4000)
    rig.reading(current=[20.0] * 3, power=11000.0)
    assert rig.of("overcurrent") == []
    rig.clock.advance(1500)
    rig.reading(current=[20.0] * 3, power=11000.0)
    assert len(rig.raised("overcurrent")) == 1


def test_no_overcurrent_check_when_the_advertised_current_is_unknown():
    """Without a known advertised current (no duty, or digital) there is nothing to compare."""
    rig = Rig()
    rig.inputs("C", command=True, feedback=True, advertised_a=None)
    for _ in range(10):
        rig.reading(current=[63.0] * 3, power=40000.0, advertised_a=None)
        rig.clock.advance(1000)
    assert rig.of("overcurrent") == []


def test_overcurrent_clears_when_charging_stops():
    """An active overcurrent ends once when the vehicle stops charging."""
    rig = Rig()
    rig.charge()
    rig.reading(current=[30.0] * 3, power=20000.0)
    rig.clock.advance(6000)
    rig.reading(current=[30.0] * 3, power=20000.0)
    assert len(rig.raised("overcurrent")) == 1
    rig.inputs("B", command=False, feedback=False)
    rig.inputs("A", command=False, feedback=False)
    assert len(rig.cleared("overcurrent")) == 1
    assert_well_formed(rig)


# -- contactor -------------------------------------------------------------------------

def test_contactor_welded_after_check_time_and_cleared_when_feedback_opens():
    """Feedback closed while commanded open: nothing before 500 ms, one critical event
    after; repeated ticks do not repeat it; cleared once when the feedback opens."""
    rig = Rig()
    rig.charge()
    rig.clock.advance(1000)
    rig.inputs("B", command=False, feedback=True)  # command opened, contact stays closed
    for _ in range(4):
        rig.clock.advance(100)
        rig.tick()
    rig.clock.advance(99)
    rig.tick()  # 499 ms
    assert rig.of("contactor_welded") == []
    rig.clock.advance(1)
    rig.tick()  # 500 ms
    raised = rig.raised("contactor_welded")
    assert len(raised) == 1
    assert raised[0]["values"] == {"command": False, "feedback": True}
    assert raised[0]["severity"] == CRITICAL
    for _ in range(20):
        rig.clock.advance(100)
        rig.tick()
    assert len(rig.of("contactor_welded")) == 1
    rig.charge()  # closing again proves nothing: the contact is still closed
    rig.clock.advance(1000)
    rig.inputs("B", command=False, feedback=True)
    rig.clock.advance(1000)
    rig.tick()
    assert len(rig.of("contactor_welded")) == 1  # the same, still active occurrence
    rig.inputs("B", command=False, feedback=False)
    rig.tick()
    cleared = rig.cleared("contactor_welded")
    assert len(cleared) == 1 and cleared[0]["values"] == {"command": False, "feedback": False}
    assert_well_formed(rig)


def test_next_check_is_the_contactor_deadline_and_ticking_only_then_raises_on_time():
    """The supervisor sleeps until ``next_check_ms``: it names the welded and failed-to-close
    deadlines (the earlier first), a tick at exactly that time raises, and once raised or
    resolved there is nothing left to wait for."""
    rig = Rig()
    assert rig.monitor.next_check_ms() is None  # no inputs yet
    rig.inputs("B", command=False, feedback=False)
    assert rig.monitor.next_check_ms() is None  # contactor open and agreeing: nothing due
    rig.clock.advance(1000)
    closing_at = rig.clock.monotonic_ms()
    rig.inputs("C", command=True, feedback=False)
    assert rig.monitor.next_check_ms() == closing_at + 500
    rig.clock.advance(500)
    rig.tick()
    assert len(rig.raised("contactor_failed_to_close")) == 1
    assert rig.monitor.next_check_ms() is None  # raised: nothing more to decide
    rig.inputs("C", command=True, feedback=True)
    assert rig.monitor.next_check_ms() is None
    rig.clock.advance(1000)
    opened_at = rig.clock.monotonic_ms()
    rig.inputs("B", command=False, feedback=True)  # the contact stays closed
    assert rig.monitor.next_check_ms() == opened_at + 500
    rig.clock.advance(499)
    rig.tick()
    assert rig.of("contactor_welded") == []
    rig.clock.advance(1)
    rig.tick()
    assert len(rig.raised("contactor_welded")) == 1
    assert rig.monitor.next_check_ms() is None
    assert_well_formed(rig)


def test_boards_without_contactor_lines_never_have_a_check_due():
    rig = Rig()
    rig.inputs("C")
    assert rig.monitor.next_check_ms() is None


def test_contactor_feedback_following_within_check_time_is_not_welded():
    """A feedback that opens 300 ms after the command is a normal contactor."""
    rig = Rig()
    rig.charge()
    rig.inputs("B", command=False, feedback=True)
    rig.clock.advance(300)
    rig.tick()
    rig.inputs("B", command=False, feedback=False)
    for _ in range(20):
        rig.clock.advance(100)
        rig.tick()
    assert rig.reports == []


def test_contactor_failed_to_close_after_check_time_and_cleared_when_feedback_arrives():
    """Commanded closed, no feedback: nothing before 500 ms, one event after, cleared once
    by the feedback."""
    rig = Rig()
    rig.inputs("B", command=False, feedback=False)
    rig.clock.advance(1000)
    rig.inputs("C", command=True, feedback=False)
    rig.clock.advance(499)
    rig.tick()
    assert rig.of("contactor_failed_to_close") == []
    rig.clock.advance(1)
    rig.tick()
    raised = rig.raised("contactor_failed_to_close")
    assert len(raised) == 1
    assert raised[0]["values"] == {"command": True, "feedback": False}
    assert raised[0]["severity"] == CRITICAL
    for _ in range(10):
        rig.clock.advance(100)
        rig.tick()
    assert len(rig.of("contactor_failed_to_close")) == 1
    rig.inputs("C", command=True, feedback=True)
    cleared = rig.cleared("contactor_failed_to_close")
    assert len(cleared) == 1 and cleared[0]["number"] == raised[0]["number"]
    assert_well_formed(rig)


def test_contactor_failed_to_close_cleared_when_the_command_opens():
    """Giving up on closing (command open) ends the failed-to-close event once."""
    rig = Rig()
    rig.inputs("C", command=True, feedback=False)
    rig.clock.advance(600)
    rig.tick()
    assert len(rig.raised("contactor_failed_to_close")) == 1
    rig.inputs("B", command=False, feedback=False)
    rig.clock.advance(600)
    rig.tick()
    assert len(rig.cleared("contactor_failed_to_close")) == 1
    assert rig.of("contactor_welded") == []
    assert_well_formed(rig)


def test_contactor_closing_in_time_is_quiet():
    """Feedback 200 ms after the command: no event."""
    rig = Rig()
    rig.inputs("C", command=True, feedback=False)
    rig.clock.advance(200)
    rig.inputs("C", command=True, feedback=True)
    for _ in range(20):
        rig.clock.advance(100)
        rig.tick()
    assert rig.reports == []


def test_board_without_feedback_line_never_raises_contactor_events():
    """No feedback line (None): neither welded nor failed-to-close, however long."""
    rig = Rig()
    rig.inputs("B", command=False, feedback=None)
    for _ in range(50):
        rig.clock.advance(100)
        rig.tick()
    rig.inputs("C", command=True, feedback=None)
    for _ in range(50):
        rig.clock.advance(100)
        rig.tick()
    rig.inputs("B", command=False, feedback=None)
    for _ in range(50):
        rig.clock.advance(100)
        rig.tick()
    bare = Rig()
    bare.inputs("C")  # no contactor lines at all
    for _ in range(50):
        bare.clock.advance(100)
        bare.tick()
    assert rig.reports == [] and bare.reports == []


def test_tick_before_any_inputs_is_harmless():
    """The supervisor may tick before the first accepted inputs."""
    rig = Rig()
    rig.tick()
    rig.clock.advance(10000)
    rig.tick()
    assert rig.reports == []


# -- pilot -----------------------------------------------------------------------------

@pytest.mark.parametrize("state, type_, severity", [("E", "pilot_error", CRITICAL),
                                                    ("F", "evse_unavailable", WARNING)])
def test_pilot_state_events_raise_and_clear_once(state, type_, severity):
    """E raises pilot_error, F evse_unavailable, once each, cleared once on leaving the state."""
    rig = Rig()
    rig.inputs("B", False, False)
    rig.clock.advance(1000)
    rig.inputs(state, False, False)
    rig.clock.advance(1000)
    rig.inputs(state, False, False, advertised_a=10.0)  # another input change, same state
    raised = rig.raised(type_)
    assert len(raised) == 1
    assert raised[0]["severity"] == severity and raised[0]["values"] == {"pilot": state}
    assert raised[0]["start"] == EPOCH + 1
    rig.clock.advance(1000)
    rig.inputs("A", False, False)
    rig.inputs("B", False, False)
    cleared = rig.cleared(type_)
    assert len(cleared) == 1 and cleared[0]["values"] == {"pilot": "A"} and cleared[0]["end"] == EPOCH + 3
    assert_well_formed(rig)


def test_pilot_e_to_f_ends_one_and_starts_the_other():
    """Going straight from E to F clears pilot_error and raises evse_unavailable."""
    rig = Rig()
    rig.inputs("E")
    rig.inputs("F")
    assert [(r["type"], r["end"] is None) for r in rig.reports] == [
        ("pilot_error", True), ("pilot_error", False), ("evse_unavailable", True)]


# -- meter link ------------------------------------------------------------------------

def test_meter_offline_raises_once_and_clears_once():
    """Declared offline: one warning with the last error; repeats are silent; online clears."""
    rig = Rig()
    rig.monitor.on_meter_link(True, None)
    assert rig.reports == []
    rig.monitor.on_meter_link(False, "timeout after 500 ms")
    rig.clock.advance(2000)
    rig.monitor.on_meter_link(False, "CRC error")
    raised = rig.raised("meter_offline")
    assert len(raised) == 1
    assert raised[0]["values"] == {"online": False, "last_error": "timeout after 500 ms"}
    assert raised[0]["severity"] == WARNING
    rig.clock.advance(1000)
    rig.monitor.on_meter_link(True, None)
    rig.monitor.on_meter_link(True, None)
    cleared = rig.cleared("meter_offline")
    assert len(cleared) == 1 and cleared[0]["values"] == {"online": True}
    assert cleared[0]["start"] == EPOCH and cleared[0]["end"] == EPOCH + 3
    assert_well_formed(rig)


# -- everything at once ----------------------------------------------------------------

def test_numbers_unique_and_session_attached_across_many_events():
    """Across a mix of conditions, each raise takes a fresh number from ``numbers()``, clears
    reuse it, and the monitor's session id is stamped on the events."""
    rig = Rig()
    rig.monitor.session_id = "t-001-000007"
    rig.inputs("E")
    rig.inputs("B", False, False)
    rig.monitor.on_meter_link(False, "silent")
    rig.reading([260.0, 230.0, 0.0])
    rig.monitor.on_meter_link(True, None)
    rig.reading([230.0, 230.0, 230.0])
    rig.inputs("C", command=True, feedback=False)
    rig.clock.advance(600)
    rig.tick()
    rig.inputs("C", command=True, feedback=True)
    types = [r["type"] for r in rig.reports if r["end"] is None]
    assert types == ["pilot_error", "meter_offline", "voltage_out_of_band", "phase_loss",
                     "contactor_failed_to_close"]
    assert len(rig.reports) == 10  # each raised once, cleared once
    assert rig.issued == [100, 101, 102, 103, 104]
    assert rig.monitor.active == {}
    assert all(e.session_id == "t-001-000007" for e in rig.monitor.recent)
    assert_well_formed(rig)
