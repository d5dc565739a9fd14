"""Held input over real sockets (REVIEW-SEC2 N1, N2, N8, N11): what the unit
tests in test_held_input.py show with a simulated socket, here with the
reactor's own TCP transport, whose paused reads really hide the client's FIN."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater

from mqttd.broker import BrokerConfig
from mqttd.codec.packets import Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, \
    Publish, Subscribe, Subscription, Will
from mqttd.service import make_broker_service
from tests.transports.test_tls import WAIT, Probe


def _tiny_publishes(count: int, topic: str = "t") -> bytes:
    return b"".join(bytes((0x30, 3, 0, 1, ord(topic))) for _ in range(count))


@pytest_twisted.inlineCallbacks
def _start(authorizer=None, **config):
    service = make_broker_service(reactor, listen=["tcp:0:interface=127.0.0.1"],
                                  store="memory", sys_interval=0, authorizer=authorizer,
                                  config=BrokerConfig(**config))
    yield service.startService()
    return service


@pytest_twisted.inlineCallbacks
def _client(service, client_id, **connect):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", service.ports[0].getHost().port)
    probe = yield connectProtocol(endpoint, Probe(level=connect.pop("level", 4)))
    probe.send(Connect(probe.level, client_id, True, connect.pop("keepalive", 0), **connect))
    connack = yield probe.next_packet()
    assert isinstance(connack, Connack) and connack.reason_code == 0, connack
    return probe


@pytest_twisted.inlineCallbacks
def _until(condition, seconds=WAIT):
    """Wait (bounded) until ``condition()`` holds; returns whether it did."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        yield deferLater(reactor, 0.02, lambda: None)
    return condition()


def _close_all(*probes):
    for probe in probes:
        if probe.transport is not None and probe.transport.connected:
            probe.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def _zombie(close: str, count: int):
    """A client writes ``count`` tiny PUBLISHes at 10/s and goes away: the
    broker has noticed within 3 s, dropped (counted) what it held, and nothing
    more of it reaches the subscriber."""
    service = yield _start(max_inbound_rate=10)
    try:
        broker = service.broker
        sub = yield _client(service, "sub")
        sub.send(Subscribe(1, (Subscription("t", 0),)))
        yield sub.next_packet()                               # SUBACK
        pub = yield _client(service, "zombie")
        pub.transport.write(_tiny_publishes(count))
        assert (yield _until(lambda: len(sub.packets) >= 5))
        if close == "fin":
            pub.transport.loseConnection()
        else:
            pub.transport.abortConnection()
        yield pub.lost
        assert (yield _until(lambda: broker.open_connections == 1, seconds=3.0))
        assert broker.stats.dropped.get("held-input", 0) > 1000
        got = len(sub.packets)
        yield deferLater(reactor, 0.5, lambda: None)
        assert len(sub.packets) == got                        # nothing more from the dead client
        _close_all(sub)
    finally:
        yield service.stopService()


def test_client_closing_behind_a_held_backlog_is_gone_at_once():
    """150 KB of PUBLISHes at 10/s, then FIN: noticed behind the paused reads (N1), not in 50 minutes."""
    return _zombie("fin", 30_000)


def test_client_resetting_behind_a_large_held_backlog_is_gone_at_once():
    """1 MB of PUBLISHes at 10/s (more than the socket buffers: the FIN could not be sent), then RST (N1)."""
    return _zombie("rst", 200_000)


