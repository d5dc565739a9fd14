"""Connection-level hardening (issue 8 items 2, 3, 8): small packets before CONNECT,
memory released on close, keepalive counts complete packets, rate-limited log lines."""
from __future__ import annotations

import gc
import platform
import weakref

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import (
    Connack, Connect, Pingreq, Pingresp, Properties, Publish, Subscribe, Subscription)
from mqttd.protocol import MQTTFactory
from mqttd.ratelimit import LogRateLimiter

from core.harness import FakeClient, make_broker


# --- item 2: before CONNECT only a small packet; memory released on close ------------------

@pytest.mark.parametrize("header", [
    b"\x10\xff\xff\xff\x7f",          # CONNECT declaring 256 MiB
    b"\x10\x81\x80\x40",              # CONNECT declaring 1 MiB + 1
    b"\x30\xff\xff\xff\x07",          # any packet type: still refused from the header
])
def test_large_packet_before_connect_is_refused_from_the_fixed_header(header):
    """Before CONNECT succeeds the fixed header alone refuses a packet over
    --max-connect-packet-size: closed, nothing of the body buffered."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.send_bytes(header)
    assert c.disconnecting and c.raw() == b""
    assert c.conn.reader.buffered == 0


def test_max_connect_packet_size_is_configurable_and_lifted_after_connect():
    """A CONNECT within --max-connect-packet-size is accepted; after it the
    --max-packet-size applies (a 64 KiB PUBLISH is fine)."""
    broker, clock = make_broker(max_connect_packet_size=100)
    c = FakeClient(broker, clock)
    c.connect("c", properties=Properties())
    c.subscribe("t")
    c.publish("t", b"x" * 65536)
    assert [len(p.payload) for p in c.received() if isinstance(p, Publish)] == [65536]
    big = FakeClient(broker, clock)
    big.send(Connect(4, "b" * 200, True, 0))
    assert big.disconnecting and big.raw() == b""


class TCPLikeTransport(StringTransport):
    """Drops its protocol and producer on connection lost, as twisted.internet.tcp does."""

    def lose(self):
        protocol, self.protocol = self.protocol, None
        self.producer = None
        protocol.connectionLost(None)


def _open(factory):
    proto = factory.buildProtocol(None)
    transport = TCPLikeTransport()
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


@pytest.mark.parametrize("scenario", ["partial-connect", "connected", "protocol-error"])
def test_closed_connection_is_freed_without_the_garbage_collector(scenario):
    """With gc disabled, a closed connection's protocol, ClientConnection and buffer
    are freed at once: no reference cycle keeps them until a full GC."""
    broker, clock = make_broker()
    factory = MQTTFactory(broker)
    proto, transport = _open(factory)
    if scenario == "partial-connect":
        proto.dataReceived(b"\x10\xff\xff\x3f" + b"\x00" * 100_000)  # 1 MiB CONNECT, partial
    else:
        proto.dataReceived(encode(Connect(4, "c1", True, 60), 4))
        proto.dataReceived(encode(Subscribe(1, (Subscription("t", 1),)), 4))
        if scenario == "protocol-error":
            proto.dataReceived(b"\xc1\x00")  # PINGREQ with flags
    refs = [weakref.ref(proto), weakref.ref(proto.connection)]
    reader = proto.connection.reader
    gc.collect()
    gc.disable()
    try:
        transport.lose()
        del proto
        assert reader.buffered == 0
        if platform.python_implementation() == "PyPy":
            # no reference counting on PyPy: only its GC frees objects, so there
            # "at once" cannot be observed; nothing may still reach them, though
            gc.collect()
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


# --- item 3: keepalive counts complete packets only ---------------------------------------

def test_trickled_partial_packet_does_not_reset_keepalive():
    """A client trickling one byte of an endless packet every 2 s is closed after 1.5 x
    keepalive: only complete packets count [MQTT-3.1.2-22] (5.0), [MQTT-3.1.2-24] (3.1.1)."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("c", keepalive=10)
    c.send_bytes(b"\x30\xff\xff\x3f")               # a 1 MiB PUBLISH begins...
    for _ in range(10):
        if c.disconnecting:
            break
        clock.advance(2)
        c.send_bytes(b"x")                          # ...one byte at a time
    assert c.disconnecting
    assert clock.seconds() <= 16


