"""TLS listeners: options, reload, client certificates and the certificate identity.

The in-process tests run a real broker service on 127.0.0.1:0 in the test's
reactor and connect with Twisted's own TLS client.
"""
from __future__ import annotations

import shutil

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, optionsForClientTLS
from zope.interface import implementer

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Pingreq, Pingresp
from mqttd.service import make_broker_service
from mqttd.transports import MQTTServerEndpoint, TLSConfigError, TLSServerOptions
from mqttd.transports.tls import certificate_identity, load_certificates, load_private_key

WAIT = 10.0


# --- options, files, parsers ------------------------------------------------------------

def test_server_options_load_and_report_client_certificate_mode(pki):
    """The three client-certificate modes follow caCerts and requireCert."""
    assert TLSServerOptions(str(pki.server_key), str(pki.server_cert)).client_certificates == "none"
    optional = TLSServerOptions(str(pki.server_key), str(pki.server_cert),
                                ca_certs=str(pki.ca.cert_path))
    assert optional.client_certificates == "optional"
    required = TLSServerOptions(str(pki.server_key), str(pki.server_cert),
                                ca_certs=str(pki.ca.cert_path), require_certificate=True)
    assert required.client_certificates == "required"


def test_key_that_does_not_fit_the_certificate_is_refused(pki):
    """A key/certificate mismatch is a clear configuration error, not a broken listener."""
    with pytest.raises(TLSConfigError, match="does not fit"):
        TLSServerOptions(str(pki.alice_key), str(pki.server_cert))


def test_missing_file_and_garbage_file_are_named(pki, tmp_path):
    """An unreadable or non-PEM file is reported with its path."""
    with pytest.raises(TLSConfigError, match="cannot read private key"):
        TLSServerOptions(str(tmp_path / "nope.key"), str(pki.server_cert))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        TLSServerOptions(str(pki.server_key), str(garbage))


def test_require_certificate_without_ca_is_a_configuration_error(pki):
    """requireCert=yes cannot be honoured without the CAs to verify against."""
    with pytest.raises(TLSConfigError, match="caCerts"):
        TLSServerOptions(str(pki.server_key), str(pki.server_cert), require_certificate=True)


def test_tls_versions_below_1_2_are_not_offered(pki):
    """tlsMinimum accepts 1.2 and 1.3 only [TLS >= 1.2]."""
    with pytest.raises(TLSConfigError, match="tlsMinimum"):
        TLSServerOptions(str(pki.server_key), str(pki.server_cert), minimum="1.0")


def test_loading_and_serving_tls_raises_no_deprecation_warning(pki, tmp_path):
    """Key, chain and CA files reach pyOpenSSL as cryptography objects: no deprecated API in use."""
    import warnings

    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.ca.cert_path.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = TLSServerOptions(str(pki.server_key), str(pki.server_cert),
                                   extra_chain=str(chain), ca_certs=str(pki.ca.cert_path),
                                   require_certificate=True)
        options.reload()
        options.serverConnectionForTLS(None)
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert deprecations == []
    assert options.generation == 2


def test_reload_failure_keeps_the_previous_certificate(pki, tmp_path):
    """A broken file at reload raises and leaves the running options untouched."""
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    shutil.copy(pki.server_key, key)
    shutil.copy(pki.server_cert, cert)
    options = TLSServerOptions(str(key), str(cert))
    before = options._options
    cert.write_text("truncated")
    with pytest.raises(TLSConfigError):
        options.reload()
    assert options._options is before and options.generation == 1


def test_endpoint_strings_come_from_the_plugins(pki):
    """mqtts:, ws: and wss: are found by serverFromString through twisted/plugins."""
    mqtts = serverFromString(reactor, pki.mqtts(caCerts=pki.ca.cert_path, requireCert="yes",
                                                identityAsUsername="yes"))
    assert isinstance(mqtts, MQTTServerEndpoint)
    assert mqtts.tls_options.client_certificates == "required"
    assert mqtts.identity_as_username
    ws = serverFromString(reactor, "ws:0:interface=127.0.0.1:path=/ws")
    assert ws.websocket_path == "/ws" and ws.tls_options is None
    wss = serverFromString(reactor, f"wss:0:privateKey={pki.server_key}:certKey={pki.server_cert}")
    assert wss.websocket_path == "/mqtt" and wss.tls_options is not None


@pytest.mark.parametrize("description, message", [
    ("mqtts:0", "privateKey"),
    ("mqtts:0:privateKey={key}:bogus=1", "unknown option"),
    ("mqtts:0:privateKey={key}:certKey={cert}:requireCert=maybe", "yes or no"),
    ("mqtts:0:privateKey={key}:certKey={cert}:identityAsUsername=yes", "caCerts"),
])
def test_bad_mqtts_strings_say_what_is_wrong(pki, description, message):
    """A typo in a listener string fails at startup with the option named."""
    with pytest.raises(ValueError, match=message):
        serverFromString(reactor, description.format(key=pki.server_key, cert=pki.server_cert))


