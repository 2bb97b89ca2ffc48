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
  4 s ... up to 5 min) and is reported as a ``console_unlock_failed`` event. The console
  locks again after ``console.lock_after_s`` without input.
- ``Console``: the command table and one task (``run``). A command that waits (a meter
  read, the selftest) awaits like any other task, so the poller never waits for the console.

The port hands in the serial line as a byte stream: ``await read(max_bytes, timeout_ms)``
(b"" on timeout) and ``write(data)``, which never blocks (the port queues, and sends each
newline as CRLF).
"""

import asyncio
import binascii
import hashlib
import json

from . import __version__, log
from .config import ConfigError, SCHEMA, _closest, apply_override, field_at, validate
from .journal import SESSION, SUMMARY, scan
from .messages import iso_utc
from .modbus_rtu import ModbusError
from .ocmf import parse_document, sign_document
from .pilot import state_from_lines, state_from_voltage
from .registers import decode_energy_wh, float32_from_bits

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
CONSOLE_LIVE = ("console.lock_after_s", "console.max_line", "console.pin_hash")

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
    """One console command: its handler, help rows and text, and whether it needs unlock."""

    __slots__ = ("name", "handler", "rows", "text", "locked")

    def __init__(self, name, handler, rows, text, locked=False):
        self.name = name
        self.handler = handler  # async (console, args)
        self.rows = rows  # (usage, summary, needs unlock) for the help list
        self.text = text  # lines for ``help <name>``
        self.locked = locked


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
                await command.handler(self, words[1:])
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
        if args:
            command = self._command(args[0])
            for usage, _, locked in command.rows:
                self._say(usage + ("   (needs unlock)" if locked else ""))
            for line in command.text:
                self._say("  " + line)
            return
        self._say("commands (any unambiguous beginning works, e.g. 'st'; * needs unlock):")
        for command in self.commands:
            for usage, summary, locked in command.rows:
                self._say("  %s %s %s" % (_pad(usage, 24), "*" if locked else " ", _fit(summary, WIDTH - 30)))

    async def cmd_unlock(self, args):
        if len(args) > 1:
            raise CommandError("unlock takes one argument, the PIN")
        if args:
            self._unlock(args[0])
            return
        self._check_unlock_allowed()
        self.reading_pin = self.editor.mask = True

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
        if lock.try_pin(pin, now):
            log.info("console: unlocked")
            self._say("unlocked; 'lock' locks again, or %d s without input" % (lock.lock_after_ms // 1000))
            return
        wait = lock.wait_s(now)
        log.warning("console: wrong PIN (%d in a row)" % lock.failures)
        monitor = self.agent.monitor
        if monitor is not None:
            monitor.notice("console_unlock_failed", {"failures": lock.failures, "retry_after_s": wait})
        raise CommandError("wrong PIN; next try in %d s" % wait)

    async def cmd_lock(self, args):
        _no_args(args, "lock")
        self.lock.unlocked = False
        self._say("locked")

    # -- status ------------------------------------------------------------------------

    async def cmd_status(self, args):
        _no_args(args, "status")
        agent = self.agent
        now_ms = self.clock.monotonic_ms()
        active = sorted(agent.monitor.active) if agent.monitor is not None else []
        self._table((
            ("station", "%s, evse-agent %s" % (agent.config["station_id"], __version__)),
            ("uptime", _duration((now_ms - agent.started_ms) / 1000)),
            ("pilot", self._pilot_text()),
            ("contactor", self._contactor_text()),
            ("session", self._session_text()),
            ("meter", self._meter_text(now_ms)),
            ("broker", self._broker_text()),
            ("journal", self._journal_text()),
            ("clock", self._clock_text()),
            ("events", "%d active: %s" % (len(active), ", ".join(active)) if active else "none active"),
            ("console", "unlocked" if self.lock.unlocked else "locked"),
        ))

    def _inputs(self):
        agent = self.agent
        if agent.inputs is not None:
            return agent.inputs.current()
        return agent.engine.inputs if agent.engine is not None else None

    def _pilot_text(self):
        inputs = self._inputs()
        if inputs is None or inputs.pilot is None:
            return "unknown (no stable pilot reading yet)"
        text = "%s (%s)" % (inputs.pilot, PILOT_MEANING[inputs.pilot])
        if inputs.digital:
            text += ", digital communication requested"
        elif inputs.advertised_a:
            text += ", %.1f A offered" % inputs.advertised_a
        if inputs.duty_pct is not None:
            text += ", duty %.1f %%" % inputs.duty_pct
        return text

    def _contactor_text(self):
        inputs = self._inputs()
        if inputs is None or (inputs.contactor_command is None and inputs.contactor_feedback is None):
            return "no contactor lines on this board"
        return "command %s, feedback %s" % (_closed(inputs.contactor_command), _closed(inputs.contactor_feedback))

    def _session_text(self):
        engine = self.agent.engine
        if engine is None:
            return "no session engine"
        session = engine.session
        ending = " (%d waiting for the end reading)" % len(engine.ending) if engine.ending else ""
        if session is None:
            return "none" + ending
        energy = engine.energy_so_far()
        return "%s, %s, %s Wh so far%s" % (session.id, session.period,
                                           "-" if energy is None else energy, ending)

    def _meter_text(self, now_ms):
        link = self.agent.meter.link
        since = _duration((now_ms - link.since_ms) / 1000)
        if link.online:
            return "online for %s, %d cycles, %d failed" % (since, link.cycles, link.failed_cycles)
        return "OFFLINE for %s: %s" % (since, link.last_error or "no answer yet")

    def _broker_text(self):
        mqtt = self.agent.config["mqtt"]
        where = "%s:%d" % (mqtt["host"], mqtt["port"])
        if self.publisher.connected:
            return "connected to " + where
        return "DISCONNECTED from %s: %s" % (where, self.publisher.last_error or "no answer yet")

    def _journal_text(self):
        stats = self.journal.stats()
        text = "backlog %d records, next seq %d, %s" % (stats["backlog"], stats["next_seq"], _size(stats["bytes"]))
        if stats["alarms"]:
            text += ", ALARM " + ", ".join(stats["alarms"])
        return text

    def _clock_text(self):
        mode = self.agent.config["clock"]["sync"]
        now = _date_time(self.clock.time())
        if self.clock.synced():
            return "%s UTC, synchronised (%s)" % (now, mode)
        return "%s UTC, NOT synchronised (%s): time flag U" % (now, mode)

    # -- meter -------------------------------------------------------------------------

    async def cmd_meter(self, args):
        if args:
            sub = match(args[0], ("watch", "regs"), "meter command")
            if sub == "watch":
                _no_args(args[1:], "meter watch")
                await self._watch()
            else:
                await self._regs(args[1:])
            return
        agent = self.agent
        meter = agent.meter
        link = meter.link
        self._say("meter      %s unit %d, serial %s, %s" % (
            meter.model.name, meter.unit_id, "-" if meter.serial is None else meter.serial,
            "online" if link.online else "OFFLINE (%s)" % (link.last_error or "no answer yet")))
        reading = agent.latest
        if reading is None:
            self._say("no reading yet")
            return
        age = (self.clock.monotonic_ms() - reading.monotonic_ms) / 1000
        self._say("reading    %s UTC, %.1f s ago" % (_date_time(reading.time), age))
        phases = len(reading.voltage)
        self._say(" " * 10 + "".join(_rpad("L%d" % (i + 1), 11) for i in range(phases)))
        for label, values, spec, unit in (("voltage", reading.voltage, "%.1f", "V"),
                                          ("current", reading.current, "%.3f", "A"),
                                          ("power", reading.power, "%.0f", "W")):
            cells = ["-" if v is None else (spec + " %s") % (v, unit) for v in values]
            self._say(_pad(label, 10) + "".join(_rpad(cell, 11) for cell in cells))
        self._say("total      %s W, %s Hz" % (
            "-" if reading.power_total is None else "%.0f" % reading.power_total,
            "-" if reading.frequency is None else "%.2f" % reading.frequency))
        energy = reading.energy_wh
        if energy is None:
            self._say("import     - (the register holds no number)")
        else:
            resolution = reading.energy_resolution_mwh
            self._say("import     %d Wh (%d.%03d kWh), resolution %s Wh" % (
                energy, energy // 1000, energy % 1000,
                "-" if resolution is None else "%.3f" % (resolution / 1000)))

    async def _watch(self):
        """A line per new reading until a key is pressed (the key is used up)."""
        agent = self.agent
        phases = agent.meter.model.phases
        names = ["L%d" % (i + 1) for i in range(phases)]
        self._say("watching the meter; press any key to stop")
        self._say("time     " + "".join(_rpad(n + " V", 7) for n in names) + "  "
                  + "".join(_rpad(n + " A", 7) for n in names) + _rpad("power W", 10) + _rpad("import kWh", 13))
        shown = None
        online = True
        while not self._key_in_input():  # typed ahead, or read below
            reading = agent.latest
            if reading is not None and reading is not shown:
                shown = reading
                volts = "".join(_rpad("-" if v is None else "%.1f" % v, 7) for v in reading.voltage)
                amps = "".join(_rpad("-" if a is None else "%.2f" % a, 7) for a in reading.current)
                power = "-" if reading.power_total is None else "%.0f" % reading.power_total
                energy = "-" if reading.energy_wh is None else "%d.%03d" % divmod(reading.energy_wh, 1000)
                self._say(iso_utc(reading.time)[11:19] + " " + volts + "  " + amps
                          + _rpad(power, 10) + _rpad(energy, 13))
            link = agent.meter.link
            if link.online != online:
                online = link.online
                self._say("meter online again" if online else "meter OFFLINE: %s" % _fit(link.last_error or "", 60))
            data = await self.stream.read(READ_MAX, WATCH_MS)
            if data:
                self.lock.touch(self.clock.monotonic_ms())
                self._input = data
                self._pos = 0
        self._say("stopped watching")

    def _key_in_input(self):
        """Use up one pending key; False when nothing (but a CR's LF) is pending."""
        while self._pos < len(self._input):
            byte = self._input[self._pos]
            self._pos += 1
            if self.editor.take_key(byte):
                return True
        return False

    async def _regs(self, args):
        """``meter regs <addr> <n> [input|holding]``: raw registers, with float32 pairs."""
        if len(args) not in (2, 3):
            raise CommandError("usage: meter regs <addr> <n> [input|holding]")
        address = _number(args[0], "address", 0, 0xFFFF)
        count = _number(args[1], "count", 1, 125)
        if address + count > 0x10000:
            raise CommandError("address %d + count %d runs past register 65535" % (address, count))
        kind = match(args[2], ("input", "holding"), "register kind") if len(args) == 3 else "input"
        function = 4 if kind == "input" else 3
        meter = self.agent.meter
        try:
            data = await meter.read_raw(function, address, count)
        except ModbusError as error:
            raise CommandError("meter did not answer: %s" % _error_text(error))
        self._say("unit %d, function %02d (%s registers), %d from 0x%04X:"
                  % (meter.unit_id, function, kind, count, address))
        self._say("address         hex    u16   float32 (with the next)")
        for i in range(count):
            word = (data[2 * i] << 8) | data[2 * i + 1]
            line = "0x%04X %5d  %04X  %5d" % (address + i, address + i, word, word)
            if i % 2 == 0 and i + 1 < count:
                bits = (word << 16) | (data[2 * i + 2] << 8) | data[2 * i + 3]
                line += "   %.7g" % float32_from_bits(bits)
            self._say(line)

    # -- pilot -------------------------------------------------------------------------

    async def cmd_pilot(self, args):
        _no_args(args, "pilot")
        inputs_monitor = self.agent.inputs
        inputs = self._inputs()
        rows = [("pilot", self._pilot_text()), ("contactor", self._contactor_text())]
        if inputs is not None and inputs.since_ms is not None:
            rows.append(("since", "%s ago" % _duration((self.clock.monotonic_ms() - inputs.since_ms) / 1000)))
        if inputs_monitor is not None:
            try:
                rows.append(("pins now", self._sample_text(inputs_monitor.pins.read())))
            except Exception as error:
                rows.append(("pins now", "cannot read: %s" % _error_text(error)))
            rows.append(("sampling", "every %d ms: %d samples, %d ambiguous, %d read errors, %d changes" % (
                inputs_monitor.sample_ms, inputs_monitor.samples, inputs_monitor.ambiguous,
                inputs_monitor.read_errors, inputs_monitor.changes)))
        self._table(rows)

    def _sample_text(self, sample):
        if sample.pilot_lines is not None:
            level = "lines %s" % "".join("1" if bit else "0" for bit in sample.pilot_lines)
        else:
            level = "-" if sample.pilot_volts is None else "%.2f V" % sample.pilot_volts
        duty = "" if sample.duty_pct is None else ", duty %.1f %%" % sample.duty_pct
        return "%s%s, command %s, feedback %s" % (level, duty, _closed(sample.contactor_command),
                                                  _closed(sample.contactor_feedback))

    # -- sessions ----------------------------------------------------------------------

    async def cmd_session(self, args):
        if args:
            match(args[0], ("show",), "session command")
            if len(args) != 2:
                raise CommandError("usage: session show <id or number>")
            await self._show_session(self._session_id(args[1]))
            return
        engine = self.agent.engine
        if engine is None:
            raise CommandError("this agent has no session engine")
        session = engine.session
        if session is None:
            self._say("no open session; 'sessions' lists the last ones")
        else:
            self._show_open(session)
        for ending in engine.ending:
            self._say("%s: unplugged, waiting for its end reading (%s)" % (ending.id, ending.pending or "-"))

    def _session_id(self, text):
        if text.isdigit() and len(text) <= 9:
            return "%s-%06d" % (self.agent.config["station_id"], int(text))
        return text

    def _show_open(self, session):
        begin = session.segments[0]["begin"] if session.segments else None
        energy = self.agent.engine.energy_so_far()
        self._table((
            ("session", "%s (open, %s)" % (session.id, session.period)),
            ("plug-in", "%s UTC" % _date_time(session.plug_in_time)),
            ("begin", "-" if begin is None else "%d Wh at %s UTC" % (begin["energy_wh"], _date_time(begin["time"]))),
            ("so far", "%s Wh in %d segment(s)" % ("-" if energy is None else energy, len(session.segments))),
            ("waiting", "for the %s reading" % session.pending if session.pending else "for nothing"),
            ("events", ", ".join("#%d %s" % (e["number"], e["type"]) for e in session.events) or "none"),
            ("flags", ", ".join(session.flags) or "none"),
            ("documents", "%d OCMF document(s) signed so far" % len(session.documents)),
        ))

    async def _scan_sessions(self, visit):
        """Call ``visit(seq, doc)`` for every session record still in the journal, in seq
        order; yields to the other tasks between chunks (a journal can be large)."""
        seq = 0
        while True:
            records = self.journal.read_after(seq, 128)
            if not records:
                return
            for record in records:
                seq = record.seq
                if record.type == SESSION:
                    doc = _record_doc(record)
                    if doc is not None:
                        visit(record.seq, doc)
            await asyncio.sleep(0)

    async def cmd_sessions(self, args):
        count = _count_arg(args, "sessions", 10, 1000)
        latest = {}
        order = []

        def visit(seq, doc):
            sid = doc.get("session_id")
            if sid not in latest:
                order.append(sid)
            latest[sid] = {"event": doc.get("event"), "plug_in": doc.get("plug_in"),
                           "plugged_s": doc.get("plugged_s"), "energy_wh": doc.get("energy_wh"),
                           "flags": doc.get("flags") or []}

        await self._scan_sessions(visit)
        if not order:
            self._say("no session records in the journal (acknowledged segments are deleted)")
            return
        shown = order[-count:]
        width = max(8, min(24, max(len(str(sid)) for sid in shown)))
        self._say(_pad("session", width) + "  plug-in (UTC)     plugged    energy Wh  state, flags")
        for sid in shown:
            doc = latest[sid]
            plug_in = doc["plug_in"] or ""
            ended = doc["event"] == "end"
            plugged = _duration(doc["plugged_s"]) if ended and isinstance(doc["plugged_s"], (int, float)) else "-"
            energy = doc["energy_wh"] if ended and doc["energy_wh"] is not None else "-"
            notes = ", ".join(["ended" if ended else "open"] + doc["flags"])
            self._say(_pad(str(sid), width) + "  " + _pad(plug_in[:10] + " " + plug_in[11:16], 16)
                      + "  " + _pad(plugged, 9) + _rpad(str(energy), 11) + "  "
                      + _fit(notes, WIDTH - 1 - width - 42))
        self._say("%d of %d session(s) still in the journal; 'session show <id>' for one"
                  % (len(shown), len(order)))

    async def _show_session(self, sid):
        engine = self.agent.engine
        found = []

        def visit(seq, doc):
            if doc.get("session_id") == sid:
                found[:] = [seq, doc]

        await self._scan_sessions(visit)
        if engine is not None and engine.session is not None and engine.session.id == sid:
            self._show_open(engine.session)
            if not found:
                return
        if not found:
            raise CommandError("no session %s in the journal (acknowledged segments are deleted)" % _shown(sid))
        seq, doc = found
        begin = doc.get("begin") or {}
        end = doc.get("end") or {}
        self._table((
            ("session", "%s (%s record, journal seq %d)" % (sid, doc.get("event"), seq)),
            ("plug-in", str(doc.get("plug_in"))),
            ("unplug", str(doc.get("unplug"))),
            ("begin", "%s Wh at %s, meter %s" % (begin.get("energy_wh"), begin.get("ts"), begin.get("serial"))
             if begin else "-"),
            ("end", "%s Wh at %s, meter %s" % (end.get("energy_wh"), end.get("ts"), end.get("serial"))
             if end else "-"),
            ("energy", "%s Wh in %s segment(s)" % (doc.get("energy_wh"), doc.get("segments"))),
            ("time", "plugged %s s, charging %s s, idle %s s" % (doc.get("plugged_s"), doc.get("charging_s"),
                                                                doc.get("idle_s"))),
            ("power", "max %s W, average %s W" % (doc.get("max_power_w"), doc.get("avg_power_w"))),
            ("current", "max %s A" % " ".join(str(c) for c in doc.get("max_current_a") or [])),
            ("events", ", ".join("#%s %s" % (e.get("number"), e.get("type")) for e in doc.get("events") or [])
             or "none"),
            ("flags", ", ".join(doc.get("flags") or []) or "none"),
        ))
        documents = doc.get("ocmf_documents") or []
        self._say("OCMF documents (%d), one per line, for an OCMF verifier:" % len(documents))
        for document in documents:
            self._say(str(document))

    # -- events, journal, mqtt, log ----------------------------------------------------

    async def cmd_events(self, args):
        count = _count_arg(args, "events", 10, 1000)
        monitor = self.agent.monitor
        if monitor is None:
            raise CommandError("this agent has no power monitor")
        events = []
        for event in reversed(monitor.recent):  # a raised-then-cleared event is listed twice
            if event not in events:
                events.insert(0, event)
        events = events[-count:]
        if not events:
            self._say("no events since the agent started")
        else:
            self._say("    #  start (UTC)          lasted    severity  type")
            for event in events:
                if event.end is None:
                    lasted = "active"
                elif event.end == event.start:
                    lasted = "once"
                else:
                    lasted = _duration(event.end - event.start)
                self._say("%5d  %s  %s%s%s" % (event.number, _date_time(event.start), _pad(lasted, 10),
                                               _pad(event.severity, 10), _fit(event.type, 28)))
                values = " ".join("%s=%s" % (k, json.dumps(v)) for k, v in sorted(event.values.items())) \
                    if isinstance(event.values, dict) else str(event.values)
                if values:
                    self._say("       " + _fit(values, WIDTH - 8))
        active = sorted(monitor.active)
        self._say("active now: %s" % (", ".join(active) if active else "none"))

    async def cmd_journal(self, args):
        if args:
            sub = match(args[0], ("stats", "verify"), "journal command")
            _no_args(args[1:], "journal " + sub)
            if sub == "verify":
                await self._verify_journal()
                return
        journal = self.journal
        stats = journal.stats()
        forwarder = self.agent.forwarder
        rows = [
            ("size", "%s of %s in %d segment(s), %s" % (_size(stats["bytes"]), _size(stats["max_bytes"]),
                                                        stats["segments"], self.agent.config["journal"]["dir"])),
            ("sequence", "next %d, acknowledged up to %d, on disk up to %d"
             % (stats["next_seq"], stats["acked"], journal.synced_seq)),
            ("backlog", "%d record(s) not yet acknowledged, %d held in memory"
             % (stats["backlog"], stats["pending_in_memory"])),
        ]
        if forwarder is not None:
            fstats = forwarder.stats()
            rows.append(("forwarder", "%d in flight (window %d), %d published since start"
                         % (fstats["inflight"], forwarder.window, fstats["published"])))
        rows.append(("written", "%s since start; %d aggregate(s) folded or refused"
                     % (_size(stats["bytes_written"]), stats["dropped_records"])))
        rows.append(("alarms", ", ".join(stats["alarms"]) or "none"))
        report = journal.report
        if report is not None:
            rows.append(("at start", "%d segment(s), %d record(s), torn tail %d bytes, %d damaged"
                         % (report.segments, report.records, report.torn_bytes, report.corrupt)))
        self._table(rows)

    async def _verify_journal(self):
        """Every frame's CRC, the sequence (gaps only where a summary covers them), each
        payload's seq, and the OCMF signatures of session records."""
        journal = self.journal
        signer = self.agent.engine.signer if self.agent.engine is not None else None
        can_verify = signer is not None and hasattr(signer, "verify")
        problems = []
        records = 0
        documents = 0
        first = last = None
        covered = []
        seqs = []
        for segment in list(journal.segments):
            data = journal.fs.read(segment.name)
            if data is None:
                problems.append("%s was deleted while verifying (acknowledged)" % segment.name)
                continue
            found, torn, corrupt = scan(data)
            if corrupt:
                problems.append("%s: %d damaged stretch(es) skipped" % (segment.name, corrupt))
            if torn is not None:
                problems.append("%s: %d bytes at the end are not a whole record" % (segment.name, len(data) - torn))
            for record in found:
                records += 1
                if last is not None and record.seq <= last:
                    problems.append("%s: seq %d does not follow %d" % (segment.name, record.seq, last))
                    continue
                first = record.seq if first is None else first
                last = record.seq
                seqs.append(record.seq)
                doc = _record_doc(record)
                if doc is None or doc.get("seq") != record.seq:
                    problems.append("seq %d: payload is not JSON carrying its seq" % record.seq)
                    continue
                if record.type == SUMMARY:
                    for pair in doc.get("covers_seq") or []:
                        covered.append((pair[0], pair[1]))
                elif record.type == SESSION and can_verify:
                    for text in doc.get("ocmf_documents") or []:
                        documents += 1
                        problem = self._ocmf_problem(text, signer)
                        if problem:
                            problems.append("seq %d (%s): OCMF %s" % (record.seq, doc.get("session_id"), problem))
            await asyncio.sleep(0)
        for before, after in zip(seqs, seqs[1:]):
            seq = before + 1
            while seq < after:  # every seq between two records must be in a summary's runs
                ends = [high for low, high in covered if low <= seq <= high]
                if not ends:
                    problems.append("seq %d missing (not covered by a summary)" % seq)
                    break
                seq = max(ends) + 1
        for problem in problems[:20]:
            self._say("FAIL  " + _fit(problem, WIDTH - 7))
        if len(problems) > 20:
            self._say("FAIL  ... and %d more" % (len(problems) - 20))
        span = "seq %d..%d" % (first, last) if first is not None else "no records"
        signatures = "%d OCMF signature(s) verified" % documents if can_verify else "signatures not checked"
        self._say("journal verify: %d record(s), %s, %s: %s" % (
            records, span, signatures, "%d problem(s)" % len(problems) if problems else "ok"))

    def _ocmf_problem(self, text, signer):
        """Why an OCMF document does not verify with the station's key, or None."""
        try:
            _, signature, payload_text = parse_document(text)
            sd = binascii.unhexlify(signature["SD"])
        except (ValueError, TypeError) as error:
            return "unreadable: %s" % error
        if not signer.verify(payload_text.encode(), sd):
            return "signature does not verify with the station key"
        return None

    async def cmd_mqtt(self, args):
        _no_args(args, "mqtt")
        config = self.agent.config["mqtt"]
        publisher = self.publisher
        stats = self.journal.stats()
        forwarder = self.agent.forwarder
        inflight = forwarder.stats()["inflight"] if forwarder is not None else 0
        self._table((
            ("broker", "%s:%d, TLS %s, login %s" % (config["host"], config["port"],
                                                   "on" if config["tls"]["enabled"] else "off",
                                                   config["username"] or "none")),
            ("client id", config["client_id"]),
            ("link", "%s (%d connect(s) since start)" % ("connected" if publisher.connected else "DISCONNECTED",
                                                         getattr(publisher, "connects", 0))),
            ("last error", publisher.last_error or "none"),
            ("backlog", "%d journal record(s) not yet acknowledged, %d in flight" % (stats["backlog"], inflight)),
            ("published", "%d journal record(s) and %d live message(s) since start"
             % (forwarder.published if forwarder is not None else 0, self.agent.outbox.posted)),
            ("topics", self.agent.topics.base + "/..."),
        ))

    async def cmd_id(self, args):
        from .id_console import run
        run(self, args)

    async def cmd_log(self, args):
        count = _count_arg(args, "log", 20, log.RING_SIZE)
        lines = log.recent(count)
        if not lines:
            self._say("no log lines yet")
        for level, text in lines:
            self._say("%s %s" % (_pad(log.LEVEL_NAMES.get(level, str(level)), 8), text))

    # -- config ------------------------------------------------------------------------

    async def cmd_config(self, args):
        if not args:
            raise CommandError("usage: config show [section] | get <setting> | set <setting> <value> | save")
        sub = match(args[0], ("show", "get", "set", "save"), "config command")
        rest = args[1:]
        if sub == "show":
            self._config_show(rest)
        elif sub == "get":
            if len(rest) != 1:
                raise CommandError("usage: config get <setting>, e.g. config get mqtt.port")
            self._config_get(self._setting(rest[0]))
        elif sub == "set":
            self._need_unlock("config set")
            if len(rest) < 2:
                raise CommandError("usage: config set <setting> <value>, e.g. config set mqtt.port 1884")
            self._config_set(self._setting(rest[0]), " ".join(rest[1:]))
        else:
            self._need_unlock("config save")
            _no_args(rest, "config save")
            self._config_save()

    def _setting(self, word):
        """The setting ``word`` names: a full dotted path, or the beginning of only one."""
        paths = [path for path, _ in _leaves(SCHEMA, "")]
        if word in paths:
            return word
        found = [path for path in paths if path.startswith(word)]
        if len(found) == 1:
            return found[0]
        if found:
            raise CommandError("ambiguous setting %s: could be %s%s" % (
                _shown(word), ", ".join(found[:4]), ", ..." if len(found) > 4 else ""))
        hint = _closest(word, paths)
        raise CommandError("unknown setting %s%s" % (_shown(word), "; did you mean %s?" % hint if hint else ""))

    def _shown_value(self, path, value):
        if path in MASKED and value is not None:
            return "(set)"
        return json.dumps(value)

    def _file_value(self, path):
        """The value ``config save`` would write (None when the file does not name it)."""
        node = self.board.doc if self.board is not None else {}
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def _config_show(self, args):
        if len(args) > 1:
            raise CommandError("usage: config show [section]")
        sections = tuple(name for name in SCHEMA if isinstance(SCHEMA[name], dict))
        prefix = match(args[0], sections, "section") + "." if args else ""
        # Sorted by name: MicroPython's dicts do not keep the schema's order.
        for path in sorted(path for path, _ in _leaves(SCHEMA, "")):
            if not path.startswith(prefix):
                continue
            line = "%s = %s" % (path, self._shown_value(path, _get(self.agent.config, path)))
            if path in self.needs_restart:
                line += "   (after restart: %s)" % self._shown_value(path, self._file_value(path))
            self._say(line)
        if self.unsaved:
            self._say("not saved yet: %s ('config save' writes the board file)" % ", ".join(self.unsaved))

    def _config_get(self, path):
        field = field_at(path)
        self._say("%s = %s" % (path, self._shown_value(path, _get(self.agent.config, path))))
        if field.help:
            self._say("  " + field.help)
        rule = [{str: "text", int: "integer", float: "number", bool: "true/false", list: "list"}[field.kind]]
        if field.choices is not None:
            rule.append("one of " + ", ".join(json.dumps(c) for c in field.choices))
        if field.minimum is not None or field.maximum is not None:
            rule.append("%s .. %s" % ("" if field.minimum is None else field.minimum,
                                      "" if field.maximum is None else field.maximum))
        if field.nullable:
            rule.append("or null")
        rule.append("applies at once" if self._live(path) else "needs a restart")
        self._say("  " + ", ".join(rule))
        if path in self.needs_restart:
            self._say("  after restart: %s" % self._shown_value(path, self._file_value(path)))

    def _live(self, path):
        return path in CONSOLE_LIVE or self.agent.live_setting(path)

    def _config_set(self, path, text):
        if self.board is None:
            raise CommandError("this port keeps no board file to change")
        assignment = path + "=" + text
        file_doc = json.loads(json.dumps(self.board.doc))
        try:
            apply_override(file_doc, assignment)
            running = json.loads(json.dumps(file_doc))
            for override in self.board.overrides:
                if override.split("=", 1)[0].strip() != path:
                    apply_override(running, override)
            value = _get(validate(running), path)
        except ConfigError as error:
            raise CommandError(str(error))
        self.board.doc = file_doc
        if path not in self.unsaved:
            self.unsaved.append(path)
        log.info("console: config set %s = %s" % (path, self._shown_value(path, value)))
        if self._apply(path, value):
            if path in self.needs_restart:
                self.needs_restart.remove(path)
            self._say("%s = %s: in use now; 'config save' keeps it" % (path, self._shown_value(path, value)))
            return
        if path not in self.needs_restart:
            self.needs_restart.append(path)
        self._say("%s = %s: needs a restart ('config save', then 'restart')" % (path, self._shown_value(path, value)))

    def _apply(self, path, value):
        """Use a setting now where that is safe; False when it needs a restart."""
        if path in CONSOLE_LIVE:
            if path == "console.lock_after_s":
                self.lock.lock_after_ms = int(value * 1000)
            elif path == "console.max_line":
                self.editor.max_line = value
            else:
                self.lock.pin_hash = value
            self.agent.config["console"][path.split(".")[1]] = value
            return True
        return self.agent.apply_setting(path, value)

    def _config_save(self):
        if self.board is None:
            raise CommandError("this port keeps no board file to save")
        try:
            validate(json.loads(json.dumps(self.board.doc)))
        except ConfigError as error:
            raise CommandError("not saved, the board file would not load: %s" % error)
        try:
            backup = self.board.save(self.board.doc)
        except OSError as error:
            raise CommandError("cannot write %s: %s" % (self.board.path, error))
        log.info("console: saved the board file %s" % self.board.path)
        self._say("saved %s (the previous version is %s)" % (self.board.path, backup))
        overridden = [o.split("=", 1)[0].strip() for o in self.board.overrides]
        masked = [path for path in self.unsaved if path in overridden]
        if masked:
            self._say("note: the command line also sets %s: at each start its value wins" % ", ".join(masked))
        self.unsaved = []
        if self.needs_restart:
            self._say("restart to use: %s" % ", ".join(self.needs_restart))

    # -- selftest ----------------------------------------------------------------------

    async def cmd_selftest(self, args):
        _no_args(args, "selftest")
        checks = (("meter comms", self._check_meter), ("gpio read-back", self._check_gpio),
                  ("broker round trip", self._check_broker), ("signing round trip", self._check_signing),
                  ("journal write", self._check_journal))
        failed = 0
        for name, check in checks:
            try:
                verdict, text = "ok", await check()
            except Exception as error:
                verdict, text = "FAIL", _error_text(error)
                failed += 1
            self._say(_pad(name, 20) + _pad(verdict, 6) + _fit(text, WIDTH - 27))
        self._say("selftest: %d ok, %d FAIL" % (len(checks) - failed, failed))

    async def _check_meter(self):
        meter = self.agent.meter
        reg = meter.model.energy_register
        start = self.clock.monotonic_ms()
        data = await meter.read_raw(reg.function, reg.address, reg.count)
        took = self.clock.monotonic_ms() - start
        return "import register 0x%04X read in %d ms: %s Wh" % (reg.address, took, decode_energy_wh(reg, data, 0))

    async def _check_gpio(self):
        monitor = self.agent.inputs
        if monitor is None:
            raise CommandError("this agent reads no pins")
        sample = monitor.pins.read()
        pilot = state_from_lines(sample.pilot_lines) if monitor.use_lines else state_from_voltage(sample.pilot_volts)
        if pilot is None:
            raise CommandError("pilot reads %s: in no IEC 61851 range" % self._sample_text(sample).split(",")[0])
        command, feedback = sample.contactor_command, sample.contactor_feedback
        if command is not None and feedback is not None and bool(command) != bool(feedback):
            raise CommandError("contactor command %s but feedback %s" % (_closed(command), _closed(feedback)))
        accepted = monitor.current().pilot
        note = "as accepted" if pilot == accepted else "accepted %s, changing" % accepted
        return "pilot %s (%s), %s; contactor %s" % (pilot, self._sample_text(sample).split(",")[0], note,
                                                    "lines agree" if command is not None and feedback is not None
                                                    else "not fully wired")

    async def _check_broker(self):
        round_trip = getattr(self.publisher, "round_trip", None)
        if round_trip is None:
            raise CommandError("this port's MQTT client cannot subscribe")
        topic = self.agent.topics.base + "/selftest"
        took = await round_trip(topic, ROUND_TRIP_S)
        return "sent and received back in %d ms on %s" % (took, topic)

    async def _check_signing(self):
        engine = self.agent.engine
        signer = engine.signer if engine is not None else None
        if signer is None or not hasattr(signer, "verify"):
            raise CommandError("no signer that can verify on this port")
        payload = '{"FV":"1.0","selftest":"%s"}' % iso_utc(self.clock.time())
        document = sign_document(payload, signer)
        problem = self._ocmf_problem(document, signer)
        if problem:
            raise CommandError(problem)
        altered = document.replace('"FV":"1.0"', '"FV":"1.1"', 1)
        if self._ocmf_problem(altered, signer) is None:
            raise CommandError("an altered document verified too")
        return "signed and verified a test OCMF document; a changed copy fails"

    async def _check_journal(self):
        fs = self.journal.fs
        data = ("evse-agent selftest %d" % self.clock.monotonic_ms()).encode()
        fs.write_atomic(PROBE_FILE, data)
        back = fs.read(PROBE_FILE)
        fs.remove(PROBE_FILE)
        if back != data:
            raise CommandError("read back %r, wrote %r" % (back, data))
        free = fs.free_bytes() if hasattr(fs, "free_bytes") else None
        return "%d bytes written, read back, removed%s in %s" % (
            len(data), "" if free is None else " (%s free)" % _size(free), self.agent.config["journal"]["dir"])

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


def _leaves(schema, prefix):
    """(dotted path, Field) of every setting, in schema order."""
    out = []
    for key in schema:
        spec = schema[key]
        path = prefix + key
        if isinstance(spec, dict):
            out.extend(_leaves(spec, path + "."))
        else:
            out.append((path, spec))
    return out


def _get(doc, path):
    node = doc
    for part in path.split("."):
        node = node[part]
    return node


COMMANDS = (
    Command("status", Console.cmd_status,
            (("status", "version, uptime, pilot, session, links, clock", False),),
            ("One screen of station health: firmware version and uptime, pilot state and",
             "contactor, the open session, meter link, broker link, journal backlog,",
             "clock synchronisation, active events and the console lock.")),
    Command("meter", Console.cmd_meter,
            (("meter", "the latest reading, per phase", False),
             ("meter watch", "a line per new reading until a key is pressed", False),
             ("meter regs <addr> <n>", "raw read of n registers (diagnosis)", False)),
            ("meter: model, unit, serial, link state and the latest reading.",
             "meter watch: one line per poll; any key stops it (and is used up).",
             "meter regs <addr> <n> [input|holding]: reads n (1-125) registers from",
             "address addr (decimal or 0x hex) with function 04 (input, the default) or",
             "03 (holding), beside the poller; shows each word and float32 pairs.",
             "Example: meter regs 0x48 2 is the SDM630 import register in kWh.")),
    Command("pilot", Console.cmd_pilot,
            (("pilot", "pilot state, duty, offered current, contactor", False),),
            ("The accepted (debounced) pilot state, PWM duty and offered current, the",
             "contactor lines, how long the state has held, one raw read of the pins",
             "now, and the sampler's counters.")),
    Command("session", Console.cmd_session,
            (("session", "the open session", False),
             ("session show <id>", "one session with its OCMF documents", False)),
            ("session: the open session (energy so far, begin reading, flags).",
             "session show <id>: the latest record of a session still in the journal,",
             "with every OCMF document on a line of its own (copy it into a verifier).",
             "<id> is the full id (sim-001-000003) or just its number (3).")),
    Command("sessions", Console.cmd_sessions,
            (("sessions [n]", "the last n sessions in the journal (10)", False),),
            ("The last n sessions whose records are still in the journal: plug-in time,",
             "plugged time, billed energy, flags. Segments the broker has acknowledged",
             "are deleted, so older sessions are only at the backend.")),
    Command("events", Console.cmd_events,
            (("events [n]", "the last n power and safety events (10)", False),),
            ("The last n events raised or cleared since the agent started, with their",
             "values, and the events active now.")),
    Command("journal", Console.cmd_journal,
            (("journal [verify]", "journal statistics; check CRCs, seq, signatures", False),),
            ("journal: size, sequence numbers, backlog, forwarder window, alarms.",
             "journal verify: reads every segment and checks each record's CRC, that",
             "sequence numbers follow (gaps only where a summary covers them), and",
             "every OCMF signature of the session records with the station key.")),
    Command("mqtt", Console.cmd_mqtt,
            (("mqtt", "broker connection, last error, backlog", False),),
            ("Broker address, TLS and login, connection state, the last error, and what",
             "waits to be published.")),
    Command("config", Console.cmd_config,
            (("config show [section]", "the running settings", False),
             ("config get <setting>", "one setting, its rule and help", False),
             ("config set <setting> <v>", "change a setting (same rules as the file)", True),
             ("config save", "write the board file (keeps a .bak)", True)),
            ("Settings are named as in the board file, e.g. mqtt.telemetry_interval_s.",
             "config set checks the value against the board file schema; intervals,",
             "timeouts and event thresholds apply at once, others after a restart.",
             "config save writes the board file atomically and keeps the old one as",
             ".bak. Passwords and the PIN hash are never shown.")),
    Command("selftest", Console.cmd_selftest,
            (("selftest", "meter, GPIO, broker, signing and journal checks", False),),
            ("Reads the meter's import register, reads the pins once (pilot in range,",
             "contactor feedback agrees with the command), sends a message to the",
             "broker and receives it back, signs and verifies a test OCMF document, and",
             "writes, reads back and removes a probe file in the journal directory.")),
    Command("id", Console.cmd_id,
            (("id", "RFID reader, allow-list, last tag", False),
             ("id allow|deny <UID>", "change the allow-list until restart", True)),
            ("The identification reader's state and counters, the allow-list and its",
             "source, and the last tag. id allow / id deny change the running list.")),
    Command("log", Console.cmd_log,
            (("log [n]", "the last n log lines (20)", False),),
            ("The last n lines of the agent's log (at most %d are kept)." % log.RING_SIZE,)),
    Command("unlock", Console.cmd_unlock,
            (("unlock [PIN]", "allow the commands marked *", False),
             ("lock", "lock again", False)),
            ("unlock <PIN>, or unlock alone to type the PIN unseen. The console locks",
             "again after console.lock_after_s without input. Each wrong PIN doubles",
             "the wait before the next try and is reported as an event.")),
    Command("lock", Console.cmd_lock, (), ("Lock the console now.",)),
    Command("restart", Console.cmd_restart,
            (("restart", "clean shutdown, then start again", True),),
            ("Stops the agent cleanly (journal synced, broker told 'offline') and starts",
             "it again with the same command line."), locked=True),
    Command("help", Console.cmd_help,
            (("help [command]", "this list, or one command in detail", False),),
            ("help lists the commands; help <command> explains one.",)),
)
