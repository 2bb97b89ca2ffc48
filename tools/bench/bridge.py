"""Side by side with a car charging: the agent, a hand-written loop and a Modbus-to-MQTT bridge.

Three programs run at once for the same window, each against its own simulated SDM630 at
9600 baud behind its own ``bench_wire.CountingRelay``, all publishing to the same mosquitto
and polling once a second (the shipped setting):

- the agent: ``evse-agent`` on ``boards/sim.json`` at its shipped settings, with a car
  plugged in and charging (``VehicleSim``: state C, contactor closed, 16 A on three phases;
  every meter simulator follows the same pin file) and the session it opened;
- the hand-written loop (``tools/bench/handwritten_loop.py``, pymodbus + paho);
- modbus2mqtt 0.73 (PyPI; spicierModbus2mqtt), installed on demand into ``.venv-bridge``
  and configured with one poller per run of adjacent SDM630 registers at a 1 s rate, every
  value a float reference with the high word first, ``--always-publish`` so each poll publishes. When it
  cannot be installed (no registry), its rows say so and why; the rest still runs.

Per program: CPU seconds per 1,000 polls (run time of its threads, ``cpu.run_time_s``), resident memory
(``VmRSS`` at the end), requests and bytes per poll as the relay counted them (polls are the
reads of the map's first register), and the latency from a poll's last response byte
leaving the relay to each of its messages reaching a subscriber in the bench process
(both stamped with ``time.perf_counter``): p50 and p99.
"""

import bisect
import json
import os
import subprocess
import sys
import time

from . import wire as bench_wire
from .cpu import busy_beside, machine_busy_s, memory_kib, run_time_s
from .latency import ROOT, Arrivals, agent_command, percentiles
from ..sim.meter_sim import MeterSimulator
from ..sim.vehicle_sim import VehicleSim

BRIDGE_VENV = os.path.join(ROOT, ".venv-bridge")
# modbus2mqtt 0.73 declares a dependency on "serial" (another project, not pyserial) and on
# any pymodbus, but calls pymodbus with ``slave=``, which pymodbus 3.10 renamed to
# ``device_id``: so it goes in without its declared dependencies, beside the pymodbus
# release of its own time (with pyserial) and paho-mqtt.
BRIDGE_PACKAGES = (("--no-deps", "modbus2mqtt==0.73"), ("pymodbus[serial]==3.8.6", "paho-mqtt==2.1.0"))


def ensure_bridge(venv=BRIDGE_VENV, timeout_s=600):
    """(python of the bridge's venv, None) once modbus2mqtt is installed there, or
    (None, why not)."""
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "bench-installed.txt")
    wanted = repr(BRIDGE_PACKAGES)
    try:
        with open(stamp) as handle:
            if handle.read() == wanted:
                return python, None
    except OSError:
        pass
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, capture_output=True,
                       timeout=timeout_s)
        for packages in BRIDGE_PACKAGES:
            subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
                           + list(packages), check=True, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.CalledProcessError as error:
        text = (error.stderr or error.stdout or "") if isinstance(error.stderr, str) else str(error)
        lines = [line for line in text.splitlines() if line.strip()]
        return None, "pip failed: %s" % (lines[-1] if lines else error)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, "cannot create %s: %s" % (venv, error)
    with open(stamp, "w") as handle:
        handle.write(wanted)
    return python, None


def bridge_config(model, rate_s=1.0, unit=1):
    """modbus2mqtt's CSV: a poller per run of adjacent registers, a reference per value."""
    lines = ["type,topic,col2,col3,col4,col5,col6"]
    for function, address, count, registers in bench_wire.contiguous_runs(model):
        table = "input_register" if function == 4 else "holding_register"
        lines.append("poll,%s,%d,%d,%d,%s,%g" % (model.name, unit, address, count, table, rate_s))
        for reg in registers:
            # modbus2mqtt's "float32LE" takes the first register as the high word: the
            # SDM630's order ("float32BE" would swap the words and read nonsense)
            lines.append("ref,%s,%d,r,float32LE," % (reg.name, reg.address))
    return "\n".join(lines) + "\n"


