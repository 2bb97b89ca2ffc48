"""The MicroPython poll-cycle program (``tools/testkit/unix_board/poll_cycle.py``, timed by
``make bench``) completes its polls under the unix port, through the host board's
``machine.UART`` and the port's ``UartStream``, and reads what the simulated meter serves.
No timing is asserted here: the figures belong to ``make bench``."""

import random
import struct

import pytest

from evse_tools.bench.poll import micropython_poll


def _float32(value):
    return struct.unpack(">f", struct.pack(">f", value))[0]


@pytest.mark.parametrize("baudrate", [9600, 38400])
def test_poll_cycle_program_reads_the_served_values(baudrate):
    cycles = random.randint(3, 8)
    amps = round(random.uniform(1.0, 32.0), 2)
    median, p95, polls, sim = micropython_poll("sdm630", baudrate, cycles, timeout_s=120, hold=True,
                                               load_amps=amps)
    served = sim.snapshot()
    assert served["power_total"] > 0
    assert len(polls) == cycles
    assert 0 < median <= p95
    expected_voltage = [_float32(served["voltage_l%d" % n]) for n in (1, 2, 3)]
    for number, line in enumerate(polls):
        head, rest = line.split(" [", 1)
        voltage_text, serial = rest.rsplit("] ", 1)
        _, index, energy_wh, power_total = head.split()
        assert int(index) == number
        assert int(energy_wh) == served["energy_wh"]
        assert float(power_total) == pytest.approx(_float32(served["power_total"]), rel=1e-6, abs=1e-6)
        voltages = [float(v) for v in voltage_text.split(",")]
        assert voltages == pytest.approx(expected_voltage, rel=1e-6)
        assert int(serial) == served["serial"]
