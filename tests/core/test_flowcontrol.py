"""Fair slow-consumer handling: a subscriber holds publishers at most its budget, once."""
from __future__ import annotations

import collections

import pytest
from twisted.internet.task import Clock

from mqttd.codec.packets import Connect, Puback, Publish
from mqttd.flowcontrol import SlowConsumerGuard, Watermarks
from mqttd.metrics import BrokerStats
from mqttd.session import Session

from core.harness import FakeClient, make_broker


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]



class HeldPublisher:
    def __init__(self):
        self.released = 0

    def release_publisher(self):
        self.released += 1


# --- the state machine alone ----------------------------------------------------------------

MARKS = Watermarks(high=1000, low=500, high_bytes=1_000_000, low_bytes=500_000)


def guard(budget=5.0, recovery=30.0):
    clock = Clock()
    stats = BrokerStats()
    return SlowConsumerGuard(clock, budget, recovery, stats, watermarks=MARKS), clock, stats


def queued(session, messages, nbytes=0):
    """Give ``session`` a queue of ``messages`` records totalling ``nbytes`` bytes."""
    session.queue = collections.deque(object() for _ in range(messages))
    session.queued_bytes = nbytes
    return session


def test_episode_holds_until_budget_then_demotes_and_releases():
    """A congested subscriber holds publishers for at most the budget, then no one."""
    g, clock, stats = guard()
    s = Session("s")
    pub = HeldPublisher()
    assert g.congested(s)
    g.hold(pub)
    clock.advance(4.9)
    assert g.congested(s) and pub.released == 0
    clock.advance(0.1)            # budget spent
    clock.advance(0)              # release on the next turn
    assert pub.released == 1
    assert s.demoted_since == 5.0 and s.congested_since is None
    assert not g.congested(s)     # demoted: holds no one
    assert (stats.publisher_holds, stats.slow_subscribers_demoted) == (1, 1)


def test_catching_up_a_little_does_not_rearm_the_hold():
    """Draining below the low-water mark but not to empty keeps a demoted subscriber demoted."""
    g, clock, _ = guard()
    s = Session("s")
    g.congested(s)
    clock.advance(5)
    g.drained(queued(s, 10))
    clock.advance(100)
    assert not g.congested(s)


def test_demoted_subscriber_must_stay_healthy_for_the_recovery_period():
    """Empty queue, then recovery seconds without congestion, before it may hold again."""
    g, clock, stats = guard(budget=5, recovery=30)
    s = Session("s")
    g.congested(s)
    clock.advance(5)
    g.drained(queued(s, 0))       # fully drained at t=5
    clock.advance(20)
    assert not g.congested(s)                   # froze again at t=25: healthy period starts over
    clock.advance(40)
    assert not g.congested(s)                   # still not drained since
    g.drained(queued(s, 0))       # drained at t=65
    clock.advance(29)
    g.drained(queued(s, 0))       # staying empty does not restart the period
    clock.advance(1)
    assert g.congested(s)                       # t=95: healthy for 30 s, a new episode
    assert s.demoted_since is None
    assert stats.publisher_holds == 2


def test_merely_slow_subscriber_is_never_demoted():
    """Episodes that drain to the low-water mark within the budget never exhaust it."""
    g, clock, stats = guard(budget=5)
    s = Session("s")
    pub = HeldPublisher()
    for _ in range(100):
        assert g.congested(s)
        g.hold(pub)
        clock.advance(4)
        g.drained(queued(s, 400))
        clock.advance(0)
    assert stats.slow_subscribers_demoted == 0 and s.demoted_since is None
    assert pub.released == 100


def test_byte_congestion_ends_only_when_the_bytes_drain():
    """An episode started by queued bytes (few large messages) is not ended by a low message count."""
    g, clock, stats = guard(budget=5)
    s = queued(Session("s"), 105, 1_050_000)          # 105 messages of 10 kB
    pub = HeldPublisher()
    assert g.routed(s)
    g.hold(pub)
    for _ in range(9):                                # the subscriber never reads
        clock.advance(0.5)
        g.drained(s)
        assert s.congested_since == 0 and g.routed(s)
    clock.advance(0.5)                                # budget spent: demoted, released
    clock.advance(0)
    assert s.demoted_since == 5.0 and pub.released == 1
    assert not g.routed(queued(s, 200, 2_000_000))    # demoted: holds no one any more
    assert (stats.publisher_holds, stats.slow_subscribers_demoted) == (1, 1)


