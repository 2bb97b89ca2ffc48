"""Pin bank of an ESP32 board: pilot ADC or comparator lines, PWM duty from Pin IRQs, contactor.

- Pilot voltage (``io.pilot.source`` "adc"): ``machine.ADC`` on the board's ``adc_pin`` behind
  a divider (and a peak hold: the ADC must see the PWM's high level, as on Linux).
  ``ADC.read_uv()`` gives calibrated microvolts at the pin; pilot volts =
  pin volts x ``io.pilot.adc_scale`` + ``io.pilot.adc_offset`` (e.g. a divider that maps
  -12..+12 V to 0..3.1 V: scale 7.74, offset -12).
- Comparator lines (source "lines"): the five GPIOs in ``io.pilot.lines``.
- PWM duty (``io.pilot.pwm_line``): a ``Pin.irq`` on both edges stores the last periods'
  high and total times in preallocated arrays (no allocation in the handler); ``read``
  takes the median duty of those whose period is the pilot's 1 kHz (+-10 %): an edge
  handled late (soft IRQ latency, a garbage collection) spoils one period, not the
  reading. No edge for 100 ms: the pilot is steady, 100 % while high, 0 % while low.
- Contactor command / feedback: GPIO inputs, ``io.contactor.active_low`` applied.
- With comparator lines every input is a level line, so the bank announces changes: a
  ``Pin.irq`` on both edges of each level line sets a flag (``asyncio.ThreadSafeFlag``, no
  allocation in the handler) that ``wait_change`` awaits, and the input monitor reads
  nothing while no edge comes. An ADC pilot cannot announce: that bank is sampled.

GPIO numbers are the ESP32's (the board file's "line offsets" are GPIO numbers here).
"""

import asyncio
import time
from array import array

from machine import ADC, Pin

from ...pilot import PinSample

PERIODS = 8
STALE_US = 100000
PERIOD_MIN_US = 900    # the pilot PWM is 1 kHz
PERIOD_MAX_US = 1100


class EdgeDuty:
    """PWM duty from edge interrupts: the last ``PERIODS`` periods, allocation-free."""

    def __init__(self, pin_number):
        self.pin = Pin(pin_number, Pin.IN)
        self.high = array("i", [0] * PERIODS)
        self.total = array("i", [0] * PERIODS)
        self.ratios = array("f", [0.0] * PERIODS)
        self.index = 0
        self.count = 0
        self.last_rise = -1
        self.last_fall = -1
        self.last_edge = time.ticks_us()
        self.pin.irq(self._edge, Pin.IRQ_RISING | Pin.IRQ_FALLING)

    def _edge(self, pin):
        now = time.ticks_us()
        self.last_edge = now
        if pin.value():
            if self.last_rise >= 0 and self.last_fall >= 0:
                period = time.ticks_diff(now, self.last_rise)
                high = time.ticks_diff(self.last_fall, self.last_rise)
                if 0 <= high <= period:
                    i = self.index
                    self.high[i] = high
                    self.total[i] = period
                    self.index = (i + 1) % PERIODS
                    if self.count < PERIODS:
                        self.count += 1
            self.last_rise = now
            self.last_fall = -1
        elif self.last_rise >= 0:
            self.last_fall = now

    def duty_pct(self):
        if time.ticks_diff(time.ticks_us(), self.last_edge) > STALE_US or not self.count:
            self.count = 0
            return 100.0 if self.pin.value() else 0.0
        ratios = self.ratios
        n = 0
        for i in range(self.count):
            total = self.total[i]
            if PERIOD_MIN_US <= total <= PERIOD_MAX_US:
                ratio = self.high[i] / total
                j = n  # insertion sort: at most PERIODS values, no allocation
                while j and ratios[j - 1] > ratio:
                    ratios[j] = ratios[j - 1]
                    j -= 1
                ratios[j] = ratio
                n += 1
        if not n:
            return None
        return 100.0 * (ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2)


class MachinePinBank:
    """``read()`` gives the current sample (one object, updated in place)."""

    def __init__(self, io_config, hw):
        pilot = io_config["pilot"]
        contactor = io_config["contactor"]
        self.use_lines = pilot["source"] == "lines"
        self.scale = pilot["adc_scale"]
        self.offset = pilot["adc_offset"]
        self.errors = 0
        self.adc = None
        self.lines = None
        if self.use_lines:
            if pilot["lines"] is None:
                raise ValueError("io.pilot.lines: missing; io.pilot.source \"lines\" needs 5 GPIOs")
            self.lines = [Pin(n, Pin.IN) for n in pilot["lines"]]
        else:
            if hw.get("adc_pin") is None:
                raise ValueError("micropython.adc_pin: missing; io.pilot.source \"adc\" needs the ADC GPIO")
            self.adc = ADC(Pin(hw["adc_pin"]))
            self.adc.atten(ADC.ATTN_11DB)  # about 0.15-3.1 V at the pin
        self.duty = EdgeDuty(pilot["pwm_line"]) if pilot["pwm_line"] is not None else None
        self.active_low = contactor["active_low"]
        self.command = Pin(contactor["command_line"], Pin.IN) if contactor["command_line"] is not None else None
        self.feedback = Pin(contactor["feedback_line"], Pin.IN) if contactor["feedback_line"] is not None else None
        self.sample = PinSample()
        self.announced = False
        self.wait_change = None
        if self.use_lines:
            self._flag = asyncio.ThreadSafeFlag()
            handler = self._edge  # one bound method for every line, made once
            for pin in self.lines + [self.command, self.feedback]:
                if pin is not None:
                    pin.irq(handler, Pin.IRQ_RISING | Pin.IRQ_FALLING)
            self.wait_change = self._wait_change

    def _edge(self, pin):
        self.announced = True
        self._flag.set()

    async def _wait_change(self, timeout_ms):
        """Return at the next edge on a level line, or after ``timeout_ms``."""
        if self.announced:
            return
        try:
            await asyncio.wait_for_ms(self._flag.wait(), timeout_ms)
        except asyncio.TimeoutError:
            pass

    def read(self):
        sample = self.sample
        self.announced = False
        if self.use_lines:
            lines = self.lines
            sample.pilot_lines = (bool(lines[0].value()), bool(lines[1].value()), bool(lines[2].value()),
                                  bool(lines[3].value()), bool(lines[4].value()))
        else:
            try:
                sample.pilot_volts = self.adc.read_uv() / 1000000 * self.scale + self.offset
            except OSError:
                self.errors += 1
                sample.pilot_volts = None
        if self.duty is not None:
            sample.duty_pct = self.duty.duty_pct()
        if self.command is not None:
            sample.contactor_command = bool(self.command.value()) != self.active_low
        if self.feedback is not None:
            sample.contactor_feedback = bool(self.feedback.value()) != self.active_low
        return sample
