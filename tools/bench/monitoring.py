"""Monitoring quality: false power events at ordinary stops and starts, missed true drops,
detection delay, and telemetry messages per reading.

Two parts:

- ``run_core(plan)``: the portable core on a fast clock -- the real ``pilot.InputMonitor``
  (debounce) and ``events.PowerMonitor`` -- against a simulated charge point: the pilot and
  the contactor command change together, the contactor feedback follows after a delay, the
  car's current flows only while the feedback is closed. The meter is polled at its interval
  from a random phase; each poll takes a random time and samples the power somewhere inside
  it; input samples come every ``sample_ms`` with jitter. A *true drop* is the car's current
  falling (to 10-40 %) while the pilot still says C and the contactor stays closed; it is
  injected at a random time once charging has settled and lasts until the stop. Every power
  event is classified: raised at or after the drop of its charging period = true, any other
  ``power_drop`` / ``power_fluctuation`` = false. The baseline is the seed's rule run on the
  same readings: each reading judged at once against the inputs accepted when it arrives.
- ``run_end_to_end(...)``: the agent as a process with the meter simulator on a pty
  (following the vehicle simulator's pin file), the vehicle simulator and mosquitto; random
  stops, starts and drops at random phases; counts events, readings and telemetry messages.

``python -m evse_tools.bench.monitoring [--stops N]`` prints the figures; ``make bench``
includes them.
"""

import argparse
import heapq
import json
import os
import random
import sys
import tempfile
import time

from evse_agent.config import validate
from evse_agent.events import PowerMonitor
from evse_agent.pilot import InputMonitor, PinSample, duty_from_current
from evse_agent.reading import Reading

POWER_EVENTS = ("power_drop", "power_fluctuation")
VOLTS = 230.0


class FastClock:
    """Monotonic ms and wall seconds that the simulation moves."""

    def __init__(self):
        self.mono = 1_000_000
        self.epoch = 1_790_000_000.0

    def monotonic_ms(self):
        return self.mono

    def time(self):
        return self.epoch + self.mono / 1000.0


class World:
    """The charge point's physical state, changed by the plan's timeline."""

    def __init__(self, advertised_a):
        self.pilot_v = 9.0
        self.duty = round(duty_from_current(advertised_a), 2)
        self.command = False
        self.feedback = False
        self.draw_a = advertised_a
        self.advertised_a = advertised_a
        self.sample = PinSample()

    def read(self):
        sample = self.sample
        sample.pilot_volts = self.pilot_v
        sample.duty_pct = self.duty
        sample.contactor_command = self.command
        sample.contactor_feedback = self.feedback
        return sample

    def amps(self):
        return self.draw_a if self.feedback else 0.0


class Listener:
    """The agent's ``on_inputs`` wiring: to the power monitor, and noted for the baseline."""

    def __init__(self):
        self.monitor = None
        self.state = None

    def on_inputs(self, state, now_ms):
        self.state = state
        self.monitor.on_inputs(state, now_ms)


class Baseline:
    """The seed's rule: each reading judged when it arrives, against the inputs accepted then."""

    def __init__(self, drop_pct, fluctuation_pct, window_ms):
        self.drop = drop_pct / 100.0
        self.fluctuation = fluctuation_pct
        self.window_ms = window_ms
        self.last = None
        self.window = []
        self.fluctuating = False
        self.raised = []  # (mono_ms, type)

    def on_inputs(self, charging):
        if not charging:
            self.last = None
            self.window = []
            self.fluctuating = False

    def on_reading(self, charging, power, now_ms):
        if not charging:
            return
        if self.last is not None and self.last > 0 and power < self.last * (1 - self.drop):
            self.raised.append((now_ms, "power_drop"))
        self.last = power
        self.window.append((now_ms, power))
        self.window = [(t, p) for t, p in self.window if t >= now_ms - self.window_ms]
        if len(self.window) >= 3:
            high = max(p for _, p in self.window)
            low = min(p for _, p in self.window)
            swing = 100.0 * (high - low) / high if high > 0 else 0.0
            if swing > self.fluctuation and not self.fluctuating:
                self.raised.append((now_ms, "power_fluctuation"))
            self.fluctuating = swing > self.fluctuation


