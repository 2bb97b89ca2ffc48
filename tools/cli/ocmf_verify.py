"""Verify signed OCMF documents against a station's public key.

    evse-ocmf-verify --key KEY 'OCMF|{...}|{...}'       documents as arguments
    evse-ocmf-verify --key KEY --file readings.txt      one document per line
    ... | evse-ocmf-verify --key KEY                    one document per line on stdin
    evse-ocmf-verify --key KEY --session BEGIN [...] END  the documents of one charging session

KEY is the public key as hex of its DER SubjectPublicKeyInfo, or a file holding that hex
or a PEM public key. Exit status 0 when every document (and the session) checks out,
1 otherwise, 2 for usage errors such as an unusable key.

Deliberately independent of the agent's own OCMF code (it does not import
``evse_agent.ocmf``): it splits and parses documents itself and checks the signature
with ``cryptography``, so a mistake on the signing side cannot hide itself here.
"""

import argparse
import base64
import binascii
import datetime
import decimal
import json
import os
import sys

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SUPPORTED_ALGORITHM = "ECDSA-secp256r1-SHA256"
END_REASONS = ("E", "L", "R", "A", "P")  # end of transaction, and its finer variants


class Invalid(Exception):
    """A document or session that does not verify; the message says why."""


class Document:
    """One parsed document: its payload (numbers as Decimal), signature, and signed text."""

    def __init__(self, text):
        text = text.strip()
        if not text.startswith("OCMF|"):
            raise Invalid("malformed: does not start with 'OCMF|'")
        sections = text.split("|")
        if len(sections) != 3:
            raise Invalid("malformed: %d sections, an OCMF document has 3 "
                          "(OCMF|payload|signature)" % len(sections))
        self.payload_text = sections[1]
        self.payload = _json_object("payload", sections[1])
        self.signature = _json_object("signature", sections[2])
        self.readings = self.payload.get("RD")
        if not isinstance(self.readings, list) or not self.readings or not all(
                isinstance(reading, dict) for reading in self.readings):
            raise Invalid("malformed: payload has no readings RD")

    def signature_bytes(self):
        """The DER signature from SD, decoded as SE says (hex unless told otherwise)."""
        sd = self.signature.get("SD")
        if not isinstance(sd, str) or not sd:
            raise Invalid("malformed: signature section has no SD")
        encoding = self.signature.get("SE", "hex")
        try:
            if encoding == "hex":
                return binascii.unhexlify(sd)
            if encoding == "base64":
                return base64.b64decode(sd, validate=True)
        except (ValueError, binascii.Error) as error:
            raise Invalid("malformed: SD is not valid %s (%s)" % (encoding, error)) from None
        raise Invalid("unsupported signature encoding SE %r" % (encoding,))

    def verify(self, public_key):
        """Raise Invalid unless the signature over the payload text verifies with the key."""
        algorithm = self.signature.get("SA", SUPPORTED_ALGORITHM)
        if algorithm != SUPPORTED_ALGORITHM:
            raise Invalid("unsupported signature algorithm SA %r (this tool checks %s)"
                          % (algorithm, SUPPORTED_ALGORITHM))
        mime = self.signature.get("SM", "application/x-der")
        if mime != "application/x-der":
            raise Invalid("unsupported signature format SM %r" % (mime,))
        signature = self.signature_bytes()
        try:
            public_key.verify(signature, self.payload_text.encode("utf-8"),
                              ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Invalid("signature INVALID: the payload was changed or signed with "
                          "another key") from None

    def reading_lines(self):
        """One line per reading: reason, time, value with unit, meter status, error flags."""
        lines = []
        for reading in self.readings:
            value = reading.get("RV")
            lines.append("  %-2s %-31s %14s %-4s ST=%s%s" % (
                reading.get("TX", "-"), reading.get("TM", "?"),
                "-" if value is None else value, reading.get("RU", ""),
                reading.get("ST", "?"), " EF=" + reading["EF"] if reading.get("EF") else ""))
        return lines


def _json_object(name, text):
    try:
        value = json.loads(text, parse_float=decimal.Decimal)
    except ValueError as error:
        raise Invalid("malformed: %s section is not valid JSON (%s)" % (name, error)) from None
    if not isinstance(value, dict):
        raise Invalid("malformed: %s section is not a JSON object" % name)
    return value


def load_public_key(spec):
    """The P-256 public key from ``spec``: hex DER, or a file with PEM or hex DER."""
    if os.path.isfile(spec):
        with open(spec, "rb") as file:
            data = file.read()
        where = "key file %s" % spec
    else:
        data = spec.encode()
        where = "key argument"
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            hex_text = b"".join(data.split()).replace(b":", b"")
            key = serialization.load_der_public_key(binascii.unhexlify(hex_text))
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as error:
        raise ValueError("%s is neither a PEM public key nor hex of a DER public key (%s)"
                         % (where, error)) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("%s is not a P-256 (secp256r1) public key" % where)
    return key


def reading_energy_wh(reading, which):
    """A reading's value converted to Wh exactly (RU Wh or kWh)."""
    value, unit = reading.get("RV"), reading.get("RU")
    if not isinstance(value, (int, decimal.Decimal)) or isinstance(value, bool):
        raise Invalid("%s reading has no numeric value RV" % which)
    if unit == "Wh":
        return decimal.Decimal(value)
    if unit == "kWh":
        return decimal.Decimal(value) * 1000
    raise Invalid("%s reading has unit RU %r, not an energy unit (Wh, kWh)" % (which, unit))


def _pagination(document, which):
    pagination = document.payload.get("PG")
    if (not isinstance(pagination, str) or len(pagination) < 2 or pagination[0] != "T"
            or not pagination[1:].isdigit()):
        raise Invalid("%s document has no transaction pagination T<n> (PG %r)"
                      % (which, pagination))
    return int(pagination[1:])


def check_session(documents):
    """(billed energy in Wh as Decimal, notes) of one session's documents, first = begin,
    last = end.

    The documents must come from the same meter (MS) and gateway (GS), be numbered
    consecutively in the transaction context, hold exactly one begin reading (repeated
    unchanged wherever a later document repeats it) and end with an end reading, both in
    good meter status and without an energy error flag. Raises Invalid naming the problem.
    """
    first, last = documents[0], documents[-1]
    for key, name in (("MS", "meter serial"), ("GS", "gateway serial")):
        values = [document.payload.get(key) for document in documents]
        if any(value != values[0] for value in values):
            raise Invalid("documents are not from the same device: %s %s differs %r"
                          % (name, key, values))
    numbers = [_pagination(document, "session") for document in documents]
    for before, after in zip(numbers, numbers[1:]):
        if after != before + 1:
            raise Invalid("pagination not consecutive: T%d is followed by T%d, a document "
                          "is missing or foreign" % (before, after))
    users = [user_assignment(document) for document in documents]
    if any(user != users[0] for user in users):
        raise Invalid("documents of one session assign different users: %s"
                      % " vs ".join(describe_user(user) for user in users))
    begins = [reading for reading in first.readings if reading.get("TX") == "B"]
    if len(begins) != 1:
        raise Invalid("first document must hold one begin reading (TX B), found %d" % len(begins))
    begin = begins[0]
    notes = []
    for index, document in enumerate(documents[1:], 2):
        for reading in document.readings:
            if reading.get("TX") == "B" and reading != begin:
                raise Invalid("document %d repeats the begin reading with different content: "
                              "%s vs %s" % (index, _brief(reading), _brief(begin)))
    if len(documents) > 1 and any(reading.get("TX") == "B" for reading in last.readings):
        notes.append("the last document repeats the begin reading: it is a complete "
                     "transaction by itself, and the Transparenzsoftware and pyocmf refuse "
                     "it paired with the begin document - present it alone")
    ends = [reading for reading in last.readings if reading.get("TX") in END_REASONS]
    if not ends:
        raise Invalid("last document holds no end reading (TX one of %s)" % ", ".join(END_REASONS))
    end = ends[-1]
    for which, reading in (("begin", begin), ("end", end)):
        if reading.get("ST") != "G":
            raise Invalid("%s reading has meter status ST %r, not G (good)" % (which, reading.get("ST")))
        if "E" in reading.get("EF", ""):
            raise Invalid("%s reading has the energy error flag EF %r" % (which, reading["EF"]))
    if _time(end, "end") < _time(begin, "begin"):
        raise Invalid("end reading time %s is before begin reading time %s"
                      % (end.get("TM"), begin.get("TM")))
    if begin.get("RI") != end.get("RI"):
        raise Invalid("begin and end read different registers RI %r and %r"
                      % (begin.get("RI"), end.get("RI")))
    billed = reading_energy_wh(end, "end") - reading_energy_wh(begin, "begin")
    if billed < 0:
        raise Invalid("end reading %s is below begin reading %s" % (end.get("RV"), begin.get("RV")))
    return billed, notes


USER_FIELDS = ("IS", "IL", "IF", "IT", "ID")


def user_assignment(document):
    """The user-assignment fields (OCMF Table 4) of a document, None where absent."""
    return tuple((key, document.payload.get(key)) for key in USER_FIELDS)


def describe_user(user):
    """One line for people: 'ISO14443 04A1B2C3D4E5F6, level TRUSTED, RFID_PLAIN' or 'none'."""
    fields = dict(user)
    if not fields.get("IS"):
        return "no user assigned (IL %s)" % fields.get("IL")
    return "%s %s, level %s, %s" % (fields.get("IT"), fields.get("ID"), fields.get("IL"),
                                    "+".join(fields.get("IF") or []) or "no flags")


def _time(reading, which):
    """The reading's TM as an aware datetime (TM is '2018-07-24T13:22:04,000+0200 S')."""
    stamp = str(reading.get("TM", "")).split(" ")[0]
    try:
        return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S,%f%z")
    except ValueError:
        raise Invalid("%s reading has a malformed time TM %r" % (which, reading.get("TM"))) from None


def _brief(reading):
    return "%s %s %s" % (reading.get("TM"), reading.get("RV"), reading.get("RU"))


def read_documents(args):
    """Document texts from the arguments, a file (one per line) or stdin (one per line)."""
    if args.documents:
        return list(args.documents)
    if args.file:
        with open(args.file, encoding="utf-8") as file:
            lines = file.read().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    return [line for line in lines if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="evse-ocmf-verify", description="Verify signed OCMF meter readings.")
    parser.add_argument("--key", required=True,
                        help="public key: hex of the DER SubjectPublicKeyInfo, or a file "
                             "with a PEM public key or that hex")
    parser.add_argument("--file", help="read documents from this file, one per line")
    parser.add_argument("--session", action="store_true",
                        help="the documents are one charging session (begin first, end "
                             "last): check they belong together and print the billed energy")
    parser.add_argument("documents", nargs="*", help="OCMF documents (default: stdin)")
    args = parser.parse_args(argv)
    if args.documents and args.file:
        parser.error("give documents as arguments or --file, not both")
    try:
        public_key = load_public_key(args.key)
    except ValueError as error:
        print("error: %s" % error, file=sys.stderr)
        return 2
    try:
        texts = read_documents(args)
    except OSError as error:
        print("error: cannot read documents: %s" % error, file=sys.stderr)
        return 2
    if not texts:
        print("error: no documents given", file=sys.stderr)
        return 2

    documents = []
    failed = 0
    for number, text in enumerate(texts, 1):
        try:
            document = Document(text)
        except Invalid as error:
            print("document %d: %s" % (number, error))
            failed += 1
            continue
        payload = document.payload
        print("document %d: %s, meter %s %s serial %s" % (
            number, payload.get("PG"), payload.get("MV", "?"), payload.get("MM", "?"),
            payload.get("MS", "?")))
        if "IS" in payload:
            print("  user: %s" % describe_user(user_assignment(document)))
        for line in document.reading_lines():
            print(line)
        try:
            document.verify(public_key)
        except Invalid as error:
            print("  %s" % error)
            failed += 1
            continue
        print("  signature valid")
        documents.append(document)

    if args.session:
        if failed:
            print("session: not checked, %d document(s) did not verify" % failed)
            return 1
        try:
            billed, notes = check_session(documents)
        except Invalid as error:
            print("session: INVALID: %s" % error)
            return 1
        for note in notes:
            print("session: note: %s" % note)
        kwh = billed / 1000
        print("session: billed energy %s Wh (%s kWh)" % (_plain(billed), _plain(kwh)))
    return 1 if failed else 0


def _plain(value):
    """A Decimal without exponent notation and without trailing zeros after the point."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


if __name__ == "__main__":
    sys.exit(main())
