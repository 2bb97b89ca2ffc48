"""Home Assistant MQTT discovery: every config passes Home Assistant's own schema, every
``value_template`` turns the agent's real documents into the right entity state, and end to
end the configs arrive retained, their state topics carry what the templates expect, and
they come back after a broker restart and on Home Assistant's birth message.

Home Assistant itself needs a newer Python than this suite, so the parts of its MQTT
integration that a discovery payload goes through are transcribed below into voluptuous (the
library Home Assistant validates with), from home-assistant/core (dev branch, 2025):

- ``homeassistant/components/mqtt/discovery.py``: ``TOPIC_MATCHER``;
- ``homeassistant/components/mqtt/config.py``: ``MQTT_BASE_SCHEMA``, ``MQTT_RO_SCHEMA``;
- ``homeassistant/components/mqtt/schemas.py``: ``MQTT_AVAILABILITY_SCHEMA``,
  ``MQTT_ENTITY_DEVICE_INFO_SCHEMA``, ``MQTT_ORIGIN_INFO_SCHEMA``, ``MQTT_ENTITY_COMMON_SCHEMA``;
- ``homeassistant/components/mqtt/util.py``: ``valid_topic``, ``valid_subscribe_topic``;
- ``homeassistant/components/mqtt/sensor.py``: ``_PLATFORM_SCHEMA_BASE``,
  ``validate_sensor_state_and_device_class_config``, ``MqttSensor._update_state``;
- ``homeassistant/components/mqtt/binary_sensor.py``: ``PLATFORM_SCHEMA_MODERN``,
  ``MqttBinarySensor._state_message_received``;
- ``homeassistant/components/sensor/const.py``: ``SensorDeviceClass``, ``SensorStateClass``,
  ``NON_NUMERIC_DEVICE_CLASSES``, ``DEVICE_CLASS_UNITS``, ``DEVICE_CLASS_STATE_CLASSES`` (with the
  unit enums of ``homeassistant/const.py``);
- ``homeassistant/components/binary_sensor/__init__.py``: ``BinarySensorDeviceClass``;
- ``homeassistant/helpers/config_validation.py``: ``string``, ``boolean``, ``positive_int``,
  ``icon``, ``template``, ``ensure_list``.

Documentation: https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery,
https://www.home-assistant.io/integrations/sensor.mqtt/,
https://www.home-assistant.io/integrations/binary_sensor.mqtt/,
https://www.home-assistant.io/docs/configuration/templating/#using-value-templates-with-mqtt,
https://developers.home-assistant.io/docs/core/entity/sensor/.

Stricter than Home Assistant on purpose: its discovery schemas drop unknown keys silently
(``vol.REMOVE_EXTRA``), here an unknown key is an error, so a misspelt option cannot go
unnoticed; and a state class the device class does not allow, which Home Assistant only logs
(and then keeps no long-term statistics), is an error too.
"""

import copy
import json
import re
import time
from types import SimpleNamespace

import pytest
import voluptuous as vol
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from evse_agent import __version__
from evse_agent.config import validate
from evse_agent.ha_discovery import Discovery, discovery_messages
from evse_agent.messages import Outbox, meter_status_doc, telemetry_doc
from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import ABB_B23, SDM120, SDM630
from evse_agent.modbus_rtu import RtuMaster
from evse_agent.pilot import InputState
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.reading import Reading
from evse_agent.station import Ports, build_station
from evse_tools.testkit.subscriber import Collector
from evse_tools.sim.vehicle_sim import VehicleSim
from conftest import wait_for
from test_session_engine import Station

BOARD = {"station_id": "sim-001", "meter": {"model": "sdm630", "port": "x"}}


# == Home Assistant's schemas, transcribed ==================================================

# homeassistant/components/mqtt/discovery.py: the levels after "<discovery prefix>/".
TOPIC_MATCHER = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)"
                           r"?(?P<object_id>[a-zA-Z0-9_-]+)/config")

# A Jinja environment like Home Assistant's (TemplateEnvironment is an
# ImmutableSandboxedEnvironment); value templates use only core Jinja here.
JINJA = ImmutableSandboxedEnvironment()


def string(value):
    """cv.string."""
    if value is None:
        raise vol.Invalid("string value is None")
    if isinstance(value, (list, dict)):
        raise vol.Invalid("value should be a string")
    return str(value)


def boolean(value):
    """cv.boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.lower().strip()
        if lowered in ("1", "true", "yes", "on", "enable"):
            return True
        if lowered in ("0", "false", "no", "off", "disable"):
            return False
    elif isinstance(value, (int, float)):
        return value != 0
    raise vol.Invalid("invalid boolean value %s" % value)


positive_int = vol.All(vol.Coerce(int), vol.Range(min=0))  # cv.positive_int


def ensure_list(value):
    """cv.ensure_list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def icon(value):
    """cv.icon."""
    text = str(value)
    if ":" in text:
        return text
    raise vol.Invalid('Icons should be specified in the form "prefix:name"')


def template(value):
    """cv.template: a string that compiles as a Home Assistant (Jinja) template."""
    if value is None:
        raise vol.Invalid("template value is None")
    if isinstance(value, (list, dict)):
        raise vol.Invalid("template value should be a string")
    try:
        JINJA.from_string(str(value))
    except TemplateSyntaxError as error:
        raise vol.Invalid("invalid template (%s)" % error)
    return str(value)


