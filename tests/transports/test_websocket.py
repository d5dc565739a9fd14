"""MQTT over WebSocket at the byte level: handshake rules, frames, backpressure.

The WebSocket protocol runs over a ``StringTransport``; the broker over a
``task.Clock``.  Handshake and close timers are off, so nothing touches the
global reactor.
"""
from __future__ import annotations

import os
import struct
import sys

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Pingreq, Pingresp
from mqttd.protocol import MQTTFactory
from mqttd.transports.websocket import MAX_HANDSHAKE_BYTES, MQTTWebSocketFactory

from core.harness import make_broker


def handshake(path="/mqtt", protocols="mqtt", extra=""):
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1:9001", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def client_frame(payload: bytes, opcode: int = 2) -> bytes:
    """A masked, final frame, as a browser sends it (RFC 6455 5.3)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    else:
        header = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
    return header + mask + masked


def server_frames(data: bytes):
    """[(opcode, payload)] of the unmasked frames in ``data``."""
    frames = []
    while data:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if n == 126:
            n, offset = struct.unpack("!H", data[2:4])[0], 4
        assert not data[1] & 0x80, "server frames are never masked"
        frames.append((opcode, data[offset:offset + n]))
        data = data[offset + n:]
    return frames


class SocketTransport(StringTransport):
    """StringTransport that, like Twisted's TCP and TLS transports, allows
    unregistering when no producer is registered (autobahn does that on close)."""

    def unregisterProducer(self):
        if self.producer is not None:
            super().unregisterProducer()


class WebSocketClient:
    def __init__(self, path="/mqtt", broker_config=None, trust_x_forwarded_for=0,
                 allowed_origins=None, authenticator=None, ambient_credentials=False):
        self.broker, self.clock = make_broker(**(broker_config or {}))
        self.broker.authenticator = authenticator
        self.mqtt_factory = MQTTFactory(self.broker)
        self.factory = MQTTWebSocketFactory(self.mqtt_factory, path=path,
                                            trust_x_forwarded_for=trust_x_forwarded_for,
                                            allowed_origins=allowed_origins,
                                            ambient_credentials=ambient_credentials)
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        self.transport = SocketTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        self.protocol.makeConnection(self.transport)

    def response(self) -> bytes:
        head = self.transport.value()
        self.transport.clear()
        return head

    def open(self, protocols="mqtt"):
        self.protocol.dataReceived(handshake(protocols=protocols))
        head = self.response()
        assert head.startswith(b"HTTP/1.1 101"), head
        return head


def test_mqtt_travels_in_binary_frames_not_aligned_with_packets():
    """CONNECT split over two frames is read whole; CONNACK comes back as one binary frame [MQTT-6.0.0-2]."""
    client = WebSocketClient()
    head = client.open()
    assert b"Sec-WebSocket-Protocol: mqtt\r\n" in head
    connect = encode(Connect(4, "browser"), 4)
    client.protocol.dataReceived(client_frame(connect[:5]) + client_frame(connect[5:]))
    frames = server_frames(client.response())
    assert [opcode for opcode, _ in frames] == [2]
    assert PacketReader(level=4).feed(frames[0][1]) == [Connack(False, 0)]
    client.protocol.dataReceived(client_frame(encode(Pingreq(), 4) * 2))
    replies = [p for _, payload in server_frames(client.response())
               for p in PacketReader(level=4).feed(payload)]
    assert replies == [Pingresp(), Pingresp()]


def test_mqtt_v3_1_subprotocol_is_accepted():
    """Old MQTT 3.1 clients offer mqttv3.1; it is chosen when mqtt is not offered."""
    head = WebSocketClient().open(protocols="mqttv3.1")
    assert b"Sec-WebSocket-Protocol: mqttv3.1\r\n" in head


def test_peer_is_the_socket_address():
    """The MQTT connection's peer is the WebSocket's remote address."""
    client = WebSocketClient()
    client.open()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "peer"), 4)))
    assert client.protocol._mqtt.connection.peer == "192.0.2.1:40000"


def test_other_path_gets_404():
    """A request for a path the listener does not serve is answered 404 and closed."""
    client = WebSocketClient(path="/mqtt")
    client.protocol.dataReceived(handshake(path="/other"))
    head = client.response()
    assert head.startswith(b"HTTP/1.1 404")
    assert client.protocol._mqtt is None
    assert client.broker.stats.refused == {"websocket": 1}


def test_any_path_when_configured_with_star():
    """path=* (None here) answers whatever path the client asks for."""
    client = WebSocketClient(path=None)
    client.protocol.dataReceived(handshake(path="/anything/at/all"))
    assert client.response().startswith(b"HTTP/1.1 101")


@pytest.mark.parametrize("protocols", [None, "binary, base64", "mqttv5"])
def test_handshake_without_mqtt_subprotocol_is_refused(protocols):
    """A client must offer mqtt (or mqttv3.1) [MQTT-6.0.0-3]; anything else gets 400."""
    client = WebSocketClient()
    client.protocol.dataReceived(handshake(protocols=protocols))
    head = client.response()
    assert head.startswith(b"HTTP/1.1 400"), head
    assert client.protocol._mqtt is None
    assert client.broker.stats.refused == {"websocket": 1}


def test_text_frame_closes_with_1003():
    """MQTT needs binary frames; a text frame closes the connection with 1003 [MQTT-6.0.0-1]."""
    client = WebSocketClient()
    client.open()
    client.protocol.dataReceived(client_frame(b"hello", opcode=1))
    frames = server_frames(client.response())
    assert frames[0][0] == 8  # close
    assert struct.unpack("!H", frames[0][1][:2])[0] == 1003
    assert client.broker.stats.refused == {"websocket": 1}


def test_oversized_handshake_is_refused():
    """An opening request header over 16 KiB is refused instead of buffered."""
    client = WebSocketClient()
    client.protocol.dataReceived(b"GET /mqtt HTTP/1.1\r\nX-Junk: " + b"a" * (MAX_HANDSHAKE_BYTES + 1))
    assert client.response().startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("size", [MAX_HANDSHAKE_BYTES, 40_000])
def test_complete_header_over_16_kib_in_one_read_is_refused(size):
    """The 16 KiB bound holds for a header that arrives whole in one read, not only for an unfinished one."""
    client = WebSocketClient()
    client.protocol.dataReceived(handshake(extra="X-Big: " + "a" * size + "\r\n"))
    head = client.response()
    assert head.startswith(b"HTTP/1.1 400"), head[:40]
    assert client.protocol._mqtt is None
    assert client.broker.stats.refused == {"websocket": 1}


def test_header_of_exactly_the_limit_with_a_frame_after_it_is_accepted():
    """Bytes after the header (the client's first frame) do not count against the header bound."""
    client = WebSocketClient()
    base = handshake(extra="X-Pad: \r\n")
    request = handshake(extra="X-Pad: " + "a" * (MAX_HANDSHAKE_BYTES - len(base)) + "\r\n")
    assert len(request) == MAX_HANDSHAKE_BYTES
    over = WebSocketClient()
    over.protocol.dataReceived(request.replace(b"X-Pad: ", b"X-Pad: a"))
    assert over.response().startswith(b"HTTP/1.1 400")          # one byte more
    connect = encode(Connect(4, "big-header"), 4)
    client.protocol.dataReceived(request + client_frame(connect))
    data = client.response()
    assert data.startswith(b"HTTP/1.1 101"), data[:40]
    frames = server_frames(data[data.index(b"\r\n\r\n") + 4:])
    assert PacketReader(level=4).feed(frames[0][1]) == [Connack(False, 0)]



def _connection(client, host="192.0.2.1", port=40000):
    """Another connection to ``client``'s listener, from ``host``."""
    protocol = client.factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = SocketTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


BAD_REQUESTS = {
    "subprotocol": handshake(protocols="foo"),
    "path": handshake(path="/other"),
    "plain GET": b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "bad version": handshake().replace(b"Version: 13", b"Version: 7"),
    "no key": handshake().replace(b"Sec-WebSocket-Key", b"X-Key"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_failed_handshakes_of_one_peer_log_at_most_the_burst(kind, log_events):
    """30 refused handshakes of one peer: every one counted, at most 3 log lines (autobahn's included)."""
    client = WebSocketClient()
    for i in range(30):
        protocol, transport = _connection(client, port=41000 + i)
        protocol.dataReceived(BAD_REQUESTS[kind])
        assert transport.value().startswith(b"HTTP/1.1 4"), transport.value()[:40]
        protocol.connectionLost(Failure(ConnectionDone()))
    lines = [e for e in log_events if e.get("log_level", LogLevel.debug) >= LogLevel.info]
    assert client.broker.stats.refused == {"websocket": 30}
    assert len(lines) <= 3, [e.get("log_namespace") for e in lines]
    assert any("192.0.2.1" in str(e.get("peer")) for e in lines)
    assert not [e for e in lines if not e.get("log_namespace", "").startswith("mqttd.")]
    # another peer is not silenced by the first one's flood
    protocol, transport = _connection(client, host="192.0.2.9")
    protocol.dataReceived(BAD_REQUESTS[kind])
    assert any("192.0.2.9" in str(e.get("peer")) for e in log_events[len(lines):]
               if e.get("log_level", LogLevel.debug) >= LogLevel.info)


def test_autobahn_lines_are_rate_limited_without_a_broker(log_events):
    """A listener wrapping a plain factory still routes autobahn's lines through a limiter."""
    from twisted.internet.protocol import Factory, Protocol
    factory = MQTTWebSocketFactory(Factory.forProtocol(Protocol))
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    for i in range(20):
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.3", 42000 + i))
        transport = SocketTransport(peerAddress=IPv4Address("TCP", "192.0.2.3", 42000 + i))
        protocol.makeConnection(transport)
        protocol.dataReceived(BAD_REQUESTS["plain GET"])
        protocol.connectionLost(Failure(ConnectionDone()))
    lines = [e for e in log_events if e.get("log_level", LogLevel.debug) >= LogLevel.info]
    assert 1 <= len(lines) <= 3


def test_message_larger_than_the_limit_closes_the_connection():
    """A WebSocket message over max packet size + 64 KiB is refused (bounded buffering)."""
    client = WebSocketClient(broker_config={"max_packet_size": 1024})
    assert client.factory.maxMessagePayloadSize == 1024 + 64 * 1024
    client.open()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "big"), 4)))
    client.response()
    big = b"\x30" + b"\x00" * (70 * 1024)
    header = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", len(big)) + b"\x00\x00\x00\x00"
    client.protocol.dataReceived(header + big)
    frames = server_frames(client.response())
    assert frames and frames[-1][0] == 8   # close frame: 1009 message too big
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1009


