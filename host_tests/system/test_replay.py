"""A 24-hour broker outage, simulated with a fast clock, replays completely and in order."""

import asyncio
import json
import time

from conftest import wait_for
from evse_agent.aggregate import Aggregator
from evse_agent.config import validate
from evse_agent.forwarder import Forwarder
from evse_agent.journal import AGGREGATE, EVENT, Journal
from evse_agent.messages import Outbox, Topics
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.mqtt import MqttPublisher
from evse_agent.reading import Reading
from evse_tools.bench.main import FastClock
from evse_tools.collector.consumer import SequenceTracker
from evse_tools.testkit.subscriber import Collector

DAY_S = 24 * 3600


def _config(broker, journal_dir):
    return validate({
        "station_id": "replay-1",
        "meter": {"model": "sdm630", "port": "/dev/null"},
        "journal": {"dir": str(journal_dir)},
        "mqtt": {"port": broker.port},
    })


def test_a_day_of_aggregates_recorded_offline_replays_completely(broker, tmp_path):
    config = _config(broker, tmp_path / "journal")
    clock = FastClock()
    journal = Journal(FileSystem(config["journal"]["dir"]), config["journal"], clock)
    journal.recover()
    topics = Topics("evse", "replay-1")
    publisher = MqttPublisher(config["mqtt"], topics.status)  # not started: the broker is "down"
    outbox = Outbox(publisher, "replay-1", journal)
    aggregator = Aggregator(config["journal"]["aggregate_interval_s"], 3)
    energy = 1000000
    for second in range(DAY_S):
        clock.now += 1.0
        power = 11000.0 if (second // 3600) % 2 else 0.0  # charging every other hour
        energy += 3 if power else 0  # ~11 kWh per charging hour
        reading = Reading(clock.now, clock.monotonic_ms(), [230.0] * 3, [power / 690] * 3,
                          [power / 3] * 3, power, 50.0, energy, 122)
        finished = aggregator.add(reading)
        if finished is not None:
            outbox.record(AGGREGATE, finished)
        if second % 3600 == 0:
            outbox.record(EVENT, {"type": "power_drop", "hour": second // 3600})
    journal.sync()
    written = journal.next_seq - 1
    assert written == DAY_S // 10 + 24  # every closed 10 s interval, plus the events
    assert journal.dropped_records == 0

    collector = Collector(broker.host, broker.port, "evse/replay-1/#", qos=1)
    tracker = SequenceTracker()
    publisher.start()
    assert publisher.wait_connected(10)
    forwarder = Forwarder(journal, publisher, topics, clock, config["journal"]["window"])

    async def replay():
        loop = asyncio.get_running_loop()
        publisher.on_activity = lambda: loop.call_soon_threadsafe(forwarder.wake)
        task = asyncio.create_task(forwarder.run())
        deadline = time.monotonic() + 240
        while journal.acked < written and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        forwarder.stop()
        await task
        publisher.on_activity = None

    try:
        asyncio.run(replay())
        assert journal.acked == written
        # Acknowledged by the broker is not yet delivered to the subscriber: wait for the
        # tail itself (every seq), however long a busy machine takes to hand it over.
        assert wait_for(lambda: len({m.body["seq"] for m in collector.messages
                                     if m.topic != topics.status and m.body}) >= written, 240), \
            "the subscriber received %d of %d records" % (
                len({m.body["seq"] for m in collector.messages if m.topic != topics.status and m.body}), written)
        received = [m for m in collector.messages if m.topic != topics.status]
        seqs = [m.body["seq"] for m in received]
        for message in received:
            tracker.accept_message(message.body)
        assert tracker.gaps("replay-1") == []
        assert tracker.highest("replay-1") == written
        assert seqs == sorted(seqs)  # replayed in order
        aggregates = [m.body for m in received if m.topic == topics.aggregate]
        assert len({a["seq"] for a in aggregates}) == DAY_S // 10
        peak = max(a["power_total_w"]["max"] for a in aggregates)
        assert peak == 11000.0
        assert json.loads(received[-1].payload)["station"] == "replay-1"
        # Everything is acknowledged: only the active segment is left.
        assert len(journal.segments) == 1
    finally:
        publisher.stop()
        collector.close()
        journal.close()
