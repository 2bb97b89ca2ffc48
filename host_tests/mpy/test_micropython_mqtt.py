"""ports/micropython/mqtt.py under the MicroPython unix port: against mosquitto, against a
misbehaving broker, and with a socket that behaves as the ESP32's.

The client runs in ``host_tests/mpy/probe/mqtt_probe.py`` beside a heartbeat task that
stands in for the pilot sampler: the event loop must keep turning whatever the broker
does. ``FakeBroker`` (here, in CPython) speaks enough MQTT 3.1.1 to accept a client, and
misbehaves on demand, one behaviour per connection attempt: ``refuse`` (CONNACK 5),
``close`` (closes during CONNECT), ``silent`` (CONNACK, then never answers: no PINGRESP, no
PUBACK), ``blackhole`` (accepts TCP, never reads or answers), ``split`` (a working broker
that sends every packet one byte at a time), ``ok``.
"""

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from evse_tools.testkit.mpy_agent import BOARD_DIR, CODE_DIR, micropython_command
from evse_tools.testkit.subscriber import Collector
from test_mqtt_security import secure_broker  # noqa: F401  (fixture: mosquitto with TLS and logins)

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe", "mqtt_probe.py")
HEAP = "256wK"


def run_probe(options, timeout_s=120):
    """Run the probe to its end; its summary (dict) and its whole output."""
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([BOARD_DIR, CODE_DIR, ".frozen"]))
    result = subprocess.run(micropython_command() + ["-X", "heapsize=%s" % HEAP, PROBE, json.dumps(options)],
                            capture_output=True, text=True, timeout=timeout_s, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]), result.stdout


def _remaining(data):
    size, shift, i = 0, 0, 1
    while True:
        byte = data[i]
        size |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return size, i
        shift += 7


class FakeBroker:
    """A loopback MQTT broker that follows ``behaviours`` (one per connection; the last one
    repeats). ``attempts`` lists (time, behaviour) of every connection."""

    def __init__(self, behaviours):
        self.behaviours = list(behaviours)
        self.attempts = []
        self.failed = []  # when a refused or closed attempt ended (before the close)
        self.published = []
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self._closing = False
        self._clients = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closing:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            index = len(self.attempts)
            behaviour = self.behaviours[min(index, len(self.behaviours) - 1)]
            self.attempts.append((time.monotonic(), behaviour))
            self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn, behaviour), daemon=True).start()

    def _read_packet(self, conn, buffer):
        while True:
            if len(buffer) >= 2:
                try:
                    size, start = _remaining(buffer)
                except IndexError:
                    size = None
                if size is not None and len(buffer) >= start + size:
                    packet = bytes(buffer[:start + size])
                    del buffer[:start + size]
                    return packet[0], packet[start:]
            data = conn.recv(4096)
            if not data:
                return None, None
            buffer.extend(data)

    def _send(self, conn, data, split):
        if not split:
            conn.sendall(data)
            return
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(0.001)

    def _serve(self, conn, behaviour):
        buffer = bytearray()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        split = behaviour == "split"
        try:
            if behaviour == "blackhole":
                while not self._closing:
                    time.sleep(0.1)
                return
            if behaviour == "close":
                conn.recv(3)
                self.failed.append(time.monotonic())
                return
            kind, body = self._read_packet(conn, buffer)
            if kind != 0x10:
                return
            if behaviour == "refuse":
                conn.sendall(b"\x20\x02\x00\x05")
                self.failed.append(time.monotonic())
                return
            self._send(conn, b"\x20\x02\x00\x00", split)
            while True:
                kind, body = self._read_packet(conn, buffer)
                if kind is None:
                    return
                if behaviour == "silent":
                    continue
                if kind & 0xF0 == 0x30:
                    length = (body[0] << 8) | body[1]
                    topic = body[2:2 + length].decode()
                    start = 2 + length
                    if kind & 0x06:
                        self._send(conn, b"\x40\x02" + body[start:start + 2], split)
                        start += 2
                    self.published.append((topic, body[start:]))
                elif kind & 0xF0 == 0x80:
                    pid = body[:2]
                    topic_length = (body[2] << 8) | body[3]
                    topic = body[4:4 + topic_length]
                    self._send(conn, b"\x90\x03" + pid + b"\x01", split)
                    message = b"\x00" + bytes((len(topic),)) + topic + b"hello"
                    self._send(conn, bytes((0x30, len(message))) + message, split)
                elif kind & 0xF0 == 0xC0:
                    self._send(conn, b"\xd0\x00", split)
                elif kind & 0xF0 == 0xE0:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self):
        self._closing = True
        self.server.close()
        for conn in self._clients:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def fake_broker():
    made = []

    def make(*behaviours):
        made.append(FakeBroker(behaviours))
        return made[-1]

    yield make
    for broker in made:
        broker.close()


