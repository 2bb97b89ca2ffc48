"""NXP PN532 NFC reader in HSU (UART) mode: framing, commands, and a tag-polling task.

Frames, from the PN532 User Manual (UM0701-02, section 6.2 "Host controller
communication protocol"):

- normal information frame: ``00 00 FF LEN LCS TFI PD0..PDn DCS 00`` — preamble
  ``00``, start code ``00 FF``, ``LEN`` = bytes of TFI + data, ``LCS`` with
  ``LEN + LCS == 0 (mod 256)``, ``TFI`` ``D4`` host to PN532 and ``D5`` back, ``DCS`` with
  ``TFI + PD0 + ... + PDn + DCS == 0 (mod 256)``, postamble ``00``;
- extended information frame: ``00 00 FF FF FF LENM LENL LCS TFI ... DCS 00``
  (``LENM + LENL + LCS == 0``); this module never sends one and reads one like any frame;
- ACK ``00 00 FF 00 FF 00`` (the PN532 took the command), NACK ``00 00 FF FF 00 00``
  (host asks for the last frame again);
- error frame ``00 00 FF 01 FF 7F 81 00``: an information frame of one byte ``7F``
  (syntax error: the PN532 could not parse the command).

HSU wake-up (the user manual's "HSU wake up condition"): after power-on or power-down
the PN532 sleeps and needs a long preamble, ``55 55`` then zeros, before the first command. ``SAMConfiguration`` (``D4 14 01 ...``,
normal mode) must follow, or the PN532 drops back to sleep.

Commands used: ``GetFirmwareVersion`` (``02`` -> ``03 IC Ver Rev Support``, IC ``32``),
``SAMConfiguration`` (``14 Mode Timeout IRQ`` -> ``15``), ``RFConfiguration`` item 5
(``32 05 MxRtyATR MxRtyPSL MxRtyPassiveActivation`` -> ``33``: with a finite retry count
``InListPassiveTarget`` answers "no target" instead of waiting for a card forever),
``InListPassiveTarget`` (``4A MaxTg BrTy`` with ``BrTy`` 00 = 106 kbps ISO/IEC 14443
type A -> ``4B NbTg [Tg SENS_RES(2) SEL_RES NFCIDLength NFCID1 [ATS]]``).

The parser is incremental: it takes whatever the UART delivers (split anywhere), skips
garbage until a start code, and reports every bad length or data checksum as an error
while it resynchronises on the next start code. Nothing here raises on line noise.

The reader task (``Pn532Reader.run``) wakes and configures the PN532, polls for a type A
target, and reports each tap once: the same UID seen again within ``debounce_ms`` of
its last sighting is a repeat (a card resting on the reader), not a new tap. A silent or
unplugged reader is logged once when it goes and once when it comes back, and retried;
counters say what happened (``stats``).
"""

import asyncio
import binascii

from . import log

TFI_HOST = 0xD4
TFI_PN532 = 0xD5
ACK = b"\x00\x00\xff\x00\xff\x00"
NACK = b"\x00\x00\xff\xff\x00\x00"
ERROR_FRAME = b"\x00\x00\xff\x01\xff\x7f\x81\x00"
# Wake-up: 0x55 0x55 then enough zeros to fill the PN532's wake-up delay at 115200 baud.
WAKE_UP = b"\x55\x55" + bytes(14)

CMD_GET_FIRMWARE_VERSION = 0x02
CMD_SAM_CONFIGURATION = 0x14
CMD_RF_CONFIGURATION = 0x32
CMD_IN_LIST_PASSIVE_TARGET = 0x4A
CMD_IN_RELEASE = 0x52
BAUD_106_TYPE_A = 0x00

# ISO/IEC 14443-3 UIDs: single (4), double (7) or triple (10) size. OCMF's ISO14443
# identification type (Table 17) takes 4 or 7 bytes: 8 or 14 hex digits.
UID_LENGTHS = (4, 7)


def checksum(data):
    """The byte that makes ``sum(data) + checksum == 0 (mod 256)`` (LCS, DCS)."""
    return (-sum(data)) & 0xFF


