"""A large fleet from a small one: what real agent cores publish, recorded once and replayed
by lighter publishers under many station ids.

``record`` runs a few full agent cores (``fleet_sim``: in-memory meter, scripted car, the
real journal, forwarder and paho publisher) against a broker and keeps every message they
publish, with its time, QoS and retain flag. ``Script`` turns one recorded station into a
template: the journaled records (session, event, aggregate) numbered 1..n in the order
they were published, the live messages (telemetry, meter, state, status) between them.

A replayed station ``k`` plays script ``k mod len(scripts)`` in a loop, starting at a random
phase, at the recorded times (the agent's default rates). Its topics and its ``station``
field name it; every journaled record gets the next seq of the station (a loop of n records
adds n), a loop-unique ``session_id``, and live messages a matching ``journal_seq``: so a
collector sees the stream of a station that has been charging for hours. OCMF documents
are kept as signed (by the recorded station's key): the collector stores them and marks
the session unverified, as for any station whose key is not registered.

One publisher process holds many stations on one asyncio loop, each its own MQTT 3.1.1
connection (``StationLink``: CONNECT, PUBLISH at QoS 0/1, PUBACK): asyncio waits with
epoll, so a process is not limited to 1023 descriptors as paho's ``select()`` is; its
``RLIMIT_NOFILE`` is raised to the hard limit. Each process reports, per station, how
many journaled records the broker acknowledged: exactly seqs 1..n of each station, the
ground truth a collector's store is checked against.

``python -m evse_tools.sim.fleet_replay --stations 10000 --duration 60`` (no collector: the
broker's delivery to one subscriber).
"""

import argparse
import asyncio
import json
import multiprocessing
import random
import resource
import shutil
import struct
import tempfile
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..testkit.broker import Mosquitto
from ..testkit.subscriber import subscribed_client

JOURNALED = ("session", "event", "aggregate")
STATION_MARK = "\u0001station\u0001"
SEQ_MARK = "\u0001seq\u0001"
JSEQ_MARK = "\u0001jseq\u0001"
SID_MARK = "\u0001sid\u0001"
REPLAY_FORMAT = "replay-%05d"


def raise_fd_limit():
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# -- recording ---------------------------------------------------------------------------


class Recorder:
    """Every message on ``evse/#`` with its arrival time, QoS and retain flag (MQTT 5,
    retain-as-published), per station."""

    def __init__(self, broker):
        self.messages = []
        self._lock = threading.Lock()
        self.client = subscribed_client(broker, "fleet-recorder", "evse/#", self._on_message,
                                        SubscribeOptions(qos=1, retainAsPublished=True), protocol=paho.MQTTv5)

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append((time.monotonic(), message.topic, bytes(message.payload), message.qos,
                                  bool(message.retain)))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            return list(self.messages)


def record(stations=3, duration_s=40.0, seed=7):
    """Run ``stations`` full agent cores for ``duration_s`` against a private broker; a list
    of Scripts, one per station that journaled at least one record."""
    from .fleet_sim import simulate
    directory = tempfile.mkdtemp(prefix="evse-record-")
    try:
        with Mosquitto() as broker:
            recorder = Recorder(broker)
            try:
                simulate(broker, stations, duration_s, directory, seed=seed)
            finally:
                messages = recorder.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    by_station = {}
    for entry in messages:
        parts = entry[1].split("/")
        if len(parts) == 3:
            by_station.setdefault(parts[1], []).append(entry)
    scripts = [Script.from_messages(station, entries, duration_s) for station, entries in sorted(by_station.items())]
    scripts = [s for s in scripts if s.records]
    if not scripts:
        raise RuntimeError("the recorded stations journaled nothing in %s s" % duration_s)
    return scripts


def _template(doc, station):
    """``doc`` as JSON text for ``%`` formatting: the station, seq, journal_seq and the loop
    of the session id are left to fill in."""
    doc = dict(doc)
    if doc.get("station") == station:
        doc["station"] = STATION_MARK
    if "seq" in doc:
        doc["seq"] = SEQ_MARK
    if "journal_seq" in doc:
        doc["journal_seq"] = JSEQ_MARK
    session_id = doc.get("session_id")
    if isinstance(session_id, str):
        doc["session_id"] = SID_MARK
    text = json.dumps(doc, separators=(",", ":")).replace("%", "%%")
    text = text.replace(json.dumps(STATION_MARK), '"%(station)s"')
    text = text.replace(json.dumps(SEQ_MARK), "%(seq)d").replace(json.dumps(JSEQ_MARK), "%(jseq)d")
    if isinstance(session_id, str):
        # the session id of loop L is "<recorded id>-L<L>": unique per station and loop
        text = text.replace(json.dumps(SID_MARK), json.dumps(session_id).replace("%", "%%")[:-1] + '-L%(loop)d"')
    return text


