"""A hostile meter cannot crash the agent or bend the bill.

Random register sequences (hypothesis) go through the real ``ModbusMeter`` (register
decoding and value validation) into the real ``SessionEngine``, on a real state directory
and signer. The registers are served as the bytes a meter answers with: the Modbus wire
itself is exercised end to end by ``test_hostile_register_end_to_end`` with the meter
simulator on a pty, a real broker and the agent as a process.

Properties: never an exception; the billed energy is never negative and never more than the
register's true rise; with only transient faults (NaN, infinities, negative, 3e38, a dip, a
1 GWh jump, for fewer readings than it takes to confirm a new level) it is exactly the true
rise and the signed end - begin agrees with it (also for a nudge while nothing flows, of at
least 20 Wh and beyond what the larger power of each step since the last good register, held
over the step, could have drawn); a permanent reset is flagged and billed in
segments, with the unbilled gap stated as ``uncertain_wh``.
"""

import asyncio
import json
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from evse_agent.config import validate
from evse_agent.meter import ModbusMeter
from evse_agent.meter_models import SDM630
from evse_agent.pilot import InputState
from evse_agent.ports.cpython.fs import FileSystem
from evse_agent.ports.cpython.signer import FileKeySigner
from evse_agent.session import MEASURED_POWER_MARGIN_W, REGISTER_CONFIRM_READINGS, REGISTER_CONFIRM_S, SessionEngine
from evse_agent.store import StateStore

EPOCH = 1_750_000_000.0
START_WH = 1_234_567
SERIAL = 12345678
FAULTS = ("nan", "inf", "-inf", "negative", "huge", "dip", "jump", "zero")
LOOP = asyncio.new_event_loop()  # runs ModbusMeter.read() for every rig


class Clock:
    def __init__(self):
        self.mono = 5_000_000
        self.wall = EPOCH

    def monotonic_ms(self):
        return self.mono

    def time(self):
        return self.wall

    def synced(self):
        return True

    def advance(self, seconds):
        self.mono += int(seconds * 1000)
        self.wall += seconds


class RegisterBank:
    """Answers ``read_registers`` with the bytes an SDM630 sends for the values it holds."""

    def __init__(self):
        self.energy_kwh = START_WH / 1000.0
        self.power_w = 0.0
        self.serial = SERIAL

    async def read_registers(self, unit, function, address, count):
        words = [0] * count
        for reg in SDM630.registers:
            if reg.function != function or not address <= reg.address < address + count:
                continue
            if reg.name == "serial":
                value_words = [self.serial >> 16, self.serial & 0xFFFF]
            else:
                value = {"energy_import": self.energy_kwh, "power_total": self.power_w,
                         "frequency": 50.0}.get(reg.name)
                if value is None:
                    value = 230.0 if reg.name.startswith("voltage") else (
                        self.power_w / 3 if reg.name.startswith("power") else self.power_w / 690.0)
                value_words = list(struct.unpack(">HH", struct.pack(">f", value)))
            offset = reg.address - address
            words[offset:offset + 2] = value_words
        return b"".join(struct.pack(">H", w) for w in words)


class Rig:
    """Meter, engine and the truth: the register's real count, whatever the meter says."""

    def __init__(self, tmp_path):
        self.clock = Clock()
        self.bank = RegisterBank()
        self.meter = ModbusMeter(self.bank, SDM630, 1, self.clock, offline_after=3)
        config = validate({"station_id": "t-001", "meter": {"model": "sdm630", "port": "x"},
                           "session": {"state_dir": str(tmp_path / "state"), "fiscal_interval_s": 5}})
        self.store = StateStore(FileSystem(config["session"]["state_dir"]))
        signer = FileKeySigner(str(tmp_path / "keys" / "station.pem"))
        identity = {"gateway_vendor": "evse-agent", "gateway_serial": "t-001", "gateway_version": "0",
                    "meter_vendor": "Eastron", "meter_model": "SDM630"}
        self.published = []
        self.alarms = []
        self.meter.alarm = lambda type_, active, values: self.alarms.append((type_, active))
        self.engine = SessionEngine(config, self.store, signer, self.clock, self.meter,
                                    lambda kind, doc: self.published.append((kind, json.loads(json.dumps(doc)))),
                                    lambda: None, identity)
        self.engine.alarm = lambda type_, active, values: self.alarms.append((type_, active))
        self.true_wh = START_WH
        self.offset_wh = 0  # a permanent reset shifts what the register shows
        self.reach_wh = 0.0  # the most the meter's powers allow since the last good register
        self.loop = LOOP

    def inputs(self, pilot, closed):
        now = self.clock.monotonic_ms()
        self.engine.on_inputs(InputState(pilot, None, 16.0 if pilot != "A" else None, False, closed, closed, now), now)

    def step(self, seconds, power_w, fault=None):
        """Time passes at ``power_w``; then one poll, the register shown as ``fault`` says."""
        self.clock.advance(seconds)
        self.true_wh += int(power_w * seconds) // 3600
        shown = self.true_wh + self.offset_wh
        # The larger of the two readings' powers may have flowed all the step, plus the margin.
        self.reach_wh += (max(self.bank.power_w, power_w) + MEASURED_POWER_MARGIN_W) * seconds / 3600.0
        # A nudge is 20 Wh, or more when the powers since the last good register allow that much.
        nudge = max(20, int(self.reach_wh) + 3)
        if fault is None:
            self.reach_wh = 0.0
        self.bank.power_w = power_w
        self.bank.energy_kwh = {
            None: shown / 1000.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
            "negative": -shown / 1000.0, "huge": 3e38, "dip": (shown - 100_000) / 1000.0,
            "jump": (shown + 10 ** 9) / 1000.0, "zero": 0.0, "nudge": (shown + nudge) / 1000.0}[fault]
        reading = self.loop.run_until_complete(self.meter.read())
        assert reading is not None
        self.engine.on_reading(reading)

    def ends(self):
        return [doc for kind, doc in self.published if kind == "session" and doc["event"] == "end"]


