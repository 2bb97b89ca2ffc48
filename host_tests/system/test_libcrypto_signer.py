"""The Linux port's signer on OpenSSL's libcrypto, checked by code that is not the signer.

Keys made by ``cryptography`` load and sign here; keys made here load in ``cryptography``;
signatures verify with ``cryptography``, the pure-Python ``ecdsa`` package and pyocmf; bad
key files are refused naming the file; signing frees what it allocates; and an agent that
has signed a session never loaded the ``cryptography`` package.
"""

import json
import os
import subprocess
import sys
import warnings

import ecdsa
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings, strategies as st
from pyocmf import OCMF

from conftest import ROOT
from evse_agent.ocmf import OcmfReading, build_payload, sign_document
from evse_agent.ports.cpython import libcrypto
from evse_agent.ports.cpython.signer import FileKeySigner, KeyFileError
from evse_tools.sim.vehicle_sim import VehicleSim

MESSAGES = settings(max_examples=200, deadline=None)


def write_key(path, pem):
    path.write_bytes(pem)
    path.chmod(0o600)
    return str(path)


def cryptography_verifies(der_public, data, signature):
    key = serialization.load_der_public_key(der_public)
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def ecdsa_verifies(der_public, data, signature):
    key = ecdsa.VerifyingKey.from_der(der_public)
    try:
        return key.verify(signature, data, hashfunc=__import__("hashlib").sha256,
                          sigdecode=ecdsa.util.sigdecode_der)
    except ecdsa.BadSignatureError:
        return False


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return FileKeySigner(str(tmp_path_factory.mktemp("keys") / "station.pem"))


@pytest.mark.parametrize("private_format", [serialization.PrivateFormat.PKCS8,
                                            serialization.PrivateFormat.TraditionalOpenSSL])
def test_a_key_made_by_cryptography_loads_and_signs(tmp_path, private_format):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, private_format, serialization.NoEncryption())
    signer = FileKeySigner(write_key(tmp_path / "key.pem", pem))
    assert not signer.created
    expected = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signer.public_key_der() == expected
    assert signer.public_key_pem().encode() == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = signer.sign(b"meter reading")
    key.public_key().verify(signature, b"meter reading", ec.ECDSA(hashes.SHA256()))


def test_a_key_made_here_loads_in_cryptography_and_ecdsa(tmp_path):
    path = tmp_path / "new.pem"
    signer = FileKeySigner(str(path))
    assert signer.created
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS8
    key = serialization.load_pem_private_key(text, password=None)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) \
        == signer.public_key_der()
    assert ecdsa.SigningKey.from_pem(text.decode()).get_verifying_key().to_der() == signer.public_key_der()


@MESSAGES
@given(data=st.binary(max_size=2048))
def test_signatures_verify_elsewhere_and_not_for_other_data(signer, data):
    signature = signer.sign(data)
    der = signer.public_key_der()
    assert cryptography_verifies(der, data, signature)
    assert ecdsa_verifies(der, data, signature)
    assert signer.verify(data, signature)
    other = data + b"\x00"
    assert not signer.verify(other, signature)
    assert not cryptography_verifies(der, other, signature)
    assert not signer.verify(data, signature[:-1])  # malformed DER is a "no", not an error
    assert not signer.verify(data, b"")


@MESSAGES
@given(pagination=st.integers(1, 10 ** 6),
       meter_serial=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e,
                                          blacklist_characters='|"\\'), min_size=1, max_size=20),
       value=st.integers(0, 10 ** 9))
def test_ocmf_documents_verify_with_pyocmf(signer, pagination, meter_serial, value):
    payload = build_payload("evse-agent", "EVSE-1", "0.1.0", "T%d" % pagination, "Eastron", "SDM630",
                            meter_serial, [OcmfReading(1795589401.123, True, "B", value)])
    document = sign_document(payload, signer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert OCMF.from_string(document).verify_signature(signer.public_key_hex())
    payload_text, signature = document[len("OCMF|"):].rsplit("|", 1)
    assert ecdsa_verifies(signer.public_key_der(), payload_text.encode(),
                          bytes.fromhex(json.loads(signature)["SD"]))


@pytest.mark.parametrize("make, message", [
    (lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")), "not an unencrypted PEM private key"),
    (lambda: rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), "is RSA private key, OCMF signing here needs a P-256"),
    (lambda: ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()), "is secp384r1, OCMF signing here needs a P-256"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     "not an unencrypted PEM private key"),
    (lambda: b"", "not an unencrypted PEM private key"),
])
def test_unusable_key_files_are_refused_naming_the_file(tmp_path, make, message):
    content = make()
    path = write_key(tmp_path / "bad.pem", content)
    with pytest.raises(KeyFileError, match=message) as raised:
        FileKeySigner(path)
    assert path in str(raised.value)
    assert (tmp_path / "bad.pem").read_bytes() == content  # never overwritten
    assert os.listdir(tmp_path) == ["bad.pem"]


def test_openssl_errors_carry_openssl_text():
    with pytest.raises(libcrypto.OpenSSLError, match="PEM_read_bio_PrivateKey failed: error:"):
        libcrypto.Key.from_pem(b"garbage")


LEAK_CHECK = r"""
import sys
from evse_agent.ports.cpython.signer import FileKeySigner

def rss_kb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 // 1024

signer = FileKeySigner(sys.argv[1])
data = b"x" * 300
for _ in range(2000):  # allocator and caches settle
    signer.verify(data, signer.sign(data)); signer.public_key_der(); signer.public_key_pem()
before = rss_kb()
for _ in range(10000):
    signer.verify(data, signer.sign(data)); signer.public_key_der(); signer.public_key_pem()
print(rss_kb() - before)
"""


def test_ten_thousand_signatures_do_not_grow_memory(tmp_path):
    """A leaked EVP_MD_CTX, BIO or buffer per call (hundreds of bytes each) would add
    megabytes over 10,000 calls; in a fresh interpreter the resident set stays put."""
    result = subprocess.run([sys.executable, "-c", LEAK_CHECK, str(tmp_path / "key.pem")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    grown_kb = int(result.stdout)
    assert grown_kb < 512, "resident memory grew %d kB over 10,000 sign+verify+export" % grown_kb


def test_an_agent_that_signed_a_session_never_loaded_cryptography(broker, collector, meter_sim,
                                                                  agent_process, station_dir):
    station_dir.mkdir(parents=True, exist_ok=True)
    pin_file = str(station_dir / "pins.json")
    vehicle = VehicleSim(pin_file, advertised_a=16.0)
    meter = meter_sim("sdm630", pin_file=pin_file)
    agent = agent_process(broker, meter.device, "--quiet", "--set", "meter.poll_interval_s=0.2")
    online = collector.wait_for(lambda m: m.topic.endswith("/state") and m.body and m.body["meter_online"],
                                timeout_s=60)
    assert online is not None, agent.log()
    vehicle.plug()
    begin = collector.wait_for(lambda m: m.topic.endswith("/session") and m.body["event"] == "begin",
                               timeout_s=60)
    assert begin is not None, agent.log()
    with open("/proc/%d/maps" % agent.process.pid) as maps:
        mapped = maps.read()
    assert "libcrypto.so" in mapped
    assert "cryptography" not in mapped and "_rust.abi3" not in mapped
    vehicle.unplug()
