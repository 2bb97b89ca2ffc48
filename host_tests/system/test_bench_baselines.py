"""The bench's own baselines: the map's minimal reads, RTU framing, and the baseline programs
(naive reader, hand-written loop) run briefly against the simulated meter through the
frame-counting relay, checked by their counts (never their timings)."""

import ast
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings, strategies as st

from evse_agent.meter_models import MODELS, SDM630
from evse_agent.registers import FLOAT32, FN_READ_HOLDING, FN_READ_INPUT, UINT16, Register, plan_requests
from evse_tools.bench import wire as bench_wire
from evse_tools.bench.bridge import BRIDGE_VENV, bridge_config
from evse_tools.bench.latency import Arrivals

from conftest import ROOT, wait_for


@st.composite
def register_maps(draw, most=8):
    """A meter map: non-overlapping registers of one or two tables, a read limit and
    answered ranges that may or may not bridge the gaps."""
    registers, address = [], draw(st.integers(0, 40))
    for index in range(draw(st.integers(1, most))):
        dtype = draw(st.sampled_from((FLOAT32, UINT16)))
        function = draw(st.sampled_from((FN_READ_INPUT, FN_READ_HOLDING)))
        registers.append(Register("r%d" % index, function, address, dtype))
        address += registers[-1].count + draw(st.integers(0, 12))
    answered = tuple((fn, lo, lo + span) for fn, lo, span in draw(st.lists(
        st.tuples(st.sampled_from((FN_READ_INPUT, FN_READ_HOLDING)), st.integers(0, 120), st.integers(0, 120)),
        max_size=3)))
    return types.SimpleNamespace(registers=registers, answered=answered,
                                 max_registers=draw(st.integers(2, 125)))


def _valid(model, function, address, count):
    """Within the read limit, and every address a register's or in an answered range."""
    if count > model.max_registers:
        return False
    for word in range(address, address + count):
        if not any(reg.function == function and reg.address <= word < reg.end for reg in model.registers) \
                and not any(fn == function and lo <= word <= hi for fn, lo, hi in model.answered):
            return False
    return True


def _brute_force_bytes(model):
    """Cheapest cover by trying every split of the address-ordered registers."""
    registers = bench_wire.measured(model)
    best = None
    for cuts in itertools.product((False, True), repeat=len(registers) - 1):
        groups, group = [], [registers[0]]
        for cut, reg in zip(cuts, registers[1:]):
            if cut:
                groups.append(group)
                group = [reg]
            else:
                group.append(reg)
        groups.append(group)
        reads = [(g[0].function, g[0].address, g[-1].end - g[0].address) for g in groups]
        if all(len({reg.function for reg in g}) == 1 for g in groups) and all(_valid(model, *r) for r in reads):
            cost = bench_wire.reads_bytes(reads)
            best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=200, deadline=None)
@given(register_maps())
def test_minimal_reads_cover_the_map_within_its_limits_and_no_split_is_cheaper(model):
    reads = bench_wire.minimal_reads(model)
    for reg in model.registers:
        assert any(fn == reg.function and address <= reg.address and reg.end <= address + count
                   for fn, address, count in reads), (reg.name, reads)
    assert all(_valid(model, *read) for read in reads), reads
    assert bench_wire.reads_bytes(reads) == _brute_force_bytes(model)
    runs = bench_wire.contiguous_runs(model)
    assert bench_wire.reads_bytes(reads) <= bench_wire.reads_bytes(runs)
    plan = plan_requests(bench_wire.measured(model), model.max_registers, model.answered)
    assert bench_wire.reads_bytes(reads) <= sum(bench_wire.read_bytes(req.count) for req in plan)


