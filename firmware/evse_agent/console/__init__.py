"""Technician console: commands over the agent's own objects, on a serial line.

Technicians service a charger on site with any terminal program (screen, minicom, picocom,
PuTTY) at 115200 8N1 on the console port the board file names. The console is an interface,
not a second agent: every command reads or changes the objects the agent runs on (meter,
inputs, session engine, power monitor, journal, forwarder, publisher, config, log), and
finished sessions are read back from the journal.

- ``LineEditor`` turns the bytes a terminal sends into lines: backspace and delete edit;
  CR, LF, CRLF and CR NUL end a line; escape sequences (arrow keys), other control bytes,
  C1 controls and invalid UTF-8 are dropped; an over-long line is refused whole.
- ``PinLock``: read-only commands are open; changing settings and restarting need
  ``unlock <PIN>``. The board file holds only a salted SHA-256 of the PIN
  (``console.pin_hash``). Each wrong PIN doubles the wait before the next try (1 s, 2 s,
  4 s ... up to 5 min) and is reported as a ``console_unlock_failed`` event; the count and
  the wait are kept in the state directory, so a restart gives no fresh fast tries. The
  console locks again after ``console.lock_after_s`` without input.
- ``Console``: the command table and one task (``run``). A command that waits (a meter
  read, the selftest) awaits like any other task, so the poller never waits for the console.

Command groups load on first use (RAM is spent only on what a technician uses): the
package holds the line editor, the PIN lock, the task and ``help``/``unlock``/``lock``/
``restart``; each other group is a module whose functions become ``Console`` methods when
one of its commands first runs — ``status`` (status, pilot), ``meter``, ``sessions``
(session, sessions), ``records`` (events, journal, mqtt, log), ``settings`` (config),
``selftest``, ``identification`` (id) — and ``help`` holds every command's help text.

The port hands in the serial line as a byte stream: ``await read(max_bytes, timeout_ms)``
(b"" on timeout) and ``write(data)``, which never blocks (the port queues, and sends each
newline as CRLF).
"""

import asyncio
import binascii
import hashlib
import json

from .. import __version__, log
from ..messages import iso_utc

WIDTH = 80  # every table fits an 80-column terminal
READ_MAX = 256
TICK_MS = 500  # how often the idle console checks the inactivity lock
WATCH_MS = 200
ROUND_TRIP_S = 3.0
PIN_MIN = 4
PIN_MAX = 32
MAX_DELAY_S = 300
PROBE_FILE = "selftest.probe"
MASKED = ("mqtt.password", "console.pin_hash")  # never shown, not even to an unlocked console

PILOT_MEANING = {
    "A": "no vehicle",
    "B": "vehicle connected",
    "C": "charging",
    "D": "charging, ventilation required",
    "E": "error: pilot shorted to PE",
    "F": "EVSE unavailable",
}


class CommandError(Exception):
    """What is wrong with a command line; shown as one ``error:`` line."""


# -- small text helpers ------------------------------------------------------------------


def _fit(text, width):
    """``text`` cut to ``width`` characters, marked with ... when cut."""
    return text if len(text) <= width else text[:max(0, width - 3)] + "..."


def _pad(text, width):
    text = _fit(text, width)
    return text + " " * (width - len(text))


def _rpad(text, width):
    text = _fit(text, width)
    return " " * (width - len(text)) + text


def _shown(word):
    """A word the technician typed, quoted for an error line."""
    return "'%s'" % _fit(word, 24)


