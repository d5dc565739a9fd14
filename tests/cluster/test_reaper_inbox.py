"""The reaper's inbox replay follows each session to wherever it is now.

In-process (as tests/cluster/test_sessions.py): brokers with their own
RedisSessionStore and ClusterSessions against one real redis-server.  Node A
holds a persistent subscriber and dies with acknowledged messages unread in
its inbox; the subscriber resumes on another node *before* the reaper runs
(a client behind a load balancer reconnects at once), so the reaper adopts
nothing -- the messages must still reach the session (REVIEW-CLUSTER F3).
"""
from __future__ import annotations

import pytest

from mqttd.cluster.bus import GROUP, encode_envelope
from mqttd.cluster.keys import Keys
from mqttd.cluster.reaper import InboxReplay, Reaper
from mqttd.codec.packets import Publish
from mqttd.messages import Message

from .conftest import wait
from .sessionnodes import Node, connect, settle

COUNT = 30


@pytest.mark.parametrize("resumed_on", ["another node", "the reaping node"])
def test_inbox_of_a_dead_node_reaches_a_session_resumed_before_the_reaper(
        redis_server, aio, resumed_on):
    """Every message in a dead node's inbox reaches its subscriber's session although the
    subscriber resumed elsewhere before the reaper ran (it adopts 0 sessions); the inbox
    entries are acknowledged only after that."""
    async def run():
        nodes, alive = {}, {"A": True, "B": True, "C": True}
        a = Node(redis_server.url, "A", nodes, alive)
        b = Node(redis_server.url, "B", nodes, alive)
        c = Node(redis_server.url, "C", nodes, alive)
        sub = a.client()
        await connect(a, sub, "moving")
        sub.subscribe("k/#", qos=1)
        await settle(a)
        keys = Keys()
        inbox = keys.inbox("A")
        redis_server.cli("XGROUP", "CREATE", inbox, GROUP, "$", "MKSTREAM")
        # routed to A, acknowledged to their publisher, never read: A is killed
        for i in range(COUNT):
            await wait(b.backend.execute("XADD", inbox, "*", "e", encode_envelope(
                Message("k/%d" % i, b"%d" % i, 1))))
        await wait(b.backend.execute("XADD", inbox, "*", "e", encode_envelope(
            Message("other/x", b"not-for-it", 1))))
        alive["A"] = False
        target = c if resumed_on == "another node" else b
        again = target.client()
        ack = await connect(target, again, "moving")
        assert ack.reason_code == 0 and ack.session_present
        await settle(b, c)
        replay = InboxReplay(b.backend, keys, "B", b.clock)
        reaper = Reaper(b.sessions, replay_inbox=replay.replay)
        assert await wait(reaper.reap("A"))
        assert reaper.adopted == 0
        got = []
        for _ in range(20):
            await settle(b, c)
            got += [p for p in again.received() if isinstance(p, Publish)]
            if len(got) >= COUNT:
                break
        assert sorted(int(p.payload) for p in got) == list(range(COUNT))
        assert all(p.qos == 1 for p in got)
        # every entry was handed on and acknowledged; none is pending any more
        pending = redis_server.cli("XPENDING", inbox, GROUP)
        assert pending.split()[0] == "0"
    aio(run)


def test_reaper_keeps_a_route_for_a_session_whose_claim_on_another_node_is_in_progress(
        redis_server, aio):
    """A session of the dead node that another node is still claiming (waiting for the
    dead owner's answer to its kick) has no route anywhere once the reaper resets the dead
    node's routes: the reaper forwards what reaches it for the session's filters to the new
    owner, so messages acknowledged in that window are not lost (REVIEW-S9-CLUSTER C4/C5:
    249 of 1,000 lost after a link hang, 69 after a kill -9)."""
    from mqttd.codec.packets import Connack, Connect, Properties
    from twisted.internet import defer

    async def run():
        nodes, alive = {}, {"A": True, "B": True, "C": True}
        a = Node(redis_server.url, "A", nodes, alive)
        b = Node(redis_server.url, "B", nodes, alive)
        c = Node(redis_server.url, "C", nodes, alive)
        sub = a.client()
        await connect(a, sub, "moving")
        sub.subscribe("k/#", qos=1)
        await settle(a)
        # A hangs: it answers no kick, but C still sees its alive key (the link of A
        # to Redis hangs, or A was just killed), so C's claim waits for A's answer
        alive["A"] = False
        c.is_alive = lambda node: defer.succeed(node != "B")
        c.sessions.is_alive = c.is_alive
        again = c.client()
        again.send(Connect(5, "moving", False, 0,
                           properties=Properties(session_expiry_interval=600)))
        for _ in range(100):
            await settle(c, rounds=2)
            owner = redis_server.cli("HGET", "mqttd:{c:moving}:s", "node").strip()
            if owner == "C":
                break
        assert owner == "C" and not again.received()
        # B reaps A meanwhile: the session moved on, nothing to adopt
        reaper = Reaper(b.sessions)
        assert await wait(reaper.reap("A"))
        assert reaper.adopted == 0
        # published on B while no node has the session installed (A's routes are gone)
        pub = b.client()
        await connect(b, pub, "publisher", clean=True, expiry=0)
        for i in range(COUNT):
            pub.publish("k/%d" % i, b"%d" % i, qos=1, packet_id=i + 1)
        await settle(b)
        # C's claim times out waiting for A and installs the session
        c.clock.advance(2.0)
        got, acks = [], []
        for _ in range(30):
            await settle(b, c)
            c.clock.advance(1.0)
            packets = again.received()
            acks += [p for p in packets if isinstance(p, Connack)]
            got += [p for p in packets if isinstance(p, Publish)]
            if len(got) >= COUNT:
                break
        assert [(p.reason_code, p.session_present) for p in acks] == [(0, True)]
        assert sorted(int(p.payload) for p in got) == list(range(COUNT))
    aio(run)


def test_a_dead_inbox_is_deleted_only_after_any_trusted_route_cache_saw_the_reset():
    """The reaper resets the dead node's routes, waits, reads its inbox a last time
    and deletes it: the wait must outlast the age up to which a route cache is
    trusted (``stale_after``; an older one holds what it would forward), or a
    publisher with a cache fresh enough to be trusted but older than the reset
    XADDs into the deleted inbox -- a stream nobody reads, the message lost."""
    from twisted.internet.task import Clock
    from mqttd.cluster.routes import RouteTable
    from mqttd.cluster.sessionservice import settle_after_reset
    from .fakeredis import FakeBackend

    clock = Clock()
    routes = RouteTable(FakeBackend(clock), clock, "B")
    assert settle_after_reset(routes.stale_after) > routes.stale_after
    assert settle_after_reset(None) == 2.0
