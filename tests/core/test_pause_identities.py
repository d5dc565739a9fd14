"""The publisher-pause budget belongs to the subscriber's identities, not to one connection.

REVIEW-S9 R6: a subscriber that never read and reconnected every 6 s (a new client id each
time, or the same clean one) was granted a fresh --max-publisher-pause on every connection
and stopped its publishers 75-80 % of the time.  Its client id, its (authenticated) user and
its address now each hold publishers at most once per --publisher-pause-recovery.
"""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mqttd.codec.packets import Properties, Puback, Publish
from mqttd.flowcontrol import (
    ANONYMOUS, PauseLedger, SlowConsumerGuard, Watermarks, address_identity, network_identity,
    session_identities)
from mqttd.metrics import BrokerStats
from mqttd.session import Session

from core.harness import FakeClient, make_broker

MARKS = Watermarks(high=1000, low=500, high_bytes=1_000_000, low_bytes=500_000)


class Info:
    def __init__(self, peer):
        self.peer = peer


def session(client_id, peer="192.0.2.1:40000", owner=None):
    s = Session(client_id, owner=owner)
    s.info = Info(peer)
    return s


def guard(budget=5.0, recovery=30.0, authenticated=True):
    clock = Clock()
    stats = BrokerStats()
    g = SlowConsumerGuard(clock, budget, recovery, stats, watermarks=MARKS,
                          identities=lambda s: session_identities(s, authenticated))
    return g, clock, stats


# --- the guard alone ------------------------------------------------------------------------

def test_new_client_id_from_a_demoted_address_holds_no_one():
    """After one address used up its budget, a new client id from it is demoted at once."""
    g, clock, stats = guard()
    first = session("att0", owner="u0")
    assert g.congested(first)
    clock.advance(5)                                   # budget spent: demoted
    g.decongested(first)
    clock.advance(1)
    second = session("att1", peer="192.0.2.1:40001", owner="u1")  # same host, another port and id
    assert not g.congested(second)
    assert second.demoted_since == 6 and second.congested_since is None
    assert stats.publisher_holds == 1 and stats.slow_subscribers_demoted == 2
    other_host = session("other", peer="198.51.100.2:40000", owner="u2")
    assert g.congested(other_host)                     # another network has its own budget


def test_same_client_id_in_a_new_clean_session_holds_no_one():
    """A clean session of the same client id (a new Session object) does not get a new budget."""
    g, clock, stats = guard()
    assert g.congested(session("att", peer="192.0.2.1:1"))
    clock.advance(5)
    again = session("att", peer="198.51.100.7:2")      # same id from elsewhere
    assert not g.congested(again)
    assert stats.publisher_holds == 1


def test_going_away_while_holding_spends_the_budget():
    """Disconnecting before the budget runs out spends it all the same (no renewal by reconnect)."""
    g, clock, stats = guard()
    first = session("att")
    pub = Held()
    assert g.congested(first)
    g.hold(pub)
    clock.advance(4.9)
    g.abandoned(first)                                  # the connection went away
    clock.advance(0)
    assert pub.released == 1                            # its publishers go at once
    assert first.demoted_since == 4.9                   # a persistent session stays demoted
    clock.advance(0.1)
    assert not g.congested(session("att2"))             # same address: no second hold
    assert stats.publisher_holds == 1 and stats.slow_subscribers_demoted == 2


def test_draining_ends_an_episode_without_spending_the_budget():
    """A merely slow subscriber that drains keeps its protection (and its address's)."""
    g, clock, stats = guard()
    s = session("slow")
    for _ in range(10):
        assert g.congested(s)
        clock.advance(4)
        g.decongested(s)
        clock.advance(1)
    assert g.congested(session("neighbour"))
    assert len(g.ledger) == 0 and stats.slow_subscribers_demoted == 0


def test_an_identity_may_hold_again_after_the_recovery_period():
    """The ledger forgets an identity recovery seconds after it was spent."""
    g, clock, stats = guard(budget=5, recovery=30)
    assert g.congested(session("a"))
    clock.advance(5)
    clock.advance(29.9)
    assert not g.congested(session("b"))
    clock.advance(0.1)
    assert g.congested(session("c"))
    assert stats.publisher_holds == 2
    assert ("client", "a") not in g.ledger._spent


