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
