"""The board file's TLS and login settings work against a real mosquitto that requires them."""

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import wait_for
from evse_tools.testkit.broker import Mosquitto
from evse_tools.testkit.subscriber import Collector


def _write_pem(path, data):
    path.write_bytes(data)
    return str(path)


def _certificates(directory):
    """A throwaway CA and a server certificate for 127.0.0.1, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evse-agent test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca = _write_pem(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert = _write_pem(directory / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    server_key = _write_pem(directory / "server.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca, server_cert, server_key


@pytest.fixture
def secure_broker(tmp_path):
    files = _certificates(tmp_path)
    with Mosquitto(tls_files=files, users={"station-7": "s3cret", "reader": "r3ad"}) as mosquitto:
        mosquitto.ca_file = files[0]
        yield mosquitto


def _tls_args(broker, user, password):
    return ("--quiet", "--set", "mqtt.tls.enabled=true", "--set", "mqtt.tls.ca_file=" + broker.ca_file,
            "--set", "mqtt.username=" + user, "--set", "mqtt.password=" + password)


def test_agent_publishes_over_tls_with_a_login(secure_broker, meter_sim, agent_process):
    """TLS verified against the board's CA file, plus username/password: telemetry arrives."""
    sim = meter_sim("sdm630", profile="steady")
    agent = agent_process(secure_broker, sim.device, *_tls_args(secure_broker, "station-7", "s3cret"))
    reader = Collector(secure_broker.host, secure_broker.port, "evse/#",
                       tls_ca_file=secure_broker.ca_file, username="reader", password="r3ad")
    try:
        assert reader.wait_for(lambda m: m.topic.endswith("/telemetry")), agent.log()
        assert agent.wait_for_log("MQTT connected"), agent.log()
    finally:
        reader.close()


def test_wrong_password_is_reported_and_the_agent_keeps_polling(secure_broker, meter_sim, agent_process):
    """A refused login is logged clearly; the agent stays up, polling the meter."""
    sim = meter_sim("sdm630", profile="steady")
    agent = agent_process(secure_broker, sim.device, *_tls_args(secure_broker, "station-7", "wrong"))
    assert agent.wait_for_log("refused connection"), agent.log()
    requests = sim.requests_seen
    assert wait_for(lambda: sim.requests_seen >= requests + 3 or not agent.alive(), 60)
    assert agent.alive()


def test_connection_failures_are_logged_with_their_reason(secure_broker, meter_sim, agent_process, tmp_path):
    """Whatever keeps the agent from its broker is logged once with its reason, and the agent
    keeps polling: a CA that did not sign the broker's certificate, TLS spoken to a plain
    listener, plain MQTT spoken to the TLS listener, and a port nobody listens on."""
    (tmp_path / "stranger").mkdir()
    stranger_ca = _certificates(tmp_path / "stranger")[0]
    sim = meter_sim("sdm630", profile="steady")
    cases = [
        (("--set", "mqtt.tls.enabled=true", "--set", "mqtt.tls.ca_file=" + stranger_ca),
         secure_broker, "certificate verify failed"),
        ((), secure_broker, "closed the connection before accepting it"),  # plain MQTT to TLS
    ]
    for extra, broker, words in cases:
        agent = agent_process(broker, sim.device, "--quiet", "--set", "mqtt.username=station-7",
                              "--set", "mqtt.password=s3cret", *extra)
        try:
            assert agent.wait_for_log(words, timeout_s=60), agent.log()
            assert agent.alive()
        finally:
            agent.stop()
    with Mosquitto() as plain:
        agent = agent_process(plain, sim.device, "--quiet", "--set", "mqtt.tls.enabled=true",
                              "--set", "mqtt.tls.ca_file=" + secure_broker.ca_file)
        try:
            assert agent.wait_for_log("cannot connect: ", timeout_s=60), agent.log()  # reset or SSL error
        finally:
            agent.stop()
        port = plain.port
    agent = agent_process(plain, sim.device, "--quiet")  # the broker is gone: nothing listens
    try:
        assert agent.wait_for_log("cannot connect: ConnectionRefusedError", timeout_s=60), agent.log()
        assert "%d" % port in agent.log()
        requests = sim.requests_seen
        assert wait_for(lambda: sim.requests_seen > requests, 30)
    finally:
        agent.stop()