def test_certificate_identity_is_the_common_name(pki):
    """use_identity_as_username takes the subject's CN; none without a certificate or CN."""
    from OpenSSL.crypto import X509
    from cryptography import x509

    def transport(path):
        cert = X509.from_cryptography(x509.load_pem_x509_certificate(path.read_bytes()))
        return type("T", (), {"getPeerCertificate": lambda self: cert})()

    assert certificate_identity(transport(pki.alice_cert)) == "alice"
    assert certificate_identity(transport(pki.nocn_cert)) is None
    assert certificate_identity(type("T", (), {"getPeerCertificate": lambda self: None})()) is None
    assert certificate_identity(object()) is None


# --- a real TLS listener in this process --------------------------------------------------

class Probe(protocol.Protocol):
    """A raw MQTT client over whatever transport: send packets, await packets."""

    def __init__(self, level=4):
        self.reader = PacketReader(level=level)
        self.level = level
        self.packets = []
        self.waiting = None
        self.lost = defer.Deferred().addTimeout(WAIT, reactor)

    def dataReceived(self, data):
        self.packets.extend(self.reader.feed(data))
        self._wake()

    def connectionLost(self, reason=None):
        self.lost.callback(None)
        self._wake()

    def _wake(self):
        if self.waiting is not None and (self.packets or self.lost.called):
            waiting, self.waiting = self.waiting, None
            waiting.callback(None)

    def send(self, packet):
        self.transport.write(encode(packet, self.level))

    @defer.inlineCallbacks
    def next_packet(self):
        if not self.packets and not self.lost.called:
            self.waiting = defer.Deferred().addTimeout(WAIT, reactor)
            yield self.waiting
        return self.packets.pop(0) if self.packets else None

    def peer_certificate(self):
        return self.transport.getPeerCertificate()


def client_options(pki, client=None, ca=None):
    trust = Certificate.loadPEM((ca or pki.ca.cert_path).read_bytes())
    extra = {}
    if client is not None:
        # cryptography objects, not Twisted's PrivateCertificate (which hands
        # pyOpenSSL its deprecated X509/PKey)
        cert, key = client
        extra = {"certificate": load_certificates(str(cert))[0],
                 "privateKey": load_private_key(str(key))}
    return optionsForClientTLS("localhost", trustRoot=trust, extraCertificateOptions=extra)


@pytest.fixture
def service_factory():
    started = []

    @defer.inlineCallbacks
    def start(*listen):
        service = make_broker_service(reactor, listen=list(listen), store="memory",
                                      sys_interval=0)
        started.append(service)
        yield service.startService()
        return service

    yield start
    for service in started:
        pytest_twisted.blockon(service.stopService())


@defer.inlineCallbacks
def connect(service, pki, client=None, index=0, level=4, ca=None):
    port = service.ports[index].getHost().port
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_options(pki, client, ca))
    probe = yield connectProtocol(endpoint, Probe(level)).addTimeout(WAIT, reactor)
    return probe


@pytest_twisted.inlineCallbacks
def test_identity_as_username_sets_the_username_from_the_client_certificate(pki, service_factory):
    """With identityAsUsername the CN is the username, whatever CONNECT says (no password check)."""
    service = yield service_factory(pki.mqtts(caCerts=pki.ca.cert_path, requireCert="yes",
                                              identityAsUsername="yes"))
    seen = []
    service.broker.on("clientConnected", lambda client: seen.append(client))
    probe = yield connect(service, pki, client=(pki.alice_cert, pki.alice_key))
    probe.send(Connect(4, "alice-device", True, 0, username="root", password=b"guess"))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert [client.username for client in seen] == ["alice"]
    probe.transport.loseConnection()
    yield probe.lost