def random_plan(rng, stops, poll_ms=None, sample_ms=None, debounce_ms=None, drop_share=0.5):
    """A timeline of ``stops`` charging periods with random phases and delays (all ms).

    Each period: the car asks (pilot C and contactor command together), the feedback follows
    after 0-100 ms; with probability ``drop_share`` a drop at a random time after settling;
    then the car stops (pilot B and command open together), the feedback opens 0-100 ms later;
    a pause of 1-6 s. The poll, sampling and debounce settings are drawn unless given."""
    poll_ms = poll_ms or rng.choice((500, 1000, 1000, 1000, 2000))
    sample_ms = sample_ms or rng.choice((10, 20, 20, 50))
    debounce_ms = debounce_ms if debounce_ms is not None else rng.choice((0, 50, 100, 100, 200))
    periods = []
    t = 1000 + rng.randrange(poll_ms)
    for _ in range(stops):
        start = t
        contactor = rng.randrange(0, 101)
        settle = start + contactor + debounce_ms + 2 * sample_ms + 500
        drop_at = None
        if rng.random() < drop_share:
            drop_at = settle + 2 * poll_ms + rng.randrange(poll_ms)
            length = drop_at - start + 3 * poll_ms + debounce_ms + rng.randrange(4000)
        else:
            length = rng.randrange(1000, 8000)
        stop = start + length
        periods.append({"start": start, "contactor_on": contactor, "drop_at": drop_at,
                        "drop_to": rng.uniform(0.1, 0.4), "stop": stop,
                        "contactor_off": rng.randrange(0, 101)})
        t = stop + rng.randrange(1000, 6000)
    return {"poll_ms": poll_ms, "poll_phase_ms": rng.randrange(poll_ms),
            "poll_busy_ms": (rng.randrange(40, min(400, poll_ms // 2))),
            "sample_ms": sample_ms, "debounce_ms": debounce_ms, "jitter_ms": rng.choice((0, 2, 5)),
            "advertised_a": rng.choice((10.0, 16.0, 32.0)), "periods": periods, "end": t + 2000,
            "seed": rng.randrange(1 << 30)}


def run_core(plan):
    """Run one plan through InputMonitor + PowerMonitor on a fast clock; a result dict."""
    rng = random.Random(plan["seed"])
    config = validate({"station_id": "bench-1", "meter": {"model": "sdm630", "port": "x"},
                       "io": {"pilot": {"sample_ms": plan["sample_ms"], "debounce_ms": plan["debounce_ms"]}}})
    events_cfg = config["events"]
    clock = FastClock()
    world = World(plan["advertised_a"])
    listener = Listener()
    inputs = InputMonitor(world, config["io"], clock, listener)
    raised = []  # (mono_ms, type) of every raise

    def sink(event):
        if event.end is None:
            raised.append((clock.mono, event.type))

    numbers = iter(range(1, 1 << 30))
    monitor = PowerMonitor(events_cfg, 3, clock, sink, lambda: next(numbers), plan["sample_ms"],
                           plan["debounce_ms"], lambda: inputs.sampled_ms)
    listener.monitor = monitor
    baseline = Baseline(events_cfg["power_drop_pct"], events_cfg["fluctuation_pct"],
                        int(events_cfg["fluctuation_window_s"] * 1000))

    queue = []
    order = [0]

    def at(t, kind, data=None):
        order[0] += 1
        heapq.heappush(queue, (t, order[0], kind, data))

    for period in plan["periods"]:
        at(period["start"], "ask")
        at(period["start"] + period["contactor_on"], "feedback", True)
        if period["drop_at"] is not None:
            at(period["drop_at"], "drop", period["drop_to"])
        at(period["stop"], "stop")
        at(period["stop"] + period["contactor_off"], "feedback", False)
    at(0, "sample")
    at(plan["poll_phase_ms"], "poll")
    end = plan["end"]
    readings = 0
    ticks = set()

    def baseline_charging():
        state = listener.state
        return state is not None and state.pilot in ("C", "D") and state.contactor_command is not False

    while queue:
        t, _, kind, data = heapq.heappop(queue)
        if t > end:
            break
        clock.mono = 1_000_000 + t
        now = clock.mono
        if kind == "ask":
            world.pilot_v, world.command, world.draw_a = 6.0, True, world.advertised_a
        elif kind == "stop":
            world.pilot_v, world.command = 9.0, False
        elif kind == "feedback":
            world.feedback = data
        elif kind == "drop":
            world.draw_a = world.advertised_a * data
        elif kind == "sample":
            before = listener.state
            inputs.poll(now)
            if listener.state is not before:
                baseline.on_inputs(baseline_charging())
            at(t + plan["sample_ms"] + (rng.randint(0, plan["jitter_ms"]) if plan["jitter_ms"] else 0), "sample")
        elif kind == "poll":
            busy = rng.randrange(plan["poll_busy_ms"] // 2, plan["poll_busy_ms"] + 1)
            at(t + rng.randrange(busy + 1), "measure", (t, busy))
            at(t + plan["poll_ms"], "poll")
        elif kind == "measure":
            started, busy = data
            amps = world.amps()
            power = 3 * VOLTS * amps * rng.uniform(0.995, 1.005)
            at(started + busy, "reading", (started, power, amps))
        elif kind == "reading":
            started, power, amps = data
            reading = Reading(clock.epoch + (1_000_000 + started) / 1000.0, 1_000_000 + started,
                              [VOLTS] * 3, [amps] * 3, [power / 3] * 3, power, 50.0, 1_000_000, 1)
            readings += 1
            state = listener.state
            monitor.on_reading(reading, None if state is None else state.advertised_a, now)
            baseline.on_reading(baseline_charging(), power, now)
        # The agent's supervisor: tick when the monitor's next check falls due.
        if kind == "tick":
            ticks.discard(t)
        due = monitor.next_check_ms()
        if due is not None and due <= now:
            monitor.tick(now)
            due = monitor.next_check_ms()
        if due is not None and due > now and due - 1_000_000 not in ticks:
            ticks.add(due - 1_000_000)
            at(due - 1_000_000, "tick")
    return _classify(plan, raised, baseline.raised, readings, monitor)


def _classify(plan, raised, baseline_raised, readings, monitor):
    periods = plan["periods"]

    def judge(events):
        false = []
        detected = {}
        for mono, etype in events:
            if etype not in POWER_EVENTS:
                continue
            t = mono - 1_000_000
            period = None
            for candidate in periods:
                if candidate["start"] <= t <= candidate["stop"] + 1000:
                    period = candidate
                    break
            if period is not None and period["drop_at"] is not None and t >= period["drop_at"]:
                if etype == "power_drop" and id(period) not in detected:
                    detected[id(period)] = t - period["drop_at"]
                continue
            false.append((t, etype))
        drops = [p for p in periods if p["drop_at"] is not None]
        return {"false": false, "drops": len(drops), "detected": len(detected),
                "missed": len(drops) - len(detected), "delays_ms": sorted(detected.values())}

    return {"stops": len(periods), "readings": readings, "judged": monitor.judged,
            "discarded": monitor.discarded, "agent": judge(raised), "baseline": judge(baseline_raised)}


def _percentile(values, pct):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(pct / 100.0 * (len(ordered) - 1)))))
    return ordered[index]


def core_figures(stops=2000, seed=13, stops_per_plan=25):
    """False events per 1,000 stops, missed drops per 1,000, detection delay p50/p99: the
    agent's monitor and the seed's rule (baseline) on the same random plans."""
    rng = random.Random(seed)
    totals = {"agent": {"false": 0, "drops": 0, "missed": 0, "delays": []},
              "baseline": {"false": 0, "drops": 0, "missed": 0, "delays": []}}
    done = 0
    plans = 0
    while done < stops:
        result = run_core(random_plan(rng, min(stops_per_plan, stops - done)))
        done += result["stops"]
        plans += 1
        for name in totals:
            part = result[name]
            totals[name]["false"] += len(part["false"])
            totals[name]["drops"] += part["drops"]
            totals[name]["missed"] += part["missed"]
            totals[name]["delays"] += part["delays_ms"]
    figures = {"stops": done, "plans": plans}
    for name, total in totals.items():
        figures[name] = {
            "false_per_1000_stops": round(1000.0 * total["false"] / done, 2),
            "drops": total["drops"],
            "missed_per_1000_drops": round(1000.0 * total["missed"] / total["drops"], 2) if total["drops"] else None,
            "delay_p50_ms": _percentile(total["delays"], 50),
            "delay_p99_ms": _percentile(total["delays"], 99),
        }
    return figures


# -- end to end ---------------------------------------------------------------------------


def run_end_to_end(workdir, broker, stops=12, seed=13, poll_s=1.0, drop_share=0.5, log=None):
    """The agent process, meter simulator, vehicle simulator and ``broker``: ``stops``
    charging periods at random phases, some with a true drop. Returns counts and delays."""
    from ..sim.meter_sim import MeterSimulator
    from ..testkit.subscriber import Collector
    from ..sim.vehicle_sim import VehicleSim
    import subprocess

    rng = random.Random(seed)
    os.makedirs(workdir, exist_ok=True)
    pin_file = os.path.join(workdir, "pins.json")
    vehicle = VehicleSim(pin_file, advertised_a=16.0, contactor_delay_s=0.0)
    vehicle.plug()
    sim = MeterSimulator("sdm630", pin_file=pin_file)
    device = sim.start()
    collector = Collector(broker.host, broker.port, "evse/#")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", os.path.join(root, "boards", "sim.json"),
            "--set", "meter.port=" + device, "--set", "mqtt.port=%d" % broker.port,
            "--set", "meter.poll_interval_s=%s" % poll_s, "--set", "mqtt.telemetry_interval_s=%s" % poll_s,
            "--set", "session.state_dir=" + os.path.join(workdir, "state"),
            "--set", "signing.key_file=" + os.path.join(workdir, "key.pem"),
            "--set", "io.sim_file=" + pin_file, "--set", "journal.dir=" + os.path.join(workdir, "journal")]
    out = open(os.path.join(workdir, "agent.out"), "w")
    err = open(os.path.join(workdir, "agent.err"), "w")
    agent = subprocess.Popen(args, stdout=out, stderr=err, cwd=root)
    periods = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not collector.on("state"):
            time.sleep(0.05)
        time.sleep(rng.uniform(1.0, 2.0))
        for index in range(stops):
            start = time.monotonic()
            vehicle.draw(None)
            vehicle.charge()
            drop_at = None
            last_chance = index == stops - 1 and not any(p["drop_at"] for p in periods)
            if rng.random() < drop_share or last_chance:  # at least one drop per run
                time.sleep(1.5 + 2 * poll_s + rng.uniform(0, poll_s))
                drop_at = time.monotonic()
                vehicle.draw(16.0 * rng.uniform(0.1, 0.4))
                time.sleep(3 * poll_s + rng.uniform(0, 1.5))
            else:
                time.sleep(rng.uniform(1.0, 5.0))
            stop = time.monotonic()
            vehicle.pause()
            periods.append({"start": start, "drop_at": drop_at, "stop": stop})
            time.sleep(rng.uniform(1.0, 4.0))
        time.sleep(1.0 + poll_s)
    finally:
        agent.terminate()
        agent.wait(30)
        out.close()
        err.close()
        collector.close()
        sim.stop()
    return _classify_e2e(workdir, collector, periods)


