"""Global bounds: --max-sessions and --max-queued-bytes-total, refused and counted clearly."""
from __future__ import annotations

import pytest

from mqttd.codec.packets import Connack, Connect, Disconnect, Properties, Publish

from core.harness import FakeClient, make_broker



def persistent_v5(broker, clock, client_id, expect_ok=True):
    c = FakeClient(broker, clock, level=5)
    packets = c.connect(client_id, clean=False,
                        properties=Properties(session_expiry_interval=3600),
                        expect_ok=expect_ok)
    return c, packets


def total_queued(broker):
    return sum(s.queued_bytes for s in broker.sessions.values())


def held_queued(broker):
    """Bytes of the distinct messages queued (a message in several queues once)."""
    held = {id(r.message): len(r.message.topic) + len(r.message.payload)
            for s in broker.sessions.values() for r in s.queue}
    return sum(held.values())


# --- --max-sessions -------------------------------------------------------------------------

def persistent_as(broker, clock, client_id, username, level=5, expect_ok=True):
    """A persistent session of ``username`` (None: anonymous); the client and its CONNACK."""
    c = FakeClient(broker, clock, level=level)
    c.send(Connect(level, client_id, False, 0, username=username,
                   password=None if username is None else b"pw",
                   properties=Properties(session_expiry_interval=3600)
                   if level == 5 else Properties()))
    packets = c.received()
    assert isinstance(packets[0], Connack)
    if expect_ok:
        assert packets[0].reason_code == 0
    return c, packets[0]


@pytest.mark.parametrize("level, code", [(5, 0x97), (4, 0x03)])
def test_one_persistent_session_too_many_is_refused_with_connack(log_events, level, code):
    """At --max-sessions, with no offline session of its own to evict, a new persistent
    session gets CONNACK 0x97 (v3 0x03), then a close."""
    broker, clock = make_broker(max_sessions=2)
    for i in range(2):
        persistent_v5(broker, clock, f"p{i}")      # online: nothing to evict
    c = FakeClient(broker, clock, level=level)
    props = Properties(session_expiry_interval=60) if level == 5 else Properties()
    packets = c.connect("p2", clean=False, properties=props, expect_ok=False)
    assert len(packets) == 1 and isinstance(packets[0], Connack)
    assert packets[0].reason_code == code and not packets[0].session_present
    assert c.disconnecting
    assert "p2" not in broker.sessions
    assert broker.stats.refused.get("max-sessions") == 1
    assert broker.stats.persistent_sessions == 2
    lines = [e for e in log_events if "max-sessions" in str(e.get("why", ""))]
    assert len(lines) == 1 and lines[0]["reason_code"] == 0x97


def test_resuming_or_clean_sessions_are_not_counted_against_max_sessions():
    """At the cap, an existing persistent session resumes and clean sessions connect."""
    broker, clock = make_broker(max_sessions=1)
    first, _ = persistent_v5(broker, clock, "p0")
    first.drop()
    again, packets = persistent_v5(broker, clock, "p0")
    assert packets[0].session_present
    clean = FakeClient(broker, clock, level=5)
    clean.connect("clean")
    again.send(Disconnect(0, Properties(session_expiry_interval=0)))   # ends p0
    persistent_v5(broker, clock, "p1")                                 # room again
    assert "max-sessions" not in broker.stats.refused


