"""CPU and memory figures for ``make bench``: the agent against a hand-written loop, a car charging.

Both run as their own processes for the same wall-clock window, side by side, each against
its own simulated meter paced at 9600 baud and the same mosquitto, polling at 1 Hz. Each
meter simulator follows its own vehicle simulator's pin file, and that car is charging
(state C, contactor closed, power flowing) through the whole window:

- the agent: ``evse-agent`` on ``boards/sim.json`` at its shipped settings (inputs as the
  board has them, sessions, events, journal, aggregates, telemetry; no console), with the
  session the plug-in opened still open over the window (its start record is awaited);
- the baseline: ``tools/bench/handwritten_loop.py`` (pymodbus read loop + paho publish).

CPU is the scheduler's run time of every thread of the process
(``/proc/<pid>/task/*/schedstat``, nanoseconds: a window holds a fifth of a second of each
program's CPU, which ``/proc/<pid>/stat`` counts in 10 ms ticks) over the window after a
warm-up, scaled to 1,000 poll cycles; beside it, how busy the machine's other work kept its
cores (``/proc/stat``), since a busy machine moves both programs' figures. Memory is the
resident set (``VmRSS``) at the end and its peak (``VmHWM``). ``python -m evse_tools.bench.cpu`` prints
the figures and the ratios (goals: CPU <= 1.3x, resident memory <= 1.15x).
"""

import json
import os
import subprocess
import sys
import time

from .latency import ROOT, Arrivals, agent_command
from ..sim.meter_sim import MeterSimulator
from ..sim.vehicle_sim import VehicleSim

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (all threads)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def run_time_s(pid):
    """Seconds process ``pid``'s live threads have run, from the scheduler's nanosecond
    counts: precise enough for a program that runs a few milliseconds a second. Threads that
    ended are not counted, so it is for programs that keep theirs (the agent, the loops)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total / 1e9


def machine_busy_s():
    """Core-seconds the whole machine has been busy so far (every CPU, ``/proc/stat``)."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICKS  # user, nice, system, idle, iowait, irq, softirq, steal


def busy_beside(machine_busy, measured_s, window_s):
    """Share of the machine's cores busy over a window with work other than the programs
    measured: ``machine_busy`` core-seconds (``machine_busy_s`` across the window) less
    their ``measured_s``."""
    return round(max(0.0, machine_busy - measured_s) / window_s / os.cpu_count(), 3)


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


# The runs measured side by side: the agent as the sim board ships; the hand-written loop.
RUNS = (("agent", ()), ("handwritten", None))


def cpu_figures(broker, workdir, window_s=60.0, warmup_s=5.0):
    """CPU seconds per 1,000 poll cycles at 1 Hz and RSS of the agent and of the baseline,
    each with a car charging (state C, contactor closed) over the window."""
    os.makedirs(workdir, exist_ok=True)
    pin_files = [os.path.join(workdir, name, "pins.json") for name, _ in RUNS]
    cars = [VehicleSim(path, contactor_delay_s=0) for path in pin_files]
    sims = [MeterSimulator("sdm630", baudrate=9600, pin_file=path) for path in pin_files]
    devices = [sim.start() for sim in sims]
    duration = warmup_s + window_s + 120.0  # both are stopped once measured
    sink = Arrivals(broker, "evse/sim-001/session", 1, client_id="bench-cpu")
    processes = {}
    try:
        for car in cars:
            car.plug()
            car.charge()
        for (name, overrides), device in zip(RUNS, devices):
            if overrides is None:
                command = _baseline_command(device, broker, duration)
            else:
                command = agent_command(device, broker, os.path.join(workdir, name), overrides, duration)
            processes[name] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sink.wait_for(lambda topic, doc: doc.get("event") == "start", 0, timeout_s=60)
        time.sleep(warmup_s)
        busy = machine_busy_s()
        first = {name: run_time_s(p.pid) for name, p in processes.items()}
        polls_before = [sim.requests_seen for sim in sims]
        time.sleep(window_s)
        used = {name: run_time_s(p.pid) - first[name] for name, p in processes.items()}
        busy = machine_busy_s() - busy
        memory = {name: memory_kib(p.pid) for name, p in processes.items()}
        requests = [sim.requests_seen - before for sim, before in zip(sims, polls_before)]
        ended = [doc for _, doc in _session_docs(sink) if doc.get("event") == "end"]
        if ended:
            raise RuntimeError("the session ended inside the measured window: %s" % ended[0])
        for name, process in processes.items():
            if process.poll() is None:
                process.terminate()
            _, stderr = process.communicate(timeout=60)
            if process.returncode not in (0, -15):
                raise RuntimeError("%s exited with %s: %s" % (name, process.returncode, stderr.decode()[-800:]))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        sink.close()
        for sim in sims:
            sim.stop()
    cycles = window_s  # 1 Hz
    result = {"window_s": window_s, "cycles": int(cycles),
              "machine_busy_beside": busy_beside(busy, sum(used.values()), window_s),
              "car": "state C, contactor closed, %.0f A x 3 phases, session open" % cars[0].ev_current_a}
    for index, (name, _) in enumerate(RUNS):
        rss, peak = memory[name]
        result[name] = {"cpu_s": round(used[name], 4), "cpu_s_per_1000_cycles": round(used[name] / cycles * 1000, 2),
                        "rss_kib": rss, "rss_peak_kib": peak, "modbus_requests": requests[index]}
        if name != "handwritten":
            result[name]["cpu_ratio"] = round(used[name] / used["handwritten"], 3) if used["handwritten"] else None
            result[name]["rss_ratio"] = round(rss / memory["handwritten"][0], 3)
    return result


def _session_docs(sink):
    docs = []
    for message in list(sink.messages):
        try:
            docs.append((message[0], json.loads(message[3])))
        except ValueError:
            pass
    return docs


def main(argv=None):
    import argparse
    import tempfile

    from ..testkit.broker import Mosquitto

    parser = argparse.ArgumentParser(prog="bench-cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60.0, help="measured seconds (default 60)")
    args = parser.parse_args(argv)
    with Mosquitto() as broker:
        figures = cpu_figures(broker, tempfile.mkdtemp(prefix="evse-bench-cpu-"), args.window)
    base = figures["handwritten"]
    agent = figures["agent"]
    print(json.dumps(figures, indent=2))
    print("CPU s per 1000 polls: agent %.2f, hand-written %.2f, ratio %.2f (goal <= 1.3)"
          % (agent["cpu_s_per_1000_cycles"], base["cpu_s_per_1000_cycles"], agent["cpu_ratio"]))
    print("resident memory: agent %d KiB, hand-written %d KiB, ratio %.2f (goal <= 1.15)"
          % (agent["rss_kib"], base["rss_kib"], agent["rss_ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
