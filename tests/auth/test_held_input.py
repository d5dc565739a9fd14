"""Input a connection has read but not yet handled (held by the inbound rate
limit, a pending hook answer or a congested subscriber): a client that closes
is noticed and its held packets dropped (REVIEW-SEC2 N1), held memory is
bounded, one host's connections share one inbound bucket, the keepalive clock
stops while the broker is not reading (N2), and a held DISCONNECT still
discards the will (N11)."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.broker import BrokerConfig
from mqttd.codec.packets import (
    Connect, Disconnect, Pingreq, Pingresp, Puback, Publish, Will)
from tests.core.harness import FakeClient, make_broker

#: what one read of a real TCP transport delivers at most (Twisted's read size)
READ_SIZE = 65536


class Wire:
    """The client's end of a TCP socket: what the client wrote waits "in the
    kernel" until the broker's transport reads it -- never while the transport
    is paused, at most 64 KiB per read -- and the close (FIN) is seen only
    after every byte before it was read, as with a real socket.  ``probe`` is
    what a peer-closed check of the socket answers (it sees the FIN at once)."""

    def __init__(self, client: FakeClient):
        self.client = client
        self.kernel = bytearray()
        self.fin = False
        self.lost = False
        client.conn.peer_closed = lambda: self.fin

    def write(self, data: bytes) -> None:
        self.kernel += data
        self.pump()

    def send(self, *packets) -> None:
        from mqttd.codec import encode
        self.write(b"".join(encode(p, self.client.level) for p in packets))

    def close(self) -> None:
        self.fin = True
        self.pump()

    def pump(self) -> None:
        transport = self.client.transport
        for _ in range(100_000):    # bounded
            if self.lost:
                return
            if transport.disconnecting:
                self.lost = True                 # the server closed: its connectionLost
                self.client.conn.connection_lost(None)
                return
            if transport.producerState == "paused":
                return
            if self.kernel:
                chunk = bytes(self.kernel[:READ_SIZE])
                del self.kernel[:READ_SIZE]
                self.client.conn.data_received(chunk)
                continue
            if self.fin:
                self.lost = True
                self.client.conn.connection_lost(None)
            return


def _advance(clock, wires, seconds: float, step: float = 0.05) -> None:
    """Advance time in small steps, letting each wire deliver what may be read."""
    for _ in range(int(round(seconds / step))):
        clock.advance(step)
        for wire in wires:
            wire.pump()


def _tiny_publishes(count: int, topic: str = "t") -> bytes:
    """``count`` QoS 0 PUBLISHes to a one-letter topic, 5 bytes each."""
    return b"".join(bytes((0x30, 3, 0, 1, ord(topic))) for _ in range(count))


def _delivered(sub, topic=None) -> int:
    return sum(1 for p in sub.received()
               if isinstance(p, Publish) and (topic is None or p.topic == topic))


def _subscriber(broker, clock, topic="t"):
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe(topic)
    return sub


def _lines(log_events, text):
    from twisted.logger import formatEvent
    return [e for e in log_events if text in formatEvent(e)]


# --- N1: a client that closes while its input is held ---------------------------------

def test_client_closing_during_a_rate_pause_ends_its_connection_at_once(log_events):
    """A closed client's held PUBLISHes are not published for minutes by a zombie (N1)."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("zombie")
    wire = Wire(pub)
    wire.write(_tiny_publishes(2500))
    assert _delivered(sub) == 10
    wire.close()
    assert wire.lost                                   # the FIN was read: connection over
    assert broker.sessions.get("zombie") is None or broker.sessions["zombie"].connection is None
    _advance(clock, [wire], 5)
    assert _delivered(sub) == 0                        # nothing more from the dead client
    assert broker.stats.dropped["held-input"] == 2490
    assert len(_lines(log_events, "2490 packets it had sent")) == 1


