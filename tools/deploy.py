"""Deploy the agent to a MicroPython board over USB with mpremote (``pip install '.[deploy]'``).

    python -m evse_tools.deploy --port /dev/ttyUSB0 --board boards/esp32-sdm630.json

Steps (each one mpremote command; ``--dry-run`` prints them instead):

1. compile the core and the MicroPython port to .mpy (mpy-cross, ``tools/mpy_build.py``);
2. copy them to ``:/lib/evse_agent`` (skipped with ``--frozen``: the firmware has them);
3. install the micropython-lib dependencies (``umqtt.simple``, ``ntptime``) with ``mpremote mip``;
4. copy the board file to ``:/board.json`` and a two-line ``:/main.py`` that starts the agent;
5. reset the board and show its console (leave with Ctrl-]).

The board needs a MicroPython firmware of the same .mpy version as mpy-cross (v6.3: 1.22
or later) with littlefs (the ESP32 default). The journal, state and key live under ``/data``.
"""

import argparse
import os
import subprocess
import sys
import tempfile

from .mpy_build import compile_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_PY = "import evse_agent.ports.micropython.main as agent\nagent.main()\n"
DEPENDENCIES = ("umqtt.simple", "ntptime")


def plan(port, board, build_dir, frozen=False, tail=True):
    """The mpremote commands of a deployment, in order (lists of arguments)."""
    base = ["mpremote", "connect", port]
    commands = []
    mkdir = "import os\nfor d in ('/lib', '/data'):\n try:\n  os.mkdir(d)\n except OSError:\n  pass"
    commands.append(base + ["exec", mkdir])
    if not frozen:
        commands.append(base + ["fs", "cp", "-r", os.path.join(build_dir, "evse_agent"), ":/lib/"])
    commands.append(base + ["mip", "install"] + list(DEPENDENCIES))
    commands.append(base + ["fs", "cp", board, ":/board.json"])
    commands.append(base + ["exec", "open('/main.py', 'w').write(%r)" % MAIN_PY])
    commands.append(base + ["reset"])
    if tail:
        commands.append(base + ["repl"])
    return commands


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="serial device of the board, e.g. /dev/ttyUSB0")
    parser.add_argument("--board", required=True, help="board file, e.g. boards/esp32-sdm630.json")
    parser.add_argument("--frozen", action="store_true",
                        help="the firmware has the agent frozen in (firmware/manifest.py): copy no code")
    parser.add_argument("--no-tail", action="store_true", help="do not open the console after the reset")
    parser.add_argument("--dry-run", action="store_true", help="print the mpremote commands, run nothing")
    args = parser.parse_args(argv)
    build_dir = tempfile.mkdtemp(prefix="evse-mpy-")
    results = compile_core(build_dir)
    total = sum(size for _, size in results)
    sys.stderr.write("compiled %d files, %d bytes of .mpy\n" % (len(results), total))
    for command in plan(args.port, args.board, build_dir, args.frozen, not args.no_tail):
        if args.dry_run:
            print(" ".join(_quote(part) for part in command))
            continue
        if subprocess.run(command).returncode != 0:
            sys.stderr.write("deploy: failed: %s\n" % " ".join(command[:6]))
            return 1
    return 0


def _quote(part):
    return part if part and all(c.isalnum() or c in "/:._-+=" for c in part) else repr(part)


if __name__ == "__main__":
    sys.exit(main())
