"""Register decoding, exact energy arithmetic, resolution, and request planning."""

import math
import struct
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from evse_agent.meter_models import ABB_B23, SDM120, SDM630
from evse_agent.registers import (
    FLOAT32, INT16, INT32, INVALID_PATTERN, UINT16, UINT32, UINT64,
    TRANSACTION_CHARS, Register, decode, decode_energy_wh, energy_resolution_mwh, float32_from_bits, plan_requests,
)

SETTINGS = settings(max_examples=300, deadline=None)
PLAN_SETTINGS = settings(max_examples=300, deadline=None)

SDM_ENERGY = SDM630.energy_register
ABB_ENERGY = ABB_B23.energy_register
MAX_FLOAT32_BITS = 0x7F7FFFFF

bits32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
finite_nonneg_bits = st.integers(min_value=0, max_value=MAX_FLOAT32_BITS)


def _f32_bytes(bits):
    return struct.pack(">I", bits)


def _round_half_up(value):
    """Nearest integer to a Fraction >= 0, ties away from zero."""
    return math.floor(value + Fraction(1, 2))


def _exact_wh(bits):
    """The exact Wh value of a float32 kWh pattern, as a Fraction."""
    return Fraction(struct.unpack(">f", _f32_bytes(bits))[0]) * 1000


# --- float32 ------------------------------------------------------------------------------


@SETTINGS
@given(bits32)
def test_float32_from_bits_agrees_with_struct(bits):
    """float32_from_bits equals struct's '>f' for every pattern (sign of zero kept, NaN as NaN)."""
    expected = struct.unpack(">f", _f32_bytes(bits))[0]
    got = float32_from_bits(bits)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected
        assert math.copysign(1.0, got) == math.copysign(1.0, expected)


@pytest.mark.parametrize("bits", [
    0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x3F800000, 0xBF800000,
    MAX_FLOAT32_BITS, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
])
def test_float32_from_bits_edge_patterns(bits):
    """Zeros, subnormals, extremes, infinities and NaNs match struct."""
    expected = struct.unpack(">f", _f32_bytes(bits))[0]
    got = float32_from_bits(bits)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected and math.copysign(1.0, got) == math.copysign(1.0, expected)


# --- energy in exact Wh -------------------------------------------------------------------


@SETTINGS
@given(finite_nonneg_bits)
def test_float_energy_is_round_half_up_of_exact_value(bits):
    """float32 kWh decodes to round-half-up of its exact rational Wh value."""
    assert decode_energy_wh(SDM_ENERGY, _f32_bytes(bits), 0) == _round_half_up(_exact_wh(bits))


@SETTINGS
@given(st.floats(min_value=0, max_value=1e7, width=32))
def test_float_energy_for_realistic_counters(kwh):
    """Counter values in a realistic range (0..10 GWh) decode exactly, as the rule says."""
    bits = struct.unpack(">I", struct.pack(">f", kwh))[0]
    assert decode_energy_wh(SDM_ENERGY, _f32_bytes(bits), 0) == _round_half_up(Fraction(kwh) * 1000)


@pytest.mark.parametrize("kwh,wh", [
    (0.0, 0),
    (-0.0, 0),
    (0.0625, 63),          # 62.5 Wh exactly: tie rounds up
    (0.1875, 188),         # 187.5 Wh exactly
    (1.0625, 1063),        # 1062.5 Wh exactly
    (12345.0625, 12345063),
    (1.0, 1000),
    (16384.0, 16384000),
    (32768.0, 32768000),
])
def test_float_energy_exact_boundaries(kwh, wh):
    """Exact halves of a Wh round up; integral kWh are exact."""
    assert decode_energy_wh(SDM_ENERGY, struct.pack(">f", kwh), 0) == wh


def test_float_energy_extremes():
    """The smallest subnormal, a value just under a tie, and the largest float32 decode exactly."""
    assert decode_energy_wh(SDM_ENERGY, _f32_bytes(0x00000001), 0) == 0
    below_tie = struct.unpack(">I", struct.pack(">f", 0.0625))[0] - 1  # 62.4999... Wh
    assert decode_energy_wh(SDM_ENERGY, _f32_bytes(below_tie), 0) == 62
    largest = decode_energy_wh(SDM_ENERGY, _f32_bytes(MAX_FLOAT32_BITS), 0)
    assert largest == (2 ** 24 - 1) * 2 ** 104 * 1000


@pytest.mark.parametrize("bits", [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF])
def test_float_energy_not_finite_is_none(bits):
    """NaN and infinity patterns give None, not a number."""
    assert decode_energy_wh(SDM_ENERGY, _f32_bytes(bits), 0) is None


