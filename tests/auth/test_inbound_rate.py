"""The per-client inbound rate limit (--max-inbound-rate, --max-inbound-bytes-rate)."""
from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from mqttd.codec import encode
from mqttd.codec.packets import Connect, Pingreq, Pingresp, Publish
from mqttd.ratelimit import BucketMemory, InboundBucket
from tests.core.harness import FakeClient, make_broker


def _tiny_publishes(count: int, topic: str = "t") -> bytes:
    """``count`` QoS 0 PUBLISHes to a one-letter topic, 5 bytes each, in one buffer."""
    return b"".join(bytes((0x30, 3, 0, 1, ord(topic))) for _ in range(count))


def _subscriber(broker, clock, topic="t"):
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe(topic)
    return sub


def _delivered(sub) -> int:
    return sum(1 for p in sub.received() if isinstance(p, Publish))


def test_rate_limit_stops_inside_one_read_and_bounds_what_subscribers_get():
    """3000 PUBLISHes in one read at 10/s: 10 reach the subscriber at once, then 10 a second."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.send_bytes(_tiny_publishes(3000))
    assert _delivered(sub) == 10                      # the bucket's depth: one second
    assert pub.conn.input_blocked                     # held: backpressure, not a disconnect
    assert not pub.disconnecting
    total = 10
    for second in range(1, 6):
        for _ in range(10):
            clock.advance(0.1)
        total += _delivered(sub)
        assert total <= 10 + 10 * second + 1
    assert total >= 55
    assert pub.conn.input_blocked                     # 2,940 still wait (one slice decoded)
    assert broker.stats.refused["inbound-rate"] == 1  # one throttled stretch, one count


def test_rate_limited_connection_resumes_reading_once_its_backlog_passed():
    """When the held-back packets have passed, the transport is read again."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.send_bytes(_tiny_publishes(15))
    assert _delivered(sub) == 10
    assert pub.conn.input_blocked
    clock.advance(1.0)
    clock.advance(1.0)
    assert _delivered(sub) == 5
    assert not pub.conn.input_blocked
    assert pub.transport.producerState == "producing"


def test_rate_limit_keeps_the_order_of_packets_behind_a_held_publish():
    """A PINGREQ read after throttled PUBLISHes is answered only after they passed."""
    broker, clock = make_broker(max_inbound_rate=2)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.send_bytes(_tiny_publishes(4) + bytes((0xC0, 0)))
    assert pub.received() == []
    clock.advance(1.0)
    assert pub.received() == [Pingresp()]


def test_bytes_rate_limit_stops_inside_one_read():
    """At 100 bytes/s, PUBLISHes of 55 bytes: one passes, the next waits for the refill."""
    broker, clock = make_broker(max_inbound_bytes_rate=100)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    data = b"".join(bytes((0x30, 53, 0, 1, ord("t"))) + b"x" * 50 for _ in range(4))
    pub.send_bytes(data)
    assert _delivered(sub) == 1
    assert pub.conn.input_blocked
    clock.advance(0.6)
    assert _delivered(sub) == 1


def test_publish_larger_than_the_bytes_bucket_passes_when_it_is_full():
    """A packet above one second's bytes is not stuck forever: it passes and leaves a debt."""
    broker, clock = make_broker(max_inbound_bytes_rate=100)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t", b"x" * 300)
    pub.publish("t", b"y")
    assert _delivered(sub) == 1
    assert pub.conn.input_blocked
    clock.advance(3.5)                                 # the debt of ~205 bytes is repaid
    assert _delivered(sub) == 1


def test_reconnect_under_a_new_client_id_gets_no_fresh_allowance():
    """The bucket a client left is carried to the next connection from its host."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    for n in range(6):
        pub = FakeClient(broker, clock)
        pub.connect(f"bp{n}")
        pub.send_bytes(_tiny_publishes(2500))
        clock.advance(0.05)
        pub.drop()
    # 10 (the depth) + what 0.3 s refill allows, not 6 × (10 + ...)
    assert _delivered(sub) <= 10 + 3 + 1


def test_reconnect_of_the_same_client_id_from_another_host_gets_no_fresh_allowance():
    """The bucket is remembered under the client id as well."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("same")
    pub.send_bytes(_tiny_publishes(100))
    pub.drop()
    again = FakeClient(broker, clock)
    again.conn.peer = "192.0.2.9:4000"
    again.connect("same")
    again.send_bytes(_tiny_publishes(100))
    assert _delivered(sub) == 10