def test_demotion_stops_every_holder_of_the_same_address():
    """Two staggered connections from one address: the first one's demotion ends the second's hold."""
    g, clock, stats = guard()
    a, b = session("a", peer="192.0.2.1:1", owner="ua"), session("b", peer="192.0.2.1:2", owner="ub")
    far = session("far", peer="203.0.113.9:1", owner="uf")
    assert g.congested(a)
    clock.advance(3)
    assert g.congested(b) and g.congested(far)
    clock.advance(2)                                    # a's budget: a and b demoted at t=5
    assert a.congested_since is None and b.congested_since is None
    assert b.demoted_since == 5
    assert far.congested_since == 3                     # another address holds on
    assert g.holding == {far}
    clock.advance(3)
    assert far.demoted_since == 8


def test_authenticated_user_name_is_one_identity_across_addresses():
    """A checked user name shares one budget over all its addresses and client ids."""
    g, clock, _ = guard(authenticated=True)
    assert g.congested(session("x1", peer="192.0.2.1:1", owner="alice"))
    clock.advance(5)
    assert not g.congested(session("x2", peer="198.51.100.1:1", owner="alice"))
    assert g.congested(session("y", peer="198.51.100.2:1", owner="bob"))


def test_unchecked_user_name_spends_no_one_elses_budget():
    """Without authentication a user name is only a claim: claiming a victim's name spends the anonymous budget, not the name's."""
    g, clock, _ = guard(authenticated=False)
    assert g.congested(session("attacker", peer="192.0.2.1:1", owner="dashboard"))
    clock.advance(5)
    assert g.ledger.spent([("user", "dashboard")], clock.seconds()) is None
    assert g.ledger.spent([ANONYMOUS], clock.seconds()) == ANONYMOUS


def test_a_new_network_per_reconnect_gets_no_fresh_budget_without_a_checked_user():
    """Subscribers without a checked user name share one budget: rotating addresses and networks renews nothing (REVIEW-S10 S2)."""
    g, clock, stats = guard()
    assert g.congested(session("att0", peer="10.0.0.1:1"))
    clock.advance(5)
    for n in range(1, 6):
        clock.advance(1)
        assert not g.congested(session("att%d" % n, peer="10.%d.%d.1:1" % (n, n)))
        assert not g.congested(session("v6-%d" % n, peer="[2001:db8:%x::1]:1" % n))
    assert stats.publisher_holds == 1
    # a subscriber whose user name the broker checked keeps its own budget
    assert g.congested(session("dash", peer="10.9.9.9:1", owner="dashboard"))


def test_addresses_of_one_network_share_its_budget():
    """A new host of the same IPv4 /24 (IPv6 /48) is no new subscriber, even for a checked user (REVIEW-S10 S2)."""
    g, clock, _ = guard()
    assert g.congested(session("a", peer="192.0.2.1:1", owner="ua"))
    clock.advance(5)
    assert not g.congested(session("b", peer="192.0.2.77:1", owner="ub"))
    assert g.congested(session("c", peer="192.0.3.1:1", owner="uc"))
    assert g.congested(session("d", peer="[2001:db8:1:2::1]:1", owner="ud"))
    clock.advance(5)
    assert not g.congested(session("e", peer="[2001:db8:1:ffff::1]:1", owner="ue"))


@pytest.mark.parametrize("peer, key", [
    ("10.1.2.3:5555", ("network", "10.1.2.0/24")),
    ("[2001:db8:1:2:aaaa::1]:5555", ("network", "2001:db8:1::/48")),
    ("::ffff:10.1.2.3:5555", ("network", "10.1.2.0/24")),
    ("/run/mqttd.sock", None),
    (None, None),
])
def test_network_identity_is_the_ipv4_24_or_ipv6_48(peer, key):
    """The network identity groups what one site can easily get new addresses from."""
    assert network_identity(peer) == key


