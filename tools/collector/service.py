"""The collector's MQTT side: a persistent MQTT 5 session, QoS 1, acknowledged only after
the database has committed.

paho's network thread only queues what arrives (callbacks stay thin); one writer thread
(``run``) takes whatever is queued as a batch, stores it in one transaction, and only then
acknowledges each QoS 1 message (paho ``manual_ack``). A collector killed at any moment
has acknowledged only what is committed; the broker keeps the rest for the collector's
session (``clean_start`` false, a session expiry interval, a fixed client id) and delivers
it again — duplicates are dropped by the database.

It subscribes to ``<prefix>/+/<channel>`` for the channels it stores or keeps (not the
telemetry). With ``group`` these are MQTT 5 shared subscriptions
(``$share/<group>/<prefix>/+/session`` ...): the broker hands each message to one collector of the
group, so several collectors (each with its own client id) split one fleet.
"""

import logging
import queue
import socket
import ssl
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from evse_agent.messages import iso_utc

from .ingest import SUBSCRIBED_CHANNELS, BatchResult, Ingestor, Message

log = logging.getLogger("evse.collector")

DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
DEFAULT_RECEIVE_MAXIMUM = 1000
# Gaps open longer than this are logged (once per interval): a shorter one is usually a
# share-group neighbour's batch not committed yet, or a record still on its way.
GAP_REPORT_S = 60.0
RETRY_DELAY_S = (0.5, 10.0)


def subscription_topics(prefix, group=None):
    """``<prefix>/+/<channel>`` of each channel the collector stores or keeps (not the
    telemetry), or the shared subscriptions of ``group``."""
    if group is not None and (not group or any(c in group for c in "/+#")):
        raise ValueError("share group %r must be one non-empty topic level without wildcards" % group)
    topics = ["%s/+/%s" % (prefix, channel) for channel in SUBSCRIBED_CHANNELS]
    return topics if group is None else ["$share/%s/%s" % (group, topic) for topic in topics]


def default_client_id(group=None):
    """``evse-collector[-<group>]-<host name>``: stable across restarts of one collector."""
    return "evse-collector-%s%s" % ("" if group is None else group + "-", socket.gethostname())


class BrokerSettings:
    """Where and how to connect: the agent's MQTT options, plus the session's."""

    def __init__(self, host="127.0.0.1", port=1883, prefix="evse", group=None, client_id=None,
                 username=None, password=None, tls=False, ca_file=None, cert_file=None,
                 key_file=None, tls_insecure=False, keepalive_s=30,
                 session_expiry_s=DEFAULT_SESSION_EXPIRY_S, receive_maximum=DEFAULT_RECEIVE_MAXIMUM):
        self.host = host
        self.port = port
        self.prefix = prefix
        self.group = group
        self.topics = subscription_topics(prefix, group)
        self.former_topic = "%s/+/#" % prefix if group is None else "$share/%s/%s/+/#" % (group, prefix)
        self.client_id = client_id or default_client_id(group)
        self.username = username
        self.password = password
        self.tls = tls or ca_file is not None
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.tls_insecure = tls_insecure
        self.keepalive_s = keepalive_s
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum


