"""Poll-cycle timing on the host board: ``micropython poll_cycle.py MODEL BAUD CYCLES``.

The core's ``RtuMaster`` + ``ModbusMeter`` read the meter on ``UART(1)`` (``EVSE_UART1``:
the meter simulator's pty) through the port's ``UartStream``, as ``main.py`` wires them.
One unmeasured cycle first (it also reads the serial number), then CYCLES polls, each
after 20 ms of idle line. Prints one ``poll`` line per cycle with the reading, then
``cycle_ms MEDIAN P95 CYCLES``; exits 1 on a failed poll.
"""

import asyncio
import sys
import time

from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import model_named
from evse_agent.modbus_rtu import RtuMaster
from evse_agent.ports.micropython.clock import MicroClock
from evse_agent.ports.micropython.uart import UartStream


async def poll(model_name, baudrate, cycles):
    clock = MicroClock("always")
    stream = UartStream(1, baudrate, "N", 1, None, None)
    try:
        master = RtuMaster(stream, clock, baudrate)
        meter = ModbusMeter(master, model_named(model_name), 1, clock)
        if await meter.read() is None:
            print("failed first poll: %s" % meter.link.last_error)
            return 1
        times = []
        for number in range(cycles):
            await asyncio.sleep_ms(20)
            started = time.ticks_us()
            reading = await meter.read()
            times.append(time.ticks_diff(time.ticks_us(), started))
            if reading is None:
                print("failed poll %d: %s" % (number, meter.link.last_error))
                return 1
            print("poll %d %d %r %r %r" % (number, reading.energy_wh, reading.power_total,
                                           reading.voltage, reading.serial))
        times.sort()
        print("cycle_ms %.2f %.2f %d" % (_median(times) / 1000, times[int(0.95 * (len(times) - 1))] / 1000,
                                         cycles))
        return 0
    finally:
        stream.close()


def _median(ordered):
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


if len(sys.argv) != 4:
    print("usage: poll_cycle.py MODEL BAUD CYCLES")
    sys.exit(2)
sys.exit(asyncio.run(poll(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
