"""Signed meter readings in the Open Charge Metering Format (OCMF, S.A.F.E. e.V.).

A document is ``OCMF|<payload JSON>|<signature JSON>``. The payload carries who signed
(gateway = this agent), the meter, the pagination counter, the user assignment and the
readings; the signature is ECDSA over the payload section. The signer (a port object)
does the cryptography; this module builds and takes apart the text. Portable: only
``json`` and ``binascii``.

A session is documented by a begin document holding its ``B`` reading and an end
document holding either only the ``E`` reading (verifiers pair the two by serials and
consecutive pagination) or both readings, which makes it a complete transaction on its
own — the Transparenzsoftware and pyocmf then refuse it as the partner of the begin
document ("stop contains a start value"), so it must be presented alone.

What was checked, and where:

- Structure, field names, order, types and code tables: the specification,
  SAFE-eV/OCMF-Open-Charge-Metering-Format ``OCMF-en.md`` (revisions 1.2 and 1.3.1):
  Tables 1-7 (payload fields, in the order used below and in its Figure 1 example),
  Table 8 (signature section), 10 (ST), 11 (IL), 13-16 (IF), 17 (IT), 18 (CT),
  19 (time status), 20 (units: kWh, Wh), 21 (AC/DC), 22 (SA names).
- Sections are separated by ``|``, which must not occur inside a section, and the
  payload section must reach the verifier byte for byte as signed ("Between signing and
  validation, the payload section must not be manipulated"). The signature covers exactly
  the text between the first and second pipe: the S.A.F.E. Transparenzsoftware
  (SAFE-eV/transparenzsoftware, ``OCMFVerificationParser.java``) splits on ``|`` and
  verifies SHA-256/ECDSA over ``rawData.getBytes()``; pyocmf (``crypto/verification.py``)
  over the payload text encoded as UTF-8; road-labs/ocmf-js signs the UTF-8 of the
  payload text. ``getBytes()`` uses the JVM's default charset, so we keep every string
  printable ASCII: the bytes are then the same under any charset.
- ``FV`` "1.0": the Transparenzsoftware accepts 0.1 <= FV <= 1.0 and we use no field
  newer than 1.0 (TT, LC, CF came later).
- ``TM`` ``2018-07-24T13:22:04,000+0200 S``: comma before milliseconds, four-digit
  offset, a space, the sync flag (Table 7); the Transparenzsoftware parses it with
  ``yyyy-MM-dd'T'HH:mm:ss,SSSZ``.
- ``RU`` "Wh" is a predefined unit (Table 20) and the Transparenzsoftware divides RV by
  1000 for it. ``RI`` "1-b:1.8.0" (import active energy) is the specification's example.
- Without a transaction reference (fiscal context, ``PG`` "F<n>") the readings carry no
  ``TX`` and the user-assignment group (IS, IL, IF, IT, ID) is left out (Table 7, and the
  text above Table 4). pyocmf nevertheless warns that IS is missing on such documents.
- Signature: ``SA`` "ECDSA-secp256r1-SHA256"; ``SE`` (hex) and ``SM``
  (application/x-der) are the defaults and left out; ``SD`` upper-case hex as in the
  specification's example. The public key travels separately (out of band).
"""

import binascii
import json

from .messages import iso_utc

FORMAT_VERSION = "1.0"
SIGNATURE_ALGORITHM = "ECDSA-secp256r1-SHA256"
HEADER = "OCMF"

# The import active energy register, in exact integer Wh. The meter's register is read
# into integer Wh without rounding through floats (registers.decode_energy_wh); writing it
# as a JSON integer keeps it exact through every JSON parser, where a kWh value with
# decimals (2935.6) is a binary float to most of them and is at the mercy of their
# number formatting.
READING_ID = "1-b:1.8.0"
READING_UNIT = "Wh"
CURRENT_TYPE = "AC"

TX_CODES = "BCXELRAPST"  # Table 7: begin, charging, exception, end (E/L/R/A/P), suspended, tariff
STATUS_CODES = "NGTDRMXIOSEF"  # Table 10
ERROR_FLAG_VALUES = ("", "E", "t", "Et")  # Table 7: E energy, t time no longer usable

ID_LEVELS = ("NONE", "HEARSAY", "TRUSTED", "VERIFIED", "CERTIFIED", "SECURE",
             "MISMATCH", "INVALID", "OUTDATED", "UNKNOWN")  # Table 11
ID_FLAGS = ("RFID_NONE", "RFID_PLAIN", "RFID_RELATED", "RFID_PSK",
            "OCPP_NONE", "OCPP_RS", "OCPP_AUTH", "OCPP_RS_TLS", "OCPP_AUTH_TLS",
            "OCPP_CACHE", "OCPP_WHITELIST", "OCPP_CERTIFIED",
            "ISO15118_NONE", "ISO15118_PNC", "PLMN_NONE", "PLMN_RING", "PLMN_SMS")  # 13-16