def test_client_closing_behind_more_than_the_hold_bound_is_noticed_by_the_probe():
    """Paused at the hold bound (so the FIN stays unread), the peer-closed probe ends it (N1)."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("big")
    wire = Wire(pub)
    wire.write(_tiny_publishes(100_000))               # 500 KB: far more than is held
    assert pub.transport.producerState == "paused"     # the rest stays in the socket
    assert len(wire.kernel) > 300_000
    wire.close()
    assert not wire.lost                               # the FIN is behind unread bytes
    _advance(clock, [wire], 2)
    assert pub.disconnecting                           # the probe saw it: closed
    _advance(clock, [wire], 5)
    assert _delivered(sub) <= 10 + 20 + 1              # depth + at most 2 s of rate
    assert broker.stats.dropped["held-input"] > 0


def test_held_input_is_bounded_in_decoded_packets_and_raw_bytes():
    """One huge read (a WebSocket message, a TLS record) is not decoded whole while paused (N1)."""
    broker, clock = make_broker(max_inbound_rate=10)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.send_bytes(_tiny_publishes(200_000))           # 1 MB in one data_received
    conn = pub.conn
    assert len(conn._stash) <= 8192 // 5 + 1            # decoded: one slice of 8 KiB at most
    assert pub.transport.producerState == "paused"
    # later reads while paused are kept raw, not decoded
    pub.send_bytes(_tiny_publishes(1000))
    assert len(conn._stash) <= 8192 // 5 + 1


def test_connections_from_one_host_share_one_inbound_bucket():
    """N connections from one host get one rate, not N (N1, docs/security.rst)."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    clients = []
    for n in range(5):
        pub = FakeClient(broker, clock)
        pub.connect(f"same-host-{n}")
        clients.append(pub)
    for pub in clients:
        pub.send_bytes(_tiny_publishes(100))
    assert _delivered(sub) == 10                        # one bucket's depth in all
    for _ in range(20):
        clock.advance(0.1)
    assert _delivered(sub) <= 20 + 1                    # and one rate for 2 s


def _three_of_one_host(prefix):
    """A broker at 10 PUBLISH/s, a subscriber to ``#`` and three connected publishers
    of one host (``PREFIX-0..2``): ``(broker, clock, sub, pubs)``."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("#")
    pubs = []
    for n in range(3):
        pub = FakeClient(broker, clock)
        pub.connect(f"{prefix}-{n}")
        pubs.append(pub)
    return broker, clock, sub, pubs


def test_connections_sharing_a_host_bucket_take_turns():
    """Three flooding connections of one host each get about a third, not one of them all."""
    broker, clock, sub, pubs = _three_of_one_host("turn")
    for n, pub in enumerate(pubs):
        pub.send_bytes(_tiny_publishes(2000, topic="abc"[n]))
    for _ in range(200):                                # 10 s
        clock.advance(0.05)
    topics = [p.topic for p in sub.received() if isinstance(p, Publish)]
    assert len(topics) <= 10 + 100 + 1                  # one rate for the host
    assert all(topics.count(t) >= 25 for t in "abc"), {t: topics.count(t) for t in "abc"}


def test_a_connection_leaving_its_turn_hands_it_on():
    """The connection whose turn it is closes, or a waiting one does: the others go on."""
    broker, clock, sub, pubs = _three_of_one_host("leave")
    for n, pub in enumerate(pubs):
        pub.send_bytes(_tiny_publishes(500, topic="abc"[n]))
    sub.received()
    bucket = pubs[0].conn._bucket
    assert list(bucket.waiters) == [p.conn for p in pubs]
    pubs[0].drop()                                      # the head
    pubs[2].drop()                                      # one waiting behind
    assert list(bucket.waiters) == [pubs[1].conn]
    for _ in range(40):
        clock.advance(0.05)
    assert [p.topic for p in sub.received() if isinstance(p, Publish)].count("b") >= 15


def test_other_hosts_keep_their_own_bucket_while_one_host_is_throttled():
    """Sharing is per host: another address is not slowed by a throttled one."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    greedy = FakeClient(broker, clock)
    greedy.connect("greedy")
    greedy.send_bytes(_tiny_publishes(100))
    other = FakeClient(broker, clock)
    other.conn.peer = "192.0.2.9:4000"
    other.connect("other")
    other.send_bytes(_tiny_publishes(10))
    assert _delivered(sub) == 20


def test_ipv6_connections_of_one_64_share_one_inbound_bucket():
    """New addresses from one IPv6 /64 are one host for the inbound rate."""
    broker, clock = make_broker(max_inbound_rate=10)
    sub = _subscriber(broker, clock)
    for n in range(4):
        pub = FakeClient(broker, clock)
        pub.conn.peer = f"2001:db8:1:2::{n + 1:x}:40000"
        pub.connect(f"v6-{n}")
        pub.send_bytes(_tiny_publishes(100))
    assert _delivered(sub) == 10


# --- N2: the keepalive clock stops while the broker does not read ----------------------

def test_rate_limited_client_that_pings_on_time_stays_connected():
    """A bytes-rate debt of 19 s is no keepalive timeout of a client pinging every 2 s (N2)."""
    broker, clock = make_broker(max_inbound_bytes_rate=1000)
    pub = FakeClient(broker, clock)
    pub.connect("rk2", keepalive=4)
    wire = Wire(pub)
    wire.send(Publish("t", b"x" * 20_000, 0, False))   # passes, leaves a ~19 s debt
    wire.send(Publish("t", b"y", 0, False))            # held
    for _ in range(12):                                 # 24 s of pings every 2 s
        wire.send(Pingreq())
        _advance(clock, [wire], 2.0, step=0.25)
        assert not pub.disconnecting
    assert Pingresp() in pub.received()                 # answered once the debt is paid