@pytest_twisted.inlineCallbacks
def test_two_connections_from_one_host_share_its_rate():
    """Two live connections from 127.0.0.1 get one bucket's depth between them (N1)."""
    service = yield _start(max_inbound_rate=10)
    try:
        sub = yield _client(service, "sub")
        sub.send(Subscribe(1, (Subscription("t", 0),)))
        yield sub.next_packet()
        one = yield _client(service, "one")
        two = yield _client(service, "two")
        one.transport.write(_tiny_publishes(100))
        two.transport.write(_tiny_publishes(100))
        assert (yield _until(lambda: len(sub.packets) >= 10))
        yield deferLater(reactor, 0.2, lambda: None)
        assert len(sub.packets) <= 10 + 4                     # not 2 x 10
        _close_all(sub, one, two)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_rate_limited_client_that_pings_on_time_is_not_disconnected():
    """Keepalive 1 s, a 19 s bytes-rate debt, a PINGREQ every 0.4 s: still connected after 2.5 s (N2)."""
    service = yield _start(max_inbound_bytes_rate=1000)
    try:
        client = yield _client(service, "rk2", keepalive=1)
        client.send(Publish("t", b"x" * 20_000, 0, False))
        client.send(Publish("t", b"y", 0, False))
        for _ in range(6):
            client.send(Pingreq())
            yield deferLater(reactor, 0.4, lambda: None)
            assert not client.lost.called
        assert Pingresp() not in client.packets               # delayed behind the held PUBLISH
        _close_all(client)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_slow_publish_authorizer_does_not_disconnect_a_client_that_pings_on_time():
    """Keepalive 1 s, authorize_publish answers after 2.5 s, a PINGREQ every 0.4 s: connected, PUBACK before PINGRESPs (N2 addendum)."""
    class Slow:
        def authorize_publish(self, client, message):
            return deferLater(reactor, 2.5, lambda: True) if message.topic == "slow" else True

    service = yield _start(authorizer=Slow(), hook_timeout=20)
    try:
        client = yield _client(service, "hk", keepalive=1)
        client.send(Publish("slow", b"x", 1, False, packet_id=1))
        for _ in range(8):                                    # 3.2 s
            client.send(Pingreq())
            yield deferLater(reactor, 0.4, lambda: None)
            assert not client.lost.called
        assert client.packets[0] == Puback(1)                 # in order: then the PINGRESPs
        assert Pingresp() in client.packets[1:]
        _close_all(client)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_disconnect_behind_held_publishes_then_reconnect_publishes_no_will():
    """A normal DISCONNECT held behind rate-limited PUBLISHes still discards the will (N11)."""
    service = yield _start(max_inbound_rate=10)
    try:
        broker = service.broker
        watcher = yield _client(service, "watcher")
        watcher.send(Subscribe(1, (Subscription("wt/#", 0),)))
        yield watcher.next_packet()
        dev = yield _client(service, "dev7", will=Will("wt/dead", b"dev7 died"))
        burst = b"".join(bytes((0x30, 9, 0, 7)) + b"wt/data" for _ in range(50))
        dev.transport.write(burst + bytes((0xE0, 0)))
        yield deferLater(reactor, 0.1, lambda: None)
        dev.transport.loseConnection()
        yield dev.lost
        assert (yield _until(lambda: broker.open_connections == 1, seconds=3.0))
        again = yield _client(service, "dev7")
        yield deferLater(reactor, 0.3, lambda: None)
        topics = [p.topic for p in watcher.packets if isinstance(p, Publish)]
        assert "wt/dead" not in topics
        assert broker.stats.dropped["held-input"] == 50 - topics.count("wt/data")
        _close_all(watcher, again)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_connect_over_64_kib_is_closed_by_default_and_a_normal_one_passes():
    """The default pre-CONNECT limit is 64 KiB (N8): a 70 KB CONNECT is closed, one with a 16 KiB will passes."""
    service = yield _start()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", service.ports[0].getHost().port)
        big = yield connectProtocol(endpoint, Probe())
        big.send(Connect(4, "big", True, 0, will=Will("w", b"x" * 60_000),
                         username="u", password=b"p" * 10_000))   # 70 KB
        yield big.lost
        assert big.packets == []
        fine = yield _client(service, "fine", will=Will("w", b"x" * 16 * 1024))
        fine.send(Disconnect())
        yield fine.lost
    finally:
        yield service.stopService()
