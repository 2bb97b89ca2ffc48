"""Register maps of the supported energy meters.

Each model lists the registers the agent reads, with the maker's function code, address,
data type, word order, unit and scale, plus the limits that shape request planning:
``max_registers`` (largest read the meter accepts) and ``answered`` (address ranges the
meter answers without an exception, so a gap inside them may be bridged by one read).

Field names are fixed across models; a single-phase meter simply has no ``*_l2``/``*_l3``.
"""

from .registers import (
    FLOAT32, UINT16, INT32, UINT32, UINT64,
    FN_READ_HOLDING, FN_READ_INPUT, INVALID_PATTERN,
    Register,
)

MEASUREMENT_FIELDS = (
    "voltage_l1", "voltage_l2", "voltage_l3",
    "current_l1", "current_l2", "current_l3",
    "power_l1", "power_l2", "power_l3",
    "power_total", "frequency", "energy_import", "serial",
)


class MeterModel:
    """A meter type: its registers and the request limits the maker documents."""

    __slots__ = ("name", "vendor", "product", "description", "source", "phases", "max_registers",
                 "answered", "registers", "by_name", "energy_register")

    def __init__(self, name, vendor, product, description, source, phases, max_registers, answered,
                 registers):
        self.name = name
        self.vendor = vendor  # OCMF MV
        self.product = product  # OCMF MM
        self.description = description
        self.source = source
        self.phases = phases
        self.max_registers = max_registers
        self.answered = answered
        self.registers = registers
        self.by_name = {}
        for reg in registers:
            if reg.name not in MEASUREMENT_FIELDS:
                raise ValueError("model %s: register name %r is not a known field" % (name, reg.name))
            self.by_name[reg.name] = reg
        if "energy_import" not in self.by_name:
            raise ValueError("model %s has no energy_import register" % name)
        self.energy_register = self.by_name["energy_import"]

    def __repr__(self):
        return "MeterModel(%s)" % self.name


def _f(name, address, unit):
    return Register(name, FN_READ_INPUT, address, FLOAT32, unit)


# Eastron SDM630-Modbus V2 (three-phase). Source: Eastron "SDM630Modbus Smart Meter Modbus
# Protocol Implementation" V1.8 / V2.0 (eastroneurope.com SDM630_MODBUS_Protocol.pdf), section
# 1.2 "Input Registers" (function 04, every value an IEEE-754 float32 in two registers, high
# word first by default) and section 1.3 "Holding Registers" (function 03):
#   30001/30003/30005 = 0x0000/0x0002/0x0004  phase 1/2/3 line-to-neutral volts   [V]
#   30007/30009/30011 = 0x0006/0x0008/0x000A  phase 1/2/3 current                 [A]
#   30013/30015/30017 = 0x000C/0x000E/0x0010  phase 1/2/3 active power            [W]
#   30053             = 0x0034                total system power                  [W]
#   30071             = 0x0046                frequency of supply voltages        [Hz]
#   30073             = 0x0048                import active energy (import Wh since last reset)
#                                             [kWh at the default energy-unit prefix]
#   464513            = 0xFC00 (holding)      serial number, unsigned 32-bit, read-only
# Cross-checked in reaper7/SDM_Energy_Meter SDM.h (register table, SDM_HOLDING_SERIAL_NUMBER
# 0xFC00), nmakel/sdm_modbus src/sdm_modbus/sdm.py (SDM630 map, serial 0xfc00 UINT32) and
# volkszaehler/mbmd meters/rs485/sdm.go. Older SDM630 protocol versions also list a serial
# number as two float parameters at holding 40043/40045 (0x002A/0x002C); not used here.
# Request limit: "each request for data must be restricted to 40 parameters or less" = 80
# registers (SDM630 protocol V1.x/V2 section 1.2; 80 registers per read also in the mbmap
# transcription of V1.8). Requests must cover whole parameters (even start, even count).
# Answered ranges: only runs of consecutive documented parameters. The input table has holes
# (0x002C, 0x0032, 0x0036, 0x003A, 0x0040, 0x0044 are not listed) and the protocol does not
# say what an unlisted register returns, so no read bridges a hole. (unconfirmed: whether a
# hole answers with zeros or an exception; some libraries read across holes in practice.)
SDM630 = MeterModel(
    name="sdm630",
    vendor="Eastron",
    product="SDM630",
    description="Eastron SDM630 three-phase meter",
    source=("Eastron SDM630Modbus Smart Meter Modbus Protocol Implementation V1.8/V2.0, "
            "sec. 1.2 Input Registers (30001-30087, fn 04, float32 high word first, "
            "max 40 parameters/request) and sec. 1.3 Holding Registers (464513 = 0xFC00 "
            "serial number, fn 03, unsigned int32)"),
    phases=3,
    max_registers=80,
    # 30001-30080 answer as one block, unlisted addresses included: readers in the field
    # fetch it in a single request (e.g. sdm_modbus's read_all). Planning bridges a gap only
    # where that saves line time.
    answered=((FN_READ_INPUT, 0x0000, 0x004F),),
    registers=(
        _f("voltage_l1", 0x0000, "V"),
        _f("voltage_l2", 0x0002, "V"),
        _f("voltage_l3", 0x0004, "V"),
        _f("current_l1", 0x0006, "A"),
        _f("current_l2", 0x0008, "A"),
        _f("current_l3", 0x000A, "A"),
        _f("power_l1", 0x000C, "W"),
        _f("power_l2", 0x000E, "W"),
        _f("power_l3", 0x0010, "W"),
        _f("power_total", 0x0034, "W"),
        _f("frequency", 0x0046, "Hz"),
        _f("energy_import", 0x0048, "kWh"),
        Register("serial", FN_READ_HOLDING, 0xFC00, UINT32),
    ),
)

