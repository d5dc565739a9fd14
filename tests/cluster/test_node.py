"""Node membership on a fake Redis and task.Clock: joining, heartbeats, peers,
self-fencing and recovery (pure logic; the real-Redis behaviour is in
test_redis_trouble.py)."""
from __future__ import annotations

import pytest
from twisted.internet import task

from mqttd.cluster.keys import Keys
from mqttd.cluster.node import Node, check_node_id, default_node_id

from .fakeredis import FakeBackend


def make(node_id="a", heartbeat=1.0, ttl=5.0, backend=None, clock=None):
    clock = clock or task.Clock()
    backend = backend or FakeBackend(clock)
    node = Node(backend, clock, node_id, heartbeat, ttl)
    events = []
    for name in ("fenced", "unfenced", "rejoined", "peer_up", "peer_down"):
        node.on(name, lambda *args, name=name: events.append((name,) + args))
    return node, backend, clock, events


def test_node_ids_are_checked_and_the_default_is_host_and_pid():
    """A node id becomes part of Redis keys: only a safe alphabet, at most 64 characters."""
    assert check_node_id("edge-1.a_b") == "edge-1.a_b"
    for bad in ("", "a b", "a{b}", "x" * 65, "é"):
        with pytest.raises(ValueError):
            check_node_id(bad)
    assert check_node_id(default_node_id())


def test_ttl_must_cover_two_heartbeats():
    """One lost heartbeat must never make a node dead."""
    clock = task.Clock()
    with pytest.raises(ValueError):
        Node(FakeBackend(clock), clock, "a", heartbeat=1.0, ttl=1.5)


def test_a_node_is_fenced_until_it_joined_and_then_serves():
    """No client is accepted before the node is a member."""
    node, backend, clock, events = make()
    assert node.fenced
    node.start()
    clock.advance(0)
    assert node.joined and not node.fenced
    assert events == [("unfenced",)]
    assert backend.data[Keys().alive("a")] == node.boot_id.encode()
    assert b"a" in backend.data[Keys().nodes()]


def test_a_node_fences_itself_before_its_heartbeat_key_can_expire():
    """Redis out of reach: fenced after ttl - heartbeat, before the others see it dead."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    backend.down = True
    for _ in range(3):
        clock.advance(1.0)
    assert not node.fenced                 # 3 s silent < 4 s
    clock.advance(1.0)
    assert node.fenced                     # 4 s silent: fenced while its key still lives 1 s
    assert events[-1][0] == "fenced" and "no heartbeat" in events[-1][1]
    assert node.stats["heartbeat_failures"] == 4


def test_an_outage_shorter_than_the_fence_delay_changes_nothing():
    """A Redis hiccup of a few seconds neither fences the node nor changes its incarnation."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    boot = node.boot_id
    backend.down = True
    clock.pump([1.0] * 2)                  # the beats of t = 1 and 2 fail
    backend.down = False
    clock.advance(1.0)                     # the beat of t = 3 renews the 4 s fence delay
    clock.pump([1.0] * 3)
    assert not node.fenced and node.boot_id == boot
    assert [e[0] for e in events] == ["unfenced"]


