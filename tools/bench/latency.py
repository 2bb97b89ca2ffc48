"""Latency figures for ``make bench``: from the charge point to a subscriber on a real broker.

- pilot change -> session message: the pin file changes (a vehicle plugs in) and the
  session ``start`` record (journaled, fsync'ed, then forwarded with QoS 1) reaches a
  subscriber on a real mosquitto; measured with the sim board's debounce (100 ms, by
  design: a pilot must hold its level before it counts) and with debounce off, which
  leaves the sampling period and the agent's own path;
- telemetry sample -> subscriber: from the moment a poll's reading is complete (its ``ts``,
  millisecond resolution) to its arrival at the subscriber;
- baseline for both: the round trip of a bare paho publish -> subscribe on the same broker,
  QoS 1 (as session records) and QoS 0 (as telemetry), measured in the same run.

The agent runs as its own process (``evse-agent`` on ``boards/sim.json``) against the
simulated meter; the bench process writes the pin file and subscribes.
"""

import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho

from ..sim.meter_sim import MeterSimulator
from ..sim.vehicle_sim import VehicleSim

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM_BOARD = os.path.join(ROOT, "boards", "sim.json")


def percentiles(values_ms):
    """p50 / p99 / max of a list of milliseconds, rounded to 0.01 ms."""
    ordered = sorted(values_ms)
    if not ordered:
        return {"samples": 0}

    def at(fraction):
        return round(ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))], 2)

    return {"samples": len(ordered), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1], 2)}


class Arrivals:
    """A paho subscriber that notes when each message arrives (monotonic and wall clock)."""

    def __init__(self, broker, topic, qos=1, client_id=None):
        self.messages = []
        self.changed = threading.Condition()
        self.client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or "bench-arrivals-%d" % os.getpid())
        subscribed = threading.Event()
        self.client.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topic, qos)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("subscriber could not subscribe to %s" % topic)

    def _on_message(self, client, userdata, message):
        with self.changed:
            self.messages.append((message.topic, time.perf_counter(), time.time(), message.payload))
            self.changed.notify_all()

    def wait_for(self, predicate, start_index, timeout_s=10):
        """The first message from ``start_index`` on for which ``predicate(topic, doc)`` holds."""
        deadline = time.monotonic() + timeout_s
        index = start_index
        with self.changed:
            while True:
                while index < len(self.messages):
                    topic, mono, wall, payload = self.messages[index]
                    index += 1
                    try:
                        doc = json.loads(payload)
                    except ValueError:
                        continue
                    if predicate(topic, doc):
                        return mono, wall, doc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no matching message within %s s" % timeout_s)
                self.changed.wait(remaining)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def paho_round_trip(broker, qos, samples=300, payload_bytes=400):
    """p50/p99 of a bare paho publish -> subscribe round trip (one process, two clients)."""
    topic = "bench/rtt/%d" % qos
    sink = Arrivals(broker, topic, qos, client_id="bench-rtt-sub-%d" % qos)
    source = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="bench-rtt-pub-%d" % qos)
    source.connect(broker.host, broker.port, 30)
    source.loop_start()
    padding = "x" * payload_bytes
    try:
        values = []
        for number in range(samples):
            start_index = len(sink.messages)
            sent = time.perf_counter()
            source.publish(topic, json.dumps({"n": number, "pad": padding}), qos)
            arrived, _, _ = sink.wait_for(lambda t, doc, n=number: doc.get("n") == n, start_index)
            values.append((arrived - sent) * 1000)
            time.sleep(0.005)
        return percentiles(values)
    finally:
        source.disconnect()
        source.loop_stop()
        sink.close()


def agent_command(device, broker, workdir, overrides=(), duration_s=None):
    """``evse-agent`` on the sim board against ``device`` and ``broker``, its state, key,
    pin file and journal under ``workdir``, no console, plus ``overrides`` (k=v)."""
    args = [sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", SIM_BOARD, "--quiet",
            "--set", "meter.port=" + device, "--set", "mqtt.port=%d" % broker.port,
            "--set", "session.state_dir=" + os.path.join(workdir, "state"),
            "--set", "signing.key_file=" + os.path.join(workdir, "station-key.pem"),
            "--set", "io.sim_file=" + os.path.join(workdir, "pins.json"),
            "--set", "journal.dir=" + os.path.join(workdir, "journal"),
            "--set", "console.port=null"]
    if duration_s is not None:
        args += ["--duration", str(duration_s)]
    for override in overrides:
        args += ["--set", override]
    return args


def _iso_to_epoch(text):
    """Epoch seconds of the agent's ``YYYY-MM-DDTHH:MM:SS.mmmZ`` timestamps."""
    import calendar
    whole, fraction = text.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(fraction) / 1000.0


def agent_latencies(broker, workdir, label, overrides, plugs=100, telemetry_s=20):
    """Pilot -> session start latency over ``plugs`` plug-ins, then telemetry -> subscriber
    latency over ``telemetry_s`` seconds, of one agent process."""
    os.makedirs(workdir, exist_ok=True)
    sim = MeterSimulator("sdm630", pin_file=os.path.join(workdir, "pins.json"))
    device = sim.start()
    vehicle = VehicleSim(os.path.join(workdir, "pins.json"))  # writes state A: no vehicle
    sink = Arrivals(broker, "evse/sim-001/#", 1, client_id="bench-latency-" + label)
    agent = subprocess.Popen(agent_command(device, broker, workdir, overrides), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sink.wait_for(lambda topic, doc: topic.endswith("/telemetry"), 0, timeout_s=20)
        pilot = []
        for _ in range(plugs):
            start_index = len(sink.messages)
            changed = time.perf_counter()
            vehicle.plug()
            arrived, _, doc = sink.wait_for(
                lambda topic, doc: topic.endswith("/session") and doc.get("event") == "start", start_index)
            pilot.append((arrived - changed) * 1000)
            start_index = len(sink.messages)
            vehicle.unplug()
            sink.wait_for(lambda topic, doc: topic.endswith("/session") and doc.get("event") == "end",
                          start_index)
        telemetry_from = len(sink.messages)
        time.sleep(telemetry_s)  # telemetry every 0.1 s with nothing else going on
        telemetry = []
        for topic, _, wall, payload in list(sink.messages)[telemetry_from:]:
            if topic.endswith("/telemetry"):
                telemetry.append((wall - _iso_to_epoch(json.loads(payload)["ts"])) * 1000)
        return {"pilot_to_session": percentiles(pilot), "telemetry_to_subscriber": percentiles(telemetry),
                "settings": overrides}
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        stderr = agent.stderr.read().decode(errors="replace")
        agent.stderr.close()
        sink.close()
        sim.stop()
        if agent.returncode not in (0, -15):
            raise RuntimeError("agent exited with %s: %s" % (agent.returncode, stderr[-800:]))


def latency_figures(broker, workdir, plugs=100):
    """The pilot and telemetry latencies with their paho baselines."""
    fast = ["io.pilot.debounce_ms=0", "io.pilot.sample_ms=5", "meter.poll_interval_s=0.1",
            "mqtt.telemetry_interval_s=0.1"]
    return {
        "paho_rtt_qos1": paho_round_trip(broker, 1),
        "paho_rtt_qos0": paho_round_trip(broker, 0),
        "debounce_off": agent_latencies(broker, os.path.join(workdir, "lat-fast"), "fast", fast, plugs),
        "board_defaults": agent_latencies(broker, os.path.join(workdir, "lat-default"), "default",
                                          ["meter.poll_interval_s=0.1", "mqtt.telemetry_interval_s=0.1"],
                                          max(10, plugs // 4), telemetry_s=0),
    }
