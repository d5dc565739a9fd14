"""Sockets before CONNECT: limits enforced at accept (REVIEW-SEC S6).

25 idle sockets to a 20-connection broker stayed open and made every real
CONNECT wait 10 s for 0x03; now over-limit sockets are closed at accept, one
address holds at most max_pending_connections_per_address half-open sockets,
and idle half-open sockets make room for newcomers.
"""
from __future__ import annotations

import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect
from mqttd.protocol import MQTTFactory, admission_of
from tests.core.harness import make_broker
from tests.transports.test_proxy import v1_header


def _socket(factory, host, port=40000):
    address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def _connect(protocol, transport, client_id):
    protocol.dataReceived(encode(Connect(4, client_id, True, 0), 4))
    (connack,) = PacketReader(level=4).feed(transport.value())
    return connack


def _close(protocol, transport):
    """What the reactor does after abortConnection."""
    protocol.connectionLost(None)


def test_sockets_over_max_connections_are_closed_at_accept():
    """At max_connections with every slot a connected client, the next socket is closed at once."""
    broker, clock = make_broker(max_connections=3)
    factory = MQTTFactory(broker, clock=clock)
    for n in range(3):
        protocol, transport = _socket(factory, f"192.0.2.{n}")
        assert _connect(protocol, transport, f"c{n}").reason_code == 0
    protocol, transport = _socket(factory, "192.0.2.9")
    assert transport.disconnecting and transport.value() == b""
    assert broker.stats.refused["max-connections"] == 1
    _close(protocol, transport)
    assert broker.open_connections == 3


def test_idle_sockets_from_one_address_cannot_lock_out_others():
    """20 idle sockets from one address fill a 20-slot broker: a newcomer still gets in, one idle socket is closed for it."""
    broker, clock = make_broker(max_connections=20)
    factory = MQTTFactory(broker, clock=clock)
    idle = [_socket(factory, "203.0.113.7", 30000 + n) for n in range(20)]
    protocol, transport = _socket(factory, "198.51.100.1")
    assert not transport.disconnecting
    evicted = [(p, t) for p, t in idle if t.disconnecting]
    assert len(evicted) == 1 and evicted[0][0] is idle[0][0]   # the oldest of the heaviest
    _close(*evicted[0])
    assert _connect(protocol, transport, "legit").reason_code == 0
    assert broker.stats.refused["max-connections"] == 1


def test_room_is_made_once_per_newcomer_while_closes_complete():
    """Two newcomers in one reactor turn close two idle sockets, not three (a closing one still counts as open)."""
    broker, clock = make_broker(max_connections=10)
    factory = MQTTFactory(broker, clock=clock)
    idle = [_socket(factory, "203.0.113.7", 30000 + n) for n in range(10)]
    _socket(factory, "198.51.100.1")
    _socket(factory, "198.51.100.2")
    assert sum(t.disconnecting for _p, t in idle) == 2
    for p, t in idle:
        if t.disconnecting:
            _close(p, t)
    assert admission_of(broker, clock).evicting == 0 and broker.open_connections == 10


def test_connected_clients_are_never_closed_to_make_room():
    """Only half-open sockets make room; a lone fresh half-open socket per address is spared."""
    broker, clock = make_broker(max_connections=3)
    factory = MQTTFactory(broker, clock=clock)
    protocol, transport = _socket(factory, "192.0.2.1")
    assert _connect(protocol, transport, "c1").reason_code == 0
    fresh = [_socket(factory, f"192.0.2.{n}") for n in (2, 3)]
    late, late_transport = _socket(factory, "192.0.2.4")
    assert late_transport.disconnecting                      # nobody to evict
    assert not transport.disconnecting and not any(t.disconnecting for _p, t in fresh)
    _close(late, late_transport)
    clock.advance(1.5)                                         # now they are idle
    _newer, newer_transport = _socket(factory, "192.0.2.5")
    assert not newer_transport.disconnecting
    assert fresh[0][1].disconnecting and not transport.disconnecting


def test_a_burst_of_fresh_connections_from_one_address_is_not_refused():
    """100 sockets at once from one address (a load test, a gateway): all accepted, their CONNECTs follow."""
    broker, clock = make_broker(max_pending_connections_per_address=4)
    factory = MQTTFactory(broker, clock=clock)
    sockets = [_socket(factory, "127.0.0.1", 30000 + n) for n in range(100)]
    assert not any(t.disconnecting for _p, t in sockets)
    for n, (protocol, transport) in enumerate(sockets):
        assert _connect(protocol, transport, f"sub{n}").reason_code == 0


