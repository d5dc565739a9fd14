"""mosquitto_pub/mosquitto_sub and paho over ``mqtts:`` listeners, with and without client certificates.

One broker subprocess per test with three TLS listeners on 127.0.0.1:
server certificate only, client certificate optional, client certificate required.
"""
from __future__ import annotations

import queue
import ssl
import subprocess
import uuid

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv311, MQTTv5

pytestmark = pytest.mark.interop

WAIT = 10


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tls_broker(broker_with, pki):
    """Listeners: [1] server-only TLS, [2] optional client certs, [3] required client certs."""
    listeners = broker_with(
        pki.mqtts(),
        pki.mqtts(caCerts=pki.ca.cert_path),
        pki.mqtts(caCerts=pki.ca.cert_path, requireCert="yes"))
    ports = [entry["port"] for entry in listeners.broker.ready["listeners"][1:]]
    listeners.server_only, listeners.optional, listeners.required = ports
    return listeners


def mosquitto(tool, port, pki, *args, cert=None):
    cmd = [tool, "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki.ca.cert_path), *args]
    if cert is not None:
        cmd += ["--cert", str(cert[0]), "--key", str(cert[1])]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=WAIT + 5)


def retained_round_trip(clients, port, pki, cert=None, version="mqttv311"):
    """Publish a retained message, then read it back; returns mosquitto_sub's result."""
    topic, payload = unique("tls/rt"), unique("hello")
    pub = mosquitto(clients.pub, port, pki, "-V", version, "-t", topic, "-m", payload, "-r",
                    "-q", "1", cert=cert)
    assert pub.returncode == 0, pub.stderr
    sub = mosquitto(clients.sub, port, pki, "-V", version, "-t", topic, "-C", "1",
                    "-W", str(WAIT), cert=cert)
    return sub, payload


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_over_tls_with_server_certificate(tls_broker, mosquitto_clients, pki,
                                                           version):
    """--cafile only: the server is verified (hostname 127.0.0.1 in its SAN), traffic flows."""
    sub, payload = retained_round_trip(mosquitto_clients, tls_broker.server_only, pki,
                                       version=version)
    assert sub.returncode == 0 and sub.stdout.strip() == payload, sub.stderr


def test_mosquitto_clients_with_required_client_certificate(tls_broker, mosquitto_clients, pki):
    """--cert/--key signed by the trusted CA is accepted on a requireCert=yes listener."""
    sub, payload = retained_round_trip(mosquitto_clients, tls_broker.required, pki,
                                       cert=(pki.alice_cert, pki.alice_key))
    assert sub.returncode == 0 and sub.stdout.strip() == payload, sub.stderr


def test_required_client_certificate_refuses_client_without_one(tls_broker, mosquitto_clients,
                                                                pki):
    """No client certificate on a requireCert=yes listener: the TLS handshake fails."""
    pub = mosquitto(mosquitto_clients.pub, tls_broker.required, pki, "-t", "x", "-m", "no")
    assert pub.returncode != 0
    assert "rror" in pub.stderr, pub.stderr


@pytest.mark.parametrize("listener", ["optional", "required"])
def test_client_certificate_from_an_untrusted_ca_is_refused(tls_broker, mosquitto_clients,
                                                            pki, listener):
    """A certificate signed by another CA is refused whether certificates are optional or not."""
    pub = mosquitto(mosquitto_clients.pub, getattr(tls_broker, listener), pki, "-t", "x",
                    "-m", "no", cert=(pki.mallory_cert, pki.mallory_key))
    assert pub.returncode != 0
    assert "rror" in pub.stderr, pub.stderr


def test_optional_client_certificate_accepts_with_and_without(tls_broker, mosquitto_clients,
                                                              pki):
    """caCerts without requireCert: clients with a valid certificate and without one both get in."""
    for cert in (None, (pki.alice_cert, pki.alice_key)):
        sub, payload = retained_round_trip(mosquitto_clients, tls_broker.optional, pki, cert=cert)
        assert sub.returncode == 0 and sub.stdout.strip() == payload, sub.stderr


# --- paho -----------------------------------------------------------------------------------