def test_at_max_sessions_a_new_session_evicts_its_owners_longest_offline_one(log_events):
    """REVIEW-S9 R10: at the cap the creator's own longest-offline session makes room."""
    from mqttd.persistence import records as R
    broker, clock = make_broker(max_sessions=3, max_sessions_per_user=0)
    written = []
    write = broker._write
    broker._write = lambda op: (written.append(op), write(op))
    for cid in ("p0", "p1"):
        persistent_as(broker, clock, cid, "junk")[0].drop()
        clock.advance(1)
    persistent_as(broker, clock, "p0", "junk")[0].drop()     # p0 back and gone again: p1 is older
    persistent_as(broker, clock, "other", "alice")          # online
    persistent_as(broker, clock, "p2", "junk")
    assert "p1" not in broker.sessions and {"p0", "p2", "other"} <= set(broker.sessions)
    assert R.DeleteSession("p1") in written          # gone from the store too
    assert broker.stats.sessions_evicted == 1 and broker.stats.persistent_sessions == 3
    lines = [e for e in log_events if e.get("what") == "max-sessions" and "evicted" in e]
    assert len(lines) == 1 and lines[0]["evicted"] == "p1"
    # alice has no offline session of her own: refused, nobody else's is touched
    _c, ack = persistent_as(broker, clock, "alice2", "alice", expect_ok=False)
    assert ack.reason_code == 0x97 and broker.stats.refused["max-sessions"] == 1


def test_one_user_takes_only_its_share_of_the_sessions():
    """REVIEW-S9 R10: one credential creating throwaway sessions never locks the others out."""
    broker, clock = make_broker(max_sessions=6, max_sessions_per_user=2)
    for i in range(20):
        persistent_as(broker, clock, f"junk-{i}", "mallory")[0].drop()
    assert [cid for cid in broker.sessions if cid.startswith("junk")] == ["junk-18", "junk-19"]
    assert broker.stats.sessions_evicted == 18
    for cid, user in (("a", "alice"), ("b", "bob"), ("n", None)):
        persistent_as(broker, clock, cid, user, level=4)
    # a user whose share is all online is refused (nothing of its own to evict)
    persistent_as(broker, clock, "b2", "bob")
    _c, ack = persistent_as(broker, clock, "b3", "bob", level=4, expect_ok=False)
    assert ack.reason_code == 0x03 and broker.stats.refused["max-sessions-per-user"] == 1
    assert broker.stats.persistent_sessions == 6 and "b3" not in broker.sessions


def test_persistent_session_index_keeps_owners_offline_order():
    """The O(1) index behind the caps: counts per owner, longest-offline first, owner changes."""
    from mqttd.session import Session
    from mqttd.sessionbudget import PersistentSessions
    index, sessions = PersistentSessions(), {}
    for cid, owner in (("x", "u"), ("y", "u"), ("z", None)):
        sessions[cid] = Session(client_id=cid, persistent=True, owner=owner)
        index.add(cid, owner)
    index.went_offline("y")
    index.went_offline("x")
    assert index.count("u") == 2 and index.count(None) == 1 and len(index) == 3
    assert index.longest_offline("u", sessions) is sessions["y"]
    index.went_online("y")
    assert index.longest_offline("u", sessions) is sessions["x"]
    sessions["x"].owner = "v"
    index.add("x", "v")                 # claimed by another owner
    assert index.count("u") == 1 and index.count("v") == 1
    assert index.longest_offline("u", sessions) is None
    index.discard("y")
    assert index.count("u") == 0 and "y" not in index and len(index) == 2


# --- fair share at --max-sessions (owner's share at or above the cap) -------------------------

def flood(broker, clock, owner, count, prefix=None):
    """``count`` throwaway persistent sessions of ``owner``: CONNECT, then gone."""
    prefix = prefix or f"{owner}-junk"
    for i in range(count):
        persistent_as(broker, clock, f"{prefix}-{i}", owner)[0].drop()
        clock.advance(1)


@pytest.mark.parametrize("share", [0, 5, 50])
def test_one_owner_holding_the_whole_cap_does_not_lock_others_out(log_events, share):
    """With --max-sessions-per-user >= --max-sessions (or 0), another user's new session
    evicts the biggest owner's longest-offline session instead of getting 0x97."""
    broker, clock = make_broker(max_sessions=5, max_sessions_per_user=share)
    flood(broker, clock, "mallory", 5)
    assert broker.stats.persistent_sessions == 5
    _c, ack = persistent_as(broker, clock, "alice-1", "alice")
    assert ack.reason_code == 0
    assert "mallory-junk-0" not in broker.sessions and "alice-1" in broker.sessions
    assert broker.stats.sessions_evicted == 1 and "max-sessions" not in broker.stats.refused
    lines = [e for e in log_events if e.get("evicted") == "mallory-junk-0"]
    assert len(lines) == 1
    assert (lines[0]["victim_owner"], lines[0]["owner"], lines[0]["held"]) == (
        "mallory", "alice", 5)
    assert lines[0]["peer"] == "127.0.0.1:1"                 # the new session's


