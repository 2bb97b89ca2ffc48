"""Technician console on bytes: the line editor, the command matcher, the PIN lock and
the journal check, in process.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from evse_agent.config import ConfigError, live_settings, setting_paths, validate
from evse_agent.console import CommandError, Console, LineEditor, PinLock, match, pin_hash, pin_matches
from evse_agent.journal import AGGREGATE, EVENT, Journal, scan
from evse_agent.messages import Outbox, iso_utc
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_agent.ports.cpython.sim_pins import SimPinBank
from evse_agent.station import Ports, build_station
from test_station import Publisher


# -- the line editor, the matcher and the lock, on bytes ----------------------------------


def feed(editor, data):
    """Every finished line (text, problem) from ``data``."""
    out = []
    for byte in data:
        item = editor.push(byte)
        if item is not None:
            out.append(item)
    return out


def texts(data, max_line=256):
    return [text for text, _ in feed(LineEditor(max_line), data)]


def test_line_endings_of_every_terminal_program():
    """CR, LF, CRLF and CR NUL each end exactly one line; a lone CR then LF is still one."""
    assert texts(b"status\r") == ["status"]
    assert texts(b"status\n") == ["status"]
    assert texts(b"status\r\nmeter\r\n") == ["status", "meter"]
    assert texts(b"status\r\x00meter\r\x00") == ["status", "meter"]
    assert texts(b"a\r\rb\n\n") == ["a", "", "b", ""]


def test_editing_keys_and_noise():
    """Backspace and DEL erase a character (a whole UTF-8 one); arrow keys, other control
    bytes, C1 controls and invalid UTF-8 never reach the line; Ctrl-C forgets it."""
    editor = LineEditor()
    assert feed(editor, b"statx\x08us\r") == [("status", None)]
    assert bytes(editor.echo) == b"statx\x08 \x08us\n"
    assert texts(b"mete\x7fer\r") == ["meter"]
    assert texts("caf\u00e9\x7f\x7fe\r".encode()) == ["cae"]
    assert texts(b"\x1b[A\x1b[1;5Cst\x1bOBatus\x01\x02\x07\r") == ["status"]
    assert texts(b"log\t5\r") == ["log 5"]
    assert texts(b"a\xc2\x9bb\xff\xc0\xaf\xed\xa0\x80\xe2\x82c\r") == ["abc"]  # C1, invalid, overlong, surrogate, cut
    assert texts("\u20ac \U0001F50C\r".encode()) == ["\u20ac \U0001F50C"]
    assert texts(b"restart\x03status\r") == ["", "status"]
    assert texts(b"x\x1b\rstatus\r") == ["x", "status"]  # an escape cut short by Enter


def test_a_line_too_long_is_refused_whole_and_the_next_one_works():
    editor = LineEditor(max_line=32)
    items = feed(editor, b"x" * 40 + b"\x08" * 10 + b"\rstatus\r")
    assert items == [(None, "line longer than 32 bytes; ignored"), ("status", None)]
    assert b"\x07" in editor.echo


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_only_clean_short_lines(data):
    """Whatever arrives, the editor never fails and every line is printable text that fits."""
    editor = LineEditor(max_line=64)
    for text, problem in feed(editor, data):
        if problem is not None:
            assert text is None and "64" in problem
            continue
        assert len(text.encode()) <= 64
        assert all(ord(ch) >= 0x20 and not 0x7F <= ord(ch) <= 0x9F for ch in text), repr(text)
    assert all(b >= 0x20 or b in (0x07, 0x08, 0x0A) for b in editor.echo)


def test_commands_abbreviate_where_unambiguous():
    names = ("status", "session", "sessions", "selftest", "meter")
    assert match("st", names) == "status"
    assert match("METER", names) == "meter"
    assert match("session", names) == "session"  # exact beats the longer name
    assert match("sessions", names) == "sessions"
    with pytest.raises(CommandError, match="ambiguous command 'se': could be session, sessions, selftest"):
        match("se", names)
    with pytest.raises(CommandError, match="unknown command 'x'"):
        match("x", names)


def test_pin_hash_and_lock():
    """The hash is salted, checked by the board schema, and a wrong PIN doubles the wait."""
    stored = pin_hash("2468", b"\x01" * 8)
    assert stored.startswith("sha256:0101010101010101:") and len(stored.split(":")[2]) == 64
    assert pin_hash("2468", b"\x02" * 8) != stored
    assert pin_matches("2468", stored) and not pin_matches("2469", stored)
    doc = {"station_id": "s", "meter": {"model": "sdm630", "port": "/dev/x"}, "console": {"pin_hash": stored}}
    assert validate(doc)["console"]["pin_hash"] == stored
    doc["console"]["pin_hash"] = "sha256:zz:12"
    with pytest.raises(ConfigError, match="console.pin_hash"):
        validate(doc)
    lock = PinLock(stored, lock_after_s=10, now_ms=0)
    assert not lock.try_pin("0000", 0) and lock.wait_s(0) == 1
    assert not lock.try_pin("0000", 1000) and lock.wait_s(1000) == 2
    assert not lock.try_pin("0000", 3000) and lock.wait_s(3000) == 4
    assert lock.try_pin("2468", 7000) and lock.unlocked and lock.failures == 0
    assert not lock.expire(16999) and lock.expire(17000) and not lock.unlocked


def test_pin_hash_command_line():
    """``evse-agent --pin-hash`` prints a value the board file takes; a bad PIN is refused."""
    run = [sys.executable, "-m", "evse_agent.ports.cpython.main", "--pin-hash"]
    result = subprocess.run(run + ["2468"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert pin_matches("2468", result.stdout.strip())
    result = subprocess.run(run + ["-"], input="97531\n", capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert pin_matches("97531", result.stdout.strip())
    result = subprocess.run(run + ["12"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2 and "a PIN has 4 to 32 characters, this one 2" in result.stderr


class Capture:
    """A console stream that keeps what is written."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data.extend(data)

    def text(self):
        text = self.data.decode()
        self.data = bytearray()
        return text