def test_pipelined_qos1_against_mosquitto(broker):
    """200 QoS 1 messages with up to 20 unacknowledged: every one acknowledged, delivered in
    order to a subscriber, more than one in flight at a time."""
    collector = Collector(broker.host, broker.port, "probe/#")
    try:
        summary, output = run_probe({"port": broker.port, "count": 200, "window": 20, "run_s": 60})
        assert summary["acked"] == summary["sent"] == 200, output
        assert summary["most_inflight"] > 1
        assert summary["connects"] == 1 and summary["last_error"] is None
        assert collector.wait_for(lambda m: len(collector.on("data")) >= 200, timeout_s=20), len(collector.messages)
        numbers = [int(m.payload.split(b" ")[0]) for m in collector.on("data")]
        assert numbers == list(range(200))
        assert collector.wait_for(lambda m: m.topic == "probe/status" and m.text == "online") is not None
        assert collector.wait_for(lambda m: m.topic == "probe/status" and m.text == "offline") is not None
    finally:
        collector.close()


def test_last_will_and_retained_status_on_mosquitto(broker):
    """Retained ``online`` on connect; retained ``offline`` on stop."""
    summary, output = run_probe({"port": broker.port, "count": 1, "run_s": 30})
    assert summary["acked"] == 1, output
    late = Collector(broker.host, broker.port, "probe/status")
    try:
        retained = late.wait_for(lambda m: m.retain, timeout_s=5)
        assert retained is not None and retained.text == "offline"
    finally:
        late.close()


@pytest.mark.parametrize("fault", ["refuse", "close", "blackhole"])
def test_failed_connects_back_off_and_recover(fake_broker, fault):
    """A refused CONNACK, a close during CONNECT, a broker that never answers: the client
    retries with growing back-off (never giving up, never blocking the loop) and works once
    the broker does."""
    fake = fake_broker(fault, fault, fault, "ok")
    summary, output = run_probe({"port": fake.port, "count": 5, "min": 0.2, "max": 0.8, "run_s": 60}, timeout_s=90)
    assert [b for _, b in fake.attempts[:4]] == [fault, fault, fault, "ok"], fake.attempts
    assert summary["acked"] == 5 and summary["connects"] == 1, output
    assert len(fake.published) >= 6  # online status + 5
    if fault != "blackhole":
        # From the end of a failed attempt to the next connection the client sleeps its
        # back-off (0.2, 0.4, 0.8 s); a sleep never ends early, so these bound the gaps
        # (less the 1 ms resolution of MicroPython's ticks_ms).
        gaps = [accepted - failed for failed, (accepted, _) in zip(fake.failed, fake.attempts[1:4])]
        assert gaps[0] >= 0.199 and gaps[1] >= 0.399 and gaps[2] >= 0.799, gaps
    assert summary["heartbeats"] > 0


def test_a_broker_that_goes_silent_is_dropped_and_reconnected(fake_broker):
    """CONNACK, then nothing: no PINGRESP and no PUBACK within keepalive / 2 drops the link;
    what was in flight is sent again on the next connection and acknowledged there."""
    fake = fake_broker("silent", "ok")
    summary, output = run_probe({"port": fake.port, "count": 3, "keepalive": 5, "run_s": 60, "connects": 2},
                                timeout_s=90)
    assert summary["connects"] == 2, output
    assert summary["acked"] == 3, output
    assert "no PUBACK" in output or "no PINGRESP" in output
    assert len([t for t, _ in fake.published if t == "probe/data"]) == 3


def test_packets_split_into_single_bytes(fake_broker):
    """Every byte from the broker in its own segment: CONNACK, PUBACKs, SUBACK and an
    incoming PUBLISH are reassembled."""
    fake = fake_broker("split")
    summary, output = run_probe({"port": fake.port, "count": 20, "window": 5, "subscribe": "probe/in",
                                 "run_s": 60})
    assert summary["acked"] == 20 and summary["connects"] == 1, output
    assert summary["received"] == ["hello"]


def test_esp32_socket_black_holed_broker_never_blocks_the_loop(fake_broker):
    """With a socket whose blocking mode has no timeout (the ESP32's), a broker that accepts
    TCP and then never answers: the heartbeat keeps beating while the client waits, gives
    up on CONNACK and tries again; the client never puts the socket in blocking mode."""
    fake = fake_broker("blackhole", "blackhole", "ok")
    summary, output = run_probe({"port": fake.port, "count": 2, "esp32": True, "min": 0.2, "max": 0.4,
                                 "run_s": 60, "beats": 100}, timeout_s=90)
    assert summary["esp32_sockets"] >= 3 and summary["blocking_calls"] == 0, output
    assert summary["acked"] == 2 and summary["connects"] == 1, output
    assert summary["heartbeats"] >= 100


def test_tls_and_login_against_mosquitto(secure_broker):  # noqa: F811
    """The board's TLS settings: the broker's certificate checked against the CA file, a
    login; a wrong password is a refused CONNACK, retried, never a dead client."""
    broker = secure_broker
    tls = {"enabled": True, "ca_file": broker.ca_file}
    summary, output = run_probe({"port": broker.port, "count": 10, "window": 5, "tls": tls,
                                 "username": "station-7", "password": "s3cret", "run_s": 60})
    assert summary["acked"] == 10 and summary["connects"] == 1, output
    summary, output = run_probe({"port": broker.port, "count": 1, "tls": tls, "username": "station-7",
                                 "password": "wrong", "run_s": 3})
    assert summary["connects"] == 0 and summary["acked"] == 0, output
    assert "connect refused: not authorised" in summary["last_error"] or \
        "bad user name or password" in summary["last_error"], output
