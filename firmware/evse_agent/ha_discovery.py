"""Home Assistant MQTT discovery: the station appears in Home Assistant with no configuration.

Home Assistant's MQTT integration reads retained config messages on
``<prefix>/<component>/<node_id>/<object_id>/config`` and makes one entity of each, grouped
into one device by ``device.identifiers``
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery). The entities read the
topics the agent publishes anyway, with ``value_template`` on their JSON; nothing is sent twice:

- ``<topic_prefix>/<station>/telemetry`` (live, every ``mqtt.telemetry_interval_s``): total
  power, import energy, voltage and current of each meter phase, frequency, and the open
  session's energy so far (``session_energy_wh``);
- ``.../state`` (retained, on every pilot or contactor change): pilot state, contactor, charging;
- ``.../meter`` (retained, on every link change and every ``mqtt.status_interval_s``): meter link.

Availability: every entity follows the agent's retained ``status`` (``online``; ``offline`` on
a clean stop and as the last will). The meter's values also follow the meter link (``online``
in the meter document) with ``availability_mode: all``, so a silent meter shows its values as
unavailable rather than frozen. A null in a document renders as ``None``, which Home Assistant
takes as "unknown" (``PAYLOAD_NONE`` in its sensor and binary_sensor platforms).

Energy goes out in kWh (``energy_wh / 1000``: exact, the register is integer Wh) as
``total_increasing``; the session energy restarts at 0 with each session, which
``total_increasing`` counts as a new cycle.

``Discovery`` keeps the configs on the broker: it publishes them (retained, QoS 1) after every
connect of the publisher and again when Home Assistant's birth message says ``online``, so they
come back after a broker lost its retained messages. The agent's poll loop calls ``poke`` every
cycle, which wakes ``run`` only when the configs are due (within a poll interval of a connect
or a birth message); unpoked, ``run`` looks every ``CHECK_INTERVAL_S``. The publisher offers ``publish``,
``connected``, ``connects`` (a count of connections made) and, where the port can subscribe,
``subscribe(topic, on_message)``.
"""

import json

from . import log
from .wakeup import Wakeup

ONLINE = "online"
OFFLINE = "offline"
PILOT_STATES = ("A", "B", "C", "D", "E", "F")  # IEC 61851-1
CHECK_INTERVAL_S = 5.0  # how often ``Discovery.run`` looks for a new connection unpoked

_KWH = "{{ none if value_json.%s is none else value_json.%s / 1000 }}"
_CONTACTOR = ("{% set closed = value_json.contactor_feedback if value_json.contactor_feedback is not none"
              " else value_json.contactor_command %}"
              "{{ 'None' if closed is none else ('ON' if closed else 'OFF') }}")
_METER_ONLINE = "{{ 'online' if value_json.online else 'offline' }}"


def _measurement(name, template, device_class, unit, precision):
    return {"name": name, "value_template": template, "device_class": device_class,
            "state_class": "measurement", "unit_of_measurement": unit,
            "suggested_display_precision": precision}


def entities(phases):
    """``(component, object_id, channel, fields)`` of each entity: ``channel`` is the agent's
    topic the entity reads (telemetry, state or meter), ``fields`` its own config keys."""
    found = [
        ("sensor", "power", "telemetry",
         _measurement("Power", "{{ value_json.power_total_w }}", "power", "W", 0)),
        ("sensor", "energy_import", "telemetry",
         {"name": "Import energy", "value_template": _KWH % ("energy_wh", "energy_wh"),
          "device_class": "energy", "state_class": "total_increasing",
          "unit_of_measurement": "kWh", "suggested_display_precision": 3}),
    ]
    for phase in range(phases):
        found.append(("sensor", "voltage_l%d" % (phase + 1), "telemetry",
                      _measurement("Voltage L%d" % (phase + 1), "{{ value_json.voltage_v[%d] }}" % phase,
                                   "voltage", "V", 1)))
    for phase in range(phases):
        found.append(("sensor", "current_l%d" % (phase + 1), "telemetry",
                      _measurement("Current L%d" % (phase + 1), "{{ value_json.current_a[%d] }}" % phase,
                                   "current", "A", 2)))
    found.extend([
        ("sensor", "frequency", "telemetry",
         _measurement("Frequency", "{{ value_json.frequency_hz }}", "frequency", "Hz", 2)),
        ("sensor", "session_energy", "telemetry",
         {"name": "Session energy", "value_template": _KWH % ("session_energy_wh", "session_energy_wh"),
          "device_class": "energy", "state_class": "total_increasing",
          "unit_of_measurement": "kWh", "suggested_display_precision": 3, "icon": "mdi:ev-station"}),
        ("sensor", "pilot", "state",
         {"name": "Pilot state", "value_template": "{{ value_json.pilot }}", "device_class": "enum",
          "options": list(PILOT_STATES), "icon": "mdi:ev-plug-type2"}),
        ("binary_sensor", "contactor", "state",
         {"name": "Contactor", "value_template": _CONTACTOR, "icon": "mdi:electric-switch"}),
        ("binary_sensor", "charging", "state",
         {"name": "Charging", "value_template": "{{ 'ON' if value_json.charging else 'OFF' }}",
          "device_class": "battery_charging"}),
        ("binary_sensor", "meter_link", "meter",
         {"name": "Meter link", "value_template": "{{ 'ON' if value_json.online else 'OFF' }}",
          "device_class": "connectivity", "entity_category": "diagnostic"}),
    ])
    return found


