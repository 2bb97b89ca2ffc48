"""PN532 HSU framing against the user manual's frames, under garbage and split reads."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evse_agent import pn532
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