def _duration(seconds):
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = "%02d:%02d:%02d" % (rest // 3600, rest // 60 % 60, rest % 60)
    return "%d d %s" % (days, text) if days else text


def _date_time(epoch_s):
    """``2026-11-25 10:22:01`` (UTC)."""
    text = iso_utc(epoch_s)
    return text[:10] + " " + text[11:19]


def _size(n):
    if n < 1024:
        return "%d B" % n
    if n < 1024 * 1024:
        return "%.1f KiB" % (n / 1024)
    return "%.1f MiB" % (n / 1048576)


def _error_text(error):
    kind = getattr(error, "kind", None)
    text = str(error) or type(error).__name__
    return "%s: %s" % (kind, text) if kind else text


def _closed(value):
    return "-" if value is None else ("closed" if value else "open")


def _number(text, name, low, high):
    """An integer argument (decimal, or hex with 0x) within [low, high]."""
    digits = text.lower()
    base = 10
    if digits.startswith("0x"):
        digits, base = digits[2:], 16
    allowed = "0123456789abcdef" if base == 16 else "0123456789"
    if not digits or len(digits) > 12 or any(ch not in allowed for ch in digits):
        raise CommandError("%s %s is not a number (decimal, or hex with 0x)" % (name, _shown(text)))
    value = int(digits, base)
    if not low <= value <= high:
        raise CommandError("%s %s is outside %d..%d" % (name, text, low, high))
    return value


def _count_arg(args, name, default, high):
    """The optional count argument of ``sessions``, ``events`` and ``log``."""
    if not args:
        return default
    if len(args) > 1:
        raise CommandError("%s takes at most one argument, a count" % name)
    return _number(args[0], "count", 1, high)


def _no_args(args, name):
    if args:
        raise CommandError("%s takes no arguments (got %s)" % (name, _shown(" ".join(args))))


def match(word, names, what="command", known=None):
    """The one name ``word`` stands for: an exact name, or the only name it begins.

    ``known`` replaces the list of names in the error for an unknown word."""
    word = word.lower()
    if word in names:
        return word
    found = [name for name in names if name.startswith(word)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CommandError("ambiguous %s %s: could be %s" % (what, _shown(word), ", ".join(found)))
    raise CommandError("unknown %s %s; %s" % (what, _shown(word), known or "try " + ", ".join(names)))


# -- the PIN -----------------------------------------------------------------------------


def pin_problem(pin):
    """Why ``pin`` cannot be a console PIN, or None: 4-32 printable ASCII, no spaces."""
    if not PIN_MIN <= len(pin) <= PIN_MAX:
        return "a PIN has %d to %d characters, this one %d" % (PIN_MIN, PIN_MAX, len(pin))
    for ch in pin:
        if not 33 <= ord(ch) <= 126:
            return "a PIN is printable ASCII without spaces (found %r)" % ch
    return None


def _digest(salt, pin):
    return hashlib.sha256(salt + pin.encode()).digest()


def pin_hash(pin, salt):
    """The board-file form of ``pin``: ``sha256:<salt hex>:<SHA-256(salt + PIN) hex>``."""
    problem = pin_problem(pin)
    if problem:
        raise ValueError(problem)
    return "sha256:%s:%s" % (binascii.hexlify(salt).decode(), binascii.hexlify(_digest(salt, pin)).decode())


def pin_matches(pin, stored):
    """True if ``pin`` hashes to ``stored``; the comparison takes as long wherever they differ."""
    _, salt, expected = stored.split(":")
    digest = _digest(binascii.unhexlify(salt), pin)
    expected = binascii.unhexlify(expected)
    diff = len(digest) ^ len(expected)
    for a, b in zip(digest, expected):
        diff |= a ^ b
    return diff == 0


class PinLock:
    """Whether state-changing commands are allowed: unlocked by the PIN, locked again after
    ``lock_after_s`` without input, a doubling wait after each wrong PIN."""

    __slots__ = ("pin_hash", "lock_after_ms", "unlocked", "last_input_ms", "failures", "retry_at_ms")

    def __init__(self, pin_hash, lock_after_s, now_ms):
        self.pin_hash = pin_hash
        self.lock_after_ms = int(lock_after_s * 1000)
        self.unlocked = False
        self.last_input_ms = now_ms
        self.failures = 0  # wrong PINs in a row
        self.retry_at_ms = now_ms

    def set_pin_hash(self, pin_hash):
        """Use a new ``console.pin_hash`` (None: nothing unlocks) from the next ``unlock``."""
        self.pin_hash = pin_hash

    def set_lock_after(self, lock_after_s):
        """Use a new ``console.lock_after_s`` from the next inactivity check."""
        self.lock_after_ms = int(lock_after_s * 1000)

    def touch(self, now_ms):
        self.last_input_ms = now_ms

    def expire(self, now_ms):
        """Lock after the inactivity time; True when this call locked it."""
        if self.unlocked and now_ms - self.last_input_ms >= self.lock_after_ms:
            self.unlocked = False
            return True
        return False

    def wait_s(self, now_ms):
        """Whole seconds before another PIN is tried (0: now)."""
        return max(0, (self.retry_at_ms - now_ms + 999) // 1000)

    def try_pin(self, pin, now_ms):
        """Check ``pin`` (the caller has checked ``wait_s``); True unlocks."""
        if pin_matches(pin, self.pin_hash):
            self.unlocked = True
            self.failures = 0
            self.last_input_ms = now_ms
            return True
        self.failures += 1
        self.retry_at_ms = now_ms + 1000 * min(MAX_DELAY_S, 1 << min(self.failures - 1, 16))
        return False


# -- the line editor ---------------------------------------------------------------------


class LineEditor:
    """Bytes from a terminal in, finished lines out, with the echo the terminal should show.

    ``push(byte)`` returns None while a line goes on, ``(text, None)`` for a finished line,
    or ``(None, problem)`` for a refused one. ``echo`` collects the bytes to send back (the
    typed characters, ``BS SP BS`` for a rubout, a newline at the end of a line); with
    ``mask`` set, typed characters echo as ``*``.
    """

    def __init__(self, max_line=256):
        self.max_line = max_line
        self.mask = False
        self.echo = bytearray()
        self._line = bytearray()
        self._too_long = False
        self._after_cr = False
        self._escape = 0  # 1 after ESC, 2 inside a CSI / SS3 sequence
        self._need = 0  # UTF-8 continuation bytes still expected
        self._low = 0x80  # allowed range of the next continuation byte
        self._high = 0xBF
        self._char_start = 0

    def set_max_line(self, max_line):
        """Use a new ``console.max_line`` from the next byte."""
        self.max_line = max_line

    def push(self, byte):
        after_cr = self._after_cr
        self._after_cr = False
        if self._escape:
            if self._escape == 1 and byte in (0x5B, 0x4F):  # ESC [ or ESC O: a key sequence
                self._escape = 2
                return None
            if byte >= 0x20:
                if self._escape == 1 or byte >= 0x40:
                    self._escape = 0  # ESC x (Alt-x) or the final byte of a sequence
                return None
            self._escape = 0  # a control byte ends the sequence and counts as itself
        if self._need:
            if self._low <= byte <= self._high:
                self._line.append(byte)
                self._need -= 1
                self._low, self._high = 0x80, 0xBF
                if not self._need:
                    self._char_done()
                return None
            self._line = self._line[:self._char_start]  # an incomplete character: drop it
            self._need = 0
        if byte == 0x0D:
            self._after_cr = True
            return self._end()
        if byte == 0x0A or byte == 0x00:
            return None if after_cr else (self._end() if byte == 0x0A else None)
        if byte == 0x08 or byte == 0x7F:
            self._rubout()
        elif byte == 0x03 or byte == 0x15:  # Ctrl-C, Ctrl-U: forget the line
            self.clear()
            self.echo.extend(b"^C\n")
            return ("", None)
        elif byte == 0x1B:
            self._escape = 1
        elif byte == 0x09:
            self._add(0x20)
        elif 0x20 <= byte < 0x7F:
            self._add(byte)
        elif 0xC2 <= byte <= 0xF4:
            self._start_char(byte)
        return None  # other control bytes, stray continuation bytes, invalid leads

    def take_key(self, byte):
        """A key used up outside line editing (``meter watch`` stops on one): False for the
        LF or NUL that follows a CR, which is part of the Enter before it."""
        if self._after_cr and (byte == 0x0A or byte == 0x00):
            self._after_cr = False
            return False
        self._after_cr = byte == 0x0D
        return True

    def _add(self, byte):
        if self._room(1):
            self._line.append(byte)
            self.echo.append(0x2A if self.mask else byte)

    def _room(self, n):
        if self._too_long:
            return False
        if len(self._line) + n > self.max_line:
            self._too_long = True
            self.echo.extend(b"\x07")  # bell: nothing more is taken
            return False
        return True

    def _start_char(self, lead):
        need = 1 if lead < 0xE0 else (2 if lead < 0xF0 else 3)
        if not self._room(need + 1):
            return
        self._char_start = len(self._line)
        self._line.append(lead)
        self._need = need
        # Second-byte ranges that rule out overlong forms, surrogates and code points > U+10FFFF.
        self._low, self._high = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F),
                                 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))

    def _char_done(self):
        char = self._line[self._char_start:]
        if char[0] == 0xC2 and char[1] < 0xA0:  # C1 control (U+0080-U+009F): drop
            self._line = self._line[:self._char_start]
            return
        self.echo.extend(b"*" if self.mask else char)

    def _rubout(self):
        if self._too_long or not self._line:
            return
        end = len(self._line) - 1
        while end > 0 and 0x80 <= self._line[end] <= 0xBF:
            end -= 1
        self._line = self._line[:end]
        self.echo.extend(b"\x08 \x08")

    def _end(self):
        too_long = self._too_long
        text = bytes(self._line).decode() if not too_long else None
        self.clear()
        self.echo.extend(b"\n")
        if too_long:
            return (None, "line longer than %d bytes; ignored" % self.max_line)
        return (text, None)

    def clear(self):
        """Forget the line being typed."""
        self._line = bytearray()
        self._too_long = False
        self._need = 0
        self._escape = 0


