"""Vehicle simulator: a simulated EV and the EVSE controller side of the pilot, in a pin file.

``evse-vehicle-sim --pin-file run/pins.json`` takes commands on stdin (``help`` lists them);
``--script "plug; wait 2; charge; wait 10; pause; wait 3; charge; wait 5; unplug"`` runs
a scenario and exits. The agent's sim pin bank (``io.driver`` "sim") and the meter
simulator read the pin file. It is JSON, replaced atomically (temp file + rename) on every
change:

    {"pilot_v": 9.0, "duty_pct": 26.67, "contactor_command": false,
     "contactor_feedback": false, "ev_current_a": 16.0, "ev_phases": 3,
     "updated": 1767225600.123}

- ``pilot_v``: the pilot's high level in volts: A 12, B 9, C 6, D 3, E 0, F -12;
- ``duty_pct``: the PWM duty the EVSE generates: the advertised current's duty in B, C
  and D, 100 (steady +12 V) in A, 0 (no PWM) in E and F;
- ``contactor_command`` / ``contactor_feedback``: true = closed. The EVSE closes the
  contactor in C and D and opens it otherwise; the feedback follows the command after
  ``contactor_delay`` (50 ms), unless a fault switch holds it (``weld``, ``fail-to-close``);
- ``ev_current_a``: the per-phase current the car draws while ``contactor_feedback`` is true
  (the meter simulator makes it flow): its draw setting in C and D, 0 in other states;
  ``ev_phases``: 1 or 3;
- ``updated``: wall-clock time of the write (UTC epoch seconds).
"""

import argparse
import json
import os
import sys
import time

from evse_agent.pilot import (A, B, C, D, DIGITAL, E, F, NOMINAL_VOLTS, current_from_duty,
                              duty_from_current)

CHARGING_STATES = (C, D)

HELP = """commands (one per line, or separated by ';' in --script):
  plug               vehicle plugged in (B)
  charge             vehicle asks for energy (C); the EVSE closes the contactor
  ventilation        vehicle asks for energy with ventilation (D)
  pause              vehicle stops charging (B); the EVSE opens the contactor
  unplug             vehicle unplugged (A)
  error              pilot shorted to PE (E)
  unavailable        EVSE unavailable (F)
  advertise <A>      current the EVSE offers (6-80 A), sets the duty cycle
  draw <A>|auto      current the car draws per phase (auto: what is advertised)
  weld on|off        contactor feedback stays closed when the command opens
  fail-to-close on|off   contactor feedback stays open when the command closes
  wait <s>           pause the script
  status             show the pins
  help, quit"""


