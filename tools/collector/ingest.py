"""From MQTT messages to rows: check each message, store every journaled record once,
keep the stations' sequence gaps current, verify session records' OCMF documents.

A batch of messages is stored in one transaction, committed before any of them is
acknowledged to the broker: a crash leaves each message either stored or still owed by
the broker. Inside the batch each record has its own savepoint, so a record the database
refuses is counted as malformed without taking the others with it.

The database decides what is a duplicate (``records`` has ``(station, seq)`` as primary
key and every insert is ``ON CONFLICT DO NOTHING``), so redeliveries, replays and several
collectors writing to one database store each record once. Gaps use
``evse_tools.collector.consumer.SequenceTracker`` as a cache of what the database holds: seeded
from the database the first time a station is seen (everything below the station's first
stored gap counts as seen; the records above it are read), updated with each stored record, and
re-read from the database over its holes and above its highest seq before the
``gaps`` rows are rewritten — so records another collector stored close gaps here too.

Records are trusted only as far as they are plausible: a station id must be a well-formed
topic level (``STATION_ID_CHARS``, at most 64 characters, as the agent's board check
allows), and a seq more than ``MAX_SEQ_AHEAD`` above the station's highest stored seq (or
above ``MAX_FIRST_SEQ`` for a station not seen before) is rejected as malformed — a forged
2^62 is neither stored nor left as a gap of 4.6e18 in the gap tracking.
"""

import json
import logging
import time

from evse_agent.messages import iso_utc
from evse_tools.collector.consumer import SequenceTracker

from .store import chunked
from .verify import verify_session

log = logging.getLogger("evse.collector")

JOURNALED_CHANNELS = ("session", "event", "aggregate")
LIVE_CHANNELS = ("telemetry", "meter", "state")
STATUS_CHANNEL = "status"
STATUS_VALUES = ("online", "offline")
# The channels the collector subscribes to: the records it stores, and what keeps a
# station's row current (status; state and meter carry journal_seq, meter at least every
# status_interval_s). Telemetry, the live values of every poll and about 70 % of a
# station's messages, carries nothing the collector keeps.
SUBSCRIBED_CHANNELS = JOURNALED_CHANNELS + (STATUS_CHANNEL, "state", "meter")
SESSION_EVENTS = ("start", "begin", "end")
MAX_SEQ = (1 << 63) - 1
# A station journals a few records a minute; ten million ahead of what is stored is years of
# records the collector never saw — a forgery, not a backlog.
MAX_SEQ_AHEAD = 10000000
MAX_FIRST_SEQ = 1 << 40
STATION_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
LOGGED_PAYLOAD_CHARS = 120

SESSION_COLUMNS = ("plug_in", "unplug", "begin_wh", "end_wh", "energy_wh", "plugged_s",
                   "charging_s", "idle_s", "max_power_w", "avg_power_w", "segments", "flags",
                   "ocmf_begin", "ocmf_end", "ocmf_documents", "verified", "verify_error")


class Malformed(ValueError):
    """A message that cannot be stored; the text says what is wrong with it."""


