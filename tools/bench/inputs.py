"""State E/F detection delay on an ADC pilot board, for ``make bench``.

An ADC cannot announce a change, so such a board's input monitor samples the pilot every
``io.pilot.sample_ms`` and accepts a level once it held ``io.pilot.debounce_ms``. This
measures, on the real clock and event loop, the time from the pilot falling to E (0 V) or
F (-12 V) at a random moment to the listener's call, over many trials, at the settings of
``boards/esp32-sdm630.json``. The baseline is the bound the sampling allows: the debounce
time plus one sample period (the change may land just after a sample).

``python -m evse_tools.bench.inputs`` prints the figures.
"""

import asyncio
import json
import os
import random
import sys
import time

from evse_agent.pilot import NOMINAL_VOLTS, InputMonitor, PinSample

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
ADC_BOARD = os.path.join(ROOT, "boards", "esp32-sdm630.json")


class _Clock:
    def monotonic_ms(self):
        return time.monotonic_ns() // 1000000


class _AdcBank:
    """An ADC pilot (no ``wait_change``): the level set by the trial, read when sampled."""

    def __init__(self):
        self.sample = PinSample(pilot_volts=NOMINAL_VOLTS["C"], duty_pct=26.67,
                                contactor_command=True, contactor_feedback=True)

    def read(self):
        return self.sample


class _Listener:
    def __init__(self):
        self.changes = []

    def on_inputs(self, state, now_ms):
        self.changes.append((state.pilot, time.monotonic()))


def _board_io():
    with open(ADC_BOARD) as handle:
        pilot = json.load(handle)["io"]["pilot"]
    return {"pilot": {"source": "adc", "sample_ms": pilot["sample_ms"], "debounce_ms": pilot["debounce_ms"]}}


async def _trials(io, trials, seed):
    rng = random.Random(seed)
    bank = _AdcBank()
    listener = _Listener()
    monitor = InputMonitor(bank, io, _Clock(), listener)
    task = asyncio.create_task(monitor.run())
    delays = []
    try:
        while not listener.changes:
            await asyncio.sleep(0.01)
        for _ in range(trials):
            state = rng.choice(("E", "F"))
            await asyncio.sleep(rng.uniform(0.05, 0.4))  # a random phase against the sampling
            count = len(listener.changes)
            bank.sample.pilot_volts = NOMINAL_VOLTS[state]
            changed = time.monotonic()
            while len(listener.changes) == count:
                await asyncio.sleep(0.001)
            delays.append((listener.changes[-1][1] - changed) * 1000)
            bank.sample.pilot_volts = NOMINAL_VOLTS["C"]
            count = len(listener.changes)
            while len(listener.changes) == count:
                await asyncio.sleep(0.001)
    finally:
        monitor.stop()
        await task
    return delays


def ef_detection_figures(trials=100, seed=17):
    """p50 / p99 / max of the E/F detection delay (ms) and the sampling bound it is held to."""
    io = _board_io()
    delays = sorted(asyncio.run(_trials(io, trials, seed)))

    def at(fraction):
        return round(delays[min(len(delays) - 1, int(round(fraction * (len(delays) - 1))))], 1)

    pilot = io["pilot"]
    return {"trials": len(delays), "sample_ms": pilot["sample_ms"], "debounce_ms": pilot["debounce_ms"],
            "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(delays[-1], 1),
            "bound_ms": pilot["debounce_ms"] + pilot["sample_ms"]}


def main(argv=None):
    figures = ef_detection_figures()
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
