"""Board file schema and validation: the one loader and the one schema of every section.

A board file is JSON describing one charger controller: station id, the meter's serial
line and model, and MQTT settings; a board for a microcontroller adds the ``micropython``
section (UART pins, Wi-Fi, NTP, watchdog), described in the same schema language and
checked by the same engine when the loader is asked for that port (``port="micropython"``).
``load_board`` (a file, with command-line overrides) / ``parse_board`` (text) /
``validate`` (a parsed document) fill defaults and refuse a broken file with a
``ConfigError`` that names the field and the bad value, so a technician can fix it without
reading code. The same schema serves command-line overrides (``apply_override``) and the
technician console's ``config`` commands (``field_at``, ``setting_paths``, ``closest``).

A field marked ``live`` takes effect at once when changed on a running agent (the
console's ``config set``); ``is_live`` answers for a setting, ``live_settings`` lists them.
Every other setting needs a restart.
"""

import json

from .meter_models import MODELS


class ConfigError(ValueError):
    """A board file or setting that cannot be used; the message names the field."""


_REQUIRED = object()


class Field:
    """One setting: type, default, and the rule its value must follow."""

    __slots__ = ("kind", "default", "choices", "minimum", "maximum", "nullable", "check", "help", "live")

    def __init__(self, kind, default=_REQUIRED, choices=None, minimum=None, maximum=None,
                 nullable=False, check=None, help="", live=False):
        self.kind = kind
        self.default = default
        self.choices = choices
        self.minimum = minimum
        self.maximum = maximum
        self.nullable = nullable
        self.check = check
        self.help = help
        self.live = live  # the running agent takes a change into use at once


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


def _gpio_lines(count):
    """Check for a list of ``count`` GPIO line offsets."""
    def check(value):
        if len(value) != count:
            return "has %d entries; expected %d line offsets" % (len(value), count)
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                return "contains %s; line offsets are integers >= 0" % _shown(item)
        return None
    return check


def _topic_name(value):
    """Check for a topic name without wildcards: non-empty levels of printable ASCII."""
    if not value:
        return "is empty"
    for ch in value:
        if ch in "+#" or ord(ch) < 33 or ord(ch) > 126:
            return "contains %r; use letters, digits, '-', '_', '.' and '/' between levels" % ch
    if value[0] == "/" or value[-1] == "/" or "//" in value:
        return "has an empty topic level"
    if len(value) > 128:
        return "is longer than 128 characters"
    return None


# Home Assistant's discovery topic levels (node_id, object_id) take only these characters
# (homeassistant/components/mqtt/discovery.py, TOPIC_MATCHER).
HA_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"


def ha_node_id(station_id):
    """The default ``homeassistant.node_id``: the station id with every character Home
    Assistant does not take in a discovery topic level replaced by ``_``."""
    return "".join(ch if ch in HA_ID_CHARS else "_" for ch in station_id)


def _ha_id(value):
    """Check for a Home Assistant discovery topic level: ``[a-zA-Z0-9_-]+``."""
    if not value:
        return "is empty"
    for ch in value:
        if ch not in HA_ID_CHARS:
            return "contains %r; Home Assistant takes only letters, digits, '_' and '-'" % ch
    if len(value) > 64:
        return "is longer than 64 characters"
    return None


def _not_blank(value):
    return "is blank" if not value.strip() else None


def _host_name(value):
    """Check for a broker host: a name or address, no blanks or URL parts."""
    if not value.strip():
        return "is blank; name the broker's host name or IP address"
    for ch in value:
        if ord(ch) < 33 or ord(ch) > 126 or ch in "/@":
            return "contains %r; give a bare host name or IP address (no scheme, port or path)" % ch
    if len(value) > 253:
        return "is longer than 253 characters"
    return None


def _not_zero(value):
    return "would make every pilot reading the same voltage; use the ADC's real scale" if value == 0 else None


_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

_HEX = "0123456789abcdef"