class Script:
    """One recorded station as a loop: ``entries`` of (offset s, channel, template, qos,
    retain, record number or None, records before it), ``records`` journaled records per
    loop, ``period_s`` the loop's length."""

    def __init__(self, station, entries, records, period_s):
        self.station = station
        self.entries = entries
        self.records = records
        self.period_s = period_s

    @classmethod
    def from_messages(cls, station, messages, period_s):
        entries = []
        seen_seqs = set()
        records = 0
        start = messages[0][0] if messages else 0.0
        for arrived, topic, payload, qos, retain in messages:
            channel = topic.rsplit("/", 1)[1]
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None
            number = None
            if channel in JOURNALED:
                if not isinstance(doc, dict) or doc.get("seq") in seen_seqs or doc.get("kind") == "summary":
                    continue  # a redelivery (QoS 1 retry), or a fold whose seq runs are the recording's
                seen_seqs.add(doc.get("seq"))
                records += 1
                number = records
            if isinstance(doc, dict):
                text = _template(doc, station)
            else:  # status: plain text
                text = payload.decode().replace("%", "%%")
            entries.append((arrived - start, channel, text, qos, retain, number, records))
        span = entries[-1][0] + 1.0 if entries else 0.0
        return cls(station, entries, records, max(period_s, span))


# -- replaying: a minimal MQTT 3.1.1 publisher per station ---------------------------------


def _remaining_length(n):
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text):
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id):
    body = _utf8("MQTT") + bytes((4, 0x02)) + struct.pack("!H", 0) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic, payload, qos, retain, packet_id):
    header = 0x30 | (qos << 1) | (1 if retain else 0)
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes((header,)) + _remaining_length(len(body)) + body