@pytest.mark.parametrize("peer, key", [
    ("10.1.2.3:5555", ("host", "10.1.2.3")),
    ("2001:db8:1:2:aaaa::1:5555", ("host", "2001:db8:1:2::/64")),
    ("2001:db8:1:2:ffff::9:6000", ("host", "2001:db8:1:2::/64")),
    ("::ffff:10.1.2.3:5555", ("host", "10.1.2.3")),
    ("/run/mqttd.sock", ("host", "/run/mqttd.sock")),
    (None, None),
])
def test_address_identity_groups_an_ipv6_64_and_mapped_ipv4(peer, key):
    """One IPv6 /64 is one address (new addresses from it are free to get), a mapped IPv4 is the IPv4."""
    assert address_identity(peer) == key


def test_ledger_is_bounded_and_forgets_after_recovery():
    """At most max_entries identities, the oldest evicted first; each forgotten after recovery."""
    ledger = PauseLedger(recovery=30, max_entries=3)
    for i in range(5):
        ledger.record([("host", "h%d" % i)], now=float(i))
    assert len(ledger) == 3 and ledger.evicted == 2
    assert ledger.spent([("host", "h0")], now=5) is None
    assert ledger.spent([("host", "h4")], now=5) == ("host", "h4")
    assert ledger.spent([("host", "h4")], now=34) is None
    assert len(ledger) == 0
    assert len(PauseLedger(recovery=0)) == 0
    zero = PauseLedger(recovery=0)
    zero.record([("host", "h")], now=1)
    assert zero.spent([("host", "h")], now=1) is None