def valid_topic(value):
    """mqtt/util.py valid_topic."""
    topic = string(value)
    raw = topic.encode("utf-8")
    if not raw:
        raise vol.Invalid("MQTT topic name/filter must not be empty.")
    if len(raw) > 65535:
        raise vol.Invalid("MQTT topic name/filter must not be longer than 65535 encoded bytes.")
    for char in topic:
        if char == "\0":
            raise vol.Invalid("MQTT topic name/filter must not contain null character.")
        if char <= "\u001f" or "\u007f" <= char <= "\u009f":
            raise vol.Invalid("MQTT topic name/filter must not contain control characters.")
        if "\ufdd0" <= char <= "\ufdef" or (ord(char) & 0xFFFF) in (0xFFFE, 0xFFFF):
            raise vol.Invalid("MQTT topic name/filter must not contain non-characters.")
    return topic


def valid_subscribe_topic(value):
    """mqtt/util.py valid_subscribe_topic: wildcards only as whole levels, '#' last."""
    topic = valid_topic(value)
    for i, char in enumerate(topic):
        if char == "+" and ((i > 0 and topic[i - 1] != "/") or (i < len(topic) - 1 and topic[i + 1] != "/")):
            raise vol.Invalid("Single-level wildcard must occupy an entire level of the filter")
    index = topic.find("#")
    if index != -1:
        if index != len(topic) - 1:
            raise vol.Invalid("Multi-level wildcard must be the last character in the topic filter.")
        if len(topic) > 1 and topic[index - 1] != "/":
            raise vol.Invalid("Multi-level wildcard must be after a topic level separator.")
    return topic


valid_qos = vol.All(vol.Coerce(int), vol.In([0, 1, 2]))

# mqtt/config.py: MQTT_BASE_SCHEMA extended to MQTT_RO_SCHEMA (entities that read a topic).
MQTT_RO = {
    vol.Optional("qos", default=0): valid_qos,
    vol.Optional("encoding", default="utf-8"): string,
    vol.Optional("group"): vol.All(ensure_list, [string]),
    vol.Required("state_topic"): valid_subscribe_topic,
    vol.Optional("value_template"): template,
}

# mqtt/schemas.py: MQTT_AVAILABILITY_SINGLE_SCHEMA + MQTT_AVAILABILITY_LIST_SCHEMA.
MQTT_AVAILABILITY = {
    vol.Exclusive("availability_topic", "availability"): valid_subscribe_topic,
    vol.Optional("availability_template"): template,
    vol.Optional("payload_available", default="online"): string,
    vol.Optional("payload_not_available", default="offline"): string,
    vol.Optional("availability_mode", default="latest"): vol.All(string, vol.In(["all", "any", "latest"])),
    vol.Exclusive("availability", "availability"): vol.All(ensure_list, [vol.Schema({
        vol.Required("topic"): valid_subscribe_topic,
        vol.Optional("payload_available", default="online"): string,
        vol.Optional("payload_not_available", default="offline"): string,
        vol.Optional("value_template"): template,
    })]),
}


def device_has_an_identifier(value):
    """mqtt/schemas.py validate_device_has_at_least_one_identifier."""
    if value.get("identifiers") or value.get("connections"):
        return value
    raise vol.Invalid("Device must have at least one identifying value in 'identifiers' and/or 'connections'")


MQTT_DEVICE = vol.All(vol.Schema({
    vol.Optional("identifiers", default=list): vol.All(ensure_list, [string]),
    vol.Optional("connections", default=list): vol.All(ensure_list, [vol.All(vol.Length(2), [string])]),
    vol.Optional("manufacturer"): string,
    vol.Optional("model"): string,
    vol.Optional("model_id"): string,
    vol.Optional("name"): string,
    vol.Optional("hw_version"): string,
    vol.Optional("serial_number"): string,
    vol.Optional("sw_version"): string,
    vol.Optional("via_device"): string,
    vol.Optional("suggested_area"): string,
    vol.Optional("configuration_url"): string,
}), device_has_an_identifier)

MQTT_ORIGIN = vol.Schema({
    vol.Required("name"): string,
    vol.Optional("sw_version"): string,
    vol.Optional("support_url"): string,
})

# mqtt/schemas.py MQTT_ENTITY_COMMON_SCHEMA (availability included).
MQTT_ENTITY_COMMON = {
    **MQTT_AVAILABILITY,
    vol.Optional("device"): MQTT_DEVICE,
    vol.Optional("origin"): MQTT_ORIGIN,
    vol.Optional("enabled_by_default", default=True): boolean,
    vol.Optional("entity_category"): vol.In(["config", "diagnostic"]),
    vol.Optional("icon"): icon,
    vol.Optional("json_attributes_topic"): valid_subscribe_topic,
    vol.Optional("json_attributes_template"): template,
    vol.Optional("object_id"): string,
    vol.Optional("unique_id"): string,
}

# sensor/const.py SensorDeviceClass and SensorStateClass.
SENSOR_DEVICE_CLASSES = (
    "date", "enum", "timestamp", "apparent_power", "aqi", "area", "atmospheric_pressure", "battery",
    "blood_glucose_concentration", "carbon_monoxide", "carbon_dioxide", "conductivity", "current",
    "data_rate", "data_size", "distance", "duration", "energy", "energy_distance", "energy_storage",
    "frequency", "gas", "humidity", "illuminance", "irradiance", "moisture", "monetary",
    "nitrogen_dioxide", "nitrogen_monoxide", "nitrous_oxide", "ozone", "ph", "pm1", "pm10", "pm25",
    "power_factor", "power", "precipitation", "precipitation_intensity", "pressure", "reactive_power",
    "signal_strength", "sound_pressure", "speed", "sulphur_dioxide", "temperature",
    "volatile_organic_compounds", "volatile_organic_compounds_parts", "voltage", "volume",
    "volume_storage", "volume_flow_rate", "water", "weight", "wind_direction", "wind_speed",
)
STATE_CLASSES = ("measurement", "measurement_angle", "total", "total_increasing")
NON_NUMERIC_DEVICE_CLASSES = ("date", "enum", "timestamp")

