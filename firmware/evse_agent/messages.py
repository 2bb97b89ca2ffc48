"""MQTT topics and message documents, and the outbox every message leaves through.

Two kinds of message leave the agent:

- *journaled* records (session records, events, telemetry aggregates) are stored in the
  journal first and carry ``seq``, the journal's sequence number: it grows by one per
  record with no gaps, so consumers drop QoS 1 redeliveries and notice losses. The
  forwarder publishes them in order (QoS 1) and replays them after an outage.
- *live* messages (1 s telemetry, the retained state and meter status) go out at once and
  carry ``journal_seq``, the last sequence number journaled when they were sent.
"""

import json


class Topics:
    """Topic names of one station: ``<prefix>/<station_id>/<channel>``."""

    __slots__ = ("base", "status", "telemetry", "aggregate", "meter", "event", "session", "state")

    def __init__(self, prefix, station_id):
        self.base = prefix + "/" + station_id
        self.status = self.base + "/status"  # retained "online" / "offline" (last will)
        self.telemetry = self.base + "/telemetry"  # live, QoS 0
        self.aggregate = self.base + "/aggregate"  # journaled interval aggregates
        self.meter = self.base + "/meter"  # retained meter link status
        self.event = self.base + "/event"
        self.session = self.base + "/session"
        self.state = self.base + "/state"


def _days_to_civil(days):
    """(year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm)."""
    days += 719468
    era = (days if days >= 0 else days - 146096) // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    year = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return (year + 1 if month <= 2 else year), month, day


def iso_utc(epoch_s):
    """ISO-8601 UTC time with milliseconds, e.g. ``2026-11-25T06:50:01.123Z``."""
    total_ms = int(round(epoch_s * 1000))
    seconds, ms = divmod(total_ms, 1000)
    days, rem = divmod(seconds, 86400)
    year, month, day = _days_to_civil(days)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        year, month, day, rem // 3600, rem // 60 % 60, rem % 60, ms)


def _rounded(values, digits):
    return [None if v is None else round(v, digits) for v in values]


def telemetry_doc(reading, session_energy_wh=None, stale=False, now=None):
    """The telemetry message body for one reading (``journal_seq`` is added by the outbox).

    ``session_energy_wh`` is the open session's energy so far (``SessionEngine.energy_so_far``),
    for live display; null without an open session. ``ts`` and ``sample_ts`` are the meter
    sample's time; ``stale`` is true when this poll cycle's read failed and the message repeats
    the last good sample, ``age_s`` how old the sample is at ``now`` (wall seconds)."""
    sample_ts = iso_utc(reading.time)
    return {
        "ts": sample_ts,
        "sample_ts": sample_ts,
        "stale": stale,
        "age_s": None if now is None else round(max(0.0, now - reading.time), 3),
        "voltage_v": _rounded(reading.voltage, 2),
        "current_a": _rounded(reading.current, 3),
        "power_w": _rounded(reading.power, 1),
        "power_total_w": None if reading.power_total is None else round(reading.power_total, 1),
        "frequency_hz": None if reading.frequency is None else round(reading.frequency, 3),
        "energy_wh": reading.energy_wh,
        "energy_resolution_mwh": reading.energy_resolution_mwh,
        "meter_serial": reading.serial,
        "session_energy_wh": session_energy_wh,
    }


def meter_status_doc(meter, clock):
    """The retained meter-link message: online state, last error and counters."""
    link = meter.link
    now_ms = clock.monotonic_ms()
    now = clock.time()
    doc = {
        "ts": iso_utc(now),
        "online": link.online,
        "model": meter.model.name,
        "unit_id": meter.unit_id,
        "serial": meter.serial,
        "since": iso_utc(now - (now_ms - link.since_ms) / 1000),
        "consecutive_failures": link.consecutive_failures,
        "last_error": link.last_error,
        "last_error_ts": None if link.last_error_ms is None
        else iso_utc(now - (now_ms - link.last_error_ms) / 1000),
        "cycles": link.cycles,
        "failed_cycles": link.failed_cycles,
        "value_faults": link.value_faults,
        "last_value_fault": link.last_value_fault,
        "modbus": meter.master.stats.as_dict(),
    }
    return doc


class Outbox:
    """The single path from the core to the broker: journaled records and live messages.

    ``record(type, doc)`` stores a record in the journal (durable types are on disk when
    it returns) and wakes the forwarder; ``post(topic, doc, ...)`` publishes a live
    message at once through ``publisher.publish(topic, payload, qos, retain)``.
    """

    def __init__(self, publisher, station_id, journal, forwarder=None):
        self.publisher = publisher
        self.station_id = station_id
        self.journal = journal
        self.forwarder = forwarder
        self.posted = 0

    def record(self, rtype, doc):
        """Journal ``doc`` as a record of ``rtype``; returns its seq (None if refused)."""
        doc["station"] = self.station_id

        def stamped(seq):
            doc["seq"] = seq
            return json.dumps(doc).encode()

        seq = self.journal.append(rtype, None, stamped)
        if self.forwarder is not None:
            self.forwarder.wake()
        return seq

    def post(self, topic, doc, qos=0, retain=False):
        """Publish a live message now, stamped with station and the journal's position."""
        doc["journal_seq"] = self.journal.next_seq - 1
        doc["station"] = self.station_id
        self.publisher.publish(topic, json.dumps(doc), qos, retain)
        self.posted += 1
