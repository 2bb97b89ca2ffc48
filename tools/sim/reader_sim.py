"""Identification reader simulator: an NXP PN532 in HSU mode on a pseudo-terminal.

``evse-reader-sim --script taps.txt`` prints the device path the agent's ``identification.port``
should open. It answers the commands the agent sends (GetFirmwareVersion, SAMConfiguration,
RFConfiguration, InListPassiveTarget for 106 kbps type A, InRelease) with the frames of the
PN532 User Manual (UM0701-02): ACK first, then the answer frame; an unknown command gets
the error frame. Until it has seen the HSU wake-up byte ``55`` it stays asleep and silent.

Tags are tapped on a script: a file the simulator follows as it grows (tests append to it),
or stdin, one command a line:

- ``tap <UID hex> [seconds]`` — a card lies on the reader for at least that long (default
  0.5 s) and until one InListPassiveTarget has reported it: a tap is never missed;
- ``present <UID hex>`` / ``remove`` — a card that stays until removed;
- ``fault silent|garbage|corrupt|off`` — no answer at all (an unplugged reader), random
  bytes instead of answers, answers with a wrong data checksum, or back to normal.

Framing is written here independently of ``evse_agent.pn532`` so that each checks the other.
"""

import argparse
import asyncio
import binascii
import os
import random
import sys
import threading
import time

from .pty_link import PtyLink

FAULTS = ("silent", "garbage", "corrupt")
ACK = bytes([0, 0, 0xFF, 0, 0xFF, 0])
ERROR = bytes([0, 0, 0xFF, 1, 0xFF, 0x7F, 0x81, 0])
FIRMWARE = bytes([0x32, 0x01, 0x06, 0x07])  # IC PN532, version 1.6, supports ISO A, B, 18092


def frame(data):
    """A PN532-to-host information frame: TFI D5 and ``data``."""
    body = bytes([0xD5]) + bytes(data)
    length = len(body)
    return bytes([0, 0, 0xFF, length, (256 - length) & 0xFF]) + body + bytes([(256 - sum(body)) & 0xFF, 0])


def _parse_uid(text):
    uid = binascii.unhexlify(text)
    if len(uid) not in (4, 7, 10):
        raise ValueError("UID %r is not 4, 7 or 10 bytes" % text)
    return uid


