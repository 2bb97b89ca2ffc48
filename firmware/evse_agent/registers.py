"""Declarative meter register maps: data types, decoding, and request planning.

A meter model (see ``meter_models``) lists the registers the agent reads. This module
turns that list into the read requests that keep the line busy the least (``plan_requests``)
and decodes the returned register bytes into values (``decode``), with energy decoded
exactly into integer watt-hours (``decode_energy_wh``) so billing never touches floats.

Portable: runs unchanged on CPython and MicroPython (no dataclasses, enum, typing,
struct format features beyond ``>f``/``>I`` are avoided; integers are built by hand).
"""

# Data types: (name, registers). Names double as the wire format identifiers.
FLOAT32 = "float32"
INT16 = "int16"
UINT16 = "uint16"
INT32 = "int32"
UINT32 = "uint32"
UINT64 = "uint64"

REGISTER_COUNT = {FLOAT32: 2, INT16: 1, UINT16: 1, INT32: 2, UINT32: 2, UINT64: 4}

# The "no value" pattern of meters that mark missing quantities (ABB): all ones for
# unsigned types, the largest positive value for signed types.
INVALID_PATTERN = {INT16: 0x7FFF, UINT16: 0xFFFF, INT32: 0x7FFFFFFF, UINT32: 0xFFFFFFFF,
                   UINT64: 0xFFFFFFFFFFFFFFFF}

FN_READ_HOLDING = 3
FN_READ_INPUT = 4


class Register:
    """One value a meter exposes: where it lives and how to read it.

    ``exp10`` is the decimal scale: the value is ``raw * 10**exp10`` in ``unit``
    (ABB's 0.01 kWh energy counter is ``exp10=-2``, unit ``kWh``). Float registers
    normally carry ``exp10=0``. ``invalid`` is the raw value (after sign handling) that
    the meter sends for a quantity it does not have; it decodes to None.
    """

    __slots__ = ("name", "function", "address", "dtype", "unit", "exp10", "word_order", "count",
                 "invalid")

    def __init__(self, name, function, address, dtype, unit="", exp10=0, word_order="big",
                 invalid=None):
        if dtype not in REGISTER_COUNT:
            raise ValueError("register %s: unknown data type %r" % (name, dtype))
        if function not in (FN_READ_HOLDING, FN_READ_INPUT):
            raise ValueError("register %s: function %r is not 3 or 4" % (name, function))
        if word_order not in ("big", "little"):
            raise ValueError("register %s: word order %r is not 'big' or 'little'" % (name, word_order))
        self.name = name
        self.function = function
        self.address = address
        self.dtype = dtype
        self.unit = unit
        self.exp10 = exp10
        self.word_order = word_order
        self.count = REGISTER_COUNT[dtype]
        self.invalid = invalid  # raw value the meter sends for "no value", if it has one

    @property
    def end(self):
        """Address one past the last register of this value."""
        return self.address + self.count

    def __repr__(self):
        return "Register(%s, fn %d, 0x%04X, %s)" % (self.name, self.function, self.address, self.dtype)


class ReadRequest:
    """One planned Modbus read: function, first address, register count, and the values it carries."""

    __slots__ = ("function", "address", "count", "registers")

    def __init__(self, function, address, count, registers):
        self.function = function
        self.address = address
        self.count = count
        self.registers = registers

    def __repr__(self):
        return "ReadRequest(fn %d, 0x%04X, %d regs)" % (self.function, self.address, self.count)


def _answered(answered, function, first, last):
    """True when the meter answers every register in [first, last] for ``function``.

    Ranges that touch or overlap count as one: the span may run across several of them.
    """
    spans = sorted((lo, hi) for fn, lo, hi in answered if fn == function)
    covered_to = first - 1  # every register up to here is answered
    for lo, hi in spans:
        if lo > covered_to + 1:
            if lo > first:
                break
            continue
        if hi > covered_to:
            covered_to = hi
        if covered_to >= last:
            return True
    return covered_to >= last


# Line time of one read transaction beyond its register bytes, in characters: the request
# (8), the response's unit, function, byte count and CRC (5), and the 3.5-character
# silence the line needs before each of the two frames (7).
TRANSACTION_CHARS = 20


def request_chars(count):
    """Characters one read of ``count`` registers keeps the line busy (see TRANSACTION_CHARS)."""
    return TRANSACTION_CHARS + 2 * count


def plan_requests(registers, max_registers, answered=()):
    """Group ``registers`` into the read requests that take the least time on the line.

    Registers with the same function code may share one request while its span stays
    within ``max_registers`` and every register in between (the gap being bridged) lies
    in one of the ``answered`` ranges ``(function, first, last)`` -- ranges the meter is
    known to answer without an exception. Bridging a gap costs 2 characters per register;
    a separate request costs ``TRANSACTION_CHARS``. Dynamic programming over each
    function's registers in address order finds the plan with the fewest characters (ties:
    fewer requests), so a plan is never worse than one request per contiguous run.
    """
    requests = []
    functions = sorted(set(reg.function for reg in registers))
    for function in functions:
        regs = sorted((r for r in registers if r.function == function), key=lambda r: r.address)
        for reg in regs:
            if reg.count > max_registers:
                raise ValueError("register %s needs %d registers, more than the meter's maximum %d"
                                 % (reg.name, reg.count, max_registers))
        # best[j]: (characters, requests, first register index of the last request) for regs[:j]
        best = [(0, 0, 0)]
        for j in range(1, len(regs) + 1):
            last = regs[j - 1]
            choice = None
            for i in range(j, 0, -1):
                first = regs[i - 1]
                span = last.end - first.address
                if span > max_registers:
                    break
                gap_first, gap_end = first.end, regs[i].address if i < j else first.end
                if gap_end > gap_first and not _answered(answered, function, gap_first, gap_end - 1):
                    break  # this gap cannot be bridged, nor can any wider span
                chars, count, _ = best[i - 1]
                candidate = (chars + request_chars(span), count + 1, i - 1)
                if choice is None or candidate[:2] < choice[:2]:
                    choice = candidate
            best.append(choice)
        bounds = []
        j = len(regs)
        while j > 0:
            i = best[j][2]
            bounds.append((i, j))
            j = i
        for i, j in reversed(bounds):
            group = regs[i:j]
            address = group[0].address
            requests.append(ReadRequest(function, address, group[-1].end - address, group))
    return requests


