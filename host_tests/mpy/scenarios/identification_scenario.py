"""PN532 HSU framing, the parser under split and corrupted input, the reader's commands over
a scripted line, debouncing, and the identification desk's allow-list and OCMF fields."""

import harness
from fakes import FakeClock, ScriptedStream
from evse_agent import pn532
from evse_agent.identification import IdentificationDesk, ocmf_identification, parse_allow_list
from evse_agent.ocmf import OcmfReading, build_payload


def _hex(data):
    return " ".join("%02X" % b for b in data)


def _answer(data):
    return pn532.ACK + pn532.build_frame(bytes(data), tfi=pn532.TFI_PN532)


class Pn532Line:
    """Answers the reader's commands like a PN532 with ``uid`` on it (None: no card)."""

    def __init__(self):
        self.uid = None
        self.corrupt = False

    def __call__(self, request):
        if request.startswith(b"\x55"):
            return b""
        code = request[6]
        if code == 0x02:
            out = _answer([0x03, 0x32, 0x01, 0x06, 0x07])
        elif code in (0x14, 0x32):
            out = _answer([code + 1])
        elif code == 0x52:
            out = _answer([0x53, 0x00])
        elif code == 0x4A and self.uid:
            out = _answer([0x4B, 1, 1, 0, 0x44, 0, len(self.uid)] + list(self.uid))
        elif code == 0x4A:
            out = _answer([0x4B, 0])
        else:
            out = pn532.ACK + pn532.ERROR_FRAME
        if self.corrupt:
            out = bytearray(out)
            out[-2] ^= 0x55
            out = bytes(out)
        return out


class Engine:
    """Where the desk binds taps: here no session is open."""

    def identify(self, doc):
        return False


async def main():
    harness.emit("commands", [_hex(pn532.build_command(0x02)),
                              _hex(pn532.build_command(0x14, b"\x01\x14\x01")),
                              _hex(pn532.build_command(0x4A, b"\x01\x00"))])
    stream = pn532.ACK + _answer([0x03, 0x32, 0x01, 0x06, 0x07]) + pn532.NACK + pn532.ERROR_FRAME
    for size in (1, 3, 7, 64):
        parser = pn532.FrameParser()
        items = []
        for i in range(0, len(stream), size):
            items += parser.feed(stream[i:i + size])
        harness.emit("split_%d" % size, [[kind, _hex(body)] for kind, body in items])
    bad = bytearray(_answer([0x4B, 0]))
    bad[-2] ^= 1
    parser = pn532.FrameParser()
    harness.emit("garbage", [[k, b if isinstance(b, str) else _hex(b)]
                             for k, b in parser.feed(b"\x13\x37\xff" + bytes(bad) + _answer([0x15]))])
    harness.emit("parser_stats", parser.stats.as_dict())
    await harness.checkpoint("framing")

    clock = FakeClock()
    line = Pn532Line()
    tags = []
    reader = pn532.Pn532Reader(ScriptedStream(clock, [], always=line, keep=False), clock, tags.append,
                               debounce_ms=1000)
    await reader._configure()
    harness.emit("firmware", reader.firmware)
    results = []
    for uid, corrupt, step_ms in ((None, False, 100), (b"\x04\xa1\xb2\xc3\xd4\xe5\xf6", False, 100),
                                  (b"\x04\xa1\xb2\xc3\xd4\xe5\xf6", False, 100), (None, False, 1500),
                                  (b"\x04\xa1\xb2\xc3\xd4\xe5\xf6", False, 100), (None, True, 100)):
        line.uid, line.corrupt = uid, corrupt
        clock.advance(step_ms)
        try:
            found = await reader.poll_once()
            if found is not None:
                reader._seen(found)
            results.append(found)
        except pn532.ReaderError as error:
            results.append("%s: %s" % (error.kind, error))
    harness.emit("polls", results)
    harness.emit("tags", tags)
    harness.emit("reader_stats", reader.stats.as_dict())
    await harness.checkpoint("reader")

    config = {"tap_before_s": 60, "tap_after_s": 120, "allow_list": ["04A1B2C3D4E5F6"]}
    desk = IdentificationDesk(config, clock, Engine())
    desk.tap("04A1B2C3D4E5F6")
    clock.advance(30000)
    listed = desk.claim_for_plug_in()
    desk.tap("DEADBEEF")
    clock.advance(61000)
    late = desk.claim_for_plug_in()
    desk.on_allow_list_message(b'{"tags": ["deadbeef"]}')
    desk.on_allow_list_message(b'{"tags": [7]}')
    harness.emit("desk", {"listed": listed, "late": late, "allowed": sorted(desk.allowed),
                          "rejected": desk.rejected_lists})
    try:
        parse_allow_list(["04A1B2C3", "0102"])
    except ValueError as error:
        harness.emit("bad_list", str(error))
    payload = build_payload("evse-agent", "t-001", "0.1", "T1", "Eastron", "SDM630", "123",
                            [OcmfReading(clock.time(), True, "B", 1000)],
                            identification=ocmf_identification(listed))
    harness.emit("payload", payload)
    await harness.checkpoint("desk")


if __name__ == "__main__":
    harness.run(main)
