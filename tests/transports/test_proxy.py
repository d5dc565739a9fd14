"""PROXY protocol (``haproxy:`` listeners): the client's real address is the peer.

Real listeners in the test's reactor on 127.0.0.1:0; the "load balancer" is
the test writing a PROXY v1 or v2 header before the MQTT bytes.
"""
from __future__ import annotations

import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from mqttd.codec import encode
from mqttd.codec.packets import Connack, Connect
from mqttd.service import make_broker_service

from .test_tls import WAIT, Probe

# the client certificates go through Twisted's PrivateCertificate, which still
# hands pyOpenSSL X509/PKey objects to pyOpenSSL (Twisted's deprecation)
pytestmark = [pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(source: str, source_port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {source_port} 1883\r\n".encode()


def v2_header(source: str, source_port: int) -> bytes:
    body = (socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
            + struct.pack("!HH", source_port, 1883))
    # version 2, command PROXY; AF_INET, STREAM
    return V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", len(body)) + body


@pytest.fixture
def proxied_service():
    services = []

    @defer.inlineCallbacks
    def start(listen="haproxy:tcp:0:interface=127.0.0.1"):
        service = make_broker_service(reactor, listen=[listen], store="memory",
                                      sys_interval=0)
        services.append(service)
        yield service.startService()
        return service

    yield start
    for service in services:
        pytest_twisted.blockon(service.stopService())


@defer.inlineCallbacks
def raw_client(service):
    port = service.ports[0].getHost().port
    probe = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                  Probe()).addTimeout(WAIT, reactor)
    return probe


@pytest.mark.parametrize("header", [v1_header, v2_header], ids=["v1", "v2"])
@pytest_twisted.inlineCallbacks
def test_proxied_client_is_known_by_its_real_address(proxied_service, header):
    """The PROXY header's source address, not the balancer's, is the client's peer."""
    service = yield proxied_service()
    seen = []
    service.broker.on("clientConnected", lambda client: seen.append(client.peer))
    probe = yield raw_client(service)
    probe.transport.write(header("203.0.113.7", 50123) + encode(Connect(4, "behind-lb"), 4))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert seen == ["203.0.113.7:50123"]
    probe.transport.loseConnection()
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_authenticator_sees_the_real_address(proxied_service):
    """Authentication hooks are asked with the proxied peer (address-based policies work)."""
    service = yield proxied_service()
    asked = []

    class Checker:
        def authenticate(self, request):
            asked.append(request.peer)
            return True

    service.broker.authenticator = Checker()
    probe = yield raw_client(service)
    probe.transport.write(v2_header("198.51.100.9", 40000) + encode(Connect(4, "who"), 4))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert asked == ["198.51.100.9:40000"]
    probe.transport.loseConnection()
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_connection_without_proxy_header_is_closed(proxied_service):
    """A client that skips the balancer (MQTT bytes first) is closed, never connected."""
    service = yield proxied_service()
    seen = []
    service.broker.on("clientConnected", lambda client: seen.append(client))
    probe = yield raw_client(service)
    probe.transport.write(encode(Connect(4, "sneaky"), 4))
    yield probe.lost
    assert probe.packets == [] and seen == []


@pytest_twisted.inlineCallbacks
def test_proxy_header_comes_before_tls_and_identity_still_works(proxied_service, pki):
    """haproxy:mqtts: the balancer's header is in clear before the handshake; CN and real peer both reach the broker."""
    from .test_tls import client_options

    service = yield proxied_service("haproxy:" + pki.mqtts(
        caCerts=pki.ca.cert_path, requireCert="yes", identityAsUsername="yes"))
    seen = []
    service.broker.on("clientConnected", lambda client: seen.append((client.username, client.peer)))
    probe = yield raw_client(service)
    probe.transport.write(v2_header("192.0.2.44", 61000))
    probe.transport.startTLS(client_options(pki, client=(pki.alice_cert, pki.alice_key)))
    probe.send(Connect(4, "tls-behind-lb", True, 0))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert seen == [("alice", "192.0.2.44:61000")]
    probe.transport.loseConnection()
    yield probe.lost


@pytest_twisted.inlineCallbacks
def test_proxy_header_before_websocket(proxied_service):
    """haproxy:ws: the MQTT connection behind a WebSocket gets the proxied peer too."""
    from .test_websocket import client_frame, handshake

    service = yield proxied_service("haproxy:ws:0:interface=127.0.0.1")
    seen = []
    service.broker.on("clientConnected", lambda client: seen.append(client.peer))
    probe = yield raw_client(service)
    probe.transport.write(v1_header("203.0.113.99", 1234) + handshake())
    probe.reader = _Discard()
    for _ in range(100):
        if probe.reader.data.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in probe.reader.data:
            break
        yield _later()
    assert probe.reader.data.startswith(b"HTTP/1.1 101"), probe.reader.data
    probe.transport.write(client_frame(encode(Connect(4, "ws-behind-lb"), 4)))
    for _ in range(100):
        if seen:
            break
        yield _later()
    assert seen == ["203.0.113.99:1234"]
    probe.transport.loseConnection()
    yield probe.lost


class _Discard:
    """Stands in for the packet reader: keeps the raw bytes (HTTP and frames)."""

    def __init__(self):
        self.data = b""

    def feed(self, data):
        self.data += data
        return []


def _later(seconds=0.02):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)
