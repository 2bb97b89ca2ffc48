"""The flag the agent's loops sleep on (``evse_agent.wakeup``): a timed wait that is woken by
``set`` (before or during the wait, from another task after any number of loop passes) or
runs out, on CPython's loop (a future and a timer, no task per wait) and on the path a loop
without timers takes (MicroPython: an ``asyncio.Event`` under ``wait_for``)."""

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from evse_agent import wakeup
from evse_agent.wakeup import Wakeup

HANG_MS = 60000  # bounds a hang only: every wait below that must end is woken by ``set``


@pytest.fixture(params=["timers", "event"])
def path(request, monkeypatch):
    if request.param == "event":
        monkeypatch.setattr(wakeup, "_running_loop", None)
    return request.param


async def _setter(flag, passes):
    for _ in range(passes):
        await asyncio.sleep(0)
    flag.set()


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["set_before", "set_during", "timeout"]),
                                st.integers(min_value=0, max_value=5)), min_size=1, max_size=12))
def test_a_wait_ends_true_when_set_and_false_when_its_time_ran_out(steps):
    for use_event in (False, True):
        original = wakeup._running_loop
        if use_event:
            wakeup._running_loop = None
        try:
            asyncio.run(_run_steps(steps))
        finally:
            wakeup._running_loop = original


async def _run_steps(steps):
    flag = Wakeup()
    for kind, passes in steps:
        flag.clear()
        assert not flag.is_set()
        if kind == "set_before":
            flag.set()
            assert await flag.wait(HANG_MS) is True
        elif kind == "set_during":
            setter = asyncio.create_task(_setter(flag, passes))
            assert await flag.wait(HANG_MS) is True
            await setter
        else:
            assert await flag.wait(1 + passes) is False
        assert flag.is_set() == (kind != "timeout")


def test_a_wait_makes_no_task_and_leaves_no_timer_behind():
    async def scenario():
        loop = asyncio.get_running_loop()
        flag = Wakeup()
        tasks_seen = []

        async def watch():
            await asyncio.sleep(0)
            tasks_seen.append(len(asyncio.all_tasks()))
            flag.set()

        watcher = asyncio.create_task(watch())
        assert await flag.wait(HANG_MS) is True
        await watcher
        assert tasks_seen == [2]  # the waiting task and the watcher: none made by the wait
        assert not [handle for handle in loop._scheduled if not handle.cancelled()]

    asyncio.run(scenario())


def test_a_cancelled_wait_cancels_its_timer_and_a_later_set_still_counts(path):
    async def scenario():
        flag = Wakeup()
        waiter = asyncio.create_task(flag.wait(HANG_MS))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        if path == "timers":
            loop = asyncio.get_running_loop()
            assert not [handle for handle in loop._scheduled if not handle.cancelled()]
        flag.set()
        assert await flag.wait(HANG_MS) is True

    asyncio.run(scenario())
