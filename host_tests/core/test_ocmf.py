"""OCMF documents: built by the core, signed with the station key, checked by outsiders.

Three verifiers, none of them the signing code: tools/cli/ocmf_verify (own parser +
cryptography), the third-party pyocmf package, and the pure-Python ecdsa package.
"""

import datetime
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import warnings

import ecdsa
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings, strategies as st
from pyocmf import OCMF, PyOCMFError, SpecWarning

from evse_agent.ocmf import (
    Identification, OcmfReading, build_payload, ocmf_time, parse_document, sign_document,
)
from evse_agent.ports.cpython.signer import FileKeySigner, KeyFileError
from evse_tools.cli import ocmf_verify

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAMPER = settings(max_examples=150, deadline=None)

BEGIN_T = 1795589401.123  # 2026-11-25T06:50:01,123Z
END_T = BEGIN_T + 5400.5
BEGIN_WH = 12345678
END_WH = 12349999


def make_document(signer, pagination, readings, meter_serial="SDM-0042", **options):
    payload = build_payload("evse-agent", "EVSE-STATION-7", "0.1.0", pagination,
                            "Eastron", "SDM630", meter_serial, readings, **options)
    return sign_document(payload, signer)


def begin_reading(value=BEGIN_WH):
    return OcmfReading(BEGIN_T, True, "B", value)