def test_one_address_holds_at_most_its_half_open_quota():
    """max_pending_connections_per_address idle sockets per address; more are closed at accept, counted."""
    broker, clock = make_broker(max_pending_connections_per_address=4)
    factory = MQTTFactory(broker, clock=clock)
    sockets = [_socket(factory, "203.0.113.7", 30000 + n) for n in range(4)]
    clock.advance(1.0)                          # idle now: they count
    sockets.append(_socket(factory, "203.0.113.7", 30004))
    assert [t.disconnecting for _p, t in sockets] == [False] * 4 + [True]
    assert broker.stats.refused["max-pending-connections"] == 1
    _close(*sockets[4])
    _other, other_transport = _socket(factory, "198.51.100.1")
    assert not other_transport.disconnecting
    # a CONNECT ends the half-open state: the address may open another
    assert _connect(*sockets[0], "d0").reason_code == 0
    _again, again_transport = _socket(factory, "203.0.113.7", 31000)
    assert not again_transport.disconnecting
    assert admission_of(broker, clock).pending("203.0.113.7") == 4


def test_closed_half_open_sockets_are_forgotten():
    """The quota counts open sockets only: a closed one frees its place."""
    broker, clock = make_broker(max_pending_connections_per_address=1)
    factory = MQTTFactory(broker, clock=clock)
    first = _socket(factory, "203.0.113.7")
    _close(*first)
    _second, second_transport = _socket(factory, "203.0.113.7", 40001)
    assert not second_transport.disconnecting
    assert len(admission_of(broker, clock)) == 1


def test_behind_a_proxy_header_sockets_count_under_the_client_address():
    """haproxy: the balancer's address holds no quota; the real client's does, once the header names it."""
    from mqttd.transports.proxy import CountedHAProxyWrappingFactory

    broker, clock = make_broker(max_pending_connections_per_address=2)
    factory = CountedHAProxyWrappingFactory(MQTTFactory(broker, clock=clock), broker)

    def proxied(client_host, port):
        address = IPv4Address("TCP", "10.0.0.1", port)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(v1_header(client_host, 5000 + port) + b"\x10")  # CONNECT's 1st byte
        return transport

    many = [proxied(f"198.51.100.{n}", n) for n in range(10)]  # ten clients, one balancer
    clock.advance(1)
    assert not any(t.disconnecting for t in many)
    same = [proxied("203.0.113.7", 100 + n) for n in range(2)]
    clock.advance(1)
    same.append(proxied("203.0.113.7", 102))
    assert [t.disconnecting for t in same] == [False, False, True]
    assert broker.stats.refused["max-pending-connections"] == 1


def test_a_full_connect_through_the_admission_gets_its_connack():
    """The ordinary road is unchanged: accept, CONNECT, CONNACK 0; nothing left half-open."""
    broker, clock = make_broker(max_connections=10)
    factory = MQTTFactory(broker, clock=clock)
    protocol, transport = _socket(factory, "192.0.2.1")
    connack = _connect(protocol, transport, "ok")
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert len(admission_of(broker, clock)) == 0


@pytest_twisted.inlineCallbacks
def test_real_listener_idle_sockets_do_not_lock_out_a_client():
    """Over real sockets on 127.0.0.1: 6 idle sockets on a 5-connection broker; the 6th is closed, a real CONNECT still gets CONNACK 0 at once."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from mqttd.broker import BrokerConfig
    from mqttd.service import make_broker_service
    from tests.transports.test_tls import WAIT, Probe

    service = make_broker_service(reactor, listen=["tcp:0:interface=127.0.0.1"],
                                  store="memory", sys_interval=0,
                                  config=BrokerConfig(max_connections=5))
    yield service.startService()
    try:
        port = service.ports[0].getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        idle = []
        for _ in range(6):
            probe = yield connectProtocol(endpoint, Probe()).addTimeout(WAIT, reactor)
            idle.append(probe)
        # the 6th made room by closing the oldest idle one (all from one address)
        yield idle[0].lost
        client = yield connectProtocol(endpoint, Probe()).addTimeout(WAIT, reactor)
        client.send(Connect(4, "legit", True, 0))
        connack = yield client.next_packet()
        assert isinstance(connack, Connack) and connack.reason_code == 0
        assert service.broker.stats.refused["max-connections"] >= 2
        for probe in idle[1:] + [client]:
            probe.transport.loseConnection()
    finally:
        yield service.stopService()


def test_ipv6_addresses_of_one_64_share_the_half_open_quota():
    """A client with a /64 has 2^64 addresses: its half-open sockets count under the /64."""
    broker, clock = make_broker(max_pending_connections_per_address=4)
    factory = MQTTFactory(broker, clock=clock)
    sockets = [_socket(factory, f"2001:db8:1:2::{n + 1:x}") for n in range(4)]
    clock.advance(1.0)
    protocol, transport = _socket(factory, "2001:db8:1:2:ffff::9")
    assert transport.disconnecting
    assert broker.stats.refused["max-pending-connections"] == 1
    _close(protocol, transport)
    _other, other_transport = _socket(factory, "2001:db8:1:3::1")   # another /64
    assert not other_transport.disconnecting
    assert admission_of(broker, clock).pending("2001:db8:1:2::/64") == 4