# Eastron SDM120-Modbus (single-phase). Source: Eastron "SDM120Modbus Smart Meter Modbus
# Protocol Implementation" V2.4/V2.5, input register table (function 04, IEEE-754 float32,
# high word first) and holding register table (function 03):
#   30001 = 0x0000 voltage [V]; 30007 = 0x0006 current [A]; 30013 = 0x000C active power [W];
#   30071 = 0x0046 frequency [Hz]; 30073 = 0x0048 import active energy [kWh];
#   0xFC00 (holding) serial number, unsigned 32-bit.
# Cross-checked in volkszaehler/mbmd meters/rs485/sdm120.go, nmakel/sdm_modbus
# src/sdm_modbus/sdm.py (SDM120 map, serial 0xfc00 UINT32) and reaper7/SDM_Energy_Meter SDM.h.
# The SDM120 defines far fewer input parameters than the SDM630: 0x0002-0x0005, 0x0008-0x000B,
# ... are holes, so the old answered range 0x0000-0x004B was wrong. Answered ranges below are
# the documented parameters only (runs of consecutive parameters merged); no hole is bridged.
# unconfirmed: the per-request parameter limit of the SDM120 was not found in the documents
# reachable here. The single-phase sibling SDM230 (protocol V1.1) and the SDM72D-M document
# 30 parameters per request, so 30 parameters = 60 registers is used as the safe value (the
# SDM630's 40 is not assumed). The planned reads here are at most 10 registers anyway.
SDM120 = MeterModel(
    name="sdm120",
    vendor="Eastron",
    product="SDM120",
    description="Eastron SDM120 single-phase meter",
    source=("Eastron SDM120Modbus Smart Meter Modbus Protocol Implementation V2.4/V2.5, "
            "input registers 30001/30007/30013/30071/30073 (fn 04, float32 high word first) "
            "and holding register 0xFC00 serial number (fn 03, unsigned int32); "
            "request limit unconfirmed (30 parameters assumed, as SDM230/SDM72D-M)"),
    phases=1,
    max_registers=60,
    # 30001-30080 answer as one block, unlisted addresses included: readers in the field
    # fetch it in a single request (e.g. sdm_modbus's read_all). Planning bridges a gap only
    # where that saves line time.
    answered=((FN_READ_INPUT, 0x0000, 0x004F),),
    registers=(
        _f("voltage_l1", 0x0000, "V"),
        _f("current_l1", 0x0006, "A"),
        _f("power_l1", 0x000C, "W"),
        _f("frequency", 0x0046, "Hz"),
        _f("energy_import", 0x0048, "kWh"),
        Register("serial", FN_READ_HOLDING, 0xFC00, UINT32),
    ),
)


