"""The core scenario: a charging session with journal and OCMF, an agent restart inside it.

Everything is the portable core (meter over Modbus RTU, input monitor, session engine,
power monitor, journal, outbox, forwarder), built by ``station.build_station``, on this platform's
file system port, with the portable P-256 signer and a hand-moved clock. The lines printed
are compared with CPython's; the OCMF documents are verified with ``cryptography`` there.
"""

import json

import harness
from fakes import FakeClock, Pins, Publisher, RegisterMeter, ScriptedStream, signer
from evse_agent import log
from evse_agent.config import validate
from evse_agent.journal import SESSION
from evse_agent.station import Ports, build_station

POWER_W = 11040  # 16 A on three phases at 230 V


class Station:
    """The agent built by ``station.build_station``, as the port's main builds it, with its
    parts at hand for the scenario."""

    def __init__(self, config, clock, image, pins, publisher, console_stream=None):
        self.clock = clock
        self.stream = ScriptedStream(clock, [], always=image.answer, keep=False)
        ports = Ports(self.stream, harness.port_fs, publisher, pins, signer(), console_stream=console_stream)
        self.agent = build_station(config, clock, ports)
        self.outbox = self.agent.outbox
        self.journal = self.outbox.journal
        self.recovery = self.journal.report
        self.forwarder = self.agent.forwarder
        self.meter = self.agent.meter
        self.engine = self.agent.engine
        self.store = self.engine.store
        self.monitor = self.agent.monitor
        self.inputs = self.agent.inputs
        self.restored = self.agent.restored
        self.transitions = -1

    async def poll(self):
        """One cycle of the agent's poll loop (agent._poll_loop without its sleeping)."""
        agent = self.agent
        agent._wake.clear()
        reading = await self.meter.read()
        link = self.meter.link
        if link.transitions != self.transitions:
            if self.transitions >= 0:
                agent._on_link_change(link)
            self.transitions = link.transitions
            agent.publish_meter_status()
        if reading is None:
            return
        agent._engine_reading(reading)
        inputs = self.engine.inputs
        self.monitor.on_reading(reading, inputs.advertised_a if inputs else None)
        finished = agent.aggregator.add(reading)
        if finished is not None:
            self.outbox.record(3, finished)


def station_config(root, station_id):
    """The scenario station's board: an SDM630, contactor lines, a small journal in ``root``."""
    return validate({
        "station_id": station_id,
        "meter": {"model": "sdm630", "port": "uart2", "timeout_ms": 100, "retries": 1},
        "io": {"pilot": {"sample_ms": 100, "debounce_ms": 200},
               "contactor": {"command_line": 25, "feedback_line": 26}},
        "journal": {"dir": root + "/journal", "max_bytes": 65536, "reserve_bytes": 8192,
                    "segment_bytes": 8192, "aggregate_interval_s": 10, "window": 8},
        "session": {"state_dir": root + "/state"},
        # The scenario measures a session's data; discovery's configs have their own scenario.
        "homeassistant": {"enabled": False},
    })


async def main():
    log.set_sink(None)
    harness.mark_loaded()  # the code is loaded: from here on the scenario's data only
    root = harness.workdir("station")
    config = station_config(root, "mpy-001")
    clock = FakeClock()
    image = RegisterMeter()
    for i in range(3):
        image.set_float(0x0000 + 2 * i, 230.0)
        image.set_float(0x0006 + 2 * i, 0.0)
        image.set_float(0x000C + 2 * i, 0.0)
    image.set_float(0x0034, 0.0)
    image.set_float(0x0046, 50.0)
    image.set_uint32(0xFC00, 12345678)
    energy_mwh = 1234567890  # the meter's import register, in mWh (it shows kWh as float32)
    pins = Pins()
    publisher = Publisher()
    station = Station(config, clock, image, pins, publisher)
    harness.emit("start", {"recovery": station.recovery.as_dict(), "restored": station.restored is not None})
    # (second, pilot volts, duty %, contactor command, contactor feedback)
    script = ((2, 9.0, 26.7, False, False),   # plug in, 16 A offered
              (5, 6.0, 26.7, True, True),     # charging
              (65, 9.0, 26.7, False, False),  # the car pauses
              (75, 6.0, 26.7, True, True),    # and resumes
              (125, 9.0, 26.7, False, False),  # full
              (130, 12.0, 100.0, False, False))  # unplugged
    restart_at = 95
    decoded = []
    for second in range(140):
        for volts, duty, command, feedback in [s[1:] for s in script if s[0] == second]:
            pins.set(volts, duty, command, feedback)
        if second == restart_at:
            # kill -9: nothing is closed; what was fsync'ed must carry the session on.
            station = Station(config, clock, image, pins, publisher)
            harness.emit("restart", {"recovery": station.recovery.as_dict(),
                                     "session": station.restored.id if station.restored else None,
                                     "flags": station.restored.flags if station.restored else None})
        charging = bool(pins.sample.contactor_feedback)
        for _ in range(10):  # 10 input samples per second (sample_ms 100)
            clock.advance(100)
            station.inputs.poll(clock.monotonic_ms())
            station.monitor.tick(clock.monotonic_ms())
            if charging:
                energy_mwh += POWER_W * 100 // 3600
        amps = 16.0 if charging else 0.0
        for i in range(3):
            image.set_float(0x0006 + 2 * i, amps)
            image.set_float(0x000C + 2 * i, POWER_W / 3.0 if charging else 0.0)
        image.set_float(0x0034, float(POWER_W) if charging else 0.0)
        image.set_float(0x0048, energy_mwh / 1000000.0)
        await station.poll()
        if station.agent._wake.is_set():  # the engine asked for a fresh reading at once
            await station.poll()
        if station.meter.serial is not None and station.engine.latest is not None:
            decoded.append(station.engine.latest.energy_wh)
        station.forwarder.pump()
        station.journal.tick(clock.monotonic_ms())
        await harness.checkpoint("second %d" % second)

    records = [json.loads(r.payload) for r in station.journal.read_after(0, 1000) if r.type == SESSION]
    station.journal.close()
    ends = [r for r in station.journal.read_after(0, 1000)]
    by_topic = publisher.counts
    end = None
    for payload in publisher.sessions:
        doc = json.loads(payload)
        if doc["event"] == "end":
            end = doc
    if end is None:
        raise AssertionError("no session end record was published")
    billed = end["energy_wh"]
    register_delta = end["end"]["energy_wh"] - end["begin"]["energy_wh"]
    if billed != register_delta:
        raise AssertionError("billed %s Wh but the register moved %s Wh" % (billed, register_delta))
    harness.emit("billing", {"energy_wh": billed, "begin_wh": end["begin"]["energy_wh"],
                             "end_wh": end["end"]["energy_wh"], "segments": end["segments"],
                             "flags": end["flags"], "charging_s": end["charging_s"], "idle_s": end["idle_s"],
                             "session_id": end["session_id"], "seq": end["seq"]})
    harness.emit("session_events", [[r["event"], r["seq"]] for r in records] + [len(ends)])
    for document in end["ocmf_documents"]:
        harness.emit("document", document)
    harness.emit("published", by_topic)
    harness.emit("journal", station.journal.stats())
    harness.emit("counters", station.store.counters)
    harness.emit("register", [decoded[0], decoded[-1]])


if __name__ == "__main__":
    harness.run(main)
