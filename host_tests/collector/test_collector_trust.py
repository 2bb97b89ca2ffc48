"""Records can be trusted by their consumer.

- Per-station broker logins with a mosquitto ``pattern`` ACL (real mosquitto): a station can
  publish under its own topics only, so a neighbour cannot take its next seq first.
- The collector rejects a seq implausibly far ahead (a forged 2^62) without leaving a gap of
  4.6e18 in its gap tracking, and station ids that are not well formed — with no station row.
"""

import json
import threading

import paho.mqtt.client as paho
import pytest

from conftest import wait_for
from evse_tools.testkit.broker import Mosquitto
from evse_tools.collector.ingest import MAX_SEQ_AHEAD, Ingestor, Message
from evse_tools.collector.store import open_store
from evse_tools.testkit.subscriber import Collector

ACL = ["pattern readwrite evse/%u/#", "pattern write homeassistant/+/%u/#",
       "pattern read homeassistant/status", "user collector", "topic read evse/#"]


def aggregate(station, seq):
    return {"kind": "aggregate", "start": "2026-11-25T06:00:00.000Z", "end": "2026-11-25T06:00:10.000Z",
            "samples": 10, "power_total_w": {"min": 1.0, "avg": 2.0, "max": 3.0}, "energy_wh_first": 100,
            "energy_wh_last": 101, "station": station, "seq": seq}


def deliver(db, *bodies, topic_station=None):
    messages = [Message("evse/%s/aggregate" % (topic_station or body["station"]), json.dumps(body).encode())
                for body in bodies]
    with open_store(db) as store:
        return Ingestor(store).store_batch(messages)


def query(db, sql, params=()):
    with open_store(db) as store:
        return store.query(sql, params)


@pytest.mark.parametrize("forged", [1 << 62, (1 << 63) - 1, 5 + MAX_SEQ_AHEAD + 1])
def test_a_seq_far_ahead_is_rejected_and_leaves_no_gap(tmp_path, forged):
    db = str(tmp_path / "fleet.db")
    assert deliver(db, aggregate("st-1", 1), aggregate("st-1", 2)).stored == 2
    result = deliver(db, aggregate("st-1", forged), aggregate("st-1", 3))
    assert (result.stored, result.malformed) == (1, 1)
    result = deliver(db, aggregate("st-1", 5))
    assert result.stored == 1
    assert query(db, "SELECT seq FROM records WHERE station = 'st-1' ORDER BY seq") == [(1,), (2,), (3,), (5,)]
    assert query(db, "SELECT first_seq, last_seq FROM gaps WHERE station = 'st-1'") == [(4, 4)]
    assert query(db, "SELECT malformed FROM stations WHERE station = 'st-1'") == [(1,)]
    # Up to the bound is a backlog, not a forgery.
    assert deliver(db, aggregate("st-1", 5 + MAX_SEQ_AHEAD)).stored == 1


def test_a_first_seen_station_with_an_absurd_seq_is_rejected(tmp_path):
    db = str(tmp_path / "fleet.db")
    result = deliver(db, aggregate("st-2", 1 << 62))
    assert (result.stored, result.malformed) == (0, 1)
    assert query(db, "SELECT * FROM gaps") == []
    assert deliver(db, aggregate("st-2", 1)).stored == 1


@pytest.mark.parametrize("station", ["st 1", "st\u00e91", "x" * 65, "st\x00", "st;DROP", "st$1"])
def test_a_station_id_that_is_not_well_formed_is_rejected_without_a_station_row(tmp_path, station):
    db = str(tmp_path / "fleet.db")
    result = deliver(db, aggregate(station, 1))
    assert (result.stored, result.malformed) == (0, 1)
    assert query(db, "SELECT station FROM stations") == []
    assert deliver(db, aggregate("st-3.a_b", 1)).stored == 1


def _client(broker, user, password):
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="c-" + user)
    client.username_pw_set(user, password)
    connected = threading.Event()
    client.on_connect = lambda c, userdata, flags, reason, properties: connected.set() if not reason.is_failure else None
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert wait_for(connected.is_set, 10)
    return client


def test_per_station_logins_with_a_pattern_acl_keep_a_neighbour_off_another_stations_topics():
    users = {"st-1": "one", "st-2": "two", "collector": "col"}
    with Mosquitto(users=users, acl=ACL) as broker:
        watcher = Collector(broker.host, broker.port, "evse/#", username="collector", password="col")
        try:
            honest = _client(broker, "st-1", "one")
            neighbour = _client(broker, "st-2", "two")
            forged = aggregate("st-1", 7)
            neighbour.publish("evse/st-1/aggregate", json.dumps(forged), qos=1).wait_for_publish(10)
            neighbour.publish("evse/st-2/aggregate", json.dumps(aggregate("st-2", 1)), qos=1).wait_for_publish(10)
            honest.publish("evse/st-1/aggregate", json.dumps(aggregate("st-1", 7)), qos=1).wait_for_publish(10)
            honest.publish("homeassistant/sensor/st-1/power/config", "{}", qos=1).wait_for_publish(10)
            assert watcher.wait_for(lambda m: m.topic == "evse/st-2/aggregate") is not None
            assert watcher.wait_for(lambda m: m.topic == "evse/st-1/aggregate") is not None
            # The neighbour's publish under st-1 was dropped by the broker: one st-1 message only,
            # and it is the honest station's (both were sent before it, over QoS 1).
            neighbour.publish("evse/st-2/aggregate", json.dumps(aggregate("st-2", 2)), qos=1).wait_for_publish(10)
            assert watcher.wait_for(lambda m: m.topic == "evse/st-2/aggregate" and m.body["seq"] == 2) is not None
            assert len(watcher.on("aggregate")) == 3
            assert [m.topic for m in watcher.on("aggregate")].count("evse/st-1/aggregate") == 1
            for client in (honest, neighbour):
                client.loop_stop()
                client.disconnect()
        finally:
            watcher.close()