ID_TYPES = ("NONE", "DENIED", "UNDEFINED", "ISO14443", "ISO15693", "EMAID", "EVCCID",
            "EVCOID", "ISO7812", "CARD_TXN_NR", "CENTRAL", "CENTRAL_1", "CENTRAL_2",
            "LOCAL", "LOCAL_1", "LOCAL_2", "PHONE_NUMBER", "KEY_CODE")  # Table 17
MAX_ID_FLAGS = 4
# The serials tie a document to its public key: MS is 1..1 (Table 3); GS names this agent,
# the signing component, and is required here so that one key serves one station.
MANDATORY = ("GS", "PG", "MS")


def ocmf_time(epoch_s, synced):
    """OCMF ``TM`` of a UTC epoch time: ``2026-11-25T06:50:01,123+0000 S``.

    The flag is ``S`` when the clock is synchronised, ``U`` (unknown) otherwise. Rounds to
    the millisecond exactly like the telemetry timestamps (``messages.iso_utc``). On ports
    with single-precision floats pass whole seconds as an int to stay exact.
    """
    # iso_utc gives "2026-11-25T06:50:01.123Z": OCMF wants a comma and a numeric offset.
    return iso_utc(epoch_s).replace(".", ",").replace("Z", "+0000") + (" S" if synced else " U")


def _text(field, value):
    """``value`` if it is a string of printable ASCII without ``|``; else ValueError."""
    if not isinstance(value, str):
        raise ValueError("%s must be a string, got %r" % (field, value))
    for ch in value:
        if ch == "|" or not " " <= ch <= "~":
            raise ValueError("%s must be printable ASCII without '|', got %r" % (field, value))
    return value


class OcmfReading:
    """One reading of a document (an ``RD`` entry): the energy register at one time.

    ``time`` epoch seconds (UTC), ``synced`` whether the clock was synchronised, ``tx`` the
    reading's reason (``B`` begin, ``C`` charging, ``X`` exception, ``E`` end or the finer
    end codes ``L R A P``, ``S`` suspended, ``T`` tariff change; None in fiscal documents),
    ``value_wh`` the register in exact integer Wh (None only for a reading that reports a
    meter error event, which then carries no value), ``status`` the meter state ``ST``
    (``G`` good ... see STATUS_CODES), ``error_flags`` ``EF``: "" or any of ``E`` (energy
    unusable) and ``t`` (time unusable).
    """

    __slots__ = ("time", "synced", "tx", "value_wh", "status", "error_flags")

    def __init__(self, time, synced, tx, value_wh, status="G", error_flags=""):
        if not isinstance(time, (int, float)) or isinstance(time, bool):
            raise ValueError("reading time must be epoch seconds, got %r" % (time,))
        if tx is not None and (not isinstance(tx, str) or len(tx) != 1 or tx not in TX_CODES):
            raise ValueError("reading reason TX must be one of %s or None, got %r"
                             % (", ".join(TX_CODES), tx))
        if not isinstance(status, str) or len(status) != 1 or status not in STATUS_CODES:
            raise ValueError("meter status ST must be one of %s, got %r"
                             % (", ".join(STATUS_CODES), status))
        if value_wh is None:
            if status == "G" and not error_flags:
                raise ValueError("a reading without a value must report a meter error "
                                 "(status other than G, or error flags)")
        elif type(value_wh) is not int or value_wh < 0:
            raise ValueError("reading value must be a non-negative integer Wh, got %r" % (value_wh,))
        if error_flags not in ERROR_FLAG_VALUES:
            raise ValueError("error flags EF must be one of %r, got %r"
                             % (ERROR_FLAG_VALUES, error_flags))
        self.time = time
        self.synced = bool(synced)
        self.tx = tx
        self.value_wh = value_wh
        self.status = status
        self.error_flags = error_flags

    def __repr__(self):
        return "OcmfReading(%s %s Wh %s)" % (self.tx, self.value_wh, self.status)