def build_frame(payload, tfi=TFI_HOST):
    """The normal information frame carrying ``payload`` (command code and parameters)."""
    length = len(payload) + 1
    if length > 255:
        raise ValueError("PN532 frame payload of %d bytes is longer than 254" % len(payload))
    body = bytearray((tfi,))
    body.extend(payload)
    frame = bytearray(b"\x00\x00\xff")
    frame.append(length)
    frame.append(checksum((length,)))
    frame.extend(body)
    frame.append(checksum(body))
    frame.append(0)
    return bytes(frame)


def build_command(code, params=b""):
    """A host-to-PN532 command frame: ``D4 code params``."""
    payload = bytearray((code,))
    payload.extend(params)
    return build_frame(payload)


class ParserStats:
    """What the parser has seen: frames by kind, and every kind of bad input."""

    __slots__ = ("frames", "acks", "nacks", "error_frames", "bad_length_checksum",
                 "bad_data_checksum", "bad_postamble", "garbage_bytes")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class FrameParser:
    """Turns a byte stream from the PN532 into frames; ``feed`` takes any split.

    ``feed(data)`` returns a list of ``(kind, body)``: ``("ack", b"")``, ``("nack", b"")``,
    ``("error", b"\\x7f")`` for the error frame, ``("frame", TFI + data)`` for an
    information frame with good checksums, and ``("bad", reason)`` for a frame that was
    dropped (its bytes are then searched again for a start code).
    """

    MAX_BUFFER = 600

    def __init__(self):
        self.stats = ParserStats()
        self._buf = bytearray()

    def reset(self):
        self._buf = bytearray()

    def feed(self, data):
        self._buf.extend(data)
        out = []
        while True:
            item = self._next()
            if item is None:
                break
            out.append(item)
        return out

    def _skip(self, count):
        self.stats.garbage_bytes += count
        self._buf = self._buf[count:]

    def _next(self):
        buf = self._buf
        stats = self.stats
        start = buf.find(b"\x00\xff")
        if start < 0:
            # Keep a trailing 00: it may be the first half of a start code.
            keep = 1 if buf and buf[-1] == 0 else 0
            if len(buf) - keep:
                # Leading preamble zeros are not garbage.
                garbage = len(buf) - keep - _leading_zeros(buf, len(buf) - keep)
                stats.garbage_bytes += garbage
                self._buf = buf[len(buf) - keep:]
            return None
        if start:
            stats.garbage_bytes += start - _leading_zeros(buf, start)
            buf = self._buf = buf[start:]
        # buf starts with 00 FF
        if len(buf) < 4:
            return None
        length, lcs = buf[2], buf[3]
        if length == 0x00 and lcs == 0xFF:
            self._buf = buf[5:] if len(buf) > 4 and buf[4] == 0 else buf[4:]
            stats.acks += 1
            return ("ack", b"")
        if length == 0xFF and lcs == 0x00:
            self._buf = buf[5:] if len(buf) > 4 and buf[4] == 0 else buf[4:]
            stats.nacks += 1
            return ("nack", b"")
        header = 4
        if length == 0xFF and lcs == 0xFF:  # extended frame
            if len(buf) < 7:
                return None
            length = (buf[4] << 8) | buf[5]
            if (buf[4] + buf[5] + buf[6]) & 0xFF or length > self.MAX_BUFFER:
                stats.bad_length_checksum += 1
                self._skip(2)
                return ("bad", "bad extended length checksum")
            header = 7
        elif (length + lcs) & 0xFF:
            stats.bad_length_checksum += 1
            self._skip(2)
            return ("bad", "bad length checksum LEN %02X LCS %02X" % (length, lcs))
        if length == 0:
            stats.bad_length_checksum += 1
            self._skip(2)
            return ("bad", "information frame of length 0")
        total = header + length + 2  # data, DCS, postamble
        if len(buf) < total:
            return None
        body = bytes(buf[header:header + length])
        dcs = buf[header + length]
        postamble = buf[header + length + 1]
        if checksum(body) != dcs:
            stats.bad_data_checksum += 1
            self._skip(2)
            return ("bad", "bad data checksum DCS %02X, computed %02X" % (dcs, checksum(body)))
        self._buf = buf[total:]
        if postamble != 0:
            stats.bad_postamble += 1  # counted; the frame itself is whole and checked
        if body == b"\x7f":
            stats.error_frames += 1
            return ("error", body)
        stats.frames += 1
        return ("frame", body)


