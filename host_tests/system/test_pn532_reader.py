"""The PN532 reader task against the PN532 simulator on a real pty."""

import asyncio
import time

import pytest

from evse_agent import pn532
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.serial_link import SerialStream
from evse_tools.sim.reader_sim import ReaderSimulator


# -- the reader task over a pty -----------------------------------------------------


@pytest.fixture
def reader_sim():
    sims = []

    def make(**options):
        sim = ReaderSimulator(**options)
        sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.stop()


async def _run_reader(device, until, timeout_s=20, **options):
    """Run a Pn532Reader on ``device`` until ``until(reader, tags)`` or the deadline."""
    tags = []
    stream = SerialStream(device, 115200)
    reader = pn532.Pn532Reader(stream, SystemClock(), tags.append, poll_ms=20, retry_ms=100,
                               timeout_ms=200, **options)
    task = asyncio.ensure_future(reader.run())
    deadline = time.monotonic() + timeout_s
    try:
        while not until(reader, tags) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        reader.stop()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        stream.close()
    return reader, tags


def test_taps_are_reported_once_and_resting_cards_debounced(reader_sim):
    sim = reader_sim()
    sim.tap("04A1B2C3D4E5F6", 0.6)  # rests for many polls: one tap
    sim.tap("DEADBEEF")
    reader, tags = asyncio.run(_run_reader(
        sim.device, lambda r, t: len(t) >= 2 and r.stats.polls > 5, debounce_ms=5000))
    assert tags == ["04A1B2C3D4E5F6", "DEADBEEF"]
    assert reader.stats.repeats >= 1
    assert reader.online and reader.firmware == "IC 32 v1.6"


def test_silent_reader_goes_offline_and_comes_back(reader_sim, caplog):
    sim = reader_sim()
    sim.set_fault("silent")
    state = {}

    def until(reader, tags):
        if reader.stats.offline_transitions and "offline" not in state:
            state["offline"] = True
            sim.set_fault(None)
            sim.tap("CAFEF00D")
        return tags

    reader, tags = asyncio.run(_run_reader(sim.device, until))
    assert tags == ["CAFEF00D"]
    assert reader.stats.timeouts >= 1 and reader.online


@pytest.mark.parametrize("fault", ["garbage", "corrupt"])
def test_bad_frames_are_counted_never_raised(reader_sim, fault):
    sim = reader_sim(seed=hash(fault) & 0xFFFF)
    state = {}

    def until(reader, tags):
        if "faulted" not in state and reader.online:
            state["faulted"] = True
            sim.set_fault(fault)
        elif "faulted" in state and "cleared" not in state and (
                reader.stats.bad_frames + reader.stats.bad_answers + reader.stats.timeouts) >= 3:
            state["cleared"] = True
            sim.set_fault(None)
            sim.tap("0A0B0C0D")
        return tags

    reader, tags = asyncio.run(_run_reader(sim.device, until))
    assert tags == ["0A0B0C0D"]
    assert reader.stats.bad_frames + reader.stats.bad_answers + reader.stats.timeouts >= 3


def test_an_unplugged_reader_is_offline_not_a_crash(reader_sim):
    """The reader's pty disappears under a running reader (a USB adapter pulled)."""
    sim = reader_sim()
    state = {}

    def until(reader, tags):
        if reader.online and "pulled" not in state:
            state["pulled"] = True
            sim.stop()
        return "pulled" in state and reader.stats.offline_transitions and reader.stats.wakeups >= 3

    reader, tags = asyncio.run(_run_reader(sim.device, until))
    assert not reader.online and reader.stats.wakeups >= 3
    assert reader.last_error


def test_the_simulator_taps_what_a_script_file_says(reader_sim, tmp_path):
    """Tests (and people) drive the simulator by appending lines to its script file."""
    script = tmp_path / "taps.txt"
    script.write_text("# taps for this test\n")
    sim = reader_sim(script_path=str(script))
    with open(script, "a") as handle:
        handle.write("tap 04A1B2C3D4E5F6 0.2\nbogus line\n")

    def until(reader, tags):
        if tags == ["04A1B2C3D4E5F6"] and "more" not in state:
            state["more"] = True
            with open(script, "a") as handle:
                handle.write("tap DEADBEEF\n")
        return len(tags) >= 2

    state = {}
    reader, tags = asyncio.run(_run_reader(sim.device, until, debounce_ms=100))
    assert tags == ["04A1B2C3D4E5F6", "DEADBEEF"]
