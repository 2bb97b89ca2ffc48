"""Append-only, crash-safe journal of everything billing-relevant, on plain files.

The journal is a directory of segment files ``seg-<first seq>.log``. Each record is framed::

    magic "EJ" | length u32 | type u8 | seq u64 | time ms u64 | payload | CRC-32 u32

(big-endian; the CRC covers length through payload). Sequence numbers grow by one per
record, across segment rotation and restarts. On start ``recover()`` scans every segment:
a torn final record (power lost mid-write: the file ends inside a frame, or in zeros) is cut
off the last segment; a complete final frame that fails its CRC (a bit flip in a record that
was fsync'ed and maybe published) is not torn but damaged: its bytes are moved to a
``damaged-<segment>-<offset>.bin`` quarantine file, reported (``damage``, the
``journal_damaged`` event) and its seq is never issued again. A damaged record elsewhere is
skipped (the scan resynchronises on the next valid frame) and reported — a record whose CRC
does not match is never accepted.

Seqs issued are bounded by a durable mark (``seqmark.json``, reserved ahead in blocks of
``SEQ_RESERVE``): after a damaged tail the next seq is past the damaged record's own seq if
its header is believable, else past the mark — never one a consumer may already hold.

Durability: records of durable types (session records with their OCMF documents,
events) are written and fsync'ed before ``append`` returns; aggregates are written at
once and fsync'ed at least every ``sync_interval_s``. The acknowledged cursor (highest
seq the broker has PUBACK'ed, with every earlier one acknowledged too) is kept in a small
file replaced atomically every ``cursor_sync_s`` while it moves: after a crash, up to that
much already-acknowledged traffic is sent again, and consumers drop it by ``seq``.

Capacity (``max_bytes``, of which ``reserve_bytes`` are kept for durable records):
fully acknowledged segments are deleted; when aggregates would exceed the bound, the
oldest unacknowledged aggregates are folded into one ``summary`` record (count, time span,
min / mean / max power) that takes the seq of the last record it replaces and lists the
sequence numbers it stands for, so consumers can tell dropped-on-purpose from lost.
Only records on disk (up to ``synced_seq``) are handed to the forwarder: a record lost
with power before its fsync was never published, so giving its seq again is safe. Durable records are
never dropped: past the bound they go into the reserve and a ``journal_full`` alarm is
raised; if the disk itself refuses a write, ``disk_error`` is raised and the record is
kept in memory (and still published) until a write succeeds.

The file system object is the port's (contract in ``ports/__init__.py``).
"""

import json

from . import log

try:
    from binascii import crc32
except ImportError:  # a MicroPython build without binascii.crc32
    crc32 = None

MAGIC = b"EJ"
HEADER_BYTES = 2 + 4 + 1 + 8 + 8
TRAILER_BYTES = 4
MAX_PAYLOAD = 65536

SESSION = 1
EVENT = 2
AGGREGATE = 3
SUMMARY = 4
TYPE_NAMES = {SESSION: "session", EVENT: "event", AGGREGATE: "aggregate", SUMMARY: "summary"}
DURABLE_TYPES = (SESSION, EVENT)
RETRY_MS = 500  # records the disk refused are written again this often
DROPPABLE_TYPES = (AGGREGATE, SUMMARY)

READ_CHUNK = 16384
CURSOR_FILE = "cursor.json"
SEQ_MARK_FILE = "seqmark.json"
SEQ_RESERVE = 1024  # seqs reserved ahead per write of the mark
QUARANTINE_PREFIX = "damaged-"
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"


def _crc32_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = None


def checksum(data):
    """CRC-32 (IEEE, as zlib/binascii) of ``data``."""
    if crc32 is not None:
        return crc32(data) & 0xFFFFFFFF
    global _TABLE
    if _TABLE is None:
        _TABLE = _crc32_table()
    c = 0xFFFFFFFF
    for byte in data:
        c = (c >> 8) ^ _TABLE[(c ^ byte) & 0xFF]
    return c ^ 0xFFFFFFFF


def _put(buf, offset, value, size):
    for i in range(size - 1, -1, -1):
        buf[offset + i] = value & 0xFF
        value >>= 8


