"""``machine`` of the host board: the MicroPython unix port wired to the simulators.

On ``MICROPYPATH`` before the built-ins, this module shadows the unix port's ``machine``
(``from umachine import *`` keeps what the port has). The wiring is fixed, like a PCB's,
and ``boards/mpy-unix-sim.json`` describes it; the harness (``tools/testkit/mpy_agent.py``) names
the files it goes through in the environment:

- ``UART(n)``: the device in ``EVSE_UART<n>`` (the meter simulator's pty), raw 8N1 with
  termios, non-blocking reads (VMIN 0, VTIME 0); ``any()`` reads what has arrived.
- Pins read the vehicle simulator's pin file (``EVSE_PIN_FILE``, re-read only when it was
  replaced): GPIO 34 is the pilot ADC behind a divider of pin volts = (pilot + 12) / 8
  (board: ``adc_scale`` 8, ``adc_offset`` -12); GPIO 35 the pilot PWM, whose edges reach
  ``Pin.irq`` handlers as a real 1 kHz period every 20 ms (timed by ``ticks_us``, so the
  port's edge-timing duty meter measures it); GPIO 25 / 26 the contactor command and
  feedback; GPIO 12, 13, 14, 15, 27 a pilot decoder's 5 comparator outputs (high while the
  pilot is below 10.5, 7.5, 4.5, 1.5, -10.5 V). ``Pin.irq`` on these level pins fires on
  each edge when the pin file changes (a task of the board looks at the file every
  ``PWM_EVERY_MS``, as the hardware's comparators would switch). Other pins are plain
  outputs (the RS-485 DE pin).
- ``WDT``: every ``feed()`` rewrites ``EVSE_WDT_FILE`` with the timeout; the harness kills
  the process when a feed is later than the timeout, as the hardware watchdog would.
- ``reset()``: the process kills itself with SIGKILL (no clean-up runs, as on a board).
"""

import asyncio
import json
import os
import termios
import time

from umachine import *  # noqa: F401,F403  (the port's own parts)

PILOT_ADC = 34
PILOT_PWM = 35
CONTACTOR_COMMAND = 25
CONTACTOR_FEEDBACK = 26
COMPARATORS = {12: 10.5, 13: 7.5, 14: 4.5, 15: 1.5, 27: -10.5}  # pin: high below these volts
PWM_PERIOD_US = 1000
PWM_EVERY_MS = 20
_VMIN = 6
_VTIME = 5
# The unix port's termios offers only these of the meter speeds (no B19200 or B38400): other
# speeds set 9600 on the pty, which does not pace anything; the meter simulator's pty link
# paces the line at the board's true baud rate.
_BAUD = {9600: termios.B9600, 57600: termios.B57600, 115200: termios.B115200}

_pins = {"pilot_v": 12.0, "duty_pct": 100.0, "contactor_command": False, "contactor_feedback": False}
_signature = None
_level_irqs = []  # [pin, handler, last level] of the level pins with an irq
_level_task = []


def _pin_file():
    """The pin file's current values (re-read when it was replaced; kept when unusable)."""
    global _signature
    path = os.getenv("EVSE_PIN_FILE")
    try:
        info = os.stat(path)
    except (OSError, TypeError):
        return _pins
    signature = (info[1], info[6], info[8])
    if signature != _signature:
        try:
            with open(path) as handle:
                doc = json.loads(handle.read())
            for key in _pins:
                if doc.get(key) is not None:
                    _pins[key] = doc[key]
            _signature = signature
        except (OSError, ValueError):
            pass
    return _pins


