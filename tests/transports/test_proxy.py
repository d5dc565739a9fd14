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
    assert service.broker.stats.refused.get("proxy-header") == 1


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


# --- refused PROXY headers are counted and logged (REVIEW: they were closed silently) ---

BAD_HEADERS = {
    "v1 garbage": b"PROXY GARBAGE\r\n" + encode(Connect(4, "x"), 4),
    "v1 bad address": b"PROXY TCP4 999.1.1.1 127.0.0.1 1 1883\r\n",
    "v1 IPv6 in TCP4": b"PROXY TCP4 ::1 127.0.0.1 1 1883\r\n",
    "v1 bad port": b"PROXY TCP4 192.0.2.1 127.0.0.1 port 1883\r\n",
    "v1 port range": b"PROXY TCP4 192.0.2.1 127.0.0.1 70000 1883\r\n",
    "v1 not utf-8": b"PROXY TCP4 \xff\xfe 127.0.0.1 1 1883\r\n",
    "v1 too long": b"PROXY TCP4 " + b"1" * 200,
    "v2 bad command": V2_SIGNATURE + bytes((0x2F, 0x11)) + struct.pack("!H", 12) + bytes(12),
    "no header": encode(Connect(4, "sneaky"), 4),
}



def _proxy_connection(broker, host="192.0.2.50", port=40000):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from mqttd.protocol import MQTTFactory
    from mqttd.transports.proxy import CountedHAProxyWrappingFactory

    factory = CountedHAProxyWrappingFactory(MQTTFactory(broker), broker)
    address = IPv4Address("TCP", host, port)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def _warnings(events):
    from twisted.logger import LogLevel

    return [e for e in events if e.get("log_level", LogLevel.debug) >= LogLevel.warn]


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_bad_proxy_header_is_closed_counted_and_logged_with_the_peer(kind, log_events):
    """A malformed or missing PROXY header: closed, counted as proxy-header, one line naming the balancer."""
    from tests.core.harness import make_broker

    broker, _clock = make_broker()
    protocol, transport = _proxy_connection(broker)
    protocol.dataReceived(BAD_HEADERS[kind])
    assert transport.disconnecting
    assert transport.value() == b""
    assert broker.stats.refused == {"proxy-header": 1}
    (line,) = _warnings(log_events)
    assert line["what"] == "proxy-header" and line["peer"] == "192.0.2.50:40000"
    assert "PROXY header" in line["detail"]
    assert not broker.sessions


def test_bad_proxy_headers_of_one_balancer_log_at_most_the_burst(log_events):
    """30 bad headers from one address: all counted, at most 3 lines; another address still logged."""
    from tests.core.harness import make_broker

    broker, _clock = make_broker()
    for i in range(30):
        protocol, transport = _proxy_connection(broker, port=41000 + i)
        protocol.dataReceived(BAD_HEADERS["v1 garbage"])
        assert transport.disconnecting
    assert broker.stats.refused == {"proxy-header": 30}
    assert 1 <= len(_warnings(log_events)) <= 3
    before = len(_warnings(log_events))
    protocol, _transport = _proxy_connection(broker, host="198.51.100.2")
    protocol.dataReceived(BAD_HEADERS["no header"])
    assert any(e.get("peer", "").startswith("198.51.100.2")
               for e in _warnings(log_events)[before:])


@pytest.mark.parametrize("header", [v1_header, v2_header], ids=["v1", "v2"])
def test_proxy_header_split_across_reads_is_accepted(header):
    """A header arriving a few bytes at a time is read whole (Twisted's wrapper closed it)."""
    from mqttd.codec import PacketReader
    from tests.core.harness import make_broker

    broker, _clock = make_broker()
    protocol, transport = _proxy_connection(broker)
    data = header("203.0.113.8", 5555) + encode(Connect(4, "split"), 4)
    for i in range(len(data)):
        protocol.dataReceived(data[i:i + 1])
    assert not transport.disconnecting
    (connack,) = PacketReader(level=4).feed(transport.value())
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert broker.stats.refused == {}
    assert protocol.getPeer().host == "203.0.113.8"


@pytest_twisted.inlineCallbacks
def test_real_listener_counts_a_malformed_header(proxied_service):
    """On a haproxy: listener (serverFromString), a malformed header is counted, not closed silently."""
    service = yield proxied_service()
    probe = yield raw_client(service)
    probe.transport.write(b"PROXY TCP4 not-an-address 127.0.0.1 1 1883\r\n"
                          + encode(Connect(4, "x"), 4))
    yield probe.lost
    assert probe.packets == []
    assert service.broker.stats.refused.get("proxy-header") == 1


@pytest.mark.parametrize("header", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
    b"PROXY UNKNOWN anything at all\r\n",
], ids=["bare", "with addresses", "any text"])
def test_proxy_unknown_uses_the_socket_addresses(header):
    """PROXY UNKNOWN (a balancer's own health check) is accepted with the socket's addresses, as the spec says (REVIEW-SEC S4)."""
    from mqttd.codec import PacketReader
    from tests.core.harness import make_broker

    broker, _clock = make_broker()
    protocol, transport = _proxy_connection(broker, host="192.0.2.50", port=40000)
    protocol.dataReceived(header + encode(Connect(4, "health"), 4))
    assert not transport.disconnecting
    (connack,) = PacketReader(level=4).feed(transport.value())
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert broker.stats.refused == {}
    assert protocol.getPeer().host == "192.0.2.50"
    assert broker.sessions["health"].info.peer == "192.0.2.50:40000"
