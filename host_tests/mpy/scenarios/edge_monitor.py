"""The input monitor on the MicroPython unix port over the host board's comparator lines.

``micropython edge_monitor.py STOP_FILE``: prints each accepted change and, every 500 ms,
the monitor's reads so far; ends once STOP_FILE exists (or after 120 s).
"""

import asyncio
import os
import sys
import time

from evse_agent.pilot import InputMonitor
from evse_agent.ports.micropython.pins import MachinePinBank

IO = {"pilot": {"source": "lines", "adc_scale": 1.0, "adc_offset": 0.0, "lines": [12, 13, 14, 15, 27],
                "pwm_line": None, "sample_ms": 20, "debounce_ms": 60},
      "contactor": {"command_line": 25, "feedback_line": 26, "active_low": False}}


class Clock:
    def monotonic_ms(self):
        return time.ticks_ms()


class Listener:
    def on_inputs(self, state, now_ms):
        print("change", state.pilot, state.contactor_command, state.contactor_feedback)


def stopped(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


async def main(stop_file):
    bank = MachinePinBank(IO, {})
    monitor = InputMonitor(bank, IO, Clock(), Listener())
    print("edge_driven", monitor.edge_driven)
    task = asyncio.create_task(monitor.run())
    began = time.ticks_ms()
    while not stopped(stop_file) and time.ticks_diff(time.ticks_ms(), began) < 120000:
        await asyncio.sleep_ms(500)
        print("samples", monitor.samples, time.ticks_diff(time.ticks_ms(), began))
    monitor.stop()
    await task


asyncio.run(main(sys.argv[1]))
