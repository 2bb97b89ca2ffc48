"""Taps bound to sessions and carried in the signed documents (engine in process, real
store and signer), checked by verifiers other than the signing code (pyocmf strict,
tools/cli/ocmf_verify), over random tap timings and allow-lists."""

import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyocmf import OCMF

from evse_agent.config import ConfigError, validate
from evse_agent.identification import IdentificationDesk, parse_allow_list, parse_uid
from evse_tools.cli import ocmf_verify
from test_session_engine import Station

LISTED = "04A1B2C3D4E5F6"
UNLISTED = "DEADBEEF"


def id_config(**overrides):
    section = {"tap_before_s": 60, "tap_after_s": 120, "allow_list": [LISTED]}
    section.update(overrides)
    return validate({"station_id": "t-001", "meter": {"model": "sdm630", "port": "x"},
                     "identification": section})["identification"]


def attach(station, **overrides):
    desk = IdentificationDesk(id_config(**overrides), station.clock, station.engine)
    station.engine.identifier = desk
    return desk


def payload(document):
    return json.loads(document.split("|")[1])


def check_independently(station, end_record):
    """Every document verifies with pyocmf (strict) and tools/cli/ocmf_verify, and the pair
    passes pyocmf's billing checks; returns the documents' user-assignment fields."""
    documents = end_record["ocmf_documents"]
    key_hex = station.signer.public_key_hex()
    key = ocmf_verify.load_public_key(key_hex)
    parsed = [ocmf_verify.Document(document) for document in documents]
    for document in parsed:
        document.verify(key)
    energy, _ = ocmf_verify.check_session(parsed)
    assert energy == end_record["energy_wh"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict = [OCMF.from_string(document, strict=True) for document in documents]
    assert all(doc.verify_signature(key_hex) for doc in strict)
    # The end document repeats the begin reading: a complete transaction by itself.
    assert strict[-1].check_eichrecht() == []
    return [{k: payload(d)[k] for k in ("IS", "IL", "IF", "IT", "ID")} for d in documents]


def session_with_tap(station, tap_s, uid):
    """Plug in at t=0 with a tap at ``tap_s`` (negative: before plug-in), charge, unplug."""
    station.unplugged()
    station.idle(1)
    if tap_s < 0:
        station.idle(5)
        station.engine.identifier.tap(uid)
        station.idle(-tap_s)
    station.plugged()
    station.idle(1)
    station.charging()
    elapsed = 1
    if tap_s >= 0:
        station.flow(max(0, tap_s - elapsed))
        station.engine.identifier.tap(uid)
        elapsed = max(elapsed, tap_s)
    station.flow(10)
    station.paused()
    station.idle(1)
    station.unplugged()
    return station.sessions("end")[-1]


def test_a_listed_tag_before_plug_in_is_trusted_in_both_documents(tmp_path):
    station = Station(tmp_path)
    attach(station)
    end = session_with_tap(station, -10, LISTED)
    assert end["identification"]["uid"] == LISTED and end["identification"]["level"] == "TRUSTED"
    fields = check_independently(station, end)
    assert fields == [{"IS": True, "IL": "TRUSTED", "IF": ["RFID_PLAIN"], "IT": "ISO14443",
                       "ID": LISTED}] * 2


def test_an_unlisted_tag_after_plug_in_is_recorded_as_hearsay(tmp_path):
    station = Station(tmp_path)
    attach(station)
    end = session_with_tap(station, 30, UNLISTED)
    assert end["identification"]["listed"] is False
    assert check_independently(station, end) == [
        {"IS": True, "IL": "HEARSAY", "IF": ["RFID_PLAIN"], "IT": "ISO14443", "ID": UNLISTED}] * 2
    begins = station.sessions("begin")
    assert len(begins) == 1 and begins[0]["ocmf_begin"] == end["ocmf_begin"]


def test_without_a_tap_the_begin_document_waits_out_the_window_then_says_none(tmp_path):
    station = Station(tmp_path)
    attach(station, tap_after_s=20)
    station.unplugged()
    station.plugged()
    station.idle(1)
    assert station.sessions("begin") == []  # held while a tap may still come
    station.idle(25)
    begin = station.sessions("begin")[-1]
    assert payload(begin["ocmf_begin"])["IS"] is False
    station.engine.identifier.tap(LISTED)  # too late for this session: kept for the next
    station.charging()
    station.flow(5)
    station.paused()
    station.idle(1)
    station.unplugged()
    end = station.sessions("end")[-1]
    assert end["identification"] is None
    assert {f["IL"] for f in check_independently(station, end)} == {"NONE"}
    assert station.engine.identifier.waiting[0]["uid"] == LISTED


def test_a_held_begin_survives_a_restart(tmp_path):
    station = Station(tmp_path)
    attach(station)
    station.unplugged()
    station.plugged()
    station.idle(2)
    station.start_engine()  # the agent restarts inside the window
    attach(station)
    station.engine.identifier.tap(LISTED)
    station.charging()
    station.flow(4)
    station.paused()
    station.idle(1)
    station.unplugged()
    end = station.sessions("end")[-1]
    assert {f["ID"] for f in check_independently(station, end)} == {LISTED}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tap_s=st.integers(-150, 200), listed=st.booleans(), before=st.integers(0, 120),
       after=st.integers(0, 150))
