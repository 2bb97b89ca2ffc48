"""The portable core on MicroPython: the same scenarios under the official MicroPython
(WebAssembly port, run by Node: tools/mpy_run.mjs) and under CPython, line for line.

Also: mpy-cross compiles every core file, the freeze manifest and the mip package list the
core, no module outside ports/ imports a platform module, the P-256 signer meets RFC 6979's
vectors and verifies both ways with ``cryptography``, and the core scenario's data fits the
64 KiB heap budget.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evse_agent.ocmf import parse_document
from evse_agent.ports import p256
from evse_tools.mpy_build import compile_core, core_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = os.path.join(ROOT, "host_tests", "mpy_scenarios")
RUNNER = os.path.join(ROOT, "tools", "mpy_run.mjs")
PACKAGE = os.path.join(ROOT, "tools", "mpy", "node_modules", "@micropython",
                       "micropython-webassembly-pyscript", "micropython.mjs")
NAMES = ("modbus", "registers", "ocmf", "journal", "session", "console", "p256", "ha_discovery",
         "identification")
HEAP_BUDGET = 64 * 1024
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
                    "`npm ci --prefix tools/mpy`")
    return node


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The core compiled with mpy-cross: what the MicroPython scenarios import."""
    out = tmp_path_factory.mktemp("mpy")
    return str(out), compile_core(str(out))


@pytest.fixture(scope="module")
def runs(compiled, tmp_path_factory):
    """Each scenario run once under MicroPython (the .mpy core) and once under CPython."""
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
        results[name] = (micro, cpython, json.loads(stats.read_text()) if stats.exists() else None)
    return results


def _results(stdout):
    return [line for line in stdout.splitlines() if not line.startswith("timing ")]


@pytest.mark.parametrize("name", NAMES)
def test_scenario_runs_the_same_under_micropython(runs, name):
    micro, cpython, stats = runs[name]
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
    assert len(documents) == 5
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
    assert ["umqtt.simple", "latest"] in package["deps"] and ["ntptime", "latest"] in package["deps"]


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
    for module in _imports(os.path.join(core, "ports", "p256.py")):
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
    from evse_agent.config import ConfigError
    from evse_agent.ports.micropython.main import load_board, split_board
    config, port = load_board(os.path.join(ROOT, "boards", "esp32-sdm630.json"))
    assert config["journal"]["segment_bytes"] == 8192
    assert port["tx_pin"] == 17 and port["de_pin"] == 4 and port["watchdog_s"] == 30
    with pytest.raises(ConfigError, match="micropython.de_pinn: unknown field"):
        split_board({"micropython": {"tx_pin": 1, "rx_pin": 2, "de_pinn": 3}})
    with pytest.raises(ConfigError, match="micropython.rx_pin: missing"):
        split_board({"micropython": {"tx_pin": 1}})


def test_deploy_plan_uses_mpremote_for_every_step(tmp_path):
    from evse_tools.deploy import plan
    board = os.path.join(ROOT, "boards", "esp32-sdm630.json")
    commands = plan("/dev/ttyUSB0", board, str(tmp_path))
    assert all(c[:3] == ["mpremote", "connect", "/dev/ttyUSB0"] for c in commands)
    steps = [c[3] for c in commands]
    assert steps == ["exec", "fs", "mip", "fs", "exec", "reset", "repl"]
    assert commands[1][-2:] == [os.path.join(str(tmp_path), "evse_agent"), ":/lib/"]
    assert commands[2][4:] == ["install", "umqtt.simple", "ntptime"]
    assert commands[3][-2:] == [board, ":/board.json"]
    frozen = plan("/dev/ttyUSB0", board, str(tmp_path), frozen=True, tail=False)
    assert [c[3] for c in frozen] == ["exec", "mip", "fs", "exec", "reset"]
