"""The journal on a real file system: framing, torn writes, damage, durability, cursor,
capacity, disk errors (simulated and a real full tmpfs) — and the offline journal tool.

Promise 1 (no signed reading or session record lost or altered; only a torn final record
is dropped) and promise 2 (sequence numbers consumers can rely on) are checked against
the files themselves, not only against what the journal object says.
"""

import asyncio
import contextlib
import errno
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evse_agent import journal
from evse_agent.config import validate
from evse_agent.console import Console
from evse_agent.journal import AGGREGATE, EVENT, SESSION, SUMMARY, Journal, encode_record, scan
from evse_agent.messages import Outbox, iso_utc
from evse_agent.ports.cpython.fs import FileSystem
from evse_tools.cli import journal_tool
from evse_tools.collector.consumer import SequenceTracker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCH = 1795589401.0  # 2026-11-25T06:50:01Z

CONFIG = {"max_bytes": 1 << 20, "reserve_bytes": 4096, "segment_bytes": 64 * 1024,
          "sync_interval_s": 30.0, "cursor_sync_s": 5.0}


# -- helpers ---------------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.ms = 1_000_000

    def monotonic_ms(self):
        return self.ms

    def time(self):
        return EPOCH + self.ms / 1000

    def advance(self, seconds):
        self.ms += int(seconds * 1000)


class CountingFS(FileSystem):
    """FileSystem that records every sync_file (file name, size on disk at that moment)
    and every write_atomic (name, data)."""

    def __init__(self, root):
        super().__init__(root)
        self.syncs = []
        self.atomic_writes = []

    def sync_file(self, handle):
        super().sync_file(handle)
        self.syncs.append((os.path.basename(handle.name), os.fstat(handle.fileno()).st_size))

    def write_atomic(self, name, data):
        super().write_atomic(name, data)
        self.atomic_writes.append((name, bytes(data)))