def test_episode_ends_when_messages_and_bytes_are_both_at_low_water():
    """Draining ends an episode only at the low-water mark in both messages and bytes."""
    for start, not_yet, done in [((1000, 10), (400, 600_000), (400, 500_000)),
                                 ((10, 1_000_000), (501, 0), (500, 0))]:
        g, clock, _ = guard()
        s = queued(Session("s"), *start)
        assert g.routed(s)
        g.drained(queued(s, *not_yet))
        assert s.congested_since is not None
        g.drained(queued(s, *done))
        assert s.congested_since is None and not g.holding


def test_queue_below_both_high_water_marks_is_not_congested():
    """routed() starts an episode only at the high-water mark in messages or bytes."""
    g, _, stats = guard()
    assert not g.routed(queued(Session("s"), 999, 999_999))
    assert g.routed(queued(Session("m"), 1000, 0))
    assert g.routed(queued(Session("b"), 1, 1_000_000))
    assert stats.publisher_holds == 2


def test_watermarks_reject_low_marks_not_below_high():
    """A low-water mark at or over its high mark could never end an episode consistently."""
    with pytest.raises(ValueError):
        Watermarks(high=10, low=10, high_bytes=100, low_bytes=50)
    with pytest.raises(ValueError):
        Watermarks(high=10, low=5, high_bytes=100, low_bytes=100)
    with pytest.raises(ValueError):
        Watermarks(high=0, low=0, high_bytes=100, low_bytes=50)
    marks = Watermarks.for_limits(1, 1)
    assert (marks.high, marks.low, marks.high_bytes, marks.low_bytes) == (1, 0, 1, 0)


def test_publishers_stay_held_while_another_subscriber_holds():
    """Held publishers are released once no subscriber holds any more."""
    g, clock, _ = guard(budget=5)
    a, b = Session("a", owner="ua"), Session("b", owner="ub")   # two checked users
    pub = HeldPublisher()
    g.congested(a)
    clock.advance(2)
    g.congested(b)
    g.hold(pub)
    clock.advance(3)               # a's budget spent; b holds for 2 s more
    clock.advance(0)
    assert pub.released == 0
    clock.advance(2)
    clock.advance(0)
    assert pub.released == 1


def test_disabled_guard_holds_no_one():
    """--no-publisher-backpressure: congestion never holds anybody."""
    g = SlowConsumerGuard(Clock(), 5, 30, BrokerStats(), enabled=False)
    assert not g.congested(Session("s"))


def test_zero_budget_holds_no_one():
    """--max-publisher-pause 0: a congested subscriber never holds publishers."""
    assert not SlowConsumerGuard(Clock(), 0, 30, BrokerStats()).congested(Session("s"))


# --- through the connections ----------------------------------------------------------------

def _setup(**config):
    broker, clock = make_broker(**config)
    frozen = FakeClient(broker, clock)
    frozen.connect("frozen")
    frozen.subscribe("t", qos=1)
    healthy = FakeClient(broker, clock)
    healthy.connect("healthy")
    healthy.subscribe("t", qos=1)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    return broker, clock, frozen, healthy, pub


def _ack_all(client):
    got = publishes(client.received())
    for p in got:
        client.send(Puback(p.packet_id))
    return got


class Flood:
    def __init__(self, pub):
        self.pub = pub
        self.pid = 0

    def __call__(self, n):
        """Publish n QoS 1 messages; whether the publisher's input is held after them."""
        for _ in range(n):
            self.pid = self.pid % 65535 + 1
            self.pub.publish("t", b"m%d" % self.pid, qos=1, packet_id=self.pid)
        return self.pub.conn.input_blocked


def test_freeze_drain_freeze_holds_publishers_once():
    """A subscriber that freezes, drains and freezes again holds the publisher only the first time."""
    broker, clock, frozen, healthy, pub = _setup(
        max_queued_messages=8, max_inflight=100, max_publisher_pause=5,
        publisher_pause_recovery=30)
    flood = Flood(pub)
    frozen.conn.pause_writing()
    assert flood(6)                             # first freeze: one bounded hold
    clock.advance(5)
    clock.advance(0)
    assert not pub.conn.input_blocked
    _ack_all(healthy)
    assert not flood(20)                        # demoted: overflow by policy instead
    frozen.conn.resume_writing()                # it drains completely...
    for _ in range(10):
        _ack_all(frozen)
    assert not broker.sessions["frozen"].queue
    clock.advance(1)
    frozen.conn.pause_writing()                 # ...and freezes again
    assert not flood(20)                        # no second gap for the others
    assert broker.stats.publisher_holds == 1
    assert broker.stats.dropped["queue-full"] > 0
    assert len(publishes(healthy.received())) == 40


