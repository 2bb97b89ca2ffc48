"""System clock for the core: monotonic milliseconds, wall time, and whether it is synchronised."""

import ctypes
import time

_TIME_ERROR = 5  # adjtimex() result when the kernel clock is not synchronised


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: only "modes" must be 0 (read-only query); the rest is
    # room for the kernel to fill in (the real struct is smaller than this buffer).
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 512)]


_libc = []  # the C library, opened once


def _adjtimex():
    """libc's adjtimex, from the symbols already loaded into this process (CPython links the
    C library): no search of the library path, which would start a child process each time."""
    if not _libc:
        _libc.append(ctypes.CDLL(None, use_errno=True))
    return _libc[0].adjtimex


def kernel_clock_synchronised():
    """True when the kernel says the clock is synchronised (NTP/PTP discipline active)."""
    try:
        adjtimex = _adjtimex()
        timex = _Timex()
        state = adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return False
    return state not in (-1, _TIME_ERROR)


class SystemClock:
    """``monotonic_ms()`` for scheduling, ``time()`` for timestamps (UTC epoch), ``synced()``.

    ``sync`` is the board's ``clock.sync``: "kernel" asks the kernel, "always"/"never" force it.
    """

    def __init__(self, sync="kernel"):
        if sync not in ("kernel", "always", "never"):
            raise ValueError("clock sync mode %r is not kernel, always or never" % (sync,))
        self.sync = sync
        self._checked_s = None
        self._synced = False

    def monotonic_ms(self):
        return time.monotonic_ns() // 1000000

    def time(self):
        return time.time()

    def synced(self):
        if self.sync != "kernel":
            return self.sync == "always"
        now = time.monotonic()
        if self._checked_s is None or now - self._checked_s > 10:
            self._synced = kernel_clock_synchronised()
            self._checked_s = now
        return self._synced
