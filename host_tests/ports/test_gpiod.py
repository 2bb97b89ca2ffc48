"""The Linux port's gpiod pin bank. There is no GPIO chip on the host: its ADC path is tested
with a plain file, its duty measurement through the pure ``duty_from_edges``
(``core/test_pilot.py``), and its line request only up to the missing chip."""

import pytest

from evse_agent.config import ConfigError
from evse_agent.pilot import InputMonitor
from evse_agent.ports.cpython.clock import SystemClock
from evse_agent.ports.cpython.gpio import GpiodPinBank
from test_pilot import Recorder, io_config, settle


def test_gpiod_bank_reads_the_pilot_adc_from_an_iio_raw_file(tmp_path):
    raw = tmp_path / "in_voltage0_raw"
    raw.write_text("2048\n")
    config = io_config(tmp_path, adc_path=str(raw), adc_scale=0.005, adc_offset=-1.0)
    config["driver"] = "gpiod"
    bank = GpiodPinBank(config)  # no lines configured: needs neither gpiod nor a chip
    try:
        sample = bank.read()
        assert sample.pilot_volts == pytest.approx(9.24)
        assert sample.duty_pct is None and sample.contactor_command is None
        recorder = Recorder()
        settle(InputMonitor(bank, config, SystemClock(), recorder), 0)
        assert [s.pilot for s, _ in recorder.calls] == ["B"]
        raw.write_text("garbage\n")
        assert bank.read().pilot_volts is None
        assert bank.errors == 1 and str(raw) in bank.last_error
    finally:
        bank.close()


def test_gpiod_bank_names_the_missing_or_clashing_setting(tmp_path):
    config = io_config(tmp_path, source="lines")
    with pytest.raises(ConfigError, match="io.pilot.lines: missing"):
        GpiodPinBank(config)
    config = io_config(tmp_path)
    with pytest.raises(ConfigError, match="io.pilot.adc_path: missing"):
        GpiodPinBank(config)
    config = io_config(tmp_path, source="lines", lines=[1, 2, 3, 4, 5], pwm_line=3)
    with pytest.raises(ConfigError, match=r"io.pilot.pwm_line: line 3 is also io.pilot.lines\[2\]"):
        GpiodPinBank(config)
    with pytest.raises(OSError, match="cannot open the pilot ADC"):
        GpiodPinBank(io_config(tmp_path, adc_path=str(tmp_path / "no-such-adc")))


def test_gpiod_bank_without_its_chip_says_what_is_missing(tmp_path):
    config = io_config(tmp_path, source="lines", lines=[1, 2, 3, 4, 5], pwm_line=6)
    config["chip"] = str(tmp_path / "gpiochip9")
    with pytest.raises(OSError) as error:
        GpiodPinBank(config)
    text = str(error.value)
    assert "gpiod package" in text or (str(tmp_path / "gpiochip9") in text and "1, 2, 3, 4, 5, 6" in text)
