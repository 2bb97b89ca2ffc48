"""Board files a harsh field produces: absurd numbers, deep nesting, settings that contradict
each other, files that are not there. Each is refused with a message naming the setting (and
the bad value, cut short), never a traceback, and nothing is created on disk first."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from evse_agent.config import SCHEMA, ConfigError, is_live, live_settings, load_board, parse_board, schema, validate

MINIMAL = {"station_id": "st-1", "meter": {"model": "sdm630", "port": "/dev/ttyUSB0"}}


def _with(path, value):
    """MINIMAL with one setting (dotted path) set."""
    return _with_doc(json.loads(json.dumps(MINIMAL)), path, value)


def _refusal(doc):
    with pytest.raises(ConfigError) as info:
        validate(doc)
    return str(info.value)


@pytest.mark.parametrize("path,value,words", [
    ("events.voltage_min_v", 10 ** 400, "not a finite number"),
    ("meter.poll_interval_s", -(10 ** 400), "not a finite number"),
    ("meter.timeout_ms", 10 ** 400, "above the maximum"),
    ("events.voltage_min_v", -5, "below the minimum 0"),
    ("events.phase_loss_v", -1.5, "below the minimum 0"),
    ("io.pilot.adc_scale", 0, "same voltage"),
    ("mqtt.host", "", "blank"),
    ("mqtt.host", "   ", "blank"),
    ("mqtt.host", "mqtt://broker:1883", "bare host name"),
])
def test_absurd_value_is_refused_naming_the_setting(path, value, words):
    message = _refusal(_with(path, value))
    assert message.startswith(path + ":"), message
    assert words in message
    assert len(message) < 250, message  # a 400-digit number is cut short, not echoed whole


@pytest.mark.parametrize("changes,first,second", [
    ({"events.voltage_min_v": 260.0}, "events.voltage_min_v", "events.voltage_max_v"),
    ({"events.voltage_min_v": 253.0}, "events.voltage_min_v", "events.voltage_max_v"),
    ({"events.phase_loss_v": 210.0}, "events.phase_loss_v", "events.voltage_min_v"),
    ({"journal.max_bytes": 2 << 20, "journal.segment_bytes": 3 << 20},
     "journal.segment_bytes", "journal.max_bytes"),
    ({"mqtt.tls.cert_file": "/etc/ssl/client.pem"}, "mqtt.tls", "key_file"),
    ({"identification.enabled": True}, "identification.port", "identification.enabled"),
])
def test_contradicting_settings_are_refused_naming_both(changes, first, second):
    doc = json.loads(json.dumps(MINIMAL))
    for path, value in changes.items():
        doc = _with_doc(doc, path, value)
    message = _refusal(doc)
    assert message.startswith(first), message
    assert second in message


def _with_doc(doc, path, value):
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


def test_deeply_nested_board_is_refused():
    text = '{"station_id": "st-1", "meter": ' + "[" * 100000 + "]" * 100000 + "}"
    with pytest.raises(ConfigError) as info:
        parse_board(text, "deep.json")
    assert "deep.json" in str(info.value)


def _paths(schema, prefix=""):
    for key, spec in schema.items():
        if isinstance(spec, dict):
            yield from _paths(spec, prefix + key + ".")
        else:
            yield prefix + key


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 500), max_value=10 ** 500)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=300),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(_paths(SCHEMA))), JSON_VALUES), min_size=1, max_size=4))
def test_any_value_in_any_setting_is_taken_or_refused_cleanly(assignments):
    """Whatever a board file holds, validation either returns a configuration or raises
    ConfigError with a short message naming a setting: never another exception."""
    doc = json.loads(json.dumps(MINIMAL))
    for path, value in assignments:
        doc = _with_doc(doc, path, value)
    try:
        config = validate(doc)
    except ConfigError as error:
        message = str(error)
        assert len(message) < 400, message
        assert any(message.startswith(path.split(".")[0]) for path, _ in assignments) \
            or message.startswith("journal.") or message.startswith("mqtt."), message
    else:
        assert config["events"]["voltage_min_v"] < config["events"]["voltage_max_v"]


# --- the real command line ----------------------------------------------------------------


def _cli(tmp_path, board_text):
    board = tmp_path / "board.json"
    board.write_text(board_text)
    return subprocess.run([sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", str(board)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("board_text,words", [
    (json.dumps(_with("events.voltage_min_v", 10 ** 400)), "events.voltage_min_v"),
    ('{"station_id": "st-1", "meter": ' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
    (json.dumps(_with("mqtt.host", "")), "mqtt.host"),
    (json.dumps(_with("events.voltage_max_v", 100.0)), "events.voltage_min_v"),
])
def test_agent_refuses_to_start_naming_the_setting_before_creating_anything(tmp_path, board_text, words):
    result = _cli(tmp_path, board_text)
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and words in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["board.json"]


def test_missing_tls_file_is_named_with_its_path(tmp_path):
    ca = str(tmp_path / "nowhere" / "ca.pem")
    doc = _with("mqtt.tls.enabled", True)
    doc["mqtt"]["tls"]["ca_file"] = ca
    result = _cli(tmp_path, json.dumps(doc))
    assert result.returncode == 2, result.stderr
    assert "mqtt.tls.ca_file" in result.stderr and ca in result.stderr
    assert "No such file" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["board.json"]


# --- the micropython section: the same schema, the same engine ----------------------------

MPY_MINIMAL = dict(MINIMAL, micropython={"tx_pin": 17, "rx_pin": 16})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(p for p in _paths(schema("micropython"))
                                                 if p.startswith("micropython."))), JSON_VALUES),
                min_size=1, max_size=4))
def test_any_value_in_the_micropython_section_is_taken_or_refused_cleanly(assignments):
    """The microcontroller's section meets the engine every section meets: a value is taken
    with its field's type and range, or refused with a short message naming the field."""
    doc = json.loads(json.dumps(MPY_MINIMAL))
    for path, value in assignments:
        doc = _with_doc(doc, path, value)
    fields = schema("micropython")["micropython"]
    try:
        config = validate(doc, "micropython")
    except ConfigError as error:
        message = str(error)
        assert len(message) < 400, message
        assert any(message.startswith(path + ":") for path, _ in assignments), message
    else:
        for name, field in fields.items():
            value = config["micropython"][name]
            if value is None:
                assert field.nullable, name
                continue
            assert isinstance(value, field.kind) and not (isinstance(value, bool) and field.kind is int), name
            assert field.minimum is None or value >= field.minimum, name
            assert field.maximum is None or value <= field.maximum, name