class Identification:
    """The user assignment of a transaction: ``IS``, ``IL``, ``IF``, ``IT``, ``ID``.

    ``assigned`` whether a user is assigned, ``level`` one of ID_LEVELS, ``flags`` up to
    four of ID_FLAGS (how the assignment was made), ``id_type`` one of ID_TYPES and
    ``id_data`` the identifier itself (e.g. an RFID UID in hex for ISO14443).
    """

    __slots__ = ("assigned", "level", "flags", "id_type", "id_data")

    def __init__(self, assigned, level, flags, id_type, id_data):
        if level not in ID_LEVELS:
            raise ValueError("identification level IL must be one of %s, got %r"
                             % (", ".join(ID_LEVELS), level))
        flags = list(flags)
        if len(flags) > MAX_ID_FLAGS:
            raise ValueError("at most %d identification flags IF, got %r" % (MAX_ID_FLAGS, flags))
        for flag in flags:
            if flag not in ID_FLAGS:
                raise ValueError("unknown identification flag %r (one of %s)"
                                 % (flag, ", ".join(ID_FLAGS)))
        if id_type not in ID_TYPES:
            raise ValueError("identification type IT must be one of %s, got %r"
                             % (", ".join(ID_TYPES), id_type))
        self.assigned = bool(assigned)
        self.level = level
        self.flags = flags
        self.id_type = id_type
        self.id_data = _text("identification data ID", id_data)


NO_IDENTIFICATION = Identification(False, "NONE", (), "NONE", "")


def _check_pagination(pagination):
    """The pagination string ``T<n>`` or ``F<n>`` (no leading zeros); else ValueError."""
    number = pagination[1:] if isinstance(pagination, str) else ""
    if (not number or pagination[0] not in "TF" or not number.isdigit()
            or (number[0] == "0" and number != "0")):
        raise ValueError("pagination PG must be 'T<n>' (transaction) or 'F<n>' (fiscal) "
                         "with n a number without leading zeros, got %r" % (pagination,))
    return pagination


def _json_object(pairs):
    """Compact JSON object text with the keys in the given order (any port's dict order)."""
    return "{" + ",".join(json.dumps(key) + ":" + value for key, value in pairs) + "}"


def _reading_json(reading, transaction):
    """The ``RD`` entry of one reading, keys in the order of Table 7."""
    pairs = [("TM", json.dumps(ocmf_time(reading.time, reading.synced)))]
    if transaction:
        pairs.append(("TX", json.dumps(reading.tx)))
    if reading.value_wh is not None:
        pairs.append(("RV", "%d" % reading.value_wh))
        pairs.append(("RI", json.dumps(READING_ID)))
        pairs.append(("RU", json.dumps(READING_UNIT)))
        pairs.append(("RT", json.dumps(CURRENT_TYPE)))
    pairs.append(("EF", json.dumps(reading.error_flags)))
    pairs.append(("ST", json.dumps(reading.status)))
    return _json_object(pairs)


def build_payload(gateway_vendor, gateway_serial, gateway_version, pagination,
                  meter_vendor, meter_model, meter_serial, readings,
                  identification=None, charge_point_id=None, meter_firmware=None):
    """The payload section (compact JSON text) of one document, ready to be signed.

    ``pagination`` is ``T<n>`` for documents of a transaction (every reading has a TX;
    the user assignment is included, ``identification`` None meaning "no user assigned")
    or ``F<n>`` for fiscal documents (no TX, no user assignment). ``charge_point_id`` is
    an EVSE ID (``CT`` "EVSEID"). Optional texts left None are omitted; the serials are
    mandatory. Raises ValueError naming the field that is not acceptable.
    """
    transaction = _check_pagination(pagination)[0] == "T"
    readings = list(readings)
    if not readings:
        raise ValueError("a document needs at least one reading")
    for index, reading in enumerate(readings):
        if not isinstance(reading, OcmfReading):
            raise ValueError("reading %d is not an OcmfReading: %r" % (index, reading))
        if transaction and reading.tx is None:
            raise ValueError("reading %d of transaction document %s has no TX" % (index, pagination))
        if not transaction and reading.tx is not None:
            raise ValueError("reading %d of fiscal document %s has TX %r; fiscal readings "
                             "have no transaction reference" % (index, pagination, reading.tx))
    if not transaction and identification is not None:
        raise ValueError("fiscal document %s cannot carry a user identification" % pagination)
    if identification is not None and not isinstance(identification, Identification):
        raise ValueError("identification must be an Identification, got %r" % (identification,))

    pairs = [("FV", json.dumps(FORMAT_VERSION))]
    for key, field, value in (
            ("GI", "gateway identification GI", gateway_vendor),
            ("GS", "gateway serial GS", gateway_serial),
            ("GV", "gateway version GV", gateway_version),
            ("PG", "pagination PG", pagination),
            ("MV", "meter vendor MV", meter_vendor),
            ("MM", "meter model MM", meter_model),
            ("MS", "meter serial MS", meter_serial),
            ("MF", "meter firmware MF", meter_firmware)):
        if value is None and key not in MANDATORY:
            continue
        if not _text(field, value) and key in MANDATORY:
            raise ValueError("%s must not be empty" % field)
        pairs.append((key, json.dumps(value)))
    if transaction:
        user = identification if identification is not None else NO_IDENTIFICATION
        pairs.append(("IS", "true" if user.assigned else "false"))
        pairs.append(("IL", json.dumps(user.level)))
        pairs.append(("IF", "[" + ",".join(json.dumps(flag) for flag in user.flags) + "]"))
        pairs.append(("IT", json.dumps(user.id_type)))
        pairs.append(("ID", json.dumps(user.id_data)))
    if charge_point_id is not None:
        pairs.append(("CT", json.dumps("EVSEID")))
        pairs.append(("CI", json.dumps(_text("charge point id CI", charge_point_id))))
    pairs.append(("RD", "[" + ",".join(_reading_json(r, transaction) for r in readings) + "]"))
    return _json_object(pairs)


