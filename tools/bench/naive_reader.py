"""A naive meter reader, the bench's upper baseline for Modbus requests and bytes per poll.

What a user writes from the meter's register table alone: pymodbus's serial client reads
every value the map lists with its own request (function code, address and register count
from the table), one after the other, decodes the floats, and starts again at the interval.
Run as its own process against the same simulated meter and frame-counting relay as the
agent: ``python -m evse_tools.bench.naive_reader --port DEV --polls 10``. Prints one JSON line:
polls, failures, reads per poll.
"""

import argparse
import json
import time

from pymodbus.client import ModbusSerialClient

from evse_agent.meter_models import model_named


def main(argv=None):
    parser = argparse.ArgumentParser(prog="naive-reader", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="meter serial device")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--model", default="sdm630")
    parser.add_argument("--unit", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between poll starts")
    parser.add_argument("--polls", type=int, default=10)
    args = parser.parse_args(argv)

    model = model_named(args.model)
    table = [reg for reg in model.registers if reg.name != "serial"]
    meter = ModbusSerialClient(args.port, baudrate=args.baudrate, timeout=0.5, retries=1)
    if not meter.connect():
        raise SystemExit("cannot open %s" % args.port)
    polls = failures = 0
    values = {}
    next_poll = time.monotonic()
    for _ in range(args.polls):
        try:
            for reg in table:
                if reg.function == 4:
                    response = meter.read_input_registers(reg.address, count=reg.count, device_id=args.unit)
                else:
                    response = meter.read_holding_registers(reg.address, count=reg.count, device_id=args.unit)
                if response.isError():
                    raise IOError("%s at 0x%04X: %s" % (reg.name, reg.address, response))
                if reg.dtype == "float32" and reg.word_order == "big":
                    values[reg.name] = meter.convert_from_registers(response.registers, meter.DATATYPE.FLOAT32)
                else:
                    values[reg.name] = response.registers
            polls += 1
        except Exception:  # noqa: BLE001 - count the failure and read on, as a simple reader would
            failures += 1
        next_poll += args.interval
        time.sleep(max(0.0, next_poll - time.monotonic()))
    meter.close()
    print(json.dumps({"polls": polls, "failures": failures, "reads_per_poll": len(table)}))
    return 0 if polls else 1


if __name__ == "__main__":
    raise SystemExit(main())