def test_tap_timing_decides_binding(tmp_path_factory, tap_s, listed, before, after):
    """Whatever the timing, the binding follows the two windows, and the documents agree."""
    station = Station(tmp_path_factory.mktemp("s"))
    attach(station, tap_before_s=before, tap_after_s=after)
    uid = LISTED if listed else UNLISTED
    end = session_with_tap(station, tap_s, uid)
    # A tap before plug-in is 1 s (idle) + |tap_s| s before the plug-in.
    expected = (-tap_s + 1 <= before) if tap_s < 0 else (max(tap_s, 1) <= after)
    bound = end["identification"]
    assert (bound is not None) == expected
    fields = check_independently(station, end)
    assert fields[0] == fields[-1]
    if expected:
        assert fields[0]["ID"] == uid and fields[0]["IL"] == ("TRUSTED" if listed else "HEARSAY")
    else:
        assert fields[0] == {"IS": False, "IL": "NONE", "IF": [], "IT": "NONE", "ID": ""}


def test_allow_list_sources_and_bad_entries(tmp_path):
    assert parse_uid(" 04a1b2c3d4e5f6 ") == LISTED
    with pytest.raises(ValueError, match=r"allow_list\[1\]: 'XYZ' is not an ISO 14443 UID"):
        parse_allow_list([LISTED, "XYZ"])
    station = Station(tmp_path)
    desk = attach(station)
    desk.on_allow_list_message(b'{"tags": ["DEADBEEF"]}')
    assert desk.allowed == {"DEADBEEF"} and desk.allow_list_source == "backend"
    for bad in (b"not json", b'{"tags": ["12"]}', b"[1, 2]"):
        desk.on_allow_list_message(bad)
    assert desk.allowed == {"DEADBEEF"} and desk.rejected_lists == 3
    with pytest.raises(ConfigError, match="identification.allow_list"):
        validate({"station_id": "t", "meter": {"model": "sdm630", "port": "x"},
                  "identification": {"allow_list": "04A1B2C3"}})


def test_console_id_command_shows_the_reader_and_edits_the_allow_list(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from evse_agent.console import Console, pin_hash
    from test_console import Capture

    station = Station(tmp_path)
    desk = attach(station)
    config = validate({"station_id": "t-001", "meter": {"model": "sdm630", "port": "x"},
                       "console": {"pin_hash": pin_hash("2468", b"saltsalt")}})
    agent = SimpleNamespace(config=config, clock=station.clock, outbox=SimpleNamespace(journal=None, publisher=None),
                            engine=station.engine, monitor=None, forwarder=None, identification=desk)
    stream = Capture()
    console = Console(agent, stream)
    desk.tap(UNLISTED)

    def run(line):
        asyncio.run(console._line(line, None))
        return stream.text()

    shown = run("id")
    assert "allow-list  1 tag(s) from the board file" in shown and LISTED in shown
    assert "last tag    DEADBEEF HEARSAY" in shown and "waiting     DEADBEEF" in shown
    assert run("id allow DEADBEEF") == "error: id allow needs 'unlock <PIN>' first\n"
    run("unlock 2468")
    assert run("id allow deadbeef") == "allowed DEADBEEF: 2 tag(s) on the allow-list until restart\n"
    assert run("id deny 12") == "error: tag: '12' is not an ISO 14443 UID (8 or 14 hex digits)\n"
    assert desk.allowed == {LISTED, "DEADBEEF"}
    agent.identification = None
    assert run("id").startswith("error: this station has no identification reader")
