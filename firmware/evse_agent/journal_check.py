"""Journal verification: the one check behind the console's ``journal verify`` and ``evse-journal verify``.

``JournalCheck`` takes the segment files one at a time (``segment(name, data)``, so a
caller on the event loop can yield between them) and quarantined files
(``quarantined(name, data)``); ``finish()`` returns the list of problems, one line each.
It prints nothing and changes nothing. Frames are decoded with the journal's own
``scan``, so the check and ``recover()`` agree on what a valid record is; a record whose
seq does not follow the one before is left out, as ``recover()`` leaves it out.

What counts as a problem: a damaged stretch, a torn or damaged final record, a
quarantined record, a seq out of order, a seq missing between two records that no summary
record's ``covers_seq`` accounts for, an unknown record type, a payload that is not a JSON
object carrying its frame's seq, a summary whose runs do not end at its own seq, and an
OCMF document in a session record that ``check_document(text)`` (the caller's signature
check: the station's signer on the console, the independent ``ocmf_verify`` offline)
refuses. Without a ``check_document`` the documents are counted as unchecked, which is a
problem only with ``signatures_required``.

``report_lines(check, limit, width)`` is the one wording of the outcome: the problems (at
most ``limit``), then one summary line that starts with the outcome.
"""

import json

from .journal import HEADER_BYTES, MAGIC, SESSION, SUMMARY, TYPE_NAMES, _get, damaged_tail, scan

OCMF_FIELDS = ("ocmf_begin", "ocmf_end")
OCMF_LIST = "ocmf_documents"


class JournalCheck:
    """Problems found in a journal's files, fed in segment order."""

    def __init__(self, check_document=None, signatures_required=False):
        self.check_document = check_document
        self.signatures_required = signatures_required
        self.problems = []
        self.segments = 0
        self.records = 0
        self.first = None
        self.last = None
        self.documents = 0  # OCMF documents checked
        self.unchecked = 0  # OCMF documents not checked (no check_document)
        self._covered = []  # (first, last) runs summaries say were folded on purpose
        self._gaps = []  # (seq before, seq after) of consecutive records with seqs between

    def segment(self, name, data):
        """Check one segment file's bytes (None: the file went away while checking)."""
        problems = self.problems
        if data is None:
            problems.append("%s was deleted while verifying (acknowledged)" % name)
            return
        self.segments += 1
        records, torn, _ = scan(data)
        position = 0
        for record in records:
            if record.offset > position:
                problems.append("%s: bytes %d..%d are not a valid record (CRC or framing); skipped"
                                % (name, position, record.offset))
            position = record.offset + record.size
        end = len(data) if torn is None else torn
        if end > position:  # not possible by scan's contract; reported rather than hidden
            problems.append("%s: bytes %d..%d are not a valid record (CRC or framing); skipped"
                            % (name, position, end))
        if torn is not None:
            if damaged_tail(data, torn):
                problems.append("%s: damaged final record of %d bytes at offset %d (complete but failing"
                                " its CRC: not a torn write)" % (name, len(data) - torn, torn))
            else:
                problems.append("%s: torn tail of %d bytes at offset %d (an incomplete final record)"
                                % (name, len(data) - torn, torn))
        for record in records:
            if self.last is not None and record.seq <= self.last:
                problems.append("%s: offset %d: seq %d does not follow the record before it"
                                % (name, record.offset, record.seq))
                continue
            if self.last is not None and record.seq > self.last + 1:
                self._gaps.append((self.last, record.seq))
            if self.first is None:
                self.first = record.seq
            self.last = record.seq
            self.records += 1
            self._record(name, record)

    def quarantined(self, name, data):
        """Report a damaged final record the journal moved aside at start."""
        claimed = _get(data, 7, 8) if len(data) >= HEADER_BYTES and data[:2] == MAGIC else None
        self.problems.append("%s: a damaged final record (%d bytes, seq %s by its header) was quarantined"
                             % (name, len(data), "unknown" if claimed is None else claimed))

    def _record(self, name, record):
        where = "seq %d (%s, %s offset %d)" % (record.seq, TYPE_NAMES.get(record.type, "type-%d" % record.type),
                                               name, record.offset)
        problems = self.problems
        if record.type not in TYPE_NAMES:
            problems.append("%s: unknown record type %d" % (where, record.type))
            return
        try:
            body = json.loads(record.payload)
        except ValueError:  # also bytes that are not UTF-8
            body = None
        if not isinstance(body, dict):
            problems.append("%s: payload is not a JSON object" % where)
            return
        if body.get("seq") != record.seq:
            problems.append("%s: payload carries seq %r, the frame %d" % (where, body.get("seq"), record.seq))
        if record.type == SUMMARY:
            covers = body.get("covers_seq")
            if not _are_runs(covers) or covers[-1][1] != record.seq:
                problems.append("%s: summary covers_seq %r does not end at its own seq" % (where, covers))
            else:
                for run in covers:
                    self._covered.append((run[0], run[1]))
        elif record.type == SESSION:
            for field, text in ocmf_documents(body):
                if self.check_document is None:
                    self.unchecked += 1
                    continue
                self.documents += 1
                if not isinstance(text, str):
                    problem = "not a text document: %r" % (text,)
                else:
                    problem = self.check_document(text)
                if problem:
                    problems.append("%s: %s: %s" % (where, field, problem))

    def finish(self):
        """The problems: what the segments showed, then the seqs no summary accounts for."""
        covered = sorted(self._covered)
        for before, after in self._gaps:
            for first, last in _uncovered(before + 1, after - 1, covered):
                self.problems.append("seq %s missing between %d and %d (not covered by a summary record)"
                                     % (first if first == last else "%d..%d" % (first, last), before, after))
        self._gaps = []
        if self.unchecked and self.signatures_required:
            self.problems.append("%d OCMF document(s) in session records not checked: give the station's "
                                 "public key" % self.unchecked)
            self.unchecked = 0
        return self.problems