@pytest.mark.parametrize("level, code", [(4, 0x05), (5, 0x87)], ids=["v311", "v5"])
@pytest_twisted.inlineCallbacks
def test_identity_as_username_refuses_a_certificate_without_common_name(
        pki, service_factory, level, code):
    """No CN, no identity: CONNACK Not authorized (v3 0x05, v5 0x87) and close, as mosquitto."""
    service = yield service_factory(pki.mqtts(caCerts=pki.ca.cert_path,
                                              identityAsUsername="yes"))
    probe = yield connect(service, pki, client=(pki.nocn_cert, pki.nocn_key), level=level)
    probe.send(Connect(level, "no-cn", True, 0))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == code
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_identity_as_username_refuses_a_client_without_certificate(pki, service_factory):
    """Optional client certificates + identityAsUsername: no certificate gets 0x05, not in."""
    service = yield service_factory(pki.mqtts(caCerts=pki.ca.cert_path,
                                              identityAsUsername="yes"))
    probe = yield connect(service, pki)
    probe.send(Connect(4, "anon", True, 0, username="alice"))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0x05
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_sighup_reload_serves_the_new_certificate_and_keeps_old_connections(
        pki, service_factory, tmp_path):
    """After reload() new handshakes see the new certificate; an established client stays up."""
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    shutil.copy(pki.server_key, key)
    shutil.copy(pki.server_cert, cert)
    service = yield service_factory(
        f"mqtts:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    old = yield connect(service, pki)
    old.send(Connect(4, "before-reload", True, 0))
    assert isinstance((yield old.next_packet()), Connack)
    first_serial = old.peer_certificate().get_serial_number()

    new_cert, new_key = pki.ca.issue("server-renewed", "localhost", server=True)
    shutil.copy(new_key, key)
    shutil.copy(new_cert, cert)
    results = yield service.reload()
    assert results == {"tls": True}

    fresh = yield connect(service, pki)
    fresh.send(Connect(4, "after-reload", True, 0))
    assert isinstance((yield fresh.next_packet()), Connack)
    assert fresh.peer_certificate().get_serial_number() != first_serial
    old.send(Pingreq())
    assert isinstance((yield old.next_packet()), Pingresp)   # the old session is still up
    for probe in (old, fresh):
        probe.transport.loseConnection()
        yield probe.lost


@pytest_twisted.inlineCallbacks
def test_failed_reload_is_reported_and_the_listener_keeps_working(pki, service_factory, tmp_path):
    """A broken certificate file at SIGHUP: reload reports False, connections still succeed."""
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    shutil.copy(pki.server_key, key)
    shutil.copy(pki.server_cert, cert)
    service = yield service_factory(
        f"mqtts:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    cert.write_text("half a file")
    results = yield service.reload()
    assert results == {"tls": False}
    probe = yield connect(service, pki)
    probe.send(Connect(4, "still-fine", True, 0))
    assert isinstance((yield probe.next_packet()), Connack)
    probe.transport.loseConnection()
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_haproxy_wrapped_tls_listener_is_reloaded_too(pki, service_factory):
    """haproxy:mqtts:... registers its TLS options with the service's reload."""
    service = yield service_factory("haproxy:" + pki.mqtts())
    assert (yield service.reload()) == {"tls": True}


@pytest_twisted.inlineCallbacks
def test_certificate_identity_bypasses_password_authentication(pki, service_factory):
    """As mosquitto: on an identityAsUsername listener the certificate is the credential, no password hook is asked."""
    service = yield service_factory(pki.mqtts(caCerts=pki.ca.cert_path, requireCert="yes",
                                              identityAsUsername="yes"))
    asked = []

    class RefuseAll:
        def authenticate(self, request):
            asked.append(request)
            return False

    service.broker.authenticator = RefuseAll()
    seen = []
    service.broker.on("clientConnected", lambda client: seen.append(client.username))
    probe = yield connect(service, pki, client=(pki.alice_cert, pki.alice_key), level=5)
    probe.send(Connect(5, "alice-5", True, 0))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert seen == ["alice"] and asked == []
    probe.transport.loseConnection()
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_failed_handshake_is_counted_and_logged_as_a_tls_refusal(pki, service_factory):
    """A client without a certificate on requireCert=yes: closed, counted as refusal 'tls' (rate-limited log)."""
    service = yield service_factory(pki.mqtts(caCerts=pki.ca.cert_path, requireCert="yes"))
    probe = yield connect(service, pki)
    probe.send(Connect(4, "no-cert", True, 0))
    yield probe.lost
    assert probe.packets == []
    for _ in range(50):                     # the server may see the alert a moment later
        if service.broker.stats.refused.get("tls"):
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert service.broker.stats.refused.get("tls") == 1


@pytest_twisted.inlineCallbacks
def test_failed_wss_handshake_is_counted_and_logged_as_a_tls_refusal(pki, service_factory):
    """wss: with requireCert=yes, a client without a certificate: refusal 'tls' as on mqtts: (REVIEW-SEC S7)."""
    service = yield service_factory(
        pki.mqtts(caCerts=pki.ca.cert_path, requireCert="yes").replace("mqtts:", "wss:", 1))
    probe = yield connect(service, pki)
    probe.transport.write(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
    yield probe.lost
    for _ in range(50):                     # the server may see the alert a moment later
        if service.broker.stats.refused.get("tls"):
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert service.broker.stats.refused.get("tls") == 1
    assert "websocket" not in service.broker.stats.refused


def test_trust_x_forwarded_for_must_be_a_count():
    """trustXForwardedFor takes the number of proxies in front; anything else is refused at startup."""
    assert serverFromString(reactor, "ws:0:trustXForwardedFor=2").trust_x_forwarded_for == 2
    for bad in ("yes", "-1"):
        with pytest.raises(ValueError, match="trustXForwardedFor"):
            serverFromString(reactor, f"ws:0:trustXForwardedFor={bad}")


# Twisted's own ssl: endpoint parser (not mqttd's code) hands pyOpenSSL the X509/PKey
# objects it deprecates; the suite's error filter for that warning is about mqttd's code
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_plain_ssl_listener_works_and_closes_refused_clients(pki, service_factory):
    """Twisted's ssl: works with the default dependencies, and a broker-side close reaches the client over TLS."""
    service = yield service_factory(
        f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}")
    probe = yield connect(service, pki)
    probe.send(Connect(4, "over-ssl", True, 0))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    probe.send(Connect(4, "over-ssl", True, 0))      # a second CONNECT: protocol error, close
    yield probe.lost                                  # (it hung before the producer was released)


@implementer(IOpenSSLClientConnectionCreator)
class TLS12OnlyClient:
    """A client that speaks TLS 1.2 and nothing else, on pyOpenSSL's own
    version bounds (Twisted's ``lowerMaximumSecurityTo`` + ``insecurelyLowerMinimumTo``
    leave no protocol at all with Twisted 25.5 / OpenSSL 3.3 on PyPy)."""

    def __init__(self, ca_path):
        from OpenSSL import SSL

        context = self.context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.load_verify_locations(str(ca_path))
        context.set_verify(SSL.VERIFY_PEER, lambda _conn, _cert, _errno, _depth, ok: bool(ok))

    def clientConnectionForTLS(self, tls_protocol):
        from OpenSSL import SSL

        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls_protocol)
        connection.set_tlsext_host_name(b"localhost")
        connection.set_connect_state()
        return connection


class LossProbe(Probe):
    """A Probe that keeps why its connection was lost."""

    reason = None

    def connectionLost(self, reason=None):
        self.reason = reason
        super().connectionLost(reason)


@pytest_twisted.inlineCallbacks
def test_tls_minimum_is_enforced(pki, service_factory):
    """tlsMinimum=1.3 refuses a client that can only speak TLS 1.2 (counted); the default accepts it at 1.2."""
    service = yield service_factory(pki.mqtts(), pki.mqtts(tlsMinimum="1.3"))
    only_12 = TLS12OnlyClient(pki.ca.cert_path)
    accepted = yield connectProtocol(
        SSL4ClientEndpoint(reactor, "127.0.0.1", service.ports[0].getHost().port, only_12),
        LossProbe()).addTimeout(WAIT, reactor)
    accepted.send(Connect(4, "tls12", True, 0))
    assert isinstance((yield accepted.next_packet()), Connack)
    assert accepted.transport.getHandle().get_protocol_version_name() == "TLSv1.2"
    accepted.transport.loseConnection()
    yield accepted.lost

    refused = yield connectProtocol(
        SSL4ClientEndpoint(reactor, "127.0.0.1", service.ports[1].getHost().port, only_12),
        LossProbe()).addTimeout(WAIT, reactor)
    refused.send(Connect(4, "tls12-refused", True, 0))
    yield refused.lost
    assert refused.packets == []
    assert "protocol version" in str(refused.reason.value)


@pytest_twisted.inlineCallbacks
def test_client_closing_behind_held_input_over_tls_is_noticed(pki, service_factory):
    """mqtts: a client closing behind rate-held PUBLISHes: the probe finds the socket under TLS (REVIEW-SEC2 N1)."""
    import attrs
    service = yield service_factory(pki.mqtts())
    broker = service.broker
    broker.config = attrs.evolve(broker.config, max_inbound_rate=10)
    probe = yield connect(service, pki)
    probe.send(Connect(4, "tls-zombie", True, 0))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    probe.transport.write(b"".join(bytes((0x30, 3, 0, 1, ord("t"))) for _ in range(30_000)))
    yield deferLater(reactor, 0.3, lambda: None)
    # the client process goes away: its socket closes (FIN) without waiting for
    # the server's close_notify, which a held connection would not send
    probe.transport.transport.loseConnection()
    yield probe.lost
    for _ in range(150):                    # bounded: 3 s
        if broker.open_connections == 0:
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert broker.open_connections == 0
    assert broker.stats.dropped.get("held-input", 0) > 1000
