"""RS-485 line for the Modbus master on ``machine.UART``, with direction control.

A half-duplex transceiver (MAX485, SP3485, ...) has a driver-enable pin (DE, often tied to
/RE): high while sending, low to listen. ``write`` raises DE, sends, waits until the last
stop bit has left the UART (``UART.flush()`` blocks until transmission is done on ESP32;
without it, the frame's wire time), then drops DE so the meter's answer is heard.
Transceivers with automatic direction control need no DE pin (``de_pin`` null).

``read`` polls ``UART.any()`` every millisecond from the event loop: the other tasks run
while the meter takes its time to answer, and every wait is bounded by ``timeout_ms``.
"""

import asyncio
import time

from machine import UART, Pin

_PARITY = {"N": None, "E": 0, "O": 1}


class UartStream:
    """The byte stream ``RtuMaster`` expects, over one ESP32 UART."""

    def __init__(self, uart_id, baudrate, parity, stopbits, tx, rx, de=None, de_active_high=True,
                 rxbuf=512):
        self.uart = UART(uart_id, baudrate=baudrate, bits=8, parity=_PARITY[parity], stop=stopbits,
                         tx=tx, rx=rx, timeout=0, timeout_char=0, rxbuf=rxbuf)
        self.char_us = 11000000 // baudrate
        self._on = 1 if de_active_high else 0
        self.de = None
        if de is not None:
            self.de = Pin(de, Pin.OUT, value=1 - self._on)

    def write(self, data):
        de = self.de
        if de is not None:
            de.value(self._on)
        try:
            self.uart.write(data)
            if hasattr(self.uart, "flush"):
                self.uart.flush()  # returns once the last stop bit is out
            else:
                time.sleep_us(len(data) * self.char_us + self.char_us)
        finally:
            if de is not None:
                de.value(1 - self._on)

    def reset_input(self):
        uart = self.uart
        while uart.any():
            uart.read()

    async def read(self, max_bytes, timeout_ms):
        uart = self.uart
        deadline = time.ticks_add(time.ticks_ms(), timeout_ms)
        while True:
            waiting = uart.any()
            if waiting:
                return uart.read(waiting if waiting < max_bytes else max_bytes) or b""
            if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                return b""
            await asyncio.sleep_ms(1)

    def close(self):
        self.uart.deinit()
