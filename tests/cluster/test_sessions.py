"""Cluster sessions in Redis: claim with epoch fencing, takeover, resume on another node.

In-process: two brokers ("nodes") with their own RedisSessionStore and
ClusterSessions against one real redis-server; control messages between them
are handed over directly.
"""
from __future__ import annotations

import asyncio

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mqttd.cluster.backend import Backend
from mqttd.cluster.reaper import Reaper
from mqttd.codec.packets import (
    Connack, Connect, Disconnect, Properties, Puback, Publish, Pubrel, Will)
from mqttd.messages import Message

from .conftest import wait
from .sessionnodes import Node, claimed_behind_its_back, connect, parked, settle, start_nodes


def test_resume_on_another_node_with_queue_inflight_and_qos2_state(redis_server, aio):
    """A persistent session resumes on node B with its subscriptions, DUP resends,
    queued messages and inbound QoS 2 ids, all from Redis."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        sub = a.client()
        ack = await connect(a, sub, "sub")
        assert isinstance(ack, Connack) and ack.reason_code == 0 and not ack.session_present
        sub.subscribe("t/#", qos=1)
        # inbound QoS 2 in progress: PUBREC sent, PUBREL not yet
        sub.send(Publish("x/y", b"q2", 2, False, packet_id=77))
        await settle(a)
        for i in range(3):
            a.broker.publish(Message("t/%d" % i, b"m%d" % i, 1))
        await settle(a)
        got = [p for p in sub.received() if isinstance(p, Publish)]
        assert [p.payload for p in got] == [b"m0", b"m1", b"m2"]
        sub.send(Puback(got[0].packet_id))        # m0 acknowledged
        sub.conn.connection_lost()                # m1, m2 in flight
        await settle(a)
        a.broker.publish(Message("t/9", b"queued", 1))
        await settle(a)
        # the client comes back on node B
        sub2 = b.client()
        ack = await connect(b, sub2, "sub")
        assert ack.reason_code == 0 and ack.session_present
        await settle(a, b)
        got2 = [p for p in sub2.received() if isinstance(p, Publish)]
        assert [(p.payload, p.dup) for p in got2] == [
            (b"m1", True), (b"m2", True), (b"queued", False)]
        assert [p.packet_id for p in got2[:2]] == [p.packet_id for p in got[1:]]
        assert "sub" not in a.broker.sessions
        assert b.broker.sessions["sub"].inbound_qos2 == {77}
        # the PUBREL of the QoS 2 flow started on A completes on B
        sub2.send(Pubrel(77))
        await settle(b)
        comps = [p for p in sub2.received() if type(p).__name__ == "Pubcomp"]
        assert [(p.packet_id, p.reason_code) for p in comps] == [(77, 0)]
        b.broker.publish(Message("t/live", b"live", 1))
        await settle(b)
        assert [p.payload for p in sub2.received() if isinstance(p, Publish)] == [b"live"]
    aio(run)


def test_takeover_closes_the_old_connection_with_0x8E(redis_server, aio):
    """A CONNECT on B of a client online on A closes A's connection with 0x8E and resumes."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        first = a.client()
        await connect(a, first, "c")
        first.subscribe("k/#", qos=1)
        await settle(a)
        second = b.client()
        ack = await connect(b, second, "c")
        assert ack.reason_code == 0 and ack.session_present
        packets = first.received()
        assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x8E
        assert first.disconnecting
        assert "k/#" in b.broker.sessions["c"].subscriptions
        assert b.sessions.takeovers == 1
    aio(run)