class PahoTLS:
    def __init__(self, port, pki, protocol, cert=None):
        self.client = Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=unique("paho-tls"), protocol=protocol)
        kwargs = {}
        if cert is not None:
            kwargs.update(certfile=str(cert[0]), keyfile=str(cert[1]))
        self.client.tls_set(ca_certs=str(pki.ca.cert_path), **kwargs)
        self.connacks = queue.Queue()
        self.messages = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.port = port

    def connect(self):
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self.connacks.get(timeout=WAIT)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5], ids=["v311", "v5"])
@pytest.mark.parametrize("listener, with_cert", [("server_only", False), ("optional", False),
                                                 ("optional", True), ("required", True)])
def test_paho_round_trip_over_tls(tls_broker, pki, protocol, listener, with_cert):
    """paho with tls_set, with and without a client certificate, subscribes and gets its message."""
    cert = (pki.alice_cert, pki.alice_key) if with_cert else None
    paho = PahoTLS(getattr(tls_broker, listener), pki, protocol, cert)
    try:
        assert paho.connect() == 0
        topic = unique("paho/tls")
        paho.client.subscribe(topic, 1)
        # the SUBACK and the message are ordered on one connection: publish after subscribing
        paho.client.publish(topic, b"over tls", qos=1)
        message = paho.messages.get(timeout=WAIT)
        assert (message.topic, message.payload) == (topic, b"over tls")
    finally:
        paho.close()


@pytest.mark.parametrize("cert", ["none", "untrusted"])
def test_paho_refused_on_required_listener(tls_broker, pki, cert):
    """paho without a certificate, or with one from another CA, cannot connect (handshake refused)."""
    chosen = None if cert == "none" else (pki.mallory_cert, pki.mallory_key)
    paho = PahoTLS(tls_broker.required, pki, MQTTv311, chosen)
    with pytest.raises((ssl.SSLError, OSError, queue.Empty)):
        # TLS 1.3: the client may learn of the refusal only when it reads
        paho.connect()
        raise AssertionError("connected without an acceptable client certificate")
    paho.client.loop_stop()


def test_sighup_swaps_the_certificate_and_keeps_connected_clients(broker_with, mosquitto_clients,
                                                                  pki, tmp_path):
    """SIGHUP: new clients see the renewed certificate (another CA here); a connected subscriber stays and receives."""
    import shutil
    import signal
    import time

    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    shutil.copy(pki.server_key, key)
    shutil.copy(pki.server_cert, cert)
    listeners = broker_with(f"mqtts:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    port = listeners.port("mqtts")
    topic = unique("tls/reload")

    # a subscriber connected before the reload, trusting the old CA
    stdbuf = shutil.which("stdbuf")              # line-buffered, to see the SUBACK as it comes
    sub = subprocess.Popen(
        [*([stdbuf, "-oL"] if stdbuf else []), mosquitto_clients.sub, "-h", "127.0.0.1", "-p", str(port), "--cafile",
         str(pki.ca.cert_path), "-t", topic, "-C", "1", "-W", str(WAIT * 2), "-q", "1",
         "-i", unique("kept"), "-d"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + WAIT
        seen = ""
        while "SUBACK" not in seen:                 # its subscription is in place
            line = sub.stdout.readline()
            assert line and time.monotonic() < deadline, seen
            seen += line

        renewed_cert, renewed_key = pki.other_ca.issue("server-renewed", "localhost", server=True)
        shutil.copy(renewed_key, key)
        shutil.copy(renewed_cert, cert)
        listeners.broker._proc.send_signal(signal.SIGHUP)

        deadline = time.monotonic() + WAIT          # SIGHUP is handled in the reactor thread
        while "reloaded" not in listeners.broker.log_path.read_text():
            assert time.monotonic() < deadline, listeners.broker.log_tail()
            time.sleep(0.05)
        # new connections get the new certificate: the other CA verifies it, the old one not
        pub = subprocess.run(
            [mosquitto_clients.pub, "-h", "127.0.0.1", "-p", str(port), "--cafile",
             str(pki.other_ca.cert_path), "-t", topic, "-m", "after reload", "-q", "1"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
        assert pub.returncode == 0, pub.stderr
        old_ca = mosquitto(mosquitto_clients.pub, port, pki, "-t", unique("other"), "-m", "x")
        assert old_ca.returncode != 0, "the old certificate is still served"

        out, _ = sub.communicate(timeout=WAIT * 2)
        assert sub.returncode == 0, seen + out
        assert "after reload" in out                # the old connection stayed up and received
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)
    assert "TLS certificate" in listeners.broker.log_path.read_text()