def _pin_hash(value):
    """Check for ``sha256:<salt hex>:<64 hex digits>``, as ``evse-agent --pin-hash`` prints."""
    parts = value.split(":")
    if len(parts) != 3 or parts[0] != "sha256":
        return "is not of the form sha256:<salt hex>:<hash hex> (make one with evse-agent --pin-hash)"
    salt, digest = parts[1], parts[2]
    if len(salt) < 8 or len(salt) % 2 or any(ch not in _HEX for ch in salt):
        return "has a salt that is not an even number (8 or more) of lower-case hex digits"
    if len(digest) != 64 or any(ch not in _HEX for ch in digest):
        return "has a hash that is not 64 lower-case hex digits"
    return None


# Ports whose boards have a section of their own (the section is named after the port).
PORTS = ("micropython",)


def schema(port=None):
    """The board file's schema: nested sections of ``Field`` by name, built afresh on each
    call; with ``port="micropython"`` it holds that port's section too. Not kept at module
    level: on a microcontroller its ~150 objects would hold heap for as long as the agent
    runs, while it is needed only to validate the board file at start and by the console's
    ``config`` commands (``config.SCHEMA`` builds it too)."""
    if port is not None and port not in PORTS:
        raise ConfigError("port %s: unknown (known: %s)" % (_shown(port), ", ".join(PORTS)))
    fields = {
        "description": Field(str, "", help="free text for people reading the file", live=True),
        "station_id": Field(str, check=_topic_level, help="station id, used in MQTT topics"),
        "meter": {
            "model": Field(str, choices=tuple(sorted(MODELS)), help="meter register map"),
            "unit_id": Field(int, 1, minimum=1, maximum=247, help="Modbus unit (slave) id"),
            "port": Field(str, help="serial device of the RS-485 line"),
            "baudrate": Field(int, 9600, choices=_BAUDRATES),
            "parity": Field(str, "N", choices=("N", "E", "O")),
            "stopbits": Field(int, 1, choices=(1, 2)),
            "timeout_ms": Field(int, 500, minimum=20, maximum=5000, help="response timeout", live=True),
            "retries": Field(int, 2, minimum=0, maximum=10, help="retries after a failed request",
                             live=True),
            "poll_interval_s": Field(float, 1.0, minimum=0.1, maximum=3600, live=True),
            "offline_after": Field(int, 3, minimum=1, maximum=100,
                                   help="failed cycles in a row before the meter is reported offline"),
        },
        "io": {
            "driver": Field(str, "sim", choices=("sim", "gpiod"),
                            help="sim: pin bank file written by tools/sim/vehicle_sim; gpiod: Linux GPIO"),
            "sim_file": Field(str, "run/pins.json", help="pin bank file of the sim driver"),
            "chip": Field(str, "/dev/gpiochip0", help="GPIO chip of the gpiod driver"),
            "pilot": {
                "source": Field(str, "adc", choices=("adc", "lines"),
                                help="adc: pilot voltage; lines: comparator outputs of a pilot decoder"),
                "adc_path": Field(str, None, nullable=True,
                                  help="IIO raw value file of the pilot ADC (gpiod driver)"),
                "adc_scale": Field(float, 1.0, check=_not_zero,
                                   help="pilot volts = raw * adc_scale + adc_offset"),
                "adc_offset": Field(float, 0.0),
                "lines": Field(list, None, nullable=True, check=_gpio_lines(5),
                               help="comparator lines, high when the pilot is below "
                                    "10.5, 7.5, 4.5, 1.5 and -10.5 V"),
                "pwm_line": Field(int, None, nullable=True, minimum=0,
                                  help="line carrying the pilot PWM, if the board can measure its duty"),
                "sample_ms": Field(int, 20, minimum=5, maximum=1000),
                "debounce_ms": Field(int, 100, minimum=0, maximum=5000,
                                     help="a pilot state must hold this long to count"),
            },
            "contactor": {
                "command_line": Field(int, None, nullable=True, minimum=0),
                "feedback_line": Field(int, None, nullable=True, minimum=0),
                "active_low": Field(bool, False),
            },
        },
        "session": {
            "begin_at": Field(str, "plugin", choices=("plugin", "charge"),
                              help="take the begin reading at plug-in or at the first charge"),
            "fiscal_interval_s": Field(float, 0.0, minimum=0, maximum=86400,
                                       help="signed intermediate readings; 0 = off"),
            "state_dir": Field(str, "run/state", help="durable state: open session, counters"),
        },
        "events": {
            "voltage_min_v": Field(float, 207.0, minimum=0, maximum=1000,
                                   help="supply voltage band (230 V -10 %)", live=True),
            "voltage_max_v": Field(float, 253.0, minimum=0, maximum=1000, help="(230 V +10 %)", live=True),
            "phase_loss_v": Field(float, 100.0, minimum=0, maximum=1000,
                                  help="a phase below this while others are up is lost", live=True),
            "power_drop_pct": Field(float, 50.0, minimum=1, maximum=100,
                                    help="drop of charging power within one poll", live=True),
            "fluctuation_pct": Field(float, 25.0, minimum=1, maximum=100,
                                     help="power swing (max-min) over the fluctuation window", live=True),
            "fluctuation_window_s": Field(float, 10.0, minimum=1, maximum=600, live=True),
            "overcurrent_pct": Field(float, 10.0, minimum=0, maximum=100,
                                     help="tolerance above the advertised current", live=True),
            "overcurrent_grace_s": Field(float, 5.0, minimum=0, maximum=60,
                                         help="time a vehicle has to follow a lower advertised current", live=True),
            "contactor_check_ms": Field(int, 500, minimum=50, maximum=10000,
                                        help="feedback must follow the command within this time", live=True),
        },
        "journal": {
            "dir": Field(str, "run/journal", help="segment files of the store-and-forward journal"),
            "max_bytes": Field(int, 16 * 1024 * 1024, minimum=64 * 1024, maximum=1 << 40,
                               help="bound of the journal; aggregates are folded when it is near"),
            "reserve_bytes": Field(int, 1024 * 1024, minimum=4096, maximum=1 << 36,
                                   help="part of max_bytes kept for session records and events"),
            "segment_bytes": Field(int, 256 * 1024, minimum=1024, maximum=1 << 30),
            "sync_interval_s": Field(float, 30.0, minimum=0.1, maximum=3600,
                                     help="fsync of aggregates at least this often (sessions/events: at once)",
                                     live=True),
            "cursor_sync_s": Field(float, 60.0, minimum=0.1, maximum=3600,
                                   help="how often the acknowledged cursor is saved while it moves "
                                        "(after a crash, up to this much is sent again)", live=True),
            "aggregate_interval_s": Field(float, 10.0, minimum=0.1, maximum=3600,
                                          help="telemetry aggregate interval kept in the journal"),
            "window": Field(int, 64, minimum=1, maximum=1000,
                            help="journal records handed to the MQTT client and not yet acknowledged",
                            live=True),
        },
        "signing": {
            "key_file": Field(str, "run/station-key.pem",
                              help="station private key (created with mode 0600 on first start)"),
            "gateway_vendor": Field(str, "evse-agent", help="OCMF GI"),
            "gateway_serial": Field(str, None, nullable=True, help="OCMF GS; default: station_id"),
        },
        "clock": {
            "sync": Field(str, "kernel", choices=("kernel", "always", "never"),
                          help="how to know the clock is synchronised (OCMF time flag S or U)"),
        },
        "mqtt": {
            "host": Field(str, "127.0.0.1", check=_host_name),
            "port": Field(int, 1883, minimum=1, maximum=65535),
            "topic_prefix": Field(str, "evse", check=_topic_level),
            "client_id": Field(str, None, nullable=True, help="default: evse-agent-<station_id>"),
            "username": Field(str, None, nullable=True),
            "password": Field(str, None, nullable=True),
            "keepalive_s": Field(int, 30, minimum=5, maximum=3600),
            "telemetry_interval_s": Field(float, 1.0, minimum=0.1, maximum=3600, live=True),
            "status_interval_s": Field(float, 60.0, minimum=1, maximum=3600,
                                       help="how often the meter link status is republished", live=True),
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
        "homeassistant": {
            "enabled": Field(bool, True,
                             help="publish Home Assistant MQTT discovery configs (retained) on connect"),
            "prefix": Field(str, "homeassistant", check=_topic_name,
                            help="Home Assistant's discovery prefix"),
            "node_id": Field(str, None, nullable=True, check=_ha_id,
                             help="discovery topic level of this station; default: station_id with "
                                  "characters other than a-z A-Z 0-9 _ - replaced by _"),
            "device_name": Field(str, None, nullable=True, check=_not_blank,
                                 help="device name shown in Home Assistant; default: station_id"),
            "birth_topic": Field(str, "homeassistant/status", nullable=True, check=_topic_name,
                                 help="Home Assistant's birth message topic: the configs are published "
                                      "again when it says online; null: only on connect"),
        },
        "identification": {
            "enabled": Field(bool, False, help="identify drivers with an RFID reader (NXP PN532, HSU)"),
            "port": Field(str, None, nullable=True, help="serial device of the PN532 (CPython)"),
            "baudrate": Field(int, 115200, choices=_BAUDRATES, help="PN532 HSU speed (8N1)"),
            "uart_id": Field(int, None, nullable=True, minimum=0, maximum=3,
                             help="UART of the PN532 (MicroPython)"),
            "tx_pin": Field(int, None, nullable=True, minimum=0, help="UART TX GPIO (MicroPython)"),
            "rx_pin": Field(int, None, nullable=True, minimum=0, help="UART RX GPIO (MicroPython)"),
            "poll_interval_ms": Field(int, 250, minimum=20, maximum=10000, help="time between polls"),
            "debounce_ms": Field(int, 2000, minimum=0, maximum=60000,
                                 help="a tag must be away this long before it counts as a new tap"),
            "tap_before_s": Field(float, 60.0, minimum=0, maximum=3600,
                                  help="a tap this long before plug-in identifies the session"),
            "tap_after_s": Field(float, 120.0, minimum=0, maximum=3600,
                                 help="a tap this long after plug-in identifies the session"),
            "allow_list": Field(list, [], help="tag UIDs (hex) of known drivers: OCMF IL TRUSTED"),
            "allow_list_topic": Field(bool, True,
                                      help="take the allow-list from the retained <prefix>/<station>/allow_list"),
        },
        "console": {
            "port": Field(str, None, nullable=True,
                          help='serial device of the technician console; "pty" makes a '
                               'pseudo-terminal (host); "repl": the REPL UART (MicroPython); '
                               'null: no console'),
            "baudrate": Field(int, 115200, choices=_BAUDRATES, help="console line speed (8N1)"),
            "pty_link": Field(str, "run/console.pty", nullable=True,
                              help='with port "pty": symlink to the pseudo-terminal to connect to'),
            "pin_hash": Field(str, None, nullable=True, check=_pin_hash,
                              help="hash of the unlock PIN (evse-agent --pin-hash); null: no unlock",
                              live=True),
            "lock_after_s": Field(float, 300.0, minimum=1, maximum=86400,
                                  help="lock again after this long without input", live=True),
            "max_line": Field(int, 256, minimum=32, maximum=4096, help="longest input line, in bytes",
                              live=True),
        },
    }
    if port == "micropython":
        fields["micropython"] = _micropython_section()
    return fields


def _micropython_section():
    """What only a microcontroller board has: UART pins, RS-485 direction, pilot ADC pin,
    Wi-Fi, NTP and the watchdog (``ports/micropython/main.py``)."""
    return {
        "uart_id": Field(int, 2, minimum=0, maximum=3, help="UART of the RS-485 transceiver"),
        "tx_pin": Field(int, minimum=0, help="GPIO of the RS-485 transceiver"),
        "rx_pin": Field(int, minimum=0, help="GPIO of the RS-485 transceiver"),
        "de_pin": Field(int, None, nullable=True, minimum=0,
                        help="RS-485 driver enable (DE and /RE tied); null: auto-direction"),
        "de_active_high": Field(bool, True),
        "adc_pin": Field(int, None, nullable=True, minimum=0,
                         help='pilot voltage divider (io.pilot.source "adc")'),
        "wifi_ssid": Field(str, None, nullable=True, help="null: no Wi-Fi (a wired or host board)"),
        "wifi_password": Field(str, None, nullable=True),
        "ntp_host": Field(str, "pool.ntp.org", check=_host_name),
        "ntp_interval_s": Field(int, 21600, minimum=60, maximum=7 * 86400,
                                help="time between clock synchronisations after the first"),
        "watchdog_s": Field(int, 30, minimum=0, maximum=3600,
                            help="reset the board when the loops stall this long; 0: no watchdog"),
    }


def __getattr__(name):
    if name == "SCHEMA":
        return schema()
    raise AttributeError(name)


def _shown(value):
    """``value`` as JSON for an error message, cut short: a message must stay readable
    whatever the board file holds."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RuntimeError):  # RecursionError is a RuntimeError
        text = "<unprintable %s>" % type(value).__name__
    if len(text) > 100:
        text = text[:80] + "... (%d characters)" % len(text)
    return text


def _kind_name(kind):
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list"}[kind]


def _check_value(path, field, value):
    if value is None:
        if field.nullable:
            return None
        raise ConfigError("%s: null is not allowed; expected %s" % (path, _kind_name(field.kind)))
    kind = field.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError("%s: %s is not a finite number" % (path, _shown(value)))
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError("%s: %s is not %s" % (path, _shown(value), _kind_name(kind)))
    if not isinstance(value, kind):
        raise ConfigError("%s: %s is not %s" % (path, _shown(value), _kind_name(kind)))
    if kind is float and (value != value or value in (_INF, -_INF)):
        raise ConfigError("%s: %s is not a finite number" % (path, value))
    if field.choices is not None and value not in field.choices:
        raise ConfigError("%s: %s is not one of %s"
                          % (path, _shown(value), ", ".join(json.dumps(c) for c in field.choices)))
    if field.minimum is not None and value < field.minimum:
        raise ConfigError("%s: %s is below the minimum %s" % (path, _shown(value), field.minimum))
    if field.maximum is not None and value > field.maximum:
        raise ConfigError("%s: %s is above the maximum %s" % (path, _shown(value), field.maximum))
    if field.check is not None:
        problem = field.check(value)
        if problem:
            raise ConfigError("%s: %s %s" % (path, _shown(value), problem))
    return value


_INF = float("inf")


def _edit_distance(a, b):
    """Levenshtein distance between two short strings."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a):
        current = [i + 1]
        for j, cb in enumerate(b):
            current.append(min(previous[j + 1] + 1, current[j] + 1, previous[j] + (ca != cb)))
        previous = current
    return previous[-1]


def _common_prefix(a, b):
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def closest(name, known):
    """The known key most like ``name`` (a likely typo), or None if none is close."""
    best = None
    best_rank = None
    for key in known:
        distance = _edit_distance(name, key)
        if key.startswith(name) or name.startswith(key):
            distance = min(distance, abs(len(key) - len(name)))
        rank = (distance, -_common_prefix(name, key))
        if best_rank is None or rank < best_rank:
            best, best_rank = key, rank
    if best is None:
        return None
    if best_rank[0] <= max(2, len(name) // 3) or -best_rank[1] >= 3:
        return best
    return None


def _validate_section(path, schema, doc):
    if not isinstance(doc, dict):
        raise ConfigError("%s: expected an object, got %s" % (path or "board", _shown(doc)))
    for key in doc:
        if key not in schema:
            hint = closest(key, schema)
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


def validate(doc, port=None):
    """A complete board configuration (defaults filled) from a parsed board document; with
    ``port`` the port's own section too (``config[port]``)."""
    config = _validate_section("", schema(port), doc)
    _check_rules(config)
    mqtt = config["mqtt"]
    if mqtt["client_id"] is None:
        mqtt["client_id"] = "evse-agent-" + config["station_id"]
    homeassistant = config["homeassistant"]
    if homeassistant["node_id"] is None:
        homeassistant["node_id"] = ha_node_id(config["station_id"])
    return config


def _check_rules(config):
    """Rules between settings: each message names both settings and their values."""
    journal = config["journal"]
    if journal["reserve_bytes"] >= journal["max_bytes"]:
        raise ConfigError("journal.reserve_bytes: %d is not below journal.max_bytes %d"
                          % (journal["reserve_bytes"], journal["max_bytes"]))
    if journal["segment_bytes"] > journal["max_bytes"]:
        raise ConfigError("journal.segment_bytes: %d is above journal.max_bytes %d "
                          "(one segment file would be larger than the whole journal)"
                          % (journal["segment_bytes"], journal["max_bytes"]))
    events = config["events"]
    if events["voltage_min_v"] >= events["voltage_max_v"]:
        raise ConfigError("events.voltage_min_v: %s is not below events.voltage_max_v %s"
                          % (events["voltage_min_v"], events["voltage_max_v"]))
    if events["phase_loss_v"] >= events["voltage_min_v"]:
        raise ConfigError("events.phase_loss_v: %s is not below events.voltage_min_v %s "
                          "(a phase in the normal band would count as lost)"
                          % (events["phase_loss_v"], events["voltage_min_v"]))
    identification = config["identification"]
    if identification["enabled"] and identification["port"] is None and identification["uart_id"] is None:
        raise ConfigError("identification.port: needed when identification.enabled is true "
                          "(the reader's serial device; identification.uart_id on MicroPython)")
    tls = config["mqtt"]["tls"]
    if (tls["cert_file"] is None) != (tls["key_file"] is None):
        raise ConfigError("mqtt.tls: cert_file and key_file go together (client certificate "
                          "and its key); set both or neither")
    mqtt = config["mqtt"]
    if mqtt["reconnect_min_s"] > mqtt["reconnect_max_s"]:
        raise ConfigError("mqtt.reconnect_min_s: %s is above mqtt.reconnect_max_s %s"
                          % (mqtt["reconnect_min_s"], mqtt["reconnect_max_s"]))


def parse_board(text, source="board file", port=None, overrides=()):
    """A validated configuration from board-file text, with ``section.field=value``
    ``overrides`` applied; ConfigError names the source and what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise ConfigError("%s: not valid JSON (%s)" % (source, error))
    except RuntimeError:  # CPython's RecursionError, MicroPython's recursion limit
        raise ConfigError("%s: nested too deeply to be a board file" % source)
    try:
        if isinstance(doc, dict):  # else validate names what the file holds instead
            for assignment in overrides:
                apply_override(doc, assignment, port)
        return validate(doc, port)
    except ConfigError as error:
        raise ConfigError("%s: %s" % (source, error))


def load_board(path, port=None, overrides=()):
    """The validated configuration in the board file at ``path`` (the one board loader of
    both ports and the tools): ``port`` adds its section, ``overrides`` as ``parse_board``."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError("%s: cannot read board file (%s)" % (path, error))
    except ValueError as error:  # bytes that are not UTF-8
        raise ConfigError("%s: not valid JSON (%s)" % (path, error))
    return parse_board(text, path, port, overrides)


def field_at(path, port=None):
    """The schema Field for a dotted ``path``; ConfigError if there is none."""
    spec = schema(port)
    for part in path.split("."):
        if not isinstance(spec, dict) or part not in spec:
            raise ConfigError("%s: unknown setting" % path)
        spec = spec[part]
    if isinstance(spec, dict):
        raise ConfigError("%s: is a section, name one of its fields (%s)" % (path, ", ".join(spec)))
    return spec


def apply_override(doc, assignment, port=None):
    """Set ``section.field=value`` in a raw board document; the value is JSON or a plain string."""
    if "=" not in assignment:
        raise ConfigError("override %r is not of the form section.field=value" % assignment)
    path, text = assignment.split("=", 1)
    path = path.strip()
    field = field_at(path, port)
    try:
        value = json.loads(text)
    except (ValueError, RuntimeError):  # not JSON (or nested past the recursion limit)
        value = text
    if field.kind is str and not isinstance(value, str) and value is not None:
        value = text
    node = doc
    parts = path.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("%s: is %s in the board file, expected an object"
                              % (".".join(parts[:depth + 1]), _shown(child)))
        node = child
    node[parts[-1]] = value


def setting_paths(port=None):
    """(dotted path, Field) of every setting, in schema order."""
    out = []
    _collect(schema(port), "", out)
    return out


def _collect(fields, prefix, out):
    for key in fields:
        spec = fields[key]
        if isinstance(spec, dict):
            _collect(spec, prefix + key + ".", out)
        else:
            out.append((prefix + key, spec))


def is_live(path):
    """True when the running agent takes a change of setting ``path`` into use at once
    (marked ``live`` in the schema); False for a setting that needs a restart or none."""
    try:
        return field_at(path).live
    except ConfigError:
        return False


def live_settings():
    """The dotted paths of every setting marked ``live``, in schema order."""
    return [path for path, field in setting_paths() if field.live]
