"""Storage faults do not rewrite history: real files, a real small tmpfs, the agent as a process.

- A bit flip in the final journal record (fsync'ed, maybe published) is quarantined and
  reported, never cut as torn; its seq is never issued again; ``evse-journal verify`` says so.
- Garbage or missing counters and open-session files are recovered from the journal (and the
  counters' second copy): numbering and OCMF pages never repeat, the running session ends
  with its exact energy.
- Journal and state on one full file system: the agent keeps running and raises disk_error.
"""

import io
import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import mounted_tmpfs
from evse_agent import journal as journal_mod
from evse_agent.journal import EVENT, SESSION, Journal
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.store import COUNTERS, OPEN_SESSION, StateStore
from evse_tools.cli import journal_tool

CONFIG = {"max_bytes": 1 << 20, "reserve_bytes": 4096, "segment_bytes": 64 * 1024,
          "sync_interval_s": 30.0, "cursor_sync_s": 5.0}


class Clock:
    def __init__(self):
        self.mono = 1000
        self.wall = 1_750_000_000.0

    def monotonic_ms(self):
        return self.mono

    def time(self):
        return self.wall


def open_journal(root):
    j = Journal(FileSystem(str(root)), CONFIG, Clock())
    return j, j.recover()


def payload(n):
    return json.dumps({"event": "end", "session_id": "s-%06d" % n, "energy_wh": 1000 + n, "seq": n}).encode()


# Byte offsets of a frame: magic 0-1, length 2-5, type 6, seq 7-14, time 15-22, payload, CRC.
# A flip that makes the length larger is indistinguishable from a torn write (the file ends
# inside the frame it announces): those four bytes are left out here, as the README says.
@settings(max_examples=40, deadline=None)
@given(records=st.integers(min_value=1, max_value=6), where=st.data(), bit=st.integers(0, 7))
def test_bit_flip_in_the_final_record_is_quarantined_and_its_seq_never_reissued(tmp_path_factory, records,
                                                                                 where, bit):
    root = tmp_path_factory.mktemp("journal")
    j, _ = open_journal(root)
    for n in range(1, records + 1):
        assert j.append(SESSION, payload(n)) == n  # durable: fsync'ed before append returns
    j.close()
    (name,) = [n for n in os.listdir(root) if n.startswith("seg-")]
    path = root / name
    data = bytearray(path.read_bytes())
    frame = len(journal_mod.encode_record(SESSION, records, 0, payload(records)))
    start = len(data) - frame
    offset = where.draw(st.sampled_from([i for i in range(frame) if not 2 <= i <= 5]))
    data[start + offset] ^= 1 << bit
    path.write_bytes(bytes(data))

    out = io.StringIO()
    assert journal_tool.main(["--dir", str(root), "verify"], out=out) == 1
    assert "damaged final record" in out.getvalue(), out.getvalue()

    j, report = open_journal(root)
    assert report.torn_bytes == 0
    kinds = [kind for kind, _ in j.damage]
    assert kinds == ["journal_damaged"]
    values = j.damage[0][1]
    assert values["bytes"] == frame and values["quarantined"].startswith(journal_mod.QUARANTINE_PREFIX)
    assert (root / values["quarantined"]).read_bytes() == bytes(data[start:])
    assert [r.seq for r in j.read_after(0)] == list(range(1, records))
    new_seq = j.append(EVENT, None, lambda seq: json.dumps({"type": "x", "seq": seq}).encode())
    assert new_seq > records  # the damaged record's seq is not given to another record
    j.close()

    out = io.StringIO()
    assert journal_tool.main(["--dir", str(root), "verify"], out=out) == 1
    text = out.getvalue()
    assert "was quarantined" in text, text
    if offset >= 15:  # the header's magic and seq are intact unless the flip hit them
        assert "seq %d by its header" % records in text, text


def test_next_seq_comes_from_the_durable_mark_when_the_damaged_header_is_not_believable(tmp_path):
    """A flip in the seq field itself: the next seq comes from the mark of what was issued."""
    j, _ = open_journal(tmp_path)
    for n in range(1, 4):
        j.append(SESSION, payload(n))
    j.close()
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith("seg-")]
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    frame = len(journal_mod.encode_record(SESSION, 3, 0, payload(3)))
    data[len(data) - frame + 7] ^= 0x80  # the seq's top bit: seq 2^63 + 3 by the header
    path.write_bytes(bytes(data))
    j, _ = open_journal(tmp_path)
    assert j.damage[0][1]["seq"] == (1 << 63) + 3
    assert j.append(EVENT, b"{}") == journal_mod.SEQ_RESERVE + 1  # past every seq ever reserved
    j.close()


