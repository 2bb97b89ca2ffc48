"""A paho subscriber that collects what a broker delivers, for the demo and tests."""

import json
import threading
import time

import paho.mqtt.client as paho


class Message:
    """One received message: topic, raw payload, retained flag, and JSON body if any."""

    __slots__ = ("topic", "payload", "retain", "received", "body")

    def __init__(self, topic, payload, retain):
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.received = time.monotonic()
        try:
            self.body = json.loads(payload)
        except ValueError:
            self.body = None

    @property
    def text(self):
        return self.payload.decode("utf-8", "replace")

    def __repr__(self):
        return "Message(%s, %s)" % (self.topic, self.text[:80])


def subscribed_client(broker, client_id, topic, on_message, options, protocol=paho.MQTTv311, timeout_s=10):
    """A paho client on ``broker`` with its network loop running, subscribed to ``topic``
    (``options``: a QoS or SubscribeOptions) and handing each message to ``on_message``;
    raises once ``timeout_s`` pass without the subscription in place."""
    subscribed = threading.Event()
    client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol)
    if isinstance(options, int):
        client.on_connect = lambda client, *args: client.subscribe(topic, options)
    else:
        client.on_connect = lambda client, *args: client.subscribe(topic, options=options)
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port, 60)
    client.loop_start()
    if not subscribed.wait(timeout_s):
        client.loop_stop()
        raise RuntimeError("%s could not subscribe to %s" % (client_id, topic))
    return client


class Collector:
    """Subscribes to ``topic`` and keeps every message; ``on_message`` sees each as it comes."""

    def __init__(self, host, port, topic="evse/#", qos=1, on_message=None, client_id=None,
                 tls_ca_file=None, username=None, password=None, clean_session=True,
                 reconnect_delay=(1, 2)):
        self.messages = []
        self._cond = threading.Condition()
        self._on_message_cb = on_message
        self._topic = topic
        self._qos = qos
        self._subscribed = threading.Event()
        client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                             client_id=client_id or "", protocol=paho.MQTTv311,
                             clean_session=clean_session)
        if tls_ca_file is not None:
            client.tls_set(ca_certs=tls_ca_file)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.reconnect_delay_set(*reconnect_delay)
        client.connect(host, port, 30)
        client.loop_start()
        self.client = client
        if not self._subscribed.wait(60):
            raise RuntimeError("subscriber could not subscribe on %s:%d" % (host, port))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe(self._topic, qos=self._qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._subscribed.set()

    def _on_message(self, client, userdata, msg):
        message = Message(msg.topic, msg.payload, msg.retain)
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
        if self._on_message_cb is not None:
            self._on_message_cb(message)

    def on(self, suffix):
        """Messages whose topic ends with ``/suffix``."""
        with self._cond:
            return [m for m in self.messages if m.topic.endswith("/" + suffix)]

    def wait_for(self, predicate, timeout_s=60):
        """The first message matching ``predicate``, waiting up to ``timeout_s``; None if none."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            seen = 0
            while True:
                for message in self.messages[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
