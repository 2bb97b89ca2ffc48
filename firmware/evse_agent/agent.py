"""The agent's main job: poll the meter, follow the charge point's inputs, publish.

One asyncio task per concern (STYLE: micropython-async):

- the poll loop owns the meter schedule and can be woken early when a session needs a
  fresh reading (plug-in, unplug);
- the input monitor samples pilot and contactor lines and reports debounced changes;
- the supervisor runs the time-based safety checks when they fall due (it sleeps until the
  next deadline or the next input change, not on a fixed beat);
- the forwarder replays the journal to the broker, paced by acknowledgements;
- the technician console (``console``, if the board has one) serves its serial line;
- Home Assistant discovery (``discovery``, if ``homeassistant.enabled``) publishes the
  station's entity configs after each connect (``ha_discovery``), poked by each poll cycle.

Everything leaves through the outbox: session records, events and telemetry aggregates
are journaled first; live telemetry and state go out at once. ``on_reading`` lets the
port show live readings.

Live data: one telemetry message per reading when the telemetry interval is not longer than
the poll interval (otherwise the first reading of each telemetry interval, with half a poll
of slack for jitter); a cycle whose read failed repeats the last sample flagged ``stale``
while the link is still online. The retained ``meter`` and ``state`` messages are published
again after every (re)connect to the broker, and ``state`` only once the first poll cycle
has told whether the meter answers. A clean stop journals the last aggregate and gives the
forwarder up to ``STOP_FLUSH_MS`` to have the broker acknowledge what was journaled.
"""

import asyncio

from . import __version__, log
from .aggregate import Aggregator
from .events import PowerMonitor
from .journal import AGGREGATE, EVENT, SESSION
from .messages import Topics, iso_utc, meter_status_doc, telemetry_doc
from .pilot import InputMonitor
from .session import SessionEngine
from .wakeup import Wakeup

# The supervisor sleeps until the power monitor's next contactor check is due or the inputs
# change; with nothing due it still looks in at this interval.
SUPERVISOR_IDLE_MS = 1000

# A clean stop waits at most this long for the broker to acknowledge the journaled records.
STOP_FLUSH_MS = 3000


def event_doc(event):
    """The event message body: type, severity, times, values, session."""
    return {
        "event_number": event.number,
        "type": event.type,
        "severity": event.severity,
        "state": "active" if event.end is None else "cleared",
        "instant": bool(getattr(event, "instant", False)),
        "start": iso_utc(event.start),
        "end": None if event.end is None else iso_utc(event.end),
        "values": event.values,
        "session_id": event.session_id,
    }


