"""The agent with its technician console on the REPL, for the unix port on a pseudo-terminal.

Run by host_tests/mpy/test_micropython.py as ``micropython -i romboot.py IMAGE repl_console.py DIR``
with stdin and stdout on a pty: the core (as the session scenario wires it, on a scripted
meter and a real clock) runs with the port's ``ReplStream`` console until mpremote's raw-REPL
entry stops it; then ``-i`` gives the REPL, as a board's ``main.py`` returning does.
"""

import time

import harness
from fakes import FakeClock, Pins, Publisher, RegisterMeter
from evse_agent import log
from evse_agent.config import validate
from evse_agent.ports.micropython.console import ReplStream
from session_scenario import Station


class RealClock(FakeClock):
    """The board's clocks: milliseconds since start and wall time."""

    def monotonic_ms(self):
        return time.ticks_ms()

    def time(self):
        return time.time()


async def main():
    log.set_sink(lambda level, text: print("log %s" % text))
    root = harness.workdir("repl")
    config = validate({
        "station_id": "mpy-003",
        "meter": {"model": "sdm630", "port": "uart2", "poll_interval_s": 1},
        "io": {"pilot": {"sample_ms": 100, "debounce_ms": 200}},
        "journal": {"dir": root + "/journal"},
        "session": {"state_dir": root + "/state"},
        "console": {"port": "repl"},
    })
    image = RegisterMeter()
    image.set_float(0x0000, 230.0)
    image.set_float(0x0048, 1234.5)
    image.set_uint32(0xFC00, 12345678)
    stream = ReplStream(on_escape=lambda: station.agent.stop())
    station = Station(config, RealClock(), image, Pins(), Publisher(), stream)
    agent = station.agent
    try:
        await agent.run()
    finally:
        stream.close()
        station.journal.close()
    print("agent stopped after %d poll cycles; escaped %s" % (agent.cycles, stream.escaped))


if __name__ == "__main__":
    harness.run(main)
