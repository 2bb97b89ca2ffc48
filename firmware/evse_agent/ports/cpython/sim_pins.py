"""Pin bank of the host simulator board: the pin file written by ``evse-vehicle-sim``.

The file (``io.sim_file``, format in ``tools/sim/vehicle_sim.py``) is replaced atomically on
every change; it is re-read only when its size, mtime or inode changed, so sampling it
every 20 ms costs one ``stat``. No file yet means no simulator: +12 V (state A), 100 %
duty, contactor open. A file that cannot be used (torn, not JSON, a field of the wrong
type) keeps the previous sample and counts one error per version of the file.

The simulator has every line, so both contactor values are always reported. With
``io.pilot.source`` "lines" the sample carries the 5 comparator outputs a decoder board
would show for the file's voltage (and no voltage), so the lines path runs on the host too.
"""

import json
import os

from ...pilot import NOMINAL_VOLTS, A, PinSample, lines_from_voltage


def _number(doc, name):
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise ValueError("%s is %s, expected a number" % (name, json.dumps(value)))
    return float(value)


def _flag(doc, name):
    value = doc.get(name)
    if not isinstance(value, bool):
        raise ValueError("%s is %s, expected true or false" % (name, json.dumps(value)))
    return value


class SimPinBank:
    """``read()`` gives the pin file's current sample; ``errors`` / ``last_error`` tell of bad files."""

    def __init__(self, io_config):
        self.path = io_config["sim_file"]
        self.use_lines = io_config["pilot"]["source"] == "lines"
        self.errors = 0
        self.last_error = None
        self._signature = None
        self._volts = None
        self._sample = PinSample()
        self._set(NOMINAL_VOLTS[A], 100.0, False, False)

    def _set(self, volts, duty, command, feedback):
        sample = self._sample
        if self.use_lines:
            sample.pilot_volts = None
            if volts != self._volts:
                sample.pilot_lines = lines_from_voltage(volts)
        else:
            sample.pilot_volts = volts
        self._volts = volts
        sample.duty_pct = duty
        sample.contactor_command = command
        sample.contactor_feedback = feedback

    def _fail(self, text):
        self.errors += 1
        self.last_error = "%s: %s" % (self.path, text)

    def read(self):
        """The current sample (the same object each time, updated in place); never raises."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self._signature is not None:
                self._signature = None
                self._set(NOMINAL_VOLTS[A], 100.0, False, False)
            return self._sample
        except OSError as error:
            self._fail("cannot stat (%s)" % error)
            return self._sample
        signature = (info.st_size, info.st_mtime_ns, info.st_ino)
        if signature == self._signature:
            return self._sample
        self._signature = signature
        try:
            with open(self.path, "rb") as handle:
                doc = json.loads(handle.read())
            if not isinstance(doc, dict):
                raise ValueError("expected a JSON object")
            volts = _number(doc, "pilot_v")
            duty = None if doc.get("duty_pct") is None else _number(doc, "duty_pct")
            command = _flag(doc, "contactor_command")
            feedback = _flag(doc, "contactor_feedback")
        except FileNotFoundError:
            self._signature = None  # replaced between stat and open: read it next time
            return self._sample
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._fail(str(error))
            return self._sample
        self._set(volts, duty, command, feedback)
        return self._sample

    def close(self):
        pass
