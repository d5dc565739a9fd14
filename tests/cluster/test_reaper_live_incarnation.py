"""A reaper of a node id that is alive again (a new incarnation) must not take
what belongs to the live incarnation.

After a Redis restart (or any stall longer than the TTL) every alive key has
expired: the nodes re-join as new incarnations and reap each other's previous
incarnations (REVIEW-CLUSTER F7).  A node that re-joined *before* a reaper
took the lock keeps its node id, its inbox and the sessions its clients
resumed on it since.  The reaper used to replay that inbox anyway --
``XAUTOCLAIM`` of the entries the live node had read and ``XREADGROUP >`` of
those it had not read yet -- into the sessions *it* adopted, and acknowledged
them: every message for a session of the live node in that inbox was lost
(50 acknowledged QoS 1 messages, one in-flight window, in the review's run).

In-process brokers and ClusterSessions on one real redis-server, as in
tests/cluster/test_reaper_inbox.py.
"""
from __future__ import annotations

import pytest

from mqttd.cluster.bus import GROUP, encode_envelope
from mqttd.cluster.keys import Keys
from mqttd.cluster.reaper import InboxReplay, Reaper
from mqttd.codec.packets import Publish
from mqttd.messages import Message

from .conftest import wait
from .test_sessions import Node, connect, settle

pytestmark = pytest.mark.slow

COUNT = 20


def _entries(reply):
    return [entry for _stream, items in (reply or []) for entry in items]


def test_reaper_leaves_the_inbox_of_a_live_incarnation_to_it(redis_server, aio):
    """Entries routed to a node id that re-joined as a new incarnation stay that node's:
    the ones it read (pending to it) and the ones not read yet are still its own after
    another node reaped its previous incarnation."""
    async def run():
        nodes, alive = {}, {"A": True, "B": True}
        a = Node(redis_server.url, "A", nodes, alive)
        b = Node(redis_server.url, "B", nodes, alive)
        a.sessions.boot = "boot-a2"
        keys = Keys()
        # the live incarnation of A: its alive key holds its boot id
        redis_server.cli("SET", keys.alive("A"), "boot-a2", "PX", "60000")
        sub = a.client()
        ack = await connect(a, sub, "live-sub")       # resumed on the new incarnation
        assert ack.reason_code == 0
        sub.subscribe("live/#", qos=1)
        await settle(a)
        inbox = keys.inbox("A")
        redis_server.cli("XGROUP", "CREATE", inbox, GROUP, "$", "MKSTREAM")
        for i in range(COUNT):
            await wait(b.backend.execute("XADD", inbox, "*", "e", encode_envelope(
                Message("live/%d" % i, b"%d" % i, 1))))
        # A's reader took the first half (pending to A, not acknowledged yet)
        read = await wait(a.backend.execute("XREADGROUP", "GROUP", GROUP, "A", "COUNT",
                                            COUNT // 2, "STREAMS", inbox, ">"))
        assert len(_entries(read)) == COUNT // 2
        # B reaps A's previous incarnation (A re-joined before B took the lock)
        replay = InboxReplay(b.backend, keys, "B", b.clock, settle=0.0)
        reaper = Reaper(b.sessions, replay_inbox=replay.replay, forget_node=replay.forget)
        assert await wait(reaper.reap("A"))
        await settle(a, b)
        # nothing of A's inbox was taken: its pending entries are still A's ...
        pending = redis_server.cli("XPENDING", inbox, GROUP, "-", "+", "100").split()
        assert pending[1::4] == ["A"] * (COUNT // 2), pending
        # ... and the unread ones are still there for A to read
        unread = await wait(a.backend.execute("XREADGROUP", "GROUP", GROUP, "A", "COUNT",
                                              100, "STREAMS", inbox, ">"))
        assert len(_entries(unread)) == COUNT - COUNT // 2
        # the live session stays A's, and A stays a member with its routes and inbox
        assert await wait(a.backend.execute("HGET", "mqttd:{c:live-sub}:s", "node")) == b"A"
        assert await wait(a.backend.execute("EXISTS", inbox)) == 1
        assert not [p for p in sub.received() if isinstance(p, Publish)
                    and p.topic.startswith("live/")]   # nothing was delivered twice here
    aio(run)


def test_a_node_that_learns_another_owns_its_session_forwards_what_still_reaches_it(
        redis_server, aio):
    """A node whose write to a session is refused (a reaper adopted it while the node was
    away) lets the session go -- and forwards what its inbox and publishers still route to
    it for that session during the grace period, as after a kick: before, everything after
    the first refused write matched no session there and was dropped."""
    async def run():
        nodes, alive = {}, {"A": True, "B": True}
        a = Node(redis_server.url, "A", nodes, alive)
        b = Node(redis_server.url, "B", nodes, alive)
        sub = a.client()
        await connect(a, sub, "stale-sub")
        sub.subscribe("stale/#", qos=1)
        sub.conn.connection_lost()                  # parked on A
        await settle(a)
        # A was away from Redis longer than its TTL; B reaps A's previous incarnation
        alive["A"] = False
        reaper = Reaper(b.sessions)
        assert await wait(reaper.reap("A"))
        assert reaper.adopted == 1
        alive["A"] = True                           # A is back (a new incarnation)
        await settle(a, b)
        # A still has the session installed: the first write is refused (fenced)
        a.broker.publish(Message("stale/1", b"1", 1))
        await settle(a, b)
        assert "stale-sub" not in a.broker.sessions
        # what still reaches A for it afterwards is forwarded, not dropped
        a.broker.publish(Message("stale/2", b"2", 1))
        a.broker.publish(Message("stale/3", b"3", 1))
        await settle(a, b)
        again = b.client()
        ack = await connect(b, again, "stale-sub")
        assert ack.reason_code == 0 and ack.session_present
        got = []
        for _ in range(20):
            await settle(a, b)
            got += [p.payload for p in again.received() if isinstance(p, Publish)]
            if len(got) >= 3:
                break
        assert sorted(got) == [b"1", b"2", b"3"]
    aio(run)
