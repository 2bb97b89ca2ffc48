"""Fleet side of promise 2: de-duplication and gap detection by seq (tools/collector/consumer), fed
by a real journal; and the journal tool's ``verify`` on journals holding real signed OCMF
documents (promise 1: a changed signed reading is caught even when its frame's CRC is
made to match).
"""

import json
import os
import random
import subprocess
import sys

import pytest

from evse_agent import journal
from evse_agent.forwarder import Forwarder
from evse_agent.journal import AGGREGATE, EVENT, SESSION, SUMMARY, Journal, encode_record, scan
from evse_agent.messages import Outbox, Topics, iso_utc
from evse_agent.ocmf import OcmfReading, build_payload, sign_document
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_tools.cli import journal_tool
from evse_tools.collector.consumer import SequenceTracker
from test_journal import EPOCH, Clock

CONFIG = {"max_bytes": 1 << 20, "reserve_bytes": 4096, "segment_bytes": 64 * 1024,
          "sync_interval_s": 30.0, "cursor_sync_s": 5.0}
TOOL = os.path.join(os.path.dirname(sys.executable), "evse-journal")


def open_journal(root, clock=None, **config):
    j = Journal(FileSystem(str(root)), dict(CONFIG, **config), clock or Clock())
    j.recover()
    return j


def aggregate_doc(n):
    power = 1000 + (n * 53) % 700
    return {"kind": "aggregate", "start": iso_utc(EPOCH + 10 * n), "end": iso_utc(EPOCH + 10 * n + 10),
            "samples": 10, "power_total_w": {"min": power - 5, "avg": power, "max": power + 5}}


# -- SequenceTracker on its own -------------------------------------------------------------


def test_redeliveries_are_dropped():
    """The first copy of a (station, seq) is accepted, every later copy is not."""
    tracker = SequenceTracker()
    assert [tracker.accept("st", seq) for seq in (1, 2, 2, 1, 3, 3)] == [True, True, False, False, True, False]
    state = tracker.stations["st"]
    assert (state.accepted, state.duplicates) == (3, 3)
    assert tracker.gaps("st") == [] and tracker.highest("st") == 3


def test_out_of_order_arrival_fills_gaps():
    """Records arriving out of order are each accepted once; the gap they leave is
    reported until the missing one arrives."""
    tracker = SequenceTracker()
    assert tracker.accept("st", 3)
    assert tracker.gaps("st") == [(1, 2)]
    assert tracker.accept("st", 1)
    assert tracker.gaps("st") == [(2, 2)]
    assert tracker.accept("st", 2)
    assert tracker.gaps("st") == []
    assert not tracker.accept("st", 3)


def test_gaps_are_reported_as_ranges():
    """Missing seqs below the highest seen come back as (first, last) ranges."""
    tracker = SequenceTracker()
    for seq in (1, 2, 5, 6, 9, 12):
        tracker.accept("st", seq)
    assert tracker.gaps("st") == [(3, 4), (7, 8), (10, 11)]
    assert tracker.highest("st") == 12
    tracker.accept("st", 4)
    assert tracker.gaps("st") == [(3, 3), (7, 8), (10, 11)]


def test_summary_covers_seq_closes_the_gap_it_explains():
    """A summary record accounts for the aggregates it folded: their seqs are no gap, and
    a late copy of one of them is dropped."""
    tracker = SequenceTracker()
    assert tracker.accept("st", 1)
    assert tracker.accept("st", 7, {"kind": "summary", "covers_seq": [[2, 7]]})
    assert tracker.gaps("st") == []
    assert not tracker.accept("st", 4, {"kind": "aggregate"})
    assert tracker.accept("st", 9)
    assert tracker.gaps("st") == [(8, 8)]
    assert tracker.accept_message({"station": "st", "seq": 12, "kind": "summary", "covers_seq": [[8, 12]]})
    assert tracker.gaps("st") == [] and tracker.highest("st") == 12


