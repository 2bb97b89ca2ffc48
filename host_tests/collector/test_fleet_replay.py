"""The lighter fleet: records of real agent cores replayed under many station ids.

What a replayed station publishes is what the recorded agent published, with only its
station, seqs, journal_seq and session ids changed, and the collector accepts all of it; a
publisher process holds more connections than paho's select() could; and an MQTT 5
shared-subscription group of collectors (one of them killed and restarted mid-run) stores
every record the broker acknowledged exactly once.
"""

import json

import pytest

from evse_tools.bench.fleet import exactly_once, run_collected
from evse_tools.testkit.broker import Mosquitto
from evse_tools.collector.ingest import Ingestor, Message, parse_record
from evse_tools.collector.store import open_store
from evse_tools.sim.fleet_replay import JOURNALED, REPLAY_FORMAT, ReplayFleet, record
from evse_tools.sim.fleet_sim import FleetSubscriber
from evse_tools.testkit.postgres import PostgresCluster, find_bin_dir


@pytest.fixture(scope="module")
def scripts():
    """Two full agent cores recorded for 25 s: telemetry, state, meter, aggregates, sessions."""
    return record(stations=2, duration_s=25.0, seed=11)


def _fill(entry, name, loop, records, skipped=0):
    offset, channel, template, qos, retain, number, before = entry
    seq = loop * records + before - skipped
    return template % {"station": name, "seq": seq, "jseq": seq, "loop": loop}


def _replayed(scripts, stations, loops):
    """The messages replayed stations publish over ``loops`` loops, in order per station."""
    messages = []
    for k in range(stations):
        script = scripts[k % len(scripts)]
        name = REPLAY_FORMAT % k
        for loop in range(loops):
            for entry in script.entries:
                messages.append(Message("evse/%s/%s" % (name, entry[1]), _fill(entry, name, loop, script.records).encode(),
                                        entry[3]))
    return messages


def test_replayed_messages_are_the_recorded_agent_messages_renamed(scripts):
    """Filled with the recorded station's own name and loop 0, every journaled message is
    the agent's record but for the session id's loop suffix: nothing else is invented."""
    assert any(entry[1] == "session" for script in scripts for entry in script.entries)
    for script in scripts:
        numbers = [entry[5] for entry in script.entries if entry[5]]
        assert numbers == list(range(1, script.records + 1))
        for entry in script.entries:
            if entry[1] not in JOURNALED:
                continue
            body = json.loads(_fill(entry, script.station, 0, script.records))
            assert body["station"] == script.station and body["seq"] == entry[5]
            if "session_id" in body:
                assert body["session_id"].endswith("-L0")
            assert body["ts" if "ts" in body else "start"]  # the agent's own times are kept


def test_collector_accepts_every_replayed_record(scripts, tmp_path):
    """Three loops of five replayed stations: every journaled record passes the collector's
    checks and is stored, none malformed, no gaps."""
    messages = _replayed(scripts, 5, 3)
    journaled = [m for m in messages if m.topic.rsplit("/", 1)[1] in JOURNALED]
    for message in journaled:
        station, channel = message.topic.split("/")[1:]
        parse_record(station, channel, message)  # raises Malformed with the reason
    with open_store(str(tmp_path / "fleet.db")) as store:
        result = Ingestor(store).store_batch(messages)
        assert (result.stored, result.malformed, result.duplicates) == (len(journaled), 0, 0)
        assert store.scalar("SELECT COUNT(*) FROM gaps") == 0
        assert store.scalar("SELECT COUNT(DISTINCT station) FROM records") == 5


def test_one_publisher_process_holds_more_than_select_allows(scripts):
    """1,100 stations in one process (paho's select() stops at descriptor 1023): all connect
    and their messages reach a subscriber."""
    with Mosquitto(max_connections=1200) as broker:
        counter = FleetSubscriber(broker)
        try:
            figures = ReplayFleet(broker, scripts, 1100, processes=1, speed=5.0).run(3.0)
        finally:
            counter.close()
    assert len(figures["acked"]) == 1100
    assert figures["messages"] > 1100


@pytest.fixture(scope="module")
def postgres_url():
    try:
        find_bin_dir()
    except RuntimeError as error:
        pytest.skip(str(error))
    with PostgresCluster() as cluster:
        yield cluster.url


def test_shared_group_stores_every_record_once(scripts, postgres_url, tmp_path):
    """Two collectors of one share group on one PostgreSQL, 60 replayed stations at 10x
    speed, the first collector killed (-9) halfway and started again: every record the broker
    acknowledged to a station is stored, once; none extra. A station starting mid-script
    numbers its records from 1 (the publishers refuse acknowledgements that are not 1..n)."""
    figures = run_collected(scripts, postgres_url, 2, 60, 6.0, str(tmp_path), 10.0, kill_one=True)
    assert figures["published"] > 100
    assert (figures["lost"], figures["duplicated"], figures["extra"]) == (0, 0, 0)
    assert figures["stored"] == figures["published"]
    acked_again = {REPLAY_FORMAT % k: 0 for k in range(60)}
    assert exactly_once(acked_again, postgres_url)[3] == figures["stored"]  # the check can fail


def test_a_drained_backlog_is_stored_once_and_timed_from_the_drain(scripts, tmp_path):
    """The ingest runs' backlog: a group of 2 held stopped while 40 stations publish at 10x,
    then continued. Every acknowledged record is stored once; the span timed is the drain's
    (shorter than the publishing), and the collectors were stopped meanwhile (nothing stored
    until they were continued)."""
    figures = run_collected(scripts, str(tmp_path / "drain.db"), 2, 40, 4.0, str(tmp_path), 10.0, backlog=True)
    assert figures["published"] > 50 and figures["backlog"]
    assert (figures["lost"], figures["duplicated"], figures["extra"]) == (0, 0, 0)
    assert figures["stored"] == figures["published"]
    assert 0 < figures["delivered"] < figures["messages"]  # the telemetry is not subscribed
    assert figures["records_per_s"] > figures["published"] / figures["publish_s"]
    assert figures["stored_while_stopped"] == 0 and figures["collectors_cpu_pct"] > 0


def test_exactly_once_check_sees_a_lost_record(tmp_path):
    """The bench's check against a store missing one acknowledged record and holding one too many."""
    db = str(tmp_path / "fleet.db")
    with open_store(db) as store:
        with store.transaction():
            for seq in (1, 2, 4, 5):
                store.execute("INSERT INTO records (station, seq, type, received_at, payload) "
                              "VALUES ('a', ?, 'event', 'x', '{}')", (seq,))
    assert exactly_once({"a": 4}, db) == (4, 1, 0, 1)