class StationLink(asyncio.Protocol):
    """One station's MQTT connection: counts PUBACKs of the journaled records it sent."""

    def __init__(self):
        self.transport = None
        self.connected = asyncio.get_running_loop().create_future()
        self.pending = {}  # packet id -> record seq
        self.acked = set()
        self.lost = False
        self._buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buffer = self._buffer + data
        while len(buffer) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(buffer):
                    self._buffer = buffer
                    return
                byte = buffer[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            if len(buffer) < i + length:
                break
            kind, body = buffer[0] >> 4, buffer[i:i + length]
            buffer = buffer[i + length:]
            if kind == 2 and not self.connected.done():  # CONNACK
                if body[1] == 0:
                    self.connected.set_result(True)
                else:
                    self.connected.set_exception(RuntimeError("broker refused: code %d" % body[1]))
            elif kind == 4:  # PUBACK
                seq = self.pending.pop(struct.unpack("!H", body[:2])[0], None)
                if seq is not None:
                    self.acked.add(seq)
        self._buffer = buffer

    def connection_lost(self, exc):
        self.lost = True
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed"))


class ReplayStation:
    """Replays one Script as station ``name`` over its own StationLink."""

    def __init__(self, name, script, phase_s, speed=1.0):
        self.name = name
        self.speed = speed
        self.script = script
        self.phase_s = phase_s
        self.link = None
        self.published = 0
        self.by_channel = {}
        self.records = 0
        self._packet_id = 0

    async def connect(self, host, port):
        loop = asyncio.get_running_loop()
        _, self.link = await loop.create_connection(StationLink, host, port)
        self.link.transport.write(connect_packet(self.name))
        await asyncio.wait_for(self.link.connected, 60)

    def _next_id(self):
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id

    async def run(self, start_at, stop_at):
        """Publish from the script's phase until ``stop_at`` (loop.time())."""
        loop = asyncio.get_running_loop()
        script, entries, speed = self.script, self.script.entries, self.speed
        period = script.period_s / speed
        index = 0
        while index < len(entries) and entries[index][0] < self.phase_s:
            index += 1
        # the station's first record is seq 1: the records of the first loop before its phase are
        # the last of each loop
        skipped = entries[index - 1][6] if index else 0
        loop_number, base = 0, start_at - self.phase_s / speed
        topic_prefix = "evse/%s/" % self.name
        while True:
            if index >= len(entries):
                index, loop_number, base = 0, loop_number + 1, base + period
                continue
            offset, channel, template, qos, retain, record, before = entries[index]
            due = base + offset / speed
            if due >= stop_at:
                return
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.link.lost:
                raise ConnectionError("station %s lost its connection" % self.name)
            seq = journal_seq = loop_number * script.records + before - skipped
            payload = (template % {"station": self.name, "seq": seq, "jseq": journal_seq,
                                   "loop": loop_number}).encode()
            packet_id = self._next_id() if qos else 0
            if record:
                self.link.pending[packet_id] = seq
                self.records += 1
            self.link.transport.write(publish_packet(topic_prefix + channel, payload, qos, retain, packet_id))
            self.published += 1
            self.by_channel[channel] = self.by_channel.get(channel, 0) + 1
            index += 1


def _contiguous(acked):
    """n when ``acked`` is exactly {1..n} (else -1)."""
    return len(acked) if acked and max(acked) == len(acked) else (0 if not acked else -1)


def run_publisher(host, port, first, count, scripts, duration_s, seed, speed, ready, go, results):
    """One publisher process: stations ``first``..``first+count-1``; puts per station the
    journaled records acknowledged (dict name -> n, every seq 1..n) and message counts."""
    raise_fd_limit()

    async def main():
        rng = random.Random(seed + first)
        stations = []
        for k in range(first, first + count):
            script = scripts[k % len(scripts)]
            stations.append(ReplayStation(REPLAY_FORMAT % k, script, rng.uniform(0, script.period_s), speed))
        for i in range(0, len(stations), 200):
            await asyncio.gather(*(s.connect(host, port) for s in stations[i:i + 200]))
        ready.put(None)
        loop = asyncio.get_running_loop()
        while not go.is_set():
            await asyncio.sleep(0.01)
        start = loop.time()
        stop = start + duration_s
        await asyncio.gather(*(s.run(start, stop) for s in stations))
        deadline = loop.time() + 120
        while any(s.link.pending for s in stations) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        acked = {s.name: _contiguous(s.link.acked) for s in stations}
        for s in stations:
            s.link.transport.close()
        by_channel = {}
        for s in stations:
            for channel, n in s.by_channel.items():
                by_channel[channel] = by_channel.get(channel, 0) + n
        return {"acked": acked, "messages": sum(s.published for s in stations), "by_channel": by_channel,
                "records": sum(s.records for s in stations),
                "unacked": sum(len(s.link.pending) for s in stations)}

    try:
        results.put(asyncio.run(main()))
    except Exception as error:
        ready.put("publisher %d..%d: %r" % (first, first + count - 1, error))
        results.put({"error": repr(error)})


class ReplayFleet:
    """``stations`` replayed stations in ``processes`` publisher processes; ``speed`` above 1
    plays the recording that many times faster (an ingest test: a backlog for the collector)."""

    def __init__(self, broker, scripts, stations, processes=2, seed=1, speed=1.0):
        self.speed = speed
        self.broker = broker
        self.scripts = scripts
        self.stations = stations
        self.processes = max(1, min(processes, stations))
        self.seed = seed

    def run(self, duration_s, on_started=None):
        """Connect every station, publish for ``duration_s``; returns the publishers' figures:
        ``acked`` {station: n}, ``messages``, ``by_channel`` {channel: messages}, ``records``,
        ``elapsed_s``."""
        context = multiprocessing.get_context("spawn")
        ready, results, go = context.Queue(), context.Queue(), context.Event()
        per = -(-self.stations // self.processes)
        workers = []
        for first in range(0, self.stations, per):
            count = min(per, self.stations - first)
            workers.append(context.Process(target=run_publisher, daemon=True, args=(
                self.broker.host, self.broker.port, first, count, self.scripts, duration_s, self.seed,
                self.speed, ready, go, results)))
        for worker in workers:
            worker.start()
        try:
            for _ in workers:
                problem = ready.get(timeout=600)
                if problem is not None:
                    raise RuntimeError(problem)
            if on_started is not None:
                on_started()
            started = time.monotonic()
            go.set()
            figures = [results.get(timeout=duration_s + 300) for _ in workers]
            elapsed = time.monotonic() - started
        finally:
            for worker in workers:
                worker.join(30)
                if worker.is_alive():
                    worker.kill()
        errors = [f["error"] for f in figures if "error" in f]
        if errors:
            raise RuntimeError("; ".join(errors))
        acked = {}
        for f in figures:
            acked.update(f["acked"])
        broken = sorted(name for name, n in acked.items() if n < 0)
        if broken:
            raise RuntimeError("%d stations had records the broker never acknowledged, e.g. %s"
                               % (len(broken), broken[0]))
        by_channel = {}
        for f in figures:
            for channel, n in f["by_channel"].items():
                by_channel[channel] = by_channel.get(channel, 0) + n
        return {"acked": acked, "messages": sum(f["messages"] for f in figures), "by_channel": by_channel,
                "records": sum(f["records"] for f in figures), "elapsed_s": elapsed,
                "unacked": sum(f["unacked"] for f in figures)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-fleet-replay", description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=10000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.stations < 1:
        parser.error("--stations must be at least 1, got %d" % args.stations)
    scripts = record()
    from .fleet_sim import FleetSubscriber
    with Mosquitto(max_connections=args.stations + 100) as broker:
        counter = FleetSubscriber(broker)
        try:
            figures = ReplayFleet(broker, scripts, args.stations, args.processes).run(args.duration)
            time.sleep(1)
            received, _ = counter.snapshot()
        finally:
            counter.close()
    print(json.dumps({"stations": args.stations, "published": figures["messages"],
                      "records": figures["records"], "delivered": received,
                      "messages_per_s": round(figures["messages"] / args.duration, 1)}, indent=2))


if __name__ == "__main__":
    main()
