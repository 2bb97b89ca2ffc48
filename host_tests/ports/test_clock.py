"""The Linux port's clock: the kernel's synchronisation state, asked without child processes."""

import ctypes
import subprocess

from evse_agent.ports.cpython import clock


def test_synchronisation_is_asked_of_the_kernel_without_a_child_process(monkeypatch):
    """adjtimex() answers through the C library already in the process; finding the library
    on the path (ldconfig, gcc) would start a process every check."""
    def no_children(*args, **kwargs):
        raise AssertionError("a child process was started: %r" % (args,))
    monkeypatch.setattr(subprocess, "Popen", no_children)
    monkeypatch.setattr(clock, "_libc", [])
    timex = clock._Timex()
    state = ctypes.CDLL(None).adjtimex(ctypes.byref(timex))
    assert clock.kernel_clock_synchronised() == (state not in (-1, clock._TIME_ERROR))
    system = clock.SystemClock("kernel")
    assert system.synced() == clock.kernel_clock_synchronised()


def test_forced_modes_do_not_ask_the_kernel(monkeypatch):
    monkeypatch.setattr(clock, "kernel_clock_synchronised", lambda: (_ for _ in ()).throw(AssertionError))
    assert clock.SystemClock("always").synced() is True
    assert clock.SystemClock("never").synced() is False
