"""Modbus RTU framing and CRC, and master transactions over a scripted line."""

import harness
from fakes import FakeClock, RegisterMeter, ScriptedStream, with_crc
from evse_agent.modbus_rtu import (ModbusError, RtuMaster, build_read_request, check_read_response,
                                   crc16)


def _hex(data):
    return " ".join("%02X" % b for b in data)


def _check(frame, unit, function, count):
    try:
        return {"ok": _hex(check_read_response(frame, unit, function, count))}
    except ModbusError as error:
        return {"kind": error.kind, "error": str(error)}


async def main():
    # CRC-16/MODBUS: the check value of "123456789" is 0x4B37 (CRC catalogue).
    if crc16(b"123456789") != 0x4B37:
        raise AssertionError("crc16 check value is 0x%04X" % crc16(b"123456789"))
    harness.emit("crc", ["%04X" % crc16(bytes(range(n))) for n in (0, 1, 8, 64, 255)])
    harness.emit("requests", [_hex(build_read_request(1, 4, 0x0000, 2)),
                              _hex(build_read_request(1, 3, 0x0000, 10)),
                              _hex(build_read_request(247, 4, 0x0048, 80)),
                              _hex(build_read_request(5, 3, 0xFC00, 2))])
    errors = []
    for args in ((0, 4, 0, 1), (1, 6, 0, 1), (1, 4, 0x10000, 1), (1, 4, 0, 126), (1, 4, 0xFFFF, 2)):
        try:
            build_read_request(*args)
            errors.append("accepted")
        except ValueError as error:
            errors.append(str(error))
    harness.emit("request_errors", errors)
    good = with_crc(bytes([1, 4, 4, 0x43, 0x66, 0x00, 0x00]))
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    harness.emit("responses", [
        _check(good, 1, 4, 2),
        _check(bytes(bad_crc), 1, 4, 2),
        _check(with_crc(bytes([1, 0x84, 2])), 1, 4, 2),
        _check(with_crc(bytes([2, 4, 4, 0, 0, 0, 0])), 1, 4, 2),
        _check(with_crc(bytes([1, 4, 2, 0, 0])), 1, 4, 2),
        _check(with_crc(bytes([1, 3, 4, 0, 0, 0, 0])), 1, 4, 2),
        _check(b"\x01\x04", 1, 4, 2),
    ])
    await harness.checkpoint("framing")

    clock = FakeClock()
    meter = RegisterMeter()
    meter.set_float(0x0000, 230.5)
    meter.set_uint32(0xFC00, 12345678)
    answers = [
        meter.answer,                                # a good answer
        None, meter.answer,                          # silence, then the retry is answered
        with_crc(bytes([1, 0x84, 2])),               # exception 2: not retried
        b"\x09\x09\x09\x09", meter.answer,           # garbage header, then a good retry
        with_crc(bytes([1, 0x84, 6])), meter.answer,  # busy (6): retried
        None, None, None,                            # silence on every attempt
    ]
    stream = ScriptedStream(clock, answers)
    master = RtuMaster(stream, clock, 9600, timeout_ms=300, retries=2)
    results = []
    for function, address, count in ((4, 0, 2), (4, 0, 2), (4, 0x9000, 2), (3, 0xFC00, 2),
                                     (4, 0, 2), (4, 0, 2)):
        try:
            data = await master.read_registers(1, function, address, count)
            results.append(_hex(data))
        except ModbusError as error:
            results.append("%s: %s" % (error.kind, error))
        await harness.checkpoint("transaction")
    harness.emit("transactions", results)
    harness.emit("stats", master.stats.as_dict())
    harness.emit("wire", [_hex(r) for r in stream.requests])
    harness.emit("silence_ms", master.silence_ms)


if __name__ == "__main__":
    harness.run(main)