def test_the_flooding_owner_then_evicts_only_its_own_sessions():
    """Once others hold sessions, the flooder's new sessions evict its own, never theirs."""
    broker, clock = make_broker(max_sessions=6, max_sessions_per_user=0)
    flood(broker, clock, "mallory", 6)
    for user in ("alice", "bob", "carol"):
        persistent_as(broker, clock, f"{user}-1", user)[0].drop()   # offline too
        clock.advance(1)
    flood(broker, clock, "mallory", 30, prefix="again")
    owners = sorted(s.owner for s in broker.sessions.values())
    assert owners == ["alice", "bob", "carol", "mallory", "mallory", "mallory"]
    assert broker.stats.persistent_sessions == 6 and "max-sessions" not in broker.stats.refused


def test_an_owner_is_never_displaced_for_one_holding_almost_as_many():
    """Eviction across owners needs the biggest to hold two more than the newcomer: no
    ping-pong between owners of equal size; the newcomer evicts its own or is refused."""
    broker, clock = make_broker(max_sessions=4, max_sessions_per_user=0)
    flood(broker, clock, "a", 2)
    persistent_as(broker, clock, "b-1", "b")                 # online
    persistent_as(broker, clock, "b-2", "b")[0].drop()       # offline
    persistent_as(broker, clock, "b-3", "b")                 # b 2, a 2: b evicts its own
    assert {"a-junk-0", "a-junk-1", "b-1", "b-3"} == set(broker.sessions)
    _c, ack = persistent_as(broker, clock, "c-1", "c", expect_ok=True)  # c 0 vs 2: fair
    assert ack.reason_code == 0 and "a-junk-0" not in broker.sessions
    # now a 1, b 2, c 1: b's next session finds no one holding b+2: its own is online
    _c, ack = persistent_as(broker, clock, "b-4", "b", expect_ok=False)
    assert ack.reason_code == 0x97 and broker.stats.refused["max-sessions"] == 1


def test_the_biggest_owner_with_an_offline_session_gives_way():
    """An owner whose sessions are all connected keeps them; the biggest owner with an
    offline session is the one that gives way."""
    broker, clock = make_broker(max_sessions=6, max_sessions_per_user=0)
    for i in range(3):
        persistent_as(broker, clock, f"busy-{i}", "busy")      # all connected
    flood(broker, clock, "idle", 2)
    persistent_as(broker, clock, "z-1", "z")
    _c, ack = persistent_as(broker, clock, "new-1", "newcomer")
    assert ack.reason_code == 0
    assert "idle-junk-0" not in broker.sessions
    assert all(f"busy-{i}" in broker.sessions for i in range(3))


def test_per_user_share_still_comes_first():
    """Under its share an owner's sessions are its own business; at its share it evicts its
    own even when the global cap is not reached."""
    broker, clock = make_broker(max_sessions=100, max_sessions_per_user=3)
    flood(broker, clock, "m", 5)
    assert sorted(cid for cid in broker.sessions) == ["m-junk-2", "m-junk-3", "m-junk-4"]


@pytest.mark.parametrize("limit, share, warned", [
    (100_000, 10_000, False), (10, 10, True), (10, 50, True), (10, 0, True), (0, 0, False)])
def test_start_up_warns_when_one_user_may_hold_the_whole_cap(log_events, limit, share, warned):
    """A per-user share at or above --max-sessions (or none) is named at start-up."""
    from mqttd.persistence.records import StoredState
    broker, clock = make_broker(max_sessions=limit, max_sessions_per_user=share)
    broker.restore(StoredState())
    lines = [e for e in log_events if "--max-sessions-per-user" in e.get("log_format", "")
             and "not below" in e.get("log_format", "")]
    assert len(lines) == (1 if warned else 0)