def _leading_zeros(buf, limit):
    count = 0
    while count < limit and buf[count] == 0:
        count += 1
    return count


def parse_passive_target(data):
    """The UID (upper-case hex) of the first target in an ``InListPassiveTarget`` answer.

    ``data`` is the answer after TFI and response code: ``NbTg [Tg SENS_RES(2) SEL_RES
    NFCIDLength NFCID1...]``. Returns None for "no target"; raises ValueError for an
    answer that does not hold together or a UID whose length OCMF cannot carry.
    """
    if not data:
        raise ValueError("empty InListPassiveTarget answer")
    count = data[0]
    if count == 0:
        return None
    if count > 2:
        raise ValueError("InListPassiveTarget answer lists %d targets (at most 2)" % count)
    if len(data) < 6:
        raise ValueError("InListPassiveTarget answer of %d bytes is too short" % len(data))
    uid_len = data[5]
    if len(data) < 6 + uid_len:
        raise ValueError("target says NFCID1 of %d bytes, answer holds %d" % (uid_len, len(data) - 6))
    if uid_len not in UID_LENGTHS:
        raise ValueError("UID of %d bytes (ISO 14443 identification takes 4 or 7)" % uid_len)
    return binascii.hexlify(bytes(data[6:6 + uid_len])).decode().upper()


class ReaderError(Exception):
    """A command that got no usable answer. ``kind`` names it for counters."""

    kind = "error"

    def __init__(self, kind, text):
        super().__init__(text)
        self.kind = kind


