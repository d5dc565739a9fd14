"""A retained write whose reply is lost leaves value and index consistent.

REVIEW-CLUSTER F13's kind: a Redis call whose outcome is unknown (a timeout:
Redis may have run it) must not leave a half-done write behind.  The value
(``SET ... GET``) and its index (``HINCRBY`` per level) were two steps: when
the first ran and its reply was lost, the PUBLISH was not acknowledged, the
client re-sent it, the second ``SET`` found the value ("replaced") and wrote no
index -- the topic stayed invisible to wildcard subscribers for good.  On one
Redis server (standalone, Sentinel) value and index are now one script: all or
nothing, so the re-send finds a consistent state either way.  Under Redis Cluster value and index
live on different masters; there every step is idempotent (a transition id
in the value, a marker per index level), so a re-send -- or any node's next
write of the topic after a crash between the steps -- finishes what is
pending without counting anything twice.
"""
from __future__ import annotations

from mqttd.cluster.backend import Backend, RedisUnavailable
from mqttd.cluster.retained import RedisRetained
from mqttd.messages import Message

from .conftest import wait


class LosesReplies:
    """Runs every call in Redis; the replies of the next ``lose`` scripts (of the
    script ``only``, when set) are lost, as after a timeout."""

    def __init__(self, backend):
        self.backend = backend
        self.lose = 0
        self.only = None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, name, keys=(), args=()):
        d = self.backend.run(name, keys, args)

        def lost(reply):
            if self.lose and self.only in (None, name):
                self.lose -= 1
                raise RedisUnavailable("no answer from Redis within 5 s")
            return reply
        return d.addCallback(lost)


def test_a_retained_publish_resent_after_a_lost_reply_is_found_by_wildcards(
        redis_server, aio):
    """Set (and clear) with the first reply lost, then re-sent as a client would: the
    exact and the wildcard lookups agree, the index counts are right."""
    async def run():
        backend = Backend(redis_server.url)
        flaky = LosesReplies(backend)
        redis = RedisRetained(flaky)
        flaky.lose = 1
        try:
            await wait(redis.put(Message("home/kitchen/temp", b"21", retain=True)))
            raise AssertionError("the lost reply must fail the write")
        except RedisUnavailable:
            pass
        # not acknowledged: the client sends it again
        await wait(redis.put(Message("home/kitchen/temp", b"21", retain=True)))
        found = await wait(redis.match("home/+/temp"))
        assert [m.topic for m in found] == ["home/kitchen/temp"]
        assert await wait(redis.count()) == 1
        # the clear, with its reply lost, re-sent
        flaky.lose = 1
        try:
            await wait(redis.put(Message("home/kitchen/temp", b"", retain=True)))
            raise AssertionError("the lost reply must fail the clear")
        except RedisUnavailable:
            pass
        await wait(redis.put(Message("home/kitchen/temp", b"", retain=True)))
        assert await wait(redis.match("home/#")) == []
        assert await wait(redis.count()) == 0
        assert redis_server.cli("KEYS", "mqttd:ret:*").split() == []
        await wait(backend.close())
    aio(run)


async def _expect_lost(d):
    try:
        await wait(d)
    except RedisUnavailable:
        return
    raise AssertionError("the lost reply must fail the write")


def _cli(redis_cluster, *args):
    return redis_cluster.servers[0].cli("-c", *args)


def test_on_redis_cluster_lost_replies_and_a_crash_between_steps_leave_an_exact_index(
        redis_cluster, aio):
    """Redis Cluster: the value's reply lost, an index level's reply lost (a timeout in
    the middle of the transition), a crash between value and index (finished by another
    node's write), a clear with its reply lost: after each re-send the wildcard lookups
    and the counts are exact."""
    import time as _time

    async def run():
        backend = Backend(redis_cluster.url)
        other = Backend(redis_cluster.url)
        flaky = LosesReplies(backend)
        a = RedisRetained(flaky, prefix="lr:")
        b = RedisRetained(other, prefix="lr:")
        # 1. the value's reply lost, the PUBLISH re-sent
        flaky.lose, flaky.only = 1, "ret_set_c"
        await _expect_lost(a.put(Message("lr/one/x", b"1", retain=True)))
        await wait(a.put(Message("lr/one/x", b"1", retain=True)))
        # 2. one index level's reply lost (it ran), re-sent
        flaky.lose, flaky.only = 1, "ret_idx_c"
        await _expect_lost(a.put(Message("lr/two/x", b"2", retain=True)))
        await wait(a.put(Message("lr/two/x", b"2", retain=True)))
        # 3. node A "dies" after the value (its index steps never sent): B's write of
        # the same topic finishes the pending creation
        flaky.lose, flaky.only = 1, "ret_set_c"
        real_transition = a._transition
        a._transition = lambda *args: None     # A gets no further than the value
        await _expect_lost(a.put(Message("lr/three/x", b"3", retain=True)))
        a._transition = real_transition
        await wait(b.put(Message("lr/three/x", b"3b", retain=True)))
        found = sorted((m.topic, m.payload) for m in await wait(b.match("lr/+/x")))
        assert found == [("lr/one/x", b"1"), ("lr/three/x", b"3b"), ("lr/two/x", b"2")]
        assert await wait(b.count()) == 3
        for topic in ("lr/one/x", "lr/two/x", "lr/three/x"):
            level = topic.split("/")[1]
            assert _cli(redis_cluster, "HGET", "lr:ret:c:1:lr", level).strip() == "2"
            assert _cli(redis_cluster, "HGET", f"lr:ret:c:2:lr/{level}", "x").strip() == "3"
        assert _cli(redis_cluster, "HGET", "lr:ret:c:0:", "lr").strip() == "6"
        # 4. clears with lost replies, re-sent
        for topic in ("lr/one/x", "lr/two/x", "lr/three/x"):
            flaky.lose, flaky.only = 1, "ret_del_c"
            await _expect_lost(a.put(Message(topic, b"", retain=True)))
            await wait(a.put(Message(topic, b"", retain=True)))
        assert await wait(b.match("lr/#")) == []
        assert await wait(b.count()) == 0
        # once the markers' time is up nothing is left
        await wait(a.drop_markers(_time.time() + 3600))
        await wait(b.drop_markers(_time.time() + 3600))
        for server in redis_cluster.servers:
            assert server.cli("KEYS", "lr:*").split() == [], server.port
        await wait(backend.close())
        await wait(other.close())
    aio(run)
