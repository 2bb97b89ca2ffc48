"""The fleet simulator: its in-memory meter answers like a Modbus meter (checked with
pymodbus's own decoder and the agent's RTU master), and a small fleet of full agent cores
runs against a real mosquitto with every station polling on schedule and publishing."""

import asyncio

import pytest
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU

from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import model_named
from evse_agent.modbus_rtu import ModbusTimeout, RtuMaster, build_read_request
from evse_agent.ports.cpython.clock import SystemClock
from evse_tools.sim.fleet_sim import STATION_FORMAT, ScriptedCar, SimulatedMeterLine, simulate
from evse_tools.sim.meter_sim import LoadProfile, MeterPhysics, encode_register

SDM630 = model_named("sdm630")


def _line(amps=10.0):
    physics = MeterPhysics(3, LoadProfile([(0, amps)]), serial=4242, energy_wh=5_000_123)
    physics.noise = False
    return SimulatedMeterLine(SDM630, physics), physics


def test_simulated_meter_frames_decode_with_pymodbus():
    """A response of the in-memory meter is a valid RTU frame to pymodbus, carrying the
    registers the meter simulator would serve."""
    line, physics = _line()
    line.write(build_read_request(1, 4, 0x0046, 4))
    line._ready_at = 0  # skip the wire time
    frame = asyncio.run(line.read(256, 0))
    used, pdu = FramerRTU(DecodePDU(is_server=False)).handleFrame(frame, 1, 0)
    assert used == len(frame) == 5 + 8
    assert pdu.function_code == 4 and pdu.dev_id == 1
    energy = SDM630.by_name["energy_import"]
    frequency = SDM630.by_name["frequency"]
    assert pdu.registers == (encode_register(frequency, physics.values["frequency"])
                             + encode_register(energy, None, physics.energy_wh))


def test_simulated_meter_is_silent_to_other_units_and_damaged_requests():
    line, _ = _line()
    line.write(build_read_request(2, 4, 0, 2))
    assert asyncio.run(line.read(256, 5)) == b""
    request = bytearray(build_read_request(1, 4, 0, 2))
    request[-1] ^= 0xFF
    line.write(bytes(request))
    assert asyncio.run(line.read(256, 5)) == b""
    assert line.requests == 0


def test_agent_master_reads_the_simulated_meter_with_exact_energy():
    """The agent's own RTU master and meter read the line: values and integer Wh come out."""
    line, physics = _line(amps=16.0)
    clock = SystemClock("always")

    async def go():
        meter = ModbusMeter(RtuMaster(line, clock, 9600), SDM630, 1, clock)
        return await meter.read()

    reading = asyncio.run(go())
    assert reading is not None
    assert reading.serial == 4242
    assert abs(reading.energy_wh - physics.energy_wh) <= 1  # energy grows while it is read
    assert reading.current == pytest.approx([16.0] * 3, abs=0.01)
    with pytest.raises(ModbusTimeout):
        async def silent():
            master = RtuMaster(SimulatedMeterLine(SDM630, physics, unit_id=9), clock, 9600, timeout_ms=20,
                               retries=0)
            await master.read_registers(1, 4, 0, 2)
        asyncio.run(silent())


def test_scripted_car_plugs_charges_and_pulls_the_load():
    physics = MeterPhysics(3, LoadProfile([(0, 0.0)]))
    car = ScriptedCar(physics, seed=3)
    seen = []
    for _ in range(4):
        car._next_change = 0  # due now
        sample = car.read()
        seen.append((sample.pilot_volts, sample.contactor_command, physics.fixed_amps))
    assert seen == [(9.0, False, 0.0), (6.0, True, 16.0), (9.0, False, 0.0), (12.0, False, 0.0)]
    assert car.plugs == 1


def test_small_fleet_polls_on_schedule_and_every_station_publishes(broker, tmp_path):
    """Five full agent cores in a worker process: the stations poll, their telemetry reaches
    the broker, and the broker's CPU is measured. How closely they keep their 1 Hz schedule
    depends on how busy the machine is: that figure is `make bench`'s (cycles/due)."""
    figures = simulate(broker, 5, 6.0, str(tmp_path))
    assert figures["stations"] == 5 and figures["processes"] == 1
    assert figures["poll_cycles_ratio"] > 0
    assert figures["by_channel"]["telemetry"] >= 5
    assert figures["messages_per_s"] > 0 and figures["broker_cpu_pct"] >= 0
    for number in range(1, 6):
        assert (tmp_path / (STATION_FORMAT % number) / "journal").is_dir()
