"""Board-file validation: shipped boards load, broken ones are refused with a precise message."""

import copy
import json
import os
import subprocess
import sys

import pytest

from evse_agent.config import (ConfigError, apply_override, ha_node_id, load_board, parse_board, schema,
                               validate)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOARDS = sorted(os.path.join(ROOT, "boards", name)
                for name in os.listdir(os.path.join(ROOT, "boards")) if name.endswith(".json"))

MINIMAL = {"station_id": "st-1", "meter": {"model": "sdm630", "port": "/dev/ttyUSB0"}}


def _leaves(schema, prefix=""):
    """(dotted path, Field) of every setting in the schema."""
    for key, spec in schema.items():
        path = prefix + key
        if isinstance(spec, dict):
            yield from _leaves(spec, path + ".")
        else:
            yield path, spec


def _get(doc, path):
    node = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def _doc(**changes):
    """MINIMAL with dotted-path changes; a value of KeyError deletes the key."""
    doc = copy.deepcopy(MINIMAL)
    for path, value in changes.items():
        parts = path.split("__")
        node = doc
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is KeyError:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return doc


def _refused(doc):
    with pytest.raises(ConfigError) as info:
        validate(doc)
    return str(info.value)


# --- shipped boards -----------------------------------------------------------------------


def test_boards_exist():
    """Both shipped board files are present."""
    names = [os.path.basename(path) for path in BOARDS]
    assert "sim.json" in names and "rpi-sdm630.json" in names


@pytest.mark.parametrize("path", BOARDS, ids=os.path.basename)
def test_board_loads_with_defaults_filled(path):
    """Every setting of the schema is present: the file's value where given, else the default."""
    with open(path) as handle:
        raw = json.load(handle)
    # A microcontroller board: its port's section is checked by the same schema.
    port = "micropython" if "micropython" in raw else None
    config = load_board(path, port)
    for leaf, field in _leaves(schema(port)):
        value = _get(config, leaf)
        assert value is not KeyError, leaf
        given = _get(raw, leaf)
        if leaf == "mqtt.client_id" and given in (None, KeyError):
            assert value == "evse-agent-" + raw["station_id"]
        elif leaf == "homeassistant.node_id" and given in (None, KeyError):
            assert value == ha_node_id(raw["station_id"])
        elif given is KeyError:
            assert value == field.default, leaf
        else:
            assert value == given, leaf
            assert value is None if given is None else isinstance(value, field.kind), leaf


def test_sim_board_values():
    """The sim board reads the pty meter and a local broker."""
    config = load_board(os.path.join(ROOT, "boards", "sim.json"))
    assert config["station_id"] == "sim-001"
    assert config["meter"]["model"] == "sdm630"
    assert config["meter"]["port"] == "run/meter.pty"
    assert config["mqtt"]["host"] == "127.0.0.1" and config["mqtt"]["port"] == 1883
    assert config["mqtt"]["client_id"] == "evse-agent-sim-001"


def test_minimal_board_gets_defaults():
    """Only station id, model and port are required; the rest takes documented defaults."""
    config = validate(copy.deepcopy(MINIMAL))
    assert config["meter"]["unit_id"] == 1
    assert config["meter"]["baudrate"] == 9600
    assert config["meter"]["parity"] == "N"
    assert config["meter"]["poll_interval_s"] == 1.0
    assert config["mqtt"]["port"] == 1883
    assert config["mqtt"]["tls"]["enabled"] is False
    assert config["mqtt"]["client_id"] == "evse-agent-st-1"


def test_integer_given_for_float_setting_becomes_float():
    """A whole number in a float setting is accepted as a float."""
    config = validate(_doc(meter__poll_interval_s=2))
    assert config["meter"]["poll_interval_s"] == 2.0
    assert isinstance(config["meter"]["poll_interval_s"], float)


# --- refusals -----------------------------------------------------------------------------


def test_not_json_is_refused(tmp_path):
    """Text that is not JSON is refused naming the file."""
    path = tmp_path / "board.json"
    path.write_text('{"station_id": "a",')
    with pytest.raises(ConfigError) as info:
        load_board(str(path))
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"board"', "42", "null"])
def test_top_level_not_object_is_refused(text):
    """A board that is not a JSON object is refused, showing what it got."""
    with pytest.raises(ConfigError) as info:
        parse_board(text, "b.json")
    message = str(info.value)
    assert message.startswith("b.json: ")
    assert "expected an object" in message and text in message


def test_missing_station_id_is_refused():
    """station_id is required."""
    message = _refused(_doc(station_id=KeyError))
    assert message.startswith("station_id: missing")


