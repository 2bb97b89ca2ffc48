"""MQTT 3.1.1 publisher for MicroPython that never blocks the event loop.

The pilot is sampled on the same event loop as the broker link, so nothing here waits on a
socket: the socket is non-blocking and every wait is an ``asyncio`` stream wait (poll), with
a deadline. Two layers in one module: packet encoding/decoding (functions) and the link
(``MqttPublisher``: connect, keep alive, reconnect, in-flight tracking).

- ``publish`` encodes the whole packet (one write per packet; TCP_NODELAY where the stack
  has it) and queues it for the writer task; it returns at once with a token. QoS 1
  messages stay in flight, by packet id, until their PUBACK: several at a time, and
  ``drain_acked`` hands the acknowledged tokens to the forwarder (ack-driven cursor). A
  message still in flight when the link drops is sent again (DUP) on the next connection
  with the same token, so no acknowledgement is ever lost to the caller.
- Buffer bound: queued plus unacknowledged packets up to ``MAX_BUFFERED`` bytes (one
  message is always taken when nothing is buffered); past it, or while disconnected,
  ``publish`` returns None and the forwarder retries on the next activity.
- Keep-alive: PINGREQ every ``keepalive_s / 2``; a PINGRESP or PUBACK that does not come
  within ``keepalive_s / 2`` drops the link (a silent or black-holed broker is found out,
  not trusted).
- Reconnect after any failure — refused CONNACK, EOF or a reset mid-packet, a deadline
  missed while connecting or writing — with back-off from ``mqtt.reconnect_min_s`` doubling
  to ``reconnect_max_s`` (back to the minimum after a connection was accepted).
- On connect: clean session, last will ``offline`` (retained, QoS 1), then ``online``
  (retained, QoS 1), the subscriptions again, then what was in flight.
- TLS when the board asks (``mqtt.tls``): ``ssl.SSLContext``, handshake without blocking.
- The broker's name is looked up with ``socket.getaddrinfo``, which waits for the resolver
  (as ``asyncio.open_connection`` does): give ``mqtt.host`` as an address on a board.

``subscribe`` takes the few topics the core listens to (Home Assistant's birth message);
callbacks run in the reader task and only hand the message over. ``round_trip`` serves the
console's selftest. ``make_socket`` can be replaced (tests hand in a socket double).
"""

import asyncio
import errno
import socket

from ... import log

ONLINE = b"online"
OFFLINE = b"offline"
CONNECT_TIMEOUT_S = 5      # TCP + TLS + CONNACK
WRITE_TIMEOUT_S = 5        # a packet that cannot be written for this long: the link is dead
MAX_BUFFERED = 32768       # bytes queued + unacknowledged
# "Try again" on a non-blocking socket; 118/119 are what lwIP (ESP32) reports for it.
_BUSY = (errno.EAGAIN, errno.EINPROGRESS, errno.ETIMEDOUT, 118, 119)
_REFUSALS = ("", "unacceptable protocol version", "client id rejected", "server unavailable",
             "bad user name or password", "not authorised")

CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBACK = 0x90
UNSUBACK = 0xB0
PINGRESP = 0xD0


class MqttError(OSError):
    """A broker that breaks the protocol or refuses us (handled like any link failure)."""


