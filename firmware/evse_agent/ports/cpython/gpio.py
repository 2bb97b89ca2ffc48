"""Pin bank on Linux GPIO (libgpiod v2, the ``gpiod`` package: ``pip install 'evse-agent[gpio]'``).

All lines are inputs on ``io.chip``, requested once with edge detection on both edges:

- ``io.pilot.lines`` (source "lines"): the pilot decoder's 5 comparator outputs;
- ``io.contactor.command_line`` / ``feedback_line``: read as logical values, the kernel
  applying ``io.contactor.active_low`` (True = closed).

These level lines get a kernel debounce period of one ``sample_ms``: a glitch shorter
than a sample period never reaches a sample, and ``InputMonitor`` then debounces the
values for ``debounce_ms``. (A kernel debounce of ``debounce_ms`` would double the delay.)
With comparator lines (source "lines") every input is a level line, so the bank announces
changes: ``wait_change`` waits on the level request's file descriptor (readable when the
kernel queued an edge event) on the asyncio loop, and the monitor reads nothing while no
edge comes. The PWM line has a request of its own, so its 1 kHz edges wake nothing: its
duty is measured whenever the bank is read (at an edge, a debounce deadline, or the
monitor's idle look, ``pilot.IDLE_LOOK_MS``).

- ``io.pilot.pwm_line``: the pilot PWM as a logic level (high while the pilot is
  positive), no kernel debounce (1 kHz edges). The duty is measured from the edges'
  kernel timestamps (CLOCK_MONOTONIC) over the last 8 periods. With no edge in the last
  100 ms the pilot is steady: 100 % while the line is high (+12 V), 0 % while low.
  Without a ``pwm_line`` the duty is None.

The pilot voltage (source "adc") is the IIO sysfs raw file ``io.pilot.adc_path`` (e.g.
``/sys/bus/iio/devices/iio:device0/in_voltage0_raw``): volts = raw * adc_scale + adc_offset.
The ADC front end must deliver the pilot's high level (peak hold). A failed or garbled ADC
read gives None (ambiguous) and counts in ``errors``.

``gpiod`` is imported only when a bank needs GPIO lines, so hosts without it can import
this port (and an ADC-only board needs no gpiod at all).
"""

import asyncio
import os
import time
from datetime import timedelta

from ...config import ConfigError
from ...pilot import PinSample, duty_from_edges
from ...wakeup import Wakeup

PWM_STALE_NS = 100 * 1000000  # no edge for this long: the pilot is not oscillating
PWM_PERIODS = 8
EVENT_BUFFER = 256  # kernel edge event buffer; 1 kHz PWM gives ~40 edges per 20 ms sample


class Announcer:
    """``wait_change`` over a file descriptor that becomes readable when the inputs change.

    ``drain()`` reads what is pending on the descriptor and returns True when it announces a
    change. ``announced`` stays True until the bank's ``read`` clears it. Used by the GPIO
    bank (edge events of a line request) and the sim bank (inotify on the pin file).
    """

    def __init__(self, drain):
        self.drain = drain
        self.announced = False
        self.fd = None
        self.loop = None
        self._changed = None

    def watch(self, fd, loop):
        self.unwatch()
        self.fd = fd
        self.loop = loop
        self._changed = Wakeup()
        loop.add_reader(fd, self._readable)

    def unwatch(self):
        """Stop watching (the descriptor stays open: its owner closes it)."""
        if self.fd is None:
            return
        try:
            self.loop.remove_reader(self.fd)
        except (RuntimeError, ValueError):  # the loop is closed: nothing is registered any more
            pass
        self.fd = None

    def _readable(self):
        if self.drain():
            self.announced = True
            self._changed.set()

    async def wait(self, timeout_ms):
        """Return at the next announcement (at once if one is unread) or after ``timeout_ms``."""
        if self.announced:
            return
        changed = self._changed
        changed.clear()
        await changed.wait(timeout_ms)