@pytest.mark.parametrize("station_id,bad", [
    ("a/b", "'/'"), ("a+b", "'+'"), ("a#b", "'#'"), ("a b", "' '"), ("", "is empty"), ("x" * 65, "longer than 64"),
])
def test_station_id_not_a_topic_level_is_refused(station_id, bad):
    """station_id becomes an MQTT topic level: wildcards, separators, spaces and empty are refused."""
    message = _refused(_doc(station_id=station_id))
    assert message.startswith("station_id: ")
    assert json.dumps(station_id) in message
    assert bad in message


def test_topic_prefix_with_wildcard_is_refused():
    """mqtt.topic_prefix follows the same topic-level rule."""
    message = _refused(_doc(mqtt__topic_prefix="evse/#"))
    assert message.startswith("mqtt.topic_prefix: ") and '"evse/#"' in message


@pytest.mark.parametrize("changes,path,bad", [
    (dict(meter__model="sdm999"), "meter.model", '"sdm999"'),
    (dict(meter__baudrate=9601), "meter.baudrate", "9601"),
    (dict(meter__parity="X"), "meter.parity", '"X"'),
    (dict(meter__unit_id=0), "meter.unit_id", "0"),
    (dict(meter__unit_id=248), "meter.unit_id", "248"),
    (dict(mqtt__port=70000), "mqtt.port", "70000"),
    (dict(mqtt__port="1883"), "mqtt.port", '"1883"'),
    (dict(mqtt__port=1883.0), "mqtt.port", "1883.0"),
    (dict(meter__timeout_ms=True), "meter.timeout_ms", "true"),
    (dict(meter__poll_interval_s=False), "meter.poll_interval_s", "false"),
    (dict(mqtt__tls__enabled=1), "mqtt.tls.enabled", "1"),
    (dict(meter__stopbits=3), "meter.stopbits", "3"),
    (dict(meter__retries=11), "meter.retries", "11"),
    (dict(mqtt__keepalive_s=4), "mqtt.keepalive_s", "4"),
    (dict(meter__port=None), "meter.port", "null"),
    (dict(station_id=None), "station_id", "null"),
    (dict(mqtt__host=None), "mqtt.host", "null"),
    (dict(mqtt__tls=None), "mqtt.tls", "null"),
    (dict(meter=KeyError), "meter.model", "missing"),
])
def test_bad_value_is_refused_naming_path_and_value(changes, path, bad):
    """Each bad value is refused with a message starting with the field path and showing the value."""
    message = _refused(_doc(**changes))
    assert message.startswith(path + ": "), message
    assert bad in message[len(path) + 2:], message


def test_model_refusal_lists_known_models():
    """An unknown meter model lists the models that exist."""
    message = _refused(_doc(meter__model="sdm999"))
    for name in ("sdm630", "sdm120", "abb_b23"):
        assert '"%s"' % name in message


@pytest.mark.parametrize("changes,path,hint", [
    (dict(meter__baud=9600), "meter.baud", "baudrate"),
    (dict(meter__retry=2), "meter.retry", "retries"),
    (dict(mqtt__user="x"), "mqtt.user", "username"),
    (dict(mqtt__keepalive=30), "mqtt.keepalive", "keepalive_s"),
    (dict(station="x"), "station", "station_id"),
    (dict(mqtt__reconnect_max=30), "mqtt.reconnect_max", "reconnect_max_s"),
])
def test_unknown_field_suggests_close_name(changes, path, hint):
    """An unknown field is refused by path and the message suggests the intended name."""
    message = _refused(_doc(**changes))
    assert message.startswith(path + ": unknown field"), message
    assert "did you mean %r" % hint in message, message


def test_unknown_field_without_close_name():
    """A field unlike any known one is refused without a misleading hint."""
    message = _refused(_doc(meter__xyzzy=1))
    assert message == "meter.xyzzy: unknown field"


def test_reconnect_min_above_max_is_refused():
    """mqtt.reconnect_min_s above mqtt.reconnect_max_s is refused naming both."""
    message = _refused(_doc(mqtt__reconnect_min_s=50, mqtt__reconnect_max_s=20))
    assert message.startswith("mqtt.reconnect_min_s: 50")
    assert "mqtt.reconnect_max_s 20" in message


@pytest.mark.parametrize("path", ["meter.poll_interval_s", "mqtt.reconnect_min_s", "mqtt.telemetry_interval_s"])
def test_nan_in_number_setting_is_refused(path):
    """NaN (which Python's json accepts) is not a usable interval and must be refused."""
    text = json.dumps(_doc(**{path.replace(".", "__"): "NAN"})).replace('"NAN"', "NaN")
    with pytest.raises(ConfigError) as info:
        parse_board(text, "b.json")
    assert path in str(info.value)