def _expired_while_cut_off():
    """Node ``a`` (heartbeat 1 s, TTL 5 s) joined, then cut off from Redis for 7 s
    while its alive key expired; Redis answers again, the next beat not yet run:
    ``(node, backend, clock, events, old boot id)``."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    old = node.boot_id
    backend.down = True
    clock.pump([1.0] * 7)
    backend.expire_now(Keys().alive("a"))
    backend.down = False
    return node, backend, clock, events, old


def test_a_node_whose_key_expired_rejoins_as_a_new_incarnation():
    """The others may have reaped it: it must come back with a new boot id and say so."""
    node, backend, clock, events, old = _expired_while_cut_off()
    clock.advance(1.0)
    assert node.boot_id != old and node.joined and not node.fenced
    assert ("rejoined", old, node.boot_id) in events
    assert node.stats["rejoins"] == 1


def test_a_live_node_with_the_same_id_keeps_the_newcomer_fenced():
    """Two processes with one --node-id must not both serve: the second waits, fenced."""
    clock = task.Clock()
    backend = FakeBackend(clock)
    first, *_ = make("dup", backend=backend, clock=clock)
    second, *_ = make("dup", backend=backend, clock=clock)
    first.start()
    clock.advance(0)
    second.start()
    clock.pump([1.0] * 12)
    assert not first.fenced
    assert second.fenced and not second.joined


def test_a_restart_after_a_crash_waits_for_the_old_key_and_records_the_previous_boot():
    """kill -9 leaves the alive key for < ttl; the restarted node joins after it expired."""
    clock = task.Clock()
    backend = FakeBackend(clock)
    crashed, *_ = make("n", backend=backend, clock=clock)
    crashed.start()
    clock.advance(0)
    crashed._stopped = True               # kill -9: no leave, no more heartbeats
    crashed._call.cancel()
    restarted, *_ = make("n", backend=backend, clock=clock)
    restarted.start()
    clock.advance(0)
    assert restarted.fenced
    clock.pump([1.0] * 6)
    assert restarted.joined and not restarted.fenced
    assert restarted.previous_boot == crashed.boot_id.encode()


def test_peers_coming_and_going_are_reported():
    """The reaper and the route cache need to know when another node dies."""
    clock = task.Clock()
    backend = FakeBackend(clock)
    a, _, _, events = make("a", backend=backend, clock=clock)
    b, *_ = make("b", backend=backend, clock=clock)
    a.start()
    b.start()
    clock.advance(0)
    clock.advance(1.0)
    assert ("peer_up", "b", b.boot_id.encode()) in events
    b._stopped = True
    b._call.cancel()
    clock.pump([1.0] * 6)                 # b's key expires after 5 s
    assert ("peer_down", "b", b.boot_id.encode()) in events
    assert a.peers == {}


def test_a_peer_on_a_hung_master_neither_fences_this_node_nor_counts_as_dead():
    """Redis Cluster, the master holding b's alive key hangs (REVIEW-S9-CLUSTER C3): a's
    heartbeat (its key elsewhere) goes on, so a never fences; b is kept as last seen --
    neither reported down (the reaper would take it over) nor among the dead members."""
    clock = task.Clock()
    backend = FakeBackend(clock)
    a, _, _, events = make("a", backend=backend, clock=clock)
    b, *_ = make("b", backend=backend, clock=clock)
    a.start()
    b.start()
    clock.advance(0)
    clock.advance(1.0)
    assert ("peer_up", "b", b.boot_id.encode()) in events
    backend.hung_keys.add(Keys().alive("b"))
    clock.pump([0.5] * 20)                 # 10 s: 2.5 fence delays of a
    assert not a.fenced and a.joined
    assert a.stats["heartbeats"] >= 10
    assert [e for e in events if e[0] in ("fenced", "peer_down")] == []
    assert a.peers == {"b": b.boot_id.encode()}
    dead = []
    a.dead_members().addCallback(dead.append)
    clock.pump([0.5] * 10)                 # the look at b's key times out: not dead
    assert dead == [[]]
    backend.resume()                       # the master answers again
    clock.pump([0.5] * 4)
    assert not a.fenced and [e for e in events if e[0] == "fenced"] == []


def test_a_hung_sentinel_does_not_hold_the_heartbeat_back():
    """Sentinel: one Sentinel that never answers (each is asked at every beat, at once)
    must not delay the heartbeat until the node fences itself -- the beat waits for the
    question half a heartbeat at most, one question is out at a time, and the next beat
    asks again once it was answered."""
    from twisted.internet import defer
    clock = task.Clock()
    backend = FakeBackend(clock)
    asked = []

    def follow_primary():
        asked.append(defer.Deferred())
        return asked[-1]
    backend.follow_primary = follow_primary
    node, _, _, events = make("a", backend=backend, clock=clock)
    node.start()
    clock.advance(0)
    clock.pump([0.5] * 20)                 # 10 s with the Sentinels' answer hanging
    assert not node.fenced and [e[0] for e in events] == ["unfenced"]
    assert len(asked) == 1                 # not one more question per beat
    assert node.stats["heartbeats"] >= 9
    asked[0].callback(("127.0.0.1", 2))
    clock.pump([0.5] * 2)
    assert len(asked) == 2                 # answered: the next beat asks again
    asked[1].callback(("127.0.0.1", 2))
    clock.pump([0.5] * 2)
    assert len(asked) == 3 and not node.fenced


def test_leaving_deletes_the_heartbeat_so_the_others_see_it_at_once():
    """A clean stop must not leave the others waiting a TTL."""
    node, backend, clock, _ = make()
    node.start()
    clock.advance(0)
    node.stop()
    assert Keys().alive("a") not in backend.data
    assert b"a" not in backend.data[Keys().nodes()]


def test_a_restarted_node_serves_only_once_it_took_over_its_previous_incarnation():
    """The first join of a process runs ``recover`` (the reap of the node id's previous
    incarnation) and stays fenced until it fired -- heartbeats go on meanwhile, a failed
    recovery is retried, and a later re-join does not run it again (REVIEW-CLUSTER F14)."""
    from twisted.internet import defer
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    calls = []

    def recover():
        calls.append(defer.Deferred())
        return calls[-1]
    node.recover = recover
    node.start()
    clock.advance(0)
    assert node.joined and node.fenced and len(calls) == 1
    calls[0].errback(RuntimeError("reaper lock held"))
    clock.pump([1.0] * 6)                 # heartbeats keep the key alive meanwhile
    assert node.fenced and len(calls) == 2
    assert backend.data[Keys().alive("a")] == node.boot_id.encode()
    calls[1].callback(3)
    assert not node.fenced and events == [("unfenced",)]
    clock.pump([1.0] * 3)
    assert len(calls) == 2


# --- a hanging link (REVIEW-CLUSTER F6) and a reaped incarnation (F5) --------------------

def test_a_node_whose_redis_link_hangs_fences_itself_on_time():
    """Packets unanswered (a partition, Redis stopped): the fence must not wait for a reply."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    backend.hang = True                    # the beat sent at t=1 never comes back
    clock.pump([0.5] * 7)                  # t = 3.5
    assert not node.fenced
    clock.advance(0.5)                     # t = 4: ttl - heartbeat after the last ack (t=0)
    assert node.fenced and "no heartbeat acknowledged" in node.fence_reason
    clock.pump([1.0] * 8)                  # ticks go on; one call out, none doubled
    assert len(backend.hung) == 1