def _store_with_journal(tmp_path):
    state = FileSystem(str(tmp_path / "state"))
    jfs = FileSystem(str(tmp_path / "journal"))
    return state, jfs


def test_garbage_counters_take_the_journal_and_the_second_copy(tmp_path):
    """counters.json garbage in both places: the journal's session records and events set
    the floor, so session numbers, OCMF pages and event numbers never repeat."""
    state, jfs = _store_with_journal(tmp_path)
    store = StateStore(state, jfs)
    for _ in range(7):
        store.next_number("session")
    for _ in range(12):
        store.next_number("transaction_page")
    j = Journal(jfs, CONFIG, Clock())
    j.recover()
    doc = {"event": "end", "session_id": "st-1-000007", "segments": 1,
           "ocmf_documents": ['OCMF|{"PG":"T12","RD":[]}|{}', 'OCMF|{"PG":"F3","RD":[]}|{}']}
    j.append(SESSION, json.dumps(doc).encode())
    j.append(EVENT, json.dumps({"event_number": 41, "type": "power_drop"}).encode())
    j.close()

    state.write_atomic(COUNTERS, b"\x00garbage{")
    store = StateStore(state, jfs)  # the second copy alone
    assert store.counters["session"] == 7 and store.counters["transaction_page"] == 12
    jfs.write_atomic(COUNTERS, b'{"session": "x"}')
    state.write_atomic(COUNTERS, b"[1, 2")
    store = StateStore(state, jfs)
    assert store.counters["session"] == 0
    j = Journal(jfs, CONFIG, Clock())
    j.recover()
    store.recover_from_journal(j)
    assert store.next_number("session") == 8
    assert store.next_number("transaction_page") == 13
    assert store.next_number("fiscal_page") == 4
    assert store.next_number("event") == 42
    assert [kind for kind, _ in store.damage] == ["state_damaged", "state_damaged"]


# -- the agent as a process ------------------------------------------------------------------

def _ocmf_pages(record):
    return [json.loads(d.split("|")[1])["PG"] for d in record["ocmf_documents"]]


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_damaged_state_files_are_recovered_from_the_journal(broker, collector, meter_sim, agent_process,
                                                            station_dir, damage):
    """Killed mid-session, then counters.json (both copies) and open-session.json are garbage,
    or the whole state directory is gone: the running session ends after the restart with its
    exact energy, the next session gets the next number, no OCMF page repeats, and
    state_damaged events say what happened."""
    from test_sessions import Station, assert_documents_verify, public_key

    st = Station(broker, collector, meter_sim, agent_process, station_dir)

    def charge_until_power(after):
        st.vehicle.charge()
        assert collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.received > after
                                  and (m.body["power_total_w"] or 0) > 1000), st.agent.log()

    def stop_and_unplug(after):
        st.vehicle.pause()
        assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.received > after
                                  and not m.body["charging"]), st.agent.log()
        st.vehicle.unplug()

    st.vehicle.plug()
    first_begin = st.session_message("begin")
    charge_until_power(first_begin.received)
    stop_and_unplug(first_begin.received)
    first_end = st.session_message("end")

    begin_wh = st.register_wh()
    st.vehicle.plug()
    begin = st.session_message("begin", after=first_end.received)
    assert begin.body["begin"]["energy_wh"] == begin_wh
    charge_until_power(begin.received)
    st.agent.kill()
    state_dir = station_dir / "state"
    (station_dir / "journal" / COUNTERS).write_bytes(b'{"session": -1}')
    if damage == "garbage":
        (state_dir / COUNTERS).write_bytes(b"\x00\x13garbage")
        (state_dir / OPEN_SESSION).write_bytes(b'{"id": "sim-001-00')
    else:
        shutil.rmtree(state_dir)
    restarted_at = collector.messages[-1].received
    st.agent = st.start_agent()
    damaged = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "state_damaged"
                                 and m.body["values"]["file"] == OPEN_SESSION
                                 and m.body["values"]["error"] == "rebuilt from the journal")
    assert damaged is not None, st.agent.log()
    stop_and_unplug(restarted_at)
    end = collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "end"
                             and m.body["session_id"] == "sim-001-000002")  # replays of session 1 come too
    assert end is not None, st.agent.log()
    end = end.body
    assert begin.body["session_id"] == "sim-001-000002"
    assert {"recovered_from_journal", "agent_restarted"} <= set(end["flags"]), end["flags"]
    assert end["begin"]["energy_wh"] == begin_wh
    assert end["end"]["energy_wh"] == st.register_wh()
    assert end["energy_wh"] == end["register_delta_wh"] == st.register_wh() - begin_wh > 0
    assert_documents_verify(end, public_key(station_dir))

    st.vehicle.plug()
    third = collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "begin"
                               and m.body["session_id"] not in ("sim-001-000001", "sim-001-000002"))
    assert third is not None, st.agent.log()
    third = third.body
    assert third["session_id"] == "sim-001-000003"
    pages = _ocmf_pages(first_end.body) + _ocmf_pages(end) + _ocmf_pages(third)
    assert len(set(pages)) == len(set(_ocmf_pages(first_end.body))) + len(set(_ocmf_pages(end))) + 1, pages
    assert st.agent.stop() == 0
    assert "Traceback" not in st.agent.log()