def end_reading(value=END_WH):
    return OcmfReading(END_T, True, "E", value)


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return FileKeySigner(str(tmp_path_factory.mktemp("keys") / "station" / "ocmf-key.pem"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """Another station's key: its signatures must not pass for ours."""
    return FileKeySigner(str(tmp_path_factory.mktemp("other") / "ocmf-key.pem"))


IDENT = Identification(True, "HEARSAY", ["RFID_PLAIN"], "ISO14443", "1F2D3A4F5506C7")


@pytest.fixture(scope="module")
def session(signer):
    """(begin, end) documents of one session, one reading each ("single reading" style)."""
    begin = make_document(signer, "T7", [begin_reading()], identification=IDENT,
                          charge_point_id="DE*EVA*E7*1")
    end = make_document(signer, "T8", [end_reading()], identification=IDENT,
                        charge_point_id="DE*EVA*E7*1")
    return begin, end


@pytest.fixture(scope="module")
def complete(signer):
    """One document holding the begin and the end reading ("multiple reading" style)."""
    return make_document(signer, "T8", [begin_reading(), end_reading()], identification=IDENT,
                         charge_point_id="DE*EVA*E7*1")


# --- the three verifiers ------------------------------------------------------------------


def verified_by_tool(document, key_hex):
    try:
        ocmf_verify.Document(document).verify(ocmf_verify.load_public_key(key_hex))
    except ocmf_verify.Invalid:
        return False
    return True


def verified_by_pyocmf(document, key_hex):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        try:
            return OCMF.from_string(document).verify_signature(key_hex)
        except PyOCMFError:
            return False


def verified_by_ecdsa(document, key_hex):
    """Verification with the pure-Python ``ecdsa`` package over the middle section."""
    sections = document.split("|")
    if len(sections) != 3 or sections[0] != "OCMF":
        return False
    try:
        signature = bytes.fromhex(json.loads(sections[2])["SD"])
        key = ecdsa.VerifyingKey.from_der(bytes.fromhex(key_hex))
        return key.verify(signature, sections[1].encode("utf-8"), hashfunc=hashlib.sha256,
                          sigdecode=ecdsa.util.sigdecode_der)
    except (ecdsa.BadSignatureError, ecdsa.der.UnexpectedDER, ValueError, KeyError):
        return False


VERIFIERS = (verified_by_tool, verified_by_pyocmf, verified_by_ecdsa)


def verdicts(document, key_hex):
    return {verify.__name__: verify(document, key_hex) for verify in VERIFIERS}


def all_accept(document, key_hex):
    return all(verdicts(document, key_hex).values())


def none_accept(document, key_hex):
    return not any(verdicts(document, key_hex).values())


# --- signed documents verify --------------------------------------------------------------


def test_session_documents_verify_with_three_independent_verifiers(signer, session, complete):
    for document in session + (complete,):
        assert verdicts(document, signer.public_key_hex()) == {
            "verified_by_tool": True, "verified_by_pyocmf": True, "verified_by_ecdsa": True}


def test_pyocmf_strict_mode_finds_no_spec_deviation_and_no_billing_issue(session, complete):
    begin, end, whole = (OCMF.from_string(document, strict=True)
                         for document in session + (complete,))
    assert begin.payload.RD[0].RV == BEGIN_WH
    assert str(begin.payload.RD[0].TM) == "2026-11-25T06:50:01,123+0000 S"
    assert begin.check_eichrecht(end) == []
    assert whole.check_eichrecht() == []
    # Like the Transparenzsoftware, pyocmf refuses a begin/end pair whose end document
    # repeats the begin reading: such an end document is to be checked on its own.
    assert [issue.code for issue in begin.check_eichrecht(whole, errors_only=True)] == [
        "MULTIPLE_BEGIN"]


def test_fiscal_document_has_no_transaction_fields_and_verifies(signer):
    document = make_document(signer, "F3", [OcmfReading(END_T, False, None, END_WH)])
    payload, _, _ = parse_document(document)
    assert "IS" not in payload and "IT" not in payload
    assert payload["RD"] == [{"TM": ocmf_time(END_T, False), "RV": END_WH, "RI": "1-b:1.8.0",
                              "RU": "Wh", "RT": "AC", "EF": "", "ST": "G"}]
    assert all_accept(document, signer.public_key_hex())
    # pyocmf reads the IS cardinality 1..1 over the specification's rule that the user
    # assignment group is missing without a transaction reference; that is all it notes.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OCMF.from_string(document)
    assert [str(w.message) for w in caught] == ["Identification Status (IS) is mandatory"]


def test_error_event_reading_carries_no_value_group(signer):
    reading = OcmfReading(END_T, True, "X", None, status="T", error_flags="E")
    document = make_document(signer, "T9", [reading])
    payload, _, _ = parse_document(document)
    assert payload["RD"] == [{"TM": ocmf_time(END_T, True), "TX": "X", "EF": "E", "ST": "T"}]
    assert all_accept(document, signer.public_key_hex())


# --- anything changed is rejected by all --------------------------------------------------


@TAMPER
@given(data=st.data())
def test_any_changed_payload_character_is_rejected_by_all(signer, complete, data):
    document = complete
    start = len("OCMF|")
    stop = document.rindex("|")
    position = data.draw(st.integers(start, stop - 1), label="position")
    original = document[position]
    replacement = data.draw(st.characters(min_codepoint=0x20, max_codepoint=0x7E)
                            .filter(lambda ch: ch != original), label="replacement")
    tampered = document[:position] + replacement + document[position + 1:]
    assert none_accept(tampered, signer.public_key_hex()), (position, original, replacement)


@TAMPER
@given(data=st.data())
def test_any_changed_signature_byte_is_rejected_by_all(signer, session, data):
    document = session[0]
    _, signature, _ = parse_document(document)
    der = bytearray(bytes.fromhex(signature["SD"]))
    position = data.draw(st.integers(0, len(der) - 1), label="position")
    der[position] ^= data.draw(st.integers(1, 255), label="xor")
    tampered = document.replace(signature["SD"], der.hex().upper())
    assert none_accept(tampered, signer.public_key_hex())


def test_another_stations_key_is_rejected_by_all(stranger, session):
    for document in session:
        assert none_accept(document, stranger.public_key_hex())


def test_signature_covers_the_exact_payload_text(signer, session):
    """Re-serialising the same JSON (here with spaces) makes a different, unsigned payload."""
    payload, _, payload_text = parse_document(session[0])
    spaced = json.dumps(payload, separators=(", ", ": "))
    assert json.loads(spaced) == json.loads(payload_text)
    assert none_accept(session[0].replace(payload_text, spaced), signer.public_key_hex())


# --- the station key ----------------------------------------------------------------------


def test_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "etc" / "evse" / "ocmf-key.pem"
    first = FileKeySigner(str(path))
    assert first.created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["ocmf-key.pem"]  # no temp file left behind
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP256R1)

    again = FileKeySigner(str(path))
    assert not again.created
    assert again.public_key_hex() == first.public_key_hex()
    document = make_document(first, "T1", [begin_reading()])
    assert all_accept(document, again.public_key_hex())


def test_public_key_forms_agree(signer):
    from_hex = serialization.load_der_public_key(bytes.fromhex(signer.public_key_hex()))
    from_pem = serialization.load_pem_public_key(signer.public_key_pem().encode())
    assert from_hex.public_numbers() == from_pem.public_numbers()
    assert isinstance(from_hex.curve, ec.SECP256R1)


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "ocmf-key.pem"
    FileKeySigner(str(path))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 0644.*chmod 600"):
        FileKeySigner(str(path))


@pytest.mark.parametrize("content, message", [
    (ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), "is secp384r1, OCMF signing here needs a P-256"),
    (b"not a key at all\n", "not an unencrypted PEM private key"),
])
def test_key_file_that_is_not_a_p256_key_is_refused(tmp_path, content, message):
    path = tmp_path / "ocmf-key.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message):
        FileKeySigner(str(path))
    assert path.read_bytes() == content  # never overwritten