def _import_gpiod():
    try:
        import gpiod
    except ImportError as error:
        raise OSError("io.driver \"gpiod\" needs the gpiod package "
                      "(pip install 'evse-agent[gpio]'): %s" % error) from error
    return gpiod


class GpiodPinBank:
    """``read()`` samples the GPIO lines and the pilot ADC; ``close()`` releases them."""

    def __init__(self, io_config):
        pilot = io_config["pilot"]
        contactor = io_config["contactor"]
        self.chip = io_config["chip"]
        self.use_lines = pilot["source"] == "lines"
        self.adc_scale = pilot["adc_scale"]
        self.adc_offset = pilot["adc_offset"]
        self.pwm_line = pilot["pwm_line"]
        self.command_line = contactor["command_line"]
        self.feedback_line = contactor["feedback_line"]
        self.errors = 0
        self.last_error = None
        self._level_offsets = _check_lines(pilot, contactor, self.use_lines)
        self._edges = []
        self._sample = PinSample()
        self._adc_fd = None
        self._request = None  # the level lines (pilot comparators, contactor)
        self._pwm_request = None
        self._rising = None
        self._announcer = Announcer(self._drain_level_events)
        if not self.use_lines:
            self.adc_path = pilot["adc_path"]
            try:
                self._adc_fd = os.open(self.adc_path, os.O_RDONLY)
            except OSError as error:
                raise OSError("cannot open the pilot ADC (io.pilot.adc_path) %s: %s"
                              % (self.adc_path, error)) from error
        try:
            self._request_lines(pilot["sample_ms"], contactor["active_low"])
        except BaseException:
            self.close()
            raise
        # Every input announces itself only on a comparator board (an ADC must be sampled).
        self.wait_change = self._wait_change if self.use_lines else None

    @property
    def announced(self):
        return self._announcer.announced

    def _request_lines(self, sample_ms, active_low):
        offsets = list(self._level_offsets)
        if self.pwm_line is not None:
            offsets.append(self.pwm_line)
        if not offsets:
            return
        gpiod = _import_gpiod()
        from gpiod.line import Direction, Edge

        self._rising = gpiod.EdgeEvent.Type.RISING_EDGE
        glitch = timedelta(milliseconds=sample_ms)
        config = {}
        if self.use_lines:
            config[tuple(self._level_offsets[:5])] = gpiod.LineSettings(
                direction=Direction.INPUT, edge_detection=Edge.BOTH, debounce_period=glitch)
        for offset in (self.command_line, self.feedback_line):
            if offset is not None:
                config[offset] = gpiod.LineSettings(
                    direction=Direction.INPUT, edge_detection=Edge.BOTH, debounce_period=glitch,
                    active_low=active_low)
        try:
            if config:
                self._request = gpiod.request_lines(self.chip, config=config, consumer="evse-agent",
                                                    event_buffer_size=EVENT_BUFFER)
            if self.pwm_line is not None:
                self._pwm_request = gpiod.request_lines(
                    self.chip, consumer="evse-agent-pwm", event_buffer_size=EVENT_BUFFER,
                    config={self.pwm_line: gpiod.LineSettings(direction=Direction.INPUT, edge_detection=Edge.BOTH)})
        except (OSError, ValueError) as error:
            raise OSError("cannot request GPIO lines %s on %s: %s"
                          % (", ".join(str(o) for o in offsets), self.chip, error)) from error

    async def _wait_change(self, timeout_ms):
        """Return at the next edge on a level line, or after ``timeout_ms``."""
        announcer = self._announcer
        loop = asyncio.get_running_loop()
        if announcer.fd is None or announcer.loop is not loop:
            announcer.watch(self._request.fd, loop)
            announcer.announced = True  # an edge before the watch is read now
        await announcer.wait(timeout_ms)

    def _drain_level_events(self):
        """Read the level lines' queued edge events (the values are read by ``read``)."""
        request = self._request
        for _ in range(4):  # bounded: a chattering line must not hold up the loop
            if not request.wait_edge_events(0):
                break
            request.read_edge_events()
        return True

    def read(self):
        """The current sample (the same object each time, updated in place).

        An ADC failure gives ``pilot_volts`` None; a GPIO failure raises OSError, which
        the input monitor counts.
        """
        sample = self._sample
        request = self._request
        announcer = self._announcer
        announcer.announced = False
        if request is not None and announcer.fd is None:
            self._drain_level_events()  # sampled, not waited on: keep the kernel queue empty
        values = request.get_values(self._level_offsets) if self._level_offsets else ()
        index = 0
        if self.use_lines:
            sample.pilot_lines = (bool(values[0]), bool(values[1]), bool(values[2]),
                                  bool(values[3]), bool(values[4]))
            index = 5
        else:
            sample.pilot_volts = self._read_adc()
        if self.command_line is not None:
            sample.contactor_command = bool(values[index])
            index += 1
        if self.feedback_line is not None:
            sample.contactor_feedback = bool(values[index])
        if self._pwm_request is not None:
            self._drain_events()
        if self.pwm_line is not None:
            sample.duty_pct = self._duty(time.monotonic_ns())
        return sample

    def _read_adc(self):
        try:
            text = os.pread(self._adc_fd, 64, 0)
            raw = float(text.decode("ascii").strip())
        except (OSError, ValueError) as error:
            self.errors += 1
            self.last_error = "pilot ADC %s: %s" % (self.adc_path, error)
            return None
        return raw * self.adc_scale + self.adc_offset

    def _drain_events(self):
        """Read the PWM line's pending edge events (the kernel keeps the newest)."""
        request = self._pwm_request
        edges = self._edges
        rising = self._rising
        for _ in range(4):  # bounded: a chattering line must not hold up the sample
            if not request.wait_edge_events(0):
                break
            for event in request.read_edge_events():
                edges.append((event.timestamp_ns, event.event_type == rising))
        if len(edges) > 2 * PWM_PERIODS + 1:
            del edges[:-(2 * PWM_PERIODS + 1)]

    def _duty(self, now_ns):
        edges = self._edges
        if edges and now_ns - edges[-1][0] < PWM_STALE_NS:
            return duty_from_edges(edges, PWM_PERIODS)
        del edges[:]  # a later burst must not be measured against these
        return 100.0 if self._pwm_request.get_value(self.pwm_line) else 0.0

    def close(self):
        self._announcer.unwatch()
        for name in ("_request", "_pwm_request"):
            request = getattr(self, name)
            if request is not None:
                request.release()
                setattr(self, name, None)
        if self._adc_fd is not None:
            os.close(self._adc_fd)
            self._adc_fd = None


def _check_lines(pilot, contactor, use_lines):
    """The level lines to read, in sample order; ConfigError for a missing or reused line."""
    named = []
    if use_lines:
        if pilot["lines"] is None:
            raise ConfigError("io.pilot.lines: missing; io.pilot.source \"lines\" needs the 5 comparator lines")
        named += [("io.pilot.lines[%d]" % i, offset) for i, offset in enumerate(pilot["lines"])]
    elif pilot["adc_path"] is None:
        raise ConfigError("io.pilot.adc_path: missing; io.pilot.source \"adc\" with the gpiod driver "
                          "reads the pilot voltage from this IIO file")
    for name in ("command_line", "feedback_line"):
        if contactor[name] is not None:
            named.append(("io.contactor." + name, contactor[name]))
    every = named + ([("io.pilot.pwm_line", pilot["pwm_line"])] if pilot["pwm_line"] is not None else [])
    seen = {}
    for name, offset in every:
        if offset in seen:
            raise ConfigError("%s: line %d is also %s" % (name, offset, seen[offset]))
        seen[offset] = name
    return [offset for _, offset in named]