def discovery_messages(config, model, version):
    """Yield ``(topic, payload bytes)`` of every discovery config, one at a time (a small heap
    holds one payload, not all of them). ``model`` is the meter model (phases, vendor, product)."""
    ha = config["homeassistant"]
    station = config["station_id"]
    base = config["mqtt"]["topic_prefix"] + "/" + station
    status = {"topic": base + "/status", "payload_available": ONLINE, "payload_not_available": OFFLINE}
    meter_link = {"topic": base + "/meter", "value_template": _METER_ONLINE,
                  "payload_available": ONLINE, "payload_not_available": OFFLINE}
    device = {
        "identifiers": ["evse-agent-" + station],
        "name": ha["device_name"] or station,
        "manufacturer": "evse-agent",
        "model": model.vendor + " " + model.product,
        "sw_version": version,
    }
    origin = {"name": "evse-agent", "sw_version": version}
    node_id = ha["node_id"]
    for component, object_id, channel, fields in entities(model.phases):
        doc = {
            "unique_id": "evse-agent-%s-%s" % (station, object_id),
            "state_topic": base + "/" + channel,
            "device": device,
            "origin": origin,
        }
        if channel == "telemetry":
            doc["availability"] = [status, meter_link]
            doc["availability_mode"] = "all"
        else:
            doc["availability"] = [status]
        for key in fields:
            doc[key] = fields[key]
        topic = "%s/%s/%s/%s/config" % (ha["prefix"], component, node_id, object_id)
        yield topic, json.dumps(doc).encode()


class Discovery:
    """Keeps the station's discovery configs on the broker: publishes them (retained, QoS 1)
    after every connect of ``publisher`` and when Home Assistant's birth message says it
    started. One task (``run``)."""

    def __init__(self, config, model, publisher, version):
        self.config = config
        self.model = model
        self.publisher = publisher
        self.version = version
        self.announced_for = 0  # publisher.connects when the configs last went out whole
        self.announcements = 0
        self._requested = False
        self._wakeup = Wakeup()
        birth_topic = config["homeassistant"]["birth_topic"]
        if birth_topic is not None and hasattr(publisher, "subscribe"):
            publisher.subscribe(birth_topic, self.on_birth)

    def on_birth(self, payload):
        """A message on Home Assistant's birth topic: ``online`` asks for the configs again.
        Called from the MQTT client's own thread on CPython: it only sets a flag."""
        if payload == b"online" or payload == "online":
            self._requested = True

    def messages(self):
        return discovery_messages(self.config, self.model, self.version)

    def due(self):
        """True when connected and the configs have not gone out on this connection, or Home
        Assistant asked for them."""
        publisher = self.publisher
        return publisher.connected and (publisher.connects != self.announced_for or self._requested)

    def poke(self):
        """Wake ``run`` if the configs are due (cheap: called every poll cycle)."""
        if self.due():
            self._wakeup.set()

    def announce(self):
        """Publish every config now; True when the publisher took them all."""
        connects = self.publisher.connects
        self._requested = False
        count = 0
        for topic, payload in self.messages():
            if self.publisher.publish(topic, payload, 1, True) is None:
                return False  # not connected: the next connection brings them
            count += 1
        self.announced_for = connects
        self.announcements += 1
        log.info("Home Assistant discovery: %d configs published under %s/+/%s"
                 % (count, self.config["homeassistant"]["prefix"], self.config["homeassistant"]["node_id"]))
        return True

    async def run(self):
        while True:
            self._wakeup.clear()
            if self.due():
                self.announce()
            await self._wakeup.wait(CHECK_INTERVAL_S * 1000)