def test_simultaneous_connects_on_two_nodes_leave_exactly_one(redis_server, aio):
    """Two CONNECTs of one client id at once on A and B: one is online, the other refused or kicked."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        for trial in range(6):
            cid = "race-%d" % trial
            ca, cb = a.client(), b.client()
            ca.send(Connect(5, cid, False, 0, properties=Properties(session_expiry_interval=60)))
            cb.send(Connect(5, cid, False, 0, properties=Properties(session_expiry_interval=60)))
            await settle(a, b, rounds=60)
            online = [n for n, c in ((a, ca), (b, cb))
                      if not c.disconnecting and n.broker.sessions.get(cid) is not None
                      and n.broker.sessions[cid].connection is not None]
            assert len(online) == 1, (trial, ca.received(), cb.received())
    aio(run)


def test_stale_writes_of_the_old_owner_are_fenced_and_queued_messages_forwarded(redis_server, aio):
    """A zombie owner's writes fail with FENCED; a message it still routes reaches the new owner."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        await parked(a, "z", "z/#")
        alive["A"] = False          # A is cut off: no kick reaches it
        sub2 = b.client()
        await connect(b, sub2, "z")
        await settle(b)
        # the zombie still has the session and routes a message to it
        a.broker.publish(Message("z/1", b"late", 1))
        await settle(a, b)
        assert "z" not in a.broker.sessions       # fenced: it let go
        b.sessions.pull("z")
        await settle(b)
        got = [p.payload for p in sub2.received() if isinstance(p, Publish)]
        assert got == [b"late"]
    aio(run)


def test_reaper_publishes_wills_and_adopts_persistent_sessions(redis_server, aio):
    """A dead node's clean client's will is published once; its persistent session is adopted and resumable."""
    async def run():
        alive, a, b, c = start_nodes(redis_server.url, "A", "B", "C")
        wills = []
        b.broker.subscribe_local("will/#", wills.append)
        c.broker.subscribe_local("will/#", wills.append)
        clean = a.client()
        await connect(a, clean, "clean", clean=True, expiry=0,
                      will=Will("will/clean", b"gone", 0, False))
        keep = a.client()
        await connect(a, keep, "keep", expiry=600)
        keep.subscribe("k/#", qos=1)
        a.broker.publish(Message("k/1", b"owed", 1))
        await settle(a)
        alive["A"] = False
        rb, rc = Reaper(b.sessions), Reaper(c.sessions)
        results = await asyncio.gather(wait(rb.reap("A")), wait(rc.reap("A")))
        assert sorted(results) == [False, True]
        await settle(b, c)
        assert [m.topic for m in wills] == ["will/clean"]
        reaper = b if results[0] else c
        assert "keep" in reaper.broker.sessions
        other = c if reaper is b else b
        again = other.client()
        ack = await connect(other, again, "keep")
        assert ack.session_present
        await settle(b, c)
        assert [(p.payload, p.dup) for p in again.received()
                if isinstance(p, Publish)] == [(b"owed", True)]
    aio(run)


def test_writes_are_kept_while_redis_is_down_and_retried(redis_server, aio):
    """Redis unreachable: sync() fails (no false acknowledgement) and the writes are kept;
    once Redis is back (AOF) they reach it."""
    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        await parked(a, "keeper", "k/#")
        redis_server.stop()
        a.broker.publish(Message("k/1", b"while-down", 1))
        with pytest.raises(Exception):
            await wait(a.store.sync())
        assert a.store.failure is not None
        redis_server.start(keep_port=True)
        for _ in range(100):
            a.clock.advance(1.0)
            await asyncio.sleep(0.05)
            if a.store.failure is None and not a.store._pending:
                break
        await wait(a.store.sync())
        assert redis_server.cli("HLEN", "mqttd:{c:keeper}:o").strip() == "1"
    aio(run)


