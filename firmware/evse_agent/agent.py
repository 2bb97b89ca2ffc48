"""The agent's main job: poll the meter on schedule and publish what it reads.

One asyncio task per concern (STYLE: micropython-async): the poll loop owns the meter
schedule; publishing goes through the outbox. ``on_reading`` lets the port show live
readings (the CPython console prints one line per poll).
"""

import asyncio

from . import log
from .messages import Topics, meter_status_doc, telemetry_doc


class Agent:
    """Ties a meter, an outbox and a clock together according to the board config."""

    def __init__(self, config, meter, outbox, clock, on_reading=None):
        self.config = config
        self.meter = meter
        self.outbox = outbox
        self.clock = clock
        self.on_reading = on_reading
        self.topics = Topics(config["mqtt"]["topic_prefix"], config["station_id"])
        self.latest = None
        self.cycles = 0
        self._poll_ms = int(config["meter"]["poll_interval_s"] * 1000)
        self._telemetry_ms = int(config["mqtt"]["telemetry_interval_s"] * 1000)
        self._status_ms = int(config["mqtt"]["status_interval_s"] * 1000)
        self._stopping = False

    def stop(self):
        """Ask the loops to finish after the current cycle."""
        self._stopping = True

    async def run(self, duration_s=None):
        """Poll until ``stop()`` or until ``duration_s`` seconds have passed."""
        clock = self.clock
        started = clock.monotonic_ms()
        end_ms = None if duration_s is None else started + int(duration_s * 1000)
        next_poll = started
        next_telemetry = started
        next_status = started + self._status_ms
        reported_transitions = -1  # the first cycle always publishes the link status
        while not self._stopping:
            now = clock.monotonic_ms()
            if end_ms is not None and now >= end_ms:
                break
            if now < next_poll:
                await asyncio.sleep((next_poll - now) / 1000)
                continue
            next_poll += self._poll_ms
            if next_poll <= now:  # overran: skip the missed slots rather than bursting
                next_poll = now + self._poll_ms
            reading = await self.meter.read()
            self.cycles += 1
            if self.meter.link.transitions != reported_transitions or now >= next_status:
                reported_transitions = self.meter.link.transitions
                next_status = now + self._status_ms
                self.publish_meter_status()
            if reading is None:
                continue
            self.latest = reading
            if self.on_reading is not None:
                self.on_reading(reading)
            if now >= next_telemetry:
                next_telemetry += self._telemetry_ms
                if next_telemetry <= now:
                    next_telemetry = now + self._telemetry_ms
                self.outbox.post(self.topics.telemetry, telemetry_doc(reading))
        log.info("agent stopped after %d poll cycles" % self.cycles)

    def publish_meter_status(self):
        self.outbox.post(self.topics.meter, meter_status_doc(self.meter, self.clock), qos=1, retain=True)
