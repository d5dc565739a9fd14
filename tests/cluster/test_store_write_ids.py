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


def test_batches_resent_twice_after_two_lost_replies_apply_once(redis_server, aio):
    """Two flushes in a row lose their reply: the second re-sends the first batch (found
    applied) and a newer one (applied, reply lost); the third re-sends both -- each
    forward still lands once (the last applied write id covers the ones before it)."""
    async def run():
        backend = Backend(redis_server.url)
        redis_server.cli("HSET", "mqttd:{c:fw2}:s", "node", "B", "epoch", "7", "online", "0",
                         "persistent", "1")
        flaky = LosesTheFirstReply(backend)
        flaky.lose = 2
        store = RedisSessionStore(flaky, "A", clock=Clock())
        for payload in (b"one", b"two"):
            store.write(Forward("fw2", R.OutboundRecord(0, Message("t/f", payload, 1), 1)))
            try:
                await wait(store.sync())
                raise AssertionError("the lost reply must fail the sync")
            except RedisUnavailable:
                pass
        await wait(store.sync())
        assert int(redis_server.cli("LLEN", "mqttd:{c:fw2}:f")) == 2
        await wait(backend.close())
    aio(run)


def test_messages_a_pull_moved_before_its_reply_was_lost_are_still_delivered(
        redis_server, aio):
    """The owner takes forwarded messages with a pull (f list -> queue, under seqs it
    reserved); when the reply is lost, Redis may have moved them: the next pull finds
    them in the queue and delivers them (they sat there until the next takeover)."""
    from mqttd.codec.packets import Publish
    from .test_sessions import Node, connect, settle

    async def run():
        nodes, alive = {}, {"A": True}
        a = Node(redis_server.url, "A", nodes, alive)
        sub = a.client()
        await connect(a, sub, "puller")
        sub.subscribe("pl/#", qos=1)
        await settle(a)
        # another node forwarded two messages to the session (its f list)
        other = RedisSessionStore(Backend(redis_server.url), "B", clock=Clock())
        for payload in (b"f1", b"f2"):
            other.write(Forward("puller", R.OutboundRecord(0, Message("pl/x", payload, 1), 1)))
        await wait(other.sync())
        flaky = LosesTheFirstReply(a.backend)
        real_run = a.backend.run

        def run_losing(name, keys=(), args=()):
            d = real_run(name, keys, args)
            if name == "session_pull" and flaky.lose:
                flaky.lose -= 1

                def lost(_reply):
                    raise RedisUnavailable("no answer from Redis within 5 s")
                d.addCallback(lost)
            return d
        a.sessions.backend.run = run_losing
        a.sessions.pull("puller")
        await settle(a)
        assert int(redis_server.cli("LLEN", "mqttd:{c:puller}:f")) == 0   # moved by Redis
        a.clock.advance(1.0)                       # the retry after the lost reply
        got = []
        for _ in range(10):
            await settle(a)
            got += [p.payload for p in sub.received() if isinstance(p, Publish)]
            if len(got) >= 2:
                break
        assert sorted(got) == [b"f1", b"f2"]
        await wait(other.backend.close())
    aio(run)
