"""Technician console of the running agent, driven over its real pseudo-terminal with
pexpect — each command's output, the lock, a restart, and 10,000 random lines after which
the agent still polls and publishes.
"""

import json
import os
import re
import select
import shutil
import statistics
import threading
import time
from datetime import datetime, timezone

import pexpect
import pexpect.fdpexpect
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import SIM_BOARD, wait_for
from evse_tools.sim.vehicle_sim import VehicleSim
from test_console import unwrapped
from test_sessions import FAST, public_key, verify_ocmf

SIM_PIN = "1234"  # boards/sim.json's console.pin_hash is this PIN's
PROMPT = r"\r\nsim-001[>#] "


# -- the running agent's console over its pty ---------------------------------------------


class Terminal:
    """The technician's end of the agent's console pseudo-terminal, driven with pexpect."""

    def __init__(self, link, timeout=60):
        self.fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        self.child = pexpect.fdpexpect.fdspawn(self.fd, timeout=timeout, encoding="utf-8",
                                               codec_errors="replace", maxread=65536)
        self.child.expect("technician console, station sim-001; type 'help'" + PROMPT)

    def command(self, line, expect=PROMPT):
        """The output of one command line (without its echo and the next prompt)."""
        self.child.send(line + "\r")
        self.child.expect(expect)
        echo, _, output = self.child.before.replace("\r\n", "\n").partition("\n")
        assert echo.endswith(line), (echo, line)
        return output

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self):
        self.child.close()


