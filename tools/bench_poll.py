"""Poll-cycle figures for ``make bench``: what one meter poll costs on the line.

- requests and bytes per cycle of each meter map's plan, against what a plain reader
  needs: one request per maximal run of contiguous registers;
- poll cycle time over a baud-rate-faithful link (``PtyLink`` pacing bytes at the baud
  rate, 11 bits per character) at 9600 and 38400 baud, against the wire time of the
  cycle's bytes (bytes x 11 / baud). Beside it, the line's floor: wire time plus the
  3.5-character silence the protocol demands between transactions, plus the simulated
  meter's measured turnaround per transaction (time from the request's last byte to the
  response's first byte, less the wire).
"""

import asyncio
import logging
import statistics
import time

from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import MODELS
from evse_agent.modbus_rtu import RtuMaster, build_read_request
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.serial_link import SerialStream
from evse_agent.registers import plan_requests

from .meter_sim import MeterSimulator

REQUEST_BYTES = 8
RESPONSE_OVERHEAD_BYTES = 5  # unit, function, byte count, CRC


def cycle_bytes(requests):
    """Bytes on the line for one cycle of ``requests`` (both directions)."""
    return sum(REQUEST_BYTES + RESPONSE_OVERHEAD_BYTES + 2 * req.count for req in requests)


def measured_registers(model):
    return [reg for reg in model.registers if reg.name != "serial"]


def request_figures():
    """Per model: the agent's plan against one request per contiguous run."""
    figures = []
    for model in MODELS.values():
        registers = measured_registers(model)
        plan = plan_requests(registers, model.max_registers, model.answered)
        runs = plan_requests(registers, model.max_registers, ())  # no bridging: contiguous runs
        figures.append({"model": model.name, "requests": len(plan), "bytes": cycle_bytes(plan),
                        "baseline_requests": len(runs), "baseline_bytes": cycle_bytes(runs),
                        "plan": ["fn %d 0x%04X x%d" % (r.function, r.address, r.count) for r in plan]})
    return figures


async def _turnaround_ms(device, baudrate, samples=15):
    """Median time the simulated meter takes to start answering, less the wire time."""
    stream = SerialStream(device, baudrate)
    request = build_read_request(1, 4, 0x0000, 2)
    char_s = 11.0 / baudrate
    try:
        values = []
        for _ in range(samples):
            stream.reset_input()
            started = time.perf_counter()
            stream.write(request)
            first = await stream.read(1, 1000)
            arrived = time.perf_counter()
            if not first:
                raise RuntimeError("the simulated meter did not answer at %d baud" % baudrate)
            while await stream.read(64, 30):
                pass
            values.append((arrived - started - (len(request) + 1) * char_s) * 1000)
            await asyncio.sleep(0.01)
        return statistics.median(values)
    finally:
        stream.close()


async def _cycle_times(device, model, baudrate, cycles):
    clock = SystemClock("always")
    stream = SerialStream(device, baudrate)
    try:
        master = RtuMaster(stream, clock, baudrate)
        meter = ModbusMeter(master, model, 1, clock)
        if await meter.read() is None:  # the first cycle also reads the serial number
            raise RuntimeError("%s did not answer at %d baud" % (model.name, baudrate))
        times = []
        for _ in range(cycles):
            await asyncio.sleep(0.02)  # idle line between cycles, as between 1 s polls
            started = time.perf_counter()
            reading = await meter.read()
            times.append(time.perf_counter() - started)
            if reading is None:
                raise RuntimeError("%s poll failed at %d baud: %s" % (model.name, baudrate, meter.link.last_error))
        return meter.requests, master.silence_ms, times
    finally:
        stream.close()


def cycle_time_figures(baudrates=(9600, 38400), cycles=40):
    """Per model and baud rate: median / p90 cycle time, wire time and the line's floor."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    figures = []
    for model in MODELS.values():
        for baudrate in baudrates:
            sim = MeterSimulator(model.name, baudrate=baudrate)
            device = sim.start()
            try:
                turnaround = asyncio.run(_turnaround_ms(device, baudrate))
                requests, silence_ms, times = asyncio.run(_cycle_times(device, model, baudrate, cycles))
            finally:
                sim.stop()
            wire_ms = cycle_bytes(requests) * 11 * 1000.0 / baudrate
            silence = 3.5 * 11 * 1000.0 / baudrate if baudrate <= 19200 else 1.75
            floor_ms = wire_ms + (len(requests) - 1) * silence + len(requests) * max(turnaround, 0.0)
            times.sort()
            median = statistics.median(times) * 1000
            figures.append({
                "model": model.name, "baudrate": baudrate, "requests": len(requests),
                "bytes": cycle_bytes(requests), "cycles": cycles,
                "cycle_ms_median": round(median, 2),
                "cycle_ms_p90": round(times[int(0.9 * (len(times) - 1))] * 1000, 2),
                "wire_ms": round(wire_ms, 2), "ratio": round(median / wire_ms, 3),
                "meter_turnaround_ms": round(turnaround, 2), "silence_wait_ms": silence_ms,
                "floor_ms": round(floor_ms, 2), "ratio_to_floor": round(median / floor_ms, 3),
            })
    return figures