def report_lines(check, limit=None, width=None):
    """The problems (at most ``limit``, then how many more) and the summary line, which
    starts with the outcome; with ``width``, longer lines are wrapped at spaces and their
    continuations indented by two."""
    problems = check.problems
    shown = problems if limit is None else problems[:limit]
    lines = list(shown)
    if len(problems) > len(shown):
        lines.append("... and %d more" % (len(problems) - len(shown)))
    span = "seq %d..%d" % (check.first, check.last) if check.first is not None else "no records"
    if check.check_document is not None:
        signatures = "%d OCMF signature(s) verified" % check.documents
    else:
        signatures = "OCMF signatures not checked"
    lines.append("journal verify: %s; %d record(s) in %d segment(s), %s, %s" % (
        "%d problem(s)" % len(problems) if problems else "ok", check.records, check.segments, span,
        signatures))
    if width is None:
        return lines
    wrapped = []
    for line in lines:
        while len(line) > width:
            cut = line.rfind(" ", 0, width + 1)
            if cut <= 2:
                cut = width
            wrapped.append(line[:cut])
            line = "  " + line[cut:].lstrip(" ")
        wrapped.append(line)
    return wrapped


def ocmf_documents(body):
    """(field, document) of each distinct OCMF document in a session record's payload."""
    candidates = []
    documents = body.get(OCMF_LIST)
    if isinstance(documents, list):
        for i, text in enumerate(documents):
            candidates.append(("%s[%d]" % (OCMF_LIST, i), text))
    elif documents is not None:
        candidates.append((OCMF_LIST, documents))
    for field in OCMF_FIELDS:
        if body.get(field) is not None:
            candidates.append((field, body.get(field)))
    found = []
    seen = []
    for field, text in candidates:
        key = text if isinstance(text, str) else repr(text)
        if key not in seen:
            seen.append(key)
            found.append((field, text))
    return found


def _is_run(value):
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and value[0] <= value[1])


def _are_runs(value):
    """A summary's covers_seq: a non-empty list of [first, last] runs in order."""
    if not isinstance(value, list) or not value:
        return False
    for i, run in enumerate(value):
        if not _is_run(run) or (i and value[i - 1][1] >= run[0]):
            return False
    return True


def _uncovered(low, high, covered):
    """The (first, last) runs of ``low..high`` that no run of ``covered`` (sorted) holds."""
    out = []
    seq = low
    for first, last in covered:
        if seq > high or first > high:
            break
        if last < seq:
            continue
        if first > seq:
            out.append((seq, first - 1))
        seq = last + 1
    if seq <= high:
        out.append((seq, high))
    return out