class ReadingTerminal:
    """A terminal that reads the console all the time, as a technician's does, while the
    test types: a thread collects every byte (pexpect reads only while it expects, so a
    long answer to one typed line would fill the console's output queue meanwhile)."""

    def __init__(self, fd):
        self.fd = fd
        self.output = bytearray()
        self.changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stopping:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                data = os.read(self.fd, 65536)
                with self.changed:
                    self.output.extend(data)
                    self.changed.notify_all()

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def wait_for(self, marker, start, timeout_s):
        """Index just past ``marker`` in the output from ``start`` on; TimeoutError if absent."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                found = self.output.find(marker, start)
                if found >= 0:
                    return found + len(marker)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no %r after %d bytes of output" % (marker, start))
                self.changed.wait(remaining)

    def stop(self):
        self._stopping = True
        self._thread.join(5)


def assert_fits(output):
    for line in output.splitlines():
        assert len(line) <= 80, line


class ConsoleStation:
    """Meter simulator, vehicle, agent (on a private copy of the sim board) and the console."""

    def __init__(self, broker, collector, meter_sim, agent_process, station_dir, *extra):
        station_dir.mkdir(parents=True, exist_ok=True)
        self.dir = station_dir
        self.board = str(station_dir / "board.json")
        shutil.copy(SIM_BOARD, self.board)
        self.link = str(station_dir / "console.pty")
        pin_file = str(station_dir / "pins.json")
        self.vehicle = VehicleSim(pin_file, advertised_a=16.0)
        self.meter = meter_sim("sdm630", pin_file=pin_file)
        self.meter.physics.noise = False
        self.collector = collector
        self.agent = agent_process(broker, self.meter.device, *(FAST + ("--set", "console.pty_link=" + self.link)
                                                                + extra), board=self.board)
        online = collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"])
        assert online is not None, self.agent.log()
        self.terminal = Terminal(self.link)

    def command(self, line, expect=PROMPT):
        return self.terminal.command(line, expect)

    def message(self, suffix, predicate=lambda body: True, after=0.0, timeout_s=60):
        found = self.collector.wait_for(lambda m: m.topic.endswith("/" + suffix) and m.received > after
                                        and predicate(m.body), timeout_s=timeout_s)
        assert found is not None, "no %s message\n%s" % (suffix, self.agent.log())
        return found


@pytest.fixture
def console_station(broker, collector, meter_sim, agent_process, station_dir):
    made = []

    def make(*extra):
        made.append(ConsoleStation(broker, collector, meter_sim, agent_process, station_dir, *extra))
        return made[-1]

    yield make
    for station in made:
        station.terminal.close()


def test_read_only_commands(console_station, station_dir):
    """help, status, pilot, meter (watch, regs), session(s), events, journal (verify), mqtt,
    config show/get, selftest and log answer from the agent's own objects."""
    cs = console_station()
    listing = cs.command("help")
    assert_fits(listing)
    for usage in ("status", "meter watch", "meter regs <addr> <n>", "pilot", "session show <id>", "sessions [n]",
                  "events [n]", "journal [verify]", "mqtt", "config set <setting> <v> *", "config save", "selftest",
                  "log [n]", "unlock [PIN]", "restart", "help [command]"):
        assert "  " + usage in listing, usage
    assert "03 (holding)" in cs.command("help meter r")
    assert "error: ambiguous command 'se': could be session, sessions, selftest" in cs.command("se")
    assert cs.command("frobnicate 1 2").strip() == "error: unknown command 'frobnicate'; 'help' lists the commands"
    assert cs.command("status extra").strip() == "error: status takes no arguments (got 'extra')"

    status = cs.command("st")
    assert_fits(status)
    assert re.search(r"^station +sim-001, evse-agent \d", status, re.M)
    assert re.search(r"^pilot +A \(no vehicle\)", status, re.M)
    assert re.search(r"^meter +online for 00:00:\d\d", status, re.M)
    assert re.search(r"^broker +connected to 127.0.0.1:\d+", status, re.M)
    assert re.search(r"^session +none$", status, re.M)
    assert re.search(r"^console +locked$", status, re.M)

    # A session: plug in, charge, look around, finish.
    cs.vehicle.plug()
    cs.message("session", lambda b: b["event"] == "begin")
    cs.vehicle.charge()
    cs.message("state", lambda b: b["charging"])
    cs.message("telemetry", lambda b: (b["power_total_w"] or 0) > 1000 and b["session_energy_wh"] is not None)
    status = cs.command("status")
    session_id = re.search(r"^session +(sim-001-\d{6}), charging, (\d+) Wh so far", status, re.M).group(1)
    assert re.search(r"^pilot +C \(charging\), 16.0 A offered, duty 26.7 %", status, re.M)
    assert re.search(r"^contactor +command closed, feedback closed", status, re.M)
    pilot = cs.command("pilot")
    assert re.search(r"^pins now +6.00 V, duty 26.7 %, command closed, feedback closed", pilot, re.M)
    meter = cs.command("meter")
    assert_fits(meter)
    assert re.search(r"^current +16.000 A +16.000 A +16.000 A", meter, re.M)
    kwh = re.search(r"^import +(\d+) Wh \((\d+\.\d{3}) kWh\)", meter, re.M)
    assert "(open, charging)" in cs.command("session")

    paused = time.monotonic()
    cs.vehicle.pause()
    cs.message("state", lambda b: b["pilot"] == "B" and b["contactor_feedback"] is False, after=paused)
    cs.vehicle.unplug()
    end = cs.message("session", lambda b: b["event"] == "end").body
    assert end["session_id"] == session_id
    sessions = cs.command("sessions")
    assert_fits(sessions)
    row = re.search(r"^%s +\d{4}-\d\d-\d\d \d\d:\d\d +\d\d:\d\d:\d\d +(\d+)  ended$" % session_id, sessions, re.M)
    assert row and int(row.group(1)) == end["energy_wh"] > 0, sessions
    shown = cs.command("session show %d" % int(session_id[-6:]))
    assert "%s (end record, journal seq %d)" % (session_id, end["seq"]) in shown
    assert "energy      %d Wh in 1 segment(s)" % end["energy_wh"] in shown
    documents = [line for line in shown.splitlines() if line.startswith("OCMF|")]
    assert documents == end["ocmf_documents"] and len(documents) == 2
    key = public_key(station_dir)
    assert all(verify_ocmf(document, key) for document in documents)
    assert "error: no session 'sim-001-999999' in the journal" in cs.command("session show 999999")

    journal = cs.command("journal")
    assert re.search(r"^backlog +\d+ record\(s\) not yet acknowledged, 0 held in memory", journal, re.M)
    verify = unwrapped(cs.command("journal verify"))
    # The begin record carries the begin document, the end record both.
    assert re.search(r"journal verify: ok; \d+ record\(s\) in \d+ segment\(s\), seq 1\.\.\d+, 3 OCMF signature\(s\) verified", verify)
    mqtt = cs.command("mqtt")
    assert re.search(r"^link +connected \(1 connect\(s\) since start\)", mqtt, re.M)
    assert re.search(r"^client id +evse-agent-sim-001$", mqtt, re.M)

    # Raw registers: the import register's float32 is the reading's kWh.
    regs = cs.command("meter regs 0x48 2")
    assert "unit 1, function 04 (input registers), 2 from 0x0048:" in regs
    value = float(re.search(r"^0x0048 +72 +[0-9A-F]{4} +\d+ +([\d.]+)$", regs, re.M).group(1))
    assert abs(value - float(kwh.group(2))) < 0.01
    assert cs.command("meter regs zz 2").strip() == "error: address 'zz' is not a number (decimal, or hex with 0x)"
    assert cs.command("meter regs 0 200").strip() == "error: count 200 is outside 1..125"
    assert "illegal data address" in cs.command("meter regs 0x9000 2 holding")

    # meter watch: a line per reading until a key, which is used up.
    cs.terminal.child.send("meter watch\r")
    cs.terminal.child.expect(r"\n\d\d:\d\d:\d\d +2\d\d\.\d.*\n\d\d:\d\d:\d\d +2\d\d\.\d")
    cs.terminal.child.send("x")
    cs.terminal.child.expect("stopped watching" + PROMPT)

    config = cs.command("config show mqtt")
    assert 'mqtt.topic_prefix = "evse"' in config and "mqtt.keepalive_s = 30" in config
    assert cs.command("config get console.pin").splitlines()[0] == "console.pin_hash = (set)"
    assert "applies at once" in cs.command("config get mqtt.tele")
    assert "error: ambiguous setting 'mqtt.re'" in cs.command("config get mqtt.re")

    selftest = cs.command("selftest")
    assert_fits(selftest)
    for check in ("meter comms", "gpio read-back", "broker round trip", "signing round trip", "journal write"):
        assert re.search(r"^%s +ok " % check, selftest, re.M), selftest
    assert "selftest: 5 ok, 0 FAIL" in selftest
    cs.meter.set_fault("silent")
    selftest = cs.command("selftest")
    assert re.search(r"^meter comms +FAIL +timeout: no response within 150 ms", selftest, re.M)
    assert "selftest: 4 ok, 1 FAIL" in selftest
    cs.meter.set_fault(None)

    log = cs.command("log 50")
    assert "session %s ended" % session_id in log
    assert len(cs.command("log 3").splitlines()) == 3
    assert "error: count 0 is outside 1..100" in cs.command("log 0")


