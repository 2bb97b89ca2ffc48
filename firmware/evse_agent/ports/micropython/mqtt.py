"""MQTT publisher on micropython-lib's ``umqtt.simple``, with our own reconnect policy.

``umqtt.simple`` is one blocking client: ``publish`` with QoS 1 returns once the broker's
PUBACK arrived, so a token is acknowledged when ``publish`` returns (the forwarder's window
is then effectively one message in flight). ``umqtt.robust`` is not used: its reconnect loop
blocks (and would starve the watchdog task); instead ``run()`` reconnects with back-off
(``mqtt.reconnect_min_s`` .. ``reconnect_max_s``), publishes the retained ``online`` status
on connect, sets the last will to ``offline``, and sends PINGREQ every keepalive / 2. Every
socket operation has a timeout, so a dead broker costs seconds, not the station.

``subscribe`` takes the few topics the core listens to (Home Assistant's birth message); they
are subscribed again on every connect, and ``run`` reads incoming messages once a second with
``check_msg``. A callback may be called in the middle of a ``publish`` (umqtt reads whatever
arrives while it waits for the PUBACK), so callbacks only hand the message over.
"""

import asyncio

from umqtt.simple import MQTTClient, MQTTException

from ... import log

ONLINE = b"online"
OFFLINE = b"offline"
SOCKET_TIMEOUT_S = 5


class UmqttPublisher:
    def __init__(self, mqtt_config, status_topic, clock):
        self.config = mqtt_config
        self.status_topic = status_topic
        self.clock = clock
        self.connected = False
        self.connects = 0
        self.last_error = None
        self.on_activity = None
        self._acked = []
        self._next = 1
        self._last_io_ms = 0
        self.client = None
        self._stopping = False
        self._subscriptions = {}  # topic -> on_message(payload bytes)

    def _new_client(self):
        config = self.config
        tls = config["tls"]
        context = None
        if tls["enabled"]:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if tls["ca_file"]:
                context.load_verify_locations(cafile=tls["ca_file"])
            if tls["cert_file"] and tls["key_file"]:
                context.load_cert_chain(tls["cert_file"], tls["key_file"])
            context.verify_mode = ssl.CERT_NONE if tls["insecure"] else ssl.CERT_REQUIRED
        client = MQTTClient(config["client_id"], config["host"], config["port"],
                            user=config["username"], password=config["password"],
                            keepalive=config["keepalive_s"], ssl=context)
        client.set_last_will(self.status_topic, OFFLINE, retain=True, qos=1)
        return client

    def _connect(self):
        client = self._new_client()
        try:
            client.connect(timeout=SOCKET_TIMEOUT_S)  # umqtt.simple >= 1.4
        except TypeError:
            client.connect()
        client.sock.settimeout(SOCKET_TIMEOUT_S)
        client.publish(self.status_topic, ONLINE, True, 1)
        client.set_callback(self._on_message)
        for topic in self._subscriptions:
            self._subscribe(client, topic)
        self.client = client
        self.connected = True
        self.connects += 1
        self._last_io_ms = self.clock.monotonic_ms()
        log.info("MQTT connected to %s:%s" % (self.config["host"], self.config["port"]))
        self._signal()

    def subscribe(self, topic, on_message):
        """Call ``on_message(payload)`` (bytes) for every message on ``topic``, from the next
        check on and after every reconnect."""
        self._subscriptions[topic] = on_message
        if self.connected:
            try:
                self._subscribe(self.client, topic)
            except OSError as error:
                self._lost(error)

    def _subscribe(self, client, topic):
        try:
            client.subscribe(topic, 1)
        except MQTTException as error:  # SUBACK 0x80: the broker refused (ACL)
            log.warning("MQTT broker refused the subscription to %s (%s)" % (topic, error))

    def _on_message(self, topic, payload):
        on_message = self._subscriptions.get(topic.decode() if isinstance(topic, bytes) else topic)
        if on_message is not None:
            on_message(payload)

    def _lost(self, error):
        if self.connected:
            log.warning("MQTT connection lost: %s; reconnecting" % (error,))
        self.connected = False
        self.last_error = str(error)
        try:
            self.client.sock.close()
        except Exception:
            pass
        self._signal()

    def publish(self, topic, payload, qos=0, retain=False):
        """Send now; a token (acknowledged at once for QoS 1: PUBACK came back), or None."""
        if not self.connected:
            return None
        try:
            self.client.publish(topic, payload, retain, qos)
        except OSError as error:
            self._lost(error)
            return None
        self._last_io_ms = self.clock.monotonic_ms()
        token = self._next
        self._next += 1
        if qos:
            self._acked.append(token)
        return token

    def drain_acked(self):
        acked = self._acked
        self._acked = []
        return acked

    def _signal(self):
        if self.on_activity is not None:
            self.on_activity()

    async def run(self, network_up=None):
        """Keep the connection: connect with back-off, ping, read PINGRESP; until ``stop``."""
        delay = self.config["reconnect_min_s"]
        keepalive_ms = self.config["keepalive_s"] * 1000
        while not self._stopping:
            if not self.connected:
                if network_up is not None and not network_up():
                    await asyncio.sleep(1)
                    continue
                try:
                    self._connect()
                    delay = self.config["reconnect_min_s"]
                except OSError as error:
                    self.last_error = "connect: %s" % (error,)
                    log.warning("MQTT broker %s:%s: %s; retrying in %d s"
                                % (self.config["host"], self.config["port"], error, delay))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.config["reconnect_max_s"])
                    continue
            try:
                if self.clock.monotonic_ms() - self._last_io_ms >= keepalive_ms // 2:
                    self.client.ping()
                    self._last_io_ms = self.clock.monotonic_ms()
                self.client.check_msg()  # one PINGRESP or subscribed message, if any
            except OSError as error:
                self._lost(error)
            await asyncio.sleep(1)

    def stop(self):
        """Say ``offline`` (retained) and disconnect, so the will is not needed."""
        self._stopping = True
        if self.connected:
            try:
                self.client.publish(self.status_topic, OFFLINE, True, 1)
                self.client.disconnect()
            except OSError:
                pass
            self.connected = False