@SETTINGS
@given(st.integers(min_value=0, max_value=0xFFFFFFFFFFFFFFFE))
def test_abb_integer_energy_is_raw_times_ten(raw):
    """ABB uint64 energy in 0.01 kWh is raw * 10 Wh exactly."""
    assert decode_energy_wh(ABB_ENERGY, struct.pack(">Q", raw), 0) == raw * 10


def test_abb_invalid_energy_is_none():
    """The ABB all-ones pattern means "no value"."""
    assert decode_energy_wh(ABB_ENERGY, b"\xff" * 8, 0) is None


def test_energy_at_offset_inside_a_response():
    """Energy is read at the given byte offset of a longer response."""
    data = b"\x00\x01" + struct.pack(">Q", 123456) + b"\xff\xff"
    assert decode_energy_wh(ABB_ENERGY, data, 2) == 1234560


def test_non_energy_register_is_refused():
    """decode_energy_wh refuses a register whose unit is not Wh or kWh."""
    with pytest.raises(ValueError, match="not an energy unit"):
        decode_energy_wh(SDM630.by_name["voltage_l1"], b"\0\0\0\0", 0)


# --- resolution ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(min_value=0, max_value=16384 * 1000 - 1))
def test_resolution_below_16384_kwh_is_under_1_wh(wh):
    """A float32 kWh counter below 16,384 kWh resolves better than 1 Wh."""
    step = energy_resolution_mwh(SDM_ENERGY, wh)
    assert 1 <= step < 1000


@SETTINGS
@given(st.integers(min_value=16384 * 1000, max_value=32768 * 1000 - 1))
def test_resolution_between_16384_and_32768_kwh(wh):
    """Between 16,384 and 32,768 kWh one float32 step is 2**-9 kWh = 1953 mWh (rounded down)."""
    assert energy_resolution_mwh(SDM_ENERGY, wh) == 1953


@SETTINGS
@given(st.integers(min_value=1000, max_value=10 ** 12))
def test_resolution_is_float32_ulp_rounded_down(wh):
    """At >= 1 kWh the step is the float32 ulp of the value, in whole mWh (floor)."""
    kwh = Fraction(wh, 1000)
    exponent = math.floor(math.log2(kwh))
    while 2 ** (exponent + 1) <= kwh:  # guard against log2 rounding
        exponent += 1
    while 2 ** exponent > kwh:
        exponent -= 1
    ulp_mwh = Fraction(2) ** (exponent - 23) * 1_000_000
    assert energy_resolution_mwh(SDM_ENERGY, wh) == max(1, math.floor(ulp_mwh))


@pytest.mark.parametrize("wh", [0, 1, 999_999, 1_000_000, 10 ** 9])
def test_resolution_of_abb_counter_is_10_wh(wh):
    """The ABB 0.01 kWh counter steps by 10 Wh = 10000 mWh at any value."""
    assert energy_resolution_mwh(ABB_ENERGY, wh) == 10000


# --- decode -------------------------------------------------------------------------------


def test_decode_int16_negative():
    """int16 0xFFFE is -2; 0x8000 is -32768."""
    reg = Register("x", 3, 0, INT16)
    assert decode(reg, b"\xff\xfe", 0) == -2
    assert decode(reg, b"\x80\x00", 0) == -32768
    assert decode(reg, b"\x7f\xfe", 0) == 32766


def test_decode_int32_negative_big_and_little_word_order():
    """int32 -2 decodes in both word orders; little puts the low word first."""
    big = Register("x", 3, 0, INT32)
    little = Register("x", 3, 0, INT32, word_order="little")
    assert decode(big, b"\xff\xff\xff\xfe", 0) == -2
    assert decode(little, b"\xff\xfe\xff\xff", 0) == -2
    assert decode(big, b"\x80\x00\x00\x00", 0) == -2 ** 31
    assert decode(little, b"\x00\x00\x80\x00", 0) == -2 ** 31


@SETTINGS
@given(st.integers(min_value=-2 ** 31, max_value=2 ** 31 - 1))
def test_decode_int32_matches_struct(value):
    """int32 decoding agrees with struct for both word orders."""
    data = struct.pack(">i", value)
    swapped = data[2:] + data[:2]
    assert decode(Register("x", 3, 0, INT32), data, 0) == value
    assert decode(Register("x", 3, 0, INT32, word_order="little"), swapped, 0) == value


def test_decode_uint32_and_uint64_little_word_order():
    """Little word order reverses registers, not bytes within a register."""
    assert decode(Register("x", 4, 0, UINT32, word_order="little"), b"\x56\x78\x12\x34", 0) == 0x12345678
    assert decode(Register("x", 4, 0, UINT64, word_order="little"),
                  bytes.fromhex("7788 5566 3344 1122"), 0) == 0x1122334455667788