step_st = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([0.0, 3680.0, 11040.0, 22080.0]),
                    st.one_of(st.none(), st.none(), st.sampled_from(FAULTS)))
# While nothing flows, a nudge is beyond what the powers measured since the last good register allow.
idle_step_st = st.tuples(st.sampled_from([1, 2, 3]), st.just(0.0),
                         st.one_of(st.none(), st.none(), st.sampled_from(FAULTS + ("nudge",))))


def transient(steps):
    """Faults in runs shorter than a confirmed new level."""
    run = 0
    for _, _, fault in steps:
        run = run + 1 if fault in ("dip", "jump", "zero", "nudge") else 0
        if run >= REGISTER_CONFIRM_READINGS:
            return False
    return True


def run_session(rig, charge_steps, pause_steps, reset_at=None):
    rig.inputs("A", False)
    rig.step(1, 0.0)
    rig.inputs("B", False)
    begin_true = rig.true_wh
    rig.step(1, 0.0)
    rig.inputs("C", True)
    for index, (seconds, power, fault) in enumerate(charge_steps):
        if index == reset_at:
            rig.offset_wh = 1000 - rig.true_wh  # the register restarts near 1 kWh and stays there
        rig.step(seconds, power, fault)
    rig.inputs("B", False)
    for seconds, _, fault in pause_steps:
        rig.step(seconds, 0.0, fault)
    end_true = rig.true_wh
    rig.inputs("A", False)
    for _ in range(int(REGISTER_CONFIRM_S) + REGISTER_CONFIRM_READINGS + 2):  # a good meter again
        rig.step(1, 0.0)
    return begin_true, end_true


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(charge=st.lists(step_st, min_size=1, max_size=30).filter(transient),
       pause=st.lists(idle_step_st, max_size=4).filter(transient))
# The power fell to 0 W while the register read NaN: a 20 Wh nudge after it is not charging,
# however much power the last good reading before the NaNs showed.
@example(charge=[(1, 11040.0, None), (1, 0.0, "nan"), (1, 0.0, "nan")],
         pause=[(1, 0.0, "nan"), (1, 0.0, "nudge")])
# The power fell while the register read NaN: 1.5 x the larger power over the gap leaves
# room for 20 Wh, the larger power without the room for ripple does not.
@example(charge=[(1, 22080.0, None), (2, 0.0, "nan")], pause=[(1, 0.0, "nudge")])
@example(charge=[(1, 22080.0, None), (3, 22080.0, "nan"), (3, 0.0, "nan")], pause=[(1, 0.0, "nudge")])
# ... and without a NaN: one long step in which the power fell.
@example(charge=[(3, 22080.0, None)], pause=[(3, 0.0, "nudge"), (1, 0.0, "nudge")])
def test_transient_register_faults_bill_exactly_the_true_rise(tmp_path_factory, charge, pause):
    rig = Rig(tmp_path_factory.mktemp("rig"))
    begin_true, end_true = run_session(rig, charge, pause)
    (end,) = rig.ends()
    assert end["energy_wh"] == end_true - begin_true
    assert end["register_delta_wh"] == end["energy_wh"]
    assert end["segments"] == 1 and end["uncertain_wh"] == 0
    assert not {"register_backwards", "register_jump", "meter_replaced"} & set(end["flags"])
    faults = [f for _, _, f in charge + pause if f is not None]
    invalid = [f for f in faults if f in ("nan", "inf", "-inf", "negative", "huge")]
    assert rig.meter.link.value_faults == len(invalid)
    if invalid:
        assert ("meter_value_invalid", True) in rig.alarms
    if set(faults) & {"dip", "jump", "zero", "nudge"}:
        assert ("meter_register_anomaly", True) in rig.alarms
    raised = [a for a in rig.alarms if a[1]]
    cleared = [a for a in rig.alarms if not a[1]]
    assert len(raised) == len(cleared)  # every fault alarm ended once the meter was good again


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(charge=st.lists(step_st, min_size=2, max_size=30), pause=st.lists(step_st, max_size=4),
       reset=st.one_of(st.none(), st.integers(min_value=0, max_value=29)))