def test_lock_config_and_restart(console_station, collector):
    """State-changing commands need the PIN; wrong PINs wait and become events; config set
    applies what it can at once; config save writes the board file; restart re-executes."""
    cs = console_station("--set", "console.lock_after_s=3")
    with open(cs.board) as handle:
        original = handle.read()
    assert cs.command("config set mqtt.keepalive_s 45").strip() == "error: config set needs 'unlock <PIN>' first"
    assert cs.command("restart").strip() == "error: restart needs 'unlock <PIN>' first"

    assert cs.command("unlock 9999").strip() == "error: wrong PIN; next try in 1 s"
    assert cs.command("unlock " + SIM_PIN).strip() == "error: unlock refused for 1 s more after 1 wrong PIN(s)"
    event = cs.message("event", lambda b: b["type"] == "console_unlock_failed").body
    assert event["values"] == {"failures": 1, "retry_after_s": 1} and event["severity"] == "warning"
    assert re.search(r"once +warning +console_unlock_failed", cs.command("events"))
    time.sleep(1.1)
    cs.terminal.child.send("unlock\r")
    cs.terminal.child.expect("PIN: ")
    cs.terminal.child.send(SIM_PIN + "\r")
    cs.terminal.child.expect(r"\*\*\*\*\r\nunlocked; 'lock' locks again, or 3 s without input\r\nsim-001# ")

    before = [epoch_of(m.body["ts"]) for m in collector.on("telemetry")]
    assert cs.command("config set mqtt.telemetry_interval_s 0.4").strip() == \
        "mqtt.telemetry_interval_s = 0.4: in use now; 'config save' keeps it"
    # The next telemetry is still on the old schedule, then every 0.4 s: by the readings' own
    # timestamps, the gaps shrink from about 1 s to about 0.4 s (however busy the machine).
    def enough_telemetry():
        cs.command("")  # input keeps the console unlocked meanwhile (it locks after 3 s without)
        return len(collector.on("telemetry")) >= len(before) + 7
    assert wait_for(enough_telemetry, 60, interval_s=0.5)
    after = [epoch_of(m.body["ts"]) for m in collector.on("telemetry")][len(before) + 1:]
    gap_before = statistics.median(b - a for a, b in zip(before, before[1:]))
    gap_after = statistics.median(b - a for a, b in zip(after, after[1:]))
    assert gap_after < gap_before / 1.5, (gap_before, gap_after)
    assert cs.command("config set events.voltage_max_v 240").strip() == \
        "events.voltage_max_v = 240.0: in use now; 'config save' keeps it"
    assert cs.command("config set mqtt.keepalive_s 45").strip() == \
        "mqtt.keepalive_s = 45: needs a restart ('config save', then 'restart')"
    assert cs.command("config set meter.model sdm999").strip() == \
        'error: meter.model: "sdm999" is not one of "abb_b23", "sdm120", "sdm630"'
    assert cs.command("config set journal.reserve_bytes 99999999").strip() == \
        "error: journal.reserve_bytes: 99999999 is not below journal.max_bytes 16777216"
    assert "mqtt.keepalive_s = 30   (after restart: 45)" in cs.command("config show mqtt")
    saved = cs.command("config save")
    assert "saved %s (the previous version is %s.bak)" % (cs.board, cs.board) in saved
    assert "restart to use: mqtt.keepalive_s" in saved
    with open(cs.board + ".bak") as handle:
        assert handle.read() == original
    with open(cs.board) as handle:
        board = json.load(handle)
    assert board["mqtt"]["keepalive_s"] == 45 and board["mqtt"]["telemetry_interval_s"] == 0.4
    assert board["events"]["voltage_max_v"] == 240

    # Idle beyond console.lock_after_s: locked again.
    cs.terminal.child.expect(r"console locked after 3 s without input\r\nsim-001> ", timeout=60)
    assert cs.command("restart").strip() == "error: restart needs 'unlock <PIN>' first"

    cs.command("unlock " + SIM_PIN)
    restarted_at = time.monotonic()
    cs.terminal.child.send("restart\r")
    cs.terminal.child.expect("restarting: clean shutdown, then the same command line again")
    cs.terminal.child.expect(pexpect.EOF)  # the old pty goes with the old process image
    cs.terminal.close()
    offline = cs.message("status", lambda body: body is None, after=restarted_at)
    assert offline.text == "offline"
    online = cs.message("status", lambda body: True, after=offline.received)
    assert online.text == "online"
    assert wait_for(lambda: sum("console on /dev/pts/" in line for line in cs.agent.stderr) >= 2, 60)
    assert cs.agent.alive()
    cs.terminal = Terminal(cs.link)
    assert re.search(r"^uptime +00:00:\d\d", cs.command("status"), re.M)  # a new process
    assert cs.command("config get mqtt.keepalive_s").splitlines()[0] == "mqtt.keepalive_s = 45"
    assert cs.command("config get mqtt.telemetry_interval_s").splitlines()[0] == \
        "mqtt.telemetry_interval_s = 1.0"  # the command line's --set wins over the saved file


