"""One connection's inbound packets get a bounded share of a reactor turn (REVIEW-S9 R8).

With 10,000 matching subscriptions a PUBLISH cost ~1 ms and a 64 KB read of them held the
reactor ~2 s: every other client waited (PINGREQ round trips of 1-4.6 s).  Now a read whose
packets take more than TURN_BUDGET yields (callLater(0)) and goes on in the next turn, in
order.  The cost of a PUBLISH is simulated by the clock advancing 1 ms per delivery.
"""
from __future__ import annotations

from mqttd.codec.packets import Pingreq, Pingresp, Publish
from mqttd.inflow import TURN_BUDGET
from tests.core.harness import FakeClient, make_broker


def _tiny_publishes(count: int) -> bytes:
    """``count`` QoS 0 PUBLISHes to topic "t" with a 2-byte payload counter."""
    return b"".join(bytes((0x30, 5, 0, 1, ord("t"))) + (n % 65536).to_bytes(2, "big")
                    for n in range(count))


def _costly(broker, clock, seconds=0.001):
    """Every routed PUBLISH costs ``seconds`` of reactor time."""
    def cost(**_fields):
        clock.rightNow += seconds
    broker.on("published", cost)


def _costly_pair():
    """A broker whose every PUBLISH costs 1 ms, a subscriber to "t" and a publisher:
    ``(broker, clock, sub, pub)``."""
    broker, clock = make_broker()
    _costly(broker, clock)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    return broker, clock, sub, pub


def test_costly_publishes_of_one_read_yield_the_reactor_each_turn():
    """2,000 PUBLISHes of 1 ms in one read: about TURN_BUDGET's worth per turn, the rest later, in order."""
    broker, clock, sub, pub = _costly_pair()
    pub.send_bytes(_tiny_publishes(2000))
    first = [p for p in sub.received() if isinstance(p, Publish)]
    assert 16 <= len(first) <= TURN_BUDGET / 0.001 + 2 * 16   # one turn's share (checked every 16)
    assert pub.conn.input_blocked
    got = first
    for _ in range(500):                                        # bounded
        clock.advance(0)
        got += [p for p in sub.received() if isinstance(p, Publish)]
        if len(got) == 2000:
            break
    assert [int.from_bytes(p.payload, "big") for p in got] == list(range(2000))
    assert not pub.conn.input_blocked


def test_other_clients_are_served_between_the_turns_of_a_costly_reader():
    """Another client's PINGREQ is answered after one turn's share, not after the whole read."""
    broker, clock, sub, pub = _costly_pair()
    other = FakeClient(broker, clock)
    other.connect("other")
    handled = []
    broker.on("published", lambda **_fields: handled.append(1))
    pub.send_bytes(_tiny_publishes(2000))
    served_after = []

    def ping():                                                 # another socket's read
        other.send(Pingreq())
        served_after.append(len(handled))
    clock.callLater(0, ping)
    for _ in range(500):
        clock.advance(0)
        if len(handled) == 2000:
            break
    assert other.received() == [Pingresp()]
    assert served_after[0] < 100                                # not after all 2,000
    assert len(handled) == 2000


def test_cheap_packets_are_handled_in_the_read_that_brought_them():
    """Without cost (the clock does not move), a long read is handled at once: no turn is lost."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.send_bytes(_tiny_publishes(3000))
    assert len([p for p in sub.received() if isinstance(p, Publish)]) == 3000
    assert not pub.conn.input_blocked


def test_a_few_very_costly_packets_yield_after_the_first():
    """PUBLISHes of 15 ms each: the read yields after the first, not after 16 (240 ms), and
    another client is served after one or two of them (REVIEW-S10 S8)."""
    broker, clock = make_broker()
    _costly(broker, clock, seconds=0.015)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    other = FakeClient(broker, clock)
    other.connect("other")
    handled = []
    broker.on("published", lambda **_fields: handled.append(1))
    pub.send_bytes(_tiny_publishes(40))
    assert len(handled) == 1 and pub.conn.input_blocked
    served_after = []

    def ping():                                                 # another socket's read
        other.send(Pingreq())
        served_after.append(len(handled))
    clock.callLater(0, ping)
    for _ in range(100):                                        # bounded
        clock.advance(0)
        if len(handled) == 40:
            break
    assert other.received() == [Pingresp()]
    assert served_after[0] <= 2
    assert len(handled) == 40 and not pub.conn.input_blocked


def test_overlapping_filters_are_merged_once_per_topic(monkeypatch):
    """10,000 overlapping filters of one subscriber: the merge is remembered, not redone per PUBLISH (REVIEW-S10 S8)."""
    import mqttd.routing
    calls = []
    real = mqttd.routing.merge_matches

    def counting(matches, origin):
        calls.append(len(matches))
        return real(matches, origin)
    monkeypatch.setattr(mqttd.routing, "merge_matches", counting)
    broker, clock = make_broker()
    levels = "abcdefghijklmn"
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    filters = ["/".join("+" if mask >> k & 1 else levels[k] for k in range(14))
               for mask in range(10000)]
    for n in range(10):
        sub.subscribe(*filters[n * 1000:(n + 1) * 1000], packet_id=n + 1)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for _ in range(50):
        pub.publish("/".join(levels), b"x")
    assert len([p for p in sub.received() if isinstance(p, Publish)]) == 50
    assert calls == [10000]
    # a changed subscription is seen at once: QoS 1 on one of the filters
    sub.subscribe(filters[7], qos=1, packet_id=99)
    pub.publish("/".join(levels), b"y", qos=1, packet_id=5)
    (delivered,) = [p for p in sub.received() if isinstance(p, Publish)]
    assert delivered.qos == 1 and len(calls) == 2


def test_cached_merge_keeps_no_local_per_publisher():
    """A merge that depended on No Local is not reused for another publisher [MQTT-3.8.3-3]."""
    broker, clock = make_broker()
    me = FakeClient(broker, clock, level=5)
    me.connect("me")
    me.subscribe("t/+", packet_id=1, no_local=True)
    me.subscribe("+/x", packet_id=2, no_local=True)
    other = FakeClient(broker, clock, level=5)
    other.connect("other")
    for _ in range(3):
        me.publish("t/x", b"mine")
        assert not [p for p in me.received() if isinstance(p, Publish)]
        other.publish("t/x", b"theirs")
        assert len([p for p in me.received() if isinstance(p, Publish)]) == 1


def test_cached_merge_with_an_in_process_subscriber():
    """In-process subscribers among overlapping matches are merged and cached like clients."""
    broker, clock = make_broker()
    got = []
    broker.subscribe_local("t/#", got.append)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t/+", "+/x", packet_id=1)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for _ in range(3):
        pub.publish("t/x", b"m")
    assert len(got) == 3
    assert len([p for p in sub.received() if isinstance(p, Publish)]) == 3