class VehicleSim:
    """The simulated EV and EVSE side; every change rewrites ``pin_file`` atomically."""

    def __init__(self, pin_file, advertised_a=16.0, phases=3, contactor_delay_s=0.05):
        if phases not in (1, 3):
            raise ValueError("phases %r: a car charges on 1 or 3 phases" % (phases,))
        self.pin_file = pin_file
        self.phases = phases
        self.contactor_delay_s = contactor_delay_s
        self.state = A
        self.plugged = False
        self.command = False
        self.feedback = False
        self.welded = False
        self.stuck_open = False
        self.draw_a = None  # None: the car draws what is advertised
        self.writes = 0
        self._duty = None
        self.advertised_a = None
        self._set_advertised(advertised_a)
        self._write()

    # -- the vehicle ---------------------------------------------------------------------

    def plug(self):
        if self.plugged:
            raise ValueError("a vehicle is already plugged in (state %s)" % self.state)
        self.plugged = True
        self._enter(B)

    def charge(self):
        self._need_vehicle("charge")
        self._enter(C)

    def ventilation(self):
        self._need_vehicle("ventilation")
        self._enter(D)

    def pause(self):
        self._need_vehicle("pause")
        self._enter(B)

    def unplug(self):
        if not self.plugged:
            raise ValueError("no vehicle is plugged in")
        self.plugged = False
        self._enter(A)

    def error(self):
        self._enter(E)

    def unavailable(self):
        self._enter(F)

    def draw(self, amps):
        """Per-phase current the car draws when charging; None follows the advertised current."""
        if amps is not None and not 0.0 <= amps <= 100.0:
            raise ValueError("draw %s A: a car draws 0 to 100 A per phase" % amps)
        self.draw_a = None if amps is None else float(amps)
        self._write()

    # -- the EVSE ------------------------------------------------------------------------

    def advertise(self, amps):
        """Offer ``amps`` on the pilot (changes the duty cycle); ValueError outside 6-80 A."""
        self._set_advertised(amps)
        self._write()

    def weld(self, on=True):
        """Fault: the feedback stays closed when the command opens."""
        self.welded = bool(on)
        if not on and self.feedback and not self.command:
            self.feedback = False
        self._write()

    def fail_to_close(self, on=True):
        """Fault: the feedback stays open when the command closes."""
        self.stuck_open = bool(on)
        if not on and self.command and not self.feedback:
            self.feedback = True
        self._write()

    # -- pins ----------------------------------------------------------------------------

    @property
    def duty_pct(self):
        if self.state in (B, C, D):
            return self._duty
        return 100.0 if self.state == A else 0.0

    @property
    def ev_current_a(self):
        if self.state not in CHARGING_STATES:
            return 0.0
        return self.advertised_a if self.draw_a is None else self.draw_a

    def snapshot(self):
        """The pin file's content as last written."""
        return {"pilot_v": NOMINAL_VOLTS[self.state], "duty_pct": self.duty_pct,
                "contactor_command": self.command, "contactor_feedback": self.feedback,
                "ev_current_a": self.ev_current_a, "ev_phases": self.phases,
                "updated": round(time.time(), 3)}

    def describe(self):
        """One line: pilot, duty, contactor, what the car draws, fault switches."""
        faults = "".join(("  [welded]" if self.welded else "", "  [fails to close]" if self.stuck_open else ""))
        return "pilot %s (%+.0f V)  duty %.2f %%  advertised %.1f A  contactor command %s, feedback %s  " \
               "car draws %.1f A x %d%s" % (
                   self.state, NOMINAL_VOLTS[self.state], self.duty_pct, self.advertised_a,
                   _word(self.command), _word(self.feedback), self.ev_current_a, self.phases, faults)

    def _set_advertised(self, amps):
        duty = round(duty_from_current(amps), 2)
        offered = current_from_duty(duty)
        if offered == DIGITAL or not offered:  # cannot happen for 6-80 A; guards the table
            raise ValueError("%s A maps to duty %s %%, which offers no current" % (amps, duty))
        self._duty = duty
        self.advertised_a = offered

    def _need_vehicle(self, action):
        if not self.plugged:
            raise ValueError("cannot %s: no vehicle is plugged in (plug first)" % action)

    def _enter(self, state):
        self.state = state
        self._switch(state in CHARGING_STATES)

    def _switch(self, close):
        """The EVSE commands the contactor; the feedback follows after the contactor delay."""
        if close == self.command:
            self._write()
            return
        self.command = close
        self._write()
        held = self.stuck_open if close else self.welded
        if held or self.feedback == close:
            return
        if self.contactor_delay_s > 0:
            time.sleep(self.contactor_delay_s)
        self.feedback = close
        self._write()

    def _write(self):
        directory = os.path.dirname(self.pin_file)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temp = "%s.%d.tmp" % (self.pin_file, os.getpid())
        with open(temp, "w") as handle:
            handle.write(json.dumps(self.snapshot()) + "\n")
        os.replace(temp, self.pin_file)
        self.writes += 1


def _word(closed):
    return "closed" if closed else "open"


# -- commands ------------------------------------------------------------------------------

_NO_ARGUMENT = ("plug", "charge", "ventilation", "pause", "unplug", "error", "unavailable",
                "status", "help", "quit")
_ON_OFF = ("weld", "fail-to-close")


