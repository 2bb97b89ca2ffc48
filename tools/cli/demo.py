"""``make demo``: the agent's main job on the simulator board, with a broker you can watch.

Starts a private mosquitto on a free loopback port, the SDM630 simulator on a pty
(linked at ``run/meter.pty``, where ``boards/sim.json`` looks for it), the vehicle
simulator on the sim pin file, a subscriber that prints what the broker delivers, and
``evse-agent --board boards/sim.json``. A car plugs in, charges at 16 A per phase, the
meter stops answering for a few seconds (watch the agent report it and recover), the car
finishes and is unplugged. The session record's OCMF documents are verified with the
station's public key. At the end the agent shuts down cleanly and the broker says
``offline``.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

from ..testkit.broker import Mosquitto
from ..sim.meter_sim import MeterSimulator
from .ocmf_verify import Document, Invalid, load_public_key
from ..testkit.subscriber import Collector
from ..sim.vehicle_sim import VehicleSim

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOARD = os.path.join(ROOT, "boards", "sim.json")
LINK = os.path.join(ROOT, "run", "meter.pty")
STATION_DIR = os.path.join(ROOT, "run", "demo")  # state, key and pin file of the demo station

_print_lock = threading.Lock()


def say(prefix, text):
    with _print_lock:
        sys.stdout.write("%-7s %s\n" % (prefix, text))
        sys.stdout.flush()


def describe(message):
    """One line per received MQTT message: journaled records show their ``seq``."""
    body = message.body
    kind = message.topic.rsplit("/", 1)[-1]
    if body is not None:
        body = dict(body)
        body.setdefault("seq", body.get("journal_seq"))
    if body is None:
        return "%s  %s%s" % (message.topic, message.text, "  (retained)" if message.retain else "")
    if kind == "telemetry":
        return "%s  %.0f W  %d Wh" % (message.topic, body["power_total_w"] or 0, body["energy_wh"] or 0)
    if kind == "aggregate":
        power = body.get("power_total_w") or {}
        return "%s  #%d  %s..%s  P min/avg/max %s/%s/%s W" % (
            message.topic, body["seq"], (body.get("start") or "")[11:19], (body.get("end") or "")[11:19],
            power.get("min"), power.get("avg"), power.get("max"))
    if kind == "session":
        energy = "" if body["energy_wh"] is None else "  %d Wh" % body["energy_wh"]
        begin = "" if not body["begin"] else "  begin register %d Wh" % body["begin"]["energy_wh"]
        return "%s  #%d  %s %s%s%s  %s" % (message.topic, body["seq"], body["event"].upper(),
                                            body["session_id"], begin if body["event"] == "begin" else "",
                                            energy, ("flags %s" % body["flags"]) if body["flags"] else "")
    if kind == "state":
        return "%s  pilot %s  %s A  contactor %s  session %s" % (
            message.topic, body["pilot"], body["advertised_a"],
            "closed" if body["contactor_feedback"] else "open", body["session_id"] or "-")
    if kind == "event":
        return "%s  #%d  %s %s %s" % (message.topic, body["seq"], body["severity"].upper(), body["type"],
                                         body["state"])
    if kind == "meter":
        state = "online" if body["online"] else "OFFLINE"
        error = "" if body["online"] or not body["last_error"] else "  last error: %s" % body["last_error"]
        return "%s  meter %s (serial %s)%s" % (message.topic, state, body["serial"] or "-", error)
    return "%s  %s" % (message.topic, message.text[:100])


def _pump(stream, prefix):
    for line in stream:
        say(prefix, line.rstrip("\n"))


def _agent_command(broker):
    return [sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", BOARD,
            "--set", "mqtt.port=%d" % broker.port,
            "--set", "session.state_dir=%s" % os.path.join(STATION_DIR, "state"),
            "--set", "signing.key_file=%s" % os.path.join(STATION_DIR, "station-key.pem"),
            "--set", "io.sim_file=%s" % os.path.join(STATION_DIR, "pins.json"),
            "--set", "journal.dir=%s" % os.path.join(STATION_DIR, "journal")]


def _script(seconds):
    """(time, label, action) steps of the scenario, scaled to ``seconds``."""
    at = lambda fraction: seconds * fraction  # noqa: E731 - a tiny local scale
    return [
        (at(0.10), "the car is plugged in", lambda sim, car: car.plug()),
        (at(0.18), "the car asks for charge; the EVSE closes the contactor", lambda sim, car: car.charge()),
        (at(0.40), "the meter stops answering (simulated wiring fault)", lambda sim, car: sim.set_fault("silent")),
        (at(0.40) + max(4.0, seconds * 0.15), "the meter answers again", lambda sim, car: sim.set_fault(None)),
        (at(0.78), "the car is full and stops charging", lambda sim, car: car.pause()),
        (at(0.86), "the car is unplugged", lambda sim, car: car.unplug()),
    ]


def run(seconds):
    shutil.rmtree(STATION_DIR, ignore_errors=True)
    os.makedirs(STATION_DIR)
    pin_file = os.path.join(STATION_DIR, "pins.json")
    car = VehicleSim(pin_file, advertised_a=16.0)
    with Mosquitto() as broker:
        say("[demo]", "mosquitto listening on %s:%d" % (broker.host, broker.port))
        sim = MeterSimulator("sdm630", link_path=LINK, pin_file=pin_file)
        device = sim.start()
        say("[demo]", "meter simulator (Eastron SDM630, unit 1) on %s, linked at %s"
            % (device, os.path.relpath(LINK, ROOT)))
        collector = Collector(broker.host, broker.port, "evse/#",
                              on_message=lambda m: say("[mqtt]", describe(m)))
        say("[demo]", "subscribed to evse/# ; starting evse-agent --board boards/sim.json")
        agent = subprocess.Popen(_agent_command(broker), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(agent.stdout, "[agent]"), daemon=True)
        pump.start()
        steps = _script(seconds)
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                if agent.poll() is not None:
                    say("[demo]", "evse-agent exited early with code %s" % agent.returncode)
                    return 1
                elapsed = time.monotonic() - started
                while steps and elapsed >= steps[0][0]:
                    _, label, action = steps.pop(0)
                    say("[demo]", ">>> " + label)
                    action(sim, car)
                time.sleep(0.05)
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
        key = subprocess.run(_agent_command(broker) + ["--public-key"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        return _summary(collector, code, key)


def _verify_session(end, key_hex):
    """Verify every OCMF document of the session record with the station's public key."""
    key = load_public_key(key_hex)
    for text in end["ocmf_documents"]:
        try:
            Document(text).verify(key)
        except Invalid as error:
            say("[demo]", "OCMF document does NOT verify: %s" % error)
            return False
    return True


