"""Clock of the MicroPython port: monotonic ms that do not wrap, wall time, NTP sync state.

``time.ticks_ms()`` wraps (at 2**30 ms on most ports); ``monotonic_ms()`` extends it with
``ticks_diff`` on every call, so it keeps counting as long as it is called at least once
per wrap period (the poll loop calls it many times a second).

``time()`` is whole seconds since 1970 as an int: ESP32 builds have single-precision
floats, in which an epoch time is only exact to about two minutes. Ports whose epoch is
2000 are shifted to 1970. ``synced()`` is False until ``set_synced()`` is called after a
successful ``ntptime.settime()`` (the OCMF time flag stays ``U`` until then); board setting
``clock.sync`` "always" / "never" forces it as on Linux.
"""

import time

_EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0


class MicroClock:
    def __init__(self, sync="kernel"):
        if sync not in ("kernel", "always", "never"):
            raise ValueError("clock sync mode %r is not kernel, always or never" % (sync,))
        self.sync = sync
        self._ticks = time.ticks_ms()
        self._ms = 0
        self._synced = False
        self.synced_at = None  # monotonic ms of the last successful NTP sync

    def monotonic_ms(self):
        now = time.ticks_ms()
        self._ms += time.ticks_diff(now, self._ticks)
        self._ticks = now
        return self._ms

    def time(self):
        return time.time() + _EPOCH_OFFSET

    def set_synced(self):
        self._synced = True
        self.synced_at = self.monotonic_ms()

    def synced(self):
        if self.sync != "kernel":
            return self.sync == "always"
        return self._synced
