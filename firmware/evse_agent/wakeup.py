"""A flag one task sleeps on with a deadline, for one event-loop wake-up per wait.

``Wakeup`` has the parts of ``asyncio.Event`` the agent's loops use (``set``, ``clear``,
``is_set``) and ``await wait(timeout_ms)``: True when the flag is set (at once if it already
is), False when ``timeout_ms`` passed first. One task waits on a ``Wakeup`` at a time;
``set`` is called from the event loop's own thread.

Why not ``asyncio.wait_for(event.wait(), t)``: on CPython it makes a task per wait and
several loop passes when the time runs out (the inner task is cancelled and awaited), and
the agent's loops wait a few times per poll cycle. Here a wait is one future and one timer on
the running loop. MicroPython's loop has no timers to borrow: there it is an ``asyncio.Event``
under ``wait_for``, as before.
"""

import asyncio

_running_loop = getattr(asyncio, "get_running_loop", None)


def _expire(waiter):
    if not waiter.done():
        waiter.set_result(False)


class Wakeup:
    """A settable flag with a cheap timed wait (see the module docstring)."""

    def __init__(self):
        self._flag = False
        self._waiter = None  # the future a wait is parked on (loops with timers)
        self._event = None  # asyncio.Event for loops without timers, made on first wait

    def set(self):
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)
        if self._event is not None:
            self._event.set()

    def clear(self):
        self._flag = False
        if self._event is not None:
            self._event.clear()

    def is_set(self):
        return self._flag

    async def wait(self, timeout_ms):
        """True once set, False when ``timeout_ms`` passed first."""
        if self._flag:
            return True
        loop = _running_loop() if _running_loop is not None else None
        if loop is None or not hasattr(loop, "call_later"):
            if self._event is None:
                self._event = asyncio.Event()
            try:
                await asyncio.wait_for(self._event.wait(), timeout_ms / 1000)
            except asyncio.TimeoutError:
                pass
            return self._flag
        waiter = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout_ms / 1000, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None
        return self._flag
