"""A journal that refuses a session's end record: the record arrives once the journal takes it.

The session scenario's station (the core wired as the agent wires it) charges, then the
journal refuses every session record (``MemoryError`` in one run, ``OSError`` in the other)
while the car is unplugged. The refusal must leave the session on file with its end reading
taken and raise an ``agent_fault`` event; the station is then killed and started again
(still refusing for a while), and once the journal takes records again the end record is
journaled exactly once, billing the register delta, with the end document signed once.
"""

import json

import harness
from fakes import FakeClock, Pins, Publisher, RegisterMeter
from evse_agent import log
from evse_agent.journal import EVENT, SESSION
from session_scenario import POWER_W, Station, station_config


class Refusal:
    """Wraps a journal's ``append``: session records raise ``error`` while ``on``."""

    def __init__(self, error):
        self.error = error
        self.on = False
        self.refused = 0

    def install(self, journal):
        append = journal.append

        def refusing(rtype, payload, seq_hook=None):
            if self.on and rtype == SESSION:
                self.refused += 1
                raise self.error("journal refuses the session record")
            return append(rtype, payload, seq_hook)

        journal.append = refusing


def _faults(station):
    """The agent_fault events journaled: [where, state]."""
    found = []
    for record in station.journal.read_after(0, 1000):
        if record.type == EVENT:
            doc = json.loads(record.payload)
            if doc["type"] == "agent_fault":
                found.append([doc["values"]["where"], doc["state"]])
    return found


async def run(name, error):
    root = harness.workdir(name)
    config = station_config(root, "mpy-002")
    clock = FakeClock()
    image = RegisterMeter()
    for i in range(3):
        image.set_float(0x0000 + 2 * i, 230.0)
    image.set_float(0x0046, 50.0)
    image.set_uint32(0xFC00, 12345678)
    energy_mwh = 2000000000
    pins = Pins()
    publisher = Publisher()
    refusal = Refusal(error)
    station = Station(config, clock, image, pins, publisher)
    refusal.install(station.journal)
    script = ((2, 9.0, 26.7, False, False), (5, 6.0, 26.7, True, True), (40, 9.0, 26.7, False, False),
              (45, 12.0, 100.0, False, False))
    refuse_from, restart_at, take_at = 44, 50, 53
    for second in range(60):
        for volts, duty, command, feedback in [s[1:] for s in script if s[0] == second]:
            pins.set(volts, duty, command, feedback)
        if second == refuse_from:
            refusal.on = True
        if second == restart_at:
            # kill -9 while the end record is still refused
            harness.emit(name + "_before_restart", {
                "open_session_file": station.store.load_open_session() is not None,
                "ending": len(station.engine.ending), "refused": refusal.refused > 0,
                "faults": _faults(station)})
            station = Station(config, clock, image, pins, publisher)
            refusal.install(station.journal)
            harness.emit(name + "_restart", {"session": station.restored.id if station.restored else None,
                                             "ending": len(station.engine.ending)})
        if second == take_at:
            refusal.on = False
        charging = bool(pins.sample.contactor_feedback)
        for _ in range(10):
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
        station.forwarder.pump()
        station.journal.tick(clock.monotonic_ms())
        await harness.checkpoint(name + " second %d" % second)

    sessions = [json.loads(r.payload) for r in station.journal.read_after(0, 1000) if r.type == SESSION]
    ends = [doc for doc in sessions if doc["event"] == "end"]
    if len(ends) != 1:
        raise AssertionError("%d end records journaled, not one" % len(ends))
    end = ends[0]
    billed = end["energy_wh"]
    if billed != end["end"]["energy_wh"] - end["begin"]["energy_wh"] or billed <= 0:
        raise AssertionError("billed %s Wh, register %s" % (billed, [end["begin"], end["end"]]))
    harness.emit(name + "_end", {"energy_wh": billed, "flags": end["flags"], "session_id": end["session_id"],
                                 "documents": len(end["ocmf_documents"])})
    harness.emit(name + "_after", {"faults": _faults(station), "active": list(station.monitor.active),
                                   "open_session_file": station.store.load_open_session() is not None,
                                   "ending": len(station.engine.ending), "counters": station.store.counters,
                                   "published": [json.loads(p)["event"] for p in publisher.sessions]})
    station.journal.close()


async def main():
    log.set_sink(None)
    harness.mark_loaded()
    await run("memory", MemoryError)
    await run("disk", OSError)


if __name__ == "__main__":
    harness.run(main)