def test_missing_file_is_refused(tmp_path):
    """A board file that does not exist is refused naming the path."""
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as info:
        load_board(path)
    assert path in str(info.value) and "cannot read board file" in str(info.value)


def test_load_board_prefixes_the_file_name(tmp_path):
    """Errors from a file carry the file's path before the field path."""
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_doc(meter__baudrate=9601)))
    with pytest.raises(ConfigError) as info:
        load_board(str(path))
    assert str(info.value).startswith("%s: meter.baudrate: 9601" % path)


# --- homeassistant section ----------------------------------------------------------------


def test_homeassistant_defaults():
    """Discovery is on by default, under Home Assistant's default prefix and birth topic; the
    node id is the station id and the device is named after it."""
    ha = validate(copy.deepcopy(MINIMAL))["homeassistant"]
    assert ha == {"enabled": True, "prefix": "homeassistant", "node_id": "st-1",
                  "device_name": None, "birth_topic": "homeassistant/status"}


@pytest.mark.parametrize("station_id,node_id", [
    ("sim-001", "sim-001"), ("garage.left", "garage_left"), ("st:1@home", "st_1_home"),
    ("Box_7-A", "Box_7-A"),
])
def test_homeassistant_node_id_defaults_to_the_station_id_in_home_assistants_characters(station_id, node_id):
    """Home Assistant takes only [a-zA-Z0-9_-] in a discovery topic level: others become '_'."""
    assert validate(_doc(station_id=station_id))["homeassistant"]["node_id"] == node_id


def test_homeassistant_settings_are_taken():
    ha = validate(_doc(homeassistant__enabled=False, homeassistant__prefix="ha/discovery",
                       homeassistant__node_id="garage_1", homeassistant__device_name="Garage left",
                       homeassistant__birth_topic=None))["homeassistant"]
    assert ha == {"enabled": False, "prefix": "ha/discovery", "node_id": "garage_1",
                  "device_name": "Garage left", "birth_topic": None}


@pytest.mark.parametrize("changes,path,bad,reason", [
    (dict(homeassistant__enabled="yes"), "homeassistant.enabled", '"yes"', "true or false"),
    (dict(homeassistant__enabled=None), "homeassistant.enabled", "null", "not allowed"),
    (dict(homeassistant__prefix="home/#"), "homeassistant.prefix", '"home/#"', "'#'"),
    (dict(homeassistant__prefix="home/+/x"), "homeassistant.prefix", '"home/+/x"', "'+'"),
    (dict(homeassistant__prefix=""), "homeassistant.prefix", '""', "is empty"),
    (dict(homeassistant__prefix="/homeassistant"), "homeassistant.prefix", '"/homeassistant"', "empty topic level"),
    (dict(homeassistant__prefix="home assistant"), "homeassistant.prefix", '"home assistant"', "' '"),
    (dict(homeassistant__prefix=None), "homeassistant.prefix", "null", "not allowed"),
    (dict(homeassistant__node_id="garage.left"), "homeassistant.node_id", '"garage.left"', "'.'"),
    (dict(homeassistant__node_id="a/b"), "homeassistant.node_id", '"a/b"', "'/'"),
    (dict(homeassistant__node_id=""), "homeassistant.node_id", '""', "is empty"),
    (dict(homeassistant__node_id="x" * 65), "homeassistant.node_id", "xxxx", "longer than 64"),
    (dict(homeassistant__node_id=7), "homeassistant.node_id", "7", "a string"),
    (dict(homeassistant__device_name="  "), "homeassistant.device_name", '"  "', "is blank"),
    (dict(homeassistant__birth_topic="homeassistant/#"), "homeassistant.birth_topic",
     '"homeassistant/#"', "'#'"),
    (dict(homeassistant__birth_topic="ha//status"), "homeassistant.birth_topic", '"ha//status"',
     "empty topic level"),
    (dict(homeassistant=[]), "homeassistant", "[]", "expected an object"),
])
def test_broken_homeassistant_setting_is_refused_naming_the_field(changes, path, bad, reason):
    """Each bad value is refused with the field path, the value and what is wrong with it."""
    message = _refused(_doc(**changes))
    assert message.startswith(path + ": "), message
    assert bad in message and reason in message, message


