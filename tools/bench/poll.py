"""Poll-cycle figures for ``make bench``: what one meter poll costs on the line.

- requests and bytes per cycle of each meter map's plan, against what a plain reader
  needs: one request per maximal run of contiguous registers;
- poll cycle time over a baud-rate-faithful link (``PtyLink`` pacing bytes at the baud
  rate, 11 bits per character) at 9600 and 38400 baud, against the wire time of the
  cycle's bytes (bytes x 11 / baud). Beside it, the line's floor: wire time plus the
  3.5-character silence the protocol demands between transactions, plus the simulated
  meter's measured turnaround per transaction (time from the request's last byte to the
  response's first byte, less the wire);
- the same poll cycle under the MicroPython unix port (``tools/testkit/unix_board/poll_cycle.py``:
  the host board's ``machine.UART`` and the port's ``UartStream``), against the same wire
  time, computed here, and the CPython median of the same run.
"""

import asyncio
import logging
import os
import statistics
import subprocess
import time

from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import MODELS
from evse_agent.modbus_rtu import RtuMaster, build_read_request
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.serial_link import SerialStream
from evse_agent.registers import plan_requests

from ..sim.meter_sim import MeterSimulator

REQUEST_BYTES = 8
RESPONSE_OVERHEAD_BYTES = 5  # unit, function, byte count, CRC


def cycle_bytes(requests):
    """Bytes on the line for one cycle of ``requests`` (both directions)."""
    return sum(REQUEST_BYTES + RESPONSE_OVERHEAD_BYTES + 2 * req.count for req in requests)


def wire_ms(requests, baudrate):
    """Milliseconds the cycle's bytes take on the line at ``baudrate`` (11 bits a character)."""
    return cycle_bytes(requests) * 11 * 1000.0 / baudrate


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
            wire = wire_ms(requests, baudrate)
            silence = 3.5 * 11 * 1000.0 / baudrate if baudrate <= 19200 else 1.75
            floor_ms = wire + (len(requests) - 1) * silence + len(requests) * max(turnaround, 0.0)
            times.sort()
            median = statistics.median(times) * 1000
            figures.append({
                "model": model.name, "baudrate": baudrate, "requests": len(requests),
                "bytes": cycle_bytes(requests), "cycles": cycles,
                "cycle_ms_median": round(median, 2),
                "cycle_ms_p90": round(times[int(0.9 * (len(times) - 1))] * 1000, 2),
                "wire_ms": round(wire, 2), "ratio": round(median / wire, 3),
                "meter_turnaround_ms": round(turnaround, 2), "silence_wait_ms": silence_ms,
                "floor_ms": round(floor_ms, 2), "ratio_to_floor": round(median / floor_ms, 3),
            })
    return figures


def micropython_poll(model_name, baudrate, cycles, timeout_s=300, hold=False, load_amps=None):
    """Run ``tools/testkit/unix_board/poll_cycle.py`` under the MicroPython unix port against the
    simulated meter: (median ms, p95 ms, the program's ``poll`` lines, the simulator).
    ``hold`` freezes the simulated values (at ``load_amps`` per phase when given), so every
    poll must read the same ones."""
    from ..testkit.mpy_agent import BOARD_DIR, CODE_DIR, micropython_command
    sim = MeterSimulator(model_name, baudrate=baudrate)
    if load_amps is not None:
        sim.set_load(load_amps)
        sim.physics.update()
    device = sim.start()
    sim.set_hold(hold)
    try:
        env = dict(os.environ, MICROPYPATH=os.pathsep.join([BOARD_DIR, CODE_DIR, ".frozen"]), EVSE_UART1=device)
        run = subprocess.run(micropython_command() + [os.path.join(BOARD_DIR, "poll_cycle.py"), model_name,
                                                      str(baudrate), str(cycles)],
                             capture_output=True, text=True, timeout=timeout_s, env=env, cwd=BOARD_DIR)
    finally:
        sim.stop()
    lines = run.stdout.splitlines()
    summary = [line.split() for line in lines if line.startswith("cycle_ms ")]
    if run.returncode != 0 or not summary:
        raise RuntimeError("poll_cycle.py %s at %d baud failed (exit %d): %s"
                           % (model_name, baudrate, run.returncode, (run.stdout + run.stderr)[-800:]))
    polls = [line for line in lines if line.startswith("poll ")]
    return float(summary[0][1]), float(summary[0][2]), polls, sim


def micropython_cycle_figures(cpython_figures, model_name="sdm630", baudrates=(9600, 38400), cycles=40):
    """The MicroPython unix port's poll cycle per baud rate, beside the same wire time
    (computed here from the meter map's plan) and the CPython median of the same run."""
    model = MODELS[model_name]
    plan = plan_requests(measured_registers(model), model.max_registers, model.answered)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    figures = []
    for baudrate in baudrates:
        median, p95, polls, _ = micropython_poll(model_name, baudrate, cycles)
        wire = wire_ms(plan, baudrate)
        cpython = [f for f in cpython_figures if f["model"] == model_name and f["baudrate"] == baudrate]
        figure = {"model": model_name, "baudrate": baudrate, "cycles": len(polls),
                  "cycle_ms_median": median, "cycle_ms_p95": p95, "wire_ms": round(wire, 2),
                  "ratio": round(median / wire, 3)}
        if cpython:
            figure["cpython_ms_median"] = cpython[0]["cycle_ms_median"]
        figures.append(figure)
    return figures
