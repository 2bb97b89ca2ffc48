"""Drive ports/micropython/mqtt.py under the MicroPython unix port; one JSON summary line.

    micropython mqtt_probe.py '{"port": 1883, "count": 100, ...}'

Publishes ``count`` QoS 1 messages on ``topic`` with at most ``window`` unacknowledged, as
the forwarder does; a heartbeat task sleeps ``tick_ms`` in a loop, standing in for the pilot
sampler, and records the longest gap between its wake-ups. With ``esp32`` the client gets
a socket that behaves as the ESP32 port's: ``setblocking(True)`` clears any timeout.
Stops when everything is acknowledged (and, with ``subscribe``, a message came in) or after
``run_s``.
"""

import io
import json
import socket
import sys
import time

import asyncio
from evse_agent import log
from evse_agent.ports.micropython.clock import MicroClock
from evse_agent.ports.micropython.mqtt import MqttPublisher


class Esp32Socket(io.IOBase):
    """A socket as the ESP32 port has it: ``setblocking(True)`` removes a ``settimeout``."""

    def __init__(self, *args):
        self.sock = socket.socket(*args)
        self.blocking_calls = 0

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def setblocking(self, flag):
        if flag:
            self.blocking_calls += 1
            self.sock.settimeout(None)  # blocking, and no timeout left: as on the ESP32
        else:
            self.sock.setblocking(False)

    def ioctl(self, request, arg):
        if request == 10:  # MP_STREAM_GET_FILENO: poll the real descriptor
            return self.sock.fileno()
        return 0

    def connect(self, address):
        return self.sock.connect(address)

    def setsockopt(self, *args):
        return self.sock.setsockopt(*args)

    def read(self, *args):
        return self.sock.read(*args)

    def readinto(self, *args):
        return self.sock.readinto(*args)

    def write(self, data):
        return self.sock.write(data)

    def close(self):
        self.sock.close()


async def main(options):
    log.set_sink(lambda level, text: print("log", text))
    tls = {"enabled": False, "ca_file": None, "cert_file": None, "key_file": None, "insecure": False}
    tls.update(options.get("tls", {}))
    config = {"host": options.get("host", "127.0.0.1"), "port": options["port"], "client_id": "probe",
              "username": options.get("username"), "password": options.get("password"),
              "keepalive_s": options.get("keepalive", 5),
              "reconnect_min_s": options.get("min", 0.2), "reconnect_max_s": options.get("max", 1.0),
              "tls": tls}
    clock = MicroClock("always")
    client = MqttPublisher(config, "probe/status", clock)
    sockets = []
    if options.get("esp32"):
        def make(*args):
            sockets.append(Esp32Socket(*args))
            return sockets[-1]
        client.make_socket = make
    received = []
    if options.get("subscribe"):
        client.subscribe(options["subscribe"], received.append)
    wake = asyncio.Event()
    client.on_activity = wake.set
    stall = [0, 0]  # longest gap (ms), heartbeats

    async def heartbeat():
        tick = options.get("tick_ms", 5)
        last = time.ticks_ms()
        while True:
            await asyncio.sleep_ms(tick)
            now = time.ticks_ms()
            stall[0] = max(stall[0], time.ticks_diff(now, last) - tick)
            stall[1] += 1
            last = now

    beat = asyncio.create_task(heartbeat())
    runner = asyncio.create_task(client.run())
    count = options.get("count", 0)
    window = options.get("window", 16)
    payload = b"x" * options.get("size", 200)
    tokens = {}
    acked = 0
    sent = 0
    most_inflight = 0
    latencies = []
    started = time.ticks_ms()
    deadline = time.ticks_add(started, int(options.get("run_s", 10) * 1000))
    first_connect_ms = None
    while time.ticks_diff(deadline, time.ticks_ms()) > 0:
        if client.connected and first_connect_ms is None:
            first_connect_ms = time.ticks_diff(time.ticks_ms(), started)
        for token in client.drain_acked():
            if token in tokens:
                latencies.append(time.ticks_diff(time.ticks_us(), tokens.pop(token)))
                acked += 1
        while sent < count and len(tokens) < window:
            token = client.publish(options.get("topic", "probe/data"), ("%d " % sent).encode() + payload, 1, False)
            if token is None:
                break
            tokens[token] = time.ticks_us()
            sent += 1
        most_inflight = max(most_inflight, len(tokens))
        if acked == count and (not options.get("subscribe") or received) and \
                client.connects >= options.get("connects", 1) and stall[1] >= options.get("beats", 0):
            break
        wake.clear()
        try:
            await asyncio.wait_for_ms(wake.wait(), 50)
        except asyncio.TimeoutError:
            pass
    elapsed = time.ticks_diff(time.ticks_ms(), started)
    latencies.sort()
    summary = {"connects": client.connects, "connected": client.connected, "sent": sent, "acked": acked,
               "most_inflight": most_inflight, "last_error": client.last_error, "received": [bytes(m).decode() for m in received],
               "max_stall_ms": stall[0], "heartbeats": stall[1], "elapsed_ms": elapsed,
               "first_connect_ms": first_connect_ms,
               "ack_us_p50": latencies[len(latencies) // 2] if latencies else None,
               "blocking_calls": sum(s.blocking_calls for s in sockets), "esp32_sockets": len(sockets)}
    client.stop()
    beat.cancel()
    runner.cancel()
    print(json.dumps(summary))


asyncio.run(main(json.loads(sys.argv[1])))