def _classify_e2e(workdir, collector, periods):
    with open(os.path.join(workdir, "agent.out")) as handle:
        readings = sum(1 for line in handle if " | total " in line)
    telemetry = [m for m in collector.messages if m.topic.endswith("/telemetry")]
    events = [m for m in collector.messages if m.topic.endswith("/event") and m.body
              and m.body.get("state") == "active" and m.body.get("type") in POWER_EVENTS]
    false = []
    detected = {}
    for message in events:
        t = message.received
        period = None
        for index, candidate in enumerate(periods):
            if candidate["start"] <= t <= candidate["stop"] + 1.5:
                period = index
                break
        if period is not None and periods[period]["drop_at"] is not None and t >= periods[period]["drop_at"]:
            if message.body["type"] == "power_drop" and period not in detected:
                detected[period] = int((t - periods[period]["drop_at"]) * 1000)
            continue
        false.append(message.body)
    drops = sum(1 for p in periods if p["drop_at"] is not None)
    return {"stops": len(periods), "readings": readings, "telemetry": len(telemetry),
            "stale": sum(1 for m in telemetry if m.body and m.body.get("stale")),
            "false": false, "drops": drops, "detected": len(detected), "missed": drops - len(detected),
            "delays_ms": sorted(detected.values())}


def monitoring_figures(broker, workdir, quick=False):
    """``make bench``'s monitoring figures: the fast-clock core (agent and seed's rule on the
    same plans) and one randomized end-to-end run."""
    figures = {"core": core_figures(1000 if quick else 5000)}
    e2e = run_end_to_end(os.path.join(workdir, "monitoring"), broker, stops=6 if quick else 15)
    figures["end_to_end"] = {
        "stops": e2e["stops"], "false_events": len(e2e["false"]), "drops": e2e["drops"], "missed": e2e["missed"],
        "delay_p50_ms": _percentile(e2e["delays_ms"], 50), "delay_p99_ms": _percentile(e2e["delays_ms"], 99),
        "readings": e2e["readings"], "telemetry": e2e["telemetry"], "stale": e2e["stale"],
        "telemetry_per_reading": round(e2e["telemetry"] / e2e["readings"], 3) if e2e["readings"] else None,
    }
    return figures


