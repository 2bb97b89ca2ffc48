"""Per-interval telemetry aggregates: what the journal keeps of the 1 s live values.

An aggregate covers one wall-clock interval (aligned to multiples of ``interval_s``) and
holds min / mean / max of total power, and of voltage, current and power per phase, the
frequency, and the import register at the interval's first and last reading — so power
fluctuations survive a broker outage without writing every sample to flash.

Each aggregate says which samples it holds: ``samples``, the times of its first and last
sample (``first_ts``, ``last_ts``), and ``complete``: false for the window in which the agent
started (a restart after a crash begins mid-window: the samples before it were lost with the
process) and for the one it closed at a clean stop.
"""

from .messages import iso_utc


class _Stat:
    __slots__ = ("low", "high", "total", "count")

    def __init__(self):
        self.low = None
        self.high = None
        self.total = 0.0
        self.count = 0

    def add(self, value):
        if value is None:
            return
        if self.low is None or value < self.low:
            self.low = value
        if self.high is None or value > self.high:
            self.high = value
        self.total += value
        self.count += 1

    def doc(self, digits):
        if not self.count:
            return None
        return {"min": round(self.low, digits), "avg": round(self.total / self.count, digits),
                "max": round(self.high, digits)}


class Aggregator:
    """Collects readings; ``add`` returns the finished aggregate when an interval closes."""

    def __init__(self, interval_s, phases):
        self.interval_ms = int(interval_s * 1000)
        self.phases = phases
        self._slot = None
        self._first_window = True  # the agent started inside it: samples before are missing
        self._reset()

    def _reset(self):
        self.samples = 0
        self.power_total = _Stat()
        self.voltage = [_Stat() for _ in range(self.phases)]
        self.current = [_Stat() for _ in range(self.phases)]
        self.power = [_Stat() for _ in range(self.phases)]
        self.frequency = _Stat()
        self.energy_first = None
        self.energy_last = None
        self.first_time = None
        self.last_time = None

    def add(self, reading):
        slot = int(reading.time * 1000) // self.interval_ms
        finished = None
        if self._slot is not None and slot != self._slot:
            finished = self.flush()
        self._slot = slot
        self.samples += 1
        if self.first_time is None:
            self.first_time = reading.time
        self.last_time = reading.time
        self.power_total.add(reading.power_total)
        for i in range(self.phases):
            self.voltage[i].add(reading.voltage[i])
            self.current[i].add(reading.current[i])
            self.power[i].add(reading.power[i])
        self.frequency.add(reading.frequency)
        if reading.energy_wh is not None:
            if self.energy_first is None:
                self.energy_first = reading.energy_wh
            self.energy_last = reading.energy_wh
        return finished

    def flush(self, final=False):
        """The aggregate of the current interval (None if it has no samples); starts anew.
        ``final``: the agent stops inside the interval (the aggregate is not complete)."""
        if self._slot is None or not self.samples:
            return None
        complete = not (self._first_window or final)
        self._first_window = False
        start_ms = self._slot * self.interval_ms
        doc = {
            "kind": "aggregate",
            "start": iso_utc(start_ms / 1000),
            "end": iso_utc((start_ms + self.interval_ms) / 1000),
            "samples": self.samples,
            "first_ts": iso_utc(self.first_time),
            "last_ts": iso_utc(self.last_time),
            "complete": complete,
            "power_total_w": self.power_total.doc(1),
            "power_w": [s.doc(1) for s in self.power],
            "voltage_v": [s.doc(2) for s in self.voltage],
            "current_a": [s.doc(3) for s in self.current],
            "frequency_hz": self.frequency.doc(3),
            "energy_wh_first": self.energy_first,
            "energy_wh_last": self.energy_last,
        }
        self._reset()
        self._slot = None
        return doc