def test_other_hosts_and_clients_keep_their_own_allowance():
    """One client's exhausted bucket does not slow an unrelated client."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("greedy")
    pub.send_bytes(_tiny_publishes(100))
    pub.drop()
    other = FakeClient(broker, clock)
    other.conn.peer = "192.0.2.9:4000"
    other.connect("other")
    other.send_bytes(_tiny_publishes(10))
    assert _delivered(sub) == 20


def test_remembered_buckets_expire_once_refilled():
    """A state is only kept until its bucket would be full again: a later reconnect starts full."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.send_bytes(_tiny_publishes(10))
    pub.drop()
    clock.advance(1.0)
    again = FakeClient(broker, clock)
    again.connect("p")
    again.send_bytes(_tiny_publishes(10))
    assert _delivered(sub) == 20


def test_bucket_memory_is_bounded():
    """At most max_entries keys are remembered (the oldest go first)."""
    clock = Clock()
    memory = BucketMemory(max_entries=100)
    for n in range(1000):
        bucket = InboundBucket(10, 0, clock.seconds())
        bucket.take(5, clock.seconds())
        memory.remember([("client", f"c{n}"), ("host", f"h{n}")], bucket, clock.seconds())
    assert len(memory) <= 100


def test_no_bucket_without_a_configured_limit():
    """Without --max-inbound-rate nothing is charged (zero cost on the hot path)."""
    broker, clock = make_broker()
    pub = FakeClient(broker, clock)
    pub.connect("p")
    assert pub.conn._bucket is None
    pub.send_bytes(_tiny_publishes(3000))
    assert pub.transport.producerState == "producing"
    assert len(broker.inbound_memory) == 0


@pytest_twisted.inlineCallbacks
def test_real_publisher_writing_3000_publishes_at_once_reaches_subscribers_at_the_rate():
    """Over real sockets: one 15 KB write of 3000 PUBLISHes at 10/s; the subscriber gets the bucket's depth, not 3000 (REVIEW-SEC S5)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.task import deferLater

    from mqttd.broker import BrokerConfig
    from mqttd.codec.packets import Connect, Subscribe, Subscription
    from mqttd.service import make_broker_service
    from tests.transports.test_tls import WAIT, Probe

    service = make_broker_service(reactor, listen=["tcp:0:interface=127.0.0.1"],
                                  store="memory", sys_interval=0,
                                  config=BrokerConfig(max_inbound_rate=10))
    yield service.startService()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", service.ports[0].getHost().port)
        sub = yield connectProtocol(endpoint, Probe()).addTimeout(WAIT, reactor)
        sub.send(Connect(4, "sub", True, 0))
        sub.send(Subscribe(1, (Subscription("t", 0),)))
        pub = yield connectProtocol(endpoint, Probe()).addTimeout(WAIT, reactor)
        pub.send(Connect(4, "pub", True, 0))
        yield sub.next_packet()                # CONNACK
        yield sub.next_packet()                # SUBACK
        yield pub.next_packet()                # CONNACK
        pub.transport.write(_tiny_publishes(3000))
        for _ in range(100):                   # bounded: until the first ones arrived
            if sub.packets:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.3, lambda: None)
        delivered = sum(1 for p in sub.packets if isinstance(p, Publish))
        # at most the depth (10) plus what 0.3 s + the wait above refill: never thousands
        assert 1 <= delivered <= 10 + 10 * 1.5
        assert service.broker.stats.refused["inbound-rate"] == 1
        for probe in (sub, pub):
            probe.transport.loseConnection()
    finally:
        yield service.stopService()


def test_host_buckets_are_released_with_the_last_connection_of_the_host():
    """The live bucket table holds one entry per host with live connections, no more."""
    broker, clock = make_broker(max_inbound_rate=10)
    clients = []
    for n in range(3):
        pub = FakeClient(broker, clock)
        pub.conn.peer = f"192.0.2.{n % 2}:4000"
        pub.connect(f"h{n}")
        clients.append(pub)
    assert len(broker.inbound_buckets) == 2
    assert clients[0].conn._bucket is clients[2].conn._bucket
    clients[0].drop()
    assert len(broker.inbound_buckets) == 2
    clients[2].drop()
    clients[1].drop()
    assert len(broker.inbound_buckets) == 0


def test_wills_are_charged_to_the_inbound_bucket():
    """Connecting with a will and dropping the socket 50 times at 5/s publishes a bucket's worth, not 50 (REVIEW-S9 R14)."""
    from mqttd.codec.packets import Will
    broker, clock = make_broker(max_inbound_rate=5)
    sub = _subscriber(broker, clock, topic="wr/#")
    for _ in range(50):
        dev = FakeClient(broker, clock)
        dev.connect("wr-pub", will=Will("wr/dead", b"gone", 0, False))
        dev.drop()
    assert _delivered(sub) <= 5 + 1
    assert broker.stats.dropped["inbound-rate-will"] >= 44
    clock.advance(2.0)                                   # refilled: the next will passes
    dev = FakeClient(broker, clock)
    dev.connect("wr-pub", will=Will("wr/dead", b"gone", 0, False))
    dev.drop()
    assert _delivered(sub) == 1


