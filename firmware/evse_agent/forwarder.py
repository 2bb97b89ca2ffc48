"""Store-and-forward: publishes journal records in order and advances the cursor on PUBACK.

Policy (live traffic never waits behind a backlog): live messages — 1 s telemetry (QoS 0),
the retained state and meter status — bypass the journal and go out as they happen. The
journal replays in sequence order with at most ``window`` records in flight (handed to the
MQTT client and not yet acknowledged), so a backlog of any size shares the link with live
traffic instead of blocking it, and the broker's acknowledgements pace the replay. The
acknowledged cursor moves only over an unbroken run of PUBACK'ed records; the journal
persists it every ``cursor_sync_s``.

The publisher is the port's (``publish`` -> token or None, ``drain_acked``; contract in
``ports/__init__.py``); the port calls ``wake()`` (from the event loop's thread) on every
PUBACK and connection change, and the outbox calls it on every append.
"""


from . import log
from .journal import AGGREGATE, EVENT, SESSION, SUMMARY
from .wakeup import Wakeup


# With nothing due, the forwarder still looks in this often (a missed wake-up costs no more).
IDLE_MS = 5000


class Forwarder:
    """Replays the journal to the broker; one task (``run``)."""

    def __init__(self, journal, publisher, topics, clock, window=16):
        self.journal = journal
        self.publisher = publisher
        self.clock = clock
        self.window = window
        self.topic_of = {SESSION: topics.session, EVENT: topics.event,
                         AGGREGATE: topics.aggregate, SUMMARY: topics.aggregate}
        self.inflight = []  # [seq, token, acked] in seq order
        self._by_token = {}
        self.sent_up_to = journal.acked  # highest seq handed to the publisher
        self.published = 0
        self._wake = Wakeup()
        self._stopping = False
        self._generation = journal.generation

    def set_window(self, window):
        """Hand at most ``window`` records to the publisher unacknowledged, from the next pump."""
        self.window = window

    def wake(self):
        """New records were appended."""
        self._wake.set()

    def stop(self):
        self._stopping = True
        self._wake.set()

    async def run(self):
        """Pump on every wake-up (append, PUBACK, connection change) and run the journal's
        periodic work when it falls due; otherwise sleep."""
        journal = self.journal
        while not self._stopping:
            self._wake.clear()
            self.pump()
            now = self.clock.monotonic_ms()
            journal.tick(now)
            due = journal.next_due_ms()
            wait_ms = IDLE_MS if due is None else min(IDLE_MS, max(due - now, 1))
            await self._wake.wait(wait_ms)

    def pump(self):
        """Collect acknowledgements, then fill the window with the next records."""
        self._collect_acks()
        if self.journal.generation != self._generation:
            # A segment was compacted: re-read from what was acknowledged, in order.
            self._generation = self.journal.generation
            self.sent_up_to = max(self.journal.acked, self.inflight[-1][0] if self.inflight else 0)
        room = self.window - len(self.inflight)
        ready = self.journal.publishable_seq()
        if room <= 0 or self.sent_up_to >= ready:
            return
        for record in self.journal.read_after(self.sent_up_to, room):
            if record.seq > ready:
                break
            topic = self.topic_of.get(record.type)
            if topic is None:
                log.error("journal record seq %d has unknown type %d; skipped" % (record.seq, record.type))
                self.inflight.append([record.seq, None, True])
                self.sent_up_to = record.seq
                continue
            token = self.publisher.publish(topic, record.payload, 1, False)
            if token is None:
                break  # the client refused (queue full / not ready): try again on activity
            entry = [record.seq, token, False]
            self.inflight.append(entry)
            self._by_token[token] = entry
            self.sent_up_to = record.seq
            self.published += 1
        self._collect_acks()

    def _collect_acks(self):
        advanced = None
        for token in self.publisher.drain_acked():
            entry = self._by_token.pop(token, None)
            if entry is not None:
                entry[2] = True
        while self.inflight and self.inflight[0][2]:
            advanced = self.inflight.pop(0)[0]
        if advanced is not None:
            self.journal.acknowledge(advanced)

    def stats(self):
        return {"inflight": len(self.inflight), "sent_up_to": self.sent_up_to, "published": self.published}