def test_one_warning_per_spent_identity(log_events):
    """Ten reconnects from a spent address give one WARN line, not ten."""
    g, clock, _ = guard()
    g.congested(session("att"))
    clock.advance(5)
    for i in range(10):
        clock.advance(1)
        g.congested(session("att%d" % i))
    lines = [e for e in log_events if e.get("log_namespace") == "mqttd.flowcontrol"
             and "holds no publishers" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["identity"] == "192.0.2.1"


class Held:
    def __init__(self):
        self.released = 0

    def release_publisher(self):
        self.released += 1


# --- through the connections: the attack of REVIEW-S9 R6 -----------------------------------

def held_fraction(attack, seconds=60, reconnect_every=6.0, **config):
    """Run a publisher (QoS 1, as fast as it is read), an honest subscriber, and ``attack``
    (a function making the attacker's next connection) for ``seconds``; return the
    fraction of 0.1 s ticks the publisher was paused and the broker."""
    broker, clock = make_broker(max_queued_messages=8, max_inflight=100,
                                max_publisher_pause=5, publisher_pause_recovery=30, **config)
    honest = FakeClient(broker, clock, peer="198.51.100.1:1883")
    honest.connect("honest")
    honest.subscribe("t", qos=1)
    pub = FakeClient(broker, clock, peer="198.51.100.2:1883")
    pub.connect("pub")
    attacker, n, pid, paused = None, 0, 0, 0
    ticks = int(seconds * 10)
    for tick in range(ticks):
        if tick % int(reconnect_every * 10) == 0:
            if attacker is not None:
                attacker.drop()
            attacker = attack(broker, clock, n)
            n += 1
        for _ in range(10):
            if pub.conn.input_blocked:
                break
            pid = pid % 65535 + 1
            pub.publish("t", b"m", qos=1, packet_id=pid)
        for p in honest.received():
            if isinstance(p, Publish):
                honest.send(Puback(p.packet_id))
        if pub.conn.input_blocked:
            paused += 1
        clock.advance(0.1)
    return paused / ticks, broker


def never_reads(client_id, clean=True, level=4, properties=Properties(),
                peer="192.0.2.66:%d"):
    def attack(broker, clock, n):
        c = FakeClient(broker, clock, level=level,
                       peer=peer % (40000 + n) if peer.count("%d") == 1 else peer % (n, n))
        c.connect(client_id % n if "%d" in client_id else client_id, clean=clean,
                  properties=properties)
        c.subscribe("t", qos=1)
        c.conn.pause_writing()         # never reads: its socket buffer is full
        return c
    return attack


@pytest.mark.parametrize("attack", [
    never_reads("att%d"),                                    # a new client id each time
    never_reads("att"),                                      # the same id, clean session
    never_reads("att", clean=False),                         # the same persistent session
    never_reads("att", clean=False, level=5,
                properties=Properties(session_expiry_interval=60)),
    never_reads("att%d", peer="10.%d.%d.66:1"),              # a new /24 each time (S10 S2)
    never_reads("att%d", peer="[2001:db8:%x:%x::66]:1"),     # a new IPv6 /48 each time
], ids=["new-client-ids", "same-id-clean", "same-id-persistent", "v5-persistent",
        "new-network-each-time", "new-ipv6-48-each-time"])
def test_reconnecting_subscriber_holds_publishers_once_per_recovery_period(attack):
    """A never-reading subscriber reconnecting every 6 s holds the publisher <= 5 s per 35 s."""
    fraction, broker = held_fraction(attack, seconds=60)
    # one hold at the start, the next one after the 30 s recovery: 2 x 5 s of 60 s
    assert broker.stats.publisher_holds <= 2
    assert fraction <= 10.5 / 60


@pytest.mark.parametrize("attack", [never_reads("att%d"), never_reads("att", clean=False)],
                         ids=["new-client-ids", "same-id-persistent"])
def test_reconnecting_just_before_the_budget_runs_out_gains_nothing(attack):
    """Dropping the connection at 4.9 s (before demotion) spends the budget all the same."""
    fraction, broker = held_fraction(attack, seconds=60, reconnect_every=4.9)
    assert broker.stats.publisher_holds <= 2
    assert fraction <= 10.5 / 60


def test_demotion_of_many_holders_under_one_address_is_iterative(log_events):
    """1,500 holders of one address (past the recursion limit): one demotion ends all, one log line."""
    g, clock, stats = guard()
    sessions = [session("s%d" % i, peer="192.0.2.1:%d" % i) for i in range(1500)]
    for s in sessions:
        assert g.congested(s)
    clock.advance(5)
    assert not g.holding
    assert all(s.demoted_since is not None for s in sessions)
    assert stats.slow_subscribers_demoted == 1500
    lines = [e for e in log_events if e.get("log_namespace") == "mqttd.flowcontrol"
             and e.get("log_level").name == "warn"]
    assert len(lines) == 2          # the one that ran out, and one for the others under it
    assert lines[1]["count"] == 1499
    assert len(g.ledger) == 1503    # 1,500 client ids, the address, its network, anonymous


class AcceptAll:
    """An authenticator that accepts every user (the name is then checked)."""

    def authenticate(self, request):
        return True


@pytest.mark.parametrize("authenticator, spent, unspent", [
    (AcceptAll(), ("user", "alice"), ANONYMOUS),
    (None, ANONYMOUS, ("user", "alice"))])
def test_broker_uses_the_user_name_only_when_its_authenticator_checked_it(authenticator,
                                                                         spent, unspent):
    """Through the broker: a checked user name is one identity across networks; a claimed one is anonymous."""
    from mqttd.broker import Broker, BrokerConfig
    from mqttd.codec.packets import Connect
    clock = Clock()
    broker = Broker(clock, None, BrokerConfig(max_queued_messages=8, max_inflight=100),
                    authenticator=authenticator)
    pub = FakeClient(broker, clock, peer="198.51.100.2:1883")
    pub.connect("pub")

    def stuck(client_id, peer):
        c = FakeClient(broker, clock, peer=peer)
        c.send(Connect(4, client_id, True, 0, username="alice", password=b"pw"))
        c.received()
        c.subscribe("t", qos=1)
        c.conn.pause_writing()
        return c

    def flood():
        for pid in range(1, 11):
            if pub.conn.input_blocked:
                break
            pub.publish("t", b"m", qos=1, packet_id=pid)
        return pub.conn.input_blocked

    first = stuck("one", "192.0.2.1:1")
    assert flood()
    clock.advance(5)                         # demoted: client id, address (and checked user) spent
    clock.advance(0)
    first.drop()
    stuck("two", "198.51.100.99:1")          # another network, same user name
    assert not flood()
    now = clock.seconds()
    assert broker.flow.ledger.spent([spent], now) == spent
    assert broker.flow.ledger.spent([unspent], now) is None
