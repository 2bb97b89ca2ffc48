"""The MicroPython port's agent as a process on the host board (the unix port).

    agent = MicroAgent(board_path, uart_device, pin_file, heap="256wK")

runs ``micropython -X heapsize=<heap> tools/testkit/unix_board/run_agent.py <board>`` — the port's
unchanged ``ports/micropython/main.py`` — with ``tools/testkit/unix_board`` (``machine``, ``network``,
``ntptime`` of the host board) and the code (``firmware/`` sources by default, or a
directory of .mpy files) on ``MICROPYPATH``. Its output is streamed into ``lines`` by a
thread. The watchdog is enforced here: once the agent has created its ``machine.WDT``, a
feed later than the timeout kills the process (SIGKILL, ``watchdog_expired`` set), as the
hardware would reset the board.

``write_board(path, settings)`` writes a board file: ``boards/mpy-unix-sim.json`` with
dotted settings replaced (``{"meter.poll_interval_s": 0.2}``).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from evse_agent.config import ConfigError, load_board

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
BOARD_DIR = os.path.join(ROOT, "tools", "testkit", "unix_board")
CODE_DIR = os.path.join(ROOT, "firmware")
TEMPLATE = os.path.join(ROOT, "boards", "mpy-unix-sim.json")


def micropython_command():
    """The unix port's command: the one installed beside this Python, else on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "micropython")
    return [local] if os.path.exists(local) else ["micropython"]


def write_board(path, settings=None, template=TEMPLATE):
    """Write ``template`` with ``settings`` ({"section.field": value}) applied to ``path``."""
    with open(template) as handle:
        doc = json.load(handle)
    for dotted, value in (settings or {}).items():
        section = doc
        parts = dotted.split(".")
        for part in parts[:-1]:
            section = section.setdefault(part, {})
        section[parts[-1]] = value
    with open(path, "w") as handle:
        json.dump(doc, handle, indent=1)
    return path


class MicroAgent:
    """One run of the MicroPython agent; ``kill()`` is a power cut, ``lines`` its output."""

    def __init__(self, board, uart_device, pin_file, heap=None, code_dir=CODE_DIR, cwd=None, extra_env=None):
        try:
            uart_id = load_board(board, "micropython")["micropython"]["uart_id"]
        except ConfigError:
            uart_id = 2  # the default; the agent itself refuses the board and says why
        handle, self.wdt_file = tempfile.mkstemp(prefix="evse-wdt-")  # empty until the first feed
        os.close(handle)
        env = dict(os.environ)
        env.update({
            "MICROPYPATH": os.pathsep.join([BOARD_DIR, code_dir, ".frozen"]),
            "EVSE_UART%d" % uart_id: uart_device,
            "EVSE_PIN_FILE": pin_file,
            "EVSE_WDT_FILE": self.wdt_file,
        })
        env.update(extra_env or {})
        command = micropython_command()
        if heap is not None:
            command += ["-X", "heapsize=%s" % heap]
        command += [os.path.join(BOARD_DIR, "run_agent.py"), os.path.abspath(board)]
        self.lines = []
        self.watchdog_expired = False
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=cwd or ROOT, env=env, errors="replace")
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    def _pump(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def _watch(self):
        while self.process.poll() is None:
            time.sleep(0.1)
            try:
                with open(self.wdt_file) as handle:
                    timeout_ms = int(handle.read() or 0)
                fed = os.stat(self.wdt_file).st_mtime
            except (OSError, ValueError):
                continue
            if timeout_ms and time.time() - fed > timeout_ms / 1000:
                self.watchdog_expired = True
                self.lines.append("host board: watchdog expired (no feed for %d ms): reset" % timeout_ms)
                self.kill()

    def alive(self):
        return self.process.poll() is None

    def kill(self):
        """SIGKILL: nothing is flushed or closed, as when power is cut."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._reader.join(5)

    def log(self):
        return "\n".join(self.lines)

    def wait_for_log(self, text, timeout_s=10):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self.kill()
        try:
            os.remove(self.wdt_file)
        except OSError:
            pass