def _slow_publish_hook():
    """A broker whose authorize_publish answers PUBLISHes to "slow" with a Deferred the
    test fires: ``(broker, clock, that Deferred)``."""
    broker, clock = make_broker(hook_timeout=20)
    answer = defer.Deferred()

    class Slow:
        def authorize_publish(self, client, message):
            return answer if message.topic == "slow" else True
    broker.authorizer = Slow()
    return broker, clock, answer


def test_slow_publish_hook_does_not_expire_a_pinging_client():
    """Waiting 6 s for authorize_publish is the broker's time, not the client's silence (N2)."""
    broker, clock, answer = _slow_publish_hook()
    client = FakeClient(broker, clock)
    client.connect("hk", keepalive=2)
    wire = Wire(client)
    wire.send(Publish("slow", b"x", 1, False, packet_id=1))
    for _ in range(6):
        wire.send(Pingreq())
        _advance(clock, [wire], 1.0)
        assert not client.disconnecting
    answer.callback(True)
    wire.pump()
    packets = client.received()
    assert packets[0] == Puback(1) and Pingresp() in packets[1:]   # in order
    _advance(clock, [wire], 2.0)
    assert not client.disconnecting


def test_publisher_held_by_a_congested_subscriber_keeps_its_keepalive():
    """A publisher the broker holds back for a slow subscriber is not idle (N2)."""
    broker, clock = make_broker(max_queued_messages=4, max_inflight=1, max_publisher_pause=8)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t", qos=1)
    pub = FakeClient(broker, clock)
    pub.connect("pub", keepalive=2)
    wire = Wire(pub)
    for i in range(4):
        wire.send(Publish("t", b"%d" % i, 1, False, packet_id=i + 1))
    for _ in range(7):
        wire.send(Pingreq())
        _advance(clock, [wire], 1.0)
        assert not pub.disconnecting


def test_silent_client_still_expires_once_the_broker_reads_again():
    """Stopping the clock while blocked does not switch keepalive off."""
    broker, clock = make_broker(hook_timeout=20)
    answer = defer.Deferred()

    class Slow:
        def authorize_publish(self, client, message):
            return answer
    broker.authorizer = Slow()
    client = FakeClient(broker, clock)
    client.connect("quiet", keepalive=2)
    wire = Wire(client)
    wire.send(Publish("slow", b"x", 1, False, packet_id=1))
    _advance(clock, [wire], 10.0)
    assert not client.disconnecting
    answer.callback(True)
    _advance(clock, [wire], 3.1)                     # 1.5 x 2 s of its own silence
    assert client.disconnecting


# --- N11: a held DISCONNECT still discards the will ---------------------------------------

def _watcher(broker, clock):
    watcher = FakeClient(broker, clock)
    watcher.connect("watcher")
    watcher.subscribe("wt/#")
    return watcher


def test_disconnect_behind_rate_limited_publishes_discards_the_will(log_events):
    """DISCONNECT + close + reconnect under the rate limit publishes no will [MQTT-3.14.4-3] (N11)."""
    broker, clock = make_broker(max_inbound_rate=10)
    watcher = _watcher(broker, clock)
    dev = FakeClient(broker, clock)
    dev.connect("dev7", will=Will("wt/dead", b"dev7 died", 0, False))
    wire = Wire(dev)
    data = b"".join(bytes((0x30, 9, 0, 7)) + b"wt/data" for _ in range(50))
    wire.write(data + bytes((0xE0, 0)))
    wire.close()
    _advance(clock, [wire], 1.0)
    again = FakeClient(broker, clock)
    again.connect("dev7")
    _advance(clock, [wire], 1.0)
    got = [p for p in watcher.received() if isinstance(p, Publish)]
    assert not [p for p in got if p.topic == "wt/dead"]
    assert len([p for p in got if p.topic == "wt/data"]) == 10
    assert broker.stats.dropped["held-input"] == 40
    assert len(_lines(log_events, "40 packets it had sent")) == 1


def test_takeover_of_a_connection_holding_a_disconnect_publishes_no_will():
    """Reconnecting before the broker noticed the close: the DISCONNECT it held still counts (N11)."""
    broker, clock = make_broker(max_inbound_rate=10)
    watcher = _watcher(broker, clock)
    dev = FakeClient(broker, clock)
    dev.connect("dev7", will=Will("wt/dead", b"dev7 died", 0, False))
    wire = Wire(dev)
    data = b"".join(bytes((0x30, 9, 0, 7)) + b"wt/data" for _ in range(10_000))   # 110 KB
    wire.write(data + bytes((0xE0, 0)))
    wire.close()
    assert dev.transport.producerState == "paused" and not wire.lost   # the FIN is unseen
    again = FakeClient(broker, clock)
    again.connect("dev7")                                # takes the session over at once
    _advance(clock, [wire], 1.0)
    got = [p.topic for p in watcher.received() if isinstance(p, Publish)]
    assert "wt/dead" not in got
    assert broker.stats.dropped["held-input"] == 10_000 - got.count("wt/data")