def test_complete_packets_keep_the_connection_alive():
    """PINGREQ every keepalive period keeps the connection open for a long time."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("c", keepalive=10)
    for _ in range(20):
        clock.advance(10)
        c.send(Pingreq())
        assert c.received() == [Pingresp()]
    assert not c.disconnecting


def test_max_keepalive_bounds_keepalive_0_in_v5_with_server_keep_alive():
    """v5 keepalive 0 with --max-keepalive 30: CONNACK Server Keep Alive 30, enforced."""
    broker, clock = make_broker(max_keepalive=30)
    c = FakeClient(broker, clock, level=5)
    [ack] = c.connect("c", keepalive=0)
    assert ack.properties.server_keep_alive == 30
    clock.advance(44)
    assert not c.disconnecting
    clock.advance(2)
    assert c.disconnecting


@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("keepalive", [0, 31, 65535])
def test_max_keepalive_refuses_v3_keepalive_0_or_above(level, keepalive):
    """v3 cannot be told a keepalive: 0 or above --max-keepalive is refused with 0x02,
    as mosquitto does."""
    broker, clock = make_broker(max_keepalive=30)
    c = FakeClient(broker, clock, level=level)
    c.send(Connect(level, "c", True, keepalive))
    assert c.received() == [Connack(False, 0x02)] and c.disconnecting


def test_max_keepalive_accepts_v3_keepalive_within():
    """v3 keepalive within --max-keepalive is accepted unchanged."""
    broker, clock = make_broker(max_keepalive=30)
    c = FakeClient(broker, clock)
    c.connect("c", keepalive=30)
    clock.advance(44)
    assert not c.disconnecting
    clock.advance(2)
    assert c.disconnecting


# --- item 8: client-triggered log lines are rate-limited -----------------------------------

def test_log_limiter_reports_suppressed_count_in_the_next_line():
    """burst lines per key per window; the next line after a window carries the count."""
    clock = Clock()
    limiter = LogRateLimiter(clock, interval=10, burst=2, reason_burst=None)
    assert [limiter.check(("c", "r")) for _ in range(5)] == [0, 0, None, None, None]
    assert limiter.check(("d", "r")) == 0            # another client: its own budget
    clock.advance(10)
    assert limiter.check(("c", "r")) == 3
    assert limiter.check(("c", "r")) == 0


def test_log_limiter_bounds_a_reason_over_many_keys_and_its_memory():
    """A flood spread over many client ids is bounded per reason; keys are bounded; the
    next line of that reason (any client) reports what the reason bound suppressed."""
    clock = Clock()
    limiter = LogRateLimiter(clock, interval=10, burst=1, reason_burst=5, max_keys=100)
    passed = sum(limiter.check((f"c{i}", "r")) is not None for i in range(10_000))
    assert passed == 5
    assert len(limiter._windows) <= 100
    clock.advance(10)
    assert limiter.check(("someone-else", "r")) == 9_995
    assert limiter.passed + limiter.suppressed == 10_001


def test_refusals_before_a_client_id_are_limited_per_peer_host():
    """Refusals with no client id yet (TLS, WebSocket, out of descriptors) are limited per
    peer host: one host's flood never silences another host's line, whatever the caller."""
    broker, _clock = make_broker()
    lines = _Lines("mqttd.broker")
    globalLogPublisher.addObserver(lines)
    try:
        for port in range(40000, 40020):                 # one host, many source ports
            broker.refused("tls", None, f"203.0.113.7:{port}", "TLS failed: no certificate")
        broker.refused("tls", None, "198.51.100.9:5000", "TLS failed: no certificate")
        broker.refused("tls", None, "[2001:db8::1]:5000", "TLS failed")
        broker.refused("tls", None, "2001:db8::1:5001", "TLS failed")
    finally:
        globalLogPublisher.removeObserver(lines)
    peers = [event["peer"] for event in lines.events]
    assert sum(p.startswith("203.0.113.7:") for p in peers) == broker.log_limiter.burst
    assert "198.51.100.9:5000" in peers
    assert "2001:db8::1:5001" in peers
    assert broker.stats.refused["tls"] == 23


class _Lines:
    def __init__(self, namespace):
        self.namespace = namespace
        self.events = []

    def __call__(self, event):
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


def test_140000_refused_publishes_from_one_client_write_a_bounded_number_of_lines():
    """140,000 refused PUBLISHes in 8 s from one client: a handful of lines, the
    suppressed count carried by the next line (issue 8 item 8)."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("flood")
    chunk = encode(Publish("$SYS/x", b"p", 0), 4) * 1750
    with _Lines("mqttd.connection") as lines:
        for _ in range(80):
            c.send_bytes(chunk)
            clock.advance(0.1)
        clock.advance(10)
        c.publish("$SYS/x", b"p")
    assert not c.disconnecting
    assert 1 <= len(lines.events) <= 10
    suppressed = sum(e["suppressed"] for e in lines.events)
    assert suppressed + len(lines.events) == 140_001
    assert lines.events[-1]["suppressed"] > 0


def test_malformed_packets_from_reconnecting_host_write_a_bounded_number_of_lines():
    """5,000 connections from one host, each closed for a malformed packet: bounded lines."""
    broker, clock = make_broker()
    with _Lines("mqttd.connection") as lines:
        for i in range(5000):
            t = StringTransport()
            from mqttd.connection import ClientConnection
            conn = ClientConnection(broker, t, clock, peer=f"10.0.0.1:{1000 + i}")
            conn.data_received(b"\xf0\x00")
            assert t.disconnecting
            conn.connection_lost(None)
    assert broker.stats.protocol_errors == 5000
    assert len(lines.events) <= 5


def test_unknown_acknowledgements_write_a_bounded_number_of_lines():
    """10,000 PUBACKs for unknown packet ids: not a close, and at most a few log lines."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("acker")
    with _Lines("mqttd.connection") as lines:
        c.send_bytes(b"".join(bytes((0x40, 2, i >> 8, i & 0xFF)) for i in range(1, 10_001)))
    assert not c.disconnecting
    assert 1 <= len(lines.events) <= 3


def test_log_limiter_line_suppressed_by_its_reason_keeps_no_window_of_its_own():
    """In a flood over many keys (a connection storm) the reason bound suppresses the
    line before a window per key is made: memory and time stay flat."""
    clock = Clock()
    limiter = LogRateLimiter(clock, interval=10, burst=3, reason_burst=5, max_keys=10_000)
    for i in range(1000):
        limiter.check((f"c{i}", "clientConnected"))
    assert len(limiter._windows) == 5
    assert limiter.suppressed == 995