class ReaderSimulator:
    """A simulated PN532 on a pty, run in its own thread (``start``/``stop``)."""

    def __init__(self, script_path=None, seed=11):
        self.script_path = script_path
        self.fault = None
        self.awake = False
        self.commands_seen = 0
        self.bad_frames_seen = 0
        self.reported = []  # UIDs (hex) reported by InListPassiveTarget, in order
        self.device = None
        self._tag = None  # (uid bytes, until monotonic or None for "present", reported)
        self._queue = []  # taps waiting for the reader to be free
        self._rx = bytearray()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._link = None
        self._fd = None
        self._ready = threading.Event()
        self._script_offset = 0

    # -- control (any thread) -------------------------------------------------------

    def tap(self, uid_hex, seconds=0.5):
        with self._lock:
            self._queue.append((_parse_uid(uid_hex), seconds))

    def present(self, uid_hex):
        with self._lock:
            self._tag = [_parse_uid(uid_hex), None, False]

    def remove(self):
        with self._lock:
            self._tag = None
            self._queue = []

    def card_present(self):
        """True while a card lies on the reader or waits to be tapped."""
        with self._lock:
            tag = self._tag
            if tag is not None and tag[1] is not None and tag[2] and time.monotonic() >= tag[1]:
                tag = None
            return tag is not None or bool(self._queue)

    def set_fault(self, fault):
        if fault is not None and fault not in FAULTS:
            raise ValueError("unknown fault %r (known: %s)" % (fault, ", ".join(FAULTS)))
        self.fault = fault

    def command(self, line):
        """One script line; returns an error text or None."""
        words = line.split()
        if not words or words[0].startswith("#"):
            return None
        try:
            if words[0] == "tap" and len(words) in (2, 3):
                self.tap(words[1], float(words[2]) if len(words) == 3 else 0.5)
            elif words[0] == "present" and len(words) == 2:
                self.present(words[1])
            elif words[0] == "remove" and len(words) == 1:
                self.remove()
            elif words[0] == "fault" and len(words) == 2:
                self.set_fault(None if words[1] == "off" else words[1])
            else:
                return "error: unknown command %r (tap UID [s], present UID, remove, fault NAME|off)" % line.strip()
        except ValueError as error:
            return "error: %s" % error
        return None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout_s=10):
        self._thread = threading.Thread(target=self._run, name="reader-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("reader simulator did not start within %s s" % timeout_s)
        return self.device

    def stop(self):
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self):
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._open())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._fd)
            os.close(self._fd)
            self._link.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _open(self):
        self._link = PtyLink()
        self._link.start()
        self.device = self._link.device_b
        self._fd = os.open(self._link.device_a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        if self.script_path:
            asyncio.ensure_future(self._follow_script())

    async def _follow_script(self):
        while True:
            try:
                with open(self.script_path) as handle:
                    handle.seek(self._script_offset)
                    text = handle.read()
            except OSError:
                text = ""
            complete = text[:text.rfind("\n") + 1]
            self._script_offset += len(complete.encode())
            for line in complete.splitlines():
                error = self.command(line)
                if error:
                    sys.stderr.write("reader-sim: %s\n" % error)
            await asyncio.sleep(0.05)

    # -- the PN532 ------------------------------------------------------------------

    def _on_readable(self):
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            return
        if not self.awake:
            index = data.find(b"\x55")
            if index < 0:
                return
            self.awake = True
            data = data[index:]
        self._rx.extend(data)
        while True:
            request = self._next_request()
            if request is None:
                break
            self._answer(request)

    def _next_request(self):
        buf = self._rx
        while True:
            start = buf.find(b"\x00\xff")
            if start < 0:
                del buf[:max(0, len(buf) - 1)]
                return None
            del buf[:start]
            if len(buf) < 4:
                return None
            length, lcs = buf[2], buf[3]
            if (length + lcs) & 0xFF or length == 0:
                del buf[:2]  # an ACK/NACK from the host, or noise
                continue
            if len(buf) < 4 + length + 2:
                return None
            body = bytes(buf[4:4 + length])
            dcs = buf[4 + length]
            del buf[:4 + length + 2]
            if (sum(body) + dcs) & 0xFF or body[0] != 0xD4 or len(body) < 2:
                self.bad_frames_seen += 1
                continue  # the PN532 ignores a frame with a bad checksum
            return body[1:]

    def _answer(self, request):
        self.commands_seen += 1
        fault = self.fault
        if fault == "silent":
            return
        if fault == "garbage":
            self._send(bytes(self._random.randrange(256) for _ in range(self._random.randrange(1, 24))))
            return
        code, params = request[0], request[1:]
        self._send(ACK)
        if code == 0x02:
            answer = [0x03] + list(FIRMWARE)
        elif code in (0x14, 0x32):
            answer = [code + 1]
        elif code == 0x52:
            answer = [0x53, 0x00]
        elif code == 0x4A and len(params) >= 2 and params[1] == 0x00:
            uid = self._current_uid()
            if uid is None:
                answer = [0x4B, 0x00]
            else:
                sens_res = [0x00, 0x44] if len(uid) == 7 else [0x00, 0x04]
                answer = [0x4B, 0x01, 0x01] + sens_res + [0x08 if len(uid) == 4 else 0x00, len(uid)] + list(uid)
        else:
            self._send(ERROR)
            return
        out = bytearray(frame(answer))
        if fault == "corrupt":
            out[-2] ^= 0x5A
        self._send(bytes(out))

    def _current_uid(self):
        now = time.monotonic()
        with self._lock:
            tag = self._tag
            if tag is not None and tag[1] is not None and tag[2] and now >= tag[1]:
                tag = self._tag = None
            if tag is None and self._queue:
                uid, seconds = self._queue.pop(0)
                tag = self._tag = [uid, now + seconds, False]
            if tag is None:
                return None
            tag[2] = True
            uid = tag[0]
        self.reported.append(binascii.hexlify(uid).decode().upper())
        return uid

    def _send(self, data):
        try:
            os.write(self._fd, data)
        except OSError:
            pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-reader-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--script", default=None, help="follow this file for tap commands (else stdin)")
    parser.add_argument("--link", default=None, help="also make this symlink to the device")
    args = parser.parse_args(argv)
    sim = ReaderSimulator(args.script)
    device = sim.start()
    if args.link:
        if os.path.lexists(args.link):
            os.unlink(args.link)
        os.symlink(device, args.link)
    print("PN532 reader on %s%s" % (device, " (link %s)" % args.link if args.link else ""), flush=True)
    try:
        if args.script:
            while True:
                time.sleep(3600)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            reply = sim.command(line)
            if reply:
                print(reply, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if args.link and os.path.islink(args.link):
            os.unlink(args.link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