def _length_bytes(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return out


def _bytes(value):
    return value.encode() if isinstance(value, str) else value


def _field(value):
    value = _bytes(value)
    return bytes((len(value) >> 8, len(value) & 0xFF)) + value


def publish_packet(topic, payload, qos, retain, pid):
    """One PUBLISH packet, in one buffer."""
    topic = _bytes(topic)
    payload = _bytes(payload)
    size = 2 + len(topic) + (2 if qos else 0) + len(payload)
    head = _length_bytes(size)
    packet = bytearray(1 + len(head) + size)
    packet[0] = PUBLISH | (qos << 1) | (1 if retain else 0)
    i = 1 + len(head)
    packet[1:i] = head
    packet[i] = len(topic) >> 8
    packet[i + 1] = len(topic) & 0xFF
    i += 2
    packet[i:i + len(topic)] = topic
    i += len(topic)
    if qos:
        packet[i] = pid >> 8
        packet[i + 1] = pid & 0xFF
        i += 2
    packet[i:] = payload
    return packet


def connect_packet(client_id, keepalive_s, will_topic, will_message, username=None, password=None):
    """CONNECT, clean session, with a retained QoS 1 last will."""
    flags = 0x02 | 0x04 | 0x08 | 0x20
    body = _field(client_id) + _field(will_topic) + _field(will_message)
    if username is not None:
        flags |= 0x80
        body += _field(username)
        if password is not None:
            flags |= 0x40
            body += _field(password)
    variable = b"\x00\x04MQTT\x04" + bytes((flags, keepalive_s >> 8, keepalive_s & 0xFF))
    size = len(variable) + len(body)
    return bytes((0x10,)) + _length_bytes(size) + variable + body


def _der(path):
    """The first PEM block of ``path`` as DER (mbedtls takes PEM only NUL-terminated)."""
    import binascii
    with open(path, "rb") as handle:
        data = handle.read()
    if b"-----BEGIN" not in data:
        return data
    body = data.split(b"-----BEGIN", 1)[1].split(b"-----END", 1)[0]
    return binascii.a2b_base64(b"".join(body.split(b"\n")[1:]))


def _writable(sock):
    """Wait until ``sock`` can be written, as ``asyncio.open_connection`` does after connect."""
    from asyncio import core
    yield core._io_queue.queue_write(sock)


def _with_pid(kind, pid, body=b""):
    return bytes((kind, 2 + len(body), pid >> 8, pid & 0xFF)) + body


class MqttPublisher:
    """The agent's link to one broker; ``run()`` keeps it, ``publish()`` never waits."""

    def __init__(self, mqtt_config, status_topic, clock):
        self.config = mqtt_config
        self.status_topic = status_topic
        self.clock = clock
        self.connected = False
        self.connects = 0
        self.last_error = None
        self.on_activity = None
        self.make_socket = socket.socket
        self._stream = None
        self._out = []               # packets waiting for the writer, in order
        self._out_ready = asyncio.Event()
        self._down = asyncio.Event()
        self._inflight = {}          # pid -> [token, packet, sent_ms]
        self._buffered = 0
        self._acked = []
        self._next_token = 1
        self._next_pid = 0
        self._ping_sent_ms = None
        self._subscriptions = {}     # topic -> on_message(payload bytes)
        self._stopping = False
        self._small = bytearray(4)   # PUBACK, SUBACK, PINGRESP bodies land here

    # -- the core's interface ---------------------------------------------------------

    def publish(self, topic, payload, qos=0, retain=False):
        """Queue one message; a token (QoS 1: reported by ``drain_acked`` on PUBACK), or
        None when not connected or the buffer is full."""
        if not self.connected:
            return None
        return self._publish(topic, payload, qos, retain, True)

    def drain_acked(self):
        acked = self._acked
        if not acked:
            return ()
        self._acked = []
        return acked

    def subscribe(self, topic, on_message):
        """Call ``on_message(payload)`` (bytes) for every message on ``topic``, from now on
        and after every reconnect."""
        self._subscriptions[topic] = on_message
        if self.connected:
            self._send_subscribe(topic)

    async def round_trip(self, topic, timeout_s):
        """Publish a probe on ``topic`` and receive it back; the milliseconds it took."""
        import binascii
        import os
        if not self.connected:
            raise OSError("not connected to the broker (%s)" % (self.last_error or "no answer yet"))
        probe = binascii.hexlify(os.urandom(8))
        arrived = asyncio.Event()

        def on_message(payload):
            if bytes(payload) == probe:
                arrived.set()

        self._subscriptions[topic] = on_message
        started = self.clock.monotonic_ms()
        try:
            self._send_subscribe(topic)  # the broker handles our packets in order
            if self._publish(topic, probe, 1, False, False) is None:
                raise OSError("publish refused: buffer full")
            await asyncio.wait_for(arrived.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise OSError("the probe did not come back within %.0f s" % timeout_s)
        finally:
            del self._subscriptions[topic]
            if self.connected:
                self._send_topic(0xA2, topic, b"")  # UNSUBSCRIBE
        return self.clock.monotonic_ms() - started

    def stop(self):
        """Say ``offline`` (retained) and disconnect, so the will is not needed."""
        self._stopping = True
        stream = self._stream
        if self.connected and stream is not None and not self._out:
            try:
                stream.s.write(publish_packet(self.status_topic, OFFLINE, 0, True, 0))
                stream.s.write(b"\xe0\x00")
            except OSError:
                pass
        self._close()
        self._down.set()
        self._out_ready.set()

    # -- packets out ------------------------------------------------------------------

    def _new_pid(self):
        pid = self._next_pid
        while True:
            pid = pid + 1 if pid < 65535 else 1
            if pid not in self._inflight:
                self._next_pid = pid
                return pid

    def _publish(self, topic, payload, qos, retain, tracked):
        pid = self._new_pid() if qos else 0
        packet = publish_packet(topic, payload, qos, retain, pid)
        if self._buffered and self._buffered + len(packet) > MAX_BUFFERED:
            return None
        token = None
        if tracked:
            token = self._next_token
            self._next_token += 1
        if qos:
            self._inflight[pid] = [token, packet, self.clock.monotonic_ms()]
            self._buffered += len(packet)
        self._queue(packet)
        return token if tracked else pid

    def _send_subscribe(self, topic):
        self._send_topic(0x82, topic, b"\x01")  # SUBSCRIBE, QoS 1

    def _send_topic(self, kind, topic, suffix):
        body = _field(topic) + suffix
        pid = self._new_pid()
        self._queue(bytes((kind,)) + _length_bytes(2 + len(body)) + bytes((pid >> 8, pid & 0xFF)) + body)

    def _queue(self, packet):
        self._out.append(packet)
        self._out_ready.set()

    async def _writer(self, stream):
        out = self._out
        while True:
            if not out:
                self._out_ready.clear()
                await self._out_ready.wait()
                continue
            stream.write(out.pop(0))
            await asyncio.wait_for(stream.drain(), WRITE_TIMEOUT_S)

    # -- packets in -------------------------------------------------------------------

    async def _read_into(self, stream, view):
        got = 0
        while got < len(view):
            try:
                count = await stream.readinto(view[got:])
            except OSError as error:
                if error.errno not in _BUSY:
                    raise
                count = None
            if count is None:
                continue
            if count == 0:
                raise MqttError("the broker closed the connection")
            got += count

    async def _read_packet(self, stream):
        """(first byte, body): the body is a view of a shared buffer for small packets."""
        small = self._small
        view = memoryview(small)
        await self._read_into(stream, view[:1])
        kind = small[0]
        size = 0
        shift = 0
        while True:
            await self._read_into(stream, view[:1])
            size |= (small[0] & 0x7F) << shift
            if not small[0] & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MqttError("malformed remaining length")
        body = view[:size] if size <= len(small) else memoryview(bytearray(size))
        await self._read_into(stream, body)
        return kind, body

    async def _reader(self, stream):
        while True:
            kind, body = await self._read_packet(stream)
            kind_type = kind & 0xF0
            if kind_type == PUBACK:
                entry = self._inflight.pop((body[0] << 8) | body[1], None)
                if entry is not None:
                    self._buffered -= len(entry[1])
                    if entry[0] is not None:
                        self._acked.append(entry[0])
                        if len(self._acked) == 1:
                            self._signal()
            elif kind_type == PINGRESP:
                self._ping_sent_ms = None
            elif kind_type == PUBLISH:
                self._incoming(kind, body, stream)
            elif kind_type == SUBACK:
                if body[2] == 0x80:
                    log.warning("MQTT broker refused a subscription (SUBACK 0x80)")
            elif kind_type != UNSUBACK:
                raise MqttError("unexpected packet type 0x%02x" % kind)

    def _incoming(self, kind, body, stream):
        length = (body[0] << 8) | body[1]
        topic = str(bytes(body[2:2 + length]), "utf-8")
        start = 2 + length
        if kind & 0x06:
            self._queue(_with_pid(PUBACK, (body[start] << 8) | body[start + 1]))
            start += 2
        on_message = self._subscriptions.get(topic)
        if on_message is not None:
            on_message(bytes(body[start:]))

    # -- the link ---------------------------------------------------------------------

    def _signal(self):
        if self.on_activity is not None:
            self.on_activity()

    def _open(self):
        config = self.config
        info = socket.getaddrinfo(config["host"], config["port"], 0, socket.SOCK_STREAM)[0]
        sock = self.make_socket(info[0], info[1], info[2])
        sock.setblocking(False)
        try:
            sock.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY (where the stack has it)
        except (OSError, TypeError):
            pass
        try:
            sock.connect(info[-1])
        except OSError as error:
            if error.errno not in _BUSY:
                sock.close()
                raise
        tls = config["tls"]
        if tls["enabled"]:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.verify_mode = ssl.CERT_NONE if tls["insecure"] else ssl.CERT_REQUIRED
            if tls["ca_file"]:
                context.load_verify_locations(cadata=_der(tls["ca_file"]))
            if tls["cert_file"] and tls["key_file"]:
                context.load_cert_chain(_der(tls["cert_file"]), _der(tls["key_file"]))
            sock = context.wrap_socket(sock, server_hostname=config["host"], do_handshake_on_connect=False)
            sock.setblocking(False)
        return asyncio.StreamReader(sock)  # MicroPython: one Stream reads and writes

    async def _handshake(self, stream):
        config = self.config
        await _writable(stream.s)  # the TCP connect finished (lwIP refuses writes before)
        client_id = config["client_id"]
        if not client_id:
            import binascii
            import os
            client_id = "evse-" + binascii.hexlify(os.urandom(6)).decode()
        stream.write(connect_packet(client_id, config["keepalive_s"], self.status_topic, OFFLINE,
                                    config["username"], config["password"]))
        await stream.drain()
        kind, body = await self._read_packet(stream)
        if kind != CONNACK or len(body) != 2:
            raise MqttError("expected CONNACK, got packet 0x%02x of %d bytes" % (kind, len(body)))
        if body[1]:
            code = body[1]
            raise MqttError("connect refused: %s (CONNACK %d)"
                            % (_REFUSALS[code] if code < len(_REFUSALS) else "unknown reason", code))

    async def _session(self):
        """One connection, from TCP connect until it fails; raises why it ended."""
        self._down.clear()
        self._out.clear()
        stream = self._stream = self._open()
        try:
            await asyncio.wait_for(self._handshake(stream), CONNECT_TIMEOUT_S)
        except BaseException:  # a failed or cancelled connect leaves no socket behind
            self._close()
            raise
        reader = asyncio.create_task(self._guard(self._reader(stream)))
        writer = asyncio.create_task(self._guard(self._writer(stream)))
        self._ping_sent_ms = None
        try:
            self.connected = True
            self.connects += 1
            self.last_error = None
            log.info("MQTT connected to %s:%s" % (self.config["host"], self.config["port"]))
            self._publish(self.status_topic, ONLINE, 1, True, False)
            for topic in self._subscriptions:
                self._send_subscribe(topic)
            now = self.clock.monotonic_ms()
            for entry in self._inflight.values():  # in pid order of insertion
                entry[1][0] |= 0x08  # DUP
                entry[2] = now
                self._queue(entry[1])
            self._signal()
            await self._keep_alive()
        finally:
            self.connected = False
            reader.cancel()
            writer.cancel()
            self._close()
            self._signal()

    async def _guard(self, work):
        try:
            await work
        except Exception as error:  # any failure ends this connection
            self._fail(error)

    def _fail(self, error):
        if not self._down.is_set():
            self._error = error
            self._down.set()

    async def _keep_alive(self):
        interval_ms = self.config["keepalive_s"] * 500
        self._error = None
        while True:
            try:
                await asyncio.wait_for_ms(self._down.wait(), interval_ms)
                break
            except asyncio.TimeoutError:
                pass
            now = self.clock.monotonic_ms()
            if self._ping_sent_ms is not None and now - self._ping_sent_ms >= interval_ms:
                raise MqttError("no PINGRESP within %d ms" % interval_ms)
            for entry in self._inflight.values():
                if now - entry[2] >= interval_ms:
                    raise MqttError("no PUBACK within %d ms" % interval_ms)
            if self._ping_sent_ms is None:
                self._ping_sent_ms = now
                self._queue(b"\xc0\x00")
        if self._error is not None:
            raise self._error

    def _close(self):
        stream = self._stream
        self._stream = None
        if stream is not None:
            try:
                stream.s.close()
            except OSError:
                pass

    async def run(self, network_up=None):
        """Keep the connection until ``stop``: connect, serve, and after any failure wait
        (back-off) and connect again."""
        config = self.config
        delay = config["reconnect_min_s"]
        while not self._stopping:
            if network_up is not None and not network_up():
                await asyncio.sleep(1)
                continue
            connects = self.connects
            try:
                await self._session()
            except Exception as error:  # OSError, MqttError, TimeoutError, MemoryError...
                text = "%s: %s" % (type(error).__name__, error) if not isinstance(error, MqttError) else str(error)
                if self._stopping:
                    break
                if self.connects != connects:
                    delay = config["reconnect_min_s"]
                    log.warning("MQTT disconnected: %s; reconnecting in %s s" % (text, delay))
                elif text != self.last_error:
                    log.warning("MQTT broker %s:%s: %s; retrying in %s s"
                                % (config["host"], config["port"], text, delay))
                self.last_error = text
            if self._stopping:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, config["reconnect_max_s"])