class ReaderStats:
    """Counters of the reader task."""

    __slots__ = ("polls", "taps", "repeats", "timeouts", "no_ack", "nacks", "error_frames",
                 "bad_frames", "bad_answers", "wakeups", "offline_transitions")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class Pn532Reader:
    """Polls a PN532 on ``stream`` for ISO 14443A tags and calls ``on_tag(uid_hex)``.

    ``stream`` is the byte stream the Modbus master uses (``write``, ``await read(max,
    timeout_ms)``, ``reset_input``); ``clock`` gives ``monotonic_ms()``. ``poll_ms`` is
    the pause between polls, ``debounce_ms`` how long a UID must be absent before the
    same UID counts as a new tap, ``timeout_ms`` the wait for an ACK and for an answer.
    """

    def __init__(self, stream, clock, on_tag, poll_ms=250, debounce_ms=2000, timeout_ms=300,
                 retry_ms=2000):
        self.stream = stream
        self.clock = clock
        self.on_tag = on_tag
        self.poll_ms = poll_ms
        self.debounce_ms = debounce_ms
        self.timeout_ms = timeout_ms
        self.retry_ms = retry_ms
        self.parser = FrameParser()
        self.stats = ReaderStats()
        self.online = None  # None until the first answer or failure
        self.firmware = None
        self.last_error = None
        self._last_uid = None
        self._last_seen_ms = None
        self._stopping = False
        self._pending = []  # parsed items not yet consumed

    def stop(self):
        self._stopping = True

    def status(self):
        """A small dict for status reports and the console."""
        doc = {"online": self.online, "firmware": self.firmware, "last_error": self.last_error}
        doc.update(self.stats.as_dict())
        doc.update(("frame_" + k, v) for k, v in self.parser.stats.as_dict().items())
        return doc

    async def run(self):
        """Configure, then poll until ``stop()``; never raises for anything on the line."""
        while not self._stopping:
            try:
                if not self.online:
                    await self._configure()
                    self._set_online(True, None)
                uid = await self.poll_once()
                if uid is not None:
                    self._seen(uid)
                await asyncio.sleep(self.poll_ms / 1000)
            except ReaderError as error:
                self.last_error = "%s: %s" % (error.kind, error)
                self._set_online(False, error)
                await asyncio.sleep(self.retry_ms / 1000)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the port itself failed (unplugged USB adapter)
                # pyserial raises termios.error, not an OSError, for a vanished tty.
                self.last_error = "port: %r" % (error,)
                self._set_online(False, error)
                await asyncio.sleep(self.retry_ms / 1000)

    def _set_online(self, online, error):
        if online == self.online:
            return
        self.online = online
        if online:
            log.info("id reader: PN532 online (firmware %s)" % self.firmware)
        else:
            self.stats.offline_transitions += 1
            log.warning("id reader: PN532 not answering (%s); retrying every %d ms"
                        % (error, self.retry_ms))

    async def _configure(self):
        self.stats.wakeups += 1
        self.stream.reset_input()
        self.parser.reset()
        self._pending = []
        self.stream.write(WAKE_UP)
        version = await self.command(CMD_GET_FIRMWARE_VERSION)
        if len(version) < 4:
            raise ReaderError("answer", "GetFirmwareVersion answer %s too short" % _hex(version))
        self.firmware = "IC %02X v%d.%d" % (version[0], version[1], version[2])
        await self.command(CMD_SAM_CONFIGURATION, b"\x01\x14\x00")
        # One passive activation attempt: InListPassiveTarget answers "no target" at once.
        await self.command(CMD_RF_CONFIGURATION, b"\x05\xff\x01\x01")

    async def poll_once(self):
        """One InListPassiveTarget for a type A target: its UID, or None."""
        self.stats.polls += 1
        answer = await self.command(CMD_IN_LIST_PASSIVE_TARGET, bytes((1, BAUD_106_TYPE_A)))
        try:
            uid = parse_passive_target(answer)
        except ValueError as error:
            self.stats.bad_answers += 1
            log.warning("id reader: %s" % error)
            return None
        if uid is not None:
            # Release the target so the next poll activates it afresh.
            await self.command(CMD_IN_RELEASE, b"\x00")
        return uid

    def _seen(self, uid):
        now = self.clock.monotonic_ms()
        repeat = (uid == self._last_uid and self._last_seen_ms is not None
                  and now - self._last_seen_ms < self.debounce_ms)
        self._last_uid = uid
        self._last_seen_ms = now
        if repeat:
            self.stats.repeats += 1
            return
        self.stats.taps += 1
        log.info("id reader: tag %s" % uid)
        self.on_tag(uid)

    async def command(self, code, params=b""):
        """Send one command; the data of its answer (after TFI and response code).

        Waits for the ACK and then the answer frame, each within ``timeout_ms``; a NACK or
        a bad frame in between is counted and the command sent once more."""
        frame = build_command(code, params)
        for attempt in (0, 1):
            self.stream.write(frame)
            try:
                kind, body = await self._receive(ack=True)
                if kind == "ack":
                    kind, body = await self._receive(ack=False)
            except ReaderError as error:
                if attempt or error.kind == "timeout":
                    raise
                continue
            if kind == "frame":
                if len(body) < 2 or body[0] != TFI_PN532 or body[1] != code + 1:
                    self.stats.bad_answers += 1
                    if attempt:
                        raise ReaderError("answer", "answer %s does not answer command %02X"
                                          % (_hex(body[:4]), code))
                    continue
                return body[2:]
            if kind == "error":
                self.stats.error_frames += 1
                if attempt:
                    raise ReaderError("error_frame", "PN532 error frame for command %02X" % code)
            # a NACK or an ACK out of place: send again
        raise ReaderError("answer", "no answer to command %02X" % code)

    async def _receive(self, ack):
        """The next ACK (``ack``) or frame from the PN532 within the timeout."""
        deadline = self.clock.monotonic_ms() + self.timeout_ms
        while True:
            while self._pending:
                kind, body = self._pending.pop(0)
                if kind == "bad":
                    self.stats.bad_frames += 1
                    log.debug("id reader: dropped frame (%s)" % body)
                    raise ReaderError("frame", body)
                if kind == "nack":
                    self.stats.nacks += 1
                    return kind, body
                if ack or kind != "ack":
                    return kind, body
            remaining = deadline - self.clock.monotonic_ms()
            if remaining <= 0:
                if ack:
                    self.stats.no_ack += 1
                self.stats.timeouts += 1
                raise ReaderError("timeout", "no %s within %d ms" % ("ACK" if ack else "answer", self.timeout_ms))
            chunk = await self.stream.read(64, remaining)
            if chunk:
                self._pending.extend(self.parser.feed(chunk))


def _hex(data):
    return " ".join("%02X" % b for b in data)
