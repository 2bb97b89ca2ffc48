"""PN532 HSU framing against the user manual's frames, under garbage and split reads, and
the reader task against the PN532 simulator on a real pty."""

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evse_agent import pn532
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.serial_link import SerialStream
from evse_tools.sim.reader_sim import ReaderSimulator
from evse_tools.sim.reader_sim import frame as sim_frame

# NXP UM0701-02 (PN532 User Manual): GetFirmwareVersion and its answer as in the manual's
# example; SAMConfiguration (normal mode, 1 s timeout, IRQ) and InListPassiveTarget (one
# target, 106 kbps type A) framed by hand from its rules (LEN + LCS = 0, TFI + data + DCS = 0).
MANUAL_GET_FIRMWARE = bytes.fromhex("0000FF02FED4022A00")
MANUAL_FIRMWARE_ANSWER = bytes.fromhex("0000FF06FAD50332010607E800")
MANUAL_SAM_NORMAL = bytes.fromhex("0000FF05FBD414011401" "0200")
MANUAL_IN_LIST_TYPE_A = bytes.fromhex("0000FF04FCD44A0100E100")


def test_commands_are_framed_as_in_the_manual():
    assert pn532.build_command(0x02) == MANUAL_GET_FIRMWARE
    assert pn532.build_command(0x14, b"\x01\x14\x01") == MANUAL_SAM_NORMAL
    assert pn532.build_command(0x4A, b"\x01\x00") == MANUAL_IN_LIST_TYPE_A
    assert pn532.ACK == bytes.fromhex("0000FF00FF00")
    assert pn532.NACK == bytes.fromhex("0000FFFF0000")


def test_manual_frames_parse_to_their_kinds():
    parser = pn532.FrameParser()
    items = parser.feed(pn532.ACK + MANUAL_FIRMWARE_ANSWER + pn532.NACK + pn532.ERROR_FRAME)
    assert items == [("ack", b""), ("frame", bytes.fromhex("D50332010607")), ("nack", b""),
                     ("error", b"\x7f")]
    assert parser.stats.garbage_bytes == 0


def test_uid_of_single_and_double_size_targets():
    assert pn532.parse_passive_target(bytes.fromhex("0101000408" "04" "DEADBEEF")) == "DEADBEEF"
    assert pn532.parse_passive_target(bytes.fromhex("0101004400" "07" "04A1B2C3D4E5F6")) == "04A1B2C3D4E5F6"
    assert pn532.parse_passive_target(b"\x00") is None
    with pytest.raises(ValueError, match="10 bytes"):
        pn532.parse_passive_target(bytes.fromhex("0101004400" "0A") + bytes(10))
    with pytest.raises(ValueError, match="NFCID1 of 7 bytes"):
        pn532.parse_passive_target(bytes.fromhex("0101004400" "07" "04A1"))


def test_simulator_and_core_frame_alike():
    """The simulator's framing is written separately: both agree on every answer."""
    for data in ([0x03, 0x32, 0x01, 0x06, 0x07], [0x4B, 0x00], [0x15]):
        assert sim_frame(data) == pn532.build_frame(bytes(data), tfi=pn532.TFI_PN532)


payloads = st.binary(min_size=1, max_size=40)
noise = st.binary(max_size=30).filter(lambda b: b"\x00\xff" not in b and not b.endswith(b"\x00"))


@settings(max_examples=300, deadline=None)
@given(st.lists(payloads, min_size=1, max_size=6), st.lists(st.integers(1, 20), max_size=30), noise)
def test_any_split_of_the_stream_gives_the_same_frames(bodies, cuts, junk):
    """However the UART hands the bytes over, the same frames come out, in order."""
    stream = junk + b"".join(pn532.ACK + pn532.build_frame(b, tfi=pn532.TFI_PN532) for b in bodies)
    parser = pn532.FrameParser()
    items = []
    pos = 0
    for cut in cuts:
        items += parser.feed(stream[pos:pos + cut])
        pos += cut
    items += parser.feed(stream[pos:])
    expected = []
    for body in bodies:
        expected.append(("ack", b""))
        whole = bytes([pn532.TFI_PN532]) + body
        expected.append(("error", whole) if whole == b"\x7f" else ("frame", whole))
    assert items == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=20))
def test_garbage_never_raises_and_is_counted(data, cuts):
    parser = pn532.FrameParser()
    pos = 0
    for cut in cuts + [len(data)]:
        for kind, _ in parser.feed(data[pos:pos + cut]):
            assert kind in ("ack", "nack", "error", "frame", "bad")
        pos += cut
    assert len(parser._buf) <= len(data)


@settings(max_examples=300, deadline=None)
@given(payloads, st.integers(0, 200), st.integers(1, 255))
def test_a_corrupted_frame_is_dropped_and_the_next_one_found(body, position, flip):
    good = pn532.build_frame(body, tfi=pn532.TFI_PN532)
    bad = bytearray(good)
    index = 3 + position % (len(bad) - 4)  # LEN .. DCS
    bad[index] ^= flip
    parser = pn532.FrameParser()
    items = parser.feed(bytes(bad) + good)
    frames = [i for i in items if i[0] == "frame"]
    assert frames[-1] == ("frame", bytes([pn532.TFI_PN532]) + body)
    assert len(frames) == 1 or frames[0][1] == frames[-1][1] or bytes(bad) != good


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
