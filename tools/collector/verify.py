"""Checking a session record's signed readings against the station's registered key.

The cryptography and the OCMF parsing are ``evse_tools.cli.ocmf_verify``'s (independent of
the agent's signing code); this module decides what a session record must satisfy:

- every OCMF document of the session (``ocmf_documents``, else ``ocmf_begin`` /
  ``ocmf_end``) verifies with the station's public key;
- at ``end``, the billed ``energy_wh`` equals the signed registers: end − begin of each
  closed segment (a document holding a begin reading ``B`` and a closing reading — an end
  reason, or ``X`` where a reset or replaced meter closed the segment), summed; with one
  segment the begin and end documents must also pass ``check_session`` (same meter,
  consecutive pagination, good status, time order);
- the record's ``begin`` / ``end`` register values are the signed ones.
"""

from evse_tools.cli.ocmf_verify import END_REASONS, Document, Invalid, check_session, load_public_key, \
    reading_energy_wh

CLOSING_REASONS = END_REASONS + ("X",)


def public_key_from_pem(pem, station):
    """The P-256 key in ``pem`` text; ValueError naming the station if it is not one."""
    try:
        return load_public_key(pem)
    except ValueError as error:
        raise ValueError("public key of station %s: %s" % (station, error)) from None


def _documents(doc):
    documents = doc.get("ocmf_documents")
    if documents:
        return list(documents)
    return [text for text in (doc.get("ocmf_begin"), doc.get("ocmf_end")) if text]


def _register(doc, which):
    reading = doc.get(which)
    return reading.get("energy_wh") if isinstance(reading, dict) else None


def _signed_segments(documents):
    """[(begin Wh, end Wh)] of the transaction documents that close a segment."""
    segments = []
    for document in documents:
        if not str(document.payload.get("PG", "")).startswith("T"):
            continue
        begins = [r for r in document.readings if r.get("TX") == "B"]
        closing = [r for r in document.readings if r.get("TX") in CLOSING_REASONS]
        if begins and closing:
            segments.append((reading_energy_wh(begins[0], "begin"), reading_energy_wh(closing[-1], "end")))
    return segments


def verify_session(doc, station, public_key_pem):
    """(verified, reason) for one session record ``doc``.

    ``verified`` is 1 or 0 (with ``reason`` saying what failed), or None when the record
    holds no signed reading and bills nothing (a start record, or a session that never
    charged)."""
    texts = _documents(doc)
    energy = doc.get("energy_wh")
    if not texts:
        if doc.get("event") == "end" and energy is not None:
            return 0, "energy_wh %s billed without any signed reading" % energy
        return None, None
    if public_key_pem is None:
        return 0, "no public key registered for station %s" % station
    try:
        key = public_key_from_pem(public_key_pem, station)
    except ValueError as error:
        return 0, str(error)
    documents = []
    for number, text in enumerate(texts, 1):
        try:
            document = Document(text)
            document.verify(key)
        except Invalid as error:
            return 0, "document %d of %d: %s" % (number, len(texts), error)
        documents.append(document)
    try:
        begin_docs = [d for d in documents if any(r.get("TX") == "B" for r in d.readings)]
        if begin_docs and _register(doc, "begin") is not None:
            signed_begin = reading_energy_wh(
                [r for r in begin_docs[0].readings if r.get("TX") == "B"][0], "begin")
            if signed_begin != _register(doc, "begin"):
                return 0, "begin register %s Wh differs from the signed begin reading %s Wh" % (
                    _register(doc, "begin"), signed_begin)
        if doc.get("event") != "end" or energy is None:
            return 1, None
        segments = _signed_segments(documents)
        if not segments:
            return 0, "energy_wh %s billed but no signed end reading" % energy
        if len(segments) == 1 and doc.get("ocmf_begin") and doc.get("ocmf_end"):
            check_session([Document(doc["ocmf_begin"]), Document(doc["ocmf_end"])])
        signed = sum(end - begin for begin, end in segments)
        if signed != energy:
            return 0, "energy_wh %s differs from the signed registers: end - begin = %s Wh" % (
                energy, _plain(signed))
        if _register(doc, "end") is not None and segments[-1][1] != _register(doc, "end"):
            return 0, "end register %s Wh differs from the signed end reading %s Wh" % (
                _register(doc, "end"), _plain(segments[-1][1]))
    except Invalid as error:
        return 0, "session: %s" % error
    return 1, None


def _plain(value):
    """A Decimal of whole Wh as an int, else as it is."""
    return int(value) if value == int(value) else value
