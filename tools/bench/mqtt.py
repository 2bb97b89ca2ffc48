"""MQTT publish figures of the MicroPython port's client, beside paho-mqtt on CPython.

    python -m evse_tools.bench.mqtt [--count 2000]

Against one private mosquitto: QoS 1 throughput with 16 messages in flight (the forwarder's
window) and with one at a time (what a client that waits for each PUBACK allows), and the
publish -> PUBACK time of one message alone (median). The MicroPython client runs under
the unix port (host_tests/mpy/probe/mqtt_probe.py); the baseline is paho-mqtt 2.x with the
same payloads, window and broker.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho

from ..testkit.broker import Mosquitto
from ..testkit.mpy_agent import BOARD_DIR, CODE_DIR, ROOT, micropython_command

PROBE = os.path.join(ROOT, "host_tests", "mpy", "probe", "mqtt_probe.py")


def micropython_run(port, count, window):
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([BOARD_DIR, CODE_DIR, ".frozen"]))
    options = {"port": port, "count": count, "window": window, "run_s": 300}
    result = subprocess.run(micropython_command() + ["-X", "heapsize=256wK", PROBE, json.dumps(options)],
                            capture_output=True, text=True, timeout=600, env=env)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    if summary["acked"] != count:
        raise RuntimeError("MicroPython client: %d of %d acknowledged" % (summary["acked"], count))
    seconds = (summary["elapsed_ms"] - summary["first_connect_ms"]) / 1000
    return {"msg_per_s": count / seconds, "ack_us_p50": summary["ack_us_p50"]}


def paho_run(port, count, window):
    done = threading.Condition()
    acked = []
    sent_at = {}
    acked_at = {}
    client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(window)

    def on_publish(client, userdata, mid, reason_code, properties):
        with done:
            acked_at[mid] = time.perf_counter()
            acked.append(mid)
            done.notify_all()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    payload = b"x" * 200
    started = time.perf_counter()
    for i in range(count):
        with done:
            while i - len(acked) >= window:
                done.wait(5)
        # publish outside ``done``: paho calls on_publish holding its own lock, which
        # publish also takes, so holding ``done`` here can deadlock the two threads
        sent = time.perf_counter()
        info = client.publish("probe/data", ("%d " % i).encode() + payload, qos=1)
        sent_at[info.mid] = sent
    with done:
        while len(acked) < count:
            done.wait(5)
    seconds = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    latencies = sorted(acked_at[mid] - sent_at[mid] for mid in sent_at)
    return {"msg_per_s": count / seconds, "ack_us_p50": latencies[len(latencies) // 2] * 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-bench-mqtt", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args(argv)
    with Mosquitto() as broker:
        rows = []
        for window in (16, 1):
            micro = micropython_run(broker.port, args.count, window)
            base = paho_run(broker.port, args.count, window)
            rows.append(("QoS 1 msg/s, %d in flight" % window, "%.0f" % micro["msg_per_s"],
                         "paho %.0f" % base["msg_per_s"], micro["msg_per_s"] / base["msg_per_s"]))
            if window == 1:
                rows.append(("publish -> PUBACK p50, one at a time", "%.2f ms" % (micro["ack_us_p50"] / 1000),
                             "paho %.2f ms" % (base["ack_us_p50"] / 1000),
                             micro["ack_us_p50"] / base["ack_us_p50"]))
    print("| figure | MicroPython client (unix port) | baseline | ratio |")
    print("| --- | --- | --- | --- |")
    for name, measured, baseline, ratio in rows:
        print("| %s | %s | %s | %.2f |" % (name, measured, baseline, ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
