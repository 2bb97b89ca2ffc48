"""Console commands ``status`` and ``pilot``: station health and the charge-point inputs.

Bound to ``Console`` when a command of this group is first used (see the package
docstring): ``self`` is the console."""

from .. import __version__
from . import PILOT_MEANING, _closed, _date_time, _duration, _error_text, _no_args, _size


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


METHODS = (cmd_status, _inputs, _pilot_text, _contactor_text, _session_text, _meter_text,
    _broker_text, _journal_text, _clock_text, cmd_pilot, _sample_text)