def parse_command(text):
    """(verb, argument) for one command; ValueError with a one-line reason otherwise."""
    words = text.split()
    if not words:
        raise ValueError("empty command")
    verb = words[0].lower().replace("_", "-")
    args = words[1:]
    if verb in _NO_ARGUMENT:
        if args:
            raise ValueError("%s takes no argument (got %r)" % (verb, " ".join(args)))
        return verb, None
    if verb not in ("advertise", "draw", "wait") + _ON_OFF:
        raise ValueError("unknown command %r (try help)" % words[0])
    if len(args) != 1:
        raise ValueError("%s takes one argument, got %d" % (verb, len(args)))
    arg = args[0].lower()
    if verb in _ON_OFF:
        if arg not in ("on", "off"):
            raise ValueError("%s %r: expected on or off" % (verb, args[0]))
        return verb, arg == "on"
    if verb == "draw" and arg == "auto":
        return verb, None
    try:
        number = float(arg)
    except ValueError:
        unit = "seconds" if verb == "wait" else "amps"
        raise ValueError("%s %r is not a number of %s" % (verb, args[0], unit))
    if not 0 <= number < float("inf"):
        raise ValueError("%s %r: expected a finite number >= 0" % (verb, args[0]))
    return verb, number


def apply_command(sim, verb, arg, sleep=time.sleep):
    """Carry out a parsed command; returns the reply line. ValueError when the sim refuses."""
    if verb == "wait":
        sleep(arg)
        return "waited %g s" % arg
    if verb == "help":
        return HELP
    if verb == "status":
        return sim.describe()
    if verb == "advertise":
        sim.advertise(arg)
    elif verb == "draw":
        sim.draw(arg)
    elif verb == "weld":
        sim.weld(arg)
    elif verb == "fail-to-close":
        sim.fail_to_close(arg)
    else:
        getattr(sim, verb)()
    return sim.describe()


def split_script(script):
    """The commands of a ``--script`` text: separated by ';' or new lines."""
    return [part.strip() for part in script.replace("\n", ";").split(";") if part.strip()]


def parse_script(script):
    """The parsed commands of a ``--script`` text; ValueError naming the first bad one."""
    commands = []
    for number, text in enumerate(split_script(script), 1):
        try:
            commands.append((text, parse_command(text)))
        except ValueError as error:
            raise ValueError("script command %d %r: %s" % (number, text, error))
    return commands


def run_script(sim, commands, out=sys.stdout):
    """Run parsed script commands in order, one line each; the exit status."""
    started = time.monotonic()
    for number, (text, (verb, arg)) in enumerate(commands, 1):
        if verb == "quit":
            break
        try:
            reply = apply_command(sim, verb, arg)
        except (ValueError, OSError) as error:
            sys.stderr.write("evse-vehicle-sim: script command %d %r: %s\n" % (number, text, error))
            return 1
        out.write("%7.2f s  %-14s %s\n" % (time.monotonic() - started, text, reply))
        out.flush()
    return 0


def run_interactive(sim, lines, out=sys.stdout):
    """One reply per input line until ``quit`` or end of input; bad lines get ``error: ...``."""
    for line in lines:
        if not line.strip():
            continue
        try:
            verb, arg = parse_command(line)
            if verb == "quit":
                break
            reply = apply_command(sim, verb, arg)
        except (ValueError, OSError) as error:
            reply = "error: %s" % error
        out.write(reply + "\n")
        out.flush()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-vehicle-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--pin-file", default="run/pins.json", help="pin file to write (default run/pins.json)")
    parser.add_argument("--script", default=None,
                        help='commands separated by ";", e.g. "plug; wait 2; charge; wait 10; unplug"')
    parser.add_argument("--advertise", type=float, default=16.0, metavar="AMPS",
                        help="current the EVSE offers at start (default 16)")
    parser.add_argument("--phases", type=int, default=3, choices=(1, 3))
    parser.add_argument("--contactor-delay-ms", type=int, default=50, metavar="MS",
                        help="feedback follows the contactor command after this long (default 50)")
    args = parser.parse_args(argv)
    commands = None
    if args.script is not None:
        try:
            commands = parse_script(args.script)
        except ValueError as error:
            sys.stderr.write("evse-vehicle-sim: %s\n" % error)
            return 2
    try:
        sim = VehicleSim(args.pin_file, args.advertise, args.phases, args.contactor_delay_ms / 1000)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        sys.stderr.write("evse-vehicle-sim: cannot write pin file %s: %s\n" % (args.pin_file, error))
        return 1
    print("vehicle sim on %s: %s" % (args.pin_file, sim.describe()), flush=True)
    try:
        if commands is not None:
            return run_script(sim, commands)
        return run_interactive(sim, sys.stdin)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
