"""A reap that fails lets go of its lock and is tried again (REVIEW-S9-CLUSTER C7).

The reaper lock ``mqttd:{n:X}:reaper`` keeps X's id out while X is reaped
(a restarted X refuses CONNECT with 0x88 until the reap is done).  A reap
that failed -- a Redis timeout, or ``NOGROUP`` on a dead node that has no
inbox -- kept it until its TTL ran out (~30 s) and was not tried again.
Real redis-server, in-process nodes (``sessionnodes``) on a ``task.Clock``.
"""
from __future__ import annotations

import asyncio

from twisted.internet import defer

from mqttd.cluster.backend import BackendError
from mqttd.cluster.keys import Keys
from mqttd.cluster.reaper import InboxReplay, Reaper

from .conftest import wait
from .sessionnodes import settle, start_nodes

LOCK = "mqttd:{n:%s}:reaper"


async def _until(d, clock, steps=300, tick=0.0):
    """Turn the asyncio loop (and ``clock`` by ``tick``) until ``d`` fired (bounded)."""
    for _ in range(steps):
        if d.called:
            break
        await asyncio.sleep(0.01)
        clock.advance(tick)
    assert d.called
    return await wait(d)


def test_a_failed_reap_releases_its_lock_at_once_and_is_retried(redis_server, aio):
    """The inbox replay fails (Redis did not answer): the lock is gone right away
    -- the dead node id may come back -- and the reap runs again after
    ``retry_delay`` seconds, this time to its end."""
    async def run():
        alive, b = start_nodes(redis_server.url, "B")
        attempts = []

        def replay(node, deliver, sync):
            attempts.append(node)
            if len(attempts) == 1:
                return defer.fail(BackendError("no answer from Redis within 5 s"))
            return defer.succeed(0)
        reaper = Reaper(b.sessions, replay_inbox=replay, retry_delay=1.0)
        assert not await _until(reaper.reap("X"), b.clock)
        await settle(b)
        assert redis_server.cli("EXISTS", LOCK % "X").strip() == "0"
        assert attempts == ["X"]
        b.clock.advance(1.0)                 # the retry
        for _ in range(300):
            if reaper.retries and "X" not in reaper._reaping:
                break
            await asyncio.sleep(0.01)
            b.clock.advance(0)
        assert attempts == ["X", "X"]
        assert reaper.retries == 1
        assert redis_server.cli("EXISTS", LOCK % "X").strip() == "0"
        assert not reaper._retry_calls       # done: no more retries
    aio(run)


def test_a_reap_whose_retries_keep_failing_backs_off_and_stops_when_another_node_reaps(
        redis_server, aio):
    """Each failure doubles the delay (up to ``retry_max``); once the lock is
    another node's the retries end (that node reaps it)."""
    async def run():
        alive, b = start_nodes(redis_server.url, "B")
        reaper = Reaper(b.sessions, replay_inbox=lambda node, deliver, sync: defer.fail(
            BackendError("no answer from Redis within 5 s")), retry_delay=1.0, retry_max=2.0)
        assert not await _until(reaper.reap("X"), b.clock)
        assert reaper._retry_delays["X"] == 2.0
        b.clock.advance(1.0)
        for _ in range(300):
            if reaper.retries == 1 and "X" not in reaper._reaping:
                break
            await asyncio.sleep(0.01)
            b.clock.advance(0)
        assert reaper._retry_delays["X"] == 2.0      # capped
        assert "X" in reaper._retry_calls
        await settle(b)
        redis_server.cli("SET", LOCK % "X", "C")     # node C reaps X now
        b.clock.advance(2.0)
        for _ in range(300):
            if reaper.retries == 2 and "X" not in reaper._reaping:
                break
            await asyncio.sleep(0.01)
            b.clock.advance(0)
        await settle(b)
        assert reaper.retries == 2
        assert not reaper._retry_calls and "X" not in reaper._retry_delays
        assert redis_server.cli("GET", LOCK % "X").strip() == "C"   # not ours to free
    aio(run)


def test_reaping_a_dead_node_that_has_no_inbox_succeeds(redis_server, aio):
    """The review's example: ``NOGROUP No such key ... in XREADGROUP`` (the dead
    node's inbox is gone, or a late XADD re-created it without its group) failed
    the reap; a missing inbox means nothing to replay."""
    async def run():
        alive, b = start_nodes(redis_server.url, "B")
        keys = Keys()
        inbox = InboxReplay(b.backend, keys, "B", b.clock, settle=0.5)
        reaper = Reaper(b.sessions, replay_inbox=inbox.replay, forget_node=inbox.forget)
        redis_server.cli("SADD", "mqttd:nodes", "X")
        assert await _until(reaper.reap("X"), b.clock, tick=0.1)
        assert redis_server.cli("EXISTS", LOCK % "X").strip() == "0"
        # an inbox re-created without its group by a publisher's late XADD
        redis_server.cli("XADD", keys.inbox("Y"), "*", "e", "late")
        assert await _until(reaper.reap("Y"), b.clock, tick=0.1)
        assert redis_server.cli("EXISTS", LOCK % "Y").strip() == "0"
        assert reaper.retries == 0
    aio(run)


def test_the_reaper_lock_lasts_at_most_ten_seconds_by_default(redis_server, aio):
    """A reaper that dies (or loses Redis) mid-reap cannot release its lock: the
    dead node id stays out only until the lock's TTL, now 10 s (renewed every
    third of it while the reap makes progress), not 30 s."""
    async def run():
        alive, b = start_nodes(redis_server.url, "B")
        hung = defer.Deferred()
        reaper = Reaper(b.sessions, replay_inbox=lambda node, deliver, sync: hung)
        d = reaper.reap("X")
        for _ in range(300):
            if redis_server.cli("EXISTS", LOCK % "X").strip() == "1":
                break
            await asyncio.sleep(0.01)
            b.clock.advance(0)
        ttl = int(redis_server.cli("PTTL", LOCK % "X").strip())
        assert 0 < ttl <= 10000
        d.cancel()
        reaper.stop()
        await settle(b)
        assert not reaper._retry_calls
    aio(run)