def monitoring_rows(figures, row):
    """Table rows for ``tools/bench/main.py`` (``row(figure, measured, baseline, ratio)``)."""
    core = figures["core"]
    agent, seed = core["agent"], core["baseline"]
    rows = [row("false power events per 1000 stops (fast clock, %d stops)" % core["stops"],
                "%.2f" % agent["false_per_1000_stops"], "seed rule %.2f" % seed["false_per_1000_stops"]),
            row("missed true drops per 1000 (fast clock, %d drops)" % agent["drops"],
                "%.2f" % agent["missed_per_1000_drops"], "seed rule %.2f" % seed["missed_per_1000_drops"]),
            row("drop detection delay p50 / p99 (fast clock)",
                "%s / %s ms" % (agent["delay_p50_ms"], agent["delay_p99_ms"]),
                "%s / %s ms" % (seed["delay_p50_ms"], seed["delay_p99_ms"]))]
    e2e = figures["end_to_end"]
    rows += [row("end to end: false events / missed drops (%d stops, %d drops)" % (e2e["stops"], e2e["drops"]),
                 "%d / %d" % (e2e["false_events"], e2e["missed"]), "0 / 0"),
             row("end to end: drop -> subscriber p50 / p99",
                 "%s / %s ms" % (e2e["delay_p50_ms"], e2e["delay_p99_ms"]), ""),
             row("end to end: telemetry messages per reading (%d readings)" % e2e["readings"],
                 "%s" % e2e["telemetry_per_reading"], "1 per reading")]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench_monitoring", description=__doc__.splitlines()[0])
    parser.add_argument("--stops", type=int, default=2000, help="stops in the fast-clock run")
    parser.add_argument("--e2e-stops", type=int, default=12, help="stops in the end-to-end run (0: skip)")
    args = parser.parse_args(argv)
    print(json.dumps(core_figures(args.stops), indent=2))
    if args.e2e_stops:
        from ..testkit.broker import Mosquitto
        with Mosquitto() as broker, tempfile.TemporaryDirectory() as workdir:
            result = run_end_to_end(workdir, broker, args.e2e_stops)
        result["false"] = len(result["false"])
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
