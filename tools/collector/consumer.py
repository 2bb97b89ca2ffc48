"""Fleet-side handling of journaled records: de-duplication and gap detection by ``seq``.

Agents publish journaled records (session records, events, aggregates) with QoS 1 and a
per-station sequence number that grows by one with no gaps. QoS 1 and replays after a
restart deliver some records more than once; a consumer keeps each ``(station, seq)``
once and can tell which numbers it has not seen. A ``summary`` record lists the
sequence numbers of the aggregates it stands for (``covers_seq``, [first, last] runs): those
numbers are accounted for, not missing.
"""


class StationSequence:
    """What one station's consumer has seen: everything up to ``contiguous``, and beyond."""

    __slots__ = ("contiguous", "ahead", "duplicates", "accepted")

    def __init__(self):
        self.contiguous = 0
        self.ahead = set()
        self.duplicates = 0
        self.accepted = 0

    def seen(self, seq):
        return seq <= self.contiguous or seq in self.ahead

    def mark(self, seq):
        if seq > self.contiguous:
            self.ahead.add(seq)
        while self.contiguous + 1 in self.ahead:
            self.contiguous += 1
            self.ahead.discard(self.contiguous)

    def missing(self):
        """The seqs not seen below the highest one seen, as (first, last) ranges."""
        ranges = []
        previous = self.contiguous
        for seq in sorted(self.ahead):  # walk what was seen, not every number in between
            if seq > previous + 1:
                ranges.append((previous + 1, seq - 1))
            previous = seq
        return ranges


class SequenceTracker:
    """De-duplicates journaled records of many stations and reports gaps."""

    def __init__(self):
        self.stations = {}

    def accept(self, station, seq, body=None):
        """True the first time ``(station, seq)`` is offered, False for a redelivery."""
        state = self.stations.get(station)
        if state is None:
            state = self.stations[station] = StationSequence()
        if state.seen(seq):
            state.duplicates += 1
            return False
        state.mark(seq)
        state.accepted += 1
        if body is not None and body.get("kind") == "summary":
            for first, last in body["covers_seq"]:
                for covered in range(first, last + 1):
                    state.mark(covered)
        return True

    def assume_seen(self, station, upto):
        """Take every seq up to ``upto`` of ``station`` as seen: a consumer resuming from a
        position it stored (instead of offering each earlier seq again)."""
        state = self.stations.get(station)
        if state is None:
            state = self.stations[station] = StationSequence()
        if upto > state.contiguous:
            state.contiguous = upto
            state.ahead = {seq for seq in state.ahead if seq > upto}
            state.mark(upto)

    def accept_message(self, body):
        """``accept`` for a decoded message body; live messages (no ``seq``) pass through."""
        if not isinstance(body, dict) or "seq" not in body:
            return True
        return self.accept(body.get("station"), body["seq"], body)

    def gaps(self, station):
        state = self.stations.get(station)
        return [] if state is None else state.missing()

    def highest(self, station):
        state = self.stations.get(station)
        if state is None:
            return 0
        return max([state.contiguous] + list(state.ahead))