class Agent:
    """Ties meter, inputs, session engine, power monitor and outbox together.

    Built whole, by ``station.build_station``: from the meter, the outbox (journal,
    forwarder, publisher), the state store and the platform ``ports`` it builds the session
    engine, the power monitor and the input monitor, and what the board asks for (Home
    Assistant discovery, the RFID reader's desk, the console), reports damage found at
    start and continues an open session (``restored``)."""

    def __init__(self, config, clock, meter, outbox, store, ports):
        self.config = config
        self.meter = meter
        self.outbox = outbox
        self.clock = clock
        self.forwarder = outbox.forwarder
        self.on_reading = ports.on_reading
        self.started_ms = clock.monotonic_ms()
        self.aggregator = Aggregator(config["journal"]["aggregate_interval_s"], meter.model.phases)
        self.topics = Topics(config["mqtt"]["topic_prefix"], config["station_id"])
        self.latest = None
        self.cycles = 0
        self._poll_ms = int(config["meter"]["poll_interval_s"] * 1000)
        self._telemetry_ms = int(config["mqtt"]["telemetry_interval_s"] * 1000)
        self._status_ms = int(config["mqtt"]["status_interval_s"] * 1000)
        self._last_telemetry_ms = None
        self._retained_for = None  # publisher.connects when the retained messages last went out
        self._stopping = False
        self._wake = Wakeup()
        self._supervise = Wakeup()  # inputs or thresholds changed: recompute deadlines
        model = meter.model
        identity = {
            "gateway_vendor": config["signing"]["gateway_vendor"],
            "gateway_serial": config["signing"]["gateway_serial"] or config["station_id"],
            "gateway_version": __version__,
            "meter_vendor": model.vendor,
            "meter_model": model.product,
        }
        self.engine = SessionEngine(config, store, ports.signer, clock, meter, self.publish,
                                    self.request_reading, identity)
        pilot = config["io"]["pilot"]
        self.monitor = PowerMonitor(config["events"], model.phases, clock, self.publish_event,
                                    lambda: store.next_number("event"), pilot["sample_ms"], pilot["debounce_ms"],
                                    lambda: self.inputs.sampled_ms)
        self.monitor.session_of = self.engine.open_session_id
        self.inputs = InputMonitor(ports.pins, config["io"], clock, self)
        # Meter faults, register anomalies, journal alarms and damage found at start are
        # events an operator sees.
        journal = outbox.journal
        journal.alarm = self.on_journal_alarm
        self.engine.alarm = self.monitor.alarm
        meter.alarm = self.monitor.alarm
        meter.notice = self.monitor.notice
        for type_, values in store.damage + journal.damage:
            self.monitor.notice(type_, values)
        self.restored = self.engine.restore()  # the session continued, or None
        self.discovery = None
        if config["homeassistant"]["enabled"]:
            from .ha_discovery import Discovery
            self.discovery = Discovery(config, model, outbox.publisher, __version__)
        self.identification = None  # identification.IdentificationDesk (RFID reader), if any
        if ports.reader_stream is not None:
            from .identification import identification_desk
            self.identification = identification_desk(config, clock, self.engine, outbox.publisher,
                                                      self.topics, ports.reader_stream)
        self.console = None
        if ports.console_stream is not None:
            from .console import Console
            self.console = Console(self, ports.console_stream, ports.board, ports.restart)

    # -- wiring callbacks --------------------------------------------------------------

    def publish(self, kind, doc):
        """Session engine output: session records (QoS 1) and the retained state."""
        if kind == "session":
            self.outbox.record(SESSION, doc)
        elif kind == "state":
            self.outbox.post(self.topics.state, doc, qos=1, retain=True)
        else:
            raise ValueError("unknown message kind %r" % (kind,))

    def publish_event(self, event):
        """Power monitor output: every raise and clear, QoS 1."""
        self.engine.note_event(event)
        level = log.warning if event.severity != "info" else log.info
        level("event %s %s %s" % (event.type, "raised" if event.end is None else "cleared", event.values))
        self.outbox.record(EVENT, event_doc(event))

    def on_journal_alarm(self, name, active, values):
        """Journal alarm (journal_full, disk_error): raised and cleared as events."""
        self.monitor.alarm(name, active, values)

    def on_fault(self, where, error):
        """A listener ran out of memory or met a disk error: the ``agent_fault`` alarm, raised
        until the session engine has handled a reading without one (its work is retried)."""
        log.error("agent fault in %s: %r" % (where, error))
        try:
            self.monitor.alarm("agent_fault", True, {"where": where, "error": "%s: %s" % (type(error).__name__, error)})
        except Exception as again:  # the journal may refuse the event too: the log has it
            log.error("agent_fault event not recorded (%r)" % (again,))

    def _engine_reading(self, reading):
        """The session engine takes a reading; a refused record stays with it, as an alarm."""
        try:
            self.engine.on_reading(reading)
        except (MemoryError, OSError) as error:
            self.on_fault("readings", error)
            return
        monitor = self.monitor
        if "agent_fault" in monitor.active:
            monitor.alarm("agent_fault", False, {"where": "readings"})

    def request_reading(self):
        """Wake the poll loop now: a session needs a fresh reading."""
        self._wake.set()

    def on_inputs(self, inputs, now_ms):
        """Input monitor listener: debounced pilot / contactor change."""
        self.monitor.on_inputs(inputs, now_ms)
        self._supervise.set()
        self.engine.on_inputs(inputs, now_ms)

    def apply_setting(self, path, value):
        """Take a changed board setting into use now, if the schema marks it live: poll,
        telemetry and journal intervals, Modbus timeout and retries, event thresholds (and
        the console's own, which the console applies), each through its owner's setter; the
        value is kept in ``config``. False when the setting needs a restart."""
        from .config import is_live  # loaded when a setting changes, not at start
        if not is_live(path):
            return False
        if path == "meter.poll_interval_s":
            self._poll_ms = int(value * 1000)
        elif path == "meter.timeout_ms":
            self.meter.set_link_timing(timeout_ms=value)
        elif path == "meter.retries":
            self.meter.set_link_timing(retries=value)
        elif path == "mqtt.telemetry_interval_s":
            self._telemetry_ms = int(value * 1000)
        elif path == "mqtt.status_interval_s":
            self._status_ms = int(value * 1000)
        elif path == "journal.sync_interval_s":
            self.outbox.journal.set_sync_intervals(sync_interval_s=value)
        elif path == "journal.cursor_sync_s":
            self.outbox.journal.set_sync_intervals(cursor_sync_s=value)
        elif path == "journal.window":
            self.forwarder.set_window(value)
        # The power monitor reads its thresholds from this same config on every check.
        section = self.config
        parts = path.split(".")
        for part in parts[:-1]:
            section = section[part]
        section[parts[-1]] = value
        self._supervise.set()  # a contactor check interval may have changed
        return True

    def stop(self):
        """Ask the loops to finish after the current cycle (the forwarder after ``run`` has
        flushed the journal to the broker)."""
        self._stopping = True
        self._wake.set()
        self._supervise.set()
        self.inputs.stop()
        if self.identification is not None:
            self.identification.stop()

    # -- tasks -------------------------------------------------------------------------

    async def run(self, duration_s=None):
        """Run every task until ``stop()`` or until ``duration_s`` seconds have passed."""
        tasks = [asyncio.create_task(self._poll_loop(duration_s)), asyncio.create_task(self.inputs.run()),
                 asyncio.create_task(self._supervisor())]
        forwarding = None
        if self.forwarder is not None:
            forwarding = asyncio.create_task(self.forwarder.run())
        if self.console is not None:
            tasks.append(asyncio.create_task(self.console.run()))
        if self.discovery is not None:
            tasks.append(asyncio.create_task(self.discovery.run()))
        if self.identification is not None:
            tasks.append(asyncio.create_task(self.identification.run()))
        try:
            await tasks[0]
        finally:
            self.stop()
            for task in tasks[1:]:
                task.cancel()
            for task in tasks[1:]:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            last = self.aggregator.flush(final=True)
            if last is not None:
                self.outbox.record(AGGREGATE, last)
            if forwarding is not None:
                await self._flush_journal(STOP_FLUSH_MS)
                self.forwarder.stop()
                try:
                    await forwarding
                except asyncio.CancelledError:
                    pass
        log.info("agent stopped after %d poll cycles" % self.cycles)

    async def _flush_journal(self, limit_ms):
        """Let the forwarder publish what was journaled until the broker acknowledged all
        of it, the broker is out of reach, or ``limit_ms`` passed; True when all arrived."""
        journal = self.outbox.journal
        publisher = self.outbox.publisher
        journal.sync()
        deadline = self.clock.monotonic_ms() + limit_ms
        while journal.acked < journal.publishable_seq():
            if not getattr(publisher, "connected", True) or self.clock.monotonic_ms() >= deadline:
                log.warning("stopping with journal records %d..%d not yet acknowledged: sent after the next start"
                            % (journal.acked + 1, journal.publishable_seq()))
                return False
            self.forwarder.wake()
            await asyncio.sleep(0.02)
        return True

    async def _supervisor(self):
        clock = self.clock
        while not self._stopping:
            self._supervise.clear()
            now = clock.monotonic_ms()
            self.monitor.tick(now)
            due = self.monitor.next_check_ms()
            wait_ms = SUPERVISOR_IDLE_MS if due is None else min(SUPERVISOR_IDLE_MS, max(due - now, 1))
            await self._supervise.wait(wait_ms)

    async def _sleep_until(self, due_ms):
        """Sleep until ``due_ms`` or until woken by ``request_reading``."""
        remaining = due_ms - self.clock.monotonic_ms()
        if remaining > 0:
            await self._wake.wait(remaining)

    async def _poll_loop(self, duration_s):
        clock = self.clock
        started = clock.monotonic_ms()
        end_ms = None if duration_s is None else started + int(duration_s * 1000)
        next_poll = started
        next_status = started + self._status_ms
        reported_transitions = -1  # the first cycle always publishes the link status
        while not self._stopping:
            now = clock.monotonic_ms()
            if end_ms is not None and now >= end_ms:
                break
            if now < next_poll and not self._wake.is_set():
                await self._sleep_until(min(next_poll, end_ms) if end_ms is not None else next_poll)
                continue
            self._wake.clear()
            if now >= next_poll:  # on schedule (an early wake-up keeps the schedule)
                next_poll += self._poll_ms
                if next_poll <= now:  # overran: skip the missed slots rather than bursting
                    next_poll = now + self._poll_ms
            reading = await self.meter.read()
            self.cycles += 1
            if self.discovery is not None:
                self.discovery.poke()
            link = self.meter.link
            connects = getattr(self.outbox.publisher, "connects", None)
            if link.transitions != reported_transitions or now >= next_status or connects != self._retained_for:
                if link.transitions != reported_transitions:
                    self._on_link_change(link, first=reported_transitions < 0)
                elif connects != self._retained_for:
                    self.publish_state()  # a broker without persistence forgot it
                reported_transitions = link.transitions
                self._retained_for = connects
                next_status = now + self._status_ms
                self.publish_meter_status()
            if reading is None:
                if self.latest is not None and link.online and self._telemetry_due(now):
                    self._post_telemetry(self.latest, True)
                continue
            self.latest = reading
            self._engine_reading(reading)
            advertised = self.engine.inputs.advertised_a if self.engine.inputs else None
            self.monitor.on_reading(reading, advertised, clock.monotonic_ms())
            self._supervise.set()  # the reading waits for the input samples to confirm it
            finished = self.aggregator.add(reading)
            if finished is not None:
                self.outbox.record(AGGREGATE, finished)
            if self.on_reading is not None:
                self.on_reading(reading)
            if self._telemetry_due(now):
                self._post_telemetry(reading, False)

    def _telemetry_due(self, now_ms):
        """True (and noted) when a telemetry message goes out in the cycle begun at ``now_ms``."""
        last = self._last_telemetry_ms
        if last is None or self._telemetry_ms <= self._poll_ms \
                or now_ms - last >= self._telemetry_ms - self._poll_ms // 2:
            self._last_telemetry_ms = now_ms
            return True
        return False

    def _post_telemetry(self, reading, stale):
        self.outbox.post(self.topics.telemetry,
                         telemetry_doc(reading, self.engine.energy_so_far(), stale, self.clock.time()))

    def publish_state(self):
        """The retained charge-point state again (after a reconnect), once it is known."""
        engine = self.engine
        if engine.inputs is not None and getattr(self.meter.link, "cycles", 1):
            self.publish("state", engine.state_doc())

    def _on_link_change(self, link, first=False):
        """The meter link changed (``first``: the first cycle told its state)."""
        if not first:
            self.monitor.on_meter_link(link.online, link.last_error)
        self.engine.on_meter_link(link.online, first)

    def publish_meter_status(self):
        self.outbox.post(self.topics.meter, meter_status_doc(self.meter, self.clock), qos=1, retain=True)