def sign_document(payload_text, signer):
    """The complete document ``OCMF|<payload>|{"SA":...,"SD":...}``.

    The signature covers exactly the UTF-8 bytes of ``payload_text`` — the text that
    stands between the first and second pipe. ``signer.sign(data)`` returns a DER
    ECDSA P-256/SHA-256 signature.
    """
    if "|" in payload_text:
        raise ValueError("the payload must not contain '|', the OCMF section separator")
    signature = signer.sign(payload_text.encode("utf-8"))
    signature_text = _json_object((
        ("SA", json.dumps(SIGNATURE_ALGORITHM)),
        ("SD", json.dumps(binascii.hexlify(signature).decode().upper())),
    ))
    return HEADER + "|" + payload_text + "|" + signature_text


def parse_document(text):
    """Split a document into ``(payload dict, signature dict, payload text)``.

    Checks the form only — the signature is verified by whoever holds the public key.
    Raises ValueError saying what is wrong: missing ``OCMF|`` prefix, wrong number of
    sections, a section that is not a JSON object, missing or non-hex ``SD``.
    """
    if not isinstance(text, str):
        raise ValueError("an OCMF document is text, got %r" % (type(text),))
    text = text.strip()
    if not text.startswith(HEADER + "|"):
        raise ValueError("not an OCMF document: does not start with 'OCMF|' (starts with %r)"
                         % text[:12])
    sections = text.split("|")
    if len(sections) != 3:
        raise ValueError("an OCMF document has 3 sections OCMF|payload|signature, found %d"
                         % len(sections))
    payload_text, signature_text = sections[1], sections[2]
    payload = _json_section("payload", payload_text)
    signature = _json_section("signature", signature_text)
    sd = signature.get("SD")
    if not isinstance(sd, str) or not sd:
        raise ValueError("signature section has no signature data SD")
    if signature.get("SE", "hex") == "hex":
        try:
            binascii.unhexlify(sd)
        except ValueError:
            raise ValueError("signature data SD is not hex: %r" % sd[:24])
    return payload, signature, payload_text


def _json_syntax_ok(text):
    """True when ``text`` has JSON's structure: brackets that match, a ``:`` after every key,
    ``,`` between items and nothing after the value. MicroPython's ``json.loads`` accepts
    ``{]``, ``[1 2]`` and trailing commas; a document must be refused the same way on every
    port, so its sections are checked here before they are parsed (literals are left to
    ``json.loads``)."""
    stack = []
    state = "V"  # V value, VC value or "]", K key, KC key or "}", COLON, AFTER (",", close or end)
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n or state not in ("V", "VC", "K", "KC"):
                return False
            state = "COLON" if state in ("K", "KC") else "AFTER"
        elif ch in "{[":
            if state not in ("V", "VC"):
                return False
            stack.append(ch)
            state = "KC" if ch == "{" else "VC"
        elif ch in "}]":
            opener = "{" if ch == "}" else "["
            if state not in ("AFTER", "KC" if ch == "}" else "VC") or not stack or stack.pop() != opener:
                return False
            state = "AFTER"
        elif ch == ":":
            if state != "COLON":
                return False
            state = "V"
        elif ch == ",":
            if state != "AFTER" or not stack:
                return False
            state = "K" if stack[-1] == "{" else "V"
        else:
            if state not in ("V", "VC"):
                return False
            while i + 1 < n and text[i + 1] not in " \t\r\n{}[]:,\"":
                i += 1
            state = "AFTER"
        i += 1
    return state == "AFTER" and not stack


def _json_section(name, section_text):
    try:
        if not _json_syntax_ok(section_text):
            raise ValueError("not JSON: brackets, ':' or ',' out of place")
        value = json.loads(section_text)
    except ValueError as error:
        raise ValueError("%s section is not valid JSON (%s): %r" % (name, error, section_text[:40]))
    if not isinstance(value, dict):
        raise ValueError("%s section is not a JSON object: %r" % (name, section_text[:40]))
    return value
