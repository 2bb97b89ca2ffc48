"""The baseline ``make bench`` holds the agent against: a meter-to-MQTT loop written by hand.

What a user would write without the agent: pymodbus's serial client reads the meter's
measurement registers (one request per run of adjacent registers, as a reader without a
planner would; the runs come from ``bench/wire.py``, not the agent's planner), decodes them,
and paho-mqtt publishes one JSON message per poll. No sessions, journal, signing, events
or inputs. Run as its own process so its CPU and memory can be
measured: ``python -m evse_tools.bench.handwritten_loop --port DEV --broker-port N``.
"""

import argparse
import json
import time

import paho.mqtt.client as paho
from pymodbus.client import ModbusSerialClient

from evse_agent.meter_models import model_named

from .wire import contiguous_runs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="handwritten-loop", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="meter serial device")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--model", default="sdm630")
    parser.add_argument("--broker-host", default="127.0.0.1")
    parser.add_argument("--broker-port", type=int, default=1883)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args(argv)

    model = model_named(args.model)
    runs = contiguous_runs(model)  # one read per run of adjacent registers, no bridging

    meter = ModbusSerialClient(args.port, baudrate=args.baudrate, timeout=0.3, retries=1)
    meter.connect()
    mqtt = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="handwritten-loop")
    mqtt.connect(args.broker_host, args.broker_port, 30)
    mqtt.loop_start()
    topic = "meter/%s/telemetry" % args.model
    started = time.monotonic()
    next_poll = started
    polls = failures = 0
    while time.monotonic() - started < args.duration:
        values = {}
        try:
            for function, address, count, registers in runs:
                read = meter.read_input_registers if function == 4 else meter.read_holding_registers
                response = read(address, count=count, device_id=1)
                if response.isError():
                    raise IOError(str(response))
                for reg in registers:
                    offset = reg.address - address
                    values[reg.name] = meter.convert_from_registers(
                        response.registers[offset:offset + 2], meter.DATATYPE.FLOAT32)
            values["ts"] = time.time()
            mqtt.publish(topic, json.dumps(values), qos=0)
            polls += 1
        except Exception:  # noqa: BLE001 - a hand-written loop keeps going on any error
            failures += 1
        next_poll += args.interval
        time.sleep(max(0.0, next_poll - time.monotonic()))
    mqtt.disconnect()
    mqtt.loop_stop()
    meter.close()
    print(json.dumps({"polls": polls, "failures": failures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