def test_misspelt_homeassistant_field_gets_a_suggestion():
    message = _refused(_doc(homeassistant__node="x"))
    assert message.startswith("homeassistant.node: unknown field") and "node_id" in message


# --- overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize("assignment,path,value", [
    ("meter.unit_id=17", "meter.unit_id", 17),
    ("meter.poll_interval_s=0.5", "meter.poll_interval_s", 0.5),
    ("meter.port=/dev/pts/3", "meter.port", "/dev/pts/3"),
    ("mqtt.username=null", "mqtt.username", None),
    ("mqtt.tls.enabled=true", "mqtt.tls.enabled", True),
    ("station_id=1234", "station_id", "1234"),
    ('mqtt.host="broker.local"', "mqtt.host", "broker.local"),
])
def test_override_sets_typed_value(assignment, path, value):
    """An override parses its value as JSON (a plain string for string settings) and validates."""
    doc = copy.deepcopy(MINIMAL)
    apply_override(doc, assignment)
    assert _get(doc, path) == value and type(_get(doc, path)) is type(value)
    config = validate(doc)
    assert _get(config, path) == value


def test_override_creates_missing_sections():
    """An override of a section the file omits creates it."""
    doc = copy.deepcopy(MINIMAL)
    apply_override(doc, "mqtt.tls.ca_file=/etc/ca.pem")
    assert doc["mqtt"]["tls"]["ca_file"] == "/etc/ca.pem"


def test_override_with_bad_value_is_refused_by_validate():
    """A bad override value is refused by validation naming the field."""
    doc = copy.deepcopy(MINIMAL)
    apply_override(doc, "meter.baudrate=9601")
    with pytest.raises(ConfigError, match=r"^meter\.baudrate: 9601"):
        validate(doc)


@pytest.mark.parametrize("assignment,path", [
    ("meter.baud=9600", "meter.baud"),
    ("nosuch.field=1", "nosuch.field"),
    ("meter.port.x=1", "meter.port.x"),
])
def test_override_of_unknown_setting_is_refused(assignment, path):
    """An override naming no setting is refused with that path."""
    with pytest.raises(ConfigError) as info:
        apply_override({}, assignment)
    assert str(info.value).startswith(path + ": unknown setting")


def test_override_of_section_is_refused():
    """An override naming a section is refused and lists the section's fields."""
    with pytest.raises(ConfigError) as info:
        apply_override({}, "mqtt.tls=true")
    message = str(info.value)
    assert message.startswith("mqtt.tls: is a section")
    assert "ca_file" in message


def test_override_without_equals_is_refused():
    """An override must be section.field=value."""
    with pytest.raises(ConfigError, match="meter.port"):
        apply_override({}, "meter.port")


def test_override_into_null_section_is_refused():
    """Overriding into a section the file sets to null is a ConfigError, not a crash."""
    doc = {"station_id": "st-1", "meter": None}
    with pytest.raises(ConfigError, match="meter"):
        apply_override(doc, "meter.port=/dev/ttyUSB0")


# --- the real CLI -------------------------------------------------------------------------


def _cli(tmp_path, board_text, *extra):
    board = tmp_path / "board.json"
    board.write_text(board_text)
    result = subprocess.run(
        [sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", str(board)] + list(extra),
        cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    return result, board


@pytest.mark.parametrize("board_doc,field", [
    (_doc(meter__baudrate=9601), "meter.baudrate"),
    (_doc(station_id="a/b"), "station_id"),
    (_doc(mqtt__port="1883"), "mqtt.port"),
    (_doc(meter__baud=9600), "meter.baud"),
])
def test_cli_refuses_broken_board(tmp_path, board_doc, field):
    """The agent exits 2 with "refusing to start" and the field, before opening anything."""
    result, board = _cli(tmp_path, json.dumps(board_doc))
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr
    assert field in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["board.json"]  # nothing created (state, keys, ptys)


def test_cli_refuses_bad_override(tmp_path):
    """A --set naming an unknown setting is refused the same way."""
    result, board = _cli(tmp_path, json.dumps(MINIMAL), "--set", "meter.baud=9600")
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and "meter.baud" in result.stderr


def test_cli_refuses_not_json(tmp_path):
    """A board that is not JSON is refused with exit 2."""
    result, board = _cli(tmp_path, "{nope")
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and "not valid JSON" in result.stderr


def test_cli_refuses_missing_file(tmp_path):
    """A missing board file is refused with exit 2 naming it."""
    missing = str(tmp_path / "missing.json")
    result = subprocess.run([sys.executable, "-m", "evse_agent.ports.cpython.main", "--board", missing],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and missing in result.stderr