def test_any_register_sequence_bills_within_the_true_rise(tmp_path_factory, charge, pause, reset):
    """Faults of any length, and maybe a permanent reset: never a crash, never negative,
    never more than the true rise; a register that was not followed exactly says so."""
    rig = Rig(tmp_path_factory.mktemp("rig"))
    reset_at = reset if reset is not None and reset < len(charge) else None
    begin_true, end_true = run_session(rig, charge, pause, reset_at=reset_at)
    (end,) = rig.ends()
    assert 0 <= end["energy_wh"] <= end_true - begin_true
    if end["energy_wh"] != end_true - begin_true:
        assert set(end["flags"]) & {"register_backwards", "register_jump", "register_suspect"}, end["flags"]
    if end["segments"] > 1:
        assert end["register_delta_wh"] != end["energy_wh"] or end["uncertain_wh"] >= 0
        assert set(end["flags"]) & {"register_backwards", "register_jump"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ticks=st.lists(st.sampled_from([2, 3, 4, 5]), min_size=1, max_size=20).filter(lambda t: t.count(5) <= 1),
       idle=st.integers(1, 15))
# Ahead for longer than a new level must hold: billed once it held.
@example(ticks=[5] + [4] * 13, idle=1)
def test_a_register_ticking_ahead_of_its_power_is_billed_in_full(tmp_path_factory, ticks, idle):
    """A register whose steps run up to a third ahead of the power it shows (10.8 kW, 3 Wh/s),
    once two thirds, is held only until the power explains it or it holds: billed in full, in one segment,
    without an anomaly alarm, also when the charge stops while it is ahead."""
    rig = Rig(tmp_path_factory.mktemp("rig"))
    rig.inputs("A", False)
    rig.step(1, 0.0)
    rig.inputs("B", False)
    begin_true = rig.true_wh
    rig.step(1, 0.0)
    rig.inputs("C", True)
    for tick in ticks:
        rig.true_wh += tick - 3  # the step below adds 3 Wh
        rig.step(1, 10800.0)
    rig.inputs("B", False)
    for _ in range(idle):
        rig.step(1, 0.0)
    rig.inputs("A", False)
    for _ in range(int(REGISTER_CONFIRM_S) + REGISTER_CONFIRM_READINGS + 2):
        rig.step(1, 0.0)
    (end,) = rig.ends()
    assert end["energy_wh"] == end["register_delta_wh"] == rig.true_wh - begin_true == sum(ticks)
    assert end["segments"] == 1 and end["uncertain_wh"] == 0
    assert not {"register_backwards", "register_jump", "register_suspect"} & set(end["flags"])
    assert ("meter_register_anomaly", True) not in rig.alarms


def test_dip_and_recovery_costs_nothing(tmp_path):
    """N, N-15 Wh, N, ... for 20 s while charging: billed = signed end - begin, one segment."""
    rig = Rig(tmp_path)
    rig.inputs("A", False)
    rig.step(1, 0.0)
    rig.inputs("B", False)
    begin = rig.true_wh
    rig.inputs("C", True)
    for i in range(20):
        rig.clock.advance(1)
        rig.true_wh += 3
        rig.bank.power_w = 10800.0
        rig.bank.energy_kwh = (rig.true_wh - (15 if i % 2 else 0)) / 1000.0
        rig.engine.on_reading(rig.loop.run_until_complete(rig.meter.read()))
    rig.inputs("B", False)
    rig.step(1, 0.0)
    rig.inputs("A", False)
    rig.step(1, 0.0)
    (end,) = rig.ends()
    assert end["energy_wh"] == end["register_delta_wh"] == rig.true_wh - begin == 60
    assert end["segments"] == 1