def _burst_then_disconnect(publishes: int) -> bytes:
    """``publishes`` QoS 0 PUBLISHes to wt/data (11 bytes each), then a v3 DISCONNECT."""
    return b"".join(bytes((0x30, 9, 0, 7)) + b"wt/data" for _ in range(publishes)) + b"\xe0\x00"


def test_disconnect_still_in_the_socket_when_the_probe_sees_the_close_discards_the_will():
    """The DISCONNECT behind 200 KB of held input is found by reading the rest after the close (N11)."""
    broker, clock = make_broker(max_inbound_rate=10)
    watcher = _watcher(broker, clock)
    dev = FakeClient(broker, clock)
    dev.connect("dev10", will=Will("wt/dead", b"dev10 died", 0, False))
    wire = Wire(dev)
    wire.write(_burst_then_disconnect(18_000))          # ~200 KB
    wire.close()
    assert len(wire.kernel) > 50_000                     # the DISCONNECT is still unread
    _advance(clock, [wire], 2.0)
    assert wire.lost
    got = [p.topic for p in watcher.received() if isinstance(p, Publish)]
    assert "wt/dead" not in got
    assert broker.stats.dropped["held-input"] == 18_000 - got.count("wt/data")


def test_reading_after_the_close_is_bounded_then_the_will_is_published():
    """At most 256 KiB are read after the close: a DISCONNECT behind more is not seen (documented limit)."""
    broker, clock = make_broker(max_inbound_rate=10)
    watcher = _watcher(broker, clock)
    dev = FakeClient(broker, clock)
    dev.connect("dev11", will=Will("wt/dead", b"dev11 died", 0, False))
    wire = Wire(dev)
    wire.write(_burst_then_disconnect(60_000))           # ~660 KB
    wire.close()
    _advance(clock, [wire], 2.0)
    assert wire.lost and len(wire.kernel) > 0            # aborted with bytes unread
    got = [p.topic for p in watcher.received() if isinstance(p, Publish)]
    assert got.count("wt/dead") == 1


def test_disconnect_held_behind_a_slow_hook_discards_the_will_when_the_client_closes():
    """The client closes right after DISCONNECT while a hook is pending: no will (N11)."""
    broker, clock, answer = _slow_publish_hook()
    watcher = _watcher(broker, clock)
    dev = FakeClient(broker, clock, level=5)
    dev.connect("dev8", will=Will("wt/dead", b"dev8 died", 0, False))
    wire = Wire(dev)
    wire.send(Publish("slow", b"x", 1, False, packet_id=1), Disconnect())
    wire.close()
    assert wire.lost
    answer.callback(True)
    _advance(clock, [wire], 1.0)
    assert not [p for p in watcher.received() if isinstance(p, Publish)]


def test_held_disconnect_with_will_reason_still_publishes_the_will():
    """v5 DISCONNECT 0x04 (Disconnect with Will Message) held under the rate limit keeps the will."""
    broker, clock = make_broker(max_inbound_rate=2)
    watcher = _watcher(broker, clock)
    dev = FakeClient(broker, clock, level=5)
    dev.connect("dev9", will=Will("wt/dead", b"dev9 died", 0, False))
    wire = Wire(dev)
    wire.send(*[Publish("wt/data", b"d", 0, False)] * 5, Disconnect(0x04))
    wire.close()
    _advance(clock, [wire], 1.0)
    got = [p.topic for p in watcher.received() if isinstance(p, Publish)]
    assert got.count("wt/dead") == 1


# --- N8: small pre-CONNECT packets by default ----------------------------------------------

def test_default_pre_connect_packet_limit_is_64_kib():
    """An unauthenticated socket makes the broker buffer at most 64 KiB by default (N8)."""
    assert BrokerConfig().max_connect_packet_size == 64 * 1024
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.send_bytes(bytes((0x10, 0x80, 0x80, 0x05)))         # CONNECT announcing 80 KiB
    assert c.disconnecting


def test_connect_of_a_few_kib_with_a_will_is_still_accepted():
    """64 KiB is generous: credentials and a 16 KiB will payload pass."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.send(Connect(4, "w", True, 0, will=Will("wt/dead", b"w" * 16384, 0, False),
                   username="u", password=b"p" * 100))
    assert not c.disconnecting