def test_decode_float32_little_word_order():
    """A float32 with the low word first decodes to the same value."""
    data = struct.pack(">f", 230.5)
    reg = Register("v", 4, 0, FLOAT32, "V", word_order="little")
    assert decode(reg, data[2:] + data[:2], 0) == 230.5


@pytest.mark.parametrize("raw,value", [(5000, 50.0), (4999, 49.99), (1, 0.01), (0xFFFE, 655.34)])
def test_decode_uint16_scaled(raw, value):
    """uint16 with exp10=-2 is raw / 100 (ABB frequency in 0.01 Hz)."""
    reg = Register("frequency", 3, 0, UINT16, "Hz", exp10=-2)
    assert decode(reg, struct.pack(">H", raw), 0) == pytest.approx(value, rel=1e-12)


def test_decode_int32_scaled_negative():
    """ABB power in 0.01 W: int32 -12345 is -123.45 W."""
    reg = ABB_B23.by_name["power_total"]
    assert decode(reg, struct.pack(">i", -12345), 0) == pytest.approx(-123.45, rel=1e-12)


def test_decode_invalid_patterns_are_none():
    """ABB invalid patterns (all ones unsigned, max positive signed) decode to None."""
    assert decode(ABB_B23.by_name["frequency"], b"\xff\xff", 0) is None
    assert decode(ABB_B23.by_name["voltage_l1"], b"\xff\xff\xff\xff", 0) is None
    assert decode(ABB_B23.by_name["power_l1"], b"\x7f\xff\xff\xff", 0) is None
    assert decode(Register("x", 3, 0, INT16, invalid=INVALID_PATTERN[INT16]), b"\x7f\xff", 0) is None


# --- request planning ---------------------------------------------------------------------


def _readable(fn, address, registers, answered):
    """True when ``address`` is inside one of the registers or an answered range of ``fn``."""
    for reg in registers:
        if reg.function == fn and reg.address <= address < reg.end:
            return True
    return any(f == fn and lo <= address <= hi for f, lo, hi in answered)


def _optimum(registers, max_registers, answered):
    """Least (line characters, requests) by dynamic programming over each function's
    registers in address order, written independently of plan_requests.

    A run of consecutive registers is one legal request when its span fits max_registers
    and every address in it is inside a register or an answered range; it costs
    TRANSACTION_CHARS plus 2 characters per register of its span. Registers do not
    overlap, so an optimal plan only ever groups consecutive registers.
    """
    total_chars = total_requests = 0
    for fn in sorted({r.function for r in registers}):
        regs = sorted((r for r in registers if r.function == fn), key=lambda r: r.address)
        best = [(0, 0)] + [None] * len(regs)
        for j in range(1, len(regs) + 1):
            for i in range(j, 0, -1):
                first, last = regs[i - 1], regs[j - 1]
                span = last.end - first.address
                if span > max_registers:
                    break
                if all(_readable(fn, a, regs, answered) for a in range(first.address, last.end)):
                    chars, count = best[i - 1]
                    candidate = (chars + TRANSACTION_CHARS + 2 * span, count + 1)
                    if best[j] is None or candidate < best[j]:
                        best[j] = candidate
        total_chars += best[len(regs)][0]
        total_requests += best[len(regs)][1]
    return total_chars, total_requests


def _cost(plan):
    return sum(TRANSACTION_CHARS + 2 * req.count for req in plan), len(plan)


def _contiguous_runs(registers, max_registers):
    """The plan without bridging: one request per maximal run of touching registers."""
    return plan_requests(registers, max_registers, ())


def _check_plan(registers, max_registers, answered):
    """Assert plan_requests' coverage, size and span rules; return the plan."""
    plan = plan_requests(registers, max_registers, answered)
    covering = {}
    for req in plan:
        assert 1 <= req.count <= max_registers
        for reg in req.registers:
            assert reg.function == req.function
            assert req.address <= reg.address and reg.end <= req.address + req.count
            covering.setdefault(id(reg), []).append(req)
        for address in range(req.address, req.address + req.count):
            assert _readable(req.function, address, registers, answered), (req, hex(address))
        # A request starts and ends on its own registers.
        assert req.address == min(r.address for r in req.registers)
        assert req.address + req.count == max(r.end for r in req.registers)
    for reg in registers:
        assert len(covering.get(id(reg), [])) == 1, reg
    return plan