def test_a_refused_write_of_a_parked_session_moves_its_messages_to_the_owner(redis_server, aio):
    """The store's fencing in isolation: a write with a stale epoch changes nothing but
    forwards its queued messages, which the owner's load takes in."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        # B claims behind A's back (A is not told); A keeps its stale epoch
        await claimed_behind_its_back(a, b, "f", "f/#")
        a.broker.publish(Message("f/1", b"fwd", 1))
        await settle(a)
        assert "f" not in a.broker.sessions
        assert redis_server.cli("LLEN", "mqttd:{c:f}:f").strip() == "1"
        sub3 = b.client()
        ack = await connect(b, sub3, "f")
        assert ack.session_present
        await settle(b)
        assert [p.payload for p in sub3.received() if isinstance(p, Publish)] == [b"fwd"]
    aio(run)


def test_resume_on_another_node_through_redis_cluster(redis_cluster, aio):
    """The same on a 3-master Redis Cluster: every script touches one slot
    ({c:<client id>}), pipelines spread over the shards."""
    async def run():
        alive, a, b = start_nodes(redis_cluster.url, "A", "B")
        subs = [a.client() for _ in range(6)]
        for i, sub in enumerate(subs):
            await connect(a, sub, "rc-%d" % i)
            sub.subscribe("rc/#", qos=1)
        await settle(a)
        for sub in subs:
            sub.conn.connection_lost()
        await settle(a)
        a.broker.publish(Message("rc/x", b"queued", 1))
        await settle(a)
        for i in range(6):
            again = b.client()
            ack = await connect(b, again, "rc-%d" % i)
            assert ack.session_present
            await settle(b, rounds=5)
            assert [p.payload for p in again.received() if isinstance(p, Publish)] == [b"queued"]
    aio(run)


def test_reaper_leaves_the_sessions_of_a_node_ids_new_incarnation_alone(redis_server, aio):
    """A node id that came back (new boot id) keeps the sessions it claimed since; only
    those of its dead incarnation are adopted."""
    async def run():
        nodes, alive = {}, {"A": True, "B": True}
        a = Node(redis_server.url, "A", nodes, alive)
        a.sessions.boot = "boot-1"
        old = a.client()
        await connect(a, old, "from-old-boot")
        await settle(a)
        # A restarts: a new broker, a new boot id, a live heartbeat key
        a2 = Node(redis_server.url, "A", nodes, alive)
        a2.sessions.boot = "boot-2"
        redis_server.cli("SET", "mqttd:{n:A}:alive", "boot-2")
        new = a2.client()
        await connect(a2, new, "from-new-boot")
        await settle(a2)
        b = Node(redis_server.url, "B", nodes, alive)
        assert await wait(Reaper(b.sessions).reap("A"))
        await settle(a2, b)
        assert "from-old-boot" in b.broker.sessions
        assert "from-new-boot" not in b.broker.sessions
        assert redis_server.cli("HGET", "mqttd:{c:from-new-boot}:s", "node").strip() == "A"
        # its session list keeps what the new incarnation claimed (else its
        # sessions would never be reaped if it died in turn)
        assert redis_server.cli("SMEMBERS", "mqttd:{n:A}:sessions").split() == [
            "from-new-boot"]
    aio(run)


def test_a_node_that_comes_back_while_being_reaped_stays_a_member(redis_server, aio):
    """REVIEW-CLUSTER F5: the reaper judged the node dead seconds earlier; if it is alive
    when the reaper ends, it must stay in mqttd:nodes (else its death is never reaped)."""
    async def run():
        nodes, alive = {}, {"A": True, "B": True}
        a = Node(redis_server.url, "A", nodes, alive)
        a.sessions.boot = "boot-1"
        await connect(a, a.client(), "reaped-while-back")
        await settle(a)
        redis_server.cli("SADD", "mqttd:nodes", "A", "B")
        b = Node(redis_server.url, "B", nodes, alive)

        def comes_back(node, deliver, sync):
            # during the reap (the routes' settle time) A re-joins as boot-2
            # and claims a session
            redis_server.cli("SET", "mqttd:{n:A}:alive", "boot-2")
            redis_server.cli("SADD", "mqttd:{n:A}:sessions", "claimed-by-boot-2")
            return defer.succeed(0)
        assert await wait(Reaper(b.sessions, forget_node=comes_back).reap("A"))
        await settle(b)
        assert "reaped-while-back" in b.broker.sessions
        assert sorted(redis_server.cli("SMEMBERS", "mqttd:nodes").split()) == ["A", "B"]
        assert redis_server.cli("SMEMBERS", "mqttd:{n:A}:sessions").split() == [
            "claimed-by-boot-2"]
    aio(run)


def test_wait_replicas_without_replicas_acknowledges_nothing(redis_server, aio):
    """--cluster-wait-replicas 1 on a Redis without replicas: sync() fails, so no
    PUBACK promises what a failover could lose; the writes stay for a retry."""
    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        sub = a.client()
        await connect(a, sub, "replicated")
        await settle(a)
        a.store.wait_replicas, a.store.wait_timeout = 1, 50
        sub.subscribe("r/#", qos=1)
        with pytest.raises(Exception, match="replicas"):
            await wait(a.store.sync())
        assert a.store._retry or a.store._pending   # kept for a re-send
    aio(run)


def test_a_client_gone_during_its_claim_leaves_its_session_offline(redis_server, aio):
    """The connection closes while its claim runs: Redis ends up saying offline (a clean
    session's keys gone), so a reaper would not publish a will of a connection that never was."""
    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        for client_id, expiry in (("hasty-clean", 0), ("hasty-kept", 600)):
            client = a.client()
            client.send(Connect(5, client_id, False, 0,
                                properties=Properties(session_expiry_interval=expiry)))
            client.conn.connection_lost()          # before the claim's reply
            await settle(a)
        assert redis_server.cli("EXISTS", "mqttd:{c:hasty-clean}:s").strip() == "0"
        assert redis_server.cli("HGET", "mqttd:{c:hasty-kept}:s", "online").strip() == "0"
    aio(run)


def test_the_reaper_forgets_routes_and_inbox_only_of_a_node_id_still_dead(redis_server, aio):
    """REVIEW-CLUSTER F5: the check and the deletion are one script, so a node id alive
    again keeps the route set and the inbox its new incarnation uses."""
    from mqttd.cluster.keys import Keys
    from mqttd.cluster.reaper import InboxReplay

    async def run():
        keys = Keys()
        backend = Backend(redis_server.url, name="forget")
        inbox = InboxReplay(backend, keys, "B", Clock(), settle=0)
        for node in ("X", "Y"):
            redis_server.cli("SADD", keys.routes(node), "t/#")
            redis_server.cli("XADD", keys.inbox(node), "*", "e", "x")
            redis_server.cli("XGROUP", "CREATE", keys.inbox(node), "mqttd", "$")
        redis_server.cli("SET", keys.alive("Y"), "boot-2")   # Y is back, X is not
        for node in ("X", "Y"):
            d = inbox.forget(node, lambda message, only=None: 0, lambda: defer.succeed(None))
            for _ in range(300):
                if d.called:
                    break
                await asyncio.sleep(0.01)
                inbox.clock.advance(0.1)
            await wait(d)
        assert redis_server.cli("EXISTS", keys.routes("X")).strip() == "0"
        assert redis_server.cli("EXISTS", keys.inbox("X")).strip() == "0"
        assert redis_server.cli("SMEMBERS", keys.routes("Y")).split() == ["t/#"]
        assert redis_server.cli("XLEN", keys.inbox("Y")).strip() == "1"
        await wait(backend.close())
    aio(run)


def test_reaping_two_nodes_at_once_releases_both_locks_for_good(redis_server, aio):
    """After a Redis stall a node reaps several peers at once: each reaper lock must end
    with its reap (a lock renewed forever kept its node from ever re-joining)."""
    async def run():
        alive, b = start_nodes(redis_server.url, "B")
        reaper = Reaper(b.sessions, lock_ms=600)
        results = await asyncio.gather(wait(reaper.reap("X")), wait(reaper.reap("Y")))
        assert results == [True, True]
        for _ in range(10):                  # several renew periods (lock_ms / 3)
            b.clock.advance(0.2)
            await asyncio.sleep(0.01)
        for node in ("X", "Y"):
            assert redis_server.cli("EXISTS", f"mqttd:{{n:{node}}}:reaper").strip() == "0"
    aio(run)


def test_a_fenced_node_reaps_no_one(redis_server, aio):
    """A node cut off from Redis may be the one that is dead to the others: it must not
    take their sessions (nor hold a reaper lock that keeps them from re-joining)."""
    async def run():
        alive, b = start_nodes(redis_server.url, "B")
        b.sessions.is_fenced = lambda: True
        assert not await wait(Reaper(b.sessions).reap("X"))
        assert redis_server.cli("EXISTS", "mqttd:{n:X}:reaper").strip() == "0"
    aio(run)


def test_a_connect_waiting_on_redis_is_refused_when_the_node_fences(redis_server, aio):
    """REVIEW-CLUSTER F6: a CONNECT whose claim hangs on Redis gets CONNACK 0x88 when the
    node fences itself, not silence; a later answer changes nothing for that client."""
    from .test_backend import _HangingClient

    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        a.backend._client = _HangingClient()
        a.backend.socket_timeout = 60.0
        client = a.client()
        client.send(Connect(5, "waits-on-redis", True, 0))
        for _ in range(5):
            await asyncio.sleep(0.01)
            a.clock.advance(0)
        assert client.received() == []                # the claim is out, unanswered
        assert a.sessions.refuse_claims("no heartbeat acknowledged") == 1
        a.clock.advance(0)
        packets = client.received()
        assert isinstance(packets[0], Connack) and packets[0].reason_code == 0x88
    aio(run)


def test_a_stuck_reap_is_abandoned_its_lock_released_and_the_next_reap_finishes_it(
        redis_server, aio):
    """REVIEW-CLUSTER F15: a reap whose step never answers must not renew its lock
    forever; after ``stall`` seconds without progress it is abandoned, the lock is
    released, and the next reap (idempotent) hands the dead node's inbox to the session
    the abandoned one had already adopted."""
    async def run():
        nodes, alive = {}, {"A": True, "B": True}
        a = Node(redis_server.url, "A", nodes, alive)
        await connect(a, a.client(), "stuck-reap-sub")
        await settle(a)
        alive["A"] = False
        b = Node(redis_server.url, "B", nodes, alive)
        hung = defer.Deferred()
        reaper = Reaper(b.sessions, replay_inbox=lambda node, deliver, sync: hung,
                        lock_ms=600, stall=1.0)
        reaped = reaper.reap("A")
        for _ in range(100):                 # 10 s of renew periods, bounded
            if reaped.called:
                break
            await asyncio.sleep(0.01)
            b.clock.advance(0.1)
        assert reaped.called and not await wait(reaped)
        assert hung.called                   # cancelled: the stuck step was let go
        assert reaper.abandoned == 1
        await settle(b)
        assert redis_server.cli("EXISTS", "mqttd:{n:A}:reaper").strip() == "0"
        # the retry: the session is already B's, the inbox entries still reach it
        seen = []
        retry = Reaper(b.sessions, replay_inbox=lambda node, deliver, sync: defer.succeed(0))
        original = retry.deliver_to
        retry.deliver_to = lambda adopted, moved=None, node=None: (
            seen.append(set(adopted)), original(adopted, moved, node))[1]
        assert await wait(retry.reap("A"))
        assert seen and seen[0] == {"stuck-reap-sub"}
    aio(run)


def test_a_connect_while_redis_is_down_is_refused_0x88_without_a_traceback(redis_server, aio):
    """REVIEW-CLUSTER F16: a reconnect storm during a Redis outage must cost one
    rate-limited WARN line, not one CRITICAL traceback per CONNECT: the claim that
    cannot reach Redis is refused with CONNACK 0x88 Server unavailable."""
    from twisted.logger import globalLogPublisher, LogLevel

    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        await settle(a)
        redis_server.stop()
        seen = []

        def observer(event):
            if event.get("log_level") in (LogLevel.critical, LogLevel.error) or \
                    event.get("log_failure") is not None:
                seen.append(event.get("log_format"))
        globalLogPublisher.addObserver(observer)
        try:
            codes = []
            for i in range(3):
                client = a.client()
                ack = await connect(a, client, "outage-%d" % i)
                codes.append(ack.reason_code)
        finally:
            globalLogPublisher.removeObserver(observer)
        assert codes == [0x88, 0x88, 0x88]
        assert seen == []
    aio(run)