def test_fair_victim_matches_a_brute_force_judgement():
    """PersistentSessions.fair_victim against a model, over random owners' sessions going
    online, offline, away and changing owner; the heap stays bounded."""
    import random
    from mqttd.session import Session
    from mqttd.sessionbudget import PersistentSessions
    rng = random.Random(11)
    owners = ["u%d" % i for i in range(6)] + [None, ("anonymous", "10.0.0.1")]
    index, sessions = PersistentSessions(), {}
    offline_order = []                       # client ids, longest offline first
    for step in range(3000):
        op = rng.random()
        cid = "c%d" % rng.randrange(60)
        if op < 0.35 and cid not in sessions:
            owner = rng.choice(owners)
            sessions[cid] = Session(client_id=cid, persistent=True, owner=owner,
                                    connection=object())
            index.add(cid, owner)
        elif op < 0.6 and cid in sessions and sessions[cid].connection is not None:
            sessions[cid].connection = None
            if rng.random() < 0.3:
                sessions[cid].queue = (object(),)            # owes a message
            index.went_offline(cid, bool(sessions[cid].queue))
            offline_order.append(cid)
        elif op < 0.65 and cid in sessions and sessions[cid].connection is None:
            sessions[cid].queue = (object(),)                # queued for it while offline
        elif op < 0.75 and cid in sessions and sessions[cid].connection is None:
            sessions[cid].connection = object()
            sessions[cid].queue = ()                         # drained
            index.went_online(cid)
            offline_order.remove(cid)
        elif op < 0.85 and cid in sessions:
            del sessions[cid]
            index.discard(cid)
            if cid in offline_order:
                offline_order.remove(cid)
        elif op < 0.9 and cid in sessions and sessions[cid].connection is not None:
            owner = rng.choice(owners)       # claimed by another user (while connected)
            sessions[cid].owner = owner
            index.add(cid, owner)
        # the model
        counts = {}
        for s in sessions.values():
            counts[s.owner] = counts.get(s.owner, 0) + 1
        with_offline = {sessions[c].owner for c in offline_order}
        me = rng.choice(owners)
        best = max((counts[o] for o in with_offline), default=0)
        victim = index.fair_victim(me, sessions)
        if best >= counts.get(me, 0) + 2:
            assert victim is not None and counts[victim.owner] == best
        else:
            mine = [c for c in offline_order if sessions[c].owner == me]
            assert (victim is None) == (not mine)
            assert victim is None or victim.owner == me
        if victim is not None:
            theirs = [c for c in offline_order if sessions[c].owner == victim.owner]
            idle = [c for c in theirs if not sessions[c].queue]
            if idle:                                         # owing nothing goes first
                assert victim.client_id == idle[0]
            else:
                assert victim.client_id in theirs
        assert len(index._heap) <= 2 * len(index._marks) + 65
        assert dict(index._counts) == counts


# --- anonymous clients: one budget per address (REVIEW-S10 S6) -------------------------------

def anonymous_from(broker, clock, client_id, peer, expect_ok=True):
    """An anonymous v3.1.1 persistent session from ``peer``; the client and its CONNACK."""
    c = FakeClient(broker, clock, level=4, peer=peer)
    c.send(Connect(4, client_id, False, 0))
    packets = c.received()
    ack, c._unread = packets[0], packets[1:]      # what followed stays readable
    assert isinstance(ack, Connack)
    if expect_ok:
        assert ack.reason_code == 0
    return c, ack