def test_demoted_subscriber_may_hold_again_after_staying_healthy():
    """After draining and recovery seconds of health, a new congestion episode holds again."""
    broker, clock, frozen, healthy, pub = _setup(
        max_queued_messages=8, max_inflight=100, max_publisher_pause=5,
        publisher_pause_recovery=30)
    flood = Flood(pub)
    frozen.conn.pause_writing()
    flood(6)
    clock.advance(5)
    clock.advance(0)
    frozen.conn.resume_writing()
    for _ in range(10):
        _ack_all(frozen)
    clock.advance(31)
    frozen.conn.pause_writing()
    assert flood(6)
    assert broker.stats.publisher_holds == 2


def test_frozen_qos0_subscriber_of_large_messages_is_demoted_after_the_budget(log_events):
    """Byte-triggered congestion (10 kB payloads) holds the publisher once, then demotes the subscriber."""
    broker, clock = make_broker(max_publisher_pause=5, publisher_pause_recovery=30)
    frozen = FakeClient(broker, clock)
    frozen.connect("frozen")
    frozen.subscribe("flood/#", qos=0)
    frozen.conn.pause_writing()
    healthy = FakeClient(broker, clock)
    healthy.connect("healthy")
    healthy.subscribe("flood/#", qos=0)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    payload = b"x" * 10_000
    received = 0
    for _ in range(60):                        # 6 s of a publisher sending as fast as it is read
        for _ in range(20):
            if pub.transport.producerState == "paused":
                break
            pub.publish("flood/a", payload, qos=0)
        received += len(publishes(healthy.received()))
        clock.advance(0.1)
    clock.advance(0)
    session = broker.sessions["frozen"]
    assert session.demoted_since is not None and session.congested_since is None
    assert broker.stats.publisher_holds == 1
    assert broker.stats.slow_subscribers_demoted == 1
    assert pub.transport.producerState == "producing"
    before = received
    for _ in range(200):                       # demoted: the publisher runs at full speed
        pub.publish("flood/a", payload, qos=0)
    received += len(publishes(healthy.received()))
    assert received - before == 200
    assert pub.transport.producerState == "producing"
    assert broker.stats.publisher_holds == 1
    assert sum(1 for e in log_events if e.get("log_namespace") == "mqttd.flowcontrol"
               and e.get("log_level").name == "warn") == 1


def test_ten_frozen_qos1_subscribers_stay_within_their_queue_limits(log_events):
    """10 frozen QoS 1 subscribers and a flood: queues bounded, drops counted, one WARN each."""
    broker, clock = make_broker(max_queued_messages=50, max_queued_bytes=4000,
                                max_inflight=200, max_publisher_pause=1)
    broker.authenticator = _AcceptAll()   # checked users: the healthy one has its own budget

    def login(client, client_id):
        client.send(Connect(4, client_id, True, 0, username=client_id, password=b"pw"))
        assert client.received()[0].reason_code == 0

    frozen = []
    for i in range(10):           # ten machines of one network (its budget is shared)
        c = FakeClient(broker, clock, peer="10.0.0.%d:1883" % (i + 1))
        login(c, "frozen%d" % i)
        c.subscribe("flood/#", qos=1)
        c.conn.pause_writing()
        frozen.append(c)
    healthy = FakeClient(broker, clock, peer="10.0.1.1:1883")
    login(healthy, "healthy")
    healthy.subscribe("flood/#", qos=1)
    pubs = [FakeClient(broker, clock) for _ in range(4)]
    for i, p in enumerate(pubs):
        login(p, "pub%d" % i)
    received = 0
    for turn in range(40):
        for p in pubs:
            for k in range(1, 26):
                p.publish("flood/x", b"y" * 100, qos=1, packet_id=k)
            for _ in range(10):
                received += len(_ack_all(healthy))
        clock.advance(0.1)
    for _ in range(10):
        received += len(_ack_all(healthy))
    for c in frozen:
        session = broker.sessions[c.conn.client_id]
        assert len(session.queue) <= 50 and session.queued_bytes <= 4000
        assert session.dropped["queue-full"] > 0
        assert session.demoted_since is not None
    assert all(p.transport.producerState == "producing" for p in pubs)
    assert broker.stats.slow_subscribers_demoted == 10
    assert received == 4 * 25 * 40
    warnings = [e for e in log_events if e.get("log_namespace") == "mqttd.broker"
                and "Dropping messages" in e.get("log_format", "")]
    assert len(warnings) == 10      # rate-limited: one per client and reason per 10 s


class _AcceptAll:
    """An authenticator that accepts every user (its name is then a checked one)."""

    def authenticate(self, request):
        return True