def test_stations_are_independent():
    """The same seq from two stations is two records; gaps and duplicates are per station."""
    tracker = SequenceTracker()
    for station, seq in (("a", 1), ("b", 1), ("a", 2), ("b", 5), ("a", 5), ("a", 2)):
        tracker.accept(station, seq)
    assert tracker.gaps("a") == [(3, 4)] and tracker.gaps("b") == [(2, 4)]
    assert tracker.stations["a"].duplicates == 1 and tracker.stations["b"].duplicates == 0
    assert tracker.highest("a") == 5 and tracker.highest("c") == 0 and tracker.gaps("c") == []


def test_live_messages_pass_through_untracked():
    """Messages without seq (live telemetry, state) are always passed and not counted."""
    tracker = SequenceTracker()
    assert tracker.accept_message({"station": "st", "journal_seq": 4, "power_total_w": 11000})
    assert tracker.accept_message("not a dict")
    assert tracker.stations == {}


def test_summary_does_not_swallow_a_session_record_inside_its_range(tmp_path):
    """A segment holding aggregates around a session record (seq 3) is folded: the summary
    (covers 1..N, N > 3) and the session record are both published. If the summary
    arrives first, the session record must still be accepted."""
    j = open_journal(tmp_path, max_bytes=5000, reserve_bytes=1000, segment_bytes=1024)
    outbox = Outbox(None, "st", j)
    for n, kind in enumerate(("aggregate", "aggregate", "session", "aggregate")):
        outbox.record(SESSION if kind == "session" else AGGREGATE,
                      {"event": "end", "session_id": "s1"} if kind == "session" else aggregate_doc(n))
    n = 4
    while not any(r.type == SUMMARY for r in j.read_after(0, 1000)):
        outbox.record(AGGREGATE, aggregate_doc(n))
        n += 1
    records = j.read_after(0, 1000)
    summary = json.loads(records[1].payload)
    assert records[0].seq == 3 and records[0].type == SESSION and records[1].type == SUMMARY
    runs = summary["covers_seq"]
    assert runs[0][0] < 3 < runs[-1][1]  # the summary spans the session record's seq ...
    assert not any(first <= 3 <= last for first, last in runs)  # ... without covering it
    tracker = SequenceTracker()
    assert tracker.accept_message(summary)
    assert tracker.accept_message(json.loads(records[0].payload)), "session record seq 3 dropped"


# -- SequenceTracker fed by a real journal ------------------------------------------------------


def test_journal_replayed_with_redeliveries_and_reordering_has_no_gaps(tmp_path):
    """Every record of a journal, delivered in shuffled order with QoS 1 redeliveries and a
    replay from an old cursor after a restart: each accepted exactly once, no gaps."""
    clock = Clock()
    j = open_journal(tmp_path, clock=clock, segment_bytes=2048)
    outbox = Outbox(None, "st-7", j)
    for n in range(120):
        clock.advance(10)
        rtype = (SESSION, EVENT, AGGREGATE, AGGREGATE)[n % 4]
        outbox.record(rtype, aggregate_doc(n) if rtype == AGGREGATE else {"n": n})
    published = [json.loads(r.payload) for r in j.read_after(0, 1000)]
    assert [m["seq"] for m in published] == list(range(1, 121))
    rng = random.Random(7)
    deliveries = published + rng.sample(published, 40) + published[50:]  # redeliveries, replay
    rng.shuffle(deliveries)
    tracker = SequenceTracker()
    accepted = [m for m in deliveries if tracker.accept_message(m)]
    assert sorted(m["seq"] for m in accepted) == list(range(1, 121))
    assert tracker.gaps("st-7") == [] and tracker.stations["st-7"].duplicates == len(deliveries) - 120


