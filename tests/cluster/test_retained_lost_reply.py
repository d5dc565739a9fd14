"""A retained write whose reply is lost leaves value and index consistent.

REVIEW-CLUSTER F13's kind: a Redis call whose outcome is unknown (a timeout:
Redis may have run it) must not leave a half-done write behind.  The value
(``SET ... GET``) and its index (``HINCRBY`` per level) were two steps: when
the first ran and its reply was lost, the PUBLISH was not acknowledged, the
client re-sent it, the second ``SET`` found the value ("replaced") and wrote no
index -- the topic stayed invisible to wildcard subscribers for good.  On one
Redis server (standalone, Sentinel) value and index are now one script: all or
nothing, so the re-send finds a consistent state either way.
"""
from __future__ import annotations

from mqttd.cluster.backend import Backend, RedisUnavailable
from mqttd.cluster.retained import RedisRetained
from mqttd.messages import Message

from .conftest import wait


class LosesReplies:
    """Runs every call in Redis; the replies of the next ``lose`` scripts are lost."""

    def __init__(self, backend):
        self.backend = backend
        self.lose = 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, name, keys=(), args=()):
        d = self.backend.run(name, keys, args)

        def lost(reply):
            if self.lose:
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