def test_serial_change_while_online_is_noticed_and_the_ocmf_ms_follows(tmp_path):
    """The serial is read again at its cadence: a swapped meter without an outage closes the
    segment and the next documents carry the new serial as MS."""
    from evse_agent.meter import SERIAL_CHECK_MS
    rig = Rig(tmp_path)
    notices = []
    rig.meter.notice = lambda type_, values: notices.append((type_, values))
    rig.inputs("A", False)
    rig.step(1, 0.0)
    rig.inputs("B", False)
    rig.inputs("C", True)
    for _ in range(SERIAL_CHECK_MS // 1000 - 3):
        rig.step(1, 3600.0)
    rig.bank.serial = 87654321  # swapped between two polls, the line never went quiet
    rig.offset_wh = 500 - rig.true_wh
    for _ in range(5):
        rig.step(1, 3600.0)
    assert rig.meter.link.transitions == 1  # online all along
    rig.inputs("B", False)
    rig.step(1, 0.0)
    rig.inputs("A", False)
    rig.step(1, 0.0)
    (end,) = rig.ends()
    assert notices == [("meter_replaced", {"from_serial": SERIAL, "to_serial": 87654321})]
    assert "meter_replaced" in end["flags"] and end["segments"] == 2
    payloads = [json.loads(d.split("|")[1]) for d in end["ocmf_documents"]]
    assert [p["MS"] for p in payloads][-2:] == ["87654321", "87654321"]
    assert payloads[0]["MS"] == str(SERIAL)


# -- end to end: the meter simulator on a pty, a real broker, the agent as a process ---------

def test_hostile_register_end_to_end(broker, collector, meter_sim, agent_process, station_dir):
    """While a car charges, the meter's import register sends NaN, a negative value, 3e38, a
    dip and a 1 GWh jump, each for a moment: the agent keeps running, raises and clears
    ``meter_value_invalid`` and ``meter_register_anomaly``, and bills exactly the register's
    true rise in one segment with documents that verify."""
    from test_sessions import Station, assert_documents_verify, public_key

    st = Station(broker, collector, meter_sim, agent_process, station_dir,
                 extra=("--set", "mqtt.status_interval_s=1"))
    sim = st.meter
    begin_wh = st.register_wh()
    st.vehicle.plug()
    st.session_message("begin")
    st.vehicle.charge()
    charging = collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.body["power_total_w"]
                                  and m.body["power_total_w"] > 1000, timeout_s=15)
    assert charging is not None, st.agent.log()

    def event(type_, state, after):
        message = collector.wait_for(lambda m: m.topic.endswith("/event") and m.body["type"] == type_
                                     and m.body["state"] == state and m.received > after, timeout_s=15)
        assert message is not None, "no %s %s\n%s" % (type_, state, st.agent.log())
        return message

    def readings_after(message, count=2):
        """Wait until the agent has polled ``count`` more times (telemetry follows each poll)."""
        assert collector.wait_for(lambda m: m.topic.endswith("/telemetry") and m.received > message.received
                                  and len([t for t in collector.on("telemetry") if t.received > message.received])
                                  >= count, timeout_s=15), st.agent.log()

    sim.set_register(float("nan"))
    raised = event("meter_value_invalid", "active", charging.received)
    for value in (-5.0, 3e38, float("-inf")):
        sim.set_register(value)
        readings_after(raised)
        raised = collector.on("telemetry")[-1]
    sim.set_register(None)
    cleared = event("meter_value_invalid", "cleared", raised.received)

    sim.set_register((st.register_wh() - 15) / 1000.0)  # a dip
    dip = event("meter_register_anomaly", "active", cleared.received)
    sim.set_register(None)
    back = event("meter_register_anomaly", "cleared", dip.received)
    assert back.body["values"]["outcome"] == "glitch" and back.body["values"]["problem"] == "register_backwards"

    sim.set_register(st.register_wh() / 1000.0 + 1e6)  # 1 GWh more
    jump = event("meter_register_anomaly", "active", back.received)
    readings_after(jump)
    sim.set_register(None)
    back = event("meter_register_anomaly", "cleared", jump.received)
    assert back.body["values"]["outcome"] == "glitch" and back.body["values"]["problem"] == "register_jump"

    st.vehicle.pause()
    assert collector.wait_for(lambda m: m.topic.endswith("/state") and m.received > back.received
                              and not m.body["charging"], timeout_s=15), st.agent.log()
    st.vehicle.unplug()
    end = st.session_message("end").body
    assert end["begin"]["energy_wh"] == begin_wh
    assert end["end"]["energy_wh"] == st.register_wh()
    assert end["energy_wh"] == end["register_delta_wh"] == st.register_wh() - begin_wh > 0
    assert end["segments"] == 1 and end["uncertain_wh"] == 0
    assert not {"register_backwards", "register_jump"} & set(end["flags"])
    assert_documents_verify(end, public_key(station_dir))
    meter = collector.wait_for(lambda m: m.topic.endswith("/meter") and m.body["value_faults"] >= 4)
    assert meter is not None and meter.body["online"], st.agent.log()
    assert st.agent.alive()
    assert st.agent.stop() == 0
    assert "Traceback" not in st.agent.log()