class FakeBroker:
    """Publisher port: delivers every publish to ``deliver``; PUBACKs only while online.
    Offers both acknowledgement styles a forwarder may ask for (per token, or drained)."""

    def __init__(self, deliver):
        self.deliver = deliver
        self.online = True
        self.tokens = 0
        self.unacked = set()
        self.undrained = set()

    def publish(self, topic, payload, qos, retain):
        self.tokens += 1
        self.deliver(json.loads(payload))
        if not self.online:
            self.unacked.add(self.tokens)
        self.undrained.add(self.tokens)
        return self.tokens

    def take_acked(self, token):
        return token not in self.unacked

    def drain_acked(self):
        acked = sorted(self.undrained - self.unacked)
        self.undrained -= set(acked)
        return acked


def test_forwarded_journal_with_folded_aggregates_leaves_no_gap(tmp_path):
    """Journal -> Forwarder -> consumer through an outage long enough that aggregates are
    folded into summaries, then a crash (cursor saved only every 60 s) and a restart that
    replays from the saved cursor: the consumer sees redeliveries but no gap, and every
    session record and event exactly once."""
    clock = Clock()
    settings = dict(max_bytes=9000, reserve_bytes=2000, segment_bytes=1200, cursor_sync_s=60.0)
    tracker = SequenceTracker()
    durable_seen = []

    def deliver(message):
        if tracker.accept_message(message) and message.get("kind") not in ("aggregate", "summary"):
            durable_seen.append(message["seq"])

    broker = FakeBroker(deliver)
    topics = Topics("evse", "st-9")
    durable = []
    dropped = 0
    for life, steps in enumerate((range(0, 125), range(125, 160))):
        j = open_journal(tmp_path, clock=clock, **settings)  # the second life: after a crash
        outbox = Outbox(None, "st-9", j)
        forwarder = Forwarder(j, broker, topics, clock, window=4)
        for n in steps:
            clock.advance(10)
            if n == 30:
                broker.online = False  # outage: nothing is acknowledged, the forwarder stalls
            if n == 110:
                broker.online = True
                broker.unacked.clear()  # reconnected: the in-flight ones are PUBACK'ed
            if n % 7 == 3:
                durable.append(outbox.record(SESSION if n % 2 else EVENT, {"n": n}))
            else:
                outbox.record(AGGREGATE, aggregate_doc(n))
            forwarder.pump()
            j.tick(clock.monotonic_ms())
        j.sync()  # the last aggregates reach the disk and are published and acknowledged ...
        forwarder.pump()  # ... but the cursor is saved only every 60 s: the crash comes first
        dropped += j.dropped_records
    j.sync()  # aggregates are published once on disk
    while forwarder.sent_up_to < j.next_seq - 1 or forwarder.inflight:
        forwarder.pump()
    assert dropped > 0  # the outage made the journal fold aggregates
    assert tracker.stations["st-9"].duplicates > 0  # the restart replayed acknowledged records
    assert tracker.gaps("st-9") == []
    assert tracker.highest("st-9") == j.next_seq - 1
    assert sorted(durable_seen) == sorted(durable) and len(durable_seen) == len(set(durable_seen))


# -- verify with real OCMF documents --------------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return FileKeySigner(str(tmp_path_factory.mktemp("keys") / "station-key.pem"))


def signed_session(signer, number, begin_wh, end_wh, begin_t):
    """The 'end' session record of one charging session with its two signed documents."""
    def document(page, reading):
        payload = build_payload("evse-agent", "EVSE-STATION-7", "0.1.0", "T%d" % page, "Eastron",
                                "SDM630", "SDM-0042", [reading])
        return sign_document(payload, signer)

    begin = document(2 * number, OcmfReading(begin_t, True, "B", begin_wh))
    end = document(2 * number + 1, OcmfReading(begin_t + 3600, True, "E", end_wh))
    return {"event": "end", "session_id": "S-%d" % number, "ts": iso_utc(begin_t + 3600),
            "energy_wh": end_wh - begin_wh, "ocmf_begin": begin, "ocmf_end": end,
            "ocmf_documents": [begin, end]}