def test_one_anonymous_client_cannot_evict_another_addresss_sessions(log_events):
    """An anonymous flood from one address evicts its own sessions only: another address's
    offline session keeps its queued QoS 1 message (before: evicted, the message lost)."""
    broker, clock = make_broker(max_sessions_per_user=3)
    victim, _ = anonymous_from(broker, clock, "victim", "10.0.0.1:4000")
    victim.subscribe("v/#", qos=1)
    victim.drop()
    broker.publish_message("v/1", b"kept", qos=1)
    for i in range(30):
        anonymous_from(broker, clock, f"junk{i}", "10.0.0.2:5000")[0].drop()
        clock.advance(1)
    assert "victim" in broker.sessions
    assert sorted(c for c in broker.sessions if c.startswith("junk")) == [
        "junk27", "junk28", "junk29"]
    back, _ = anonymous_from(broker, clock, "victim", "10.0.0.1:4001")
    assert [p.payload for p in back.received() if isinstance(p, Publish)] == [b"kept"]
    evictions = [e for e in log_events if "evicted" in e]
    assert evictions and {e["owner"] for e in evictions} == {"anonymous@10.0.0.2"}


def test_anonymous_clients_of_one_ipv6_64_share_one_budget():
    """Addresses of one IPv6 /64 are one owner (a new address from it is not a new budget)."""
    broker, clock = make_broker(max_sessions_per_user=2)
    for i in range(10):
        anonymous_from(broker, clock, f"a{i}", f"[2001:db8:1:2::{i + 1}]:4000")[0].drop()
        clock.advance(1)
    anonymous_from(broker, clock, "other", "[2001:db8:1:3::1]:4000")[0].drop()
    assert sorted(broker.sessions) == ["a8", "a9", "other"]


def test_a_restored_anonymous_session_joins_its_address_budget_when_it_reconnects():
    """The store does not keep addresses: a restored anonymous session counts for
    "anonymous@-" until it reconnects, then for its address."""
    from mqttd.broker import Broker
    from mqttd.config import BrokerConfig
    from mqttd.persistence.records import StoredSession, StoredState
    broker, clock = make_broker()
    anonymous_from(broker, clock, "dev", "10.0.0.9:1")[0].drop()
    fresh = Broker(clock, None, BrokerConfig(max_sessions_per_user=1))
    fresh.restore(StoredState(sessions={"dev": StoredSession(
        broker.sessions["dev"].to_record())}))
    assert fresh._persistent.owner_of("dev") == ("anonymous", "-")
    anonymous_from(fresh, clock, "dev", "10.0.0.9:2")[0].drop()
    assert fresh._persistent.owner_of("dev") == ("anonymous", "10.0.0.9")
    anonymous_from(fresh, clock, "new", "10.0.0.9:3")          # share 1: evicts "dev"
    assert "dev" not in fresh.sessions


def test_a_flood_from_the_same_address_evicts_its_empty_sessions_before_owed_messages():
    """REVIEW-S10 S6 as reported (every anonymous client on loopback): the flood's own empty
    sessions make room before a session that owes a queued QoS 1 message is evicted."""
    broker, clock = make_broker(max_sessions_per_user=3)
    victim, _ = anonymous_from(broker, clock, "victim", "127.0.0.1:4000")
    victim.subscribe("v/#", qos=1)
    victim.drop()
    broker.publish_message("v/1", b"kept", qos=1)
    for i in range(30):
        anonymous_from(broker, clock, f"junk{i}", "127.0.0.1:5000")[0].drop()
        clock.advance(1)
    assert sorted(c for c in broker.sessions) == ["junk28", "junk29", "victim"]
    back, _ = anonymous_from(broker, clock, "victim", "127.0.0.1:4001")
    assert [p.payload for p in back.received() if isinstance(p, Publish)] == [b"kept"]