# homeassistant/const.py unit enums, as sensor/const.py DEVICE_CLASS_UNITS uses them, for the
# electrical device classes (a config using another class fails below until it is added here).
UNIT_OF_ENERGY = {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"}
DEVICE_CLASS_UNITS = {
    "apparent_power": {"VA"},
    "current": {"mA", "A"},
    "energy": UNIT_OF_ENERGY,
    "energy_storage": UNIT_OF_ENERGY,
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "power": {"mW", "W", "kW", "MW", "GW", "TW"},
    "power_factor": {"%", None},
    "reactive_power": {"var", "kvar"},
    "voltage": {"µV", "mV", "V", "kV", "MV"},
}
DEVICE_CLASS_STATE_CLASSES = {
    "apparent_power": {"measurement"},
    "current": {"measurement"},
    "date": set(),
    "energy": {"total", "total_increasing"},
    "energy_storage": {"measurement"},
    "enum": set(),
    "frequency": {"measurement"},
    "power": {"measurement"},
    "power_factor": {"measurement"},
    "reactive_power": {"measurement"},
    "timestamp": set(),
    "voltage": {"measurement"},
}
STATE_CLASS_UNITS = {"measurement_angle": {"°"}}

# binary_sensor/__init__.py BinarySensorDeviceClass.
BINARY_SENSOR_DEVICE_CLASSES = (
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door",
    "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug",
    "power", "presence", "problem", "running", "safety", "smoke", "sound", "tamper", "update",
    "vibration", "window",
)


def sensor_rules(config):
    """mqtt/sensor.py validate_sensor_state_and_device_class_config, plus the state class the
    device class allows (sensor/const.py DEVICE_CLASS_STATE_CLASSES; Home Assistant logs
    "is using state class ... which is impossible considering device class" and keeps no
    long-term statistics) and the sensor platform's entity category rule (docs: "When set, the
    entity category must be diagnostic for sensors")."""
    state_class = config.get("state_class")
    if "last_reset_value_template" in config and state_class != "total":
        raise vol.Invalid("The option `last_reset_value_template` cannot be used together with "
                          "state class `%s`" % state_class)
    unit = config.get("unit_of_measurement")
    if unit is not None and not unit.strip():
        config.pop("unit_of_measurement")
    options = config.get("options")
    if options is not None:
        if not options:
            raise vol.Invalid("An empty options list is not allowed")
        if config.get("state_class") or config.get("unit_of_measurement"):
            raise vol.Invalid("Specifying `options` is not allowed together with the `state_class` "
                              "or `unit_of_measurement` option")
        if config.get("device_class") != "enum":
            raise vol.Invalid("The option `options` must be used together with device class `enum`, "
                              "got `device_class` '%s'" % config.get("device_class"))
    unit = config.get("unit_of_measurement")
    if state_class in STATE_CLASS_UNITS and unit not in STATE_CLASS_UNITS[state_class]:
        raise vol.Invalid("The unit of measurement '%s' is not valid together with state class '%s'"
                          % (unit, state_class))
    device_class = config.get("device_class")
    if unit is not None and device_class is not None and device_class in DEVICE_CLASS_UNITS \
            and unit not in DEVICE_CLASS_UNITS[device_class]:
        raise vol.Invalid("The unit of measurement `%s` is not valid together with device class `%s`"
                          % (unit, device_class))
    if device_class is not None and state_class is not None \
            and state_class not in DEVICE_CLASS_STATE_CLASSES[device_class]:
        raise vol.Invalid("state class '%s' is impossible considering device class '%s'"
                          % (state_class, device_class))
    return entity_category_rule(config)


def entity_category_rule(config):
    if config.get("entity_category") == "config":
        raise vol.Invalid("Entity category `config` is invalid for sensors")
    return config


# mqtt/sensor.py _PLATFORM_SCHEMA_BASE (MQTT_RO_SCHEMA + sensor options + common entity schema).
SENSOR_SCHEMA = vol.All(vol.Schema({
    **MQTT_RO,
    **MQTT_ENTITY_COMMON,
    vol.Optional("device_class"): vol.Any(vol.All(vol.Lower, vol.In(SENSOR_DEVICE_CLASSES)), None),
    vol.Optional("expire_after"): positive_int,
    vol.Optional("force_update", default=False): boolean,
    vol.Optional("last_reset_value_template"): template,
    vol.Optional("name"): vol.Any(string, None),
    vol.Optional("options"): ensure_list,
    vol.Optional("suggested_display_precision"): positive_int,
    vol.Optional("state_class"): vol.Any(vol.All(vol.Lower, vol.In(STATE_CLASSES)), None),
    vol.Optional("unit_of_measurement"): vol.Any(string, None),
}, extra=vol.PREVENT_EXTRA), sensor_rules)

# mqtt/binary_sensor.py PLATFORM_SCHEMA_MODERN.
BINARY_SENSOR_SCHEMA = vol.All(vol.Schema({
    **MQTT_RO,
    **MQTT_ENTITY_COMMON,
    vol.Optional("device_class"): vol.Any(vol.All(vol.Lower, vol.In(BINARY_SENSOR_DEVICE_CLASSES)), None),
    vol.Optional("expire_after"): positive_int,
    vol.Optional("force_update", default=False): boolean,
    vol.Optional("name"): vol.Any(string, None),
    vol.Optional("off_delay"): positive_int,
    vol.Optional("payload_off", default="OFF"): string,
    vol.Optional("payload_on", default="ON"): string,
}, extra=vol.PREVENT_EXTRA), entity_category_rule)

SCHEMAS = {"sensor": SENSOR_SCHEMA, "binary_sensor": BINARY_SENSOR_SCHEMA}


def ha_accepts(topic, payload, prefix="homeassistant"):
    """(component, node_id, object_id, validated config) as Home Assistant's discovery takes
    a message; vol.Invalid (or AssertionError for the topic) where it would not."""
    assert topic.startswith(prefix + "/"), topic
    match = TOPIC_MATCHER.fullmatch(topic[len(prefix) + 1:])
    assert match is not None, "not a discovery topic: %s" % topic
    component = match.group("component")
    assert component in SCHEMAS, component
    doc = json.loads(payload)
    return component, match.group("node_id"), match.group("object_id"), SCHEMAS[component](copy.deepcopy(doc))


# == what Home Assistant makes of a message, transcribed =====================================

def render(value_template, payload):
    """MqttValueTemplate.async_render_with_possible_json_value: ``value`` is the payload,
    ``value_json`` its JSON (absent if it is not JSON); the output is stripped."""
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8")
    variables = {"value": payload}
    try:
        variables["value_json"] = json.loads(payload)
    except ValueError:
        pass
    return JINJA.from_string(value_template).render(**variables).strip()


def numeric(config):
    """SensorEntity: a device class other than date/enum/timestamp, a state class, a unit or a
    display precision means the state must be a number."""
    device_class = config.get("device_class")
    return (device_class is not None and device_class not in NON_NUMERIC_DEVICE_CLASSES) \
        or any(config.get(key) is not None for key in
               ("state_class", "unit_of_measurement", "suggested_display_precision"))


def entity_state(component, config, payload):
    """The state an entity takes from one message on its state topic (MqttSensor._update_state,
    MqttBinarySensor._state_message_received): None is "unknown" (the rendered "None",
    PAYLOAD_NONE); a sensor state is a float where a number is expected; a binary sensor is
    "on" or "off". AssertionError where Home Assistant would log and ignore the message."""
    rendered = render(config["value_template"], payload) if "value_template" in config else payload
    if component == "binary_sensor":
        if rendered == config["payload_on"]:
            return "on"
        if rendered == config["payload_off"]:
            return "off"
        assert rendered == "None", "no matching payload: %r" % rendered
        return None
    if rendered == "None":
        return None
    if numeric(config):
        return float(rendered)  # Home Assistant refuses a numeric sensor state that is not a number
    options = config.get("options")
    assert options is None or rendered in options, "invalid option %r, allowed %s" % (rendered, options)
    return rendered


def available(config, latest):
    """MqttAvailabilityMixin: ``latest`` maps each availability topic to its last payload; with
    availability_mode "all" every topic must say available, "any" one, "latest" the last."""
    states = []
    for entry in config["availability"]:
        payload = latest.get(entry["topic"])
        if payload is None:
            states.append(False)  # nothing received yet: not available
            continue
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8")  # the entity's encoding, utf-8 by default
        rendered = render(entry["value_template"], payload) if "value_template" in entry else payload
        assert rendered in (entry["payload_available"], entry["payload_not_available"]), rendered
        states.append(rendered == entry["payload_available"])
    if config["availability_mode"] == "all":
        return all(states)
    return any(states)


# == the configs ================================================================================

def configs(board=BOARD, model=SDM630):
    """{(component, object_id): (topic, validated config)} of every discovery message."""
    config = validate(copy.deepcopy(board))
    found = {}
    for topic, payload in discovery_messages(config, model, __version__):
        assert isinstance(payload, bytes)
        component, node_id, object_id, validated = ha_accepts(topic, payload, config["homeassistant"]["prefix"])
        assert node_id == config["homeassistant"]["node_id"]
        assert (component, object_id) not in found
        found[(component, object_id)] = (topic, validated)
    return found


EXPECTED = {  # object id: (component, device class, state class, unit, channel)
    "power": ("sensor", "power", "measurement", "W", "telemetry"),
    "energy_import": ("sensor", "energy", "total_increasing", "kWh", "telemetry"),
    "voltage_l1": ("sensor", "voltage", "measurement", "V", "telemetry"),
    "voltage_l2": ("sensor", "voltage", "measurement", "V", "telemetry"),
    "voltage_l3": ("sensor", "voltage", "measurement", "V", "telemetry"),
    "current_l1": ("sensor", "current", "measurement", "A", "telemetry"),
    "current_l2": ("sensor", "current", "measurement", "A", "telemetry"),
    "current_l3": ("sensor", "current", "measurement", "A", "telemetry"),
    "frequency": ("sensor", "frequency", "measurement", "Hz", "telemetry"),
    "session_energy": ("sensor", "energy", "total_increasing", "kWh", "telemetry"),
    "pilot": ("sensor", "enum", None, None, "state"),
    "contactor": ("binary_sensor", None, None, None, "state"),
    "charging": ("binary_sensor", "battery_charging", None, None, "state"),
    "meter_link": ("binary_sensor", "connectivity", None, None, "meter"),
}
SINGLE_PHASE = [key for key in EXPECTED if not key.endswith(("_l2", "_l3"))]


@pytest.mark.parametrize("model", [SDM630, SDM120, ABB_B23], ids=lambda m: m.name)
def test_every_config_passes_home_assistants_schema(model):
    """Each discovery message is on a topic Home Assistant's discovery matches and passes the
    sensor or binary_sensor platform schema with its unit, device class and state class rules;
    one entity per meter phase, each with its own unique_id, all on one device."""
    found = configs(model=model)
    expected = EXPECTED if model.phases == 3 else {key: EXPECTED[key] for key in SINGLE_PHASE}
    assert sorted(object_id for _, object_id in found) == sorted(expected)
    unique_ids = set()
    for (component, object_id), (topic, config) in found.items():
        kind, device_class, state_class, unit, channel = expected[object_id]
        assert topic == "homeassistant/%s/sim-001/%s/config" % (component, object_id)
        assert component == kind
        assert config.get("device_class") == device_class, object_id
        assert config.get("state_class") == state_class, object_id
        assert config.get("unit_of_measurement") == unit, object_id
        if component == "sensor":  # its device class's rules are transcribed above
            assert device_class is None or device_class in DEVICE_CLASS_STATE_CLASSES
        assert config["state_topic"] == "evse/sim-001/" + channel
        assert config["name"] and config["value_template"]
        unique_ids.add(config["unique_id"])
        assert config["device"] == {
            "identifiers": ["evse-agent-sim-001"], "connections": [], "name": "sim-001",
            "manufacturer": "evse-agent", "model": model.vendor + " " + model.product,
            "sw_version": __version__}
        assert config["origin"] == {"name": "evse-agent", "sw_version": __version__}
    assert len(unique_ids) == len(found)
    assert found[("sensor", "pilot")][1]["options"] == ["A", "B", "C", "D", "E", "F"]


def test_availability_follows_the_agent_and_for_meter_values_the_meter_link():
    """Every entity follows the agent's status (the last will); the meter's values also need
    the meter link up (availability_mode all); the meter link entity itself only the agent."""
    status = {"topic": "evse/sim-001/status", "payload_available": "online", "payload_not_available": "offline"}
    for (component, object_id), (topic, config) in configs().items():
        assert config["availability"][0] == status, object_id
        if config["state_topic"].endswith("/telemetry"):
            assert config["availability_mode"] == "all"
            meter = config["availability"][1]
            assert meter["topic"] == "evse/sim-001/meter" and "value_template" in meter
            assert len(config["availability"]) == 2
        else:
            assert len(config["availability"]) == 1, object_id


def test_topics_follow_the_homeassistant_section():
    """Prefix, node id and device name come from the board's homeassistant section; the
    entities keep reading the agent's own topics under mqtt.topic_prefix."""
    board = dict(BOARD, station_id="garage.left",
                 mqtt={"topic_prefix": "site-7"},
                 homeassistant={"prefix": "ha/discovery", "node_id": "bay_3", "device_name": "Garage left"})
    found = configs(board)
    topic, config = found[("sensor", "power")]
    assert topic == "ha/discovery/sensor/bay_3/power/config"
    assert config["state_topic"] == "site-7/garage.left/telemetry"
    assert config["device"]["name"] == "Garage left"
    assert config["device"]["identifiers"] == ["evse-agent-garage.left"]
    assert config["unique_id"] == "evse-agent-garage.left-power"
    # The default node id takes the station id into the characters Home Assistant accepts.
    topic, _ = configs(dict(BOARD, station_id="garage.left"))[("binary_sensor", "charging")]
    assert topic == "homeassistant/binary_sensor/garage_left/charging/config"


def _good_sensor():
    return json.loads(dict(discovery_messages(validate(copy.deepcopy(BOARD)), SDM630, __version__))[
        "homeassistant/sensor/sim-001/energy_import/config"])


@pytest.mark.parametrize("change,reason", [
    ({"state_class": "measurement"}, "impossible considering device class"),
    ({"unit_of_measurement": "W"}, "not valid together with device class"),
    ({"device_class": "kilowatthours"}, "value must be one of"),
    ({"options": ["A", "B"]}, "not allowed together with the `state_class`"),
    ({"options": ["A", "B"], "state_class": None, "unit_of_measurement": None},
     "must be used together with device class"),
    ({"last_reset_value_template": "{{ value }}"}, "cannot be used together with state class"),
    ({"state_topic": "evse/#/telemetry"}, "Multi-level wildcard"),
    ({"value_template": "{{ value_json.energy_wh "}, "invalid template"),
    ({"icon": "ev-station"}, "prefix:name"),
    ({"availability_mode": "most"}, "value must be one of"),
    ({"device": {"name": "sim-001"}}, "at least one identifying value"),
    ({"entity_category": "config"}, "invalid for sensors"),
    ({"unit_of_measurment": "kWh"}, "extra keys not allowed"),
    ({"state_topic": None}, "string value is None"),
])
def test_the_transcribed_schema_refuses_what_home_assistant_refuses(change, reason):
    """The transcription is not vacuous: one wrong option in a good config is refused."""
    doc = _good_sensor()
    SENSOR_SCHEMA(copy.deepcopy(doc))
    doc.update(change)
    with pytest.raises(vol.Invalid) as info:
        SENSOR_SCHEMA(doc)
    assert reason in str(info.value)


def test_the_transcribed_binary_sensor_schema_refuses_an_unknown_device_class():
    topic, _ = configs()[("binary_sensor", "contactor")]
    doc = json.loads(dict(discovery_messages(validate(copy.deepcopy(BOARD)), SDM630, __version__))[topic])
    BINARY_SENSOR_SCHEMA(copy.deepcopy(doc))
    doc["device_class"] = "contactor"
    with pytest.raises(vol.Invalid, match="value must be one of"):
        BINARY_SENSOR_SCHEMA(doc)


# == the templates against the agent's real documents ========================================

class Capture:
    """A publisher that keeps the last payload of each topic, as the outbox sends it."""

    def __init__(self):
        self.latest = {}

    def publish(self, topic, payload, qos=0, retain=False):
        self.latest[topic] = payload
        return 1


def _outbox():
    capture = Capture()
    return capture, Outbox(capture, "sim-001", SimpleNamespace(next_seq=8))


def _states(found, payloads):
    """{object_id: state} of the entities whose state topic has a payload (its last one)."""
    return {object_id: entity_state(component, config, payloads[config["state_topic"]])
            for (component, object_id), (topic, config) in found.items() if config["state_topic"] in payloads}


def test_meter_values_render_from_telemetry():
    """Power, import energy (exact kWh from integer Wh), each phase's voltage and current,
    frequency: the values of the reading; a value the meter marks invalid is unknown."""
    capture, outbox = _outbox()
    reading = Reading(1_750_000_000.0, 1000, [229.93, 231.7, 231.82], [16.018, 15.981, 15.995],
                      [3646.2, 3665.8, 3671.0], 10983.04, 50.004, 4321987, 122, 12345678)
    outbox.post("evse/sim-001/telemetry", telemetry_doc(reading, 2710))
    states = _states(configs(), capture.latest)
    assert states["power"] == 10983.0
    assert states["energy_import"] == 4321.987 == 4321987 / 1000
    assert [states["voltage_l%d" % n] for n in (1, 2, 3)] == [229.93, 231.7, 231.82]
    assert [states["current_l%d" % n] for n in (1, 2, 3)] == [16.018, 15.981, 15.995]
    assert states["frequency"] == 50.004
    assert states["session_energy"] == 2.71

    # ABB marks quantities it lacks as invalid: null in telemetry, unknown in Home Assistant.
    gaps = Reading(1_750_000_001.0, 2000, [230.1, None, 229.0], [None, 0.0, 0.0], [0.0, 0.0, 0.0],
                   None, None, None, None, None)
    outbox.post("evse/sim-001/telemetry", telemetry_doc(gaps, None))
    states = _states(configs(model=ABB_B23), capture.latest)
    assert states["power"] is None and states["energy_import"] is None and states["frequency"] is None
    assert states["session_energy"] is None
    assert [states["voltage_l%d" % n] for n in (1, 2, 3)] == [230.1, None, 229.0]
    assert states["current_l1"] is None and states["current_l2"] == 0.0


def test_single_phase_telemetry_renders_its_one_phase():
    capture, outbox = _outbox()
    reading = Reading(1_750_000_000.0, 1000, [231.4], [9.87], [2270.5], 2270.5, 49.98, 5000000, 61, 7)
    outbox.post("evse/sim-001/telemetry", telemetry_doc(reading, None))
    found = configs(model=SDM120)
    states = _states(found, capture.latest)
    assert states["voltage_l1"] == 231.4 and states["current_l1"] == 9.87
    assert states["energy_import"] == 5000.0 and states["power"] == 2270.5


def test_charge_point_state_renders_from_the_session_engines_state_documents(tmp_path):
    """Pilot state, contactor (feedback, else command) and charging, from the state document
    the session engine publishes; session energy from telemetry through a whole session."""
    found = configs()
    station = Station(tmp_path)
    capture, outbox = _outbox()

    def state_and_telemetry():
        for kind, doc in station.published:
            if kind == "state":
                outbox.post("evse/sim-001/state", dict(doc))
        reading = station.engine.latest
        outbox.post("evse/sim-001/telemetry", telemetry_doc(reading, station.engine.energy_so_far()))
        return _states(found, capture.latest)

    # Before any input: nothing known about the pilot or the contactor.
    station.reading()
    outbox.post("evse/sim-001/state", station.engine.state_doc())
    states = _states(found, capture.latest)
    assert states["pilot"] is None and states["contactor"] is None and states["charging"] == "off"

    station.unplugged()
    station.idle(1)
    states = state_and_telemetry()
    assert (states["pilot"], states["contactor"], states["charging"], states["session_energy"]) == \
        ("A", "off", "off", None)
    station.plugged()
    station.idle(1)
    states = state_and_telemetry()
    assert (states["pilot"], states["contactor"], states["charging"], states["session_energy"]) == \
        ("B", "off", "off", 0.0)
    station.charging()
    station.flow(10)  # 3 Wh a second
    states = state_and_telemetry()
    assert (states["pilot"], states["contactor"], states["charging"], states["session_energy"]) == \
        ("C", "on", "on", 0.03)
    station.paused()
    station.idle(1)
    station.unplugged()
    states = state_and_telemetry()
    assert (states["pilot"], states["charging"], states["session_energy"]) == ("A", "off", None)
    assert station.sessions("end")[0]["energy_wh"] == 30

    # A board with only the command line, or no contactor lines at all.
    station.engine.on_inputs(InputState("C", 53.3, 32.0, False, True, None), 0)
    outbox.post("evse/sim-001/state", station.engine.state_doc())
    assert _states(found, capture.latest)["contactor"] == "on"
    station.engine.on_inputs(InputState("E", None, None, False, None, None), 0)
    outbox.post("evse/sim-001/state", station.engine.state_doc())
    states = _states(found, capture.latest)
    assert states["contactor"] is None and states["pilot"] == "E" and states["charging"] == "off"


class Clock:
    def __init__(self):
        self.ms = 5000

    def monotonic_ms(self):
        return self.ms

    def time(self):
        return 1_750_000_000.0 + self.ms / 1000


def test_meter_link_and_availability_render_from_the_meter_status_document():
    """The meter link entity and the meter values' availability follow ``online`` of the meter
    document the agent publishes; all entities follow the agent's status."""
    clock = Clock()
    meter = ModbusMeter(RtuMaster(None, clock, 9600, 300, 1), SDM630, 1, clock, offline_after=2)
    found = configs()
    capture, outbox = _outbox()
    power = found[("sensor", "power")][1]
    link = found[("binary_sensor", "meter_link")][1]

    def post_meter():
        outbox.post("evse/sim-001/meter", meter_status_doc(meter, clock), qos=1, retain=True)
        return capture.latest

    latest = dict(post_meter(), **{"evse/sim-001/status": "online"})
    assert entity_state("binary_sensor", link, latest["evse/sim-001/meter"]) == "off"  # before any poll
    assert not available(power, latest) and available(link, latest)
    meter.link.record_success(clock.ms)
    latest = dict(post_meter(), **{"evse/sim-001/status": "online"})
    assert entity_state("binary_sensor", link, latest["evse/sim-001/meter"]) == "on"
    assert available(power, latest) and available(link, latest)
    for _ in range(2):
        meter.link.record_failure("timeout: no response within 300 ms", clock.ms)
    latest = dict(post_meter(), **{"evse/sim-001/status": "online"})
    assert entity_state("binary_sensor", link, latest["evse/sim-001/meter"]) == "off"
    assert not available(power, latest) and available(link, latest)
    meter.link.record_success(clock.ms)
    latest = dict(post_meter(), **{"evse/sim-001/status": "offline"})  # the last will
    assert not available(power, latest) and not available(link, latest)
    assert not available(found[("sensor", "pilot")][1], latest)


# == the announcement after each connect ====================================================

class Publisher:
    def __init__(self):
        self.connected = False
        self.connects = 0
        self.sent = []
        self.subscriptions = {}

    def publish(self, topic, payload, qos=0, retain=False):
        if not self.connected:
            return None
        self.sent.append((topic, payload, qos, retain))
        return len(self.sent)

    def subscribe(self, topic, on_message):
        self.subscriptions[topic] = on_message


def test_discovery_announces_once_per_connection_and_on_home_assistants_birth():
    config = validate(copy.deepcopy(BOARD))
    publisher = Publisher()
    discovery = Discovery(config, SDM630, publisher, __version__)
    assert list(publisher.subscriptions) == ["homeassistant/status"]
    assert not discovery.due()
    publisher.connected, publisher.connects = True, 1
    assert discovery.due() and discovery.announce()
    assert len(publisher.sent) == 14 and all(qos == 1 and retain for _, _, qos, retain in publisher.sent)
    assert not discovery.due()
    publisher.subscriptions["homeassistant/status"](b"offline")
    assert not discovery.due()
    publisher.subscriptions["homeassistant/status"](b"online")
    assert discovery.due() and discovery.announce() and len(publisher.sent) == 28
    publisher.connected = False
    assert not discovery.due()
    publisher.connected, publisher.connects = True, 2
    assert discovery.due()


def test_no_birth_subscription_when_the_birth_topic_is_null():
    config = validate(dict(BOARD, homeassistant={"birth_topic": None}))
    publisher = Publisher()
    Discovery(config, SDM630, publisher, __version__)
    assert publisher.subscriptions == {}


def test_the_station_has_discovery_only_when_enabled(tmp_path):
    """build_station (both ports' wiring) gives the agent its discovery task when
    homeassistant.enabled, and none otherwise."""
    for enabled in (True, False):
        root = tmp_path / str(enabled)
        station = Station(root)
        config = validate(dict(BOARD, homeassistant={"enabled": enabled}, session={"state_dir": str(root / "state")},
                               journal={"dir": str(root / "journal")}))
        publisher = Publisher()
        agent = build_station(config, station.clock, Ports(None, FileSystem, publisher, None, station.signer))
        assert (agent.discovery is not None) == enabled
        assert bool(publisher.subscriptions) == enabled


# == end to end ================================================================================

FAST = ("--quiet", "--set", "meter.poll_interval_s=0.2", "--set", "meter.timeout_ms=150",
        "--set", "meter.retries=1", "--set", "mqtt.telemetry_interval_s=0.5",
        "--set", "io.pilot.sample_ms=10", "--set", "io.pilot.debounce_ms=40",
        "--set", "mqtt.reconnect_min_s=0.5", "--set", "mqtt.reconnect_max_s=1")


def _configs_received(collector, after=0.0):
    """{topic: payload} of the discovery configs received (after ``after``), last one wins."""
    return {m.topic: m.payload for m in collector.messages
            if m.topic.endswith("/config") and m.received > after}


def _retained_configs(broker, count):
    """The discovery configs a subscriber arriving now gets from the broker's retained store."""
    late = Collector(broker.host, broker.port, "homeassistant/#")
    try:
        wait_for(lambda: len([m for m in late.messages if m.retain]) >= count, 60)
        return {m.topic: m.payload for m in late.messages if m.retain and m.topic.endswith("/config")}
    finally:
        late.close()


def test_configs_arrive_retained_their_state_topics_render_and_come_back_after_a_broker_restart(
        broker, collector, meter_sim, agent_process, station_dir):
    """The agent on the sim board: all 14 configs arrive retained and pass Home Assistant's
    schema; during a charging session every state topic they name carries messages whose
    templates render into the right state; after the broker is killed (losing its retained
    messages) and restarted, the configs are published again on reconnect; Home Assistant's
    birth message brings them again too."""
    station_dir.mkdir(parents=True, exist_ok=True)
    pin_file = str(station_dir / "pins.json")
    vehicle = VehicleSim(pin_file, advertised_a=16.0)
    meter = meter_sim("sdm630", pin_file=pin_file)
    meter.physics.noise = False
    ha = Collector(broker.host, broker.port, "homeassistant/#")
    try:
        agent = agent_process(broker, meter.device, *FAST)
        assert wait_for(lambda: len(_configs_received(ha)) >= 14, 60), agent.log()
        received = _configs_received(ha)
        expected = dict(discovery_messages(validate(copy.deepcopy(BOARD)), SDM630, __version__))
        assert sorted(received) == sorted(expected)
        parsed = {}
        for topic, payload in received.items():
            component, _, object_id, config = ha_accepts(topic, payload)
            parsed[object_id] = (component, config)
        assert sorted(_retained_configs(broker, 14)) == sorted(expected)

        # A charging session: every state topic named in a config carries messages that render.
        # (The configs go out on connect, before the agent has settled its first pilot state:
        # a car plugged in before that is billed only from its first pause.)
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["pilot"] == "A"
                                  and m.body["meter_online"], timeout_s=60), agent.log()
        vehicle.plug()
        vehicle.charge()
        assert collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.body
                                  and (m.body["session_energy_wh"] or 0) >= 2, timeout_s=60), agent.log()
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.body["charging"], timeout_s=60)
        latest = {}
        for message in collector.messages:
            latest[message.topic] = message.payload
        state_topics = {config["state_topic"] for _, config in parsed.values()}
        assert state_topics == {"evse/sim-001/telemetry", "evse/sim-001/state", "evse/sim-001/meter"}
        states = {object_id: entity_state(component, config, latest[config["state_topic"]])
                  for object_id, (component, config) in parsed.items()}
        telemetry = json.loads(latest["evse/sim-001/telemetry"])
        assert 10000 < states["power"] < 12000, states
        assert states["energy_import"] == telemetry["energy_wh"] / 1000
        assert all(15.5 < states["current_l%d" % n] < 16.5 for n in (1, 2, 3)), states
        assert all(200 < states["voltage_l%d" % n] < 260 for n in (1, 2, 3)), states
        assert 49 < states["frequency"] < 51
        assert states["session_energy"] == telemetry["session_energy_wh"] / 1000 >= 0.002
        assert (states["pilot"], states["contactor"], states["charging"], states["meter_link"]) == \
            ("C", "on", "on", "on")
        for object_id, (component, config) in parsed.items():
            assert available(config, latest), object_id

        # Broker crash: its retained messages are gone; the reconnect brings the configs back.
        vehicle.pause()
        ha.close()
        collector.close()
        restarted_at = time.monotonic()
        broker.kill()
        broker.start()
        ha = Collector(broker.host, broker.port, "homeassistant/#")
        assert wait_for(lambda: len(_configs_received(ha, restarted_at)) >= 14, 60), agent.log()
        assert sorted(_configs_received(ha, restarted_at)) == sorted(expected)
        assert sorted(_retained_configs(broker, 14)) == sorted(expected)
        assert agent.log().count("MQTT connected") >= 2, agent.log()

        # Home Assistant's birth message asks for them again on the same connection.
        announced = agent.log().count("Home Assistant discovery: 14 configs")
        assert announced == 2, agent.log()  # one per connection
        asked_at = time.monotonic()
        ha.client.publish("homeassistant/status", "online", qos=1)
        assert wait_for(lambda: len(_configs_received(ha, asked_at)) >= 14, 60), agent.log()
        assert wait_for(lambda: agent.log().count("Home Assistant discovery: 14 configs") == announced + 1, 60)
        vehicle.unplug()
        assert agent.stop() == 0
    finally:
        ha.close()


def test_nothing_is_published_for_home_assistant_when_disabled(broker, collector, meter_sim, agent_process):
    sim = meter_sim("sdm630", profile="steady")
    ha = Collector(broker.host, broker.port, "homeassistant/#")
    try:
        agent = agent_process(broker, sim.device, *FAST, "--set", "homeassistant.enabled=false")
        assert collector.wait_for(lambda m: m.topic.endswith("/telemetry"), timeout_s=60), agent.log()
        # Several discovery checks would have passed by the time three more readings went out.
        seen = len(collector.on("telemetry"))
        assert wait_for(lambda: len(collector.on("telemetry")) >= seen + 3, 60), agent.log()
        assert ha.messages == []
        assert "Home Assistant discovery" not in agent.log()
    finally:
        ha.close()
