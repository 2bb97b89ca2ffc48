"""Poll-cycle figures for ``make bench``: what one meter poll costs on the line.

Every count is taken on the line: the program under test talks to the simulated meter
through ``bench_wire.CountingRelay``, which counts request and response frames and bytes
by parsing the RTU layout. The baselines come from code apart from the agent's planner:

- requests and bytes per cycle of each meter map, against a naive reader (one pymodbus
  request per value the map lists, ``tools/bench/naive_reader.py``, its own process, through the
  same relay) and against the bytes the map needs (``bench_wire.minimal_reads``: the
  cheapest reads the map's limits allow, from its register list and the frame layout);
- poll cycle time over a baud-rate-faithful link (``PtyLink`` pacing 11 bits per
  character) at 9600 and 38400 baud, against pymodbus's serial client doing the map's
  minimal reads through the same relay, and against the line's floor: the minimal reads'
  wire time, the 3.5-character silences and the meter's turnaround as a bare client
  (frames built by the bench, ``bench_wire.raw_turnaround_ms``) measures it;
- the same poll cycle under the MicroPython unix port (``tools/testkit/unix_board/poll_cycle.py``:
  the host board's ``machine.UART`` and the port's ``UartStream``), against the same wire
  time and the CPython median of the same run.
"""

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time

from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import MODELS
from evse_agent.modbus_rtu import RtuMaster
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.serial_link import SerialStream

from . import wire as bench_wire
from ..sim.meter_sim import MeterSimulator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def naive_counts(model_name, baudrate=38400, polls=5):
    """Requests and bytes per poll of ``tools/bench/naive_reader.py`` on the relay."""
    sim = MeterSimulator(model_name, baudrate=baudrate)
    relay = bench_wire.CountingRelay(sim.start())
    try:
        run = subprocess.run([sys.executable, "-m", "evse_tools.bench.naive_reader", "--port", relay.client_device,
                              "--baudrate", str(baudrate), "--model", model_name, "--polls", str(polls)],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        requests, responses, line_bytes = relay.counts()
    finally:
        relay.close()
        sim.stop()
    report = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {}
    if run.returncode != 0 or report.get("failures"):
        raise RuntimeError("naive reader on %s failed: %s" % (model_name, (run.stdout + run.stderr)[-800:]))
    return {"requests": requests / polls, "responses": responses / polls, "bytes": line_bytes / polls}


def request_figures(cycle_figures):
    """Per model: the agent's requests and bytes per cycle as the relay counted them, the
    naive reader's, and the map's minimum."""
    figures = []
    for model in MODELS.values():
        agent = [f for f in cycle_figures if f["model"] == model.name][0]
        minimal = bench_wire.minimal_reads(model)
        naive = naive_counts(model.name)
        figures.append({"model": model.name, "requests": agent["requests"], "bytes": agent["bytes"],
                        "naive_requests": naive["requests"], "naive_bytes": naive["bytes"],
                        "minimal_requests": len(minimal), "minimal_bytes": bench_wire.reads_bytes(minimal),
                        "minimal_reads": ["fn %d 0x%04X x%d" % read for read in minimal]})
    return figures


async def _agent_cycles(device, model, baudrate, cycles):
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
        return times
    finally:
        stream.close()


def _pymodbus_cycles(device, reads, baudrate, cycles):
    """Cycle times of pymodbus's serial client doing ``reads`` (an independent master)."""
    from pymodbus.client import ModbusSerialClient
    client = ModbusSerialClient(device, baudrate=baudrate, timeout=1.0, retries=0)
    if not client.connect():
        raise RuntimeError("pymodbus cannot open %s" % device)
    try:
        times = []
        for _ in range(cycles + 1):
            time.sleep(0.02)
            started = time.perf_counter()
            for function, address, count in reads:
                read = client.read_input_registers if function == 4 else client.read_holding_registers
                if read(address, count=count, device_id=1).isError():
                    raise RuntimeError("pymodbus read fn %d 0x%04X x%d failed" % (function, address, count))
            times.append(time.perf_counter() - started)
        return times[1:]
    finally:
        client.close()


def _median_ms(times):
    return statistics.median(times) * 1000


def cycle_time_figures(baudrates=(9600, 38400), cycles=40):
    """Per model and baud rate, all through one counting relay: the agent's cycle time and
    its requests/bytes per cycle, pymodbus doing the map's minimal reads, and the floor."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    figures = []
    for model in MODELS.values():
        minimal = bench_wire.minimal_reads(model)
        for baudrate in baudrates:
            sim = MeterSimulator(model.name, baudrate=baudrate)
            relay = bench_wire.CountingRelay(sim.start())
            try:
                function, address = minimal[0][0], minimal[0][1]
                turnaround = bench_wire.raw_turnaround_ms(relay.client_device, baudrate, function=function,
                                                          address=address, count=1 if model.max_registers < 2 else 2)
                before = relay.counts()
                times = asyncio.run(_agent_cycles(relay.client_device, model, baudrate, cycles))
                after = relay.counts()
                independent = _pymodbus_cycles(relay.client_device, minimal, baudrate, cycles)
            finally:
                relay.close()
                sim.stop()
            # the agent's first cycle also reads the serial number: count the timed ones only
            timed = cycles
            requests = (after[0] - before[0] - _serial_reads(model)) / (timed + 1)
            line_bytes = (after[2] - before[2] - _serial_bytes(model)) / (timed + 1)
            wire = bench_wire.wire_ms(minimal, baudrate)
            floor_ms = bench_wire.wire_floor_ms(minimal, baudrate, max(turnaround, 0.0))
            median = _median_ms(times)
            times.sort()
            figures.append({
                "model": model.name, "baudrate": baudrate, "requests": round(requests, 2),
                "bytes": round(line_bytes, 1), "cycles": cycles,
                "cycle_ms_median": round(median, 2),
                "cycle_ms_p90": round(times[int(0.9 * (len(times) - 1))] * 1000, 2),
                "pymodbus_ms_median": round(_median_ms(independent), 2),
                "ratio_to_pymodbus": round(median / _median_ms(independent), 3),
                "wire_ms": round(wire, 2), "ratio": round(median / wire, 3),
                "meter_turnaround_ms": round(turnaround, 2),
                "floor_ms": round(floor_ms, 2), "ratio_to_floor": round(median / floor_ms, 3),
            })
    return figures


def _serial_reads(model):
    return sum(1 for reg in model.registers if reg.name == "serial")


def _serial_bytes(model):
    return sum(bench_wire.read_bytes(reg.count) for reg in model.registers if reg.name == "serial")


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
    """The MicroPython unix port's poll cycle per baud rate, beside the wire time of the
    map's minimal reads (``bench/wire.py``) and the CPython median of the same run."""
    minimal = bench_wire.minimal_reads(MODELS[model_name])
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    figures = []
    for baudrate in baudrates:
        median, p95, polls, _ = micropython_poll(model_name, baudrate, cycles)
        wire = bench_wire.wire_ms(minimal, baudrate)
        cpython = [f for f in cpython_figures if f["model"] == model_name and f["baudrate"] == baudrate]
        figure = {"model": model_name, "baudrate": baudrate, "cycles": len(polls),
                  "cycle_ms_median": median, "cycle_ms_p95": p95, "wire_ms": round(wire, 2),
                  "ratio": round(median / wire, 3)}
        if cpython:
            figure["cpython_ms_median"] = cpython[0]["cycle_ms_median"]
        figures.append(figure)
    return figures
