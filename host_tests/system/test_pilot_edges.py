"""Edge-driven inputs: the input monitor reads a bank that announces changes only when told.

A scripted bank on a scripted clock checks the debounce contract against the sampled
reference (a change is accepted once it held ``debounce_ms``, at that moment) for random
input histories; the real sim pin bank, with the kernel announcing each new pin file, checks
that nothing is read while nothing changes, and that the vehicle simulator started after
the monitor, killed and restarted is followed. The MicroPython bank runs under the unix port
on the host board (``Pin.irq`` on its comparator lines). No GPIO chip or gpio-sim module is
available on the host, so the Linux bank's edge wiring runs against a stand-in line request
whose descriptor is a pipe.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time

from hypothesis import given, settings, strategies as st

from conftest import ROOT
from evse_agent.config import validate
from evse_agent.pilot import IDLE_LOOK_MS, Debouncer, InputMonitor, PinSample
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.sim_pins import SimPinBank
from evse_tools.sim.vehicle_sim import VehicleSim


def io_config(tmp_path, source="adc", debounce_ms=60, sample_ms=10):
    board = {"station_id": "test", "meter": {"model": "sdm630", "port": "/dev/null"},
             "io": {"driver": "sim", "sim_file": str(tmp_path / "pins.json"),
                    "pilot": {"source": source, "debounce_ms": debounce_ms, "sample_ms": sample_ms}}}
    return validate(board)["io"]


class Recorder:
    def __init__(self):
        self.calls = []

    def on_inputs(self, state, now_ms):
        self.calls.append((state, now_ms))


# -- the debounce contract on a scripted clock -------------------------------------------

class ScriptClock:
    def __init__(self):
        self.now = 0

    def monotonic_ms(self):
        return self.now


class ScriptBank:
    """Announces each scripted change at its time; ``wait_change`` moves the scripted clock."""

    def __init__(self, clock, changes, end_ms, monitor_box):
        self.clock = clock
        self.changes = list(changes)  # (at_ms, volts), time-ordered
        self.end_ms = end_ms
        self.volts = 12.0
        self.reads = 0
        self.announced = False
        self.box = monitor_box
        self.sampled_while_waiting = []

    def read(self):
        self.reads += 1
        self.announced = False
        return PinSample(pilot_volts=self.volts, duty_pct=100.0, contactor_command=False,
                         contactor_feedback=False)

    async def wait_change(self, timeout_ms):
        monitor = self.box[0]
        if monitor._waiting:
            self.sampled_while_waiting.append((monitor.sampled_ms, self.clock.now))
        wake = self.clock.now + timeout_ms
        if self.changes and self.changes[0][0] <= wake:
            at, self.volts = self.changes.pop(0)
            self.clock.now = max(self.clock.now, at)
            self.announced = True
        else:
            self.clock.now = wake
        if self.clock.now >= self.end_ms:
            monitor.stop()


VOLTS = {"A": 12.0, "B": 9.0, "C": 6.0, "E": 0.0, "F": -12.0}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(VOLTS)), st.integers(min_value=1, max_value=400)),
                min_size=1, max_size=25),
       st.sampled_from([0, 20, 100]))
def test_edge_driven_monitor_accepts_what_a_sampled_one_accepts(segments, debounce_ms):
    """Every history of held levels: the same changes at the same times as sampling every ms."""
    clock = ScriptClock()
    changes = []
    at = 5
    for state, held_ms in segments:
        changes.append((at, VOLTS[state]))
        at += held_ms
    end_ms = at + debounce_ms + 3 * IDLE_LOOK_MS
    box = []
    bank = ScriptBank(clock, changes, end_ms, box)
    config = {"pilot": {"source": "adc", "sample_ms": 20, "debounce_ms": debounce_ms}}
    recorder = Recorder()
    monitor = InputMonitor(bank, config, clock, recorder)
    box.append(monitor)
    assert monitor.edge_driven
    asyncio.run(monitor.run())

    # The reference: the level sampled every millisecond through the same debouncer.
    reference = Debouncer(debounce_ms)
    expected = []
    volts = 12.0
    pending = list(changes)
    for now in range(0, end_ms):
        while pending and pending[0][0] <= now:
            volts = pending.pop(0)[1]
        if reference.update(volts, now):
            expected.append((reference.value, now))
    got = []
    last = None
    for state, now in recorder.calls:  # the pilot's changes (other calls are the duty's, contactor's)
        if state.pilot != last:
            got.append((VOLTS[state.pilot], now))
            last = state.pilot
    assert got == expected
    # Reads happen at announcements, debounce deadlines and idle looks, never per sample.
    assert bank.reads <= 1 + 2 * len(changes) + end_ms // IDLE_LOOK_MS + 1
    # While waiting with nothing announced, the monitor has looked up to the clock's time.
    assert all(sampled == now for sampled, now in bank.sampled_while_waiting)


# -- the sim pin bank announced by the kernel ----------------------------------------------

async def _until(predicate, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return predicate()


def test_nothing_is_read_while_the_pin_file_does_not_change(tmp_path):
    config = io_config(tmp_path)
    sim = VehicleSim(str(tmp_path / "pins.json"), contactor_delay_s=0)
    bank = SimPinBank(config)
    recorder = Recorder()
    monitor = InputMonitor(bank, config, SystemClock(), recorder)
    stats = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if path == bank.path:
            stats.append(path)
        return real_stat(path, *args, **kwargs)

    async def scenario():
        task = asyncio.create_task(monitor.run())
        assert await _until(lambda: len(recorder.calls) == 1)
        await asyncio.to_thread(sim.plug)
        await asyncio.to_thread(sim.charge)
        assert await _until(lambda: monitor.current().contactor_feedback is True)
        samples, stats_before = monitor.samples, len(stats)
        began = time.monotonic()
        while time.monotonic() - began < 1.5:  # a quiet spell: the car charges, nothing changes
            await asyncio.sleep(0.1)
        quiet_s = time.monotonic() - began
        quiet = monitor.samples - samples, len(stats) - stats_before
        await asyncio.to_thread(sim.pause)
        assert await _until(lambda: monitor.current().pilot == "B")
        monitor.stop()
        await task
        return quiet, quiet_s

    os.stat = counting_stat
    try:
        (samples, stat_calls), quiet_s = asyncio.run(scenario())
    finally:
        os.stat = real_stat
    assert bank.watch_error is None
    assert stat_calls == 0  # no announcement, no look at the file
    assert samples <= quiet_s * 1000 / IDLE_LOOK_MS + 1  # at most the idle looks, never per sample
    pilots = [s.pilot for s, _ in recorder.calls]
    assert pilots[0] == "A" and pilots[-1] == "B" and "C" in pilots


def _start_sim(path, script):
    return subprocess.Popen([sys.executable, "-m", "evse_tools.sim.vehicle_sim", "--pin-file", str(path),
                             "--contactor-delay-ms", "0", "--script", script],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_simulator_started_later_killed_and_restarted_is_followed(tmp_path):
    path = tmp_path / "sim" / "pins.json"  # its directory does not exist yet either
    config = io_config(tmp_path)
    config["sim_file"] = str(path)
    bank = SimPinBank(config)
    recorder = Recorder()
    monitor = InputMonitor(bank, config, SystemClock(), recorder)

    def pilots():
        return [state.pilot for state, _ in recorder.calls]

    async def scenario():
        task = asyncio.create_task(monitor.run())
        assert await _until(lambda: pilots() == ["A"])  # no simulator: no vehicle
        first = _start_sim(path, "plug; charge; wait 600")
        try:
            assert await _until(lambda: monitor.current().contactor_feedback is True)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        second = _start_sim(path, "plug; wait 600")  # a new car: plugged in, not charging
        try:
            assert await _until(lambda: pilots()[-1] == "B" and monitor.current().contactor_feedback is False)
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait()
        os.remove(path)  # the simulator's file removed: no vehicle again
        assert await _until(lambda: pilots()[-1] == "A")
        monitor.stop()
        await task

    asyncio.run(scenario())
    assert bank.watch_error is None and bank.errors == 0
    assert pilots()[0] == "A" and "C" in pilots() and pilots()[-1] == "A"


# -- MicroPython: Pin.irq on the host board's comparator lines ------------------------------

def test_micropython_monitor_waits_on_pin_irqs(tmp_path):
    """The unix port's bank over comparator lines: changes arrive by Pin.irq, quiet costs nothing."""
    import threading

    from evse_tools.testkit.mpy_agent import micropython_command

    pin_file = tmp_path / "pins.json"
    stop_file = tmp_path / "stop"
    sim = VehicleSim(str(pin_file), contactor_delay_s=0)
    env = dict(os.environ, EVSE_PIN_FILE=str(pin_file),
               MICROPYPATH=os.pathsep.join([os.path.join(ROOT, "tools", "testkit", "unix_board"),
                                            os.path.join(ROOT, "firmware"), ".frozen"]))
    process = subprocess.Popen(micropython_command() + [os.path.join(ROOT, "host_tests", "mpy", "scenarios",
                                                                     "edge_monitor.py"), str(stop_file)],
                               env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()

    def wait_line(text, start=0):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for index in range(start, len(lines)):
                if lines[index].strip() == text:
                    return index
            time.sleep(0.02)
        raise AssertionError("no %r in %s" % (text, lines[-20:]))

    def samples_after(index):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in lines[index:]:
                if line.startswith("samples"):
                    _, count, at_ms = line.split()
                    return int(count), int(at_ms), lines.index(line) + 1
            time.sleep(0.02)
        raise AssertionError("no samples line after %d: %s" % (index, lines[-20:]))

    try:
        assert wait_line("edge_driven True") == 0
        wait_line("change A False False")
        sim.plug()
        sim.charge()
        charging = wait_line("change C True True")
        first, first_ms, after = samples_after(charging + 1)
        last, last_ms = first, first_ms
        while last_ms - first_ms < 2000:  # a quiet spell of at least 2 s, as the board counts it
            last, last_ms, after = samples_after(after)
        assert last - first <= (last_ms - first_ms) / IDLE_LOOK_MS + 1  # idle looks only
        sim.pause()
        wait_line("change B False False", charging)
    finally:
        stop_file.write_text("stop")
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, lines[-20:]


# -- Linux GPIO: the bank's edge wiring over a stand-in for the gpiod package ----------------

class _StandInRequest:
    """What GpiodPinBank uses of a gpiod v2 LineRequest; its fd is a pipe the test writes
    an "edge event" into, as the kernel makes a request's fd readable."""

    def __init__(self, offsets):
        self.offsets = offsets
        self.values = {offset: 0 for offset in offsets}
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        self.released = False

    def edge(self, **values):
        self.values.update({int(k[1:]): v for k, v in values.items()})
        os.write(self._write_fd, b"e")

    def get_values(self, offsets):
        return [self.values[offset] for offset in offsets]

    def get_value(self, offset):
        return self.values[offset]

    def wait_edge_events(self, timeout):
        """Whether events are queued; this stand-in consumes them here (no payload to read)."""
        try:
            return bool(os.read(self.fd, 64))
        except BlockingIOError:
            return False

    def read_edge_events(self):
        return []

    def release(self):
        self.released = True
        os.close(self.fd)
        os.close(self._write_fd)


def test_gpio_bank_waits_for_level_line_edges(tmp_path, monkeypatch):
    """No gpio-sim here: the bank's edge path (lines board) against a stand-in request."""
    import sys
    import types

    requests = []
    gpiod = types.ModuleType("gpiod")
    line = types.ModuleType("gpiod.line")
    line.Direction = types.SimpleNamespace(INPUT="input")
    line.Edge = types.SimpleNamespace(BOTH="both")
    gpiod.line = line
    gpiod.LineSettings = lambda **settings: settings
    gpiod.EdgeEvent = types.SimpleNamespace(Type=types.SimpleNamespace(RISING_EDGE="rising"))

    def request_lines(chip, config, consumer, event_buffer_size):
        offsets = []
        for key in config:
            offsets.extend(key if isinstance(key, tuple) else (key,))
        requests.append(_StandInRequest(offsets))
        return requests[-1]

    gpiod.request_lines = request_lines
    monkeypatch.setitem(sys.modules, "gpiod", gpiod)
    monkeypatch.setitem(sys.modules, "gpiod.line", line)
    from evse_agent.ports.cpython.gpio import GpiodPinBank

    board = {"station_id": "test", "meter": {"model": "sdm630", "port": "/dev/null"},
             "io": {"driver": "gpiod", "chip": "/dev/gpiochip0",
                    "pilot": {"source": "lines", "lines": [1, 2, 3, 4, 5], "debounce_ms": 60, "sample_ms": 10},
                    "contactor": {"command_line": 6, "feedback_line": 7}}}
    config = validate(board)["io"]
    bank = GpiodPinBank(config)
    level = requests[0]
    recorder = Recorder()
    monitor = InputMonitor(bank, config, SystemClock(), recorder)
    assert monitor.edge_driven

    async def scenario():
        task = asyncio.create_task(monitor.run())
        assert await _until(lambda: [s.pilot for s, _ in recorder.calls] == ["A"])
        level.edge(l1=1, l2=1)  # the pilot falls to 6 V: two comparators switch (state C)
        level.edge(l6=1, l7=1)  # the contactor closes
        assert await _until(lambda: monitor.current().pilot == "C" and monitor.current().contactor_feedback)
        samples = monitor.samples
        began = time.monotonic()
        await asyncio.sleep(1.5)
        quiet_s = time.monotonic() - began
        assert monitor.samples - samples <= quiet_s * 1000 / IDLE_LOOK_MS + 1
        level.edge(l2=0, l6=0, l7=0)
        assert await _until(lambda: monitor.current().pilot == "B" and not monitor.current().contactor_command)
        monitor.stop()
        await task

    try:
        asyncio.run(scenario())
    finally:
        bank.close()
    assert level.released
    assert [(s.pilot, s.contactor_command, s.contactor_feedback) for s, _ in recorder.calls][-1] == ("B", False, False)


def test_without_a_kernel_watch_the_pin_file_is_polled(tmp_path):
    """A directory that cannot be watched (here: cannot even exist): sampled as before, state A."""
    config = io_config(tmp_path)
    config["sim_file"] = "/proc/self/no-such-dir/pins.json"
    bank = SimPinBank(config)
    recorder = Recorder()
    clock = SystemClock()
    monitor = InputMonitor(bank, config, clock, recorder)
    looked = []

    async def scenario():
        task = asyncio.create_task(monitor.run())
        assert await _until(lambda: monitor.samples >= 30)
        looked.append((monitor.sampled_ms, monitor._sampled_ms))
        monitor.stop()
        await task

    asyncio.run(scenario())
    assert bank.watch_error is not None and "no-such-dir" in bank.watch_error
    assert [(s.pilot, s.contactor_command) for s, _ in recorder.calls] == [("A", False)]
    sampled, last_read = looked[0]
    assert sampled == last_read  # polled: looked only up to the last read, not up to now