# --- TM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch, synced, expected", [
    (0, False, "1970-01-01T00:00:00,000+0000 U"),
    (1795589401.123, True, "2026-11-25T06:50:01,123+0000 S"),
    (951782400, True, "2000-02-29T00:00:00,000+0000 S"),  # leap day of a year % 400 == 0
    (1709251199.999, True, "2024-02-29T23:59:59,999+0000 S"),
    (4107499200, True, "2100-02-28T12:00:00,000+0000 S"),  # 2100 is no leap year ...
    (4107542400, True, "2100-03-01T00:00:00,000+0000 S"),  # ... so March follows Feb 28
    (946684799.9994, False, "1999-12-31T23:59:59,999+0000 U"),
    (1.0006, True, "1970-01-01T00:00:01,001+0000 S"),  # rounds to the nearest millisecond
    (1.0004, True, "1970-01-01T00:00:01,000+0000 S"),
    (1704067199.9996, True, "2024-01-01T00:00:00,000+0000 S"),  # rounding carries into the year
])
def test_tm_of_known_times(epoch, synced, expected):
    assert ocmf_time(epoch, synced) == expected


@settings(max_examples=300, deadline=None)
@given(ms=st.integers(0, 253402300799999), synced=st.booleans())
def test_tm_agrees_with_datetime(ms, synced):
    when = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
        milliseconds=ms)
    expected = when.strftime("%Y-%m-%dT%H:%M:%S,") + "%03d+0000 %s" % (ms % 1000, "S" if synced else "U")
    assert ocmf_time(ms // 1000 if ms % 1000 == 0 else ms / 1000, synced) == expected


# --- payload ------------------------------------------------------------------------------


def test_payload_text_is_compact_in_specification_order():
    ident = Identification(True, "VERIFIED", ["RFID_PLAIN", "OCPP_RS_TLS"], "ISO14443",
                           "1F2D3A4F5506C7")
    payload = build_payload("evse-agent", "EVSE-STATION-7", "0.1.0", "T12", "Eastron",
                            "SDM630", "SDM-0042", [begin_reading(), end_reading()],
                            identification=ident, charge_point_id="DE*EVA*E7*1",
                            meter_firmware="1.2")
    assert payload == (
        '{"FV":"1.0","GI":"evse-agent","GS":"EVSE-STATION-7","GV":"0.1.0","PG":"T12",'
        '"MV":"Eastron","MM":"SDM630","MS":"SDM-0042","MF":"1.2",'
        '"IS":true,"IL":"VERIFIED","IF":["RFID_PLAIN","OCPP_RS_TLS"],"IT":"ISO14443",'
        '"ID":"1F2D3A4F5506C7","CT":"EVSEID","CI":"DE*EVA*E7*1","RD":['
        '{"TM":"2026-11-25T06:50:01,123+0000 S","TX":"B","RV":12345678,"RI":"1-b:1.8.0",'
        '"RU":"Wh","RT":"AC","EF":"","ST":"G"},'
        '{"TM":"2026-11-25T08:20:01,623+0000 S","TX":"E","RV":12349999,"RI":"1-b:1.8.0",'
        '"RU":"Wh","RT":"AC","EF":"","ST":"G"}]}')


def test_payload_without_user_and_optional_fields():
    payload = json.loads(build_payload(None, "EVSE-STATION-7", None, "T1", None, None,
                                       "SDM-0042", [begin_reading()]),
                         object_pairs_hook=list)
    assert [key for key, _ in payload] == ["FV", "GS", "PG", "MS", "IS", "IL", "IF", "IT", "ID", "RD"]
    assert dict(payload)["IS"] is False
    assert [dict(payload)[key] for key in ("IL", "IF", "IT", "ID")] == ["NONE", [], "NONE", ""]


def test_energy_stays_exact_beyond_float_precision(signer, capsys):
    big = 2 ** 53 + 1  # the first integer a double cannot hold
    begin = make_document(signer, "T20", [OcmfReading(BEGIN_T, True, "B", big)])
    end = make_document(signer, "T21", [OcmfReading(END_T, True, "E", big + 2)])
    assert '"RV":9007199254740993,' in begin
    assert parse_document(begin)[0]["RD"][0]["RV"] == big
    assert ocmf_verify.main(["--key", signer.public_key_hex(), "--session", begin, end]) == 0
    assert "billed energy 2 Wh (0.002 kWh)" in capsys.readouterr().out


@pytest.mark.parametrize("build, message", [
    (lambda: OcmfReading(BEGIN_T, True, "B", 1234.5), "non-negative integer Wh, got 1234.5"),
    (lambda: OcmfReading(BEGIN_T, True, "B", True), "non-negative integer Wh, got True"),
    (lambda: OcmfReading(BEGIN_T, True, "B", -1), "non-negative integer Wh, got -1"),
    (lambda: OcmfReading(BEGIN_T, True, "Q", 1), "TX must be one of .* got 'Q'"),
    (lambda: OcmfReading(BEGIN_T, True, "B", 1, status="OK"), "ST must be one of .* got 'OK'"),
    (lambda: OcmfReading(BEGIN_T, True, "B", 1, error_flags="x"), "EF must be one of .* got 'x'"),
    (lambda: OcmfReading("now", True, "B", 1), "epoch seconds, got 'now'"),
    (lambda: OcmfReading(BEGIN_T, True, "B", None), "without a value must report a meter error"),
    (lambda: Identification(True, "SURE", [], "NONE", ""), "IL must be one of .* got 'SURE'"),
    (lambda: Identification(True, "HEARSAY", ["RFID_X"], "NONE", ""), "unknown identification flag 'RFID_X'"),
    (lambda: Identification(True, "HEARSAY", [], "ISO14443", "1F|2D"), "ID must be printable ASCII"),
])
def test_bad_values_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("pagination, changes, message", [
    ("T01", {}, "PG must be 'T<n>'.*got 'T01'"),
    ("X1", {}, "got 'X1'"),
    (7, {}, "got 7"),
    ("T1", {"meter_serial": "SDM|42"}, "meter serial MS must be printable ASCII without '|'"),
    ("T1", {"meter_vendor": "M\u00fcller"}, "meter vendor MV must be printable ASCII"),
    ("T1", {"meter_serial": ""}, "meter serial MS must not be empty"),
    ("T1", {"readings": [OcmfReading(BEGIN_T, True, None, 1)]}, "reading 0 of transaction document T1 has no TX"),
    ("F1", {"readings": [begin_reading()]}, "reading 0 of fiscal document F1 has TX 'B'"),
    ("F1", {"readings": [OcmfReading(BEGIN_T, True, None, 1)],
            "identification": Identification(True, "HEARSAY", [], "NONE", "")},
     "fiscal document F1 cannot carry a user identification"),
    ("T1", {"readings": []}, "at least one reading"),
])
def test_bad_payload_fields_are_named(pagination, changes, message):
    arguments = {"meter_vendor": "Eastron", "meter_serial": "SDM-0042", "readings": [begin_reading()]}
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        build_payload("evse-agent", "EVSE-STATION-7", "0.1.0", pagination,
                      arguments.pop("meter_vendor"), "SDM630", arguments.pop("meter_serial"),
                      arguments.pop("readings"), **arguments)


# --- parsing ------------------------------------------------------------------------------


def test_parse_returns_the_signed_text(signer, complete):
    payload, signature, payload_text = parse_document(complete + "\n")
    assert payload == json.loads(payload_text)
    assert signature["SA"] == "ECDSA-secp256r1-SHA256"
    key = ecdsa.VerifyingKey.from_der(bytes.fromhex(signer.public_key_hex()))
    assert key.verify(bytes.fromhex(signature["SD"]), payload_text.encode(),
                      hashfunc=hashlib.sha256, sigdecode=ecdsa.util.sigdecode_der)


@pytest.mark.parametrize("text, message", [
    ("", "does not start with 'OCMF|'"),
    ('{"FV":"1.0"}', "does not start with 'OCMF|'"),
    ('OCMF|{"FV":"1.0"}', "3 sections OCMF|payload|signature, found 2"),
    ('OCMF|{}|{"SD":"00"}|3059', "found 4"),
    ('OCMF|{"FV":"1.0",|{"SD":"00"}', "payload section is not valid JSON"),
    ('OCMF|[1,2]|{"SD":"00"}', "payload section is not a JSON object"),
    ('OCMF|{}|{"SA":"ECDSA-secp256r1-SHA256"}', "no signature data SD"),
    ('OCMF|{}|{"SD":"3045zz"}', "SD is not hex: '3045zz'"),
    ('OCMF|{}|SD', "signature section is not valid JSON"),
])
def test_malformed_documents_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_document(text)


def test_sign_refuses_a_payload_with_the_separator(signer):
    with pytest.raises(ValueError, match="must not contain '\\|'"):
        sign_document('{"MS":"a|b"}', signer)


# --- the verify tool ----------------------------------------------------------------------


def run_tool(capsys, *args):
    code = ocmf_verify.main(list(args))
    return code, capsys.readouterr().out


def test_tool_prints_readings_and_billed_energy(signer, session, capsys):
    code, out = run_tool(capsys, "--key", signer.public_key_hex(), "--session", *session)
    assert code == 0, out
    assert out.count("signature valid") == 2
    assert "B  2026-11-25T06:50:01,123+0000 S" in out
    assert "E  2026-11-25T08:20:01,623+0000 S" in out
    assert "session: billed energy 4321 Wh (4.321 kWh)" in out
    assert "note" not in out


def test_tool_session_of_one_complete_document_or_with_a_repeated_begin(
        signer, session, complete, capsys):
    code, out = run_tool(capsys, "--key", signer.public_key_hex(), "--session", complete)
    assert code == 0, out
    assert "session: billed energy 4321 Wh (4.321 kWh)" in out
    code, out = run_tool(capsys, "--key", signer.public_key_hex(), "--session", session[0], complete)
    assert code == 0, out
    assert "session: billed energy 4321 Wh" in out
    assert "note: the last document repeats the begin reading" in out


@pytest.mark.parametrize("documents, message", [
    (lambda s: [make_document(s, "T7", [begin_reading()]),
                make_document(s, "T8", [end_reading()], meter_serial="SDM-0099")],
     "meter serial MS differs"),
    (lambda s: [make_document(s, "T7", [begin_reading()]),
                make_document(s, "T9", [end_reading()])],
     "pagination not consecutive: T7 is followed by T9"),
    (lambda s: [make_document(s, "T7", [begin_reading()]),
                make_document(s, "T8", [begin_reading(BEGIN_WH - 100), end_reading()])],
     "document 2 repeats the begin reading with different content"),
    (lambda s: [make_document(s, "T7", [end_reading()]),
                make_document(s, "T8", [begin_reading()])],
     "first document must hold one begin reading"),
    (lambda s: [make_document(s, "T7", [begin_reading()]),
                make_document(s, "T8", [OcmfReading(END_T, True, "E", END_WH, status="F")])],
     "end reading has meter status ST 'F'"),
    (lambda s: [make_document(s, "T7", [begin_reading()]),
                make_document(s, "T8", [OcmfReading(BEGIN_T - 1, True, "E", END_WH)])],
     "end reading time .* is before begin reading time"),
])
def test_tool_session_that_does_not_belong_together(signer, capsys, documents, message):
    code, out = run_tool(capsys, "--key", signer.public_key_hex(), "--session", *documents(signer))
    assert code == 1
    assert out.count("signature valid") == 2  # each document alone is fine
    assert "session: INVALID: " in out
    assert any(re.search(message, line) for line in out.splitlines()), out


def test_tool_names_what_is_wrong(signer, stranger, session, tmp_path, capsys):
    begin, end = session
    listing = tmp_path / "documents.txt"
    listing.write_text("\n".join([begin, "OCMF|{}", end.replace("12349999", "12399999"), ""]))
    code, out = run_tool(capsys, "--key", signer.public_key_hex(), "--file", str(listing))
    assert code == 1
    assert "document 1: T7" in out and "signature valid" in out
    assert "document 2: malformed: 2 sections" in out
    assert "signature INVALID: the payload was changed or signed with another key" in out

    code, out = run_tool(capsys, "--key", stranger.public_key_hex(), begin)
    assert code == 1 and "signature INVALID" in out


def test_tool_refuses_a_key_it_cannot_use(session, tmp_path, capsys):
    rsa_like = tmp_path / "key.txt"
    rsa_like.write_text("not hex\n")
    assert ocmf_verify.main(["--key", str(rsa_like), session[0]]) == 2
    assert "key file %s is neither a PEM public key nor hex" % rsa_like in capsys.readouterr().err
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()
    assert ocmf_verify.main(["--key", p384, session[0]]) == 2
    assert "not a P-256 (secp256r1) public key" in capsys.readouterr().err


def console_script():
    path = os.path.join(os.path.dirname(sys.executable), "evse-ocmf-verify")
    assert os.path.exists(path), "console script missing: run `pip install -e .[test]`"
    return path


def test_console_script_reads_stdin_with_a_pem_key_file(signer, session, tmp_path):
    pem = tmp_path / "station.pub.pem"
    pem.write_text(signer.public_key_pem())
    result = subprocess.run([console_script(), "--key", str(pem), "--session"],
                            input="\n".join(session) + "\n", capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("signature valid") == 2
    assert "billed energy 4321 Wh" in result.stdout


def test_console_script_fails_on_tampered_document_with_hex_key_file(signer, session, tmp_path):
    key_file = tmp_path / "station.pub.hex"
    key_file.write_text(signer.public_key_hex() + "\n")
    tampered = session[0].replace('"ST":"G"', '"ST":"S"')
    result = subprocess.run([console_script(), "--key", str(key_file), tampered],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 1
    assert "signature INVALID" in result.stdout
