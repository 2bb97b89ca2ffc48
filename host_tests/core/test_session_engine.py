"""SessionEngine in process: real StateStore on a real FileSystem, a real FileKeySigner,
and a clock, meter readings and pilot/contactor inputs that the test drives.

Covers what the end-to-end scenarios in test_sessions.py do not reach: register faults,
begin_at="charge", fiscal readings, restarts on the same state directory, a damaged
open-session file, when the begin reading is taken, and the OCMF documents themselves
(verified here with `cryptography`, not with evse_agent.ocmf).
"""

import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from evse_agent import log
from evse_agent.config import validate
from evse_agent.meter import MeterLink
from evse_agent.meter_models import SDM630
from evse_agent.pilot import InputState
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_agent.reading import Reading
from evse_agent.session import REGISTER_CONFIRM_S, SessionEngine
from evse_agent.store import OPEN_SESSION, StateStore

EPOCH = 1_750_000_000.0  # 2025-06-15T15:06:40Z
SERIAL = 12345678
START_WH = 1_234_567


class Clock:
    """Monotonic ms, wall seconds and the sync flag; time moves only through ``advance``."""

    def __init__(self, synced=True):
        self.mono = 7_000_000
        self.wall = EPOCH
        self.is_synced = synced

    def monotonic_ms(self):
        return self.mono

    def time(self):
        return self.wall

    def synced(self):
        return self.is_synced

    def advance(self, ms):
        self.mono += ms
        self.wall += ms / 1000.0


class Meter:
    """What the engine needs of a meter: its model and a link that is online."""

    def __init__(self, clock):
        self.model = SDM630
        self.link = MeterLink(3, clock.monotonic_ms())
        self.link.record_success(clock.monotonic_ms())


class Station:
    """One engine on a state directory, plus the physical register it reads."""

    def __init__(self, tmp_path, clock=None, register_wh=START_WH, **session):
        self.tmp_path = tmp_path
        self.session_cfg = session
        self.clock = clock or Clock()
        self.register_wh = register_wh
        self.serial = SERIAL
        self.published = []  # every (kind, doc) of every engine, JSON-copied as the agent sends it
        self.requests = 0
        self.engines = []
        self.start_engine()

    def start_engine(self):
        """A fresh store, signer, meter object and engine on the same directories, restored."""
        config = validate({"station_id": "t-001", "meter": {"model": "sdm630", "port": "x"},
                           "session": dict(self.session_cfg, state_dir=str(self.tmp_path / "state"))})
        self.fs = FileSystem(config["session"]["state_dir"])
        self.store = StateStore(self.fs)
        self.signer = FileKeySigner(str(self.tmp_path / "keys" / "station.pem"))
        self.meter = Meter(self.clock)
        identity = {"gateway_vendor": "evse-agent", "gateway_serial": "t-001", "gateway_version": "0.1.0",
                    "meter_vendor": SDM630.vendor, "meter_model": SDM630.product}
        self.engine = SessionEngine(config, self.store, self.signer, self.clock, self.meter,
                                    self._publish, self._request, identity)
        self.engines.append(self.engine)
        return self.engine.restore()

    def _publish(self, kind, doc):
        self.published.append((kind, json.loads(json.dumps(doc))))

    def _request(self):
        self.requests += 1

    # -- the physical world ------------------------------------------------------------

    def inputs(self, pilot, command=None, feedback=None, advertised_a=16.0):
        self.engine.on_inputs(InputState(pilot, None, advertised_a, False, command, feedback,
                                         self.clock.monotonic_ms()), self.clock.monotonic_ms())

    def unplugged(self):
        self.inputs("A", False, False, advertised_a=None)

    def plugged(self):
        self.inputs("B", False, False)

    def charging(self):
        self.inputs("C", True, True)

    def paused(self):
        self.inputs("B", False, False)

    def reading(self, power_w=0.0, energy_wh=None):
        """The meter is read now: the register as it stands (or ``energy_wh``)."""
        self.engine.on_reading(Reading(
            self.clock.time(), self.clock.monotonic_ms(), [230.0] * 3, [power_w / 690.0] * 3,
            [power_w / 3] * 3, power_w, 50.0, self.register_wh if energy_wh is None else energy_wh,
            1, self.serial))

    def flow(self, seconds, power_w=10800.0, read=True):
        """Charge for ``seconds`` (10.8 kW = 3 Wh/s exactly), read once a second if ``read``."""
        for _ in range(seconds):
            self.clock.advance(1000)
            self.register_wh += int(power_w) // 3600
            if read:
                self.reading(power_w)

    def idle(self, seconds, read=True):
        for _ in range(seconds):
            self.clock.advance(1000)
            if read:
                self.reading(0.0)

    # -- what came out -----------------------------------------------------------------

    def sessions(self, event=None):
        return [doc for kind, doc in self.published
                if kind == "session" and (event is None or doc["event"] == event)]

    def documents(self):
        """Every OCMF document published, in order, without repeats."""
        seen = []
        for doc in self.sessions():
            for document in doc["ocmf_documents"]:
                if document not in seen:
                    seen.append(document)
        return seen