@pytest.mark.parametrize("model", [SDM630, SDM120, ABB_B23], ids=lambda m: m.name)
def test_model_plans_are_legal_and_minimal(model):
    """Each model's measurement registers are planned legally in the least line time, never
    worse than one request per contiguous run."""
    registers = [r for r in model.registers if r.name != "serial"]
    plan = _check_plan(registers, model.max_registers, model.answered)
    assert _cost(plan) == _optimum(registers, model.max_registers, model.answered)
    runs = _contiguous_runs(registers, model.max_registers)
    assert len(plan) <= len(runs) and _cost(plan) <= _cost(runs)


def test_model_plan_sizes():
    """Known plans: SDM630 reads 0x00-0x11, 0x34, 0x46-0x49; SDM120 bridges the short gaps
    between voltage, current and power; ABB reads energy, then the instantaneous block in
    two parts (bridging its 16-register gap would cost more line time than a request)."""
    def shape(model):
        regs = [r for r in model.registers if r.name != "serial"]
        return [(q.function, q.address, q.count) for q in plan_requests(regs, model.max_registers, model.answered)]

    assert shape(SDM630) == [(4, 0x0000, 18), (4, 0x0034, 2), (4, 0x0046, 4)]
    assert shape(SDM120) == [(4, 0x0000, 14), (4, 0x0046, 4)]
    assert shape(ABB_B23) == [(3, 0x5000, 4), (3, 0x5B00, 28), (3, 0x5B2C, 1)]


def test_register_larger_than_max_is_refused():
    """A register needing more registers than the meter's maximum raises ValueError."""
    with pytest.raises(ValueError, match="more than the meter's maximum 2"):
        plan_requests([Register("e", 3, 0, UINT64)], 2)


DTYPES = [INT16, UINT16, FLOAT32, INT32, UINT32, UINT64]


@st.composite
def planning_problems(draw):
    """Non-overlapping registers on functions 3/4, a max size, and answered ranges."""
    registers = []
    for fn in draw(st.sets(st.sampled_from([3, 4]), min_size=1)):
        address = draw(st.integers(min_value=0, max_value=20))
        for i in range(draw(st.integers(min_value=1, max_value=8))):
            dtype = draw(st.sampled_from(DTYPES))
            registers.append(Register("r%d_%d" % (fn, i), fn, address, dtype))
            address = registers[-1].end + draw(st.integers(min_value=0, max_value=10))
    max_registers = draw(st.integers(min_value=4, max_value=30))
    # Answered ranges start near a register's end (so they meet the gaps a plan may bridge);
    # some are documented as two touching pieces.
    answered = []
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        anchor = draw(st.sampled_from(registers))
        fn = draw(st.sampled_from([anchor.function, 7 - anchor.function]))
        lo = max(0, anchor.end + draw(st.integers(min_value=-3, max_value=3)))
        length = draw(st.integers(min_value=0, max_value=30))
        cut = draw(st.integers(min_value=-1, max_value=30))
        if 0 <= cut < length:
            answered += [(fn, lo, lo + cut), (fn, lo + cut + 1, lo + length)]
        else:
            answered.append((fn, lo, lo + length))
    answered = tuple(answered)
    order = draw(st.permutations(registers))
    return list(order), max_registers, answered


@PLAN_SETTINGS
@given(planning_problems())
def test_random_plans_are_legal_and_minimal(problem):
    """For random register sets, sizes and answered ranges the plan is legal and optimal, and
    never worse than reading each contiguous run on its own."""
    registers, max_registers, answered = problem
    plan = _check_plan(registers, max_registers, answered)
    assert _cost(plan) == _optimum(registers, max_registers, answered)
    runs = _contiguous_runs(registers, max_registers)
    assert len(plan) <= len(runs) and _cost(plan) <= _cost(runs)


@PLAN_SETTINGS
@given(planning_problems())
def test_random_plans_with_disjoint_answered_ranges_are_minimal(problem):
    """Same, with answered ranges that neither overlap nor touch (as in the shipped models)."""
    registers, max_registers, answered = problem
    disjoint = []
    for fn, lo, hi in sorted(answered):
        if disjoint and disjoint[-1][0] == fn and lo <= disjoint[-1][2] + 1:
            continue
        disjoint.append((fn, lo, hi))
    plan = _check_plan(registers, max_registers, tuple(disjoint))
    assert _cost(plan) == _optimum(registers, max_registers, tuple(disjoint))


def test_gap_across_two_touching_answered_ranges_is_bridged():
    """A gap covered by two adjacent answered ranges (0-2 and 3-9) may be bridged: one request."""
    registers = [Register("a", 3, 0, UINT16), Register("b", 3, 5, UINT16)]
    answered = ((3, 0, 2), (3, 3, 9))
    assert _optimum(registers, 125, answered) == (TRANSACTION_CHARS + 12, 1)
    assert len(plan_requests(registers, 125, answered)) == 1