def test_sessions_that_owe_messages_go_last_and_longest_offline_first():
    """Messages queued for an offline session while it was filed as owing nothing move it
    behind the empty ones; with only owing sessions left, the longest offline goes."""
    broker, clock = make_broker(max_sessions_per_user=3)
    for cid in ("old", "mid", "new"):
        c, _ = anonymous_from(broker, clock, cid, "10.0.0.5:1")
        c.subscribe(f"{cid}/#", qos=1)
        c.drop()
        clock.advance(1)
    broker.publish_message("old/1", b"x", qos=1)             # old owes one now
    anonymous_from(broker, clock, "n1", "10.0.0.5:2")[0].drop()
    assert sorted(broker.sessions) == ["n1", "new", "old"]   # mid (empty) went, not old
    broker.publish_message("new/1", b"x", qos=1)
    broker.publish_message("n1/1", b"x", qos=1)              # n1 has no subscription: empty
    anonymous_from(broker, clock, "n2", "10.0.0.5:3")
    assert sorted(broker.sessions) == ["n2", "new", "old"]   # n1 (empty) went
    anonymous_from(broker, clock, "n3", "10.0.0.5:4")        # all owe: the longest offline
    assert sorted(broker.sessions) == ["n2", "n3", "new"]


def test_budget_owner_names_users_and_anonymous_addresses():
    """budget_owner: the user name, or ("anonymous", IPv4 host / IPv6 /64 / "-")."""
    from mqttd.sessionbudget import budget_owner, owner_name
    assert budget_owner("alice", "10.0.0.1:1") == "alice"
    assert budget_owner(None, "10.0.0.1:1") == ("anonymous", "10.0.0.1")
    assert budget_owner(None, "[2001:db8::7]:1") == ("anonymous", "2001:db8::/64")
    assert budget_owner(None) == ("anonymous", "-")
    assert owner_name(("anonymous", "10.0.0.1")) == "anonymous@10.0.0.1"
    assert owner_name("alice") == "alice"


# --- --max-queued-bytes-total ---------------------------------------------------------------

def offline_subscribers(broker, clock, n):
    for i in range(n):
        c, _ = persistent_v5(broker, clock, f"s{i}")
        c.subscribe("t/#", qos=1)
        c.drop()


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-new"])
def test_total_queued_bytes_stay_within_the_cap(log_events, policy):
    """Messages queued for all sessions together hold at most the cap (plus one message),
    a message queued for five sessions counted once; drops counted, one WARN line."""
    broker, clock = make_broker(max_queued_bytes_total=10_000, overflow_policy=policy)
    offline_subscribers(broker, clock, 5)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(200):                  # 200 x 103 bytes, each queued for 5 sessions
        pub.publish("t/x", b"p" * 100, qos=1, packet_id=i % 65535 + 1)
    assert broker.stats.queued_bytes == held_queued(broker) <= 10_000 + 103
    assert len(broker.sessions["s0"].queue) == 97          # 97 x 103 <= 10,000
    assert total_queued(broker) == 5 * held_queued(broker)  # each session is owed all 97
    # dropping a session's oldest message, which 4 other queues hold, would free nothing:
    # under drop-oldest too the new message is dropped, for each of the 5 sessions
    assert broker.stats.dropped["queued-bytes-total"] == 5 * (200 - 97)
    warnings = [e for e in log_events if "max-queued-bytes-total" in e.get("log_format", "")]
    assert len(warnings) == 1            # rate-limited: one a minute
    assert broker.sessions["s0"].queue[0].message.payload == b"p" * 100


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-new"])
def test_total_cap_with_messages_of_one_session_each(policy):
    """Each session owed its own messages: drop-oldest makes room with the session's oldest
    (the newest are kept), drop-new keeps the oldest; within the cap plus one message."""
    broker, clock = make_broker(max_queued_bytes_total=10_000, overflow_policy=policy)
    for i in range(5):
        c, _ = persistent_v5(broker, clock, f"s{i}")
        c.subscribe(f"t/{i}", qos=1)
        c.drop()
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(200):
        pub.publish(f"t/{i % 5}", b"%03d" % i + b"p" * 97, qos=1, packet_id=i % 65535 + 1)
    assert broker.stats.queued_bytes == held_queued(broker) == total_queued(broker)
    assert total_queued(broker) <= 10_000 + 103
    assert broker.stats.dropped["queued-bytes-total"] > 100
    first = broker.sessions["s0"].queue[0].message.payload[:3]
    assert (first == b"000") == (policy == "drop-new")