def test_a_late_answer_after_a_hang_does_not_unfence_and_a_fresh_one_does_for_good():
    """A reply to a beat sent 11 s ago proves nothing: only a fresh acknowledgement unfences,
    and then the node stays unfenced (no flapping)."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    boot = node.boot_id
    backend.hang = "replies"               # Redis renews the key at t = 1; the reply hangs
    clock.pump([1.0] * 4)
    assert node.fenced
    backend.data[Keys().alive("a")] = node.boot_id.encode()   # still there (a long TTL)
    backend.expiry[Keys().alive("a")] = clock.seconds() + 60
    clock.pump([1.0] * 8)
    backend.resume()                       # the beat of t = 1 is acknowledged at t = 12
    assert node.fenced
    clock.advance(1.0)                     # a fresh beat is acknowledged
    assert not node.fenced and node.boot_id == boot
    clock.pump([1.0] * 10)
    assert not node.fenced
    assert [e[0] for e in events] == ["unfenced", "fenced", "unfenced"]


def test_a_node_rejoining_after_a_hang_is_not_fenced_again_right_after():
    """The key expired during the hang: the late reply makes it re-join as a new
    incarnation, and that fresh join keeps it unfenced (it once fenced at once)."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    old = node.boot_id
    backend.hang = True
    clock.pump([1.0] * 12)                 # the key expired at t = 6 on Redis's clock
    backend.resume()
    assert node.joined and node.boot_id != old
    assert not node.fenced
    clock.pump([1.0] * 10)
    assert not node.fenced
    assert [e[0] for e in events] == ["unfenced", "fenced", "unfenced", "rejoined"]


def test_a_reaped_node_rejoins_only_after_the_reaper_is_done():
    """While a reaper takes over its old incarnation the node stays fenced, so nothing the
    reaper removes (routes, inbox, sessions) can be the new incarnation's."""
    node, backend, clock, events, old = _expired_while_cut_off()
    backend.execute("SET", Keys().reaper("a"), "b", "PX", 3000)
    clock.pump([1.0] * 2)
    assert node.fenced and not node.joined
    assert Keys().alive("a") not in backend.data
    clock.pump([1.0] * 2)                  # the lock is gone
    assert node.joined and not node.fenced and node.boot_id != old
    assert ("rejoined", old, node.boot_id) in events


def test_a_live_node_removed_from_the_member_set_adds_itself_back():
    """Membership heals: a node missing from mqttd:nodes would never be reaped if it died."""
    node, backend, clock, events = make()
    node.start()
    clock.advance(0)
    backend.data[Keys().nodes()].discard(b"a")
    clock.advance(1.0)
    assert b"a" in backend.data[Keys().nodes()]
    assert node.stats["membership_repairs"] == 1


def test_a_join_answered_too_late_rejoins_but_stays_fenced_until_a_fresh_beat():
    """A JOIN sent during a hang and answered after it: the node is a member again but
    serves only once a fresh heartbeat is acknowledged."""
    node, backend, clock, events = make(heartbeat=1.0, ttl=5.0)
    node.start()
    clock.advance(0)
    backend.down = True
    clock.pump([1.0] * 7)                  # fenced; the key expired at t = 5
    backend.down = False
    backend.hang = True                    # the beat of t = 8 hangs (key gone: re-join)
    clock.advance(1.0)
    backend.resume(hang_again=True)        # BEAT answers 0, the JOIN goes out and hangs
    assert not node.joined and len(backend.hung) == 1
    clock.pump([1.0] * 6)
    backend.resume()                       # the JOIN sent at t = 8 is answered at t = 14
    assert node.joined and node.fenced
    assert events[-1][0] == "rejoined"
    clock.advance(1.0)
    assert not node.fenced
