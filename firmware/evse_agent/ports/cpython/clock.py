"""System clock for the core: monotonic milliseconds and wall time."""

import time


class SystemClock:
    """``monotonic_ms()`` for scheduling and timeouts, ``time()`` for timestamps (UTC epoch)."""

    def monotonic_ms(self):
        return time.monotonic_ns() // 1000000

    def time(self):
        return time.time()