class _FlakyHandle:
    """An append handle whose writes fail with ENOSPC while its file system says so."""

    def __init__(self, fs, inner):
        self.fs = fs
        self.inner = inner
        self.name = inner.name

    def write(self, data):
        if self.fs.failing:
            if self.fs.partial:  # a real full disk often takes part of a write first
                self.inner.write(data[:len(data) // 2])
                self.inner.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.inner.write(data)

    def flush(self):
        self.inner.flush()

    def fileno(self):
        return self.inner.fileno()

    def close(self):
        self.inner.close()


class FlakyFS(CountingFS):
    """Writes, fsyncs and atomic replacements raise OSError(ENOSPC) while ``failing``."""

    def __init__(self, root):
        super().__init__(root)
        self.failing = False
        self.partial = False

    def open_append(self, name):
        return _FlakyHandle(self, super().open_append(name))

    def sync_file(self, handle):
        if self.failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().sync_file(handle)

    def write_atomic(self, name, data):
        if self.failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write_atomic(name, data)


def open_journal(root, fs=None, clock=None, alarms=None, **config):
    """(journal, recovery report) over ``root``; ``alarms`` collects (name, active) calls."""
    settings = dict(CONFIG, **config)
    fs = fs if fs is not None else FileSystem(str(root))
    callback = None if alarms is None else (lambda name, active, values: alarms.append((name, active)))
    j = Journal(fs, settings, clock if clock is not None else Clock(), callback)
    return j, j.recover()


def session_payload(n, pad=0):
    return json.dumps({"event": "end", "session_id": "s-%04d" % n, "energy_wh": 1000 + n,
                       "note": "x" * pad}).encode()


def event_payload(n, pad=0):
    return json.dumps({"type": "voltage_low", "active": True, "values": {"v": 190 + n},
                       "note": "x" * pad}).encode()


def aggregate_payload(n, power=None, pad=0):
    power = 1000 + 10 * n if power is None else power
    return json.dumps({"kind": "aggregate", "start": iso_utc(EPOCH + 10 * n),
                       "end": iso_utc(EPOCH + 10 * n + 10), "samples": 10,
                       "power_total_w": {"min": power - 7, "avg": power, "max": power + 9},
                       "note": "x" * pad}).encode()


PAYLOADS = {SESSION: session_payload, EVENT: event_payload, AGGREGATE: aggregate_payload}


def segment_names(root):
    return sorted(n for n in os.listdir(root) if n.startswith("seg-") and n.endswith(".log"))


def disk_records(root):
    """Every valid record in the segment files, in file order: [(record, its frame bytes)]."""
    found = []
    for name in segment_names(root):
        with open(os.path.join(root, name), "rb") as handle:
            data = handle.read()
        records, _, _ = scan(data)
        for record in records:
            record.segment = name
            found.append((record, data[record.offset:record.offset + record.size]))
    return found


def snapshot(root):
    """Names and contents of every file under ``root``."""
    files = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        with open(path, "rb") as handle:
            files[name] = (handle.read(), os.stat(path).st_mtime_ns)
    return files


def write_files(root, files):
    os.makedirs(root)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(data)


# -- round trip and sequence numbers -------------------------------------------------------


def test_round_trip_of_each_record_type(tmp_path):
    """Records of every type come back with their type, seq, time and payload, from the
    running journal and after a restart."""
    clock = Clock()
    j, report = open_journal(tmp_path, clock=clock)
    assert report.next_seq == 1 and report.records == 0
    wanted = []
    for rtype, payload in ((SESSION, session_payload(1)), (EVENT, event_payload(2)),
                           (AGGREGATE, aggregate_payload(3)), (SUMMARY, b'{"kind": "summary"}')):
        clock.advance(1.5)
        seq = j.append(rtype, payload)
        wanted.append((seq, rtype, int(clock.time() * 1000), payload))
    assert [w[0] for w in wanted] == [1, 2, 3, 4]
    got = [(r.seq, r.type, r.time_ms, r.payload) for r in j.read_after(0)]
    assert got == wanted
    j.close()
    again, report = open_journal(tmp_path, clock=clock)
    assert report.records == 4 and report.next_seq == 5 and report.torn_bytes == 0
    assert [(r.seq, r.type, r.time_ms, r.payload) for r in again.read_after(0)] == wanted
    assert [(r.seq, r.type, r.time_ms, r.payload) for r, _ in disk_records(tmp_path)] == wanted


def test_seq_grows_by_one_across_rotation_and_restarts(tmp_path):
    """With small segments the journal spreads over many files; seq still grows by one
    with no gap or repeat, across rotation and across three restarts."""
    clock = Clock()
    expected = []
    for restart in range(3):
        j, report = open_journal(tmp_path, clock=clock, segment_bytes=1024)
        assert report.next_seq == len(expected) + 1
        for n in range(40):
            rtype = (SESSION, EVENT, AGGREGATE)[n % 3]
            payload = PAYLOADS[rtype](n, pad=n)
            expected.append((j.append(rtype, payload), payload))
        j.close()
    assert len(segment_names(tmp_path)) > 10
    on_disk = [(r.seq, r.payload) for r, _ in disk_records(tmp_path)]
    assert on_disk == expected
    assert [seq for seq, _ in on_disk] == list(range(1, 121))


# -- torn writes, damage, garbage ------------------------------------------------------------


def _journal_files(tmp_path, last_type):
    """Files of a closed journal of two segments whose very last record is of ``last_type``,
    and the (seq, offset, size) of that record."""
    root = tmp_path / "template"
    j, _ = open_journal(root, segment_bytes=400)
    for n in range(6):
        j.append((SESSION, EVENT, AGGREGATE)[n % 3], PAYLOADS[(SESSION, EVENT, AGGREGATE)[n % 3]](n))
    j.append(last_type, PAYLOADS[last_type](99))
    j.close()
    names = segment_names(root)
    assert len(names) >= 2
    files = {name: (root / name).read_bytes() for name in names}
    last, _ = disk_records(root)[-1]
    return files, names[-1], last


@pytest.mark.parametrize("last_type", [SESSION, EVENT, AGGREGATE], ids=["session", "event", "aggregate"])
def test_torn_final_record_cut_at_every_byte_offset(tmp_path, last_type):
    """Power lost while writing the last record, at each of its N byte offsets: recover()
    drops exactly that record, keeps every earlier record byte-identical, reports and cuts
    the torn bytes, and the next append follows the kept records with no number reused."""
    files, last_name, last = _journal_files(tmp_path, last_type)
    kept_files = dict(files)
    kept_files[last_name] = files[last_name][:last.offset]
    for cut in range(last.size):
        root = tmp_path / ("cut-%03d" % cut)
        torn = dict(files)
        torn[last_name] = files[last_name][:last.offset + cut]
        write_files(root, torn)
        j, report = open_journal(root, segment_bytes=400)
        assert report.torn_bytes == cut, cut
        assert report.corrupt == 0
        assert (root / last_name).read_bytes() == kept_files[last_name], cut
        for name in files:
            if name != last_name:
                assert (root / name).read_bytes() == files[name]
        kept = [r.seq for r in j.read_after(0)]
        assert kept == list(range(1, last.seq)), cut
        seq = j.append(EVENT, event_payload(1000))
        assert seq > kept[-1] and seq == report.next_seq and seq not in kept
        j.close()
        again = disk_records(root)
        assert [r.seq for r, _ in again] == kept + [seq]
        assert b"".join(frame for _, frame in again[:-1]) == b"".join(kept_files[n] for n in sorted(kept_files))
        shutil.rmtree(root)


def test_record_damaged_mid_segment_is_never_accepted(tmp_path):
    """Any byte of a record in the middle of a segment changed (every position, two flip
    patterns): that record is never accepted, the records after it are still found,
    nothing is cut, and the damage is reported."""
    template = tmp_path / "template"
    j, _ = open_journal(template)
    payloads = [session_payload(1), event_payload(2), aggregate_payload(3), session_payload(4), event_payload(5)]
    for n, payload in enumerate(payloads):
        j.append((SESSION, EVENT, AGGREGATE, SESSION, EVENT)[n], payload)
    j.close()
    (name,) = segment_names(template)
    data = (template / name).read_bytes()
    victim = disk_records(template)[2][0]
    assert victim.seq == 3
    case = 0
    for position in range(victim.offset, victim.offset + victim.size):
        for mask in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= mask
            records, torn, corrupt = scan(bytes(damaged))
            assert [r.seq for r in records] == [1, 2, 4, 5] and torn is None and corrupt == 1
            if position % 7 and mask == 0x01:
                continue  # every 7th position also goes through recover() on real files
            root = tmp_path / ("case-%d" % case)
            case += 1
            write_files(root, {name: bytes(damaged)})
            j, report = open_journal(root)
            assert report.corrupt == 1 and report.torn_bytes == 0
            got = j.read_after(0)
            assert [r.seq for r in got] == [1, 2, 4, 5]
            assert [r.payload for r in got] == [payloads[0], payloads[1], payloads[3], payloads[4]]
            assert (root / name).read_bytes() == bytes(damaged)  # nothing cut in the middle
            assert j.append(EVENT, event_payload(6)) == 6


@pytest.mark.parametrize("garbage", [
    b"\x00" * 4096,  # zero-filled blocks after power loss
    bytes(range(256)) * 3,
    journal.MAGIC + b"\x00\x00\x00\x10\x02" + b"\x00" * 12,  # a header that never got its body
    journal.MAGIC + b"\xff\xff\xff\xff" + b"junk",  # a length no record can have
    b"\x1b[2J garbage from a confused tool \n",
], ids=["zeros", "bytes", "header-only", "bad-length", "text"])
def test_garbage_after_last_record_is_cut(tmp_path, garbage):
    """Bytes after the last record that are not a record are cut off as a torn tail;
    every record is kept and the journal carries on at the next seq."""
    j, _ = open_journal(tmp_path)
    for n in range(1, 4):
        j.append(SESSION, session_payload(n))
    j.close()
    (name,) = segment_names(tmp_path)
    clean = (tmp_path / name).read_bytes()
    with open(tmp_path / name, "ab") as handle:
        handle.write(garbage)
    j, report = open_journal(tmp_path)
    assert report.torn_bytes == len(garbage)
    assert (tmp_path / name).read_bytes() == clean
    assert [r.payload for r in j.read_after(0)] == [session_payload(n) for n in range(1, 4)]
    assert j.append(EVENT, event_payload(4)) == 4
    j.close()
    _, report = open_journal(tmp_path)
    assert report.torn_bytes == 0 and report.records == 4


# -- durability: fsync and the cursor ---------------------------------------------------------


def test_durable_records_are_fsynced_before_append_returns(tmp_path):
    """Session records and events are on disk (fsync'ed with the whole frame in the file)
    when append returns; aggregates are batched and fsync'ed once sync_interval_s passed."""
    clock = Clock()
    fs = CountingFS(str(tmp_path))
    j, _ = open_journal(tmp_path, fs=fs, clock=clock)
    name = segment_names(tmp_path)[0]
    for rtype, payload in ((SESSION, session_payload(1)), (EVENT, event_payload(2))):
        before = len(fs.syncs)
        j.append(rtype, payload)
        assert fs.syncs[before:] == [(name, os.path.getsize(tmp_path / name))]
    before = len(fs.syncs)
    for n in range(5):
        j.append(AGGREGATE, aggregate_payload(n))
        clock.advance(5)
        j.tick(clock.monotonic_ms())
    assert fs.syncs[before:] == []  # 25 s: not yet
    clock.advance(5)
    j.tick(clock.monotonic_ms())
    assert fs.syncs[before:] == [(name, os.path.getsize(tmp_path / name))]  # one sync for all five
    clock.advance(60)
    j.tick(clock.monotonic_ms())
    assert len(fs.syncs) == before + 1  # nothing new written: no further sync


def test_cursor_saved_atomically_every_cursor_sync_s_and_loaded_on_restart(tmp_path):
    """The acknowledged cursor is written (via write_atomic, no temp file left) only when it
    moved and cursor_sync_s passed since the last save; a restart resumes from it, and
    what was acknowledged after the last save is sent again."""
    clock = Clock()
    fs = CountingFS(str(tmp_path))
    j, _ = open_journal(tmp_path, fs=fs, clock=clock)
    for n in range(1, 11):
        j.append(EVENT, event_payload(n))

    def saves():
        return [json.loads(data) for name, data in fs.atomic_writes if name == journal.CURSOR_FILE]

    clock.advance(1)
    j.acknowledge(3)
    j.tick(clock.monotonic_ms())
    assert saves() == []  # only 1 s since the journal started
    clock.advance(3.9)
    j.tick(clock.monotonic_ms())
    assert saves() == []
    clock.advance(0.1)
    j.tick(clock.monotonic_ms())
    assert saves() == [{"acked": 3}]
    j.acknowledge(6)
    clock.advance(4)
    j.tick(clock.monotonic_ms())
    assert saves() == [{"acked": 3}]
    clock.advance(1)
    j.tick(clock.monotonic_ms())
    assert saves() == [{"acked": 3}, {"acked": 6}]
    clock.advance(60)
    j.tick(clock.monotonic_ms())
    assert len(saves()) == 2  # unchanged cursor: not rewritten
    j.acknowledge(8)  # acknowledged, not yet saved: then the agent is killed
    assert json.loads((tmp_path / journal.CURSOR_FILE).read_bytes()) == {"acked": 6}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    again, report = open_journal(tmp_path, clock=clock)
    assert report.acked == 6
    assert [r.seq for r in again.read_after(report.acked)] == [7, 8, 9, 10]
    assert again.append(EVENT, event_payload(11)) == 11


def test_next_due_names_the_batched_sync_and_the_cursor_save(tmp_path):
    """``next_due_ms`` is when ``tick`` has work: the batched fsync of aggregates
    (sync_interval_s after the last sync) and the cursor save (cursor_sync_s after the last
    save), whichever is first; None when nothing waits, so the forwarder can sleep."""
    clock = Clock()
    j, _ = open_journal(tmp_path, clock=clock)
    j.tick(clock.monotonic_ms())
    assert j.next_due_ms() is None
    j.append(AGGREGATE, aggregate_payload(1))
    assert j.next_due_ms() == j._last_sync_ms + j.sync_ms
    clock.advance(j.sync_ms / 1000)
    j.tick(clock.monotonic_ms())
    assert j.next_due_ms() is None  # synced
    j.append(EVENT, event_payload(2))  # durable: synced on append, nothing due
    assert j.next_due_ms() is None
    j.acknowledge(2)
    assert j.next_due_ms() == j._cursor_saved_ms + j.cursor_sync_ms
    clock.advance(j.cursor_sync_ms / 1000)
    j.tick(clock.monotonic_ms())
    assert j.next_due_ms() is None
    assert json.loads((tmp_path / journal.CURSOR_FILE).read_bytes()) == {"acked": 2}


@pytest.mark.parametrize("damage", [b"", b"{", b'{"acked": -4}', b'{"acked": "7"}', b"[7]",
                                    b'{"seen": 7}', b"\xff\xfe\x00", b"null"])
def test_damaged_cursor_replays_everything(tmp_path, damage):
    """A damaged cursor file is not a crash: the journal starts at cursor 0 and replays
    every record still in the journal."""
    j, _ = open_journal(tmp_path)
    for n in range(1, 6):
        j.append(SESSION, session_payload(n))
    j.acknowledge(4)
    j.close()
    assert json.loads((tmp_path / journal.CURSOR_FILE).read_bytes()) == {"acked": 4}
    (tmp_path / journal.CURSOR_FILE).write_bytes(damage)
    j, report = open_journal(tmp_path)
    assert report.acked == 0
    assert [r.seq for r in j.read_after(report.acked)] == [1, 2, 3, 4, 5]
    assert j.append(EVENT, event_payload(6)) == 6


def test_acknowledged_segments_are_deleted_but_never_the_active_one(tmp_path):
    """Segments whose every record is acknowledged are removed from disk; the one still
    holding unacknowledged records stays, and the active segment stays even when all
    of it is acknowledged."""
    j, _ = open_journal(tmp_path, segment_bytes=1024)
    for n in range(1, 41):
        j.append(EVENT, event_payload(n, pad=60))
    before = {}
    for record, _ in disk_records(tmp_path):
        before.setdefault(record.segment, []).append(record.seq)
    assert len(before) >= 4
    active = j.segments[-1].name
    j.acknowledge(17)
    names = segment_names(tmp_path)
    for name, seqs in before.items():
        assert (name in names) == (max(seqs) > 17 or name == active), name
    assert [r.seq for r in j.read_after(17)] == list(range(18, 41))
    j.acknowledge(40)
    names = segment_names(tmp_path)
    assert names == [j.segments[-1].name]
    assert j.append(EVENT, event_payload(41)) == 41
    j.close()
    again, report = open_journal(tmp_path, segment_bytes=1024)
    assert report.acked == 40 and report.next_seq == 42
    assert [r.seq for r in again.read_after(40)] == [41]


# -- capacity: folding aggregates, journal_full ------------------------------------------------


def test_capacity_folds_aggregates_into_correct_summaries(tmp_path):
    """Near max_bytes the oldest aggregates are folded into summary records: each summary
    takes the seq of the last record it folds, lists exactly the folded seqs (covers_seq), counts the
    aggregates and has the right min / avg / max power and time span; session records and
    events are all kept byte-identical, and the journal stays within its bound."""
    clock = Clock()
    alarms = []
    j, _ = open_journal(tmp_path, clock=clock, alarms=alarms,
                        max_bytes=12000, reserve_bytes=2000, segment_bytes=1500)
    appended = {}
    for n in range(150):
        clock.advance(10)
        rtype = SESSION if n % 10 == 4 else EVENT if n % 10 == 8 else AGGREGATE
        payload = aggregate_payload(n, power=(n * 37) % 500 + 100) if rtype == AGGREGATE else PAYLOADS[rtype](n)
        seq = j.append(rtype, payload)
        assert seq is not None
        appended[seq] = (rtype, payload, encode_record(rtype, seq, int(clock.time() * 1000), payload))
        assert j.total_bytes <= 12000 - 2000
    assert alarms == []
    on_disk = disk_records(tmp_path)
    seqs = [r.seq for r, _ in on_disk]
    assert seqs == sorted(set(seqs))
    summaries = [(r, json.loads(r.payload)) for r, _ in on_disk if r.type == SUMMARY]
    assert len(summaries) >= 3
    for seq, (rtype, _, frame) in appended.items():
        if rtype != AGGREGATE:
            assert [f for r, f in on_disk if r.seq == seq] == [frame]
    present = {r.seq: frame for r, frame in on_disk}
    covered = set()
    for record, body in summaries:
        folded = [s for first, last in body["covers_seq"] for s in range(first, last + 1)]
        assert folded[-1] == record.seq and body["seq"] == record.seq
        assert all(appended[s][0] == AGGREGATE for s in folded)  # session records and events are not covered
        assert all(s not in present for s in folded[:-1])
        docs = [json.loads(appended[s][1]) for s in folded]
        assert body["aggregates"] == len(folded)
        power = body["power_total_w"]
        assert power["min"] == min(d["power_total_w"]["min"] for d in docs)
        assert power["max"] == max(d["power_total_w"]["max"] for d in docs)
        assert power["avg"] == round(sum(d["power_total_w"]["avg"] for d in docs) / len(docs), 1)
        assert body["start"] == docs[0]["start"] and body["end"] == docs[-1]["end"]
        assert not covered & set(folded)
        covered |= set(folded)
    for seq, (rtype, _, frame) in appended.items():
        if rtype == AGGREGATE and seq not in covered:
            assert present[seq] == frame  # an aggregate is either kept as it was or folded
    assert j.dropped_records == len(covered) - len(summaries)


def test_journal_full_refuses_aggregates_but_keeps_durable_records(tmp_path):
    """When only durable records are left, aggregates are refused and journal_full is
    raised — once; session records and events are still accepted into the reserve;
    acknowledgement frees space and clears the alarm — once."""
    clock = Clock()
    alarms = []
    j, _ = open_journal(tmp_path, clock=clock, alarms=alarms,
                        max_bytes=6000, reserve_bytes=2000, segment_bytes=1024)
    durable = {}
    n = 0
    while j.total_bytes <= 4000:
        durable[j.append(EVENT, event_payload(n, pad=40))] = event_payload(n, pad=40)
        n += 1
    assert alarms == [("journal_full", True)]
    for k in range(5):  # aggregates refused, durable records still go in, into the reserve
        assert j.append(AGGREGATE, aggregate_payload(k)) is None
        seq = j.append(SESSION, session_payload(k))
        durable[seq] = session_payload(k)
    assert j.dropped_records == 5
    assert alarms == [("journal_full", True)]
    assert 4000 < j.total_bytes <= 6000
    on_disk = {r.seq: r.payload for r, _ in disk_records(tmp_path)}
    assert on_disk == durable and sorted(durable) == list(range(1, len(durable) + 1))
    j.acknowledge(max(durable) - 3)
    assert alarms == [("journal_full", True), ("journal_full", False)]
    assert j.append(AGGREGATE, aggregate_payload(1)) == max(durable) + 1
    assert alarms == [("journal_full", True), ("journal_full", False)]


# -- disk errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["refused", "partial-write"])
def test_disk_error_keeps_records_in_memory_until_the_disk_works(tmp_path, partial):
    """A disk that refuses writes (ENOSPC): disk_error is raised once, the records are
    kept in memory with their seqs, read_after still returns everything in order, no
    partial frame is left in the file; when the disk works again retry_pending writes
    them in order and clears the alarm: nothing lost, also across a restart."""
    clock = Clock()
    alarms = []
    fs = FlakyFS(str(tmp_path))
    fs.partial = partial
    j, _ = open_journal(tmp_path, fs=fs, clock=clock, alarms=alarms)
    wanted = []
    for n in range(3):
        wanted.append((j.append(SESSION, session_payload(n)), session_payload(n)))
    fs.failing = True
    for n, rtype in enumerate((SESSION, EVENT, AGGREGATE, SESSION, EVENT)):
        payload = PAYLOADS[rtype](10 + n)
        wanted.append((j.append(rtype, payload), payload))
        clock.advance(1)
        j.tick(clock.monotonic_ms())
    assert [seq for seq, _ in wanted] == list(range(1, 9))
    assert alarms == [("disk_error", True)]
    assert "disk_error" in j.alarms and len(j.pending) == 5
    (name,) = segment_names(tmp_path)
    records, torn, corrupt = scan((tmp_path / name).read_bytes())
    assert [r.seq for r in records] == [1, 2, 3] and torn is None and corrupt == 0
    assert [(r.seq, r.payload) for r in j.read_after(0)] == wanted
    assert [r.seq for r in j.read_after(5)] == [6, 7, 8]
    assert [r.seq for r in j.read_after(0, limit=4)] == [1, 2, 3, 4]
    assert j.retry_pending() is False
    fs.failing = False
    assert j.retry_pending() is True
    assert alarms == [("disk_error", True), ("disk_error", False)]
    assert j.pending == [] and "disk_error" not in j.alarms
    assert [(r.seq, r.payload) for r, _ in disk_records(tmp_path)] == wanted
    assert j.append(EVENT, event_payload(99)) == 9
    j.close()
    again, report = open_journal(tmp_path)
    assert report.torn_bytes == 0 and report.corrupt == 0
    assert [(r.seq, r.payload) for r in again.read_after(0)] == wanted + [(9, event_payload(99))]


def _fill_disk_scenario(root, free_space, filler=None, segment_bytes=16 * 1024):
    """The disk under the journal fills up: the journal raises disk_error (once), keeps
    accepting session records in memory, loses nothing already journaled, and writes
    everything when ``free_space()`` made room. Runs in-process on a small tmpfs, or in a
    subprocess under RLIMIT_FSIZE. Returns facts for the caller to report."""
    clock = Clock()
    alarms = []
    if filler is not None:
        with open(os.path.join(root, "filler"), "wb") as handle:
            handle.write(b"\xa5" * filler)
    jdir = os.path.join(root, "journal")
    j, _ = open_journal(jdir, clock=clock, alarms=alarms, max_bytes=64 << 20,
                        segment_bytes=segment_bytes)
    wanted = []
    n = 0
    while "disk_error" not in j.alarms:
        assert n < 10000, "the disk never filled up"
        rtype = (AGGREGATE, EVENT, AGGREGATE, SESSION)[n % 4]
        payload = PAYLOADS[rtype](n, pad=300)
        wanted.append((j.append(rtype, payload), payload))
        n += 1
    written = len(wanted) - 1
    on_disk = [(r.seq, r.payload) for r, _ in disk_records(jdir)]
    assert on_disk == wanted[:written]  # everything journaled before the error, intact
    for name in segment_names(jdir):
        assert scan(open(os.path.join(jdir, name), "rb").read())[1:] == (None, 0)  # no partial frame
    for k in range(20):  # the journal keeps accepting durable records (in memory)
        payload = session_payload(k, pad=300)
        wanted.append((j.append(SESSION, payload), payload))
        clock.advance(1)
        j.tick(clock.monotonic_ms())
    assert [seq for seq, _ in wanted] == list(range(1, len(wanted) + 1))
    assert [(r.seq, r.payload) for r in j.read_after(0, limit=100000)] == wanted
    assert alarms == [("disk_error", True)]
    free_space()
    clock.advance(1)
    j.tick(clock.monotonic_ms())
    assert alarms == [("disk_error", True), ("disk_error", False)] and not j.pending
    j.close()
    again, report = open_journal(jdir, clock=clock, segment_bytes=segment_bytes)
    assert report.torn_bytes == 0 and report.corrupt == 0
    assert [(r.seq, r.payload) for r in again.read_after(0, limit=100000)] == wanted
    return {"records": len(wanted), "written_before_error": written}


@contextlib.contextmanager
def small_tmpfs(path, size="256k"):
    """A tmpfs of ``size`` mounted at ``path`` (None if mounting is not permitted)."""
    os.makedirs(path)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(path)],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        yield None
        return
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fsize_limited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG


def test_real_disk_full(tmp_path):
    """A real full file system (a 256 KiB tmpfs, most of it taken by another file):
    disk_error, nothing already journaled lost, durable records still accepted, all
    written once space is freed. Where mounting is not permitted: a subprocess whose
    file size is limited by RLIMIT_FSIZE (EFBIG), made writable again by lifting it."""
    mount = tmp_path / "disk"
    with small_tmpfs(mount) as disk:
        if disk is not None:
            facts = _fill_disk_scenario(str(disk), lambda: os.remove(os.path.join(disk, "filler")),
                                        filler=200 * 1024)
            assert facts["written_before_error"] > 10
            return
    shutil.rmtree(mount, ignore_errors=True)
    os.makedirs(mount)
    result = subprocess.run([sys.executable, __file__, "fsize-scenario", str(mount)],
                            preexec_fn=_fsize_limited, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["written_before_error"] > 10


# -- known defects (reported; the tests turn green when they are fixed) -------------------------


def test_segment_files_are_named_after_their_first_record(tmp_path):
    """DESIGN: segments are ``seg-<first seq>.log``; each file's name matches its first record."""
    j, _ = open_journal(tmp_path, segment_bytes=1024)
    for n in range(1, 21):
        j.append(EVENT, event_payload(n, pad=200))
    j.close()
    firsts = {}
    for record, _ in disk_records(tmp_path):
        firsts.setdefault(record.segment, record.seq)
    assert {name: journal.segment_name(seq) for name, seq in firsts.items()} == {n: n for n in firsts}


def test_unacknowledged_record_survives_restart_after_an_oversized_record(tmp_path):
    """A session record bigger than segment_bytes, a restart, one more session record:
    acknowledging the big one must not delete the new one."""
    j, _ = open_journal(tmp_path, segment_bytes=1024)
    assert j.append(SESSION, session_payload(1)) == 1
    assert j.append(SESSION, session_payload(2, pad=1100)) == 2  # e.g. many OCMF documents
    j.close()
    j, _ = open_journal(tmp_path, segment_bytes=1024)
    assert j.append(SESSION, session_payload(3)) == 3
    j.acknowledge(2)
    assert [r.seq for r in j.read_after(2)] == [3]
    j.close()
    j, report = open_journal(tmp_path, segment_bytes=1024)
    assert [(r.seq, r.payload) for r in j.read_after(2)] == [(3, session_payload(3))]


def test_seq_of_a_published_unsynced_aggregate_is_not_reused(tmp_path):
    """Power lost after an aggregate was written and published but before its batched
    fsync (sync_interval_s) and before the cursor was saved: the record after the restart
    (here a session record) must not get the lost aggregate's seq, or the consumer that
    saw the aggregate drops the session record as a redelivery."""
    clock = Clock()
    j, _ = open_journal(tmp_path, clock=clock)
    tracker = SequenceTracker()
    assert j.append(SESSION, session_payload(1)) == 1  # fsync'ed
    (name,) = segment_names(tmp_path)
    synced_size = os.path.getsize(tmp_path / name)
    assert j.append(AGGREGATE, aggregate_payload(2)) == 2  # written, not yet fsync'ed
    # The forwarder publishes only what is on disk: the session record, not the aggregate.
    published = [r for r in j.read_after(0) if r.seq <= j.publishable_seq()]
    assert [r.seq for r in published] == [1]
    for record in published:
        assert tracker.accept("st", record.seq)
    j._close_handle()
    os.truncate(tmp_path / name, synced_size)  # power loss: the unsynced tail is gone
    j, _ = open_journal(tmp_path, clock=clock)
    seq = j.append(SESSION, session_payload(3))
    assert tracker.accept("st", seq), "session record seq %d dropped by the consumer as a duplicate" % seq


def test_full_disk_while_folding_aggregates_does_not_raise(tmp_path):
    """At its bound on a disk that refuses writes, appending an aggregate raises the
    disk_error alarm (or refuses the aggregate) instead of raising OSError."""
    alarms = []
    fs = FlakyFS(str(tmp_path))
    j, _ = open_journal(tmp_path, fs=fs, alarms=alarms, max_bytes=6000, reserve_bytes=2000,
                        segment_bytes=1024)
    n = 0
    while j.total_bytes + len(aggregate_payload(n)) + 27 <= 4000:
        assert j.append(AGGREGATE, aggregate_payload(n)) is not None
        n += 1
    fs.failing = True  # the next aggregate needs a fold, and the fold needs a write
    try:
        j.append(AGGREGATE, aggregate_payload(n))
    except OSError as error:
        pytest.fail("append raised %r" % error)
    assert ("disk_error", True) in alarms


def test_journal_full_is_raised_once_and_only_when_nothing_is_left_to_fold(tmp_path):
    """Events and aggregates alternating: journal_full goes off once, when the aggregates
    are all folded and one is refused — not before, and not on/off/on."""
    alarms = []
    j, _ = open_journal(tmp_path, alarms=alarms, max_bytes=6000, reserve_bytes=2000, segment_bytes=1024)
    for n in range(200):
        if n % 2:
            j.append(EVENT, event_payload(n, pad=40))
        elif j.append(AGGREGATE, aggregate_payload(n)) is None:
            break
    else:
        pytest.fail("no aggregate was refused")
    assert alarms == [("journal_full", True)]


# -- the offline tool -------------------------------------------------------------------------


def run_tool(*argv):
    """(exit status, stdout, stderr) of journal_tool.main in-process."""
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = journal_tool.main(list(argv), out=out)
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def _damaged_journal(root):
    """A closed journal of three segments: cursor at 3, seq 5 damaged in the middle of the
    middle segment (which also ends in 4 stray bytes), and a torn tail on the last one."""
    clock = Clock()
    j, _ = open_journal(root, clock=clock, segment_bytes=700)
    for n in range(1, 9):
        clock.advance(10)
        rtype = (SESSION, EVENT, AGGREGATE, AGGREGATE)[n % 4]
        j.append(rtype, json.dumps({"seq": n, "n": n, "pad": "x" * 150}).encode())
    j.close()
    with open(os.path.join(root, journal.CURSOR_FILE), "w") as handle:
        json.dump({"acked": 3}, handle)
    records = disk_records(root)
    victim = records[4][0]
    assert [r.seq for r, _ in records if r.segment == victim.segment] == [4, 5, 6]
    path = os.path.join(root, victim.segment)
    data = bytearray(open(path, "rb").read())
    data[victim.offset + journal.HEADER_BYTES] ^= 0x40
    with open(path, "wb") as handle:
        handle.write(bytes(data) + journal.MAGIC + b"\x00\x00")
    last = segment_names(root)[-1]
    with open(os.path.join(root, last), "ab") as handle:
        handle.write(encode_record(EVENT, 9, 0, b'{"seq": 9}')[:20])
    return victim


def test_tool_stats_reports_everything_and_changes_nothing(tmp_path):
    """stats counts segments, records by type, bytes, seq range, cursor and backlog, and
    reports the torn tail and the damaged stretch — while stats, dump, verify and export
    leave every file exactly as it was (no cut, no rewrite, no new file)."""
    _damaged_journal(tmp_path)
    before = snapshot(tmp_path)
    status, out, _ = run_tool("--dir", str(tmp_path), "stats", "--json")
    assert status == 0
    stats = json.loads(out)
    assert stats["records"] == 7 and stats["first_seq"] == 1 and stats["last_seq"] == 8
    assert stats["records_by_type"] == {"session": 2, "event": 1, "aggregate": 4}
    assert stats["acked"] == 3 and stats["cursor"] == "ok"
    assert stats["backlog"] == 4 and stats["backlog_seq"] == [4, 8]
    assert stats["segments"] == len(segment_names(tmp_path)) >= 2
    assert stats["bytes"] == sum(os.path.getsize(tmp_path / n) for n in segment_names(tmp_path))
    assert len(stats["damaged"]) == 1 and len(stats["torn_tail"]) == 2
    assert {t["bytes"] for t in stats["torn_tail"]} == {4, 20}
    status, text, _ = run_tool("stats", "--dir", str(tmp_path))
    assert status == 0 and "torn tail: 20 bytes" in text and "acknowledged: 3" in text
    assert "records: 7 (session 2, event 1, aggregate 4, summary 0)" in text
    for argv in (["dump"], ["verify"], ["export", "--since", "1"]):
        run_tool("--dir", str(tmp_path), *argv)
    assert snapshot(tmp_path) == before


def test_tool_dump_and_export_filter_records(tmp_path):
    """dump prints JSON lines (seq, type name, time, payload) filtered by --type and
    --from-seq; export prints the records since a seq or an ISO time."""
    clock = Clock()
    j, _ = open_journal(tmp_path, clock=clock)
    for n in range(1, 11):
        clock.advance(60)
        j.append((SESSION, EVENT, AGGREGATE)[n % 3], json.dumps({"seq": n, "n": n}).encode())
    j.close()
    status, out, _ = run_tool("--dir", str(tmp_path), "dump")
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [line["seq"] for line in lines] == list(range(1, 11))
    assert lines[0]["type"] == "event" and lines[0]["payload"] == {"seq": 1, "n": 1}
    assert lines[0]["time"] == iso_utc(EPOCH + 1000 + 60)
    _, out, _ = run_tool("--dir", str(tmp_path), "dump", "--type", "session", "--type", "event",
                         "--from-seq", "4")
    assert [(x["seq"], x["type"]) for x in map(json.loads, out.splitlines())] == [
        (4, "event"), (6, "session"), (7, "event"), (9, "session"), (10, "event")]
    _, out, _ = run_tool("--dir", str(tmp_path), "export", "--since", "8")
    assert [json.loads(line)["message"]["n"] for line in out.splitlines()] == [8, 9, 10]
    since = iso_utc(EPOCH + 1000 + 60 * 7)
    _, out, _ = run_tool("--dir", str(tmp_path), "export", "--since", since)
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [7, 8, 9, 10]
    _, out, _ = run_tool("--dir", str(tmp_path), "export", "--since", "2999-01-01")
    assert out == ""


def test_tool_verify_reports_damage_and_gaps_but_accepts_summaries(tmp_path):
    """verify exits 1 with one line per problem (the damaged stretch, torn tails, the
    missing seq) and exits 0 on a compacted journal whose gaps summaries account for."""
    victim = _damaged_journal(tmp_path / "bad")
    status, out, err = run_tool("--dir", str(tmp_path / "bad"), "verify")
    lines = out.splitlines()
    assert status == 1 and "4 problem(s)" in err
    assert sum("not a valid record" in line for line in lines) == 1
    assert sum("torn tail" in line for line in lines) == 2
    assert [line for line in lines if "missing" in line] == [
        "seq %d missing between %d and %d (not covered by a summary record)"
        % (victim.seq, victim.seq - 1, victim.seq + 1)]

    good = tmp_path / "good"
    j, _ = open_journal(good, max_bytes=8000, reserve_bytes=2000, segment_bytes=1200)
    outbox = Outbox(None, "st-1", j)
    for n in range(80):
        outbox.record(EVENT if n % 9 == 0 else AGGREGATE,
                      json.loads(aggregate_payload(n)) if n % 9 else {"type": "x", "n": n})
    j.close()
    assert any(r.type == SUMMARY for r, _ in disk_records(good))
    status, out, _ = run_tool("--dir", str(good), "verify")
    assert status == 0, out
    assert out.startswith("journal verify: ok; ")


def test_tool_errors_are_one_clear_line(tmp_path):
    """A missing directory, a broken board file, an unreadable segment, bad arguments:
    exit status 2 and one line on stderr naming the problem — no traceback."""
    cases = [
        (["--dir", str(tmp_path / "nope"), "stats"], "does not exist"),
        (["stats"], "give --dir"),
        (["--board", str(tmp_path / "missing.json"), "stats"], "cannot read board file"),
        (["--dir", str(tmp_path), "dump", "--from-seq", "-3"], "--from-seq"),
        (["--dir", str(tmp_path), "dump", "--type", "telemetry"], "--type"),
        (["--dir", str(tmp_path), "export", "--since", "yesterday"], "neither a sequence number"),
        (["--dir", str(tmp_path), "export"], "--since"),
        (["--dir", str(tmp_path), "verify", "--key", "00ff"], "key argument"),
        (["--dir", str(tmp_path / "seg"), "stats"], "cannot read"),
        (["--dir", str(tmp_path / "file"), "stats"], "not a directory"),
    ]
    os.makedirs(tmp_path / "seg" / journal.segment_name(1))  # a segment that cannot be read
    (tmp_path / "file").write_text("x")
    for argv, words in cases:
        status, out, err = run_tool(*argv)
        assert status == 2, argv
        assert out == "" and len(err.strip().splitlines()) == 1 and words in err, (argv, err)
        assert "Traceback" not in err


def test_tool_takes_the_directory_from_the_board_file(tmp_path):
    """--board uses the board's journal.dir; --dir wins over it."""
    j, _ = open_journal(tmp_path / "journal")
    j.append(EVENT, b'{"seq": 1}')
    j.close()
    with open(os.path.join(ROOT, "boards", "sim.json")) as handle:
        board = json.load(handle)
    board["journal"] = {"dir": str(tmp_path / "journal")}
    (tmp_path / "board.json").write_text(json.dumps(board))
    status, out, _ = run_tool("--board", str(tmp_path / "board.json"), "stats", "--json")
    assert status == 0 and json.loads(out)["records"] == 1
    os.makedirs(tmp_path / "empty")
    status, out, _ = run_tool("--board", str(tmp_path / "board.json"), "stats", "--json",
                              "--dir", str(tmp_path / "empty"))
    assert status == 0 and json.loads(out)["records"] == 0


if __name__ == "__main__" and sys.argv[1:2] == ["fsize-scenario"]:
    # Run by test_real_disk_full under RLIMIT_FSIZE when tmpfs cannot be mounted.
    def _lift():
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    print(json.dumps(_fill_disk_scenario(sys.argv[2], _lift, segment_bytes=1 << 20)))


def test_alarm_listener_that_journals_events_never_duplicates_a_seq(tmp_path):
    """The agent journals an event for every alarm, from inside the alarm callback. An
    alarm raised in the middle of an append (journal_full while folding, disk_error while
    writing) must not let that event take the sequence number the append is about to use."""
    holder = {}
    events = []

    def on_alarm(name, active, values):
        events.append((name, active))
        holder["journal"].append(EVENT, event_payload(len(events)))  # as Agent.on_journal_alarm does

    fs = FlakyFS(str(tmp_path))
    j = Journal(fs, dict(CONFIG, max_bytes=6000, reserve_bytes=2000, segment_bytes=1024), Clock(), on_alarm)
    holder["journal"] = j
    j.recover()
    for n in range(120):
        j.append(SESSION if n % 3 == 0 else EVENT, session_payload(n, pad=60))
        if n == 80:
            fs.failing = True  # disk_error from here on, records kept in memory
    fs.failing = False
    assert j.retry_pending()
    j.close()
    assert ("journal_full", True) in events and ("disk_error", True) in events
    seqs = [r.seq for r, _ in disk_records(tmp_path)]
    assert seqs == list(range(1, len(seqs) + 1))  # unique and gapless on disk
    assert len(seqs) == j.next_seq - 1


# -- one verifier, one wording: the console and evse-journal ---------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(min_value=3, max_value=120),
       flips=st.lists(st.tuples(st.floats(min_value=0, max_value=1, exclude_max=True),
                                st.integers(min_value=0, max_value=7)), max_size=4),
       cut=st.integers(min_value=0, max_value=40))
def test_console_and_tool_report_a_damaged_journal_in_the_same_words(tmp_path, count, flips, cut):
    """Whatever damage a journal holds (bit flips anywhere, a cut tail, folded aggregates),
    the console's ``journal verify`` and ``evse-journal verify`` run the same check and
    print the same lines: the problems (the console at most 20), then the same summary."""
    root = tmp_path / "journal"
    shutil.rmtree(str(root), ignore_errors=True)
    j, _ = open_journal(root, max_bytes=8000, reserve_bytes=2000, segment_bytes=1200)
    outbox = Outbox(None, "st-1", j)
    for n in range(count):
        outbox.record(EVENT if n % 9 == 0 else AGGREGATE,
                      json.loads(aggregate_payload(n)) if n % 9 else {"type": "x", "n": n})
    j.sync()
    names = segment_names(root)
    sizes = [os.path.getsize(root / name) for name in names]
    for where, bit in flips:
        at = int(where * sum(sizes))
        for name, size in zip(names, sizes):
            if at < size:
                data = bytearray((root / name).read_bytes())
                data[at] ^= 1 << bit
                (root / name).write_bytes(bytes(data))
                break
            at -= size
    last = root / names[-1]
    last.write_bytes(last.read_bytes()[:max(0, sizes[-1] - cut)])

    status, out, err = run_tool("--dir", str(root), "verify")
    problems = out.splitlines()
    if status == 0:
        summary = problems.pop()
    else:
        assert status == 1 and err.startswith("evse-journal: ") and err.endswith(" (%s)\n" % root), err
        summary = err[len("evse-journal: "):-len(" (%s)\n" % root)]
    assert summary.startswith("journal verify: ")

    config = validate({"station_id": "st-1", "meter": {"model": "sdm630", "port": "/dev/null"}})
    agent = SimpleNamespace(config=config, clock=j.clock, outbox=outbox, engine=None, monitor=None, forwarder=None)
    stream = ConsoleCapture()
    console = Console(agent, stream)
    asyncio.run(console._line("journal verify", None))
    shown = stream.data.decode()
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    expected = problems[:20] + (["... and %d more" % (len(problems) - 20)] if len(problems) > 20 else [])
    assert re.sub(r"\n  (?=\S)", " ", shown).splitlines() == expected + [summary]
    j.close()


class ConsoleCapture:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data.extend(data)