def verify(document, public_key_der):
    """The payload dict of a document whose ECDSA P-256 signature verifies; else AssertionError."""
    assert document.startswith("OCMF|")
    header, payload_text, signature_text = document.split("|")
    signature = json.loads(signature_text)
    assert signature["SA"] == "ECDSA-secp256r1-SHA256"
    key = load_der_public_key(public_key_der)
    key.verify(bytes.fromhex(signature["SD"]), payload_text.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    return json.loads(payload_text)


def readings_of(document):
    return [(r.get("TX"), r["RV"]) for r in json.loads(document.split("|")[1])["RD"]]


def pages(station):
    return [json.loads(d.split("|")[1])["PG"] for d in station.documents()]


def one_session(station):
    """Plug in, charge 10 s, pause, unplug: a normal session."""
    station.unplugged()
    station.idle(1)
    station.plugged()
    station.idle(1)
    station.charging()
    station.flow(10)
    station.paused()
    station.idle(1)
    station.unplugged()


# -- OCMF documents ----------------------------------------------------------------------

def test_documents_verify_with_the_station_key_and_carry_begin_and_end(tmp_path):
    """A normal session: begin document [B] at the plug-in register, end document [B, E] at
    the unplug register, both verify with the public key and fail after a one-byte change."""
    st = Station(tmp_path)
    begin_wh = st.register_wh
    one_session(st)
    end = st.sessions("end")[0]
    assert end["energy_wh"] == st.register_wh - begin_wh == 30
    assert end["ocmf_documents"] == [end["ocmf_begin"], end["ocmf_end"]]
    begin_payload = verify(end["ocmf_begin"], st.signer.public_key_der())
    end_payload = verify(end["ocmf_end"], st.signer.public_key_der())
    assert readings_of(end["ocmf_begin"]) == [("B", begin_wh)]
    assert readings_of(end["ocmf_end"]) == [("B", begin_wh), ("E", st.register_wh)]
    for payload in (begin_payload, end_payload):
        assert payload["MS"] == str(SERIAL) and payload["GS"] == "t-001"
        assert payload["MV"] == "Eastron" and payload["MM"] == "SDM630"
        assert all(r["RU"] == "Wh" and r["RI"] == "1-b:1.8.0" and r["ST"] == "G" for r in payload["RD"])
    assert [begin_payload["PG"], end_payload["PG"]] == ["T1", "T2"]
    tampered = end["ocmf_end"].replace('"RV":%d' % st.register_wh, '"RV":%d' % (st.register_wh + 1))
    assert tampered != end["ocmf_end"]
    with pytest.raises(InvalidSignature):
        verify(tampered, st.signer.public_key_der())


def test_time_flag_follows_clock_sync(tmp_path):
    """TM ends in " U" while the clock is not synchronised and " S" once it is."""
    clock = Clock(synced=False)
    st = Station(tmp_path, clock=clock)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_doc = st.sessions("begin")[0]["ocmf_begin"]
    tm = verify(begin_doc, st.signer.public_key_der())["RD"][0]["TM"]
    assert tm == "2025-06-15T15:06:41,000+0000 U"
    clock.is_synced = True
    st.charging()
    st.flow(5)
    st.paused()
    st.idle(1)
    st.unplugged()
    end_doc = st.sessions("end")[0]["ocmf_end"]
    end_rd = verify(end_doc, st.signer.public_key_der())["RD"]
    assert end_rd[1]["TX"] == "E" and end_rd[1]["TM"] == "2025-06-15T15:06:47,000+0000 S"


def test_begin_reading_keeps_its_time_flag_in_the_end_document(tmp_path):
    """The B reading re-signed in the end document was taken with the clock unsynchronised:
    it must keep "U" there, as in the begin document (the same reading, two signed claims)."""
    clock = Clock(synced=False)
    st = Station(tmp_path, clock=clock)
    st.unplugged()
    st.idle(1)
    st.plugged()
    clock.is_synced = True
    st.charging()
    st.flow(5)
    st.paused()
    st.idle(1)
    st.unplugged()
    end = st.sessions("end")[0]
    begin_tm = verify(end["ocmf_begin"], st.signer.public_key_der())["RD"][0]["TM"]
    end_rd = verify(end["ocmf_end"], st.signer.public_key_der())["RD"]
    assert begin_tm.endswith(" U")
    assert end_rd[0]["TX"] == "B" and end_rd[0]["TM"] == begin_tm


# -- register faults ---------------------------------------------------------------------

def test_register_going_backwards_closes_the_segment_and_bills_the_sum(tmp_path):
    """The register falls (meter reset) and stays there: once the new level has held, segment 1
    ends at the last good reading with an X document and segment 2 begins at the first reading
    of the new value (the end waits for that); energy = exact sum, never negative."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    st.flow(10)  # +30 Wh
    before_reset = st.register_wh
    st.register_wh = 50  # the meter's import register was reset
    st.flow(1)  # 53
    after_reset = st.register_wh
    assert after_reset == 53
    st.flow(5)  # +15 Wh
    st.paused()
    st.idle(1)
    st.unplugged()
    assert st.sessions("end") == []  # the new level has not held long enough yet
    st.idle(int(REGISTER_CONFIRM_S))
    end = st.sessions("end")[0]
    assert "register_backwards" in end["flags"]
    assert end["segments"] == 2
    assert end["energy_wh"] == (before_reset - begin_wh) + (st.register_wh - after_reset) == 45
    assert end["register_delta_wh"] == st.register_wh - begin_wh != end["energy_wh"]
    assert end["uncertain_wh"] == 4  # one second at 10.8 kW between the last good and the first new reading
    assert end["energy_wh"] >= 0
    documents = end["ocmf_documents"]
    assert [readings_of(d) for d in documents] == [
        [("B", begin_wh)],
        [("B", begin_wh), ("X", before_reset)],
        [("B", after_reset)],
        [("B", after_reset), ("E", st.register_wh)],
    ]
    for document in documents:
        verify(document, st.signer.public_key_der())


def test_energy_so_far_follows_the_register_across_segments_and_ends_with_the_session(tmp_path):
    """The live figure (telemetry's session_energy_wh): None before plug-in, 0 at the begin
    reading, the register delta while charging, the sum of segments after a meter reset, and
    the billed energy just before the end; None again once the session is over."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    assert st.engine.energy_so_far() is None
    st.plugged()
    assert st.engine.energy_so_far() == 0
    st.charging()
    st.flow(4)
    assert st.engine.energy_so_far() == 12
    st.register_wh = 100  # meter reset: segment 1 closes at 12 Wh, segment 2 begins at 103
    st.flow(1)  # 103: held as suspect, the begin of segment 2 once the new level holds
    assert st.engine.energy_so_far() == 12
    st.flow(int(REGISTER_CONFIRM_S))
    assert st.engine.energy_so_far() == 12 + 3 * int(REGISTER_CONFIRM_S)
    st.flow(2)
    assert st.engine.energy_so_far() == 18 + 3 * int(REGISTER_CONFIRM_S)
    st.paused()
    st.idle(1)
    assert st.engine.energy_so_far() == 18 + 3 * int(REGISTER_CONFIRM_S)
    st.unplugged()
    assert st.sessions("end")[0]["energy_wh"] == 18 + 3 * int(REGISTER_CONFIRM_S)
    assert st.engine.energy_so_far() is None


def test_register_backwards_when_idle_is_never_negative(tmp_path):
    """A register that only ever falls bills 0 Wh, not a negative amount, and the end record
    says a register fault was unresolved when it was taken."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    st.idle(1)
    st.register_wh -= 1000
    st.idle(1)
    st.unplugged()  # no current since the last good reading: the end is exact there
    end = st.sessions("end")[0]
    assert "register_suspect" in end["flags"]
    assert end["energy_wh"] == 0


def test_implausible_upward_jump_is_not_billed(tmp_path):
    """The register leaps by far more than 10.8 kW could deliver in a second: flag
    register_jump, segment closed at the last good reading, the jump itself not billed."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    st.flow(10)
    before_jump = st.register_wh
    st.register_wh += 500_000
    st.flow(1)
    after_jump = st.register_wh
    st.flow(4 + int(REGISTER_CONFIRM_S))
    st.paused()
    st.idle(1)
    st.unplugged()
    end = st.sessions("end")[0]
    assert "register_jump" in end["flags"] and "register_backwards" not in end["flags"]
    assert end["segments"] == 2
    assert end["energy_wh"] == (before_jump - begin_wh) + (st.register_wh - after_jump) \
        == 42 + 3 * int(REGISTER_CONFIRM_S)
    assert [readings_of(d)[-1] for d in end["ocmf_documents"]] == [
        ("B", begin_wh), ("X", before_jump), ("B", after_jump), ("E", st.register_wh)]


def test_fast_but_plausible_charging_is_not_a_jump(tmp_path):
    """22 kW with readings 5 s apart stays one segment."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    for _ in range(6):
        st.flow(5, power_w=21600.0, read=False)
        st.reading(21600.0)
    st.paused()
    st.idle(1)
    st.unplugged()
    end = st.sessions("end")[0]
    assert end["flags"] == [] and end["segments"] == 1
    assert end["energy_wh"] == st.register_wh - begin_wh == 180


# -- begin_at = "charge" -----------------------------------------------------------------

def test_begin_at_charge_takes_the_begin_at_the_first_charge(tmp_path):
    """With begin_at="charge" nothing is signed at plug-in; the begin reading is the register
    as it stood when the contactor closed, and the whole charge is billed."""
    st = Station(tmp_path, begin_at="charge")
    st.unplugged()
    st.idle(1)
    st.plugged()
    st.idle(5)
    assert st.sessions("begin") == [] and st.sessions("start")
    st.flow(7, power_w=3600.0)  # something else drew 7 Wh through the meter while idle: not this session's
    at_charge = st.register_wh
    st.charging()
    st.flow(10)
    st.paused()
    st.idle(1)
    st.unplugged()
    end = st.sessions("end")[0]
    assert end["begin"] is not None and end["begin"]["energy_wh"] == at_charge
    assert readings_of(end["ocmf_begin"]) == [("B", at_charge)]
    assert end["energy_wh"] == st.register_wh - at_charge == 30


def test_begin_at_charge_session_that_never_charges_has_no_energy(tmp_path):
    """Plugged in and out without charging: a session with no energy, no segments and no
    OCMF documents at all."""
    st = Station(tmp_path, begin_at="charge")
    st.unplugged()
    st.idle(1)
    st.plugged()
    st.idle(10)
    st.unplugged()
    end = st.sessions("end")[0]
    assert end["energy_wh"] is None and end["segments"] == 0
    assert end["begin"] is None and end["ocmf_begin"] is None and end["ocmf_documents"] == []
    assert st.sessions("begin") == []
    assert st.fs.read(OPEN_SESSION) is None


# -- fiscal readings ---------------------------------------------------------------------

def test_fiscal_readings_at_the_interval_while_charging(tmp_path):
    """fiscal_interval_s=10: F<n> documents without TX and without user assignment, one per
    10 s of charging, none while idle; transaction pages are unaffected."""
    st = Station(tmp_path, fiscal_interval_s=10)
    st.unplugged()
    st.idle(1)
    st.plugged()
    st.idle(30)
    st.charging()
    st.flow(25)
    st.paused()
    st.idle(30)
    st.unplugged()
    end = st.sessions("end")[0]
    payloads = [verify(d, st.signer.public_key_der()) for d in end["ocmf_documents"]]
    fiscal = [p for p in payloads if p["PG"].startswith("F")]
    assert [p["PG"] for p in fiscal] == ["F1", "F2"]
    begin_wh = end["begin"]["energy_wh"]
    assert [p["RD"][0]["RV"] for p in fiscal] == [begin_wh + 30, begin_wh + 60]
    for p in fiscal:
        assert len(p["RD"]) == 1 and "TX" not in p["RD"][0]
        assert not {"IS", "IL", "IF", "IT", "ID"} & set(p)
    assert [p["PG"] for p in payloads if p["PG"].startswith("T")] == ["T1", "T2"]
    assert readings_of(end["ocmf_end"]) == [("B", begin_wh), ("E", st.register_wh)]
    assert end["energy_wh"] == 75


def test_no_fiscal_readings_when_off(tmp_path):
    """The default fiscal_interval_s=0 signs only begin and end."""
    st = Station(tmp_path)
    one_session(st)
    assert pages(st) == ["T1", "T2"]


# -- when the begin reading is taken -----------------------------------------------------

def test_begin_from_the_latest_reading_when_the_contactor_was_open_before_it(tmp_path):
    """Unplugged (no current possible), then read, then plug-in: the latest reading is exact
    and becomes the begin reading at once, without asking the meter again."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    latest = st.register_wh
    st.clock.advance(3000)
    st.plugged()
    assert st.requests == 0
    begin = st.sessions("begin")
    assert len(begin) == 1 and begin[0]["begin"]["energy_wh"] == latest
    assert begin[0]["begin"]["time"] == EPOCH + 1


def test_begin_deferred_when_the_latest_reading_predates_the_contactor_opening(tmp_path):
    """A reading taken before the contactor was known open is not exact: the engine asks for
    a fresh reading and takes that one."""
    st = Station(tmp_path)
    st.clock.advance(1000)
    st.reading(10800.0)  # read at agent start while current flows, contactor state not yet known
    st.register_wh += 4  # current was still flowing
    st.clock.advance(500)
    st.plugged()  # first inputs: contactor open from now on
    assert st.requests == 1 and st.sessions("begin") == []
    start = st.sessions("start")[0]
    assert "plugged_in_before_start" in start["flags"]
    st.idle(1)
    begin = st.sessions("begin")
    assert len(begin) == 1 and begin[0]["begin"]["energy_wh"] == st.register_wh
    assert begin[0]["begin"]["time"] == EPOCH + 2.5


def test_end_deferred_when_the_contactor_opens_with_the_unplug(tmp_path):
    """Unplug straight from charging: the last reading was taken with current flowing, so the
    end waits for a fresh reading and bills exactly up to it."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    st.flow(5)
    requests = st.requests
    st.clock.advance(200)
    st.register_wh += 1  # flowed after the last reading, before the contactor opened
    st.unplugged()
    assert st.requests == requests + 1 and st.sessions("end") == []
    st.idle(1)
    end = st.sessions("end")[0]
    assert end["end"]["energy_wh"] == st.register_wh
    assert end["energy_wh"] == st.register_wh - begin_wh == 16


# -- restarts ----------------------------------------------------------------------------

def test_restart_with_vehicle_still_charging_continues_the_session_exactly(tmp_path):
    """Agent killed while charging, the car charges on, the agent restarts on the same state
    directory: same session id, flag agent_restarted, energy exact, one start record."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    st.flow(10)
    session_id = st.sessions("begin")[0]["session_id"]
    st.flow(20, read=False)  # agent down
    restored = st.start_engine()
    assert restored is not None and restored.id == session_id
    st.charging()
    st.flow(10)
    st.paused()
    st.idle(1)
    st.unplugged()
    end = st.sessions("end")
    assert len(end) == 1 and end[0]["session_id"] == session_id
    assert "agent_restarted" in end[0]["flags"]
    assert end[0]["energy_wh"] == st.register_wh - begin_wh == 120
    assert end[0]["segments"] == 1
    assert len(st.sessions("start")) == 1
    for document in end[0]["ocmf_documents"]:
        verify(document, st.signer.public_key_der())
    assert readings_of(end[0]["ocmf_end"]) == [("B", begin_wh), ("E", st.register_wh)]


def test_restart_after_the_vehicle_finished_charging_while_the_agent_was_down(tmp_path):
    """Still plugged in, but the car stopped charging before the agent came back: the first
    reading after the restart shows 0 W and the register higher by what was charged. That
    is real energy of this session and must be billed, not mistaken for a register jump."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    st.flow(60)
    st.flow(600, read=False)  # agent down; the car charges 10 more minutes ...
    st.idle(60, read=False)  # ... then is full
    st.start_engine()
    st.paused()
    st.idle(5)
    st.unplugged()
    end = st.sessions("end")[0]
    assert "agent_restarted" in end["flags"]
    assert "register_jump" not in end["flags"]
    assert end["energy_wh"] == st.register_wh - begin_wh == 3 * 660


def test_restart_after_unplug_while_down_ends_with_the_next_exact_reading(tmp_path):
    """Unplugged while the agent was down: the first input after restore is A, the session
    ends with the next reading (asked for), billing exactly to it; the next session gets a
    higher id and the pagination keeps rising across the restart."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    begin_wh = st.register_wh
    st.charging()
    st.flow(10)
    first_id = st.sessions("start")[0]["session_id"]
    st.flow(5, read=False)  # agent down; the car charges, then is unplugged
    st.start_engine()
    requests = st.requests
    st.clock.advance(300)
    st.unplugged()
    assert st.requests > requests and st.sessions("end") == []
    st.idle(1)
    end = st.sessions("end")[0]
    assert end["session_id"] == first_id and "agent_restarted" in end["flags"]
    assert end["end"]["energy_wh"] == st.register_wh
    assert end["energy_wh"] == st.register_wh - begin_wh == 45
    assert st.fs.read(OPEN_SESSION) is None
    one_session(st)
    st.start_engine()
    one_session(st)
    ids = [doc["session_id"] for doc in st.sessions("start")]
    assert ids == ["t-001-000001", "t-001-000002", "t-001-000003"]
    numbers = [int(p[1:]) for p in pages(st)]
    assert all(p.startswith("T") for p in pages(st))
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers) == 6


def test_damaged_open_session_file_is_kept_aside_and_the_engine_starts_without_it(tmp_path, monkeypatch):
    """Garbage bytes in the open-session file: no restored session, an error in the log, the
    bytes kept as a .damaged copy; the next plug-in starts a fresh session normally."""
    st = Station(tmp_path)
    one_session(st)
    garbage = b"\x00\xffnot json\x8f{\"id\": \x01"
    st.fs.write_atomic(OPEN_SESSION, garbage)
    lines = []
    monkeypatch.setitem(log._state, "sink", lambda level, text: lines.append((level, text)))
    assert st.start_engine() is None
    assert st.engine.session is None and st.engine.ending == []
    assert st.fs.read(OPEN_SESSION + ".damaged") == garbage
    errors = [text for level, text in lines if level == log.ERROR]
    assert len(errors) == 1 and OPEN_SESSION in errors[0] and "damaged" in errors[0]
    st.unplugged()
    st.idle(1)
    st.plugged()
    assert json.loads(st.fs.read(OPEN_SESSION))["id"] == "t-001-000002"
    st.idle(1)
    st.unplugged()
    assert [doc["session_id"] for doc in st.sessions("end")] == ["t-001-000001", "t-001-000002"]
    assert st.sessions("end")[1]["energy_wh"] == 0


def test_open_session_file_holds_the_open_session_and_is_removed_at_the_end(tmp_path):
    """While a session is open its file holds it (id, begin, period); once the end reading is
    signed the file is gone, so nothing is left to continue."""
    st = Station(tmp_path)
    st.unplugged()
    st.idle(1)
    st.plugged()
    doc = json.loads(st.fs.read(OPEN_SESSION))
    assert doc["id"] == "t-001-000001" and doc["segments"][0]["begin"]["energy_wh"] == START_WH
    st.charging()
    assert json.loads(st.fs.read(OPEN_SESSION))["period"] == "charging"
    st.flow(3)
    st.paused()
    st.idle(1)
    st.unplugged()
    assert len(st.sessions("end")) == 1
    assert st.fs.read(OPEN_SESSION) is None
    assert json.loads(st.fs.read("counters.json")) == {"session": 1, "transaction_page": 2,
                                                       "fiscal_page": 0, "event": 0}


def test_a_finished_session_is_not_continued_after_a_restart(tmp_path):
    """A session that ended normally (end reading at unplug) is not restored by the next
    engine on the same state directory."""
    st = Station(tmp_path)
    one_session(st)
    assert len(st.sessions("end")) == 1
    requests = st.requests
    assert st.start_engine() is None
    assert st.engine.ending == [] and st.requests == requests


def test_charging_time_before_and_during_a_restart_is_kept(tmp_path):
    """Charging 60 s, the agent is down 30 s while the car charges on, then 20 s more: the
    session reports 110 s of charging (the period survives the restart in wall-clock time)."""
    station = Station(tmp_path)
    station.unplugged()
    station.idle(1)
    station.plugged()
    station.idle(1)
    station.charging()
    station.flow(60)
    station.flow(30, read=False)  # nobody is watching
    station.start_engine()
    station.charging()
    station.flow(20)
    station.paused()
    station.idle(1)
    station.unplugged()
    end = station.sessions("end")[-1]
    assert "agent_restarted" in end["flags"]
    assert end["charging_s"] == pytest.approx(110, abs=1)
    assert end["energy_wh"] == 110 * 3