def _summary(collector, agent_code, key_hex):
    telemetry = [m.body for m in collector.on("telemetry")]
    seqs = sorted(set(m.body["seq"] for m in collector.messages if m.body and "seq" in m.body))
    gaps = [b for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    statuses = [m.text for m in collector.on("status")]
    say("[demo]", "--- summary ---")
    say("[demo]", "agent exit code %s; messages received: %d (telemetry %d, meter status %d, status %s)"
        % (agent_code, len(collector.messages), len(telemetry), len(collector.on("meter")),
           " -> ".join(statuses)))
    if seqs:
        say("[demo]", "journaled records #%d..#%d received, gaps: %s" % (seqs[0], seqs[-1], gaps or "none"))
    if len(telemetry) >= 2:
        say("[demo]", "energy imported during the demo: %d Wh (register %d -> %d Wh)"
            % (telemetry[-1]["energy_wh"] - telemetry[0]["energy_wh"], telemetry[0]["energy_wh"],
               telemetry[-1]["energy_wh"]))
    ends = [m.body for m in collector.on("session") if m.body["event"] == "end"]
    verified = False
    if ends:
        end = ends[-1]
        say("[demo]", "session %s: %d Wh billed (register %d -> %d Wh), plugged %.1f s, charging %.1f s, "
            "max %.0f W, flags %s" % (end["session_id"], end["energy_wh"], end["begin"]["energy_wh"],
                                      end["end"]["energy_wh"], end["plugged_s"], end["charging_s"],
                                      end["max_power_w"] or 0, end["flags"] or "none"))
        verified = _verify_session(end, key_hex)
        say("[demo]", "%d OCMF documents %s with the station's public key %s..."
            % (len(end["ocmf_documents"]), "verify" if verified else "FAIL", key_hex[:24]))
    else:
        say("[demo]", "no session ended")
    ok = (agent_code == 0 and telemetry and statuses and statuses[-1] == "offline" and not gaps
          and verified)
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