@pytest.fixture
def shared_tmpfs(station_dir):
    """One 256 KiB tmpfs holding both the journal and the state directory (root only)."""
    with mounted_tmpfs(station_dir / "data", "256k") as path:
        yield path


def _fill(directory):
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError:
                break
        # tmpfs may still take a byte or two in a partial page: take it too.
        for size in (512, 64, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


def test_full_shared_disk_raises_disk_error_and_the_agent_keeps_running(broker, collector, meter_sim,
                                                                        agent_process, station_dir, shared_tmpfs):
    """Journal and state on one full file system: plugging in (a counter, the open session and
    journal records all need the disk) raises disk_error, the session's records still reach
    the broker, and the agent neither crashes nor stops polling; freeing space clears it."""
    from test_sessions import Station

    st = Station(broker, collector, meter_sim, agent_process, station_dir,
                 extra=("--set", "session.state_dir=%s" % (shared_tmpfs / "state"),
                        "--set", "journal.dir=%s" % (shared_tmpfs / "journal"),
                        "--set", "journal.max_bytes=1048576", "--set", "journal.reserve_bytes=65536",
                        "--set", "journal.segment_bytes=65536"))
    filler = _fill(str(shared_tmpfs))
    full_at = collector.messages[-1].received
    st.vehicle.plug()
    alarm = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "disk_error"
                               and m.body["state"] == "active", timeout_s=20)
    assert alarm is not None, st.agent.log()
    start = st.session_message("start", after=full_at)
    assert start.body["session_id"].startswith("sim-001-")
    assert collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.received > alarm.received)
    assert st.agent.alive(), st.agent.log()

    os.remove(filler)
    cleared = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "disk_error"
                                 and m.body["state"] == "cleared", timeout_s=30)
    assert cleared is not None, st.agent.log()
    st.vehicle.unplug()
    st.session_message("end", after=start.received)
    assert st.agent.stop() == 0
    assert "Traceback" not in st.agent.log()


def test_agent_reports_a_damaged_final_record_and_never_reuses_its_seq(broker, collector, meter_sim,
                                                                       agent_process, station_dir):
    """The agent journals and publishes records, stops; a bit flips in the last record on disk
    (published or not: it was fsync'ed). At the next start a journal_damaged event is published
    and no record with that seq (or any earlier one) but other content ever reaches the broker."""
    from test_sessions import Station

    st = Station(broker, collector, meter_sim, agent_process, station_dir,
                 extra=("--set", "journal.aggregate_interval_s=0.2", "--set", "journal.sync_interval_s=0.2"))
    assert collector.wait_for(lambda m: m.topic.endswith("/aggregate") and m.body["seq"] >= 3), st.agent.log()
    assert st.agent.stop() == 0
    journal_dir = station_dir / "journal"
    j = Journal(FileSystem(str(journal_dir)), CONFIG, Clock())
    j.recover()
    last = j.read_after(0, 1 << 20)[-1]
    j.close()
    path = journal_dir / last.segment
    data = bytearray(path.read_bytes())
    data[last.offset + journal_mod.HEADER_BYTES + 2] ^= 0x04  # inside the payload
    path.write_bytes(bytes(data))
    # Seq -> the payload it stands for: what the journal held (the damaged record as written).
    published = {m.body["seq"]: m.payload for m in collector.messages
                 if m.topic.split("/")[-1] in ("aggregate", "event", "session")}
    published[last.seq] = last.payload

    st.agent = st.start_agent()
    damaged = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == "journal_damaged")
    assert damaged is not None, st.agent.log()
    assert damaged.body["values"]["seq"] == last.seq
    assert any(name.startswith(journal_mod.QUARANTINE_PREFIX) for name in os.listdir(journal_dir))
    assert collector.wait_for(lambda m: m.topic.endswith("/aggregate") and m.body["seq"] > last.seq + 2)
    assert st.agent.stop() == 0
    for message in collector.messages:
        if message.topic.split("/")[-1] in ("aggregate", "event", "session") and message.body["seq"] in published:
            assert message.payload == published[message.body["seq"]], "seq %d reused" % message.body["seq"]
    assert "Traceback" not in st.agent.log()