class StepClock:
    def __init__(self):
        self.ms = 0

    def monotonic_ms(self):
        return self.ms

    def time(self):
        return 1795000000 + self.ms / 1000

    def synced(self):
        return True


def unwrapped(text):
    """Console output with wrapped lines (continuations indented by two) joined again."""
    return re.sub(r"\r?\n  (?=\S)", " ", text)


def test_journal_verify_accepts_folded_aggregates_and_names_damage(tmp_path):
    """Gaps a summary covers are fine; a damaged record is reported with the seq it took."""
    config = validate({"station_id": "s-1", "meter": {"model": "sdm630", "port": "/dev/null"},
                       "journal": {"dir": str(tmp_path), "max_bytes": 65536, "reserve_bytes": 4096,
                                   "segment_bytes": 4096}})
    clock = StepClock()
    journal = Journal(FileSystem(str(tmp_path)), config["journal"], clock)
    journal.recover()
    outbox = Outbox(None, "s-1", journal)
    for i in range(600):
        clock.ms += 10000
        outbox.record(AGGREGATE, {"start": iso_utc(clock.time() - 10), "end": iso_utc(clock.time()),
                                  "power_total_w": {"min": i, "avg": i, "max": i}, "pad": "x" * 100})
        if i % 100 == 0:
            outbox.record(EVENT, {"type": "power_drop", "number": i})
    assert journal.dropped_records > 0  # aggregates were folded into summaries
    agent = SimpleNamespace(config=config, clock=clock, outbox=outbox, engine=None, monitor=None, forwarder=None)
    stream = Capture()
    console = Console(agent, stream)
    asyncio.run(console._line("journal verify", None))
    report = unwrapped(stream.text())
    assert re.search(r"^journal verify: ok; \d+ record\(s\) in \d+ segment\(s\), seq \d+\.\.%d, "
                     r"OCMF signatures not checked$"
                     % (journal.next_seq - 1), report, re.M), report
    segment = journal.segments[-3]
    records, _, _ = scan(journal.fs.read(segment.name))
    victim = records[1]
    with open(os.path.join(str(tmp_path), segment.name), "r+b") as handle:
        handle.seek(victim.offset + 30)
        handle.write(b"#")
    asyncio.run(console._line("journal verify", None))
    report = unwrapped(stream.text())
    assert re.search(r"^%s: bytes \d+\.\.\d+ are not a valid record" % segment.name, report, re.M)
    assert ("seq %d missing between %d and %d (not covered by a summary record)"
            % (victim.seq, victim.seq - 1, victim.seq + 1)) in report
    assert re.search(r"^journal verify: 2 problem\(s\); \d+ record\(s\) in \d+ segment\(s\)", report, re.M)


class BoardDoc:
    """The port's board file, in memory."""

    def __init__(self, doc):
        self.doc = doc
        self.overrides = []
        self.path = "board.json"

    def save(self, doc):
        self.doc = doc
        return "board.json.bak"


