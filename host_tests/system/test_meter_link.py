"""The core's Modbus master and poller against pymodbus's RTU server on a real pty."""

import asyncio
import struct

import pytest

from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import MODELS
from evse_agent.modbus_rtu import ModbusExceptionResponse, RtuMaster
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.serial_link import SerialStream
from evse_agent.registers import FLOAT32


def _as_served(reg, value):
    """The value as the meter's register can carry it (float32 or scaled integer)."""
    if reg.dtype == FLOAT32:
        return struct.unpack(">f", struct.pack(">f", value))[0]
    return round(value / 10.0 ** reg.exp10) * 10.0 ** reg.exp10


async def _read_once(device, model, unit_id=1, **master_options):
    clock = SystemClock()
    stream = SerialStream(device, 9600)
    try:
        master = RtuMaster(stream, clock, 9600, **master_options)
        meter = ModbusMeter(master, model, unit_id, clock)
        reading = await meter.read()
        return meter, reading
    finally:
        stream.close()


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_register_of_each_map_reads_back_what_the_server_served(meter_sim, model_name):
    """Each map's registers decode to exactly the values pymodbus served, energy to the Wh."""
    sim = meter_sim(model_name, profile="steady", energy_wh=2345678)
    sim.set_hold(True)
    model = MODELS[model_name]
    meter, reading = asyncio.run(_read_once(sim.device, model))
    assert reading is not None, meter.link.last_error
    served = sim.snapshot()
    got = {}
    for i, phase in enumerate(("l1", "l2", "l3")[:model.phases]):
        got["voltage_" + phase] = reading.voltage[i]
        got["current_" + phase] = reading.current[i]
        got["power_" + phase] = reading.power[i]
    got["frequency"] = reading.frequency
    if "power_total" in model.by_name:
        got["power_total"] = reading.power_total
    for name, value in got.items():
        expected = _as_served(model.by_name[name], served[name])
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-9), name
    energy_reg = model.energy_register
    if energy_reg.dtype == FLOAT32:
        assert reading.energy_wh == round(_as_served(energy_reg, served["energy_wh"] / 1000) * 1000)
    else:
        assert reading.energy_wh == served["energy_wh"] // 10 * 10
    assert reading.serial == served["serial"]
    stats = meter.master.stats
    assert stats.ok == stats.requests == len(meter.requests) + 1  # + the serial number read
    assert stats.timeouts == stats.crc_errors == stats.frame_errors == stats.exceptions == 0


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_poll_uses_the_planned_number_of_requests(meter_sim, model_name):
    """A poll cycle sends exactly the coalesced requests, no more."""
    sim = meter_sim(model_name, profile="steady")

    async def two_cycles():
        clock = SystemClock()
        stream = SerialStream(sim.device, 9600)
        try:
            meter = ModbusMeter(RtuMaster(stream, clock, 9600), MODELS[model_name], 1, clock)
            await meter.read()
            before = meter.master.stats.requests
            await meter.read()
            return meter, meter.master.stats.requests - before
        finally:
            stream.close()

    meter, per_cycle = asyncio.run(two_cycles())
    assert per_cycle == len(meter.requests)
    assert sim.requests_seen >= 2 * per_cycle


def test_unmapped_register_gives_the_exception_code_from_pymodbus(meter_sim):
    """Reading outside the meter's answered ranges returns exception 2, reported with its code."""
    sim = meter_sim("sdm630", profile="idle")

    async def read_hole():
        clock = SystemClock()
        stream = SerialStream(sim.device, 9600)
        try:
            meter = ModbusMeter(RtuMaster(stream, clock, 9600, retries=0), MODELS["sdm630"], 1, clock)
            with pytest.raises(ModbusExceptionResponse) as caught:
                await meter.read_raw(4, 0x0100, 2)
            return caught.value
        finally:
            stream.close()

    error = asyncio.run(read_hole())
    assert error.code == 2
    assert "illegal data address" in str(error)


def test_wrong_unit_id_times_out_and_counts(meter_sim):
    """A request to a unit nobody answers is a timeout, retried within the bound, then reported."""
    sim = meter_sim("sdm120", profile="idle")
    meter, reading = asyncio.run(_read_once(sim.device, MODELS["sdm120"], unit_id=9,
                                            timeout_ms=100, retries=2))
    assert reading is None
    assert meter.master.stats.timeouts == 3
    assert meter.master.stats.retries == 2
    assert meter.link.last_error.startswith("timeout")