class Message:
    """One delivered message: topic, payload bytes, QoS, receive time (ISO UTC), and the
    broker's packet id (``mid``) the collector acknowledges once it is stored."""

    __slots__ = ("topic", "payload", "qos", "received_at", "mid")

    def __init__(self, topic, payload, qos=1, received_at=None, mid=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.received_at = received_at or iso_utc(time.time())
        self.mid = mid


class Record:
    """A journaled record that passed the checks, with the row for its type's table."""

    __slots__ = ("station", "seq", "type", "ts", "body", "row", "received_at", "payload")

    def __init__(self, station, seq, rtype, ts, body, row, received_at, payload):
        self.station = station
        self.seq = seq
        self.type = rtype
        self.ts = ts
        self.body = body
        self.row = row
        self.received_at = received_at
        self.payload = payload


class BatchResult:
    """What one batch did: counts by outcome."""

    __slots__ = ("received", "stored", "duplicates", "malformed", "live", "ignored")

    def __init__(self):
        self.received = self.stored = self.duplicates = self.malformed = self.live = self.ignored = 0

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


# -- field checks --------------------------------------------------------------------------


def _field(body, key, kind, required=False):
    value = body.get(key)
    if value is None:
        if required:
            raise Malformed("field %r is missing" % key)
        return None
    if kind == "text":
        ok = isinstance(value, str)
    elif kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SEQ
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
    elif kind == "list":
        ok = isinstance(value, list)
    elif kind == "object":
        ok = isinstance(value, dict)
    else:
        raise ValueError("unknown field kind %r" % kind)
    if not ok:
        raise Malformed("field %r is %s, expected %s" % (key, _brief(value), kind))
    return value


def _brief(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stat(body, key, part):
    """``body[key][part]`` of a min/avg/max statistic, or None."""
    stat = _field(body, key, "object")
    return None if stat is None else _field(stat, part, "number")


def _texts(body, key):
    values = _field(body, key, "list") or []
    if not all(isinstance(value, str) for value in values):
        raise Malformed("field %r must be a list of strings" % key)
    return values


def _register(body, which):
    reading = _field(body, which, "object")
    return None if reading is None else _field(reading, "energy_wh", "integer")


def session_row(body):
    """The ``sessions`` values of a session record (verification added later)."""
    if body.get("event") not in SESSION_EVENTS:
        raise Malformed("field 'event' is %s, expected one of %s" % (_brief(body.get("event")),
                                                                      ", ".join(SESSION_EVENTS)))
    if not _field(body, "session_id", "text", required=True):
        raise Malformed("field 'session_id' is empty")
    documents = _texts(body, "ocmf_documents")
    return {
        "session_id": body["session_id"],
        "event": body["event"],
        "plug_in": _field(body, "plug_in", "text"),
        "unplug": _field(body, "unplug", "text"),
        "begin_wh": _register(body, "begin"),
        "end_wh": _register(body, "end"),
        "energy_wh": _field(body, "energy_wh", "integer"),
        "plugged_s": _field(body, "plugged_s", "number"),
        "charging_s": _field(body, "charging_s", "number"),
        "idle_s": _field(body, "idle_s", "number"),
        "max_power_w": _field(body, "max_power_w", "number"),
        "avg_power_w": _field(body, "avg_power_w", "number"),
        "segments": _field(body, "segments", "integer"),
        "flags": json.dumps(_texts(body, "flags")),
        "ocmf_begin": _field(body, "ocmf_begin", "text"),
        "ocmf_end": _field(body, "ocmf_end", "text"),
        "ocmf_documents": json.dumps(documents),
    }


def event_row(body):
    """The ``events`` values of an event record."""
    return {
        "event_number": _field(body, "event_number", "integer"),
        "type": _field(body, "type", "text", required=True),
        "severity": _field(body, "severity", "text"),
        "state": _field(body, "state", "text"),
        "start": _field(body, "start", "text"),
        "end": _field(body, "end", "text"),
        "session_id": _field(body, "session_id", "text"),
        "values_json": json.dumps(body.get("values")),
    }


def aggregate_row(body):
    """The ``aggregates`` values of an aggregate or summary record."""
    kind = body.get("kind")
    if kind not in ("aggregate", "summary"):
        raise Malformed("field 'kind' is %s, expected aggregate or summary" % _brief(kind))
    covers = None
    if kind == "summary":
        runs = _field(body, "covers_seq", "list", required=True)
        for run in runs:
            if (not isinstance(run, list) or len(run) != 2
                    or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_SEQ for n in run)
                    or run[0] > run[1]):
                raise Malformed("field 'covers_seq' holds %s, expected [first, last] seq runs" % _brief(run))
        covers = json.dumps(runs)
    return {
        "kind": kind,
        "start": _field(body, "start", "text", required=True),
        "end": _field(body, "end", "text", required=True),
        "samples": _field(body, "samples", "integer"),
        "aggregates": _field(body, "aggregates", "integer"),
        "energy_wh_start": _field(body, "energy_wh_first", "integer"),
        "energy_wh_end": _field(body, "energy_wh_last", "integer"),
        "power_min_w": _stat(body, "power_total_w", "min"),
        "power_avg_w": _stat(body, "power_total_w", "avg"),
        "power_max_w": _stat(body, "power_total_w", "max"),
        "frequency_avg_hz": _stat(body, "frequency_hz", "avg"),
        "covers_seq": covers,
    }


def _json_body(message):
    try:
        body = json.loads(message.payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise Malformed("payload is not JSON (%s)" % error) from None
    except RecursionError:
        raise Malformed("payload is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise Malformed("payload is JSON %s, not an object" % type(body).__name__)
    return body


def station_id_problem(station):
    """Why ``station`` is not a well-formed station id, or None."""
    if len(station) > 64:
        return "is longer than 64 characters"
    bad = sorted(set(station) - STATION_ID_CHARS)
    if bad:
        return "contains %r; station ids use letters, digits, '-', '_' and '.'" % bad[0]
    return None


def topic_parts(prefix, topic):
    """(station, channel) of ``<prefix>/<station>/<channel>``; None for other topics."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != prefix or not parts[1]:
        return None
    return parts[1], parts[2]


def parse_record(station, channel, message):
    """The Record of a journaled message; Malformed says why it cannot be stored."""
    body = _json_body(message)
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq <= MAX_SEQ:
        raise Malformed("field 'seq' is %s, expected a positive integer" % _brief(seq))
    if body.get("station") != station:
        raise Malformed("field 'station' is %s but the topic names station %s"
                        % (_brief(body.get("station")), station))
    if channel == "session":
        row = session_row(body)
        rtype, ts = "session", _field(body, "ts", "text")
    elif channel == "event":
        row = event_row(body)
        rtype, ts = "event", row["end"] or row["start"]
    else:
        row = aggregate_row(body)
        rtype, ts = row["kind"], row["end"]
    try:
        payload = message.payload.decode("utf-8")
    except UnicodeDecodeError as error:  # json.loads accepts UTF-16/32 too
        raise Malformed("payload is not UTF-8 (%s)" % error) from None
    return Record(station, seq, rtype, ts, body, row, message.received_at, payload)


# -- storing -------------------------------------------------------------------------------

# Rows per multi-row statement: below SQLite's 32766 and PostgreSQL's 65535 parameters.
BULK_ROWS = 1024

# The heads of the rows' inserts (Store.insert_rows adds the values; a duplicate key is no error).
EVENT_INSERT = ('INSERT INTO events (station, seq, event_number, type, severity, state, start, "end", '
                "session_id, values_json)")
AGGREGATE_INSERT = ('INSERT INTO aggregates (station, seq, kind, start, "end", samples, aggregates, '
                    "energy_wh_start, energy_wh_end, power_min_w, power_avg_w, power_max_w, "
                    "frequency_avg_hz, covers_seq)")
SKIP_DUPLICATE = "ON CONFLICT (station, seq) DO NOTHING"


def _event_values(record):
    row = record.row
    return (record.station, record.seq, row["event_number"], row["type"], row["severity"], row["state"],
            row["start"], row["end"], row["session_id"], row["values_json"])


def _aggregate_values(record):
    row = record.row
    return (record.station, record.seq, row["kind"], row["start"], row["end"], row["samples"],
            row["aggregates"], row["energy_wh_start"], row["energy_wh_end"], row["power_min_w"],
            row["power_avg_w"], row["power_max_w"], row["frequency_avg_hz"], row["covers_seq"])


class StationUpdate:
    """What a batch says about one station's row."""

    __slots__ = ("last_seen", "status", "journal_seq", "malformed")

    def __init__(self):
        self.last_seen = None
        self.status = None
        self.journal_seq = None
        self.malformed = 0


class Ingestor:
    """Stores batches of messages in ``store``; one per collector thread."""

    def __init__(self, store, prefix="evse"):
        self.store = store
        self.prefix = prefix
        self.tracker = SequenceTracker()

    # -- one batch ------------------------------------------------------------------------

    def store_batch(self, messages):
        """Store ``messages`` in one transaction; returns a BatchResult. Raises only for
        database failures (the batch is then not stored at all and may be retried)."""
        result = BatchResult()
        stations, records = self._parse_batch(messages, result)
        touched = set()
        record_stations = sorted({record.station for record in records})
        live_only = {}
        postgresql = self.store.dialect == "postgresql"
        if postgresql:
            # Only the stations with records are locked in the batch's transaction: the
            # collectors of a share group all see every station's live messages, and would
            # otherwise wait for each other's whole batch. The rest is a short transaction after.
            with_records = set(record_stations)
            live_only = {name: update for name, update in stations.items() if name not in with_records}
            stations = {name: update for name, update in stations.items() if name not in live_only}
        try:
            with self.store.transaction():
                # The records go in before any station row is locked: ON CONFLICT on the
                # records' key is all exactly-once needs, and a share group's collectors (each
                # holding records of most stations) insert side by side instead of in turns.
                # The plausibility bound reads the committed highest seq, never above the current one.
                committed = self._highest(record_stations)
                accepted = self._plausible(records, dict(committed), stations, result)
                # In key order: two collectors given the same records (a redelivery) wait for
                # each other's keys one way only, never in a cycle.
                accepted.sort(key=lambda record: (record.station, record.seq))
                stored = self._store_records(accepted, stations, result)
                # From here to commit the station rows are locked (in name order: no
                # deadlocks). Whoever commits a station's records holds its row, so the last to
                # lock it sees every committed record: sessions, gaps and seeds read current state.
                self._update_stations(stations)
                new = [station for station in record_stations if station not in self.tracker.stations]
                touched.update(new)
                self._seed(new, committed)
                stored = self._merge_sessions(stored, stations, result)
                by_station = {}
                for record in stored:
                    touched.add(record.station)
                    by_station.setdefault(record.station, []).append(record)
                self._add_malformed(stations)
                self._update_gaps(sorted(touched), by_station)
                if not postgresql:
                    self._count(result)
        except BaseException:
            for station in touched:  # the cache may hold what was rolled back
                self.tracker.stations.pop(station, None)
            raise
        if postgresql:
            # Counters after the records' commit: every batch of every collector adds to the
            # same few rows, which would otherwise serialise the group's commits. Nothing here
            # is a record, so the commit does not wait for the WAL flush (synchronous_commit
            # off) and releases the shared rows at once: a database crash may lose the last
            # counts and last_seen times, never a record.
            with self.store.transaction():
                self.store.execute("SET LOCAL synchronous_commit = off")
                self._update_stations(live_only)
                self._add_malformed(live_only)
                self._count(result)
        return result

    def _parse_batch(self, messages, result):
        """({station: StationUpdate}, [records]) of ``messages``; malformed ones are rejected
        and counted in ``result`` as they are met."""
        stations = {}
        records = []
        for message in messages:
            result.received += 1
            parts = topic_parts(self.prefix, message.topic)
            if parts is None:
                result.ignored += 1
                continue
            station, channel = parts
            problem = station_id_problem(station)
            if problem is not None:
                # No station row for it: a malformed id is not a station.
                self._reject(message, Malformed("station id %s %s" % (_brief(station), problem)), None, result)
                continue
            update = stations.get(station)
            if update is None:
                update = stations[station] = StationUpdate()
            if update.last_seen is None or message.received_at > update.last_seen:
                update.last_seen = message.received_at
            try:
                if channel in JOURNALED_CHANNELS:
                    records.append(parse_record(station, channel, message))
                elif channel == STATUS_CHANNEL:
                    update.status = self._status(message)
                    result.live += 1
                elif channel in LIVE_CHANNELS:
                    journal_seq = _json_body(message).get("journal_seq")
                    if isinstance(journal_seq, int) and not isinstance(journal_seq, bool) \
                            and 0 <= journal_seq <= MAX_SEQ:
                        update.journal_seq = journal_seq
                    result.live += 1
                else:
                    result.ignored += 1
            except Malformed as error:
                self._reject(message, error, update, result)
        return stations, records

    def _plausible(self, records, highest, stations, result):
        """The records of the batch to store, each once: a seq implausibly far above the
        station's highest (``highest``, updated here) is skipped and counted malformed."""
        accepted = []
        keys = set()
        for record in records:
            station = record.station
            known = highest[station]
            limit = MAX_FIRST_SEQ if known is None else known + MAX_SEQ_AHEAD
            if record.seq > limit:
                result.malformed += 1
                stations[station].malformed += 1
                log.warning("station %s: record seq %d skipped: implausibly far ahead of the highest"
                            " stored seq (%s)", station, record.seq, known)
                continue
            if (station, record.seq) in keys:
                result.duplicates += 1  # a redelivery within the batch
                continue
            keys.add((station, record.seq))
            accepted.append(record)
            if known is None or record.seq > known:
                highest[station] = record.seq
        return accepted

    def _merge_sessions(self, stored, stations, result):
        """Fold the stored session records into ``sessions`` (the station rows are locked);
        returns ``stored`` without the records whose session row the database refused,
        which are taken out of ``records`` again and counted malformed."""
        sessions = [record for record in stored if record.type == "session"]
        if not sessions:
            return stored
        try:
            with self.store.savepoint("sessions"):
                self._merge_all(sessions, self._sessions_of(sessions))
            return stored
        except self.store.data_errors as error:
            log.warning("the sessions of a batch were refused (%s); merging them one at a time", error)
        refused = set()
        for record in sessions:
            try:
                with self.store.savepoint():
                    self._merge_session(record)
            except self.store.data_errors as error:
                log.warning("station %s seq %d: the database refused the session record (%s); skipped",
                            record.station, record.seq, error)
                self.store.execute("DELETE FROM records WHERE station = ? AND seq = ?", (record.station, record.seq))
                refused.add((record.station, record.seq))
                stations[record.station].malformed += 1
                result.stored -= 1
                result.malformed += 1
        return [record for record in stored if (record.station, record.seq) not in refused]

    def _in_chunks(self, stations):
        for chunk in chunked(stations, BULK_ROWS):
            yield chunk, "(%s)" % ", ".join("?" * len(chunk))

    def _highest(self, stations):
        """{station: highest stored seq or None} in one query per BULK_ROWS stations."""
        highest = dict.fromkeys(stations)
        for chunk, marks in self._in_chunks(stations):
            for station, seq in self.store.query(
                    "SELECT station, MAX(seq) FROM records WHERE station IN %s GROUP BY station" % marks, chunk):
                highest[station] = seq
        return highest

    def _gaps_of(self, stations):
        """{station: [(first, last, detected_at)]} of the ``gaps`` rows of ``stations``."""
        gaps = {}
        for chunk, marks in self._in_chunks(stations):
            for station, first, last, detected in self.store.query(
                    "SELECT station, first_seq, last_seq, detected_at FROM gaps WHERE station IN %s" % marks, chunk):
                gaps.setdefault(station, []).append((first, last, detected))
        return gaps

    def _store_records(self, records, stations, result):
        """Store ``records`` (no two with one key); returns those that were new. All at once
        (multi-row inserts, one round trip per BULK_ROWS records); if the database refuses
        a value, one at a time so that only the refused records are skipped."""
        if not records:
            return []
        try:
            with self.store.savepoint("bulk"):
                stored = self._insert_all(records)
        except self.store.data_errors as error:
            log.warning("a batch of %d records was refused (%s); storing them one at a time", len(records), error)
        else:
            result.stored += len(stored)
            result.duplicates += len(records) - len(stored)
            return stored
        stored = []
        for record in records:
            outcome = self._store_record(record)
            if outcome is None:
                stations[record.station].malformed += 1
                result.malformed += 1
            elif outcome:
                stored.append(record)
                result.stored += 1
            else:
                result.duplicates += 1
        return stored

    def _insert_all(self, records):
        store = self.store
        new = set(store.insert_rows(
            "INSERT INTO records (station, seq, type, ts, received_at, payload)",
            [(record.station, record.seq, record.type, record.ts, record.received_at, record.payload)
             for record in records],
            SKIP_DUPLICATE + " RETURNING station, seq"))
        stored = [record for record in records if (record.station, record.seq) in new]
        events = [_event_values(record) for record in stored if record.type == "event"]
        store.insert_rows(EVENT_INSERT, events, SKIP_DUPLICATE)
        aggregates = [_aggregate_values(record) for record in stored if record.type in ("aggregate", "summary")]
        store.insert_rows(AGGREGATE_INSERT, aggregates, SKIP_DUPLICATE)
        return stored

    def _sessions_of(self, records):
        """What ``_merge_session`` reads, for all session ``records`` at once: {(station,
        session_id): seq_last} of the rows present, and {station: public key} under "keys"."""
        stations = sorted({record.station for record in records})
        wanted = sorted({(record.station, record.row["session_id"]) for record in records})
        known = {"keys": dict.fromkeys(stations)}
        for pairs in chunked(wanted, BULK_ROWS):
            for station, session_id, seq_last in self.store.query(
                    "WITH wanted (station, session_id) AS (VALUES %s) SELECT s.station, s.session_id, s.seq_last "
                    "FROM sessions s JOIN wanted w ON s.station = w.station AND s.session_id = w.session_id"
                    % ", ".join(["(?, ?)"] * len(pairs)), [value for pair in pairs for value in pair]):
                known[(station, session_id)] = seq_last
        for chunk, marks in self._in_chunks(stations):
            for station, key in self.store.query(
                    "SELECT station, public_key_pem FROM stations WHERE station IN %s" % marks, chunk):
                known["keys"][station] = key
        return known

    def _status(self, message):
        try:
            text = message.payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text not in STATUS_VALUES:
            raise Malformed("status is %s, expected online or offline" % _brief(
                message.payload.decode("utf-8", "replace")))
        return text

    def _reject(self, message, error, update, result):
        result.malformed += 1
        if update is not None:
            update.malformed += 1
        log.warning("malformed message on %s skipped: %s (payload %s)", message.topic, error,
                    message.payload[:LOGGED_PAYLOAD_CHARS])

    def _update_stations(self, stations):
        # Row locks in name order: concurrent collectors on PostgreSQL serialise per station
        # without deadlocks, and what one reads (gaps, sessions) is current until commit.
        # PostgreSQL takes a multi-row statement's rows in the order of its VALUES.
        self.store.insert_rows(
                "INSERT INTO stations (station, first_seen, last_seen, status, journal_seq)",
                [(station, update.last_seen, update.last_seen, update.status, update.journal_seq)
                 for station, update in sorted(stations.items())],
                "ON CONFLICT (station) DO UPDATE SET "
                "last_seen = CASE WHEN stations.last_seen IS NULL OR excluded.last_seen > stations.last_seen "
                "THEN excluded.last_seen ELSE stations.last_seen END, "
                "status = COALESCE(excluded.status, stations.status), "
                "journal_seq = COALESCE(excluded.journal_seq, stations.journal_seq)")

    def _add_malformed(self, stations):
        for station in sorted(stations):
            if stations[station].malformed:
                self.store.execute("UPDATE stations SET malformed = malformed + ? WHERE station = ?",
                                   (stations[station].malformed, station))

    def _store_record(self, record):
        """True when stored, False for a duplicate, None when the database refused it."""
        store = self.store
        try:
            with store.savepoint():
                cursor = store.execute(
                    "INSERT INTO records (station, seq, type, ts, received_at, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?) " + SKIP_DUPLICATE,
                    (record.station, record.seq, record.type, record.ts, record.received_at,
                     record.payload))
                if cursor.rowcount != 1:
                    return False
                if record.type == "event":
                    store.insert_rows(EVENT_INSERT, [_event_values(record)], SKIP_DUPLICATE)
                elif record.type != "session":  # sessions are merged once the station is locked
                    store.insert_rows(AGGREGATE_INSERT, [_aggregate_values(record)], SKIP_DUPLICATE)
        except store.data_errors as error:
            log.warning("station %s seq %d: the database refused the record (%s); skipped",
                        record.station, record.seq, error)
            return None
        return True

    # -- sessions ---------------------------------------------------------------------------

    def _merge_all(self, records, known):
        """Fold a batch's session records into their rows, as ``_merge_session`` would one by
        one, in multi-row upserts: per session, the batch's record with the highest seq gives
        the values when it is newer than the row's (and only it is verified); start and end
        records give their seqs. ``known``: what ``_sessions_of`` read."""
        folded = {}
        for record in sorted(records, key=lambda r: r.seq):
            entry = folded.setdefault((record.station, record.row["session_id"]), [None, None, None])
            if record.row["event"] == "start":
                entry[0] = record.seq
            elif record.row["event"] == "end":
                entry[1] = record.seq
            entry[2] = record
        rows = []
        for (station, session_id), (seq_start, seq_end, record) in sorted(folded.items()):
            values = dict(record.row, verified=None, verify_error=None)
            seq_last = known.get((station, session_id))
            if seq_last is None or record.seq > seq_last:
                values["verified"], values["verify_error"] = verify_session(record.body, station,
                                                                            known["keys"][station])
                if values["verify_error"]:
                    log.warning("session %s of station %s not verified: %s", session_id, station,
                                values["verify_error"])
                known[(station, session_id)] = record.seq
            rows.append((station, session_id, seq_start, seq_end, record.seq)
                        + tuple(values[c] for c in SESSION_COLUMNS))
        newer = "excluded.seq_last > sessions.seq_last"
        kept = ["%s = CASE WHEN %s THEN excluded.%s ELSE sessions.%s END" % (c, newer, c, c)
                for c in ("seq_last",) + SESSION_COLUMNS if c != "plug_in"]
        self.store.insert_rows(
            "INSERT INTO sessions (station, session_id, seq_start, seq_end, seq_last, %s)" % ", ".join(SESSION_COLUMNS),
            rows, "ON CONFLICT (station, session_id) DO UPDATE SET "
            "seq_start = COALESCE(excluded.seq_start, sessions.seq_start), "
            "seq_end = COALESCE(excluded.seq_end, sessions.seq_end), "
            "plug_in = CASE WHEN %s THEN excluded.plug_in ELSE COALESCE(sessions.plug_in, excluded.plug_in) END, "
            "%s" % (newer, ", ".join(kept)))

    def _merge_session(self, record):
        """Fold one start/begin/end record into its session's row (the one-by-one fallback
        of ``_merge_all``, which it agrees with): the record with the highest seq gives the
        values, the start and end records are named by their seqs."""
        store = self.store
        row = record.row
        existing = store.query("SELECT seq_last FROM sessions WHERE station = ? AND session_id = ?",
                               (record.station, row["session_id"]))
        seq_start = record.seq if row["event"] == "start" else None
        seq_end = record.seq if row["event"] == "end" else None
        if existing and existing[0][0] > record.seq:
            store.execute("UPDATE sessions SET seq_start = COALESCE(?, seq_start), "
                          "seq_end = COALESCE(?, seq_end), plug_in = COALESCE(plug_in, ?) "
                          "WHERE station = ? AND session_id = ?",
                          (seq_start, seq_end, row["plug_in"], record.station, row["session_id"]))
            return
        key = store.scalar("SELECT public_key_pem FROM stations WHERE station = ?", (record.station,))
        values = dict(row)
        values["verified"], values["verify_error"] = verify_session(record.body, record.station, key)
        if values["verify_error"]:
            log.warning("session %s of station %s not verified: %s", row["session_id"], record.station,
                        values["verify_error"])
        if not existing:
            columns = ("station", "session_id", "seq_start", "seq_end", "seq_last") + SESSION_COLUMNS
            store.execute(
                "INSERT INTO sessions (%s) VALUES (%s)" % (", ".join(columns), ", ".join("?" * len(columns))),
                (record.station, row["session_id"], seq_start, seq_end, record.seq)
                + tuple(values[c] for c in SESSION_COLUMNS))
            return
        store.execute(
            "UPDATE sessions SET seq_start = COALESCE(?, seq_start), seq_end = COALESCE(?, seq_end), "
            "seq_last = ?, %s WHERE station = ? AND session_id = ?"
            % ", ".join("%s = ?" % c for c in SESSION_COLUMNS),
            (seq_start, seq_end, record.seq) + tuple(values[c] for c in SESSION_COLUMNS)
            + (record.station, row["session_id"]))

    def reverify(self, station):
        """Verify the sessions of ``station`` again (after its key was registered or
        changed); returns how many sessions changed their verdict."""
        store = self.store
        changed = 0
        with store.transaction():
            key = store.scalar("SELECT public_key_pem FROM stations WHERE station = ?", (station,))
            rows = store.query(
                "SELECT s.session_id, s.verified, s.verify_error, r.payload FROM sessions s "
                "JOIN records r ON r.station = s.station AND r.seq = s.seq_last WHERE s.station = ?",
                (station,))
            for session_id, verified, error, payload in rows:
                verdict = verify_session(json.loads(payload), station, key)
                if verdict != (verified, error):
                    store.execute("UPDATE sessions SET verified = ?, verify_error = ? "
                                  "WHERE station = ? AND session_id = ?", verdict + (station, session_id))
                    changed += 1
        return changed

    # -- gaps -------------------------------------------------------------------------------

    def _load(self, ranges):
        """Feed the tracker what the database holds in ``ranges`` [(station, first, last)]:
        one query per ``BULK_ROWS`` ranges for the summaries, one for the records."""
        store = self.store
        summaries, seqs = [], []
        for chunk in chunked(ranges, BULK_ROWS):
            wanted = "WITH wanted (station, first_seq, last_seq) AS (VALUES %s) " % ", ".join(
                ["(?, ?, ?)"] * len(chunk))
            params = [value for wanted_range in chunk for value in wanted_range]
            summaries.extend(store.query(
                wanted + "SELECT a.station, a.seq, a.covers_seq FROM aggregates a JOIN wanted w "
                "ON a.station = w.station AND a.seq BETWEEN w.first_seq AND w.last_seq "
                "WHERE a.kind = 'summary' ORDER BY a.station, a.seq", params))
            seqs.extend(store.query(
                wanted + "SELECT r.station, r.seq FROM records r JOIN wanted w "
                "ON r.station = w.station AND r.seq BETWEEN w.first_seq AND w.last_seq", params))
        for station, seq, covers in summaries:
            self.tracker.accept(station, seq, {"kind": "summary", "covers_seq": json.loads(covers)})
        for station, seq in seqs:
            self.tracker.accept(station, seq)

    def _seed(self, stations, committed):
        """Start tracking ``stations`` (new to this collector) from the database: every seq
        below a station's first stored gap is accounted for (the ``gaps`` rows are committed
        with the records, under the station's row lock); without a gap, every seq up to its
        highest ``committed`` before this batch stored anything. The rest is read."""
        first_gaps = {}
        for chunk, marks in self._in_chunks(stations):
            first_gaps.update(self.store.query(
                "SELECT station, MIN(first_seq) FROM gaps WHERE station IN %s GROUP BY station" % marks, chunk))
        unknown = []
        for station in stations:
            first_gap = first_gaps.get(station)
            accounted = first_gap - 1 if first_gap is not None else committed.get(station) or 0
            self.tracker.assume_seen(station, accounted)
            unknown.append((station, accounted + 1, MAX_SEQ))
        self._load(unknown)

    def _update_gaps(self, stations, stored):
        """Bring the ``gaps`` rows of ``stations`` (sorted) up to date with the records this
        batch ``stored`` ({station: [Record]}) and what the database holds: the tracker's holes
        and anything above its highest seq are read in one go (in a share group most holes
        are records another collector stored), then the rows that changed are rewritten."""
        tracker = self.tracker
        highest_stored = self._highest(stations)
        unknown = []
        for station in stations:
            for record in sorted(stored.get(station, []), key=lambda r: r.seq):
                tracker.accept(station, record.seq, record.body if record.type == "summary" else None)
            unknown.extend((station, first, last) for first, last in tracker.gaps(station))
            highest = highest_stored.get(station) or 0
            if highest > tracker.highest(station):
                unknown.append((station, tracker.highest(station) + 1, highest))
        self._load(unknown)
        old = self._gaps_of(stations)
        changed = {station: tracker.gaps(station) for station in stations
                   if sorted((first, last) for first, last, _ in old.get(station, [])) != tracker.gaps(station)}
        if changed:
            self._write_gaps(changed, old)

    def _write_gaps(self, changed, old):
        """Replace the ``gaps`` rows of the stations in ``changed`` ({station: [(first, last)]})."""
        store = self.store
        now = iso_utc(time.time())
        for chunk, marks in self._in_chunks(sorted(changed)):
            store.execute("DELETE FROM gaps WHERE station IN %s" % marks, chunk)
        rows = []
        for station, gaps in sorted(changed.items()):
            for first, last in gaps:
                # A gap that only shrank keeps the time it was first seen.
                seen = [detected for f, end, detected in old.get(station, []) if f <= last and end >= first]
                if not seen:  # in a share group usually another collector's batch, stored soon after
                    log.debug("station %s: records %d..%d not received yet", station, first, last)
                rows.append((station, first, last, min(seen) if seen else now))
        store.insert_rows("INSERT INTO gaps (station, first_seq, last_seq, detected_at)", rows)

    def lasting_gaps(self, detected_before):
        """(stations, records) of the gaps still open that were detected before
        ``detected_before`` (ISO UTC)."""
        stations, records = self.store.query(
            "SELECT COUNT(DISTINCT station), SUM(last_seq - first_seq + 1) FROM gaps WHERE detected_at < ?",
            (detected_before,))[0]
        return stations or 0, int(records or 0)

    def _count(self, result):
        self.store.add_counters(result.as_dict())