def _h(name, address, dtype, unit="", exp10=0):
    """An ABB holding register; ABB sends the type's invalid pattern for missing quantities."""
    return Register(name, FN_READ_HOLDING, address, dtype, unit, exp10, invalid=INVALID_PATTERN[dtype])


# ABB B23 (EQ meter B-series, three-phase). Source: ABB "B23/B24 User Manual",
# 2CMC485003M0201 (revision A 2013-06-20 .. revision E 2025-11-07), chapter 9 "Communication
# with Modbus": 9.1.1 function code 3 (read holding registers), 9.2 "Reading and Writing to
# Registers", 9.3 "Mapping Tables". Multi-register values: most significant byte in the first
# (lowest) register, i.e. high word first. Mapping tables:
#   Total energy accumulators: active import kWh 0x5000, 4 registers, res. 0.01 kWh, unsigned
#   Instantaneous values: voltage L1-N/L2-N/L3-N 0x5B00/0x5B02/0x5B04, 2 regs, 0.1 V, unsigned;
#     current L1/L2/L3 0x5B0C/0x5B0E/0x5B10, 2 regs, 0.01 A, unsigned;
#     active power total/L1/L2/L3 0x5B14/0x5B16/0x5B18/0x5B1A, 2 regs, 0.01 W, signed;
#     frequency 0x5B2C, 1 reg, 0.01 Hz, unsigned
#   Production data and identification: serial number 0x8900, 2 regs, unsigned
# 9.2: the readable range is registers 0x1000-0x8EFF; any number of registers between 1 and
# 125 may be read; reading outside the range gives exception 2 (illegal data address); unused
# registers inside the range (quantities the meter lacks) give a NORMAL response with the value
# "invalid" (all FFFF for unsigned, 7FFF.. for signed). So a read may bridge any gap inside
# 0x1000-0x8EFF; the caller must treat the invalid pattern as "no value".
# The B23 wording of 9.2 was read via the mbmap transcription of revision E; the identical
# text is in the ABB A43/A44 User Manual 2CMC48001M0201 rev. C section 9.3 (same EQ mapping).
# Cross-checked in openWB/core packages/modules/common/b23.py (0x5B00 UINT32/10,
# 0x5B0C UINT32/100, 0x5B14 INT32x4/100, 0x5B2C UINT16/100, 0x5000 UINT64*10 Wh,
# 0x8900 UINT32 serial, invalid = FFFF../7FFF..), volkszaehler/mbmd meters/rs485/abb.go and
# victronenergy/dbus-modbus-client abb.py.
ABB_B23 = MeterModel(
    name="abb_b23",
    vendor="ABB",
    product="B23",
    description="ABB B23 three-phase meter",
    source=("ABB B23/B24 User Manual 2CMC485003M0201, ch. 9 Communication with Modbus: "
            "9.2 Reading and Writing to Registers (readable 0x1000-0x8EFF, 1-125 registers, "
            "unused registers read as invalid FFFF/7FFF), 9.3 Mapping Tables (0x5000 active "
            "import kWh, 0x5B00.. instantaneous values, 0x8900 serial number)"),
    phases=3,
    max_registers=125,
    answered=((FN_READ_HOLDING, 0x1000, 0x8EFF),),
    registers=(
        _h("energy_import", 0x5000, UINT64, "kWh", -2),
        _h("voltage_l1", 0x5B00, UINT32, "V", -1),
        _h("voltage_l2", 0x5B02, UINT32, "V", -1),
        _h("voltage_l3", 0x5B04, UINT32, "V", -1),
        _h("current_l1", 0x5B0C, UINT32, "A", -2),
        _h("current_l2", 0x5B0E, UINT32, "A", -2),
        _h("current_l3", 0x5B10, UINT32, "A", -2),
        _h("power_total", 0x5B14, INT32, "W", -2),
        _h("power_l1", 0x5B16, INT32, "W", -2),
        _h("power_l2", 0x5B18, INT32, "W", -2),
        _h("power_l3", 0x5B1A, INT32, "W", -2),
        _h("frequency", 0x5B2C, UINT16, "Hz", -2),
        _h("serial", 0x8900, UINT32),
    ),
)

MODELS = {model.name: model for model in (SDM630, SDM120, ABB_B23)}


def model_named(name):
    """The meter model called ``name``; ValueError naming the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError("unknown meter model %r (known: %s)" % (name, ", ".join(sorted(MODELS))))