def _bridge_command(python, device, broker, config_path):
    return [python, "-m", "modbus2mqtt", "--rtu", device, "--rtu-baud", "9600", "--rtu-parity", "none",
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), "--mqtt-topic", "modbus/",
            "--config", config_path, "--always-publish", "--verbosity", "0"]


def _handwritten_command(device, broker):
    return [sys.executable, "-m", "evse_tools.bench.handwritten_loop", "--port", device, "--baudrate", "9600",
            "--broker-port", str(broker.port), "--duration", "100000"]


def _latencies(arrivals, topic_suffix, ends, since):
    """Milliseconds from the last response before each matching message to the message."""
    values = []
    for topic, arrived, _, _ in list(arrivals.messages):
        if arrived < since or not topic.endswith(topic_suffix) and topic_suffix != "*":
            continue
        index = bisect.bisect_right(ends, arrived)
        if index and arrived - ends[index - 1] < 0.5:
            values.append((arrived - ends[index - 1]) * 1000)
    return percentiles(values)


def _stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    errors = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    return errors



def _program_figures(name, process, relay, cpu_before, counts_before, first, sink, since):
    """One program's CPU, memory, line counts and latency over the window just ended."""
    if process.poll() is not None:
        raise RuntimeError("%s exited with %s during the window: %s"
                           % (name, process.returncode, _stop(process)[-800:]))
    used = run_time_s(process.pid) - cpu_before
    rss, peak = memory_kib(process.pid)
    (requests0, _, bytes0), polls0 = counts_before
    requests1, _, bytes1 = relay.counts()
    polls = relay.reads_of(*first) - polls0
    arrivals, suffix = sink
    return {
        "polls": polls, "cpu_s": round(used, 4),
        "cpu_s_per_1000_polls": round(used / polls * 1000, 2) if polls else None,
        "rss_kib": rss, "rss_peak_kib": peak,
        "requests_per_poll": round((requests1 - requests0) / polls, 2) if polls else None,
        "bytes_per_poll": round((bytes1 - bytes0) / polls, 1) if polls else None,
        "latency": _latencies(arrivals, suffix, relay.response_ends(), since),
    }