def parse_broker(text):
    """(host, port) of ``HOST:PORT`` or ``HOST`` (port 1883); ValueError naming the text."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not host or not 0 < number < 65536:
        raise ValueError("broker %r is not HOST:PORT" % text)
    return host, number


class CollectorService:
    """Subscribes with ``settings`` and stores into ``store`` until ``stop()``."""

    def __init__(self, settings, store):
        self.settings = settings
        self.store = store
        self.ingestor = Ingestor(store, settings.prefix)
        self.totals = BatchResult()
        self.batches = 0
        self.subscribed = threading.Event()
        self.gap_report_s = GAP_REPORT_S
        self._next_gap_report = time.monotonic() + self.gap_report_s
        self._queue = queue.Queue()
        self._stopping = threading.Event()
        self.client = self._make_client()

    def _make_client(self):
        settings = self.settings
        client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                             client_id=settings.client_id, protocol=paho.MQTTv5, manual_ack=True)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file,
                           keyfile=settings.key_file, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(settings.tls_insecure)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # -- paho callbacks (network thread): record and queue, nothing else ------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.settings.host, self.settings.port,
                      reason_code)
            return
        log.info("connected to %s:%d as %s (session %s); subscribing to %s", self.settings.host,
                 self.settings.port, self.settings.client_id,
                 "resumed" if flags.session_present else "new", ", ".join(self.settings.topics))
        if flags.session_present:
            # A session from before the collector left out the telemetry still holds the
            # whole prefix's filter, which would deliver the telemetry (and the rest twice).
            client.unsubscribe(self.settings.former_topic)
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in self.settings.topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        failed = [code for code in reason_codes if code.is_failure]
        if failed:
            log.error("subscription to %s refused: %s", ", ".join(self.settings.topics), failed[0])
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.subscribed.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from %s:%d (%s); reconnecting", self.settings.host,
                        self.settings.port, reason_code)

    def _on_message(self, client, userdata, msg):
        self._queue.put(Message(msg.topic, msg.payload, msg.qos, mid=msg.mid))

    # -- running ---------------------------------------------------------------------------

    def start(self):
        """Connect in the background (and keep reconnecting)."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        properties.ReceiveMaximum = self.settings.receive_maximum
        self.client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s,
                                  clean_start=False, properties=properties)
        self.client.loop_start()
        return self

    def stop(self):
        """Ask ``run`` to store what is queued and return."""
        self._stopping.set()

    def run(self):
        """Store and acknowledge batches until ``stop()``; then disconnect (the broker keeps
        the session and whatever was not acknowledged)."""
        try:
            while True:
                if time.monotonic() >= self._next_gap_report:
                    self._report_gaps()
                try:
                    batch = [self._queue.get(timeout=0.2)]
                except queue.Empty:
                    if self._stopping.is_set():
                        break
                    continue
                while len(batch) < 10 * self.settings.receive_maximum:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not self._store(batch):
                    break
                for message in batch:
                    if message.qos > 0:
                        self.client.ack(message.mid, message.qos)
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def _report_gaps(self):
        """Log the gaps that have stayed open for ``gap_report_s``; ``evse-collector status``
        lists them."""
        self._next_gap_report = time.monotonic() + self.gap_report_s
        try:
            stations, records = self.ingestor.lasting_gaps(iso_utc(time.time() - self.gap_report_s))
        except self.store.failures as error:
            log.error("reading the gaps failed: %s", error)
            return
        if stations:
            log.warning("%d station(s) miss %d record(s) for over %.0f s (evse-collector status lists them)",
                        stations, records, self.gap_report_s)

    def _store(self, batch):
        """Store one batch, retrying while the database fails; False if stopped meanwhile."""
        delay = RETRY_DELAY_S[0]
        while True:
            try:
                self.store.ensure_connected()
                result = self.ingestor.store_batch(batch)
                break
            except self.store.failures as error:  # nothing of the batch was stored
                log.error("storing %d messages failed: %s; retrying in %.1f s", len(batch), error, delay)
                if self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, RETRY_DELAY_S[1])
            except Exception:
                if len(batch) == 1:
                    log.exception("message on %s could not be stored; skipped", batch[0].topic)
                    result = BatchResult()
                    result.received = result.malformed = 1
                    self.store.count({"received": 1, "malformed": 1})
                    break
                log.exception("a batch of %d messages could not be stored; storing one at a time",
                              len(batch))
                return all(self._store([message]) for message in batch)
        self.batches += 1
        for name, value in result.as_dict().items():
            setattr(self.totals, name, getattr(self.totals, name) + value)
        return True

    def wait_subscribed(self, timeout_s):
        """True once the subscription is in place."""
        return self.subscribed.wait(timeout_s)
