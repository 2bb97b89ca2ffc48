"""Pin bank of the host simulator board: the pin file written by ``evse-vehicle-sim``.

The file (``io.sim_file``, format in ``tools/sim/vehicle_sim.py``) is replaced atomically on
every change. The kernel announces each change (inotify on the file's directory, which is
created if missing), as a GPIO chip announces an edge: ``wait_change`` returns when the
file was written, replaced or removed, and ``read`` costs nothing until then. Any writer is
announced (the vehicle simulator, a test writing the file, a simulator started later,
restarted or killed). Where inotify cannot be had, ``wait_change`` waits ``sample_ms`` and
``read`` re-reads the file when its size, mtime or inode changed (one ``stat``).

No file yet means no simulator: +12 V (state A), 100 % duty, contactor open. A file that
cannot be used (torn, not JSON, a field of the wrong type) keeps the previous sample and
counts one error per version of the file.

The simulator has every line, so both contactor values are always reported. With
``io.pilot.source`` "lines" the sample carries the 5 comparator outputs a decoder board
would show for the file's voltage (and no voltage), so the lines path runs on the host too.
"""

import asyncio
import ctypes
import json
import os
import struct

from ...pilot import NOMINAL_VOLTS, A, PinSample, lines_from_voltage
from .gpio import Announcer


# inotify(7): the events on the directory that announce a new version of the pin file, and
# those after which the watch is gone (directory removed or moved, queue overflow).
_IN_MODIFY_DONE = 0x8 | 0x40 | 0x80 | 0x200  # IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO, IN_DELETE
_IN_WATCH_GONE = 0x400 | 0x800 | 0x4000 | 0x8000  # IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED
_IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC
_EVENT_HEAD = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, NUL-padded)

_libc = []  # the C library of this process, opened once


def _inotify_watch(directory):
    """A non-blocking inotify fd watching ``directory``; OSError when the kernel refuses."""
    if not _libc:
        _libc.append(ctypes.CDLL(None, use_errno=True))
    libc = _libc[0]
    fd = libc.inotify_init1(_IN_NONBLOCK_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1: %s" % os.strerror(ctypes.get_errno()))
    if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MODIFY_DONE | 0x400 | 0x800) < 0:
        errno = ctypes.get_errno()
        os.close(fd)
        raise OSError(errno, "inotify_add_watch %s: %s" % (directory, os.strerror(errno)))
    return fd


def _number(doc, name):
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise ValueError("%s is %s, expected a number" % (name, json.dumps(value)))
    return float(value)


def _flag(doc, name):
    value = doc.get(name)
    if not isinstance(value, bool):
        raise ValueError("%s is %s, expected true or false" % (name, json.dumps(value)))
    return value


class SimPinBank:
    """``read()`` gives the pin file's current sample; ``wait_change()`` waits for a new one;
    ``errors`` / ``last_error`` tell of bad files; ``announced``: a change not yet read."""

    def __init__(self, io_config):
        self.path = io_config["sim_file"]
        self.use_lines = io_config["pilot"]["source"] == "lines"
        self.sample_ms = io_config["pilot"]["sample_ms"]
        self.errors = 0
        self.last_error = None
        self.watch_error = None  # why the kernel cannot announce changes (then the file is polled)
        self._name = os.fsencode(os.path.basename(self.path))
        self._signature = None
        self._volts = None
        self._sample = PinSample()
        self._set(NOMINAL_VOLTS[A], 100.0, False, False)
        self._announcer = Announcer(self._drain)

    @property
    def announced(self):
        """A change not yet read; always True while the kernel is not watching (polled)."""
        return self._announcer.fd is None or self._announcer.announced

    # -- announcements ------------------------------------------------------------------

    def _arm(self):
        """Watch the pin file's directory on the running loop; False when that cannot be."""
        announcer = self._announcer
        loop = asyncio.get_running_loop()
        if announcer.fd is not None and announcer.loop is loop:
            return True
        self._disarm()
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            fd = _inotify_watch(directory)
        except (OSError, AttributeError) as error:
            if self.watch_error is None:
                self.watch_error = str(error)
            return False
        announcer.watch(fd, loop)
        announcer.announced = True  # whatever happened before the watch is read now
        return True

    def _disarm(self):
        fd = self._announcer.fd
        if fd is not None:
            self._announcer.unwatch()
            os.close(fd)

    def _drain(self):
        """The kernel's events: True for a new version of the file or a lost watch."""
        fd = self._announcer.fd
        gone = False
        mine = False
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                break
            except OSError:
                gone = True
                break
            if not data:
                break
            offset = 0
            while offset + 16 <= len(data):
                _, mask, _, length = _EVENT_HEAD.unpack_from(data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                if mask & _IN_WATCH_GONE:
                    gone = True
                elif name == self._name:
                    mine = True
        if gone:
            self._disarm()  # the next wait re-arms, and the file is read again
        return gone or mine

    async def wait_change(self, timeout_ms):
        """Return when the pin file may have changed, or after ``timeout_ms``."""
        if not self._arm():
            await asyncio.sleep(min(timeout_ms, self.sample_ms) / 1000)
            return
        await self._announcer.wait(timeout_ms)

    def _set(self, volts, duty, command, feedback):
        sample = self._sample
        if self.use_lines:
            sample.pilot_volts = None
            if volts != self._volts:
                sample.pilot_lines = lines_from_voltage(volts)
        else:
            sample.pilot_volts = volts
        self._volts = volts
        sample.duty_pct = duty
        sample.contactor_command = command
        sample.contactor_feedback = feedback

    def _fail(self, text):
        self.errors += 1
        self.last_error = "%s: %s" % (self.path, text)

    def read(self):
        """The current sample (the same object each time, updated in place); never raises.

        While the kernel announces changes, only an announced change costs a ``stat``."""
        announcer = self._announcer
        if announcer.fd is not None:
            if not announcer.announced:
                return self._sample
            announcer.announced = False
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self._signature is not None:
                self._signature = None
                self._set(NOMINAL_VOLTS[A], 100.0, False, False)
            return self._sample
        except OSError as error:
            self._fail("cannot stat (%s)" % error)
            return self._sample
        signature = (info.st_size, info.st_mtime_ns, info.st_ino)
        if signature == self._signature:
            return self._sample
        self._signature = signature
        try:
            with open(self.path, "rb") as handle:
                doc = json.loads(handle.read())
            if not isinstance(doc, dict):
                raise ValueError("expected a JSON object")
            volts = _number(doc, "pilot_v")
            duty = None if doc.get("duty_pct") is None else _number(doc, "duty_pct")
            command = _flag(doc, "contactor_command")
            feedback = _flag(doc, "contactor_feedback")
        except FileNotFoundError:
            self._signature = None  # replaced between stat and open: read it next time
            return self._sample
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._fail(str(error))
            return self._sample
        self._set(volts, duty, command, feedback)
        return self._sample

    def close(self):
        self._disarm()
