"""Console command ``selftest``: meter, GPIO, broker, signing and journal checks.

Bound to ``Console`` when a command of this group is first used (see the package
docstring): ``self`` is the console."""

from ..messages import iso_utc
from ..ocmf import sign_document
from ..pilot import state_from_lines, state_from_voltage
from ..registers import decode_energy_wh
from . import (CommandError, PROBE_FILE, ROUND_TRIP_S, WIDTH, _closed, _error_text, _fit, _no_args,
    _pad, _size)

NEEDS = ('status', 'records')  # groups whose methods these call


async def cmd_selftest(self, args):
    _no_args(args, "selftest")
    checks = (("meter comms", self._check_meter), ("gpio read-back", self._check_gpio),
              ("broker round trip", self._check_broker), ("signing round trip", self._check_signing),
              ("journal write", self._check_journal))
    failed = 0
    for name, check in checks:
        try:
            verdict, text = "ok", await check()
        except Exception as error:
            verdict, text = "FAIL", _error_text(error)
            failed += 1
        self._say(_pad(name, 20) + _pad(verdict, 6) + _fit(text, WIDTH - 27))
    self._say("selftest: %d ok, %d FAIL" % (len(checks) - failed, failed))

async def _check_meter(self):
    meter = self.agent.meter
    reg = meter.model.energy_register
    start = self.clock.monotonic_ms()
    data = await meter.read_raw(reg.function, reg.address, reg.count)
    took = self.clock.monotonic_ms() - start
    return "import register 0x%04X read in %d ms: %s Wh" % (reg.address, took, decode_energy_wh(reg, data, 0))

async def _check_gpio(self):
    monitor = self.agent.inputs
    if monitor is None:
        raise CommandError("this agent reads no pins")
    sample = monitor.pins.read()
    pilot = state_from_lines(sample.pilot_lines) if monitor.use_lines else state_from_voltage(sample.pilot_volts)
    if pilot is None:
        raise CommandError("pilot reads %s: in no IEC 61851 range" % self._sample_text(sample).split(",")[0])
    command, feedback = sample.contactor_command, sample.contactor_feedback
    if command is not None and feedback is not None and bool(command) != bool(feedback):
        raise CommandError("contactor command %s but feedback %s" % (_closed(command), _closed(feedback)))
    accepted = monitor.current().pilot
    note = "as accepted" if pilot == accepted else "accepted %s, changing" % accepted
    return "pilot %s (%s), %s; contactor %s" % (pilot, self._sample_text(sample).split(",")[0], note,
                                                "lines agree" if command is not None and feedback is not None
                                                else "not fully wired")

async def _check_broker(self):
    round_trip = getattr(self.publisher, "round_trip", None)
    if round_trip is None:
        raise CommandError("this port's MQTT client cannot subscribe")
    topic = self.agent.topics.base + "/selftest"
    took = await round_trip(topic, ROUND_TRIP_S)
    return "sent and received back in %d ms on %s" % (took, topic)

async def _check_signing(self):
    engine = self.agent.engine
    signer = engine.signer if engine is not None else None
    if signer is None or not hasattr(signer, "verify"):
        raise CommandError("no signer that can verify on this port")
    payload = '{"FV":"1.0","selftest":"%s"}' % iso_utc(self.clock.time())
    document = sign_document(payload, signer)
    problem = self._ocmf_problem(document, signer)
    if problem:
        raise CommandError(problem)
    altered = document.replace('"FV":"1.0"', '"FV":"1.1"', 1)
    if self._ocmf_problem(altered, signer) is None:
        raise CommandError("an altered document verified too")
    return "signed and verified a test OCMF document; a changed copy fails"

async def _check_journal(self):
    fs = self.journal.fs
    data = ("evse-agent selftest %d" % self.clock.monotonic_ms()).encode()
    fs.write_atomic(PROBE_FILE, data)
    back = fs.read(PROBE_FILE)
    fs.remove(PROBE_FILE)
    if back != data:
        raise CommandError("read back %r, wrote %r" % (back, data))
    free = fs.free_bytes() if hasattr(fs, "free_bytes") else None
    return "%d bytes written, read back, removed%s in %s" % (
        len(data), "" if free is None else " (%s free)" % _size(free), self.agent.config["journal"]["dir"])


METHODS = (cmd_selftest, _check_meter, _check_gpio, _check_broker, _check_signing, _check_journal)
