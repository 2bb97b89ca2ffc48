"""Board file schema and validation.

A board file is JSON describing one charger controller: station id, the meter's serial
line and model, and MQTT settings. ``load_board`` / ``validate`` fill defaults and refuse a
broken file with a ``ConfigError`` that names the field and the bad value, so a technician
can fix it without reading code. The same schema serves command-line overrides
(``apply_override``) and, later, the console's ``config set``.
"""

import json

from .meter_models import MODELS


class ConfigError(ValueError):
    """A board file or setting that cannot be used; the message names the field."""


_REQUIRED = object()


class Field:
    """One setting: type, default, and the rule its value must follow."""

    __slots__ = ("kind", "default", "choices", "minimum", "maximum", "nullable", "check", "help")

    def __init__(self, kind, default=_REQUIRED, choices=None, minimum=None, maximum=None,
                 nullable=False, check=None, help=""):
        self.kind = kind
        self.default = default
        self.choices = choices
        self.minimum = minimum
        self.maximum = maximum
        self.nullable = nullable
        self.check = check
        self.help = help


def _topic_level(value):
    """Station ids and prefixes become MQTT topic levels: no wildcards or separators."""
    if not value:
        return "is empty"
    for ch in value:
        if ch in "/+#" or ord(ch) < 33 or ord(ch) > 126:
            return "contains %r; use letters, digits, '-', '_' or '.'" % ch
    if len(value) > 64:
        return "is longer than 64 characters"
    return None


_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

SCHEMA = {
    "description": Field(str, "", help="free text for people reading the file"),
    "station_id": Field(str, check=_topic_level, help="station id, used in MQTT topics"),
    "meter": {
        "model": Field(str, choices=tuple(sorted(MODELS)), help="meter register map"),
        "unit_id": Field(int, 1, minimum=1, maximum=247, help="Modbus unit (slave) id"),
        "port": Field(str, help="serial device of the RS-485 line"),
        "baudrate": Field(int, 9600, choices=_BAUDRATES),
        "parity": Field(str, "N", choices=("N", "E", "O")),
        "stopbits": Field(int, 1, choices=(1, 2)),
        "timeout_ms": Field(int, 500, minimum=20, maximum=5000, help="response timeout"),
        "retries": Field(int, 2, minimum=0, maximum=10, help="retries after a failed request"),
        "poll_interval_s": Field(float, 1.0, minimum=0.1, maximum=3600),
        "offline_after": Field(int, 3, minimum=1, maximum=100,
                               help="failed cycles in a row before the meter is reported offline"),
    },
    "mqtt": {
        "host": Field(str, "127.0.0.1"),
        "port": Field(int, 1883, minimum=1, maximum=65535),
        "topic_prefix": Field(str, "evse", check=_topic_level),
        "client_id": Field(str, None, nullable=True, help="default: evse-agent-<station_id>"),
        "username": Field(str, None, nullable=True),
        "password": Field(str, None, nullable=True),
        "keepalive_s": Field(int, 30, minimum=5, maximum=3600),
        "telemetry_interval_s": Field(float, 1.0, minimum=0.1, maximum=3600),
        "status_interval_s": Field(float, 60.0, minimum=1, maximum=3600,
                                   help="how often the meter link status is republished"),
        "reconnect_min_s": Field(float, 1.0, minimum=0.1, maximum=600),
        "reconnect_max_s": Field(float, 60.0, minimum=1, maximum=3600),
        "tls": {
            "enabled": Field(bool, False),
            "ca_file": Field(str, None, nullable=True, help="CA bundle; default: system CAs"),
            "cert_file": Field(str, None, nullable=True, help="client certificate"),
            "key_file": Field(str, None, nullable=True, help="client key"),
            "insecure": Field(bool, False, help="skip host name check (testing only)"),
        },
    },
}


def _kind_name(kind):
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]