def signed_journal(root, signer):
    """A closed journal (via the Outbox, as the agent writes it) with three signed
    sessions among events and aggregates; returns the session records' seqs."""
    clock = Clock()
    j = open_journal(root, clock=clock, segment_bytes=2048)
    outbox = Outbox(None, "EVSE-STATION-7", j)
    sessions = []
    meter = 12345678
    for n in range(30):
        clock.advance(10)
        if n % 10 == 5:
            doc = signed_session(signer, n, meter, meter + 7000 + n, clock.time())
            meter += 7000 + n
            sessions.append(outbox.record(SESSION, doc))
        elif n % 10 == 7:
            outbox.record(EVENT, {"type": "voltage_low", "values": {"v": 199.5}})
        else:
            outbox.record(AGGREGATE, aggregate_doc(n))
    j.close()
    return sessions


def tamper_one_byte(root, seq):
    """Change one byte of the end OCMF document inside session record ``seq`` (its reading
    value) and re-frame the record with a correct CRC, in place."""
    for name in sorted(os.listdir(root)):
        if not name.startswith(journal.SEGMENT_PREFIX):
            continue
        path = os.path.join(root, name)
        data = open(path, "rb").read()
        for record in scan(data)[0]:
            if record.seq != seq:
                continue
            body = json.loads(record.payload)
            assert json.dumps(body).encode() == record.payload  # re-serialising changes nothing
            document = body["ocmf_documents"][1]
            at = document.index('"RV":') + len('"RV":') + 3
            changed = "0" if document[at] != "0" else "1"
            body["ocmf_documents"][1] = document[:at] + changed + document[at + 1:]
            payload = json.dumps(body).encode()
            assert len(payload) == len(record.payload)
            assert sum(a != b for a, b in zip(payload, record.payload)) == 1
            frame = encode_record(record.type, record.seq, record.time_ms, payload)
            data = data[:record.offset] + frame + data[record.offset + record.size:]
            with open(path, "wb") as handle:
                handle.write(data)
            records, torn, corrupt = scan(data)
            assert torn is None and corrupt == 0 and any(r.payload == payload for r in records)
            return
    raise AssertionError("no record seq %d" % seq)


def test_verify_passes_on_a_journal_with_signed_sessions(tmp_path, signer):
    """The evse-journal console script verifies every frame, the sequence and every OCMF
    document (public key as PEM file); exit 0 and a one-line summary."""
    sessions = signed_journal(tmp_path / "journal", signer)
    assert len(sessions) == 3
    pem = tmp_path / "station.pem"
    pem.write_text(signer.public_key_pem())
    result = subprocess.run([TOOL, "--dir", str(tmp_path / "journal"), "verify", "--key", str(pem)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ("journal verify: ok; 30 record(s) in %d segment(s), seq 1..30, "
                             "6 OCMF signature(s) verified\n") % len(
        [n for n in os.listdir(tmp_path / "journal") if n.startswith("seg-")])
    status = journal_tool.main(["--dir", str(tmp_path / "journal"), "verify", "--key", signer.public_key_hex()])
    assert status == 0


def test_verify_catches_one_changed_byte_in_a_signed_document(tmp_path, signer, capsys):
    """One byte of a signed reading changed inside a session record whose frame CRC was
    recomputed: only the signature check can catch it, and verify does — exit 1, one
    line naming the record and the document."""
    root = tmp_path / "journal"
    sessions = signed_journal(root, signer)
    tamper_one_byte(str(root), sessions[1])
    result = subprocess.run([TOOL, "--dir", str(root), "verify", "--key", signer.public_key_hex()],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("seq %d (session, " % sessions[1])
    assert "ocmf_documents[1]: signature INVALID" in lines[0]
    assert "1 problem(s)" in result.stderr
    # without the key the documents are not silently taken as good
    assert journal_tool.main(["--dir", str(root), "verify"]) == 1
    assert "OCMF document(s) in session records not checked" in capsys.readouterr().out
