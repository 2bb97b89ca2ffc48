"""One decoded meter reading: what every downstream stage consumes."""


class Reading:
    """Meter values from one poll cycle.

    Per-phase lists have one entry per meter phase (1 or 3). ``energy_wh`` is the
    cumulative import register in exact integer Wh (None if the meter sent a non-finite
    float); ``energy_resolution_mwh`` is the register's resolution at that value.
    ``time`` is wall-clock seconds (UTC epoch), ``monotonic_ms`` the poll's monotonic time.
    """

    __slots__ = ("time", "monotonic_ms", "voltage", "current", "power", "power_total",
                 "frequency", "energy_wh", "energy_resolution_mwh", "serial")

    def __init__(self, time, monotonic_ms, voltage, current, power, power_total,
                 frequency, energy_wh, energy_resolution_mwh, serial=None):
        self.time = time
        self.monotonic_ms = monotonic_ms
        self.voltage = voltage
        self.current = current
        self.power = power
        self.power_total = power_total
        self.frequency = frequency
        self.energy_wh = energy_wh
        self.energy_resolution_mwh = energy_resolution_mwh
        self.serial = serial

    def __repr__(self):
        return "Reading(P=%s W, E=%s Wh)" % (self.power_total, self.energy_wh)


def _fmt(value, spec):
    return "-" if value is None else spec % value


def summary_line(reading):
    """One human line per reading, as printed live and by the console's ``meter``."""
    phases = []
    for i in range(len(reading.voltage)):
        phases.append("L%d %s V %s A %s W" % (
            i + 1, _fmt(reading.voltage[i], "%.1f"), _fmt(reading.current[i], "%.2f"),
            _fmt(reading.power[i], "%.0f")))
    energy = "-" if reading.energy_wh is None else "%d.%03d kWh" % divmod(reading.energy_wh, 1000)
    return "%s | total %s W  %s Hz  import %s" % (
        " | ".join(phases), _fmt(reading.power_total, "%.0f"), _fmt(reading.frequency, "%.2f"), energy)
