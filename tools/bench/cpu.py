"""CPU and memory figures for ``make bench``: the agent against a hand-written loop.

All run as their own processes for the same wall-clock window, side by side, each against
its own simulated meter paced at 9600 baud and the same mosquitto, polling at 1 Hz:

- the agent: ``evse-agent`` on ``boards/sim.json`` (meter, pilot and contactor sampled every
  20 ms, sessions, events, journal, aggregates, telemetry; no console);
- the agent with its pilot sampled once a second: what the poll path itself costs;
- the baseline: ``tools/bench/handwritten_loop.py`` (pymodbus read loop + paho publish).

CPU is user + system time of the whole process (every thread) from ``/proc/<pid>/stat``
over the window after a warm-up, scaled to 1,000 poll cycles; memory is the resident set
(``VmRSS``) at the end and its peak (``VmHWM``).
"""

import os
import subprocess
import sys
import time

from .latency import ROOT, agent_command
from ..sim.meter_sim import MeterSimulator

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (all threads)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def memory_kib(pid):
    """(VmRSS, VmHWM) of process ``pid`` in KiB."""
    values = {}
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _baseline_command(device, broker, duration_s):
    return [sys.executable, "-m", "evse_tools.bench.handwritten_loop", "--port", device, "--baudrate", "9600",
            "--broker-port", str(broker.port), "--duration", str(duration_s)]


# The runs measured side by side: the agent as the sim board has it; the agent with its
# pilot sampled once a second (what the poll path alone costs); the hand-written loop.
RUNS = (("agent", ()), ("agent_pilot_1hz", ("io.pilot.sample_ms=1000",)), ("handwritten", None))


def cpu_figures(broker, workdir, window_s=60.0, warmup_s=5.0):
    """CPU seconds per 1,000 poll cycles at 1 Hz and RSS of the agent and of the baseline."""
    os.makedirs(workdir, exist_ok=True)
    sims = [MeterSimulator("sdm630", baudrate=9600) for _ in RUNS]
    devices = [sim.start() for sim in sims]
    duration = warmup_s + window_s + 5.0
    processes = {}
    for (name, overrides), device in zip(RUNS, devices):
        if overrides is None:
            command = _baseline_command(device, broker, duration)
        else:
            command = agent_command(device, broker, os.path.join(workdir, name), overrides, duration)
        processes[name] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(warmup_s)
        first = {name: cpu_seconds(p.pid) for name, p in processes.items()}
        polls_before = [sim.requests_seen for sim in sims]
        time.sleep(window_s)
        used = {name: cpu_seconds(p.pid) - first[name] for name, p in processes.items()}
        memory = {name: memory_kib(p.pid) for name, p in processes.items()}
        requests = [sim.requests_seen - before for sim, before in zip(sims, polls_before)]
        for name, process in processes.items():
            _, stderr = process.communicate(timeout=duration + 30)
            if process.returncode != 0:
                raise RuntimeError("%s exited with %s: %s" % (name, process.returncode, stderr.decode()[-800:]))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for sim in sims:
            sim.stop()
    cycles = window_s  # 1 Hz
    result = {"window_s": window_s, "cycles": int(cycles), "clock_tick_s": 1.0 / TICKS}
    for index, (name, _) in enumerate(RUNS):
        rss, peak = memory[name]
        result[name] = {"cpu_s": round(used[name], 3), "cpu_s_per_1000_cycles": round(used[name] / cycles * 1000, 2),
                        "rss_kib": rss, "rss_peak_kib": peak, "modbus_requests": requests[index]}
        if name != "handwritten":
            result[name]["cpu_ratio"] = round(used[name] / used["handwritten"], 3) if used["handwritten"] else None
            result[name]["rss_ratio"] = round(rss / memory["handwritten"][0], 3)
    return result