def test_read_request_frame_matches_the_modbus_specification_example():
    # Modbus over serial line V1.02, CRC example: 01 04 00 00 00 02 -> CRC 71 CB
    assert bench_wire.read_request(1, 4, 0, 2) == bytes.fromhex("010400000002 71CB".replace(" ", ""))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_naive_reader_sends_one_request_per_value_through_the_counting_relay(meter_sim, model_name):
    model = MODELS[model_name]
    relay = bench_wire.CountingRelay(meter_sim(model_name, baudrate=38400).device)
    try:
        run = subprocess.run([sys.executable, "-m", "evse_tools.bench.naive_reader", "--port", relay.client_device,
                              "--baudrate", "38400", "--model", model_name, "--polls", "2"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-800:]
        assert json.loads(run.stdout) == {"polls": 2, "failures": 0,
                                          "reads_per_poll": len(bench_wire.measured(model))}
        values = bench_wire.measured(model)
        expected = (2 * len(values), 2 * len(values), 2 * sum(bench_wire.read_bytes(reg.count) for reg in values))
        assert wait_for(lambda: relay.counts() == expected, 10), relay.counts()
    finally:
        relay.close()


def test_handwritten_loop_reads_each_run_once_a_poll_and_publishes_every_poll(meter_sim, broker):
    relay = bench_wire.CountingRelay(meter_sim("sdm630", baudrate=38400).device)
    sink = Arrivals(broker, "meter/sdm630/telemetry", 0, client_id="test-handwritten")
    try:
        run = subprocess.run([sys.executable, "-m", "evse_tools.bench.handwritten_loop", "--port", relay.client_device,
                              "--baudrate", "38400", "--broker-port", str(broker.port), "--interval", "0.2",
                              "--duration", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-800:]
        report = json.loads(run.stdout)
        assert report["failures"] == 0 and report["polls"] >= 3
        runs = bench_wire.contiguous_runs(SDM630)
        requests, responses, line_bytes = relay.counts()
        assert (requests, responses) == (len(runs) * report["polls"], len(runs) * report["polls"])
        assert line_bytes == report["polls"] * bench_wire.reads_bytes(runs)
        first = runs[0][:2]
        assert relay.reads_of(*first) == report["polls"]
        assert wait_for(lambda: len(sink.messages) == report["polls"], 10)
        doc = json.loads(sink.messages[-1][3])
        assert 200 < doc["voltage_l1"] < 260 and doc["frequency"] > 45
    finally:
        sink.close()
        relay.close()


def test_bridge_configuration_names_every_value_of_the_map_once():
    rows = bridge_config(SDM630).splitlines()
    refs = [row.split(",")[1] for row in rows if row.startswith("ref,")]
    polls = [row.split(",") for row in rows if row.startswith("poll,")]
    assert sorted(refs) == sorted(reg.name for reg in bench_wire.measured(SDM630))
    assert [(int(p[3]), int(p[4])) for p in polls] == [(r[1], r[2]) for r in bench_wire.contiguous_runs(SDM630)]


def test_bridge_reads_the_simulated_meter_through_the_relay_when_installed(meter_sim, broker, tmp_path):
    python = os.path.join(BRIDGE_VENV, "bin", "python")
    if not os.path.exists(python) or subprocess.run([python, "-c", "import modbus2mqtt"]).returncode != 0:
        pytest.skip("modbus2mqtt is not installed in %s (make bench installs it)" % BRIDGE_VENV)
    relay = bench_wire.CountingRelay(meter_sim("sdm630", baudrate=38400).device)
    sink = Arrivals(broker, "modbus/sdm630/state/#", 0, client_id="test-bridge")
    config = tmp_path / "bridge.csv"
    config.write_text(bridge_config(SDM630, rate_s=0.2))
    bridge = subprocess.Popen([python, "-m", "modbus2mqtt", "--rtu", relay.client_device, "--rtu-baud", "38400",
                               "--rtu-parity", "none", "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
                               "--config", str(config), "--always-publish", "--verbosity", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(tmp_path))
    try:
        names = {reg.name for reg in bench_wire.measured(SDM630)}
        assert wait_for(lambda: {m[0].rsplit("/", 1)[1] for m in list(sink.messages)} >= names, 30)
        voltage = [float(m[3]) for m in list(sink.messages) if m[0].endswith("/voltage_l1")]
        assert 200 < voltage[-1] < 260
        requests, responses, line_bytes = relay.counts()
        assert requests >= len(bench_wire.contiguous_runs(SDM630)) and responses >= requests - 1
    finally:
        bridge.terminate()
        bridge.wait(10)
        bridge.stderr.close()
        sink.close()
        relay.close()


def tools_nodes():
    """(file relative to the repository, syntax node) of every node of every module in ``tools/``."""
    for directory, _, files in os.walk(os.path.join(ROOT, "tools")):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as handle:
                    tree = ast.parse(handle.read(), path)
                for node in ast.walk(tree):
                    yield os.path.relpath(path, ROOT), node


def test_every_import_of_the_project_inside_tools_resolves():
    """Imports made inside functions run only when a bench section or a command reaches
    them: each ``from evse_agent/evse_tools ... import name`` in ``tools/`` must name a module
    and a name that exist, so a move cannot leave one behind until ``make bench`` runs."""
    broken = []
    for path, node in tools_nodes():
        if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("evse_"):
            continue
        try:
            module = importlib.import_module(node.module)
        except ModuleNotFoundError as error:  # MicroPython-only code (machine, ...): the module must exist
            if (error.name or "").startswith("evse_") or importlib.util.find_spec(node.module) is None:
                broken.append("%s:%d: %s (%s)" % (path, node.lineno, node.module, error))
            continue
        for alias in node.names:
            if not hasattr(module, alias.name) and importlib.util.find_spec(
                    "%s.%s" % (node.module, alias.name)) is None:
                broken.append("%s:%d: from %s import %s" % (path, node.lineno, node.module, alias.name))
    assert broken == []


def test_bench_signing_baseline_signs_with_the_micropython_ports_signer():
    from evse_tools.bench.main import _cpython_sign_ms
    figures = _cpython_sign_ms(count=2)
    assert figures["p256_sign_ms"] > 0 and figures["cryptography_sign_ms"] > 0


def test_every_repository_path_named_in_tools_exists():
    """``os.path.join(ROOT, "dir", "file")`` with literal parts, anywhere in ``tools/``: the
    file or directory is there (a move that left a path behind fails here, not in a bench
    section that runs once a release)."""
    missing = []
    for path, node in tools_nodes():
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "os.path.join" and node.args
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "ROOT"):
            continue
        parts = node.args[1:]
        if parts and all(isinstance(part, ast.Constant) and isinstance(part.value, str) for part in parts):
            named = os.path.join(ROOT, *(part.value for part in parts))
            made_at_run_time = named.endswith(("results.json", ".venv-bridge")) or \
                os.path.relpath(named, ROOT).startswith("run" + os.sep)
            if not os.path.exists(named) and not made_at_run_time:
                missing.append("%s:%d: %s" % (path, node.lineno, os.path.relpath(named, ROOT)))
    assert missing == []


_SPINNER = """
import sys, threading, time
def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
done, release = threading.Event(), threading.Event()
def work():
    spin(0.15)
    done.set()
    release.wait()
worker = threading.Thread(target=work)
worker.start()
spin(0.15)
done.wait()
print("spun", flush=True)
sys.stdin.read()  # both threads alive until the test has read the counts
release.set()
worker.join()
"""


def test_run_time_counts_every_thread_as_the_kernel_accounts_the_process():
    """``run_time_s`` (scheduler nanoseconds of each thread) agrees with the process's own
    user + system time as ``wait4`` reports it at exit (an independent interface), and
    ``machine_busy_s`` has seen at least that much work done."""
    from evse_tools.bench.cpu import machine_busy_s, run_time_s
    busy_before = machine_busy_s()
    child = subprocess.Popen([sys.executable, "-c", _SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"spun\n"
    measured = run_time_s(child.pid)
    busy = machine_busy_s() - busy_before
    child.stdin.close()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    accounted = usage.ru_utime + usage.ru_stime
    assert measured >= 0.30  # both threads' spins, not the main thread's alone
    assert abs(measured - accounted) <= 0.02  # the exit itself runs a little more
    assert busy >= measured - 0.05  # /proc/stat counts in ticks
