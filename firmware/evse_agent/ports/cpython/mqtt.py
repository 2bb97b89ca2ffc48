"""MQTT publisher on paho-mqtt 2.x: retained online status, last will, explicit reconnect policy.

Callbacks are thin: they record link state and acknowledgements; the core calls
``publish`` and collects ``drain_acked`` for the QoS 1 records it tracks. paho runs its network
loop in its own thread and resends unacknowledged QoS 1 messages after a reconnect;
``on_activity`` (set by the port's wiring) is called from that thread on every PUBACK
and connection change. ``subscribe`` takes the few topics the core listens to (Home
Assistant's birth message); the session is clean, so they are subscribed again on every connect.
"""

import asyncio
import os
import ssl
import sys
import threading
import time

import paho.mqtt.client as paho

from ... import log

ONLINE = "online"
OFFLINE = "offline"


class MqttPublisher:
    """Publishes the agent's messages to one broker; reconnects by itself with back-off."""

    def __init__(self, mqtt_config, status_topic):
        self.config = mqtt_config
        self.status_topic = status_topic
        self.connected = False
        self.connects = 0
        self.last_error = None
        self.on_activity = None
        self._connected_event = threading.Event()
        # Acknowledgement bookkeeping, shared with paho's thread. Never hold this lock while
        # calling into paho: paho calls on_publish with its own lock held (lock order).
        self._ack_lock = threading.Lock()
        self._watched = set()  # mids of QoS 1 messages the core tracks
        self._acked = set()
        self._early = {}  # mid -> monotonic time: PUBACKs (or QoS 0 sends) not yet matched
        self._subscriptions = {}  # topic -> on_message(payload bytes)
        client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=mqtt_config["client_id"],
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if mqtt_config["username"] is not None:
            client.username_pw_set(mqtt_config["username"], mqtt_config["password"])
        tls = mqtt_config["tls"]
        if tls["enabled"]:
            client.tls_set(ca_certs=tls["ca_file"], certfile=tls["cert_file"],
                           keyfile=tls["key_file"], cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(tls["insecure"])
        client.will_set(status_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(int(max(1, mqtt_config["reconnect_min_s"])),
                                   int(mqtt_config["reconnect_max_s"]))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    def start(self):
        """Connect in the background; publishing works as soon as the broker answers."""
        config = self.config
        self.client.connect_async(config["host"], config["port"], config["keepalive_s"])
        self.client.loop_start()

    def wait_connected(self, timeout_s):
        """True once connected within ``timeout_s`` seconds."""
        return self._connected_event.wait(timeout_s)

    def publish(self, topic, payload, qos=0, retain=False):
        """Queue one message; returns a token for ``drain_acked`` (the mid), or None when
        paho refused it. QoS 1 messages are kept by paho while disconnected and sent (again)
        on reconnect."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos and info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            with self._ack_lock:
                if self._early.pop(info.mid, None) is not None:
                    self._acked.add(info.mid)  # the PUBACK beat us here
                else:
                    self._watched.add(info.mid)
            return info.mid
        if info.rc == paho.MQTT_ERR_SUCCESS:
            return info.mid
        return None

    def subscribe(self, topic, on_message):
        """Call ``on_message(payload)`` (bytes) for every message on ``topic``, from now on and
        after every reconnect. It runs in paho's network thread: it must be quick and only
        hand the message over (set a flag, queue it)."""
        self._subscriptions[topic] = on_message
        self.client.message_callback_add(topic, lambda client, userdata, message: on_message(message.payload))
        if self.connected:
            self.client.subscribe(topic, qos=1)

    async def round_trip(self, topic, timeout_s):
        """Publish a probe on ``topic`` and receive it back through this client's own
        subscription (the console's selftest); returns the milliseconds it took. Raises
        OSError saying what failed."""
        if not self.connected:
            raise OSError("not connected to the broker (%s)" % (self.last_error or "no answer yet"))
        loop = asyncio.get_running_loop()
        received = loop.create_future()
        probe = os.urandom(8).hex().encode()

        def on_message(client, userdata, message):
            if message.payload == probe:
                loop.call_soon_threadsafe(lambda: received.done() or received.set_result(None))

        client = self.client
        client.message_callback_add(topic, on_message)
        started = time.monotonic()
        try:
            # The broker handles a client's packets in order: the subscription is in place
            # before the probe arrives.
            result, _ = client.subscribe(topic, qos=1)
            if result != paho.MQTT_ERR_SUCCESS:
                raise OSError("subscribe refused: %s" % paho.error_string(result))
            info = client.publish(topic, probe, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise OSError("publish refused: %s" % paho.error_string(info.rc))
            await asyncio.wait_for(received, timeout_s)
        except asyncio.TimeoutError:
            raise OSError("the probe did not come back within %.0f s" % timeout_s)
        finally:
            client.message_callback_remove(topic)
            client.unsubscribe(topic)
        return int((time.monotonic() - started) * 1000)

    def drain_acked(self):
        """Tokens of the QoS 1 messages the broker acknowledged since the last call."""
        with self._ack_lock:
            if not self._acked:
                return ()
            acked = self._acked
            self._acked = set()
        return acked

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._ack_lock:
            if mid in self._watched:
                self._watched.discard(mid)
                self._acked.add(mid)
                # One wake-up per batch: the forwarder collects every PUBACK that arrived
                # before it drains, so only the first one after a drain needs to wake it.
                if len(self._acked) > 1:
                    return
            else:
                now = time.monotonic()
                self._early[mid] = now
                if len(self._early) > 256:
                    # QoS 0 sends land here too; forget old ones before mids wrap around.
                    for old in [m for m, t in self._early.items() if now - t > 30]:
                        del self._early[old]
                # No wake-up: a QoS 0 send acknowledges nothing, and an early PUBACK is
                # matched by ``publish`` itself, which the forwarder's pump collects after.
                return
        self._signal()

    def _signal(self):
        callback = self.on_activity
        if callback is not None:
            callback()

    def stop(self):
        """Say ``offline`` (retained) and disconnect cleanly, so the will is not needed."""
        if self.connected:
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_error = "connect refused: %s" % reason_code
            log.warning("MQTT broker %s:%s refused connection: %s"
                        % (self.config["host"], self.config["port"], reason_code))
            return
        self.connected = True
        self.connects += 1
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        log.info("MQTT connected to %s:%s" % (self.config["host"], self.config["port"]))
        self._connected_event.set()
        self._signal()

    def _on_connect_fail(self, client, userdata):
        # paho calls this inside its ``except OSError`` around the connection attempt, and
        # passes no reason: the exception being handled is the reason (DNS, refused, TLS).
        error = sys.exc_info()[1]
        reason = "%s: %s" % (type(error).__name__, error) if error is not None else "no answer"
        text = "cannot connect: %s" % reason
        if text != self.last_error:
            # Once per distinct reason: a broker that stays away does not flood the log.
            log.warning("MQTT broker %s:%s: %s; retrying"
                        % (self.config["host"], self.config["port"], text))
        self.last_error = text

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was_connected = self.connected
        self.connected = False
        self._connected_event.clear()
        if reason_code.is_failure or reason_code.value != 0:
            text = "disconnected: %s" % reason_code
            if was_connected:
                log.warning("MQTT disconnected: %s; reconnecting" % reason_code)
            elif text != self.last_error:
                # Closed before CONNACK (plain MQTT to a TLS port, a broker that drops us).
                log.warning("MQTT broker %s:%s closed the connection before accepting it: %s; retrying"
                            % (self.config["host"], self.config["port"], reason_code))
            self.last_error = text
        self._signal()