def test_micropython_section_is_known_only_to_its_port(tmp_path):
    """The same file loads for the MicroPython port with its section filled, and the Linux
    port refuses the section it has no use for, naming it; overrides reach the section."""
    board = tmp_path / "esp32.json"
    board.write_text(json.dumps(MPY_MINIMAL))
    config = load_board(str(board), "micropython", overrides=["micropython.watchdog_s=0"])
    assert config["micropython"]["watchdog_s"] == 0 and config["micropython"]["uart_id"] == 2
    assert config["micropython"]["ntp_host"] == "pool.ntp.org" and config["micropython"]["de_pin"] is None
    common = dict(config)
    del common["micropython"]
    assert common == validate(json.loads(json.dumps(MINIMAL)))
    with pytest.raises(ConfigError, match=r"esp32.json: micropython: unknown field"):
        load_board(str(board))
    with pytest.raises(ConfigError, match=r"micropython.uart_id: 7 is above the maximum 3"):
        load_board(str(board), "micropython", overrides=["micropython.uart_id=7"])
    with pytest.raises(ConfigError, match=r"port \"esp8266\": unknown"):
        load_board(str(board), "esp8266")


def test_deploy_refuses_a_board_the_agent_would_refuse(tmp_path, capsys):
    """evse-deploy loads the board with the agent's loader first: a broken micropython
    section stops it before anything is compiled or sent (exit 2, the field named)."""
    from evse_tools.cli import deploy
    board = tmp_path / "esp32.json"
    board.write_text(json.dumps(dict(MINIMAL, micropython={"tx_pin": 17})))
    assert deploy.main(["--port", "/dev/null", "--board", str(board), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "micropython.rx_pin: missing" in err and str(board) in err


# --- settings that take effect at once ------------------------------------------------------


def test_live_settings_come_from_the_schema_and_the_docs_list_them():
    """The schema marks a setting live; ``is_live`` and the list derive from it, and the
    console's documented command table names exactly those."""
    live = live_settings()
    assert all(is_live(path) for path in live)
    assert not is_live("mqtt.keepalive_s") and not is_live("nope.nothing")
    assert {p for p in _paths(SCHEMA) if p.startswith("events.")} <= set(live)
    with open(os.path.join(ROOT, "docs", "console.md")) as handle:
        row = [line for line in handle if line.startswith("| `config set <setting> <value>`")][0]
    named = row.split("marks live (")[1].split(")")[0]
    listed = [part.strip().strip("`") for part in named.split(",")]
    expanded = [p for p in live if not p.startswith("events.")]
    assert sorted(p for p in listed if p != "every `events.*") == sorted(expanded), listed
