"""A node does not route by a route cache that may lack a route another node's
SUBACK already vouched for (REVIEW-CLUSTER F1, the stalled-node case): while
no feed read completed for ``stale_after`` seconds (a blocked event loop, a
hung link to Redis), what it would forward is held, in order, and routed
with the caught-up cache; the publisher's PUBACK waits for that.  In-process:
one broker and its bus router on ``task.Clock``, Redis replaced by a recorder."""
from __future__ import annotations

from mqttd.messages import Message

from .test_shared_reroute import node_b


def fresh_now(router, clock):
    router.routes._fresh(clock.seconds())


def test_a_node_whose_cache_went_stale_holds_forwarding_until_it_caught_up(log_events):
    """After a stall, a message published on B goes by the route C added
    meanwhile -- not by B's old cache, which had no route to C -- and its
    acknowledgement waits until the envelope is in Redis."""
    broker, clock, router, redis = node_b(other_routes={"other/#"})
    fresh_now(router, clock)
    clock.advance(5)                       # B's feed reads stalled for 5 s
    assert not router.routes.fresh()
    # held: where it goes is not known yet (so no 0x10 "no matching subscribers")
    assert broker.publish(Message("late/1", b"first", 1)) == 1
    assert broker.publish(Message("late/2", b"second", 0)) == 1
    done = []
    router.sync().addCallback(done.append)
    clock.advance(0)
    assert redis.sent() == [] and done == []
    # the feed read returns: C's new route is in the cache, which is fresh again
    router.routes._cache_apply("C", "+", "late/#")
    fresh_now(router, clock)
    clock.advance(0)
    sent = redis.sent()
    assert [(inbox, [m.payload for m, _only in items]) for inbox, items in sent] == [
        ("mqttd:{n:C}:inbox", [b"first", b"second"])]
    assert done == [None]
    assert any("holding messages for other nodes" in e.get("log_format", "")
               for e in log_events)
    # fresh: the next one goes at once
    broker.publish(Message("late/3", b"third", 1))
    clock.advance(0)
    assert [m.payload for _inbox, items in redis.sent()[1:] for m, _o in items] == [b"third"]


def test_a_cache_that_never_catches_up_is_used_after_the_hold_limit_with_a_warning(
        log_events):
    """Availability has a bound: after ``max_hold`` seconds the held messages
    go by the cache as it is, with one WARN; nothing is lost meanwhile."""
    broker, clock, router, redis = node_b(other_routes={"late/#"})
    fresh_now(router, clock)
    clock.advance(5)
    broker.publish(Message("late/9", b"held", 1))
    clock.advance(0)
    assert redis.sent() == []
    clock.advance(router.max_hold)
    assert [m.payload for _inbox, items in redis.sent() for m, _o in items] == [b"held"]
    assert any("did not catch up" in e.get("log_format", "") for e in log_events)


def test_held_messages_of_a_node_that_fences_are_not_acknowledged():
    """Fenced while holding: nothing is forwarded and the QoS 1 publisher's
    acknowledgement fails (it is disconnected and re-sends elsewhere)."""
    broker, clock, router, redis = node_b(other_routes={"late/#"})
    fresh_now(router, clock)
    clock.advance(5)
    broker.publish(Message("late/f", b"held", 1))
    failed = []
    router.sync().addErrback(failed.append)
    router.fenced()
    clock.advance(10)
    assert redis.sent() == [] and len(failed) == 1