def test_v5_disconnect_with_will_is_charged_too():
    """DISCONNECT 0x04 publishes the will through the same bucket."""
    from mqttd.codec.packets import Disconnect, Will
    broker, clock = make_broker(max_inbound_rate=2)
    sub = _subscriber(broker, clock, topic="wr/#")
    for _ in range(10):
        dev = FakeClient(broker, clock, level=5)
        dev.connect("wr5", will=Will("wr/dead", b"gone", 0, False))
        dev.send(Disconnect(0x04))
    assert _delivered(sub) <= 2 + 1


def _connect_bytes(client_id: str, level: int = 4, **fields) -> bytes:
    return encode(Connect(level, client_id, True, 0, **fields), level)


def test_publishes_read_together_with_the_connect_are_charged():
    """CONNECT + 2,500 PUBLISHes in one write pass at the rate, not the whole first read (REVIEW-S10 S1)."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.send_bytes(_connect_bytes("pipelined") + _tiny_publishes(2500))
    assert _delivered(sub) == 10                      # the bucket's depth, not ~1,600
    assert pub.conn.input_blocked and not pub.disconnecting
    clock.advance(1.0)
    assert _delivered(sub) <= 10 + 1


def test_short_pipelined_bursts_on_new_connections_share_the_host_rate():
    """50 connections, each CONNECT + 900 PUBLISHes (< 8 KiB) in one write then closed: one host's rate (REVIEW-S10 S1)."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    for n in range(50):
        pub = FakeClient(broker, clock)
        pub.send_bytes(_connect_bytes(f"burst{n}") + _tiny_publishes(900))
        clock.advance(0.01)
        pub.drop()
    assert _delivered(sub) <= 10 + 5 + 1              # depth + 0.5 s of refill


def test_v5_connect_and_publishes_in_one_read_with_bytes_limit_are_charged():
    """The bytes bucket also meters the PUBLISHes of the CONNECT's read (v5; REVIEW-S10 S1)."""
    broker, clock = make_broker(max_inbound_bytes_rate=100)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock, level=5)
    data = b"".join(bytes((0x30, 54, 0, 1, ord("t"), 0)) + b"x" * 50 for _ in range(10))
    pub.send_bytes(_connect_bytes("v5pipe", level=5) + data)
    assert _delivered(sub) == 1
    assert pub.conn.input_blocked


def test_publishes_pipelined_behind_a_pending_authenticate_are_charged():
    """CONNECT + PUBLISHes in one read wait for a Deferred authenticate, then pass at the rate (REVIEW-S10 S1)."""
    from twisted.internet import defer

    class _Auth:
        def authenticate(self, request):
            return pending

    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pending = defer.Deferred()
    broker.authenticator = _Auth()
    pub = FakeClient(broker, clock)
    pub.send_bytes(_connect_bytes("late", username="u", password=b"p") + _tiny_publishes(500))
    assert _delivered(sub) == 0
    pending.callback("u")
    assert _delivered(sub) == 10
    assert pub.conn.input_blocked and not pub.disconnecting
