"""Control pilot: IEC 61851-1 decoding, debouncing, the input monitor, and the vehicle simulator.

The monitor runs against the real sim pin bank reading a real pin file that ``VehicleSim``
replaces atomically, as on the host simulator board (the gpiod port: ``ports/test_gpiod.py``).
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT
from evse_agent import log
from evse_agent.config import validate
from evse_agent.pilot import (DIGITAL, LINE_THRESHOLDS_V, NOMINAL_VOLTS, STATES, Debouncer,
                              InputMonitor, InputState, current_from_duty, duty_from_current,
                              duty_from_edges, lines_from_voltage, state_from_lines,
                              state_from_voltage)
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.sim_pins import SimPinBank
from evse_tools.sim.vehicle_sim import VehicleSim, parse_command

FAST = settings(max_examples=300, deadline=None)

# IEC 61851-1 Table A.4 detection ranges, written out independently of the module: nominal +-1 V.
RANGES = {"A": (11.0, 13.0), "B": (8.0, 10.0), "C": (5.0, 7.0), "D": (2.0, 4.0),
          "E": (-1.0, 1.0), "F": (-13.0, -11.0)}


def io_config(tmp_path, source="adc", debounce_ms=60, sample_ms=10, **pilot):
    """The ``io`` section of a validated board, so these tests use the real schema."""
    pilot_doc = dict({"source": source, "debounce_ms": debounce_ms, "sample_ms": sample_ms}, **pilot)
    board = {"station_id": "test", "meter": {"model": "sdm630", "port": "/dev/null"},
             "io": {"driver": "sim", "sim_file": str(tmp_path / "pins.json"), "pilot": pilot_doc}}
    return validate(board)["io"]


class Recorder:
    """An input listener that keeps every call."""

    def __init__(self):
        self.calls = []

    def on_inputs(self, state, now_ms):
        self.calls.append((state, now_ms))

    def summary(self):
        return [(s.pilot, s.duty_pct, s.advertised_a, s.contactor_command, s.contactor_feedback)
                for s, _ in self.calls]


def settle(monitor, now_ms, duration_ms=150, step_ms=10):
    """Poll ``monitor`` every ``step_ms`` for ``duration_ms``; the time after the last poll."""
    end = now_ms + duration_ms
    while now_ms < end:
        now_ms += step_ms
        monitor.poll(now_ms)
    return now_ms


def write_pins(path, **fields):
    doc = {"pilot_v": 9.0, "duty_pct": 26.67, "contactor_command": False, "contactor_feedback": False,
           "ev_current_a": 0.0, "ev_phases": 3, "updated": time.time()}
    doc.update(fields)
    with open(str(path) + ".tmp", "w") as handle:
        json.dump(doc, handle)
    os.replace(str(path) + ".tmp", path)


# -- voltage ranges -------------------------------------------------------------------------

@pytest.mark.parametrize("volts, state", [
    (13.0, "A"), (12.0, "A"), (11.0, "A"), (13.01, None), (10.99, None),
    (10.0, "B"), (9.0, "B"), (8.0, "B"), (10.01, None), (7.99, None),
    (7.0, "C"), (6.0, "C"), (5.0, "C"), (7.01, None), (4.99, None),
    (4.0, "D"), (3.0, "D"), (2.0, "D"), (4.01, None), (1.99, None),
    (1.0, "E"), (0.0, "E"), (-1.0, "E"), (1.01, None), (-1.01, None),
    (-11.0, "F"), (-12.0, "F"), (-13.0, "F"), (-10.99, None), (-13.01, None),
    (-6.0, None), (20.0, None), (-20.0, None), (None, None),
])
def test_voltage_decodes_at_every_range_boundary(volts, state):
    assert state_from_voltage(volts) == state


@FAST
@given(st.floats(min_value=-20, max_value=20, allow_nan=False))
def test_voltage_decode_agrees_with_the_ranges(volts):
    inside = [state for state, (low, high) in RANGES.items() if low <= volts <= high]
    assert state_from_voltage(volts) == (inside[0] if inside else None)


@FAST
@given(st.floats(min_value=-20, max_value=20, allow_nan=False),
       st.floats(min_value=-20, max_value=20, allow_nan=False))
def test_voltage_decode_is_monotone(v1, v2):
    low, high = min(v1, v2), max(v1, v2)
    s_low, s_high = state_from_voltage(low), state_from_voltage(high)
    if s_low is not None and s_high is not None:
        assert STATES.index(s_low) >= STATES.index(s_high)  # a lower voltage never decodes "higher"


def test_nominal_levels_decode_to_their_state():
    assert [state_from_voltage(NOMINAL_VOLTS[s]) for s in STATES] == list(STATES)


# -- comparator lines -----------------------------------------------------------------------

def test_every_thermometer_code_decodes_and_every_other_code_is_impossible():
    valid = {}
    for code in range(32):
        bits = tuple(bool(code >> (4 - i) & 1) for i in range(5))
        state = state_from_lines(bits)
        if state is not None:
            valid[bits] = state
    assert valid == {
        (False, False, False, False, False): "A",
        (True, False, False, False, False): "B",
        (True, True, False, False, False): "C",
        (True, True, True, False, False): "D",
        (True, True, True, True, False): "E",
        (True, True, True, True, True): "F",
    }
    assert state_from_lines((False, True, False, False, False)) is None  # a gap in the code
    assert state_from_lines((True, True, False, True, False)) is None
    assert state_from_lines((True, True, True, True)) is None  # wrong width
    assert state_from_lines(None) is None


@FAST
@given(st.floats(min_value=-20, max_value=20, allow_nan=False))
def test_lines_from_a_decoder_board_agree_with_the_voltage_ranges(volts):
    by_lines = state_from_lines(lines_from_voltage(volts))
    assert by_lines is not None  # a decoder board always shows a valid code
    by_volts = state_from_voltage(volts)
    if by_volts is not None:
        assert by_lines == by_volts


def test_comparators_switch_strictly_below_their_threshold():
    for index, threshold in enumerate(LINE_THRESHOLDS_V):
        assert lines_from_voltage(threshold)[index] is False
        assert lines_from_voltage(threshold - 0.01)[index] is True


# -- duty cycle -----------------------------------------------------------------------------

@pytest.mark.parametrize("duty, amps", [
    (0.0, 0.0), (2.99, 0.0),
    (3.0, DIGITAL), (5.0, DIGITAL), (7.0, DIGITAL),
    (7.01, 0.0), (7.99, 0.0),
    (8.0, 6.0), (9.99, 6.0), (10.0, 6.0),
    (16.0, 9.6), (26.67, 16.0), (50.0, 30.0), (85.0, 51.0),
    (86.0, 55.0), (90.0, 65.0), (96.0, 80.0),
    (96.5, 80.0), (97.0, 80.0),
    (97.01, 0.0), (100.0, 0.0),
    (None, None),
])
def test_duty_to_current_follows_table_a8_at_its_boundaries(duty, amps):
    assert current_from_duty(duty) == amps


@FAST
@given(st.integers(min_value=60, max_value=800))
def test_advertised_current_round_trips_through_the_duty(tenths):
    amps = tenths / 10
    duty = round(duty_from_current(amps), 2)
    offered = current_from_duty(duty)
    if 51.0 < amps <= 52.5:  # no duty offers these: the EVSE offers 51 A (85 %) instead
        assert offered == 51.0
    else:
        assert offered == pytest.approx(amps, abs=0.05)


@pytest.mark.parametrize("amps", [0.0, 5.9, 80.1, -6.0])
def test_a_current_outside_6_to_80_a_cannot_be_advertised(amps):
    with pytest.raises(ValueError, match=str(amps)):
        duty_from_current(amps)


def _pwm_edges(duty_pct, periods, period_ns=1000000, start_ns=5000):
    edges = []
    for k in range(periods):
        rise = start_ns + k * period_ns
        edges += [(rise, True), (rise + int(period_ns * duty_pct / 100), False)]
    edges.append((start_ns + periods * period_ns, True))
    return edges


def test_duty_from_pwm_edges():
    assert duty_from_edges(_pwm_edges(26.67, 10)) == pytest.approx(26.67, abs=0.01)
    assert duty_from_edges(_pwm_edges(53.3, 1)) == pytest.approx(53.3, abs=0.01)
    edges = _pwm_edges(10.0, 4) + [(4005000 + 700000, False)]  # ends on a falling edge: ignored
    assert duty_from_edges(edges) == pytest.approx(10.0)


def test_duty_uses_only_the_latest_periods_and_stops_at_a_missed_edge():
    old = _pwm_edges(80.0, 20)
    new = _pwm_edges(20.0, 8, start_ns=old[-1][0])
    assert duty_from_edges(old[:-1] + new, max_periods=8) == pytest.approx(20.0)
    broken = _pwm_edges(80.0, 5) + [(6005000, True)] + _pwm_edges(30.0, 2, start_ns=7005000)
    assert duty_from_edges(broken) == pytest.approx(30.0)  # two risings in a row: stop there


def test_duty_needs_one_complete_period():
    assert duty_from_edges([]) is None
    assert duty_from_edges([(0, True), (250, False)]) is None
    assert duty_from_edges([(0, False), (1000, True)]) is None


# -- debouncer ------------------------------------------------------------------------------

def feed(debouncer, values, step_ms=10, start_ms=0):
    """Feed one value per ``step_ms``; the times at which a value was accepted."""
    accepted = []
    for i, value in enumerate(values):
        now = start_ms + i * step_ms
        if debouncer.update(value, now):
            accepted.append((now, debouncer.value))
    return accepted


def test_debouncer_accepts_after_exactly_the_debounce_time():
    bouncer = Debouncer(100)
    assert feed(bouncer, ["B"] * 11) == [(100, "B")]
    assert bouncer.since_ms == 0


def test_bounces_shorter_than_the_debounce_time_are_never_accepted():
    bouncer = Debouncer(100)
    feed(bouncer, ["A"] * 11)
    bounces = (["B"] * 9 + ["A"]) * 5 + (["C"] * 5 + [None]) * 5
    assert feed(bouncer, bounces, start_ms=200) == []
    assert bouncer.value == "A"


def test_ambiguous_samples_restart_the_wait_and_are_never_accepted():
    bouncer = Debouncer(100)
    assert feed(bouncer, [None] * 30) == []
    assert feed(bouncer, ["B"] * 6 + [None] + ["B"] * 11) == [(170, "B")]
    assert bouncer.value == "B" and bouncer.since_ms == 70


def test_zero_debounce_accepts_at_once_and_a_tolerance_ignores_jitter():
    assert feed(Debouncer(0), [True, True, False]) == [(0, True), (20, False)]
    duty = Debouncer(50, tolerance=0.5)
    assert feed(duty, [26.7, 26.6, 26.9, 26.5, 26.7, 26.8]) == [(50, 26.8)]
    assert feed(duty, [26.4, 27.0, 26.3] * 10, start_ms=100) == []
    assert feed(duty, [50.0] * 6, start_ms=500) == [(550, 50.0)]


@FAST
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C", None]), st.integers(min_value=1, max_value=25)),
                max_size=30))
def test_debouncer_accepts_exactly_the_runs_that_held(segments):
    values = [value for value, count in segments for _ in range(count)]
    bouncer = Debouncer(100)
    accepted_after = []
    for i, value in enumerate(values):
        if bouncer.update(value, i * 10):
            # everything sampled over the last debounce period was this value
            assert i >= 10 and values[i - 10:i + 1] == [bouncer.value] * 11
        accepted_after.append(bouncer.value)
    for i in range(10, len(values)):
        window = values[i - 10:i + 1]
        if window[0] is not None and window == [window[0]] * 11:
            assert accepted_after[i] == window[0]  # held for the debounce time: accepted


# -- input monitor over the sim pin file ----------------------------------------------------

CHARGE_CYCLE = [
    ("A", 100.0, 0.0, False, False),
    ("B", 26.67, 16.0, False, False),   # plug
    ("C", 26.67, 16.0, True, False),    # charge: the EVSE commands the contactor closed ...
    ("C", 26.67, 16.0, True, True),     # ... and the feedback follows
    ("B", 26.67, 16.0, False, True),    # pause: command opens first
    ("B", 26.67, 16.0, False, False),
    ("C", 26.67, 16.0, True, False),    # charge again
    ("C", 26.67, 16.0, True, True),
    ("A", 100.0, 0.0, False, True),     # unplug while charging
    ("A", 100.0, 0.0, False, False),
]


def test_monitor_reports_a_charging_cycle_through_a_real_pin_file(tmp_path):
    """plug, charge, pause, charge, unplug: exactly one call per change, in order, for both sources."""
    sim = VehicleSim(str(tmp_path / "pins.json"), advertised_a=16.0, contactor_delay_s=0.25)
    recorders = {"adc": Recorder(), "lines": Recorder()}
    monitors = []
    for source, recorder in recorders.items():
        config = io_config(tmp_path, source)
        monitors.append(InputMonitor(SimPinBank(config), config, SystemClock(), recorder))

    async def scenario():
        tasks = [asyncio.create_task(monitor.run()) for monitor in monitors]

        async def reported(count):
            """Until every monitor has reported ``count`` changes (a hang is bounded)."""
            deadline = time.monotonic() + 60
            while any(len(r.calls) < count for r in recorders.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

        await reported(1)
        # Each action's changes: plug B; charge C, then the contactor's feedback; and so on.
        for action, count in ((sim.plug, 2), (sim.charge, 4), (sim.pause, 6), (sim.charge, 8), (sim.unplug, 10)):
            await asyncio.to_thread(action)  # blocks for the contactor delay, like the EVSE
            await reported(count)
        for monitor in monitors:
            monitor.stop()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    for source, recorder in recorders.items():
        assert recorder.summary() == CHARGE_CYCLE, source
        times = [now for _, now in recorder.calls]
        assert times == sorted(times)
        states = [state for state, _ in recorder.calls]
        assert len({id(state) for state in states}) == len(states)  # copies, never one shared object
        assert states[-1].since_ms <= times[-1] and states[-1].since_ms >= states[-3].since_ms
    for monitor in monitors:
        assert monitor.read_errors == 0 and monitor.pins.errors == 0
    adc_monitor, adc = monitors[0], recorders["adc"]
    assert adc_monitor.current() == adc.calls[-1][0]
    adc.calls[-1][0].pilot = "F"  # a listener changing its copy changes nothing inside
    assert adc_monitor.current().pilot == "A"


def test_lines_and_adc_sources_decode_every_state_alike(tmp_path):
    sim = VehicleSim(str(tmp_path / "pins.json"), contactor_delay_s=0)
    recorders = {"adc": Recorder(), "lines": Recorder()}
    monitors = {}
    for source in recorders:
        config = io_config(tmp_path, source)
        monitors[source] = InputMonitor(SimPinBank(config), config, SystemClock(), recorders[source])
    lines_bank = monitors["lines"].pins
    now = 0
    for action in (lambda: None, sim.plug, sim.charge, sim.ventilation, sim.error, sim.pause, sim.unavailable,
                   sim.unplug):
        action()
        for monitor in monitors.values():
            settle(monitor, now)
        now += 150
        assert lines_bank.read().pilot_volts is None  # the lines board has no ADC
        assert monitors["adc"].current().pilot == monitors["lines"].current().pilot == sim.state
    pilots = [state.pilot for state, _ in recorders["adc"].calls]
    assert pilots == ["A", "B", "C", "D", "E", "B", "F", "A"]
    assert recorders["adc"].summary() == recorders["lines"].summary()


def test_a_missing_pin_file_means_no_vehicle(tmp_path):
    config = io_config(tmp_path)
    bank = SimPinBank(config)
    recorder = Recorder()
    settle(InputMonitor(bank, config, SystemClock(), recorder), 0)
    assert recorder.summary() == [("A", 100.0, 0.0, False, False)]
    assert bank.errors == 0


@pytest.mark.parametrize("garbage, complaint", [
    (b'{"pilot_v": 6.0, "duty_pct": 26', "Expecting"),          # torn write
    (b"", "Expecting value"),
    (b"\x80\x81 garbage", "can't decode"),
    (b"[6.0, 26.7]", "expected a JSON object"),
    (b'{"pilot_v": "six", "duty_pct": 26.7, "contactor_command": true, "contactor_feedback": true}',
     'pilot_v is "six", expected a number'),
    (b'{"pilot_v": 6.0, "duty_pct": 26.7, "contactor_command": 1, "contactor_feedback": true}',
     "contactor_command is 1, expected true or false"),
    (b'{"pilot_v": 6.0, "contactor_command": true}', "contactor_feedback is null"),
])
def test_garbage_in_the_pin_file_keeps_the_last_sample_and_is_counted(tmp_path, garbage, complaint):
    config = io_config(tmp_path)
    path = tmp_path / "pins.json"
    sim = VehicleSim(str(path), contactor_delay_s=0)
    sim.plug()
    bank = SimPinBank(config)
    recorder = Recorder()
    monitor = InputMonitor(bank, config, SystemClock(), recorder)
    now = settle(monitor, 0)
    path.write_bytes(garbage)
    now = settle(monitor, now, 300)
    assert recorder.summary() == [("B", 26.67, 16.0, False, False)]
    assert bank.errors == 1  # counted once per version of the file, not once per sample
    assert complaint in bank.last_error and str(path) in bank.last_error
    sim.charge()
    settle(monitor, now)
    assert monitor.current().pilot == "C" and monitor.current().contactor_feedback is True


def test_duty_jitter_is_not_a_change_and_5_percent_means_digital(tmp_path):
    config = io_config(tmp_path)
    path = tmp_path / "pins.json"
    recorder = Recorder()
    monitor = InputMonitor(SimPinBank(config), config, SystemClock(), recorder)
    now = 0
    for duty in (26.67, 26.4, 26.9, 26.6, 50.0, 5.0):
        write_pins(path, duty_pct=duty)
        now = settle(monitor, now, 120)
    assert [(s.duty_pct, s.advertised_a, s.digital) for s, _ in recorder.calls] == [
        (26.67, 16.0, False), (50.0, 30.0, False), (5.0, None, True)]
    write_pins(path, duty_pct=None)  # a board that cannot measure the duty: the last value stays
    settle(monitor, now, 120)
    assert len(recorder.calls) == 3


def test_a_failing_bank_or_listener_does_not_stop_the_monitor(tmp_path):
    class BrokenBank:
        def read(self):
            raise OSError("GPIO chip gone")

    config = io_config(tmp_path)
    lines = []
    log.set_sink(lambda level, text: lines.append(text), log.DEBUG)
    try:
        monitor = InputMonitor(BrokenBank(), config, SystemClock(), Recorder())
        settle(monitor, 0, 100)
        assert monitor.read_errors == 10 and monitor.changes == 0
        assert sum("GPIO chip gone" in line for line in lines) == 1  # reported once, then counted

        class Grumpy(Recorder):
            def on_inputs(self, state, now_ms):
                Recorder.on_inputs(self, state, now_ms)
                if len(self.calls) == 1:
                    raise RuntimeError("engine bug")

        grumpy = Grumpy()
        path = tmp_path / "pins.json"
        monitor = InputMonitor(SimPinBank(config), config, SystemClock(), grumpy)
        write_pins(path, pilot_v=9.0)
        now = settle(monitor, 0)
        write_pins(path, pilot_v=6.0)
        settle(monitor, now)
        assert [s.pilot for s, _ in grumpy.calls] == ["B", "C"]
        assert any("engine bug" in line for line in lines)
    finally:
        log.set_sink(None)


def test_input_state_copies_are_independent():
    state = InputState("C", 26.67, 16.0, False, True, True, 1234)
    copy = state.copy()
    assert copy == state and copy is not state
    copy.contactor_feedback = False
    assert copy != state
    assert "closed" in repr(state) and "16.0 A" in repr(state)


# -- vehicle simulator ----------------------------------------------------------------------

def test_vehicle_sim_fault_switches(tmp_path):
    path = tmp_path / "pins.json"
    sim = VehicleSim(str(path), contactor_delay_s=0)

    def pins():
        return json.loads(path.read_text())

    assert pins()["pilot_v"] == 12.0 and pins()["duty_pct"] == 100.0
    sim.plug()
    sim.fail_to_close(True)
    sim.charge()
    assert (pins()["contactor_command"], pins()["contactor_feedback"]) == (True, False)
    sim.fail_to_close(False)
    assert pins()["contactor_feedback"] is True
    sim.draw(20.0)  # more than the 16 A advertised: an overcurrent
    assert pins()["ev_current_a"] == 20.0 and pins()["ev_phases"] == 3
    sim.weld(True)
    sim.pause()
    assert (pins()["contactor_command"], pins()["contactor_feedback"]) == (False, True)
    assert pins()["ev_current_a"] == 0.0  # the car in B draws nothing
    sim.weld(False)
    assert pins()["contactor_feedback"] is False
    sim.advertise(32)
    assert pins()["duty_pct"] == 53.33 and sim.advertised_a == 32.0
    sim.draw(None)
    sim.ventilation()
    assert pins()["pilot_v"] == 3.0 and pins()["ev_current_a"] == 32.0
    sim.error()
    assert pins()["pilot_v"] == 0.0 and pins()["duty_pct"] == 0.0 and not pins()["contactor_command"]
    sim.unplug()
    assert pins()["pilot_v"] == 12.0
    with pytest.raises(ValueError, match="no vehicle"):
        sim.charge()
    with pytest.raises(ValueError, match="90 A cannot be advertised"):
        sim.advertise(90)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("text, complaint", [
    ("chrage", "unknown command 'chrage'"),
    ("wait", "wait takes one argument"),
    ("wait soon", "wait 'soon' is not a number of seconds"),
    ("advertise -3", "expected a finite number >= 0"),
    ("weld maybe", "expected on or off"),
    ("plug now", "plug takes no argument"),
])
def test_bad_commands_get_a_one_line_reason(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_command(text)


def run_cli(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "evse_tools.sim.vehicle_sim"] + list(args),
                          input=stdin, capture_output=True, text=True, timeout=30, cwd=cwd or ROOT)


def test_cli_runs_a_script(tmp_path):
    path = tmp_path / "run" / "pins.json"
    started = time.monotonic()
    result = run_cli("--pin-file", str(path), "--contactor-delay-ms", "20",
                     "--script", "plug; wait 0.3; charge; advertise 10; weld on; pause; status; unplug")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started >= 0.3
    lines = result.stdout.splitlines()
    assert len(lines) == 9 and lines[0].startswith("vehicle sim on")
    assert "pilot C" in lines[3] and "feedback closed" in lines[3]
    assert "advertised 10.0 A" in lines[4]
    assert "command open, feedback closed" in lines[6] and "[welded]" in lines[6]
    doc = json.loads(path.read_text())
    assert doc["pilot_v"] == 12.0 and doc["contactor_command"] is False
    assert doc["contactor_feedback"] is True  # still welded
    assert set(doc) == {"pilot_v", "duty_pct", "contactor_command", "contactor_feedback",
                        "ev_current_a", "ev_phases", "updated"}


def test_cli_refuses_a_bad_script_before_touching_the_pin_file(tmp_path):
    path = tmp_path / "pins.json"
    result = run_cli("--pin-file", str(path), "--script", "plug; wait 1; charge please; unplug")
    assert result.returncode == 2
    assert result.stderr.strip() == ("evse-vehicle-sim: script command 3 'charge please': "
                                     "charge takes no argument (got 'please')")
    assert not path.exists()
    result = run_cli("--pin-file", str(path), "--script", "charge")
    assert result.returncode == 1 and "no vehicle is plugged in" in result.stderr


def test_cli_interactive_answers_every_line_and_survives_bad_input(tmp_path):
    path = tmp_path / "pins.json"
    result = run_cli("--pin-file", str(path), stdin="help\nplug\nbogus\nadvertise lots\nplug\n\ncharge\nquit\nunplug\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "fail-to-close on|off" in out
    assert "error: unknown command 'bogus' (try help)" in out
    assert "error: advertise 'lots' is not a number of amps" in out
    assert "error: a vehicle is already plugged in (state B)" in out
    assert json.loads(path.read_text())["pilot_v"] == 6.0  # quit came before unplug