# -- the command table -------------------------------------------------------------------


class Command:
    """One console command: its name, the group that holds ``cmd_<name>`` (a module of this
    package; None: the package itself), and whether it needs unlock. Help text: ``help.py``."""

    __slots__ = ("name", "group", "locked")

    def __init__(self, name, group, locked=False):
        self.name = name
        self.group = group
        self.locked = locked


_bound = set()  # command groups whose functions Console has


def _bind(group):
    """Import command group ``group`` (and the groups it needs) and make its functions
    ``Console`` methods, once."""
    if group is None or group in _bound:
        return
    module = __import__(__name__ + "." + group, None, None, ("METHODS",))
    _bound.add(group)
    for need in getattr(module, "NEEDS", ()):
        _bind(need)
    for function in module.METHODS:
        setattr(Console, function.__name__, function)


def _record_doc(record):
    """A journal record's payload as a dict; None when it is not a JSON object."""
    try:
        doc = json.loads(record.payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class Console:
    """The technician console of one agent, on one byte stream (see the module docstring).

    ``board`` (port) holds the board file as written: ``doc`` (raw JSON document),
    ``overrides`` (the command line's ``section.field=value`` list), ``path`` and
    ``save(doc)``. ``restart()`` (port) shuts the agent down cleanly and starts it again.
    Beside ``publish``, the agent's publisher tells ``connected``, ``last_error`` and
    ``connects``, and offers ``await round_trip(topic, timeout_s)`` for the selftest; the
    signer offers ``verify(data, signature)``.
    """

    def __init__(self, agent, stream, board=None, restart=None):
        config = agent.config["console"]
        self.agent = agent
        self.stream = stream
        self.board = board
        self.restart = restart
        self.clock = agent.clock
        self.journal = agent.outbox.journal
        self.publisher = agent.outbox.publisher
        self.editor = LineEditor(config["max_line"])
        self.lock = PinLock(config["pin_hash"], config["lock_after_s"], self.clock.monotonic_ms())
        self._restore_backoff()
        self.commands = COMMANDS
        self.names = tuple(command.name for command in COMMANDS)
        self.reading_pin = False
        self.unsaved = []  # settings changed with ``config set`` and not yet saved
        self.needs_restart = []  # settings changed that the running agent does not use yet
        self._input = b""
        self._pos = 0

    # -- the task ----------------------------------------------------------------------

    async def run(self):
        """Serve the console until cancelled: read, edit, run commands, answer."""
        self._say("evse-agent %s technician console, station %s; type 'help'"
                  % (__version__, self.agent.config["station_id"]))
        self._prompt()
        while True:
            try:
                data = await self.stream.read(READ_MAX, TICK_MS)
            except Exception as error:  # the port's trouble must not end the console
                log.error("console: read failed: %s" % _error_text(error))
                await asyncio.sleep(1)
                continue
            now = self.clock.monotonic_ms()
            if self.lock.expire(now):
                self.editor.clear()  # a line left half typed is stale by now
                self._say("\nconsole locked after %d s without input" % (self.lock.lock_after_ms // 1000))
                self._prompt()
            if data:
                self.lock.touch(now)
                self._input = data
                self._pos = 0
                await self._take_input()

    async def _take_input(self):
        """Feed the bytes read to the editor; run each finished line."""
        editor = self.editor
        while self._pos < len(self._input):
            byte = self._input[self._pos]
            self._pos += 1
            item = editor.push(byte)
            if item is None:
                continue
            self._echo()
            await self._line(item[0], item[1])
            self._prompt()
            await asyncio.sleep(0)  # a flood of lines still leaves the poller its turns
        self._echo()

    def _echo(self):
        if self.editor.echo:
            self.stream.write(bytes(self.editor.echo))
            self.editor.echo = bytearray()

    def _say(self, text=""):
        self.stream.write(text.encode() + b"\n")

    def _prompt(self):
        if self.reading_pin:
            self.stream.write(b"PIN: ")
        else:
            self.stream.write(("%s%s " % (self.agent.config["station_id"],
                                          "#" if self.lock.unlocked else ">")).encode())

    async def _line(self, text, problem):
        """Run one finished line; whatever goes wrong is one ``error:`` line."""
        reading_pin = self.reading_pin
        self.reading_pin = self.editor.mask = False
        words = (text or "").split()
        try:
            if problem:
                raise CommandError(problem)
            if reading_pin:
                if not text:
                    raise CommandError("no PIN given; unlock cancelled")
                self._unlock(text)
            elif words:
                command = self._command(words[0])
                if command.locked:
                    self._need_unlock(command.name)
                _bind(command.group)
                await getattr(self, "cmd_" + command.name)(words[1:])
        except CommandError as error:
            self._say("error: %s" % error)
        except Exception as error:  # a bug in a command must not end the console
            what = "unlock" if reading_pin else _shown(words[0] if words else "")
            log.error("console: %s failed: %s" % (what, _error_text(error)))
            self._say("error: internal error (%s); the agent goes on" % _fit(_error_text(error), 50))

    def _command(self, word):
        return self.commands[self.names.index(match(word, self.names, "command", "'help' lists the commands"))]

    def _need_unlock(self, what):
        if not self.lock.unlocked:
            if self.lock.pin_hash is None:
                raise CommandError("%s needs unlock, and this station has no PIN (console.pin_hash)" % what)
            raise CommandError("%s needs 'unlock <PIN>' first" % what)

    def _table(self, rows, label_width=12):
        for label, text in rows:
            self._say(_pad(label, label_width) + _fit(text, WIDTH - 1 - label_width))

    # -- help, unlock, lock ------------------------------------------------------------

    async def cmd_help(self, args):
        from .help import HELP
        if args:
            rows, text = HELP[self._command(args[0]).name]
            for usage, _, locked in rows:
                self._say(usage + ("   (needs unlock)" if locked else ""))
            for line in text:
                self._say("  " + line)
            return
        self._say("commands (any unambiguous beginning works, e.g. 'st'; * needs unlock):")
        for command in self.commands:
            for usage, summary, locked in HELP[command.name][0]:
                self._say("  %s %s %s" % (_pad(usage, 24), "*" if locked else " ", _fit(summary, WIDTH - 30)))

    async def cmd_unlock(self, args):
        if len(args) > 1:
            raise CommandError("unlock takes one argument, the PIN")
        if args:
            self._unlock(args[0])
            return
        self._check_unlock_allowed()
        self.reading_pin = self.editor.mask = True

    def _store(self):
        """The agent's durable state store (None on an agent without a session engine)."""
        engine = self.agent.engine
        store = getattr(engine, "store", None) if engine is not None else None
        return store if hasattr(store, "save_pin_backoff") else None

    def _restore_backoff(self):
        """Wrong PINs before a restart still count: the wait goes on where it was (never
        longer than the longest wait, should the wall clock have jumped)."""
        store = self._store()
        if store is None:
            return
        failures, retry_at = store.load_pin_backoff()
        if not failures:
            return
        wait_s = min(MAX_DELAY_S, max(0.0, retry_at - self.clock.time()))
        self.lock.failures = failures
        self.lock.retry_at_ms = self.clock.monotonic_ms() + int(wait_s * 1000)
        log.warning("console: %d wrong PIN(s) before the restart; next try in %d s" % (failures, wait_s))

    def _save_backoff(self):
        store = self._store()
        if store is not None:
            lock = self.lock
            wait_s = lock.wait_s(self.clock.monotonic_ms())
            store.save_pin_backoff(lock.failures, self.clock.time() + wait_s if lock.failures else 0.0)

    def _check_unlock_allowed(self):
        lock = self.lock
        if lock.pin_hash is None:
            raise CommandError("this station has no PIN (set console.pin_hash in the board file)")
        wait = lock.wait_s(self.clock.monotonic_ms())
        if wait:
            raise CommandError("unlock refused for %d s more after %d wrong PIN(s)" % (wait, lock.failures))

    def _unlock(self, pin):
        self._check_unlock_allowed()
        lock = self.lock
        now = self.clock.monotonic_ms()
        failed_before = lock.failures
        if lock.try_pin(pin, now):
            log.info("console: unlocked")
            if failed_before:
                self._save_backoff()
            self._say("unlocked; 'lock' locks again, or %d s without input" % (lock.lock_after_ms // 1000))
            return
        wait = lock.wait_s(now)
        log.warning("console: wrong PIN (%d in a row)" % lock.failures)
        self._save_backoff()
        monitor = self.agent.monitor
        if monitor is not None:
            monitor.notice("console_unlock_failed", {"failures": lock.failures, "retry_after_s": wait})
        raise CommandError("wrong PIN; next try in %d s" % wait)

    async def cmd_lock(self, args):
        _no_args(args, "lock")
        self.lock.unlocked = False
        self._say("locked")

    # -- restart -----------------------------------------------------------------------

    async def cmd_restart(self, args):
        _no_args(args, "restart")
        if self.restart is None:
            raise CommandError("this port cannot restart the agent")
        if self.unsaved:
            self._say("not saved, so lost: %s" % ", ".join(self.unsaved))
        self._say("restarting: clean shutdown, then the same command line again")
        log.warning("console: restart requested")
        drain = getattr(self.stream, "drain", None)
        if drain is not None:
            await drain(1000)
        self.restart()


COMMANDS = (
    Command("status", "status"),
    Command("meter", "meter"),
    Command("pilot", "status"),
    Command("session", "sessions"),
    Command("sessions", "sessions"),
    Command("events", "records"),
    Command("journal", "records"),
    Command("mqtt", "records"),
    Command("config", "settings"),
    Command("selftest", "selftest"),
    Command("id", "identification"),
    Command("log", "records"),
    Command("unlock", None),
    Command("lock", None),
    Command("restart", None, locked=True),
    Command("help", None),
)
