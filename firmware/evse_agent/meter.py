"""The power meter: polls a Modbus RTU meter model and yields ``Reading`` objects.

``ModbusMeter`` implements the power-meter interface the agent uses:

- ``await read()`` — a ``Reading`` or ``None`` when this cycle failed;
- ``link`` — a ``MeterLink`` with online state, last error and counters.

A reading is all-or-nothing: if any request of the cycle fails, the cycle yields None,
so downstream stages never see values from two different moments mixed together.

Every value is validated before anything uses it: a non-finite or absurd measurement
becomes None, and an import register that is not finite, negative or beyond
``MAX_ENERGY_WH`` gives a reading without energy. Each such value is a counted meter fault
(``link.value_faults``) and raises ``meter_value_invalid`` through ``alarm`` until the
meter sends a valid register again — never an exception. The serial number is read again
every ``SERIAL_CHECK_MS`` while online, so a meter swapped without an outage is noticed
(``meter_replaced`` through ``notice``; the readings carry the new serial).
"""

from . import log
from .modbus_rtu import ModbusError
from .reading import Reading
from .registers import decode, decode_energy_wh, energy_resolution_mwh, plan_requests, raw_value

# No charge point's meter counts 100 GWh (a 60 kW point would need 190 years): beyond is noise.
MAX_ENERGY_WH = 100000000000
# Other measured values beyond this magnitude (V, A, W, Hz) are noise, not measurements.
MAX_VALUE = 1e9
SERIAL_CHECK_MS = 60000
INF = float("inf")  # the meter's identity is read again this often while online


class MeterLink:
    """Health of the meter link: what an operator or technician asks first."""

    __slots__ = ("online", "since_ms", "consecutive_failures", "last_error", "last_error_ms",
                 "cycles", "failed_cycles", "offline_after", "transitions", "value_faults",
                 "last_value_fault")

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
        self.value_faults = 0  # values the meter sent that were not usable (NaN, negative energy, ...)
        self.last_value_fault = None

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
        self.alarm = None  # alarm(type, active, values): meter_value_invalid starts / ends
        self.notice = None  # notice(type, values): meter_replaced
        self._known_serial = None  # last serial read, kept across outages
        self._serial_read_ms = None
        self._energy_fault = None  # the reason while the register is invalid

    def set_link_timing(self, timeout_ms=None, retries=None):
        """Use a new response timeout and / or retry count (None: keep) from the next poll."""
        if timeout_ms is not None:
            self.master.set_timeout_ms(timeout_ms)
        if retries is not None:
            self.master.set_retries(retries)

    async def read(self):
        """Poll every planned request once; a Reading, or None when the cycle failed."""
        now_ms = self.clock.monotonic_ms()
        values = {}
        energy_wh = None
        try:
            if self.serial_register is not None and (
                    self.serial is None or now_ms - self._serial_read_ms >= SERIAL_CHECK_MS):
                await self._read_serial(now_ms)
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
        energy_wh = self._check_energy(energy_wh)
        resolution = None
        if energy_wh is not None:
            resolution = energy_resolution_mwh(self.model.energy_register, energy_wh)
        return self._reading(values, energy_wh, resolution, now_ms)

    def _check_energy(self, energy_wh):
        """The register in Wh if usable, else None with the fault counted and alarmed."""
        if self.model.energy_register is None:
            return energy_wh
        if energy_wh is None:
            reason = "not_finite"
        elif energy_wh < 0:
            reason = "negative"
        elif energy_wh > MAX_ENERGY_WH:
            reason = "out_of_range"
        else:
            if self._energy_fault is not None:
                log.info("meter import register valid again (%d Wh)" % energy_wh)
                self._energy_fault = None
                if self.alarm is not None:
                    self.alarm("meter_value_invalid", False, {"energy_wh": energy_wh})
            return energy_wh
        self._value_fault("energy_wh", reason, energy_wh)
        if self._energy_fault != reason:
            log.warning("meter import register is invalid (%s: %s); its readings carry no energy"
                        % (reason, energy_wh))
            raise_alarm = self._energy_fault is None
            self._energy_fault = reason
            if raise_alarm and self.alarm is not None:
                self.alarm("meter_value_invalid", True, {"register": "energy_wh", "reason": reason,
                                                         "value": None if energy_wh is None else str(energy_wh)})
        return None

    def _value_fault(self, name, reason, value):
        link = self.link
        link.value_faults += 1
        link.last_value_fault = "%s %s (%s)" % (name, reason, value)

    async def read_raw(self, function, address, count):
        """Raw register bytes for diagnosis (console ``meter regs``); raises ModbusError."""
        return await self.master.read_registers(self.unit_id, function, address, count)

    async def _read_serial(self, now_ms):
        reg = self.serial_register
        data = await self.master.read_registers(self.unit_id, reg.function, reg.address, reg.count)
        serial = raw_value(reg, data, 0)
        self._serial_read_ms = now_ms
        known = self._known_serial
        if known is not None and serial != known:
            log.warning("meter %s unit %d: serial changed %s -> %s (meter replaced)"
                        % (self.model.name, self.unit_id, known, serial))
            if self.notice is not None:
                self.notice("meter_replaced", {"from_serial": known, "to_serial": serial})
        self._known_serial = serial
        self.serial = serial

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
        for name in values:
            value = values[name]
            # NaN fails both comparisons; inf and noise fail the bound.
            if value is not None and not (-MAX_VALUE <= value <= MAX_VALUE):
                finite = value == value and value not in (INF, -INF)
                self._value_fault(name, "out_of_range" if finite else "not_finite", value)
                values[name] = None
        get = values.get
        voltage = [get("voltage_" + p) for p in names]
        current = [get("current_" + p) for p in names]
        power = [get("power_" + p) for p in names]
        power_total = get("power_total")
        if power_total is None and None not in power:
            power_total = sum(power)
        return Reading(self.clock.time(), now_ms, voltage, current, power, power_total,
                       get("frequency"), energy_wh, resolution, self.serial)
