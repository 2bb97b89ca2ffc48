"""The power meter: polls a Modbus RTU meter model and yields ``Reading`` objects.

``ModbusMeter`` implements the power-meter interface the agent uses:

- ``await read()`` — a ``Reading`` or ``None`` when this cycle failed;
- ``link`` — a ``MeterLink`` with online state, last error and counters.

A reading is all-or-nothing: if any request of the cycle fails, the cycle yields None,
so downstream stages never see values from two different moments mixed together.
"""

from . import log
from .modbus_rtu import ModbusError
from .reading import Reading
from .registers import decode, decode_energy_wh, energy_resolution_mwh, plan_requests, raw_value


class MeterLink:
    """Health of the meter link: what an operator or technician asks first."""

    __slots__ = ("online", "since_ms", "consecutive_failures", "last_error", "last_error_ms",
                 "cycles", "failed_cycles", "offline_after", "transitions")

    def __init__(self, offline_after, now_ms):
        self.online = False
        self.since_ms = now_ms
        self.consecutive_failures = 0
        self.last_error = None
        self.last_error_ms = None
        self.cycles = 0
        self.failed_cycles = 0
        self.offline_after = offline_after
        self.transitions = 0  # grows on every change worth reporting (online / declared offline)

    def record_success(self, now_ms):
        """Count a good cycle; True when this brings the link online."""
        self.cycles += 1
        self.consecutive_failures = 0
        if not self.online:
            self.online = True
            self.since_ms = now_ms
            self.transitions += 1
            return True
        return False

    def record_failure(self, error_text, now_ms):
        """Count a failed cycle; True when this declares the link offline (once per outage)."""
        self.cycles += 1
        self.failed_cycles += 1
        self.consecutive_failures += 1
        self.last_error = error_text
        self.last_error_ms = now_ms
        if self.consecutive_failures == self.offline_after:
            self.online = False
            self.since_ms = now_ms
            self.transitions += 1
            return True
        return False


class ModbusMeter:
    """A meter model read through an ``RtuMaster`` at one unit id."""

    def __init__(self, master, model, unit_id, clock, offline_after=3):
        self.master = master
        self.model = model
        self.unit_id = unit_id
        self.clock = clock
        measured = [reg for reg in model.registers if reg.name != "serial"]
        self.requests = plan_requests(measured, model.max_registers, model.answered)
        self.serial_register = model.by_name.get("serial")
        self.serial = None
        self.link = MeterLink(offline_after, clock.monotonic_ms())
        self._phases = model.phases

    async def read(self):
        """Poll every planned request once; a Reading, or None when the cycle failed."""
        now_ms = self.clock.monotonic_ms()
        values = {}
        energy_wh = None
        try:
            if self.serial is None and self.serial_register is not None:
                await self._read_serial()
            energy_reg = self.model.energy_register
            for request in self.requests:
                data = await self.master.read_registers(
                    self.unit_id, request.function, request.address, request.count)
                for reg in request.registers:
                    offset = 2 * (reg.address - request.address)
                    if reg is energy_reg:
                        energy_wh = decode_energy_wh(reg, data, offset)
                    else:
                        values[reg.name] = decode(reg, data, offset)
        except ModbusError as error:
            self._fail("%s: %s" % (error.kind, error), now_ms)
            return None
        if self.link.record_success(now_ms):
            log.info("meter %s unit %d online (serial %s)" % (self.model.name, self.unit_id, self.serial))
        resolution = None
        if energy_wh is not None:
            resolution = energy_resolution_mwh(self.model.energy_register, energy_wh)
        return self._reading(values, energy_wh, resolution, now_ms)

    async def read_raw(self, function, address, count):
        """Raw register bytes for diagnosis (console ``meter regs``); raises ModbusError."""
        return await self.master.read_registers(self.unit_id, function, address, count)

    async def _read_serial(self):
        reg = self.serial_register
        data = await self.master.read_registers(self.unit_id, reg.function, reg.address, reg.count)
        self.serial = raw_value(reg, data, 0)

    def _fail(self, text, now_ms):
        if self.link.record_failure(text, now_ms):
            log.warning("meter %s unit %d offline after %d failed cycles: %s"
                        % (self.model.name, self.unit_id, self.link.consecutive_failures, text))
            # A different meter may come back: read its serial again.
            self.serial = None
        else:
            log.debug("meter cycle failed: %s" % text)

    def _reading(self, values, energy_wh, resolution, now_ms):
        phases = self._phases
        names = ("l1", "l2", "l3")[:phases]
        get = values.get
        voltage = [get("voltage_" + p) for p in names]
        current = [get("current_" + p) for p in names]
        power = [get("power_" + p) for p in names]
        power_total = get("power_total")
        if power_total is None and None not in power:
            power_total = sum(power)
        return Reading(self.clock.time(), now_ms, voltage, current, power, power_total,
                       get("frequency"), energy_wh, resolution, self.serial)
