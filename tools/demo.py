"""``make demo``: the agent's main job on the simulator board, with a broker you can watch.

Starts a private mosquitto on a free loopback port, the SDM630 simulator on a pty
(linked at ``run/meter.pty``, where ``boards/sim.json`` looks for it), a subscriber that
prints what the broker delivers, and ``evse-agent --board boards/sim.json``. The
simulated car idles, ramps up to 16 A per phase and steps its load; halfway through,
the meter stops answering for a few seconds so you can watch the agent report it and
recover. At the end the agent shuts down cleanly and the broker says ``offline``.
"""

import argparse
import logging
import os
import subprocess
import sys
import threading
import time

from .broker import Mosquitto
from .meter_sim import MeterSimulator
from .subscriber import Collector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOARD = os.path.join(ROOT, "boards", "sim.json")
LINK = os.path.join(ROOT, "run", "meter.pty")

_print_lock = threading.Lock()


def say(prefix, text):
    with _print_lock:
        sys.stdout.write("%-7s %s\n" % (prefix, text))
        sys.stdout.flush()


def describe(message):
    """One line per received MQTT message."""
    body = message.body
    kind = message.topic.rsplit("/", 1)[-1]
    if body is None:
        return "%s  %s%s" % (message.topic, message.text, "  (retained)" if message.retain else "")
    if kind == "telemetry":
        return "%s  seq %d  %.0f W  %d Wh" % (message.topic, body["seq"], body["power_total_w"] or 0,
                                               body["energy_wh"] or 0)
    if kind == "meter":
        state = "online" if body["online"] else "OFFLINE"
        error = "" if body["online"] or not body["last_error"] else "  last error: %s" % body["last_error"]
        return "%s  seq %d  meter %s (serial %s)%s" % (message.topic, body["seq"], state, body["serial"] or "-", error)
    return "%s  %s" % (message.topic, message.text[:100])


def _pump(stream, prefix):
    for line in stream:
        say(prefix, line.rstrip("\n"))


def run(seconds):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    with Mosquitto() as broker:
        say("[demo]", "mosquitto listening on %s:%d" % (broker.host, broker.port))
        sim = MeterSimulator("sdm630", profile="charging", link_path=LINK)
        device = sim.start()
        say("[demo]", "meter simulator (Eastron SDM630, unit 1) on %s, linked at %s"
            % (device, os.path.relpath(LINK, ROOT)))
        collector = Collector(broker.host, broker.port, "evse/#",
                              on_message=lambda m: say("[mqtt]", describe(m)))
        say("[demo]", "subscribed to evse/# ; starting evse-agent --board boards/sim.json")
        agent = subprocess.Popen(
            [sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", BOARD,
             "--set", "mqtt.port=%d" % broker.port],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(agent.stdout, "[agent]"), daemon=True)
        pump.start()
        fault_at = seconds * 0.4
        fault_for = max(4.0, min(6.0, seconds * 0.2))  # long enough to be declared offline
        started = time.monotonic()
        fault_on = fault_done = False
        try:
            while time.monotonic() - started < seconds:
                if agent.poll() is not None:
                    say("[demo]", "evse-agent exited early with code %s" % agent.returncode)
                    return 1
                elapsed = time.monotonic() - started
                if not fault_on and elapsed >= fault_at:
                    say("[demo]", ">>> the meter stops answering (simulated wiring fault)")
                    sim.set_fault("silent")
                    fault_on = True
                elif fault_on and not fault_done and elapsed >= fault_at + fault_for:
                    say("[demo]", ">>> the meter answers again")
                    sim.set_fault(None)
                    fault_done = True
                time.sleep(0.1)
            say("[demo]", "stopping evse-agent (SIGTERM)")
            agent.terminate()
            code = agent.wait(15)
            pump.join(5)
            time.sleep(0.5)  # let the last status message arrive
        finally:
            if agent.poll() is None:
                agent.kill()
            collector.close()
            sim.stop()
        return _summary(collector, code)


def _summary(collector, agent_code):
    telemetry = [m.body for m in collector.on("telemetry")]
    seqs = sorted(m.body["seq"] for m in collector.messages if m.body and "seq" in m.body)
    gaps = [b for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    statuses = [m.text for m in collector.on("status")]
    say("[demo]", "--- summary ---")
    say("[demo]", "agent exit code %s; messages received: %d (telemetry %d, meter status %d, status %s)"
        % (agent_code, len(collector.messages), len(telemetry), len(collector.on("meter")),
           " -> ".join(statuses)))
    if seqs:
        say("[demo]", "sequence numbers %d..%d, gaps: %s" % (seqs[0], seqs[-1], gaps or "none"))
    if len(telemetry) >= 2:
        say("[demo]", "energy imported during the demo: %d Wh (register %d -> %d Wh)"
            % (telemetry[-1]["energy_wh"] - telemetry[0]["energy_wh"], telemetry[0]["energy_wh"],
               telemetry[-1]["energy_wh"]))
    ok = agent_code == 0 and telemetry and statuses and statuses[-1] == "offline" and not gaps
    say("[demo]", "demo %s" % ("finished" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", 30)),
                        help="how long the scenario runs (default 30)")
    args = parser.parse_args(argv)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    try:
        return run(args.seconds)
    except RuntimeError as error:
        say("[demo]", "error: %s" % error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