def _get(data, offset, size):
    return int.from_bytes(data[offset:offset + size], "big")


def encode_record(rtype, seq, time_ms, payload):
    """The framed bytes of one record."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("journal payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    frame = bytearray(HEADER_BYTES + len(payload) + TRAILER_BYTES)
    frame[0:2] = MAGIC
    _put(frame, 2, len(payload), 4)
    frame[6] = rtype
    _put(frame, 7, seq, 8)
    _put(frame, 15, time_ms, 8)
    frame[HEADER_BYTES:HEADER_BYTES + len(payload)] = payload
    end = HEADER_BYTES + len(payload)
    _put(frame, end, checksum(memoryview(frame)[2:end]), 4)
    return bytes(frame)


class Record:
    """One journal record; ``payload`` is the published message body (bytes)."""

    __slots__ = ("seq", "type", "time_ms", "payload", "segment", "offset")

    def __init__(self, seq, rtype, time_ms, payload, segment=None, offset=None):
        self.seq = seq
        self.type = rtype
        self.time_ms = time_ms
        self.payload = payload
        self.segment = segment
        self.offset = offset

    @property
    def size(self):
        return HEADER_BYTES + len(self.payload) + TRAILER_BYTES

    def __repr__(self):
        return "Record(seq %d, %s, %d bytes)" % (self.seq, TYPE_NAMES.get(self.type, self.type), len(self.payload))


TORN = "torn"
CORRUPT = "corrupt"


def decode_record(data, offset):
    """(Record, next offset) for the frame at ``offset``; (None, TORN) if ``data`` ends inside
    it; (None, CORRUPT) if the bytes there are not a valid frame."""
    available = len(data) - offset
    if available < HEADER_BYTES:
        if available >= 2 and data[offset:offset + 2] != MAGIC:
            return None, CORRUPT
        return None, TORN
    if data[offset:offset + 2] != MAGIC:
        return None, CORRUPT
    length = _get(data, offset + 2, 4)
    if length > MAX_PAYLOAD:
        return None, CORRUPT
    end = offset + HEADER_BYTES + length
    if len(data) < end + TRAILER_BYTES:
        return None, TORN
    if checksum(memoryview(data)[offset + 2:end]) != _get(data, end, 4):
        return None, CORRUPT
    record = Record(_get(data, offset + 7, 8), data[offset + 6], _get(data, offset + 15, 8),
                    bytes(data[offset + HEADER_BYTES:end]))
    return record, end + TRAILER_BYTES


def scan(data):
    """Every valid record in a segment's bytes, and what was wrong: (records, torn, corrupt).

    ``torn`` is the byte offset where a torn final frame starts (None if the segment ends
    cleanly); ``corrupt`` counts damaged stretches skipped in the middle.
    """
    records = []
    offset = 0
    corrupt = 0
    torn = None
    while offset < len(data):
        record, after = decode_record(data, offset)
        if record is not None:
            record.offset = offset
            records.append(record)
            offset = after
            continue
        resync = _next_valid(data, offset + 1)
        if resync is None:
            # Nothing valid follows: a frame cut short by power loss, or garbage at the end.
            torn = offset
            break
        corrupt += 1
        offset = resync
    return records, torn, corrupt


def damaged_tail(data, offset):
    """True when the bytes from ``offset`` (where nothing valid follows) are a damaged record
    rather than a torn write: a complete frame (by its length field) that fails its CRC, or
    one whose magic is damaged but whose length ends it exactly at the end of the file.
    Anything else — a frame the file ends inside, zeros, bytes that are no frame — is torn."""
    rest = data[offset:]
    if len(rest) < HEADER_BYTES + TRAILER_BYTES:
        return False
    length = _get(rest, 2, 4)
    if length > MAX_PAYLOAD:
        return False
    size = HEADER_BYTES + length + TRAILER_BYTES
    if rest[0:2] == MAGIC:
        return size <= len(rest)
    return size == len(rest)


def _next_valid(data, start):
    """Offset of the next complete valid frame at or after ``start``, or None."""
    index = data.find(MAGIC, start)
    while index >= 0:
        record, _ = decode_record(data, index)
        if record is not None:
            return index
        index = data.find(MAGIC, index + 1)
    return None


def segment_name(first_seq):
    return "%s%012d%s" % (SEGMENT_PREFIX, first_seq, SEGMENT_SUFFIX)


def _segment_first_seq(name):
    if not (name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]
    if not digits.isdigit():
        return None
    return int(digits)


class Segment:
    """A segment file: its name, first seq, last seq, size, and what it holds."""

    __slots__ = ("name", "first_seq", "last_seq", "size", "droppable", "records")

    def __init__(self, name, first_seq):
        self.name = name
        self.first_seq = first_seq
        self.last_seq = first_seq - 1
        self.size = 0
        self.droppable = 0  # records of droppable types
        self.records = 0


class RecoveryReport:
    """What ``recover()`` found, for the log and the console."""

    __slots__ = ("segments", "records", "torn_bytes", "corrupt", "next_seq", "acked")

    def __init__(self):
        self.segments = 0
        self.records = 0
        self.torn_bytes = 0
        self.corrupt = 0
        self.next_seq = 1
        self.acked = 0

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class JournalError(Exception):
    """A record could not be written to the journal (disk full or failing)."""


class Journal:
    """The journal in one directory (``fs``), bounded by ``config['max_bytes']``.

    ``alarm(type, active, values)`` is told when ``journal_full`` or ``disk_error`` start
    and end. ``clock`` supplies ``time()`` (record time stamps) and ``monotonic_ms()``.
    """

    def __init__(self, fs, config, clock, alarm=None):
        self.fs = fs
        self.clock = clock
        self.alarm = alarm
        self.max_bytes = config["max_bytes"]
        self.reserve_bytes = config["reserve_bytes"]
        self.segment_bytes = config["segment_bytes"]
        self.sync_ms = int(config["sync_interval_s"] * 1000)
        self.cursor_sync_ms = int(config["cursor_sync_s"] * 1000)
        self.segments = []
        self.next_seq = 1
        self.acked = 0
        self.generation = 0  # grows when segments are rewritten: readers must re-seek
        # Highest seq known to be on disk (fsync'ed). Only records up to here are published:
        # one lost with power before its fsync was never seen, so its seq may be given again.
        self.synced_seq = 0
        self.pending = []  # records the disk refused, kept in memory until a write succeeds
        self.dropped_records = 0  # aggregates folded into summaries or refused
        self.bytes_written = 0
        self.alarms = {}
        self._handle = None
        self._unsynced = False
        self._last_sync_ms = clock.monotonic_ms()
        self._cursor_saved = 0
        self._cursor_saved_ms = clock.monotonic_ms()
        self._read_pos = None  # (seq, segment name, offset after it, generation)
        self._faults = {}  # disk operations failing now: kind -> error text
        self._alarm_queue = []
        self._notifying = False
        self.report = None
        self.damage = []  # ("journal_damaged", values) found by recover(), reported as events
        self.seq_mark = 0  # every seq ever issued is below this (durable)

    # -- start-up --------------------------------------------------------------------

    def recover(self):
        """Scan the directory, cut a torn tail, find the next seq; returns a RecoveryReport."""
        report = RecoveryReport()
        cursor = self._load_cursor()
        names = sorted(n for n in self.fs.listdir() if _segment_first_seq(n) is not None)
        highest = 0
        for index, name in enumerate(names):
            segment = Segment(name, _segment_first_seq(name))
            data = self.fs.read(name) or b""
            records, torn, corrupt = scan(data)
            if torn is not None and index == len(names) - 1 and damaged_tail(data, torn):
                self._quarantine(name, data, torn)
                data = data[:torn]
                torn = None
            if torn is not None:
                report.torn_bytes += len(data) - torn
                if index == len(names) - 1:
                    self.fs.truncate(name, torn)
                    log.warning("journal: cut a torn final record (%d bytes) off %s" % (len(data) - torn, name))
                else:
                    log.error("journal: %d bytes at the end of %s are not a valid record; skipped"
                              % (len(data) - torn, name))
            if corrupt:
                log.error("journal: skipped %d damaged stretch(es) in %s" % (corrupt, name))
                self.damage.append(("journal_damaged", {"segment": name, "stretches": corrupt}))
            report.corrupt += corrupt
            for record in records:
                if record.seq <= highest:
                    log.error("journal: record seq %d in %s does not follow %d; skipped"
                              % (record.seq, name, highest))
                    report.corrupt += 1
                    continue
                highest = record.seq
                segment.last_seq = record.seq
                segment.records += 1
                if record.type in DROPPABLE_TYPES:
                    segment.droppable += 1
            segment.size = torn if torn is not None and index == len(names) - 1 else len(data)
            report.records += segment.records
            self.segments.append(segment)
        self.acked = cursor
        self.next_seq = max(highest, cursor, self.segments[-1].first_seq - 1 if self.segments else 0) + 1
        self.seq_mark = self._load_seq_mark()
        if self.damage and self.damage[-1][1].get("quarantined"):
            # The damaged record's seq may be in a consumer's hands: never issue it again.
            claimed = self.damage[-1][1].get("seq")
            if claimed is not None and self.next_seq <= claimed < max(self.seq_mark, self.next_seq + SEQ_RESERVE):
                skip_to = claimed + 1
            else:
                skip_to = max(self.seq_mark, self.next_seq + 1)
            log.error("journal: seqs %d..%d are not issued again (a damaged record held one)"
                      % (self.next_seq, skip_to - 1))
            self.damage[-1][1]["skipped"] = [self.next_seq, skip_to - 1]
            self.next_seq = skip_to
        self.next_seq = max(self.next_seq, 1)
        self._cursor_saved = cursor
        self.synced_seq = self.next_seq - 1
        if not self.segments or self.segments[-1].size >= self.segment_bytes:
            self._new_segment(self.next_seq)
        report.segments = len(self.segments)
        report.next_seq = self.next_seq
        report.acked = self.acked
        self.report = report
        self.delete_acked_segments()
        self._notify()
        log.info("journal: %d segments, %d records, next seq %d, acknowledged up to %d%s%s"
                 % (report.segments, report.records, report.next_seq, report.acked,
                    ", torn tail %d bytes" % report.torn_bytes if report.torn_bytes else "",
                    ", %d damaged" % report.corrupt if report.corrupt else ""))
        return report

    def _quarantine(self, name, data, offset):
        """Move a damaged final frame of ``name`` aside; the seq its header claims, if any."""
        bad = bytes(data[offset:])
        claimed = _get(bad, 7, 8) if len(bad) >= HEADER_BYTES and bad[0:2] == MAGIC else None
        keep = "%s%s-%d.bin" % (QUARANTINE_PREFIX, name, offset)
        values = {"segment": name, "offset": offset, "bytes": len(bad), "seq": claimed,
                  "quarantined": keep}
        try:
            self.fs.write_atomic(keep, bad)
            self.fs.truncate(name, offset)
        except OSError as error:
            values["quarantined"] = None
            values["error"] = str(error)
        log.error("journal: the final record of %s (%d bytes at offset %d, seq %s) is damaged, not torn;"
                  " kept as %s" % (name, len(bad), offset, claimed, values["quarantined"]))
        values["quarantined"] = values["quarantined"] or "in place"
        self.damage.append(("journal_damaged", values))
        return claimed

    def _load_seq_mark(self):
        data = self.fs.read(SEQ_MARK_FILE)
        if data is None:
            return 0
        try:
            mark = json.loads(data)["below"]
            if isinstance(mark, int) and mark >= 0:
                return mark
        except (ValueError, KeyError, TypeError):
            pass
        log.error("journal: %s is damaged; ignoring it" % SEQ_MARK_FILE)
        return 0

    def _reserve(self, seq):
        """Make the durable mark cover ``seq`` before it is issued."""
        mark = seq + SEQ_RESERVE
        try:
            self.fs.write_atomic(SEQ_MARK_FILE, json.dumps({"below": mark}).encode())
            self.seq_mark = mark
        except OSError as error:
            self._fault("write", error)

    def _load_cursor(self):
        data = self.fs.read(CURSOR_FILE)
        if data is None:
            return 0
        try:
            acked = json.loads(data)["acked"]
            if isinstance(acked, int) and acked >= 0:
                return acked
        except (ValueError, KeyError, TypeError):
            pass
        log.error("journal: cursor file is damaged; replaying everything still in the journal")
        return 0

    # -- writing ---------------------------------------------------------------------

    @property
    def total_bytes(self):
        return sum(segment.size for segment in self.segments)

    def append(self, rtype, payload, seq_hook=None):
        """Store one record; returns its seq. Durable types are fsync'ed before returning.

        ``seq_hook(seq)`` may return the final payload for that seq (so a message can carry
        its own sequence number); otherwise ``payload`` is stored as given. Aggregates may be
        refused when the journal is full (returns None).
        """
        durable = rtype in DURABLE_TYPES
        self.retry_pending()
        seq = self.next_seq
        if seq >= self.seq_mark:
            self._reserve(seq)
        if seq_hook is not None:
            payload = seq_hook(seq)
        size = HEADER_BYTES + len(payload) + TRAILER_BYTES
        try:
            room = self._make_room(size)
        except OSError as error:
            # The disk refused the rewrite of a segment: fold nothing now.
            self._fault("fold", error)
            log.error("journal: cannot fold aggregates (%s)" % error)
            room = False
        if not room:
            if not durable:
                self.dropped_records += 1
                self._notify()
                return None
            # Only records that are never dropped are left: use the reserve.
            self._set_alarm("journal_full", True, {"bytes": self.total_bytes, "max_bytes": self.max_bytes})
        record = Record(seq, rtype, int(self.clock.time() * 1000), payload)
        self.next_seq = seq + 1
        if self.pending:
            self.pending.append(record)  # keep order behind records the disk refused
        else:
            try:
                self._write(record, durable)
            except OSError as error:
                self.pending.append(record)
                self._fault("write", error)
                log.error("journal: cannot write seq %d (%s); kept in memory" % (seq, error))
        self._notify()
        return seq

    def _write(self, record, durable):
        segment = self.segments[-1]
        if segment.size and segment.size + record.size > self.segment_bytes:
            self._rotate(record.seq)
            segment = self.segments[-1]
        frame = encode_record(record.type, record.seq, record.time_ms, record.payload)
        handle = self._append_handle(segment)
        try:
            handle.write(frame)
            handle.flush()
            if durable:
                self.fs.sync_file(handle)
                self._unsynced = False
                self._last_sync_ms = self.clock.monotonic_ms()
            else:
                self._unsynced = True
        except OSError:
            # Leave no partial frame behind: cut the file back to where the record began.
            self._close_handle()
            try:
                self.fs.truncate(segment.name, segment.size)
            except OSError:
                pass
            raise
        record.segment = segment.name
        record.offset = segment.size
        segment.size += len(frame)
        segment.last_seq = record.seq
        segment.records += 1
        if durable:
            self.synced_seq = record.seq  # this fsync covered every earlier write too
        if record.type in DROPPABLE_TYPES:
            segment.droppable += 1
        self.bytes_written += len(frame)

    def retry_pending(self):
        """Write records kept in memory after a disk error; True when all are on disk."""
        while self.pending:
            record = self.pending[0]
            try:
                self._write(record, True)
            except OSError:
                self._notify()
                return False
            self.pending.pop(0)
        self._recovered("write")
        self._notify()
        return True

    def _append_handle(self, segment):
        if self._handle is None or self._handle[0] != segment.name:
            self._close_handle()
            self._handle = (segment.name, self.fs.open_append(segment.name))
        return self._handle[1]

    def _close_handle(self):
        if self._handle is not None:
            try:
                self._handle[1].close()
            except OSError:
                pass
            self._handle = None

    def _new_segment(self, first_seq):
        """Start the segment whose first record will be ``first_seq``."""
        name = segment_name(first_seq)
        if any(segment.name == name for segment in self.segments):
            raise JournalError("segment %s exists already" % name)
        handle = self.fs.open_append(name)
        handle.close()
        self.fs.sync_dir()
        self.segments.append(Segment(name, first_seq))

    def _rotate(self, first_seq):
        if self._handle is not None and self._unsynced:
            self.fs.sync_file(self._handle[1])
            self._unsynced = False
            self.synced_seq = self.segments[-1].last_seq
        self._close_handle()
        self._new_segment(first_seq)

    def set_sync_intervals(self, sync_interval_s=None, cursor_sync_s=None):
        """Use new ``journal.sync_interval_s`` / ``journal.cursor_sync_s`` (None: keep) from
        the next ``tick``."""
        if sync_interval_s is not None:
            self.sync_ms = int(sync_interval_s * 1000)
        if cursor_sync_s is not None:
            self.cursor_sync_ms = int(cursor_sync_s * 1000)

    def tick(self, now_ms):
        """Periodic work: batched fsync, cursor persistence, pending retries."""
        if self._unsynced and now_ms - self._last_sync_ms >= self.sync_ms:
            self.sync()
        if self.acked != self._cursor_saved and now_ms - self._cursor_saved_ms >= self.cursor_sync_ms:
            self.save_cursor()
        if self.pending:
            self.retry_pending()
        self._notify()

    def next_due_ms(self):
        """When ``tick`` next has work (a batched fsync or a cursor save), or None when
        nothing waits; records the disk refused are retried at ``RETRY_MS``."""
        due = None
        if self._unsynced:
            due = self._last_sync_ms + self.sync_ms
        if self.acked != self._cursor_saved:
            cursor = self._cursor_saved_ms + self.cursor_sync_ms
            due = cursor if due is None or cursor < due else due
        if self.pending:
            retry = self.clock.monotonic_ms() + RETRY_MS
            due = retry if due is None or retry < due else due
        return due

    def sync(self):
        """fsync what was written since the last sync."""
        if self._handle is not None and self._unsynced:
            try:
                self.fs.sync_file(self._handle[1])
            except OSError as error:
                self._fault("sync", error)
                return
            self._recovered("sync")
        self._unsynced = False
        self.synced_seq = self.segments[-1].last_seq if self.segments else self.synced_seq
        self._last_sync_ms = self.clock.monotonic_ms()

    def close(self):
        """Sync data and cursor; called on clean shutdown."""
        self.sync()
        self.save_cursor()
        self._close_handle()
        self._notify()

    # -- acknowledgements and cleanup --------------------------------------------------

    def acknowledge(self, seq):
        """Every record up to ``seq`` has been delivered (PUBACK'ed)."""
        if seq > self.acked:
            self.acked = seq
            self.delete_acked_segments()
            self._notify()

    def save_cursor(self):
        try:
            self.fs.write_atomic(CURSOR_FILE, json.dumps({"acked": self.acked}).encode())
        except OSError as error:
            self._fault("cursor", error)
            return
        self._recovered("cursor")
        self._cursor_saved = self.acked
        self._cursor_saved_ms = self.clock.monotonic_ms()

    def delete_acked_segments(self):
        """Remove segments whose every record is acknowledged (never the active one)."""
        while len(self.segments) > 1 and self.segments[0].last_seq <= self.acked:
            segment = self.segments.pop(0)
            try:
                self.fs.remove(segment.name)
            except OSError as error:
                log.error("journal: cannot delete %s (%s)" % (segment.name, error))
                self.segments.insert(0, segment)
                return
        # Clear with a margin, so the alarm does not flap at the bound.
        if "journal_full" in self.alarms and \
                self.total_bytes <= (self.max_bytes - self.reserve_bytes) * 9 // 10:
            self._set_alarm("journal_full", False, {"bytes": self.total_bytes, "max_bytes": self.max_bytes})

    # -- capacity ----------------------------------------------------------------------

    def _make_room(self, size):
        """Fold the oldest unacknowledged aggregates into summaries until ``size`` fits.

        False when only durable records are left (the aggregate is then refused).
        """
        limit = self.max_bytes - self.reserve_bytes
        while self.total_bytes + size > limit:
            self.delete_acked_segments()
            if self.total_bytes + size <= limit:
                break
            candidate = None
            for segment in self.segments[:-1]:
                if segment.droppable > 1 or (segment.droppable == 1 and self._has_aggregate(segment)):
                    candidate = segment
                    break
            if candidate is None:
                self._set_alarm("journal_full", True, {"bytes": self.total_bytes, "max_bytes": self.max_bytes})
                return False
            self._compact(candidate)
        return True

    def _has_aggregate(self, segment):
        records, _, _ = scan(self.fs.read(segment.name) or b"")
        return any(r.type == AGGREGATE for r in records)

    def _compact(self, segment):
        """Rewrite ``segment`` with its aggregates and summaries folded into one summary."""
        records, _, _ = scan(self.fs.read(segment.name) or b"")
        keep = []
        folded = [r for r in records if r.type in DROPPABLE_TYPES]
        if not folded:
            segment.droppable = 0
            return
        summary = _summary_of(folded)
        last_folded = folded[-1].seq
        for record in records:
            if record.type in DROPPABLE_TYPES:
                if record.seq == last_folded:
                    keep.append(Record(last_folded, SUMMARY, record.time_ms, summary))
                continue
            keep.append(record)
        data = b"".join(encode_record(r.type, r.seq, r.time_ms, r.payload) for r in keep)
        if self._handle is not None and self._handle[0] == segment.name:
            self._close_handle()
        self.fs.write_atomic(segment.name, data)
        self.dropped_records += len(folded) - 1
        segment.size = len(data)
        segment.droppable = 1
        segment.records = len(keep)
        self.generation += 1
        log.warning("journal: near its bound, folded %d aggregates (seq %d..%d) of %s into one summary"
                    % (len(folded), folded[0].seq, last_folded, segment.name))

    def _fault(self, kind, error):
        """A disk operation of ``kind`` (write, fold, sync, cursor) failed."""
        self._faults[kind] = str(error)
        self._set_alarm("disk_error", True, {"error": str(error), "failing": sorted(self._faults),
                                             "pending": len(self.pending)})

    def _recovered(self, kind):
        """A disk operation of ``kind`` worked again; the alarm ends when none is failing."""
        if self._faults.pop(kind, None) is not None and not self._faults:
            self._set_alarm("disk_error", False, {"pending": len(self.pending)})

    def _set_alarm(self, name, active, values):
        was = name in self.alarms
        if active == was:
            if active:
                self.alarms[name] = values
            return
        if active:
            self.alarms[name] = values
        else:
            del self.alarms[name]
        # Told later (_notify): the listener journals an event, which must not happen in
        # the middle of an append that has not yet taken its own sequence number.
        self._alarm_queue.append((name, active, values))

    def _notify(self):
        """Tell the alarm listener what changed, once the journal is consistent again."""
        if self._notifying:
            return
        self._notifying = True
        try:
            while self._alarm_queue:
                name, active, values = self._alarm_queue.pop(0)
                if self.alarm is not None:
                    self.alarm(name, active, values)
        finally:
            self._notifying = False

    # -- reading -----------------------------------------------------------------------

    def read_after(self, seq, limit=64):
        """Up to ``limit`` records with seq greater than ``seq``, in order (from disk, then
        the ones held in memory after a disk error).

        Reading on from where the previous call stopped costs only the new bytes: the
        position of the last record returned is remembered (until a compaction)."""
        out = []
        index, offset = self._locate(seq)
        while index < len(self.segments):
            segment = self.segments[index]
            for record, after in self._frames(segment, offset):
                if record.seq > seq:
                    out.append(record)
                    self._read_pos = (record.seq, segment.name, after, self.generation)
                    if len(out) >= limit:
                        return out
            index += 1
            offset = 0
        for record in self.pending:
            if record.seq > seq:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def _frames(self, segment, offset):
        """(record, offset after it) for each valid frame of ``segment`` from ``offset``,
        read in chunks; damaged stretches are skipped as ``scan`` does.

        The chunk size is the file system object's ``read_chunk`` if it has one (the
        MicroPython port asks for small reads: one large buffer is hard to find in a small,
        fragmented heap); a frame longer than a chunk is read whole on its own."""
        read_chunk = getattr(self.fs, "read_chunk", READ_CHUNK)
        chunk = read_chunk
        while offset < segment.size:
            data = self.fs.read_from(segment.name, offset, min(chunk, segment.size - offset))
            if not data:
                return
            pos = 0
            while pos < len(data):
                record, after = decode_record(data, pos)
                if record is not None:
                    record.segment = segment.name
                    record.offset = offset + pos
                    yield record, offset + after
                    pos = after
                elif after == TORN and offset + len(data) < segment.size:
                    break  # the chunk ends inside this frame: read on from its start
                else:
                    # Damage (rare): find the next valid frame in the rest of the file.
                    rest = self.fs.read_from(segment.name, offset + pos)
                    resync = _next_valid(rest, 1)
                    if resync is None:
                        return
                    pos += resync
                    break
            if pos:
                chunk = read_chunk
            elif len(data) >= HEADER_BYTES and data[0:2] == MAGIC:
                chunk = HEADER_BYTES + _get(data, 2, 4) + TRAILER_BYTES  # exactly this frame
            else:
                chunk = HEADER_BYTES + MAX_PAYLOAD + TRAILER_BYTES
            offset += pos

    def _locate(self, seq):
        """(segment index, byte offset) where records after ``seq`` start."""
        hint = self._read_pos
        if hint is not None and hint[0] == seq and hint[3] == self.generation:
            for index, segment in enumerate(self.segments):
                if segment.name == hint[1]:
                    return index, hint[2]
        for index, segment in enumerate(self.segments):
            if segment.last_seq > seq:
                return index, 0
        return len(self.segments), 0

    def publishable_seq(self):
        """Highest seq the forwarder may publish: on disk, or held in memory after a disk
        error (those must still reach the backend)."""
        if self.pending:
            return self.next_seq - 1
        return self.synced_seq

    def stats(self):
        return {
            "segments": len(self.segments),
            "bytes": self.total_bytes,
            "max_bytes": self.max_bytes,
            "next_seq": self.next_seq,
            "acked": self.acked,
            "backlog": self.next_seq - 1 - self.acked,
            "pending_in_memory": len(self.pending),
            "dropped_records": self.dropped_records,
            "bytes_written": self.bytes_written,
            "alarms": sorted(self.alarms),
        }


def _seq_ranges(seqs):
    """Sorted seqs as [[first, last], ...] runs."""
    ranges = []
    for seq in sorted(seqs):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def _summary_of(records):
    """The payload of a summary record standing for ``records`` (aggregates or summaries).

    ``covers_seq`` lists exactly the folded sequence numbers as [first, last] runs: the
    session records and events kept between them are not covered."""
    count = 0
    covered = []
    last_seq = records[-1].seq
    start = None
    end = None
    power_min = None
    power_max = None
    power_sum = 0.0
    power_n = 0
    for record in records:
        try:
            doc = json.loads(record.payload)
        except ValueError:
            continue
        if record.type == SUMMARY:
            count += doc.get("aggregates", 0)
            for first, last in doc.get("covers_seq", []):
                covered.extend(range(first, last + 1))
            weight = doc.get("aggregates", 0)
        else:
            count += 1
            covered.append(record.seq)
            weight = 1
        if start is None or (doc.get("start") and doc["start"] < start):
            start = doc.get("start")
        if end is None or (doc.get("end") and doc["end"] > end):
            end = doc.get("end")
        power = doc.get("power_total_w") or {}
        if power.get("min") is not None:
            power_min = power["min"] if power_min is None else min(power_min, power["min"])
        if power.get("max") is not None:
            power_max = power["max"] if power_max is None else max(power_max, power["max"])
        if power.get("avg") is not None:
            power_sum += power["avg"] * weight
            power_n += weight
    station = None
    for record in records:
        try:
            station = json.loads(record.payload).get("station")
        except ValueError:
            continue
        if station:
            break
    body = {
        "seq": last_seq,
        "station": station,
        "kind": "summary",
        "covers_seq": _seq_ranges(covered),
        "aggregates": count,
        "start": start,
        "end": end,
        "power_total_w": {"min": power_min, "avg": round(power_sum / power_n, 1) if power_n else None,
                          "max": power_max},
    }
    return json.dumps(body).encode()