def test_one_message_fanned_out_counts_once_against_the_total(log_events):
    """REVIEW-S9 R11: a 100 KB message for 200 offline sessions holds 100 KB, not 20 MB:
    under a 1 MB total cap every session gets it (before: 10 did, 190 dropped)."""
    broker, clock = make_broker(max_queued_bytes_total=1_000_000)
    offline_subscribers(broker, clock, 200)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t/x", b"b" * 100_000, qos=1, packet_id=1)
    assert all(len(broker.sessions[f"s{i}"].queue) == 1 for i in range(200))
    assert broker.stats.queued_bytes == 100_003
    assert "queued-bytes-total" not in broker.stats.dropped
    for i in range(199):                                    # 199 sessions get it
        persistent_v5(broker, clock, f"s{i}")
    assert broker.stats.queued_bytes == 100_003             # s199 still owes it
    persistent_v5(broker, clock, "s199")
    assert broker.stats.queued_bytes == 0 and broker.stats.queued_held == {}


def test_ledger_follows_drains_and_discarded_sessions():
    """Delivering or discarding queued messages gives their bytes back to the total once
    no queue holds them any more."""
    broker, clock = make_broker(max_queued_bytes_total=1_000_000)
    offline_subscribers(broker, clock, 3)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(10):
        pub.publish("t/x", b"p" * 100, qos=1, packet_id=i + 1)
    assert broker.stats.queued_bytes == 10 * 103 == held_queued(broker)
    assert total_queued(broker) == 3 * 10 * 103
    back, _ = persistent_v5(broker, clock, "s0")           # drains s0
    assert len([p for p in back.received() if isinstance(p, Publish)]) == 10
    assert broker.stats.queued_bytes == 10 * 103            # s1 and s2 still hold them
    FakeClient(broker, clock, level=5).connect("s1", clean=True)   # discards s1's queue
    assert broker.stats.queued_bytes == 10 * 103 == total_queued(broker)
    FakeClient(broker, clock, level=5).connect("s2", clean=True)
    assert broker.stats.queued_bytes == 0 == total_queued(broker)


def test_restored_sessions_are_evicted_longest_offline_first():
    """After a restart the owners' offline order comes from the stored disconnect times."""
    from mqttd.broker import Broker
    from mqttd.config import BrokerConfig
    from mqttd.persistence.records import StoredSession, StoredState
    broker, clock = make_broker()
    for cid in ("early", "late"):
        persistent_as(broker, clock, cid, "u")[0].drop()
        clock.advance(10)
    records = {cid: StoredSession(broker.sessions[cid].to_record()) for cid in ("late", "early")}
    fresh = Broker(clock, None, BrokerConfig(max_sessions=2))
    fresh.restore(StoredState(sessions=records))
    persistent_as(fresh, clock, "new", "u")
    assert set(fresh.sessions) == {"late", "new"} and fresh.stats.sessions_evicted == 1


# --- drop lines under the global log limit (REVIEW-S10 S13) -----------------------------------

def test_drop_lines_of_many_clients_stay_within_the_per_reason_log_limit(log_events):
    """120 subscribers each dropping a message at once log at most the limiter's 50 lines per
    reason (before: one line each, growing with the connections one host opens); the next
    line reports how many were suppressed; each line names client and peer."""
    broker, clock = make_broker()
    for i in range(120):
        c = FakeClient(broker, clock, level=5, peer=f"10.0.1.{i % 250}:1")
        c.connect(f"tiny-{i}", properties=Properties(maximum_packet_size=30))
        c.subscribe("lg/#")
    broker.publish_message("lg/x", b"p" * 100)
    assert broker.stats.dropped["client-maximum-packet-size"] == 120

    def lines():
        return [e for e in log_events if "Dropping messages" in e.get("log_format", "")]
    assert len(lines()) == 50
    assert lines()[0]["peer"] == "10.0.1.0:1" and lines()[0]["client_id"] == "tiny-0"
    clock.advance(11)
    broker.publish_message("lg/x", b"p" * 100)
    assert len(lines()) == 100
    assert lines()[50]["suppressed"] == 70