class Pin:
    IN = 0
    OUT = 1
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, number, mode=-1, pull=None, value=None):
        self.number = number
        self._level = 0 if value is None else value
        self._pwm_task = None

    def value(self, level=None):
        if level is not None:
            self._level = level
            return None
        pins = _pin_file()
        if self.number == CONTACTOR_COMMAND:
            return 1 if pins["contactor_command"] else 0
        if self.number == CONTACTOR_FEEDBACK:
            return 1 if pins["contactor_feedback"] else 0
        if self.number in COMPARATORS:
            return 1 if pins["pilot_v"] < COMPARATORS[self.number] else 0
        if self.number == PILOT_PWM:
            duty = pins["duty_pct"]
            if duty >= 100:
                return 1
            if duty <= 0:
                return 0
        return self._level

    __call__ = value

    def irq(self, handler=None, trigger=3):
        if self.number == PILOT_PWM and handler is not None and self._pwm_task is None:
            self._pwm_task = asyncio.create_task(self._pwm(handler))
        elif handler is not None and (self.number in COMPARATORS or self.number in (CONTACTOR_COMMAND,
                                                                                     CONTACTOR_FEEDBACK)):
            _level_irqs.append([self, handler, self.value()])
            if not _level_task:
                _level_task.append(asyncio.create_task(_watch_levels()))

    async def _pwm(self, handler):
        """One PWM period (rise, fall, rise) at the pin file's duty every ``PWM_EVERY_MS``."""
        while True:
            await asyncio.sleep_ms(PWM_EVERY_MS)
            duty = _pin_file()["duty_pct"]
            if duty is None or duty <= 0 or duty >= 100:
                continue
            high_us = int(PWM_PERIOD_US * duty / 100)
            start = time.ticks_us()
            self._level = 1
            handler(self)
            while time.ticks_diff(time.ticks_us(), start) < high_us:
                pass
            self._level = 0
            handler(self)
            while time.ticks_diff(time.ticks_us(), start) < PWM_PERIOD_US:
                pass
            self._level = 1
            handler(self)


async def _watch_levels():
    """The hardware side of the level pins' irqs: an edge when the pin file moved a level."""
    while True:
        await asyncio.sleep_ms(PWM_EVERY_MS)
        for entry in _level_irqs:
            level = entry[0].value()
            if level != entry[2]:
                entry[2] = level
                entry[1](entry[0])


class ADC:
    ATTN_0DB = 0
    ATTN_11DB = 3

    def __init__(self, pin, atten=None):
        self.pin = pin

    def atten(self, value):
        pass

    def read_uv(self):
        return int((_pin_file()["pilot_v"] + 12.0) / 8.0 * 1000000)


class UART:
    def __init__(self, uart_id, baudrate=9600, bits=8, parity=None, stop=1, tx=None, rx=None,
                 timeout=0, timeout_char=0, rxbuf=256):
        path = os.getenv("EVSE_UART%d" % uart_id)
        if not path:
            raise OSError("UART%d: no device (EVSE_UART%d is not set)" % (uart_id, uart_id))
        if bits != 8 or parity is not None or stop != 1:
            raise ValueError("UART%d: the host board has 8N1 only" % uart_id)
        self._file = open(path, "r+b")
        fd = self._file.fileno()
        termios.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = _BAUD.get(baudrate, termios.B9600)
        attrs[6][_VMIN] = 0
        attrs[6][_VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        self._rxbuf = rxbuf
        self._pending = b""

    def any(self):
        if len(self._pending) < self._rxbuf:
            data = self._file.read(self._rxbuf - len(self._pending))
            if data:
                self._pending += data
        return len(self._pending)

    def read(self, count=-1):
        self.any()
        if count < 0 or count >= len(self._pending):
            data, self._pending = self._pending, b""
        else:
            data, self._pending = self._pending[:count], self._pending[count:]
        return data or None

    def write(self, data):
        return self._file.write(data)

    def flush(self):
        """A pty has no wire: what was written is gone."""

    def deinit(self):
        self._file.close()


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.feed()

    def feed(self):
        path = os.getenv("EVSE_WDT_FILE")
        if path:
            with open(path, "w") as handle:
                handle.write("%d\n" % self.timeout)


def reset():
    os.system("kill -9 $PPID")
    while True:
        time.sleep(1)


def unique_id():
    return b"host-board"
