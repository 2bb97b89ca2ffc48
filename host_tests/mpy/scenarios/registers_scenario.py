"""Register maps: request planning, decoding, exact energy in Wh, a meter read end to end."""

import struct

import harness
from fakes import FakeClock, RegisterMeter, ScriptedStream
from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import MODELS, SDM630
from evse_agent.modbus_rtu import RtuMaster
from evse_agent.reading import summary_line
from evse_agent.registers import (FLOAT32, FN_READ_HOLDING, FN_READ_INPUT, INT16, INT32, UINT16,
                                  UINT64, Register, decode, decode_energy_wh,
                                  energy_resolution_mwh, float32_from_bits, plan_requests)


def _bits(value):
    data = struct.pack(">f", value)
    return (data[0] << 24) | (data[1] << 16) | (data[2] << 8) | data[3]


def _words(value, size):
    out = bytearray(size)
    for i in range(size - 1, -1, -1):
        out[i] = value & 0xFF
        value >>= 8
    return bytes(out)


async def main():
    plans = {}
    for name in sorted(MODELS):
        model = MODELS[name]
        measured = [reg for reg in model.registers if reg.name != "serial"]
        plans[name] = [[r.function, r.address, r.count, [reg.name for reg in r.registers]]
                       for r in plan_requests(measured, model.max_registers, model.answered)]
    harness.emit("plans", plans)
    await harness.checkpoint("plans")

    kwh = Register("energy_import", FN_READ_INPUT, 0x0048, FLOAT32, "kWh")
    energies = []
    # float32 kWh patterns: exact Wh with integer arithmetic, and the stated resolution.
    for bits in (0x00000000, 0x3F800000, _bits(1234.567), _bits(16383.99), _bits(16384.5),
                 _bits(32768.0), _bits(99999.99), 0x00000001, 0x7F800000, 0x7FC00000, 0xC2C80000):
        wh = decode_energy_wh(kwh, _words(bits, 4), 0)
        energies.append([("%08X" % bits), wh, None if wh is None else energy_resolution_mwh(kwh, wh)])
    harness.emit("float32_energy", energies)
    abb = Register("energy_import", FN_READ_HOLDING, 0x5000, UINT64, "kWh", -2, invalid=0xFFFFFFFFFFFFFFFF)
    harness.emit("uint64_energy", [decode_energy_wh(abb, _words(v, 8), 0) for v in
                                   (0, 1, 123456789, 0xFFFFFFFFFFFFFFFF, (1 << 63) + 7)])
    harness.emit("uint64_resolution", energy_resolution_mwh(abb, 1234570))
    little = Register("x", FN_READ_INPUT, 0, INT32, "W", word_order="little")
    signed = Register("y", FN_READ_INPUT, 0, INT16, "W", -1)
    freq = Register("f", FN_READ_HOLDING, 0, UINT16, "Hz", -2, invalid=0xFFFF)
    harness.emit("integers", [decode(little, b"\x00\x01\xFF\xFF", 0), decode(signed, b"\xFF\x9C", 0),
                              decode(freq, b"\x13\x88", 0), decode(freq, b"\xFF\xFF", 0)])
    # Float values as the telemetry rounds them (the JSON text is compared).
    floats = [round(float32_from_bits(_bits(v)), 2) for v in (230.1, 231.7, -0.0, 49.987, 1e-3)]
    harness.emit("floats", floats)
    harness.emit("float_specials", [str(float32_from_bits(b)) for b in (0x7F800000, 0xFF800000, 0x7FC00000)])
    await harness.checkpoint("decode")

    clock = FakeClock()
    image = RegisterMeter()
    for i, v in enumerate((229.93, 231.7, 231.82)):
        image.set_float(0x0000 + 2 * i, v)
    for i, a in enumerate((16.018, 15.981, 15.995)):
        image.set_float(0x0006 + 2 * i, a)
    for i, p in enumerate((3646.2, 3665.8, 3671.0)):
        image.set_float(0x000C + 2 * i, p)
    image.set_float(0x0034, 10983.0)
    image.set_float(0x0046, 50.004)
    image.set_float(0x0048, 1234.570)
    image.set_uint32(0xFC00, 12345678)
    stream = ScriptedStream(clock, [image.answer] * 4)  # one cycle: serial + 3 reads
    meter = ModbusMeter(RtuMaster(stream, clock, 9600, 300, 1), SDM630, 1, clock, offline_after=2)
    reading = await meter.read()
    harness.emit("reading", {"energy_wh": reading.energy_wh, "resolution_mwh": reading.energy_resolution_mwh,
                             "serial": reading.serial, "voltage": [round(v, 2) for v in reading.voltage],
                             "power_total": round(reading.power_total, 1), "online": meter.link.online,
                             "requests": len(stream.requests)})
    harness.emit("summary", summary_line(reading))
    failed = await meter.read()  # the script is used up: silence
    failed_again = await meter.read()
    harness.emit("offline", [failed is None, failed_again is None, meter.link.online, meter.link.last_error,
                             meter.link.failed_cycles, meter.serial])
    await harness.checkpoint("meter")


if __name__ == "__main__":
    harness.run(main)
