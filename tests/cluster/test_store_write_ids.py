"""A session batch re-sent after an unknown outcome is not applied twice.

The store keeps a batch whose pipeline failed and sends it again (REVIEW-CLUSTER
F13's kind): after a timeout, or under Redis Cluster when one master failed and
another applied its share, Redis may have run it already.  Most operations are
idempotent (set a seq, delete a seq), but a forward (``G``, and a queued
message refused by the fence) appends to the session's ``f`` list: re-sent, the
message was forwarded -- and delivered -- twice.  Each batch now carries a write
id that Redis remembers per writing node.

In-process RedisSessionStore against a real redis-server; the first pipeline's
reply is "lost": it ran in Redis, the store is told it failed.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from mqttd.cluster.backend import Backend, RedisUnavailable
from mqttd.cluster.store import Forward, RedisSessionStore
from mqttd.messages import Message
from mqttd.persistence import records as R

from .conftest import wait


class LosesTheFirstReply:
    """A backend whose next pipeline runs in Redis but fails as a timeout would."""

    def __init__(self, backend):
        self.backend = backend
        self.lose = 1

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def pipeline(self, commands, **kwargs):
        d = self.backend.pipeline(commands, **kwargs)

        def lost(replies):
            if self.lose:       # the first pipeline that ran (a NOSCRIPT one did not)
                self.lose -= 1
                raise RedisUnavailable("no answer from Redis within 5 s")
            return replies
        return d.addCallback(lost)


def test_a_batch_resent_after_a_lost_reply_forwards_each_message_once(redis_server, aio):
    """Forwards (to a session another node owns, and queued messages the fence refused)
    reach the f list once although their batch went out twice; the queue is exact."""
    async def run():
        backend = Backend(redis_server.url)
        redis_server.cli("HSET", "mqttd:{c:fw}:s", "node", "B", "epoch", "7", "online", "0",
                         "persistent", "1")
        redis_server.cli("HSET", "mqttd:{c:mine}:s", "node", "A", "epoch", "3", "online", "0",
                         "persistent", "1")
        flaky = LosesTheFirstReply(backend)
        store = RedisSessionStore(flaky, "A", clock=Clock())
        store.epochs["fenced"] = 2           # A believes it owns it; B took it
        redis_server.cli("HSET", "mqttd:{c:fenced}:s", "node", "B", "epoch", "5",
                         "online", "0", "persistent", "1")
        store.epochs["mine"] = 3
        out = R.OutboundRecord(1, Message("t/a", b"queued", 1), 1)
        store.write(Forward("fw", R.OutboundRecord(0, Message("t/f", b"fwd", 1), 1)))
        store.write(R.PutOutbound("fenced", out))
        store.write(R.PutOutbound("mine", out))
        store.write(R.DeleteOutbound("mine", 1))
        store.write(R.PutOutbound("mine", R.OutboundRecord(2, Message("t/b", b"two", 1), 1)))
        try:
            await wait(store.sync())
            raise AssertionError("the lost reply must fail the first sync")
        except RedisUnavailable:
            pass
        await wait(store.sync())                  # re-sent: the same batches
        assert int(redis_server.cli("LLEN", "mqttd:{c:fw}:f")) == 1
        assert int(redis_server.cli("LLEN", "mqttd:{c:fenced}:f")) == 1
        assert redis_server.cli("HKEYS", "mqttd:{c:mine}:o").split() == ["2"]
        # later batches of the same node apply as usual
        store.write(Forward("fw", R.OutboundRecord(0, Message("t/f", b"fwd2", 1), 1)))
        await wait(store.sync())
        assert int(redis_server.cli("LLEN", "mqttd:{c:fw}:f")) == 2
        await wait(backend.close())
    aio(run)
