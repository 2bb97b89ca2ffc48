"""Deploy the agent to a MicroPython board over USB with mpremote (``pip install '.[deploy]'``).

    python -m evse_tools.cli.deploy --port /dev/ttyUSB0 --board boards/esp32-sdm630.json

First the board file is loaded as the agent will load it (``config.load_board`` with the
``micropython`` section): a board the agent would refuse is not deployed (exit status 2,
the message names the field). Then the steps (each one mpremote command; ``--dry-run``
prints them instead):

1. compile the core and the MicroPython port to .mpy (mpy-cross, ``tools/cli/mpy_build.py``) and
   pack them into a ROMFS image (``mpremote romfs build``);
2. take the board (mpremote's raw-REPL entry stops a running agent: see below), make
   ``/lib`` and ``/data``, remove ``/main.py`` (a reset in the middle of the deployment comes
   back to the REPL, not to the old agent) and set the watchdog the agent started, which
   nothing feeds any more, to an hour (on the ESP32 ``machine.WDT`` can be reconfigured, not
   stopped; the final reset ends it);
3. put the code in flash: ``mpremote romfs deploy`` where the board has a ROMFS partition
   (MicroPython 1.25 or later; the code runs in place from flash, mounted at ``/rom``),
   else copy the .mpy files to ``:/lib/evse_agent`` (``--layout`` chooses; ``auto`` asks the
   board); nothing with ``--frozen`` (the firmware has the agent frozen in);
4. install the micropython-lib dependency ``ntptime`` with ``mpremote mip`` (the MQTT client is
   the port's own);
5. copy the board file to ``:/board.json`` and write a two-line ``:/main.py`` that starts the agent;
6. reset the board and show its console (leave with Ctrl-]).

Taking a running board back: with ``console.port`` "repl" the agent owns the REPL and
ignores Ctrl-C; it recognises mpremote's raw-REPL entry (CR Ctrl-C, then at once CR Ctrl-A),
stops and hands the REPL back, so any ``mpremote`` command reaches the board at its first
try (``ports/micropython/console.py``). The board needs a MicroPython firmware of the same
.mpy version as mpy-cross (v6.3: 1.22 or later) with littlefs (the ESP32 default). The
journal, state and key live under ``/data``.
"""

import argparse
import os
import subprocess
import sys
import tempfile

from evse_agent.config import ConfigError, load_board

from .mpy_build import build_romfs, compile_core

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN_PY = "import evse_agent.ports.micropython.main as agent\nagent.main()\n"
DEPENDENCIES = ("ntptime",)
# Make /lib and /data; remove /main.py; give a running watchdog an hour (the final reset ends it).
PREPARE = ("import os\nfor d in ('/lib', '/data'):\n try:\n  os.mkdir(d)\n except OSError:\n  pass\n"
           "try:\n os.remove('/main.py')\nexcept OSError:\n pass\n"
           "try:\n import machine\n machine.WDT(timeout=3600000)\nexcept (ImportError, AttributeError, ValueError):\n pass")
# Prints True when the board has a ROMFS partition to deploy to.
HAS_ROMFS = "import vfs\nprint(hasattr(vfs, 'rom_ioctl') and vfs.rom_ioctl(1) > 0)"


def plan(port, board, build_dir, frozen=False, tail=True, romfs=None):
    """The mpremote commands of a deployment, in order (lists of arguments).

    ``romfs``: the ROMFS image to deploy to the board's partition; None copies files."""
    base = ["mpremote", "connect", port]
    commands = [base + ["exec", PREPARE]]
    if frozen:
        pass
    elif romfs is not None:
        commands.append(base + ["romfs", "deploy", romfs])
    else:
        commands.append(base + ["fs", "cp", "-r", os.path.join(build_dir, "evse_agent"), ":/lib/"])
    commands.append(base + ["mip", "install"] + list(DEPENDENCIES))
    commands.append(base + ["fs", "cp", board, ":/board.json"])
    commands.append(base + ["exec", "open('/main.py', 'w').write(%r)" % MAIN_PY])
    commands.append(base + ["reset"])
    if tail:
        commands.append(base + ["repl"])
    return commands


def board_has_romfs(port):
    """Ask the board (mpremote) whether it has a ROMFS partition."""
    result = subprocess.run(["mpremote", "connect", port, "exec", HAS_ROMFS], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("cannot reach the board on %s: %s" % (port, (result.stderr or result.stdout).strip()))
    return result.stdout.strip().endswith("True")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="serial device of the board, e.g. /dev/ttyUSB0")
    parser.add_argument("--board", required=True, help="board file, e.g. boards/esp32-sdm630.json")
    parser.add_argument("--layout", choices=("auto", "romfs", "files"), default="auto",
                        help="code in the ROMFS partition, or as files in /lib (auto: romfs if the board has one)")
    parser.add_argument("--frozen", action="store_true",
                        help="the firmware has the agent frozen in (firmware/manifest.py): copy no code")
    parser.add_argument("--no-tail", action="store_true", help="do not open the console after the reset")
    parser.add_argument("--dry-run", action="store_true", help="print the mpremote commands, run nothing")
    args = parser.parse_args(argv)
    try:  # the board's own loader: a board the agent would refuse is not deployed
        load_board(args.board, "micropython")
    except ConfigError as error:
        sys.stderr.write("deploy: %s\n" % error)
        return 2
    build_dir = tempfile.mkdtemp(prefix="evse-mpy-")
    results = compile_core(build_dir)
    image = build_dir + ".romfs"
    size = build_romfs(build_dir, image)
    total = sum(size for _, size in results)
    sys.stderr.write("compiled %d files, %d bytes of .mpy; ROMFS image %d bytes\n" % (len(results), total, size))
    layout = args.layout
    if layout == "auto" and not args.frozen:
        if args.dry_run:
            print("# auto: romfs if this prints True, else --layout files")
            print(" ".join(_quote(part) for part in ["mpremote", "connect", args.port, "exec", HAS_ROMFS]))
            layout = "romfs"
        else:
            try:
                layout = "romfs" if board_has_romfs(args.port) else "files"
            except RuntimeError as error:
                sys.stderr.write("deploy: %s\n" % error)
                return 1
            sys.stderr.write("deploy: code goes %s\n" % ("into the ROMFS partition" if layout == "romfs"
                                                         else "to /lib as files (no ROMFS partition)"))
    commands = plan(args.port, args.board, build_dir, args.frozen, not args.no_tail,
                    romfs=image if layout == "romfs" else None)
    for command in commands:
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