def _live_station(tmp_path, doc):
    """A whole in-process agent built by the composition root (real meter link, journal,
    forwarder; the meter's line is never used) and its console."""
    doc = json.loads(json.dumps(doc))
    doc.setdefault("io", {"driver": "sim", "sim_file": str(tmp_path / "pins.json")})
    doc.setdefault("session", {"state_dir": str(tmp_path / "state")})
    doc.setdefault("signing", {"key_file": str(tmp_path / "station.pem")})
    config = validate(json.loads(json.dumps(doc)))
    ports = Ports(None, FileSystem, Publisher(), SimPinBank(config["io"]),
                  FileKeySigner(config["signing"]["key_file"]), console_stream=Capture(),
                  board=BoardDoc(json.loads(json.dumps(doc))))
    agent = build_station(config, StepClock(), ports)
    return agent, agent.console


def _in_use(agent, console, path):
    """What the component that owns ``path`` uses now, in the setting's own units."""
    owners = {
        "meter.poll_interval_s": lambda: agent._poll_ms / 1000,
        "meter.timeout_ms": lambda: agent.meter.master.timeout_ms,
        "meter.retries": lambda: agent.meter.master.retries,
        "mqtt.telemetry_interval_s": lambda: agent._telemetry_ms / 1000,
        "mqtt.status_interval_s": lambda: agent._status_ms / 1000,
        "journal.sync_interval_s": lambda: agent.outbox.journal.sync_ms / 1000,
        "journal.cursor_sync_s": lambda: agent.outbox.journal.cursor_sync_ms / 1000,
        "journal.window": lambda: agent.forwarder.window,
        "console.lock_after_s": lambda: console.lock.lock_after_ms / 1000,
        "console.max_line": lambda: console.editor.max_line,
        "console.pin_hash": lambda: console.lock.pin_hash,
    }
    if path in owners:
        return owners[path]()
    node = agent.config  # description and events.*: read from the config on every check
    for part in path.split("."):
        node = node[part]
    return node


def _value_for(path, field):
    if field.kind is bool:
        return st.booleans()
    if field.kind is int:
        return st.integers(min_value=field.minimum, max_value=field.maximum)
    if field.kind is float:
        return st.floats(min_value=field.minimum, max_value=field.maximum, allow_nan=False).map(
            lambda v: round(v, 3))
    if path == "console.pin_hash":
        return st.tuples(st.text("0123456789", min_size=4, max_size=8), st.binary(min_size=4, max_size=8)).map(
            lambda pair: pin_hash(pair[0], pair[1]))
    return st.text("abcxyz-_.0123456789", max_size=30)


@st.composite
def live_changes(draw):
    """A few (live setting, value) pairs: values in the field's range, some of them against
    the rules between settings."""
    fields = dict(setting_paths())
    paths = draw(st.lists(st.sampled_from(live_settings()), min_size=1, max_size=6))
    return [(path, draw(_value_for(path, fields[path]))) for path in paths]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=live_changes())
def test_a_live_setting_reaches_its_owner_at_once(tmp_path, changes):
    """Every setting the schema marks live, set on the console, is in use at once by the
    component that owns it (through its setter) and kept in the agent's config; a value the
    board's rules refuse changes nothing."""
    doc = {"station_id": "s-1", "meter": {"model": "sdm630", "port": "/dev/null"},
           "journal": {"dir": str(tmp_path / "journal")},
           "console": {"pin_hash": pin_hash("2468", b"salt-123")}}
    shutil.rmtree(str(tmp_path / "journal"), ignore_errors=True)
    agent, console = _live_station(tmp_path, doc)
    asyncio.run(console._line("unlock 2468", None))
    said = console.stream.text()
    assert console.lock.unlocked, said
    for path, value in changes:
        before = _in_use(agent, console, path)
        board_before = json.dumps(console.board.doc, sort_keys=True)
        asyncio.run(console._line("config set %s %s" % (path, json.dumps(value)), None))
        said = console.stream.text()
        if said.startswith("error: "):
            assert path.startswith("events.") and "events." in said, said  # a rule between thresholds
            assert _in_use(agent, console, path) == before
            assert json.dumps(console.board.doc, sort_keys=True) == board_before
            continue
        assert "in use now" in said, said
        in_use = _in_use(agent, console, path)
        assert in_use == value or (isinstance(value, float) and abs(in_use - value) < 0.001), (path, in_use, value)
        node = agent.config
        for part in path.split("."):
            node = node[part]
        assert node == value