def test_backpressure_reaches_the_mqtt_protocol():
    """The MQTT protocol is the socket's push producer: a full socket buffer pauses its writes."""
    client = WebSocketClient()
    client.open()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "slow-reader"), 4)))
    mqtt = client.protocol._mqtt
    assert client.transport.producer is mqtt and client.transport.streaming
    client.transport.producer.pauseProducing()
    assert not mqtt.connection.writable()
    client.transport.producer.resumeProducing()
    assert mqtt.connection.writable()


def test_reads_pause_on_the_socket_underneath():
    """pauseProducing on the adapter (an inbound limit) pauses the socket's reads."""
    client = WebSocketClient()
    client.open()
    client.protocol.pauseProducing()
    assert client.transport.producerState == "paused"
    client.protocol.resumeProducing()
    assert client.transport.producerState == "producing"


def test_server_close_unregisters_the_producer_and_sends_close():
    """When the broker closes (here: a second CONNECT) the socket is released and a close frame sent."""
    client = WebSocketClient()
    client.open()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "twice"), 4)))
    client.response()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "twice"), 4)))
    frames = server_frames(client.response())
    assert frames[-1][0] == 8
    assert client.transport.producer is None


@pytest.mark.parametrize("header, trusted, peer", [
    ("198.51.100.4", 1, "198.51.100.4:0"),
    ("198.51.100.4, 10.0.0.2", 2, "198.51.100.4:0"),
    ("203.0.113.66, 198.51.100.4", 1, "198.51.100.4:0"),   # only the last hop is trusted
    ("2001:db8::7", 1, "2001:db8::7:0"),
    ("not-an-address", 1, "192.0.2.1:40000"),
])
def test_trusted_x_forwarded_for_gives_the_client_address(header, trusted, peer):
    """Behind N trusted reverse proxies, the client is N hops from the right of X-Forwarded-For."""
    client = WebSocketClient(trust_x_forwarded_for=trusted)
    client.protocol.dataReceived(handshake(extra=f"X-Forwarded-For: {header}\r\n"))
    assert client.response().startswith(b"HTTP/1.1 101")
    client.protocol.dataReceived(client_frame(encode(Connect(4, "fwd"), 4)))
    assert client.protocol._mqtt.connection.peer == peer


