"""``make bench``: measured figures of the agent, each beside its baseline from the same run.

Prints one table and writes ``bench/results.json``. Benchmarks measure; they do not pass or
fail (the machines are shared and noisy) -- read the ratios. ``--quick`` shortens the windows.

- Modbus requests and bytes per poll cycle of each meter map, counted on the line by a
  frame-counting relay, against a naive reader (one pymodbus request per value, its own
  process, the same relay) and against the bytes the map needs (``bench/wire.py``: the
  cheapest reads the map's limits allow, computed apart from the agent's planner);
- poll cycle time over a pty link that paces bytes at 9600 and 38400 baud, against
  pymodbus's serial client doing the map's minimal reads through the same relay, and
  against the line's floor: their wire time, the 3.5-character silences and the meter's
  turnaround as a bare client with the bench's own framing measures it; the same under the
  MicroPython unix port (``tools/testkit/unix_board/poll_cycle.py``: the host board's
  ``machine.UART`` and the port's ``UartStream``), against the same wire time and the
  CPython median of the run;
- pilot change -> session message p50/p99 on a real mosquitto, beside the round trip of a
  bare paho publish -> subscribe as a reference (no other program does that job;
  ``bench_latency``);
- side by side for one window with a car charging and its session open (``bench_bridge``):
  the agent at shipped settings, the hand-written loop and modbus2mqtt (installed on
  demand into ``.venv-bridge``; "not installed" and why when it cannot be), each behind
  its own frame-counting relay: CPU s per 1,000 polls, resident memory, requests and
  bytes per poll, and last response byte in -> subscriber p50/p99, against the loop;
- journal: durable append rate, session-record-sized records fsync'ed before ``append``
  returns, against plain ``os.write``/``os.fsync`` of the same bytes; replay after a
  simulated 1-hour and 24-hour outage (fast clock), against raw paho QoS 1 publishing of
  the same messages to the same broker (publish all, wait for every PUBACK);
- state E/F detection delay of an ADC pilot board (``bench/inputs.py``), against the bound
  its sampling allows (debounce + one sample period);
- CPU seconds per 1,000 poll cycles at 1 Hz and resident memory, a car charging, against a hand-written
  pymodbus + paho loop (``bench_cpu``, ``handwritten_loop``);
- flash wear: bytes and fsyncs the journal writes per hour at the default settings;
- MicroPython, unix port (64-bit, ``tools/testkit/mpy_unix.py``), the core as deployed (a ROMFS
  image): the smallest fixed heap, in words beyond the image, in which the session scenario
  (a charging session with journal, OCMF and an agent restart;
  host_tests/mpy/scenarios/session_scenario.py) and the lost-end-record scenario complete,
  and the heap in use once the code is loaded, against the 110 K words an ESP32 without
  PSRAM leaves to MicroPython; the P-256 signing time there against the same pure-Python
  signer and ``cryptography`` under CPython;
- MicroPython MQTT client (the port's, under the unix port): QoS 1 publish -> PUBACK p50 one
  message at a time and throughput with 16 in flight, against paho-mqtt on CPython on the same
  mosquitto (``bench_mqtt``);
- MicroPython, WebAssembly port (32-bit like an ESP32): the session scenario's
  ``gc.mem_alloc()`` peak after each step, less the loaded code, against the 64 KiB budget;
- fleet: 10, 100 and 500 simulated stations against one mosquitto (``fleet_sim``):
  messages/s and broker CPU;
- fleet at scale (``bench_fleet``): records/s the collector stores on SQLite and PostgreSQL
  and a share group of 2 and 4, against the databases' own bulk load and mosquitto_sub; a
  fleet of replayed stations (5,000 into one collector; 10,000 into a group of 2 with
  ``--full-fleet``) held exactly once;
- monitoring quality (``bench_monitoring``): false power events per 1,000 stops, missed true
  drops per 1,000 and the detection delay p50/p99 on a fast clock, against the seed's rule
  (each reading judged against the inputs accepted when it arrives) on the same plans; and
  one randomized end-to-end run: false events, missed drops, telemetry messages per reading.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from evse_agent.aggregate import Aggregator
from evse_agent.config import validate
from evse_agent.forwarder import Forwarder
from evse_agent.journal import AGGREGATE, EVENT, SESSION, Journal
from evse_agent.messages import Outbox, Topics
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.mqtt import MqttPublisher
from evse_agent.reading import Reading

from evse_agent import log

from .bridge import side_by_side, side_by_side_rows
from .cpu import cpu_figures
from . import fleet as bench_fleet
from .inputs import ef_detection_figures
from .latency import latency_figures
from .monitoring import monitoring_figures, monitoring_rows
from .poll import cycle_time_figures, micropython_cycle_figures, request_figures
from ..testkit.broker import Mosquitto
from ..sim.fleet_sim import fleet_table, run_fleets
from ..testkit.subscriber import Collector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "bench", "results.json")


class FastClock:
    """A clock the benchmark moves by hand (wall and monotonic together)."""

    def __init__(self, start=1790000000.0):
        self.now = start

    def time(self):
        return self.now

    def monotonic_ms(self):
        return int(self.now * 1000)

    def synced(self):
        return True


class CountingFileSystem(FileSystem):
    """FileSystem that counts bytes written and fsyncs (the flash-wear model's inputs)."""

    def __init__(self, root):
        FileSystem.__init__(self, root)
        self.fsyncs = 0
        self.atomic_bytes = 0

    def sync_file(self, handle):
        self.fsyncs += 1
        FileSystem.sync_file(self, handle)

    def write_atomic(self, name, data):
        self.fsyncs += 2  # the file and its directory
        self.atomic_bytes += len(data)
        FileSystem.write_atomic(self, name, data)

    def sync_dir(self):
        self.fsyncs += 1
        FileSystem.sync_dir(self)


def _config(journal_dir, port=1883, **journal):
    section = {"dir": journal_dir}
    section.update(journal)
    return validate({"station_id": "bench-1", "meter": {"model": "sdm630", "port": "/dev/null"},
                     "journal": section, "mqtt": {"port": port}})


SESSION_DOC = {
    "event": "end", "session_id": "bench-1-000001", "energy_wh": 36123,
    "ocmf_begin": "OCMF|" + "x" * 600 + "|{}", "ocmf_end": "OCMF|" + "y" * 700 + "|{}",
    "ocmf_documents": ["OCMF|" + "z" * 600 + "|{}", "OCMF|" + "w" * 700 + "|{}"],
}


def bench_durable_append(workdir, count=300):
    """Records/s for durable appends, against raw write+fsync of the same frames."""
    clock = FastClock()
    config = _config(os.path.join(workdir, "append"))
    journal = Journal(FileSystem(config["journal"]["dir"]), config["journal"], clock)
    journal.recover()
    outbox = Outbox(None, "bench-1", journal)
    payload_bytes = len(json.dumps(dict(SESSION_DOC, seq=1, station="bench-1")))
    started = time.perf_counter()
    for _ in range(count):
        outbox.record(SESSION, dict(SESSION_DOC))
    journal_s = time.perf_counter() - started
    journal.close()
    raw_path = os.path.join(workdir, "raw.log")
    frame = b"r" * (payload_bytes + 27)
    fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    started = time.perf_counter()
    for _ in range(count):
        os.write(fd, frame)
        os.fsync(fd)
    raw_s = time.perf_counter() - started
    os.close(fd)
    return {"records": count, "record_bytes": payload_bytes + 27,
            "journal_per_s": round(count / journal_s, 1), "raw_fsync_per_s": round(count / raw_s, 1),
            "ratio": round(raw_s / journal_s, 3)}


def _fill_outage(journal_dir, hours, clock):
    """A journal holding ``hours`` of 10 s aggregates (and an event per hour), broker away."""
    config = _config(journal_dir)
    journal = Journal(FileSystem(journal_dir), config["journal"], clock)
    journal.recover()
    outbox = Outbox(None, "bench-1", journal)
    aggregator = Aggregator(10, 3)
    energy = 5000000
    for second in range(int(hours * 3600)):
        clock.now += 1
        power = 11000.0 + (second % 7) * 10
        energy += 3
        finished = aggregator.add(Reading(clock.now, clock.monotonic_ms(), [230.1, 231.2, 229.8],
                                          [16.0, 16.1, 15.9], [3680.0, 3700.0, 3620.0], power, 50.0,
                                          energy, 122))
        if finished is not None:
            outbox.record(AGGREGATE, finished)
        if second % 3600 == 0:
            outbox.record(EVENT, {"type": "power_drop", "severity": "warning", "values": {"w": power}})
    journal.sync()
    return journal, config


def _replay(journal, broker, config):
    """Seconds for the forwarder to publish the whole journal and get every PUBACK."""
    topics = Topics("evse", "bench-1")
    mqtt = dict(config["mqtt"], port=broker.port, client_id="bench-replay")
    publisher = MqttPublisher(mqtt, topics.status)
    publisher.start()
    publisher.wait_connected(10)
    forwarder = Forwarder(journal, publisher, topics, journal.clock, config["journal"]["window"])
    last = journal.next_seq - 1

    async def run():
        loop = asyncio.get_running_loop()
        publisher.on_activity = lambda: loop.call_soon_threadsafe(forwarder.wake)
        task = asyncio.create_task(forwarder.run())
        started = time.perf_counter()
        while journal.acked < last:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
        forwarder.stop()
        await task
        publisher.on_activity = None
        return elapsed

    try:
        return asyncio.run(run())
    finally:
        publisher.stop()


def _raw_paho(broker, payloads):
    """Seconds for plain paho (default settings) to publish ``payloads`` with QoS 1 and
    collect every PUBACK: what a user would write by hand."""
    import paho.mqtt.client as paho
    client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="bench-raw")
    client.connect(broker.host, broker.port, 30)
    client.loop_start()
    try:
        started = time.perf_counter()
        infos = [client.publish("evse/bench-1/aggregate", payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(60)
        return time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()


def bench_replay(workdir, broker, hours, rounds=3):
    """Replay rate after an outage of ``hours`` against raw paho QoS 1, alternating
    ``rounds`` times on a fresh journal each (medians: a shared machine is noisy)."""
    replay_times, raw_times = [], []
    for number in range(rounds):
        clock = FastClock()
        journal, config = _fill_outage(os.path.join(workdir, "outage-%gh-%d" % (hours, number)), hours, clock)
        records = journal.read_after(0, 1 << 30)
        payloads = [r.payload for r in records]
        sink = Collector(broker.host, broker.port, "evse/bench-1/#", qos=1)
        try:
            raw_times.append(_raw_paho(broker, payloads))
            replay_times.append(_replay(journal, broker, config))
        finally:
            sink.close()
            journal.close()
    count = len(payloads)
    replay_s, raw_s = sorted(replay_times)[rounds // 2], sorted(raw_times)[rounds // 2]
    return {"outage_hours": hours, "records": count, "rounds": rounds,
            "replay_per_s": round(count / replay_s, 1), "raw_paho_qos1_per_s": round(count / raw_s, 1),
            "ratio": round(raw_s / replay_s, 3),
            "replay_per_s_each": [round(count / t, 1) for t in replay_times],
            "raw_per_s_each": [round(count / t, 1) for t in raw_times]}


def bench_flash_wear(workdir):
    """Bytes and fsyncs per hour of telemetry at the default settings, broker acknowledging."""
    clock = FastClock()
    journal_dir = os.path.join(workdir, "wear")
    config = _config(journal_dir)
    fs = CountingFileSystem(journal_dir)
    journal = Journal(fs, config["journal"], clock)
    journal.recover()
    outbox = Outbox(None, "bench-1", journal)
    aggregator = Aggregator(config["journal"]["aggregate_interval_s"], 3)
    start_fsyncs = fs.fsyncs
    for second in range(3600):
        clock.now += 1
        finished = aggregator.add(Reading(clock.now, clock.monotonic_ms(), [230.1, 231.2, 229.8],
                                          [16.0, 16.1, 15.9], [3680.0, 3700.0, 3620.0], 11000.0, 50.0,
                                          5000000 + second * 3, 122))
        if finished is not None:
            seq = outbox.record(AGGREGATE, finished)
            journal.acknowledge(seq)  # a healthy broker acknowledges at once
        journal.tick(clock.monotonic_ms())
    data = journal.bytes_written
    fsyncs = fs.fsyncs - start_fsyncs
    journal.close()
    page = 4096
    return {"records_per_h": journal.next_seq - 1, "data_bytes_per_h": data,
            "cursor_bytes_per_h": fs.atomic_bytes, "fsyncs_per_h": fsyncs,
            "flash_bytes_per_h_estimate": data + fs.atomic_bytes + fsyncs * page,
            "model": "data + cursor files + one 4 KiB page per fsync (ext4/SD or littlefs block)"}


WASM_RUNNER = os.path.join(ROOT, "tools", "testkit", "mpy_run.mjs")


def bench_micropython(workdir):
    """Heap in use by the core scenario's data under MicroPython, and its signing time."""
    from ..cli.mpy_build import compile_core
    from ..testkit import mpy_unix
    node = shutil.which("node")
    if node is None:
        return {"error": "node is not installed"}
    out = os.path.join(workdir, "mpy")
    compiled = compile_core(out)
    figures = {"mpy_files": len(compiled), "mpy_bytes": sum(size for _, size in compiled)}
    scenarios = mpy_unix.SCENARIOS
    stats_file = os.path.join(workdir, "mpy-stats.json")
    for name in ("session", "p256"):
        run = subprocess.run([node, WASM_RUNNER, "--mpy", out, "--stats", stats_file,
                              os.path.join(scenarios, name + "_scenario.py"), "/tmp"],
                             capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            return dict(figures, error="%s scenario failed: %s" % (name, run.stderr[-500:]))
        with open(stats_file) as handle:
            stats = json.load(handle)
        if name == "session":
            heap = stats["harness"]
            figures.update(micropython=stats["micropython"], code_heap_bytes=heap["baseline"],
                           data_peak_bytes=heap["peak"] - heap["baseline"], budget_bytes=64 * 1024,
                           steps=heap["steps"])
        else:
            timing = [line for line in run.stdout.splitlines() if line.startswith("timing sign_ms ")]
            figures["sign_ms"] = int(timing[0].split()[-1]) if timing else None
    return figures


ESP32_HEAP_WORDS = 110 * 1024  # an ESP32-WROOM without PSRAM: about 110 KiB of 4-byte words


def bench_micropython_unix(workdir, quick=False):
    """The unix port at a fixed heap: the smallest heap each scenario completes in (words
    beyond the ROMFS image), the heap in use after loading, and the signing time."""
    from ..testkit import mpy_unix
    try:
        image = mpy_unix.build_image(os.path.join(workdir, "romfs"))
    except (OSError, subprocess.CalledProcessError) as error:
        return {"error": "cannot build the ROMFS image: %s" % error}
    figures = {"image_bytes": os.path.getsize(image), "word_bytes": mpy_unix.WORD_BYTES,
               "goal_words": ESP32_HEAP_WORDS}
    for name in ("session",) if quick else ("session", "lost_end", "console"):
        status, out, errors, stats = mpy_unix.run(image, name, tempfile.mkdtemp(dir=workdir), ESP32_HEAP_WORDS)
        if status != 0:
            return dict(figures, error="%s scenario failed in %d words: %s" % (name, ESP32_HEAP_WORDS,
                                                                               (out + errors)[-500:]))
        figures[name] = {"loaded_words": stats["loaded_words"], "allocated_words": stats["allocated_words"],
                         "smallest_words": mpy_unix.smallest_heap(image, name, workdir, ESP32_HEAP_WORDS)}
    status, out, errors, _ = mpy_unix.run(image, "p256", tempfile.mkdtemp(dir=workdir), ESP32_HEAP_WORDS)
    timing = [line for line in out.splitlines() if line.startswith("timing sign_ms_x100 ")]
    figures["sign_ms"] = int(timing[0].split()[-1]) / 100.0 if timing else None
    figures["cpython"] = _cpython_sign_ms()
    return figures


def bench_micropython_mqtt(broker, count):
    """The port's MQTT client beside paho-mqtt: PUBACK time one at a time, and throughput."""
    from .mqtt import micropython_run, paho_run
    figures = {"count": count}
    try:
        for window in (16, 1):
            figures["window_%d" % window] = {"micropython": micropython_run(broker.port, count, window),
                                              "paho": paho_run(broker.port, count, window)}
    except (RuntimeError, ValueError, IndexError, subprocess.SubprocessError) as error:
        figures["error"] = str(error)
    return figures


def _cpython_sign_ms(count=20):
    """Milliseconds per signature under CPython: the same pure-Python signer, and cryptography."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from evse_agent.ports.micropython import p256
    key = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
    signer = p256.Signer(key)
    started = time.perf_counter()
    for i in range(count):
        signer.sign(b"OCMF payload %d" % i)
    pure = (time.perf_counter() - started) * 1000 / count
    private = ec.derive_private_key(key, ec.SECP256R1())
    started = time.perf_counter()
    for i in range(count):
        private.sign(b"OCMF payload %d" % i, ec.ECDSA(hashes.SHA256()))
    fast = (time.perf_counter() - started) * 1000 / count
    return {"p256_sign_ms": round(pure, 2), "cryptography_sign_ms": round(fast, 3)}


def machine_class():
    """What the figures were measured on: CPU model, cores, memory, Python, kernel."""
    model = memory_kib = None
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
        with open("/proc/meminfo") as handle:
            memory_kib = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(),
            "memory_gib": None if memory_kib is None else round(memory_kib / 1048576, 1),
            "python": sys.version.split()[0], "platform": platform.platform()}


def _row(figure, measured, baseline="", ratio=None):
    return "%-58s %18s %18s %8s" % (figure, measured, baseline, "" if ratio is None else "%.3f" % ratio)


def _latency_rows(latency):
    """Pilot change -> session message rows, beside paho's round trip for reference."""
    rows = []
    if not latency:
        return rows
    rtt1 = latency["paho_rtt_qos1"]
    for label, key in (("debounce off, sample 5 ms", "debounce_off"), ("sim board: debounce 100 ms", "board_defaults")):
        pilot = latency[key]["pilot_to_session"]
        rows.append(_row("pilot -> session message p50 (%s)" % label, "%.2f ms" % pilot["p50_ms"],
                         "ref: paho rtt %.2f" % rtt1["p50_ms"], pilot["p50_ms"] / rtt1["p50_ms"]))
        rows.append(_row("pilot -> session message p99 (%s)" % label, "%.2f ms" % pilot["p99_ms"],
                         "ref: paho rtt %.2f" % rtt1["p99_ms"], pilot["p99_ms"] / rtt1["p99_ms"]))
    return rows


def _ef_rows(ef):
    """State E/F detection delay of the ADC board, against the bound its sampling allows."""
    if not ef:
        return []
    return [_row("state E/F detected, ADC board, p50 / p99 (max)",
                 "%.0f / %.0f (%.0f) ms" % (ef["p50_ms"], ef["p99_ms"], ef["max_ms"]),
                 "bound %d ms" % ef["bound_ms"], ef["p99_ms"] / ef["bound_ms"])]


def _fleet_rows(fleet, scale):
    """The fleet simulation's table and the fleet-at-scale rows."""
    rows = []
    if fleet:
        rows.append("")
        rows.append("fleet simulation (tools/sim/fleet_sim.py, %g s per size):" % fleet[0]["duration_s"])
        rows.append(fleet_table(fleet))
    if scale:
        rows.append("")
        rows.append("fleet at scale (tools/bench/fleet.py; ingest: the backlog of %d replayed stations "
                    "published at %gx speed, drained):" % (scale["ingest_stations"], scale["speed"]))
        rows.extend(bench_fleet.fleet_rows(scale, _row))
    return rows


def _table(results):
    machine, run = results["machine"], results.get("run", {})
    lines = ["machine: %s, %s cores, %s GiB, Python %s; run started %s%s"
             % (machine.get("cpu_model"), machine.get("cpus"), machine.get("memory_gib"), machine.get("python"),
                run.get("started_utc"), " (--quick)" if run.get("quick") else ""),
             _row("figure", "measured", "baseline") + "   ratio"]
    for plan in results.get("modbus_requests") or ():
        lines.append(_row("%s requests / bytes per poll cycle, naive reader" % plan["model"],
                          "%g / %g B" % (plan["requests"], plan["bytes"]),
                          "%g / %g B" % (plan["naive_requests"], plan["naive_bytes"]),
                          plan["bytes"] / plan["naive_bytes"]))
        lines.append(_row("  against the bytes the map needs (minimal reads)", "",
                          "%d / %d B" % (plan["minimal_requests"], plan["minimal_bytes"]),
                          plan["bytes"] / plan["minimal_bytes"]))
    for cycle in results.get("poll_cycle") or ():
        lines.append(_row("%s poll cycle at %d baud (median), pymodbus" % (cycle["model"], cycle["baudrate"]),
                          "%.1f ms" % cycle["cycle_ms_median"], "%.1f ms" % cycle["pymodbus_ms_median"],
                          cycle["ratio_to_pymodbus"]))
        lines.append(_row("  against the line's floor (wire, silences, turnaround)", "",
                          "floor %.1f ms" % cycle["floor_ms"], cycle["ratio_to_floor"]))
    for cycle in results.get("poll_cycle_micropython") or ():
        if "error" in cycle:
            lines.append(_row("MicroPython unix poll cycle", cycle["error"][:60]))
            continue
        lines.append(_row("MicroPython unix: %s poll cycle at %d baud (median)" % (cycle["model"], cycle["baudrate"]),
                          "%.1f ms" % cycle["cycle_ms_median"], "wire %.1f ms" % cycle["wire_ms"], cycle["ratio"]))
        if "cpython_ms_median" in cycle:
            lines.append(_row("  p95 %.1f ms; against CPython, same run" % cycle["cycle_ms_p95"], "",
                              "CPython %.1f ms" % cycle["cpython_ms_median"],
                              cycle["cycle_ms_median"] / cycle["cpython_ms_median"]))
    lines.extend(_latency_rows(results.get("latency")))
    side = results.get("side_by_side")
    if side:
        lines.extend(side_by_side_rows(side, _row))
    append = results.get("durable_append")
    if append:
        lines.append(_row("journal durable append (%d B records)" % append["record_bytes"],
                          "%.1f/s" % append["journal_per_s"], "%.1f/s" % append["raw_fsync_per_s"], append["ratio"]))
    for replay in results.get("replay") or ():
        lines.append(_row("replay after %gh outage (%d records)" % (replay["outage_hours"], replay["records"]),
                          "%.1f/s" % replay["replay_per_s"], "%.1f/s" % replay["raw_paho_qos1_per_s"],
                          replay["ratio"]))
    cpu = results.get("cpu")
    if cpu:
        base = cpu["handwritten"]
        lines.append(_row("CPU s per 1000 poll cycles at 1 Hz, agent, car charging",
                          "%.2f s" % cpu["agent"]["cpu_s_per_1000_cycles"],
                          "%.2f s" % base["cpu_s_per_1000_cycles"], cpu["agent"]["cpu_ratio"]))
        lines.append(_row("resident memory, agent", "%d KiB" % cpu["agent"]["rss_kib"],
                          "%d KiB" % base["rss_kib"], cpu["agent"]["rss_ratio"]))
        lines.append(_row("  machine busy beside them (sims, broker, other work)",
                          "%.0f %% of its cores" % (100 * cpu["machine_busy_beside"])))
    if results.get("monitoring"):
        lines.extend(monitoring_rows(results["monitoring"], _row))
    lines.extend(_ef_rows(results.get("ef_detection")))
    wear = results.get("flash_wear")
    if wear:
        lines.append(_row("journal data written per hour", "%d B" % wear["data_bytes_per_h"]))
        lines.append(_row("fsyncs per hour", "%d" % wear["fsyncs_per_h"]))
        lines.append(_row("flash bytes per hour (estimate)", "%d B" % wear["flash_bytes_per_h_estimate"]))
    unix = results.get("micropython_unix") or {}
    if "session" in unix:
        goal = "%d words (ESP32 without PSRAM)" % unix["goal_words"]
        for name in ("session", "lost_end", "console"):
            if name in unix:
                lines.append(_row("MicroPython unix: smallest heap, %s scenario" % name,
                                  "%d words" % unix[name]["smallest_words"], goal,
                                  unix[name]["smallest_words"] / unix["goal_words"]))
        lines.append(_row("MicroPython unix: heap after loading the code (session)",
                          "%d words" % unix["session"]["loaded_words"], goal,
                          unix["session"]["loaded_words"] / unix["goal_words"]))
        lines.append(_row("ROMFS image of the core + port (flash)", "%d B" % unix["image_bytes"]))
        if unix.get("sign_ms") is not None:
            cpython = unix["cpython"]
            lines.append(_row("P-256 sign, MicroPython unix (pure Python)", "%.2f ms" % unix["sign_ms"],
                              "%.2f ms CPython, same code" % cpython["p256_sign_ms"],
                              unix["sign_ms"] / cpython["p256_sign_ms"] if cpython["p256_sign_ms"] else None))
            lines.append(_row("P-256 sign, CPython cryptography", "%.3f ms" % cpython["cryptography_sign_ms"]))
    elif unix:
        lines.append(_row("MicroPython unix port", unix.get("error", "")))
    mqtt = results.get("micropython_mqtt") or {}
    if "window_1" in mqtt:
        one, many = mqtt["window_1"], mqtt["window_16"]
        lines.append(_row("MicroPython MQTT: publish -> PUBACK p50, one at a time",
                          "%.2f ms" % (one["micropython"]["ack_us_p50"] / 1000),
                          "%.2f ms paho" % (one["paho"]["ack_us_p50"] / 1000),
                          one["micropython"]["ack_us_p50"] / one["paho"]["ack_us_p50"]))
        lines.append(_row("MicroPython MQTT: QoS 1 msg/s, 16 in flight", "%.0f" % many["micropython"]["msg_per_s"],
                          "%.0f paho" % many["paho"]["msg_per_s"],
                          many["micropython"]["msg_per_s"] / many["paho"]["msg_per_s"]))
    elif mqtt:
        lines.append(_row("MicroPython MQTT client", mqtt.get("error", "")))
    micro = results.get("micropython") or {}
    if "data_peak_bytes" in micro:
        lines.append(_row("MicroPython heap peak, session data (mem_alloc)", "%d B" % micro["data_peak_bytes"],
                          "%d B" % micro["budget_bytes"], micro["data_peak_bytes"] / micro["budget_bytes"]))
    elif micro:
        lines.append(_row("MicroPython heap peak", micro.get("error", "")))
    lines.extend(_fleet_rows(results.get("fleet"), results.get("fleet_scale")))
    return "\n".join(lines)


SECTIONS = ("poll", "journal", "inputs", "latency", "side", "cpu", "monitoring", "mqtt", "micropython", "fleet")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--quick", action="store_true",
                        help="shorter windows and a fleet of 10 and 100 only (rougher figures)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help="comma-separated sections to run (default: all): " + ", ".join(SECTIONS))
    parser.add_argument("--full-fleet", action="store_true",
                        help="the fleet-at-scale run with 10,000 stations for 120 s into a group of 2 "
                             "collectors (default 5,000 for 60 s into one)")
    args = parser.parse_args(argv)
    log.set_sink(lambda level, text: None, log.ERROR)
    cpu_window = 20.0 if args.quick else 60.0
    fleet_sizes = (10, 100) if args.quick else (10, 100, 500)
    wanted = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = wanted - set(SECTIONS)
    if unknown:
        parser.error("unknown section(s) %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(SECTIONS)))
    workdir = tempfile.mkdtemp(prefix="evse-bench-")
    results = {"machine": machine_class(), "run": {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                   "quick": args.quick, "sections": [s for s in SECTIONS if s in wanted]}}
    try:
        if "poll" in wanted:
            results["poll_cycle"] = cycle_time_figures()
            results["modbus_requests"] = request_figures(results["poll_cycle"])
            try:
                results["poll_cycle_micropython"] = micropython_cycle_figures(results["poll_cycle"])
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                results["poll_cycle_micropython"] = [{"error": str(error)}]
        if "journal" in wanted:
            results["durable_append"] = bench_durable_append(workdir)
        if "inputs" in wanted:
            results["ef_detection"] = ef_detection_figures()
        if wanted & {"latency", "journal", "side", "cpu", "monitoring", "mqtt"}:
            with Mosquitto() as broker:
                if "latency" in wanted:
                    results["latency"] = latency_figures(broker, workdir, plugs=50 if args.quick else 150)
                if "journal" in wanted:
                    results["replay"] = [bench_replay(workdir, broker, 1), bench_replay(workdir, broker, 24)]
                if "side" in wanted:
                    results["side_by_side"] = side_by_side(broker, os.path.join(workdir, "side"), window_s=cpu_window)
                if "cpu" in wanted:
                    results["cpu"] = cpu_figures(broker, os.path.join(workdir, "cpu"), window_s=cpu_window)
                if "monitoring" in wanted:
                    results["monitoring"] = monitoring_figures(broker, workdir, quick=args.quick)
                if "mqtt" in wanted:
                    results["micropython_mqtt"] = bench_micropython_mqtt(broker, 500 if args.quick else 2000)
        if "journal" in wanted:
            results["flash_wear"] = bench_flash_wear(workdir)
        if "micropython" in wanted:
            results["micropython"] = bench_micropython(workdir)
            results["micropython_unix"] = bench_micropython_unix(workdir, args.quick)
        if "fleet" in wanted:
            results["fleet"] = run_fleets(fleet_sizes, 20.0, workdir)
            results["fleet_scale"] = bench_fleet.run(
                1000, *(bench_fleet.FULL_FLEET_RUN if args.full_fleet else bench_fleet.FLEET_RUN), workdir=workdir)
    except BaseException:
        results["run"]["failed"] = traceback.format_exc()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        # written before the table, and when a section failed: the figures measured are kept
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    print(_table(results))
    print("results written to %s" % os.path.relpath(args.output, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