COMMAND_WORDS = ("status", "meter", "meter regs", "meter watch", "pilot", "session", "session show", "sessions",
                 "events", "journal", "journal verify", "mqtt", "config", "config show", "config get",
                 "config set", "config save", "log", "unlock", "lock", "restart", "help", "st", "m", "co", "j")
ARGS = st.one_of(st.integers(-10 ** 6, 10 ** 6).map(str),
                 st.sampled_from(["0x48", "0xZZ", "-1", "9" * 20, "mqtt.port", "events.voltage_max_v", "nan",
                                  "null", "1e400", '"x"', "{}", "[]", "holding", "input", "mqtt", "1234"]),
                 st.text(max_size=12))
LINES = st.one_of(
    st.builds(lambda word, args: " ".join([word] + args).encode("utf-8", "surrogatepass"),
              st.sampled_from(COMMAND_WORDS), st.lists(ARGS, max_size=3)),
    st.binary(max_size=80),
    st.text(max_size=60).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.builds(lambda chunk, times: chunk * times, st.binary(min_size=1, max_size=8), st.integers(40, 300)),
)
ENDINGS = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\x00"])
BATCH = 50


def test_fuzz_10000_random_lines(console_station, collector):
    """Garbage, binary noise, over-long lines and commands with wrong arguments: each gets
    its answer, and the agent keeps polling and publishing throughout."""
    cs = console_station()
    terminal = cs.terminal
    sent = []
    online_before, cycles_before = poll_cycles(cs)
    started = time.monotonic()

    reader = ReadingTerminal(terminal.fd)
    position = [len(reader.output)]

    @settings(max_examples=10000 // BATCH, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(LINES, ENDINGS), min_size=BATCH, max_size=BATCH))
    def batch(lines):
        start = position[0]
        reader.write(b"".join(line + ending for line, ending in lines))
        sent.append(len(lines))
        # An empty line ends a PIN prompt or a meter watch the batch may have left open.
        reader.write(b"\rmark-%d\r" % len(sent))
        marker = b"error: unknown command 'mark-%d'; 'help' lists the commands\r\nsim-001" % len(sent)
        position[0] = reader.wait_for(marker, start, timeout_s=120)
        output = bytes(reader.output[start:position[0]])
        assert b"internal error" not in output
        assert b"output dropped" not in output

    try:
        batch()
    finally:
        reader.stop()
    finished = time.monotonic()
    assert sum(sent) >= 10000
    assert cs.agent.alive(), cs.agent.log()
    assert "Traceback" not in cs.agent.log() and "failed:" not in cs.agent.log()
    # Polling and publishing went on all along: telemetry every second, by the readings' own
    # timestamps (when the subscriber got them depends on how busy this machine is).
    received = [m for m in collector.on("telemetry") if started <= m.received <= finished]
    times = [epoch_of(m.body["ts"]) for m in received]
    assert len(times) >= 2 and max(b - a for a, b in zip(times, times[1:])) < 2.5, times
    assert len(times) >= (times[-1] - times[0]) * 0.8 - 1, (len(times), times[-1] - times[0])
    cs.message("telemetry", after=finished)
    # The poller kept its 0.2 s schedule while the console was flooded: cycles against the
    # agent's own count of seconds online.
    online_after, cycles_after = poll_cycles(cs)
    assert cycles_after - cycles_before >= (online_after - online_before) / 0.2 * 0.7, \
        (cycles_after - cycles_before, online_after - online_before)
    status = cs.command("status")
    assert re.search(r"^meter +online for ", status, re.M) and re.search(r"^broker +connected", status, re.M)


def poll_cycles(cs):
    """(seconds the meter has been online, poll cycles) as the agent counts them."""
    found = re.search(r"^meter +online for (\d+):(\d\d):(\d\d), (\d+) cycles", cs.command("status"), re.M)
    hours, minutes, seconds, cycles = (int(part) for part in found.groups())
    return hours * 3600 + minutes * 60 + seconds, cycles


def epoch_of(ts):
    """Epoch seconds of an agent timestamp (``2026-11-25T06:50:01.123Z``)."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_wrong_pin_back_off_survives_a_restart(console_station, broker, agent_process):
    """A restart gives no fresh fast tries: the wrong PINs before it still count, so the next
    wrong PIN after it waits as the third in a row would (4 s), not as a first (1 s)."""
    cs = console_station()
    assert cs.command("unlock 9999").strip() == "error: wrong PIN; next try in 1 s"
    assert wait_for(lambda: cs.command("unlock 9999").strip() == "error: wrong PIN; next try in 2 s", 60,
                    interval_s=0.3)
    cs.agent.stop()
    cs.terminal.close()
    assert not os.path.exists(cs.link)  # a clean stop removes its console link
    cs.agent = agent_process(broker, cs.meter.device, *(FAST + ("--set", "console.pty_link=" + cs.link)),
                             board=cs.board)
    assert wait_for(lambda: os.path.exists(cs.link), 60), cs.agent.log()
    cs.terminal = Terminal(cs.link)
    assert cs.agent.wait_for_log("2 wrong PIN(s) before the restart", timeout_s=60), cs.agent.log()
    replies = []

    def third_try():
        replies.append(cs.command("unlock 9999").strip())
        return not replies[-1].startswith("error: unlock refused")
    assert wait_for(third_try, 60, interval_s=0.3)
    assert replies[-1] == "error: wrong PIN; next try in 4 s", replies
    assert all(r.endswith("after 2 wrong PIN(s)") for r in replies[:-1]), replies