def _uint(data, offset, nregs, word_order):
    """Unsigned integer from ``nregs`` big-endian registers at byte ``offset``."""
    value = 0
    if word_order == "big":
        for i in range(nregs):
            value = (value << 16) | (data[offset + 2 * i] << 8) | data[offset + 2 * i + 1]
    else:
        for i in range(nregs - 1, -1, -1):
            value = (value << 16) | (data[offset + 2 * i] << 8) | data[offset + 2 * i + 1]
    return value


def float32_from_bits(bits):
    """IEEE-754 single from its 32-bit pattern, as a Python float (NaN/inf preserved)."""
    sign = -1.0 if bits >> 31 else 1.0
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    if exponent == 0xFF:
        if mantissa:
            return float("nan")
        return sign * float("inf")
    if exponent == 0:
        return sign * mantissa * 2.0 ** -149
    return sign * (mantissa | 0x800000) * 2.0 ** (exponent - 150)


def raw_value(reg, data, offset):
    """The register's raw integer (or float32 bit pattern) at byte ``offset`` of ``data``."""
    raw = _uint(data, offset, reg.count, reg.word_order)
    dtype = reg.dtype
    if dtype == INT16 and raw & 0x8000:
        raw -= 0x10000
    elif dtype == INT32 and raw & 0x80000000:
        raw -= 0x100000000
    return raw


def decode(reg, data, offset):
    """The register's value in its unit: float, int for unscaled integers, None if invalid."""
    raw = raw_value(reg, data, offset)
    if raw == reg.invalid:
        return None
    if reg.dtype == FLOAT32:
        value = float32_from_bits(raw)
    else:
        value = raw
    if reg.exp10:
        return value * 10.0 ** reg.exp10
    return value


_UNIT_TO_WH = {"Wh": 0, "kWh": 3}


def _round_half_up_shift(numerator, shift):
    """round(numerator / 2**shift) for numerator >= 0, ties away from zero, in integers."""
    if shift <= 0:
        return numerator << -shift
    return (numerator + (1 << (shift - 1))) >> shift


def _scale_exact(mantissa, exp2, exp10):
    """round(mantissa * 2**exp2 * 10**exp10) in integers, for mantissa >= 0."""
    num = mantissa
    den_shift = 0
    if exp2 >= 0:
        num <<= exp2
    else:
        den_shift = -exp2
    if exp10 >= 0:
        num *= 10 ** exp10
        return _round_half_up_shift(num, den_shift)
    den = (10 ** -exp10) << den_shift
    return (num + den // 2) // den


def decode_energy_wh(reg, data, offset):
    """Cumulative energy register as exact integer Wh; None if not finite or marked invalid.

    Integer registers scale exactly (``raw * 10**exp10`` in kWh or Wh). float32 registers
    are decoded from their bit pattern with integer arithmetic, so the result is the same
    on a double-precision CPython and a single-precision MicroPython build.
    """
    if reg.unit not in _UNIT_TO_WH:
        raise ValueError("register %s: unit %r is not an energy unit (Wh or kWh)" % (reg.name, reg.unit))
    exp10 = reg.exp10 + _UNIT_TO_WH[reg.unit]
    raw = raw_value(reg, data, offset)
    if raw == reg.invalid:
        return None
    if reg.dtype != FLOAT32:
        if raw < 0:
            return -_scale_exact(-raw, 0, exp10)
        return _scale_exact(raw, 0, exp10)
    negative = raw >> 31
    exponent = (raw >> 23) & 0xFF
    mantissa = raw & 0x7FFFFF
    if exponent == 0xFF:
        return None
    if exponent == 0:
        exp2 = -149
    else:
        mantissa |= 0x800000
        exp2 = exponent - 150
    wh = _scale_exact(mantissa, exp2, exp10)
    return -wh if negative else wh


def energy_resolution_mwh(reg, wh):
    """Smallest step (in mWh) the register can show near ``wh``: its stated resolution.

    Integer registers: one count (``10**exp10`` of the unit). float32: one unit in the last
    place of a float32 near that value, which grows with the counter — in kWh it is below
    1 Wh up to 16,384 kWh, 1.95 Wh up to 32,768 kWh, 3.9 Wh up to 65,536 kWh, and so on.
    """
    exp10 = reg.exp10 + _UNIT_TO_WH[reg.unit] + 3  # to mWh
    if reg.dtype != FLOAT32:
        return 10 ** exp10 if exp10 >= 0 else 1
    # value in register units = wh / 10**(exp10-3); ulp = 2**(floor(log2(value)) - 23)
    units_num = abs(wh) * 1000
    units_den = 10 ** exp10
    if units_num < units_den:
        # below 1 unit: ulp is at most 2**-24 units
        return max(1, units_den >> 24)
    exponent = 0
    while (units_den << (exponent + 1)) <= units_num:
        exponent += 1
    step = exponent - 23
    if step >= 0:
        return units_den << step
    return max(1, units_den >> -step)