def test_x_forwarded_for_is_ignored_unless_trusted():
    """By default the header is not believed: anyone can send it."""
    client = WebSocketClient()
    client.protocol.dataReceived(handshake(extra="X-Forwarded-For: 198.51.100.4\r\n"))
    client.response()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "fwd"), 4)))
    assert client.protocol._mqtt.connection.peer == "192.0.2.1:40000"


@pytest.mark.parametrize("request_head, status", [
    (b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"426"),         # plain HTTP, curl
    (b"POST /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"405"),
    (handshake().replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 7"), b"400"),
    (handshake().replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), b"400"),
])
def test_requests_autobahn_refuses_are_counted_and_logged_once(request_head, status):
    """A plain HTTP GET or a broken handshake that autobahn answers itself is still a counted,
    broker-logged websocket refusal, exactly once."""
    client = WebSocketClient()
    client.protocol.dataReceived(request_head)
    head = client.response()
    assert head.startswith(b"HTTP/1.1 " + status), head
    assert client.broker.stats.refused == {"websocket": 1}


def test_handshake_not_finished_in_time_is_counted():
    """A client that never finishes its request is dropped at the timeout and counted."""
    client = WebSocketClient()
    client.protocol.dataReceived(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    client.protocol.onOpenHandshakeTimeout()
    assert client.broker.stats.refused == {"websocket": 1}


@pytest.mark.parametrize("size", [MAX_HANDSHAKE_BYTES, 40_000, 60_000])
def test_oversized_handshake_in_one_read_is_refused(size):
    """The 16 KiB header bound holds when the whole request, terminator included, arrives in
    one read (Twisted reads up to 64 KiB at once), not only when it trickles in."""
    client = WebSocketClient()
    client.protocol.dataReceived(handshake(extra="X-Big: " + "a" * size + "\r\n"))
    assert client.response().startswith(b"HTTP/1.1 400")
    assert client.protocol._mqtt is None
    assert client.broker.stats.refused == {"websocket": 1}


def test_frames_right_behind_the_handshake_do_not_count_against_the_header_bound():
    """A small header followed at once by a 20 KiB frame (one read) is accepted."""
    client = WebSocketClient()
    connect = encode(Connect(4, "c" * 20_000), 4)
    client.protocol.dataReceived(handshake() + client_frame(connect))
    assert client.response().startswith(b"HTTP/1.1 101")
    assert client.protocol._mqtt.connection.client_id == "c" * 20_000
    assert client.broker.stats.refused == {}


class _PasswordsOnly:
    """An authenticator that refuses anonymous clients (a password file is configured)."""

    allow_anonymous = False

    def authenticate(self, request):
        return 0x86


@pytest.mark.parametrize("origin", [
    "http://evil.example", "http://evil.example:9001",     # a foreign page; DNS rebinding
    "https://127.0.0.1.evil.example", "http://localhost.evil.example:80",
    "null", "file:///home/user/page.html",
])
def test_foreign_origin_is_refused_403_while_anonymous_clients_are_admitted(origin):
    """Cross-site WebSocket hijacking (REVIEW-SEC2 N16): with anonymous clients allowed, a browser
    page of another origin gets 403, counted and logged with the origin."""
    client = WebSocketClient()           # no authenticator: everyone is admitted
    client.protocol.dataReceived(handshake(extra=f"Origin: {origin}\r\n"))
    head = client.response()
    assert head.startswith(b"HTTP/1.1 403"), head
    assert client.protocol._mqtt is None
    assert client.broker.stats.refused == {"websocket": 1}


@pytest.mark.parametrize("origin", [
    None, "http://127.0.0.1:8000", "http://localhost", "https://localhost:8443",
    "http://[::1]:3000",
])
def test_no_origin_and_loopback_pages_are_accepted_by_default(origin):
    """Node/paho send no Origin; pages served from this machine's loopback names are accepted."""
    client = WebSocketClient()
    extra = f"Origin: {origin}\r\n" if origin else ""
    client.protocol.dataReceived(handshake(extra=extra))
    assert client.response().startswith(b"HTTP/1.1 101")


def test_any_origin_once_every_client_must_log_in():
    """With anonymous clients refused a page has nothing a foreign site could borrow: any origin."""
    client = WebSocketClient(authenticator=_PasswordsOnly())
    client.protocol.dataReceived(handshake(extra="Origin: https://app.example.com\r\n"))
    assert client.response().startswith(b"HTTP/1.1 101")


def test_certificate_identity_listener_refuses_foreign_origins_even_with_passwords():
    """identityAsUsername: the browser presents the certificate by itself, so foreign origins are refused."""
    client = WebSocketClient(authenticator=_PasswordsOnly(), ambient_credentials=True)
    client.protocol.dataReceived(handshake(extra="Origin: https://app.example.com\r\n"))
    assert client.response().startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("origin, status", [
    ("https://app.example.com", b"101"), ("http://app.example.com:8080", b"101"),
    ("https://a.example.org", b"101"), ("https://example.org.evil.example", b"403"),
    ("http://127.0.0.1:8000", b"403"),    # the list replaces the default
    ("https://evil.example", b"403"),
])
def test_allowed_origins_option_lists_the_accepted_origins(origin, status):
    """allowedOrigins=app.example.com,*.example.org: exactly those hosts, any scheme and port."""
    from mqttd.transports.websocket import origin_patterns
    client = WebSocketClient(allowed_origins=origin_patterns("app.example.com,*.example.org"))
    client.protocol.dataReceived(handshake(extra=f"Origin: {origin}\r\n"))
    assert client.response().startswith(b"HTTP/1.1 " + status)


def test_allowed_origins_endpoint_option_reaches_the_factory():
    """ws:PORT:allowedOrigins=... is parsed (a scheme's colon escaped) and an empty entry refused."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor
    endpoint = serverFromString(
        MemoryReactor(), r"ws:0:interface=127.0.0.1:allowedOrigins=https\://app.example.com,*")
    assert endpoint.allowed_origins == ("https://app.example.com", "*")
    with pytest.raises(ValueError, match="empty origin"):
        serverFromString(MemoryReactor(), "ws:0:allowedOrigins=a.example,,b.example")


def _ssl_error(reason: str):
    from OpenSSL.SSL import Error
    return Error([("SSL routines", "", reason)])


def test_failed_tls_handshake_on_wss_is_a_counted_tls_refusal(log_events):
    """wss: a TLS failure gives mqtts:'s 'Refused tls ... from PEER' WARN line and refused["tls"], not autobahn's ERROR (REVIEW-SEC S7)."""
    client = WebSocketClient()
    for i in range(10):
        protocol, _transport = _connection(client, port=43000 + i)
        protocol.connectionLost(Failure(_ssl_error("peer did not return a certificate")))
    assert client.broker.stats.refused == {"tls": 10}
    lines = [e for e in log_events if e.get("log_level", LogLevel.debug) >= LogLevel.info]
    assert 1 <= len(lines) <= 3                                # the broker's rate limiter
    assert all(e["log_level"] == LogLevel.warn and e.get("what") == "tls" for e in lines)
    assert lines[0]["peer"] == "192.0.2.1:43000"
    assert "TLS failed: peer did not return a certificate" in lines[0]["detail"]
    assert not [e for e in log_events if "SSL error" in str(e.get("log_format", ""))]


def test_tls_broken_on_an_open_wss_connection_names_the_client():
    """A TLS stream that breaks after CONNECT is counted once, with the client id."""
    client = WebSocketClient()
    client.open()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "ws-tls", True, 0), 4)))
    client.protocol.connectionLost(Failure(_ssl_error("decryption failed or bad record mac")))
    assert client.broker.stats.refused == {"tls": 1}
    assert "ws-tls" not in client.broker.sessions or not client.broker.sessions["ws-tls"].online


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POLLRDHUP is Linux's")
def test_close_probe_of_held_input_finds_the_socket_under_the_websocket():
    """A held connection's probe for the client's close (REVIEW-SEC2 N1) reaches the TCP socket under the WebSocket."""
    import socket

    from mqttd.peerclosed import peer_closed
    client = WebSocketClient()
    client.open()
    client.protocol.dataReceived(client_frame(encode(Connect(4, "ws-held"), 4)))
    connection = client.protocol._mqtt.connection
    ours, theirs = socket.socketpair()
    client.transport.getHandle = lambda: ours
    try:
        assert peer_closed(connection.transport) is False
        theirs.close()
        assert peer_closed(connection.transport) is True
    finally:
        ours.close()