def _check_value(path, field, value):
    if value is None:
        if field.nullable:
            return None
        raise ConfigError("%s: null is not allowed; expected %s" % (path, _kind_name(field.kind)))
    kind = field.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError("%s: %s is not %s" % (path, json.dumps(value), _kind_name(kind)))
    if not isinstance(value, kind):
        raise ConfigError("%s: %s is not %s" % (path, json.dumps(value), _kind_name(kind)))
    if field.choices is not None and value not in field.choices:
        raise ConfigError("%s: %s is not one of %s"
                          % (path, json.dumps(value), ", ".join(json.dumps(c) for c in field.choices)))
    if field.minimum is not None and value < field.minimum:
        raise ConfigError("%s: %s is below the minimum %s" % (path, json.dumps(value), field.minimum))
    if field.maximum is not None and value > field.maximum:
        raise ConfigError("%s: %s is above the maximum %s" % (path, json.dumps(value), field.maximum))
    if field.check is not None:
        problem = field.check(value)
        if problem:
            raise ConfigError("%s: %s %s" % (path, json.dumps(value), problem))
    return value


def _closest(name, known):
    """A known key that looks like a typo of ``name``, or None."""
    best = None
    for key in known:
        if key.startswith(name[:3]) or name.startswith(key[:3]) or name in key or key in name:
            best = key
            break
    return best


def _validate_section(path, schema, doc):
    if not isinstance(doc, dict):
        raise ConfigError("%s: expected an object, got %s" % (path or "board", json.dumps(doc)))
    for key in doc:
        if key not in schema:
            hint = _closest(key, schema)
            where = path + "." + key if path else key
            raise ConfigError("%s: unknown field%s" % (where, " (did you mean %r?)" % hint if hint else ""))
    result = {}
    for key, spec in schema.items():
        where = path + "." + key if path else key
        if isinstance(spec, dict):
            result[key] = _validate_section(where, spec, doc.get(key, {}))
        elif key in doc:
            result[key] = _check_value(where, spec, doc[key])
        elif spec.default is _REQUIRED:
            raise ConfigError("%s: missing (%s)" % (where, spec.help or "required"))
        else:
            result[key] = spec.default
    return result


def validate(doc):
    """A complete board configuration (defaults filled) from a parsed board document."""
    config = _validate_section("", SCHEMA, doc)
    mqtt = config["mqtt"]
    if mqtt["reconnect_min_s"] > mqtt["reconnect_max_s"]:
        raise ConfigError("mqtt.reconnect_min_s: %s is above mqtt.reconnect_max_s %s"
                          % (mqtt["reconnect_min_s"], mqtt["reconnect_max_s"]))
    if mqtt["client_id"] is None:
        mqtt["client_id"] = "evse-agent-" + config["station_id"]
    return config


def parse_board(text, source="board file"):
    """A validated configuration from board-file text; ConfigError names what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise ConfigError("%s: not valid JSON (%s)" % (source, error))
    try:
        return validate(doc)
    except ConfigError as error:
        raise ConfigError("%s: %s" % (source, error))


def load_board(path):
    """The validated configuration in the board file at ``path``."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError("%s: cannot read board file (%s)" % (path, error))
    return parse_board(text, path)


def field_at(path):
    """The schema Field for a dotted ``path``; ConfigError if there is none."""
    spec = SCHEMA
    for part in path.split("."):
        if not isinstance(spec, dict) or part not in spec:
            raise ConfigError("%s: unknown setting" % path)
        spec = spec[part]
    if isinstance(spec, dict):
        raise ConfigError("%s: is a section, name one of its fields (%s)" % (path, ", ".join(spec)))
    return spec


def apply_override(doc, assignment):
    """Set ``section.field=value`` in a raw board document; the value is JSON or a plain string."""
    if "=" not in assignment:
        raise ConfigError("override %r is not of the form section.field=value" % assignment)
    path, text = assignment.split("=", 1)
    path = path.strip()
    field = field_at(path)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if field.kind is str and not isinstance(value, str) and value is not None:
        value = text
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
