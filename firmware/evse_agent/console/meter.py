"""Console command ``meter``: the latest reading, ``meter watch`` and raw ``meter regs``.

Bound to ``Console`` when a command of this group is first used (see the package
docstring): ``self`` is the console."""

from ..messages import iso_utc
from ..modbus_rtu import ModbusError
from ..registers import float32_from_bits
from . import (CommandError, READ_MAX, WATCH_MS, _date_time, _error_text, _fit, _no_args, _number,
    _pad, _rpad, match)


async def cmd_meter(self, args):
    if args:
        sub = match(args[0], ("watch", "regs"), "meter command")
        if sub == "watch":
            _no_args(args[1:], "meter watch")
            await self._watch()
        else:
            await self._regs(args[1:])
        return
    agent = self.agent
    meter = agent.meter
    link = meter.link
    self._say("meter      %s unit %d, serial %s, %s" % (
        meter.model.name, meter.unit_id, "-" if meter.serial is None else meter.serial,
        "online" if link.online else "OFFLINE (%s)" % (link.last_error or "no answer yet")))
    reading = agent.latest
    if reading is None:
        self._say("no reading yet")
        return
    age = (self.clock.monotonic_ms() - reading.monotonic_ms) / 1000
    self._say("reading    %s UTC, %.1f s ago" % (_date_time(reading.time), age))
    phases = len(reading.voltage)
    self._say(" " * 10 + "".join(_rpad("L%d" % (i + 1), 11) for i in range(phases)))
    for label, values, spec, unit in (("voltage", reading.voltage, "%.1f", "V"),
                                      ("current", reading.current, "%.3f", "A"),
                                      ("power", reading.power, "%.0f", "W")):
        cells = ["-" if v is None else (spec + " %s") % (v, unit) for v in values]
        self._say(_pad(label, 10) + "".join(_rpad(cell, 11) for cell in cells))
    self._say("total      %s W, %s Hz" % (
        "-" if reading.power_total is None else "%.0f" % reading.power_total,
        "-" if reading.frequency is None else "%.2f" % reading.frequency))
    energy = reading.energy_wh
    if energy is None:
        self._say("import     - (the register holds no number)")
    else:
        resolution = reading.energy_resolution_mwh
        self._say("import     %d Wh (%d.%03d kWh), resolution %s Wh" % (
            energy, energy // 1000, energy % 1000,
            "-" if resolution is None else "%.3f" % (resolution / 1000)))

async def _watch(self):
    """A line per new reading until a key is pressed (the key is used up)."""
    agent = self.agent
    phases = agent.meter.model.phases
    names = ["L%d" % (i + 1) for i in range(phases)]
    self._say("watching the meter; press any key to stop")
    self._say("time     " + "".join(_rpad(n + " V", 7) for n in names) + "  "
              + "".join(_rpad(n + " A", 7) for n in names) + _rpad("power W", 10) + _rpad("import kWh", 13))
    shown = None
    online = True
    while not self._key_in_input():  # typed ahead, or read below
        reading = agent.latest
        if reading is not None and reading is not shown:
            shown = reading
            volts = "".join(_rpad("-" if v is None else "%.1f" % v, 7) for v in reading.voltage)
            amps = "".join(_rpad("-" if a is None else "%.2f" % a, 7) for a in reading.current)
            power = "-" if reading.power_total is None else "%.0f" % reading.power_total
            energy = "-" if reading.energy_wh is None else "%d.%03d" % divmod(reading.energy_wh, 1000)
            self._say(iso_utc(reading.time)[11:19] + " " + volts + "  " + amps
                      + _rpad(power, 10) + _rpad(energy, 13))
        link = agent.meter.link
        if link.online != online:
            online = link.online
            self._say("meter online again" if online else "meter OFFLINE: %s" % _fit(link.last_error or "", 60))
        data = await self.stream.read(READ_MAX, WATCH_MS)
        if data:
            self.lock.touch(self.clock.monotonic_ms())
            self._input = data
            self._pos = 0
    self._say("stopped watching")

def _key_in_input(self):
    """Use up one pending key; False when nothing (but a CR's LF) is pending."""
    while self._pos < len(self._input):
        byte = self._input[self._pos]
        self._pos += 1
        if self.editor.take_key(byte):
            return True
    return False

async def _regs(self, args):
    """``meter regs <addr> <n> [input|holding]``: raw registers, with float32 pairs."""
    if len(args) not in (2, 3):
        raise CommandError("usage: meter regs <addr> <n> [input|holding]")
    address = _number(args[0], "address", 0, 0xFFFF)
    count = _number(args[1], "count", 1, 125)
    if address + count > 0x10000:
        raise CommandError("address %d + count %d runs past register 65535" % (address, count))
    kind = match(args[2], ("input", "holding"), "register kind") if len(args) == 3 else "input"
    function = 4 if kind == "input" else 3
    meter = self.agent.meter
    try:
        data = await meter.read_raw(function, address, count)
    except ModbusError as error:
        raise CommandError("meter did not answer: %s" % _error_text(error))
    self._say("unit %d, function %02d (%s registers), %d from 0x%04X:"
              % (meter.unit_id, function, kind, count, address))
    self._say("address         hex    u16   float32 (with the next)")
    for i in range(count):
        word = (data[2 * i] << 8) | data[2 * i + 1]
        line = "0x%04X %5d  %04X  %5d" % (address + i, address + i, word, word)
        if i % 2 == 0 and i + 1 < count:
            bits = (word << 16) | (data[2 * i + 2] << 8) | data[2 * i + 3]
            line += "   %.7g" % float32_from_bits(bits)
        self._say(line)


METHODS = (cmd_meter, _watch, _key_in_input, _regs)
