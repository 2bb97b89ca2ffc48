"""Shared fixtures: a real mosquitto, the pty meter simulator, and the agent as a process.

The suite mirrors the code: ``core/`` (the portable core in process: the fast lane, marked
``core``, ``make test-fast``), ``ports/``, ``system/`` (processes, brokers, ptys),
``collector/`` and ``mpy/`` (MicroPython)."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from evse_tools.testkit.broker import Mosquitto
from evse_tools.sim.meter_sim import MeterSimulator
from evse_tools.testkit.subscriber import Collector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM_BOARD = os.path.join(ROOT, "boards", "sim.json")

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

CORE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core")


def pytest_collection_modifyitems(items):
    """Mark the tests under ``core/`` as the fast lane (``pytest -m core``)."""
    for item in items:
        if str(item.path).startswith(CORE_DIR + os.sep):
            item.add_marker(pytest.mark.core)


def wait_for(predicate, timeout_s, interval_s=0.05):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout_s`` passes
    (then its last value)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


@pytest.fixture
def broker():
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture
def meter_sim():
    """Factory: ``meter_sim(model="sdm630", **options)`` -> a started MeterSimulator."""
    started = []

    def make(model="sdm630", **options):
        sim = MeterSimulator(model, **options)
        sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def collector(broker):
    """A subscriber on ``evse/#`` at the test's broker."""
    sub = Collector(broker.host, broker.port, "evse/#")
    yield sub
    sub.close()


class AgentProcess:
    """``evse-agent`` run as a real process; its stdout/stderr lines are collected."""

    def __init__(self, args):
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "evse_agent.ports.cpython.main"] + args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.stdout = []
        self.stderr = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def alive(self):
        return self.process.poll() is None

    def stop(self, timeout_s=60):
        """SIGTERM (clean shutdown) and wait; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout_s)
        for thread in self._threads:
            thread.join(5)
        return code

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def log(self):
        return "\n".join(self.stderr)

    def wait_for_log(self, text, timeout_s=60):
        """True once ``text`` appears in the agent's log (lines arrive through a pipe)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.05)
        return False


@pytest.fixture
def station_dir(tmp_path):
    """A private directory for one test's station: state, key and the sim pin file."""
    return tmp_path / "station"


def station_args(station_dir):
    """Board overrides that keep a test's durable state out of the shared run/ directory."""
    return ["--set", "session.state_dir=%s" % (station_dir / "state"),
            "--set", "signing.key_file=%s" % (station_dir / "station-key.pem"),
            "--set", "io.sim_file=%s" % (station_dir / "pins.json"),
            "--set", "journal.dir=%s" % (station_dir / "journal")]


@pytest.fixture
def agent_process(station_dir):
    """Factory: ``agent_process(broker, device, "--set", "x=y", board=SIM_BOARD)``.

    The agent's state directory, key file and pin file live in ``station_dir``.
    """
    running = []

    def start(broker, device, *extra, board=SIM_BOARD):
        args = ["--board", board, "--set", "meter.port=" + device,
                "--set", "mqtt.port=%d" % broker.port] + station_args(station_dir) + list(extra)
        agent = AgentProcess(args)
        running.append(agent)
        return agent

    yield start
    for agent in running:
        if agent.alive():
            agent.stop()


@contextlib.contextmanager
def mounted_tmpfs(path, size):
    """A real small file system of ``size`` (e.g. "128k") mounted at ``path`` for a disk-full
    test (root only: the test is skipped, saying why, where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.strip())
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