def side_by_side(broker, workdir, window_s=60.0, with_bridge=True):
    """The three programs' figures (or the bridge's reason for being absent)."""
    from evse_agent.meter_models import model_named
    model = model_named("sdm630")
    first = bench_wire.minimal_reads(model)[0][:2]
    os.makedirs(workdir, exist_ok=True)
    pins = os.path.join(workdir, "pins.json")
    vehicle = VehicleSim(pins)  # state A until the agent is up
    result = {"window_s": window_s, "baudrate": 9600, "poll_interval_s": 1.0}
    bridge_python, why = ensure_bridge() if with_bridge else (None, "left out (--quick)")
    names = ["agent", "handwritten"] + (["bridge"] if bridge_python else [])
    if not bridge_python:
        result["bridge"] = {"error": "modbus2mqtt not installed: %s" % why}
    sims, relays, processes, sinks = {}, {}, {}, {}
    try:
        for name in names:
            sims[name] = MeterSimulator("sdm630", baudrate=9600, pin_file=pins)
            relays[name] = bench_wire.CountingRelay(sims[name].start())
        sinks["agent"] = (Arrivals(broker, "evse/sim-001/#", 1, client_id="side-agent"), "/telemetry")
        sinks["handwritten"] = (Arrivals(broker, "meter/sdm630/telemetry", 0, client_id="side-hand"), "*")
        processes["agent"] = subprocess.Popen(agent_command(relays["agent"].client_device, broker, workdir),
                                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        agent_sink = sinks["agent"][0]
        agent_sink.wait_for(lambda topic, doc: topic.endswith("/telemetry"), 0, timeout_s=60)
        mark = len(agent_sink.messages)
        vehicle.plug()
        vehicle.charge()
        agent_sink.wait_for(lambda topic, doc: topic.endswith("/session") and doc.get("event") == "start",
                            mark, timeout_s=60)
        agent_sink.wait_for(lambda topic, doc: topic.endswith("/telemetry")
                            and (doc.get("power_total_w") or 0) > 1000, mark, timeout_s=60)  # current flows
        processes["handwritten"] = subprocess.Popen(_handwritten_command(relays["handwritten"].client_device, broker),
                                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if bridge_python:
            sinks["bridge"] = (Arrivals(broker, "modbus/sdm630/state/#", 0, client_id="side-bridge"), "*")
            config = os.path.join(workdir, "modbus2mqtt.csv")
            with open(config, "w") as handle:
                handle.write(bridge_config(model))
            processes["bridge"] = subprocess.Popen(_bridge_command(bridge_python, relays["bridge"].client_device,
                                                                   broker, config),
                                                   cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for name in processes:
            if name != "agent":
                sinks[name][0].wait_for(lambda topic, doc: True, 0, timeout_s=60)
        time.sleep(3.0)  # every program past its first polls
        since = time.perf_counter()
        busy = machine_busy_s()
        cpu0 = {name: run_time_s(p.pid) for name, p in processes.items()}
        counts0 = {name: (relays[name].counts(), relays[name].reads_of(*first)) for name in names}
        time.sleep(window_s)  # the measurement window itself
        busy = machine_busy_s() - busy
        for name in names:
            result[name] = _program_figures(name, processes[name], relays[name], cpu0[name], counts0[name],
                                            first, sinks[name], since)
        result["machine_busy_beside"] = busy_beside(busy, sum(result[name]["cpu_s"] for name in names), window_s)
        events = [json.loads(m[3]).get("event") for m in list(agent_sink.messages) if m[0].endswith("/session")]
        if "start" not in events or "end" in events:
            raise RuntimeError("the session was not open throughout the window: %s" % events)
        result["agent"]["session_events"] = events
    finally:
        errors = {name: _stop(process) for name, process in processes.items()}
        for arrivals, _ in sinks.values():
            arrivals.close()
        for relay in relays.values():
            relay.close()
        for sim in sims.values():
            sim.stop()
    base = result.get("handwritten")
    for name in ("agent", "bridge"):
        figures = result.get(name)
        if not figures or "error" in figures or not base:
            continue
        figures["cpu_ratio"] = round(figures["cpu_s"] / figures["polls"] / (base["cpu_s"] / base["polls"]), 3) \
            if base["cpu_s"] and figures["polls"] else None
        figures["rss_ratio"] = round(figures["rss_kib"] / base["rss_kib"], 3)
    result["stderr_tail"] = {name: text[-300:] for name, text in errors.items() if text.strip()}
    return result


def side_by_side_rows(figures, row):
    """Table rows: the agent and the bridge, each against the hand-written loop."""
    lines = []
    base = figures.get("handwritten")
    if not base:
        return [row("side by side, car charging", figures.get("error", "no figures"))]
    if "machine_busy_beside" in figures:
        lines.append(row("side by side: machine busy beside them (sims, relays, broker)",
                         "%.0f %% of its cores" % (100 * figures["machine_busy_beside"])))
    for name, label in (("agent", "agent"), ("bridge", "modbus2mqtt")):
        measured = figures.get(name)
        if not measured or "error" in measured:
            lines.append("%s, side by side: %s" % (label, (measured or {}).get("error", "not run")))
            continue
        lines.append(row("%s, charging: CPU s per 1000 polls at 1 Hz" % label,
                         "%.2f s" % measured["cpu_s_per_1000_polls"],
                         "%.2f s hand" % base["cpu_s_per_1000_polls"], measured.get("cpu_ratio")))
        lines.append(row("%s, charging: resident memory" % label, "%d KiB" % measured["rss_kib"],
                         "%d KiB hand" % base["rss_kib"], measured.get("rss_ratio")))
        lines.append(row("%s, charging: requests / bytes per poll" % label,
                         "%g / %g B" % (measured["requests_per_poll"], measured["bytes_per_poll"]),
                         "%g / %g B hand" % (base["requests_per_poll"], base["bytes_per_poll"]),
                         measured["bytes_per_poll"] / base["bytes_per_poll"]))
        for point in ("p50", "p99"):
            mine, theirs = measured["latency"].get(point + "_ms"), base["latency"].get(point + "_ms")
            if mine is None or theirs is None:
                lines.append(row("%s, charging: last byte in -> subscriber %s" % (label, point), "no samples"))
                continue
            lines.append(row("%s, charging: last byte in -> subscriber %s" % (label, point), "%.2f ms" % mine,
                             "%.2f ms hand" % theirs, mine / theirs if theirs else None))
    return lines
