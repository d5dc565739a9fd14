"""Cluster sessions, the exact parts: the takeover hand-off, expiry on Redis's
clock, queue limits for forwarded messages, wills of a fenced node.

In-process, as ``test_sessions.py``: brokers with their own RedisSessionStore
and ClusterSessions against one real redis-server; control messages handed
over directly; each broker's clock advanced by hand, so the order of writes
between the "nodes" is the test's to choose.
"""
from __future__ import annotations

import asyncio

from mqttd.broker import BrokerConfig
from mqttd.cluster.reaper import Reaper
from mqttd.cluster.sessions import FENCED_REASON
from mqttd.codec.packets import (
    Connack, Connect, Properties, Pubcomp, Publish, Pubrec, Pubrel, Will)
from mqttd.messages import Message

from .conftest import wait
from .sessionnodes import claimed_behind_its_back, connect, parked, settle, start_nodes


def _redis_now_ms(redis_server) -> int:
    sec, usec = redis_server.cli("TIME").split()
    return int(sec) * 1000 + int(usec) // 1000


async def _parked_with_a_delayed_will(node, client_id, topic_filter, expiry, delay):
    """A session of ``client_id`` on ``node`` with Session Expiry ``expiry`` s and a
    will ``will/<client_id>`` = ``bye`` delayed ``delay`` s, subscribed to
    ``topic_filter``; its connection lost without DISCONNECT (the will waits for
    its delay), the store flushed."""
    old = node.client()
    await connect(node, old, client_id, expiry=expiry,
                  will=Will(f"will/{client_id}", b"bye", 0, False,
                            properties=Properties(will_delay_interval=delay)))
    old.subscribe(topic_filter, qos=1)
    await settle(node)
    old.conn.connection_lost()
    await settle(node)


def test_a_qos2_publish_whose_write_races_the_takeover_is_not_delivered_twice(redis_server, aio):
    """The old owner took a QoS 2 PUBLISH (delivered, PUBREC pending) and its write of the
    packet id reaches Redis only after another node claimed the session: the new owner still
    sees the id, so the client's DUP resend is acknowledged, not delivered again
    [MQTT-4.3.3-10]."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        delivered = []
        a.broker.subscribe_local("q2/#", delivered.append)
        b.broker.subscribe_local("q2/#", delivered.append)
        pub = a.client()
        ack = await connect(a, pub, "q2pub")
        assert ack.reason_code == 0
        await settle(a, b)
        # A takes the PUBLISH: delivered at once, the packet id's write still in A's store
        pub.send(Publish("q2/x", b"once", 2, False, packet_id=7))
        assert [m.payload for m in delivered] == [b"once"]
        assert a.store._pending.get("q2pub"), "the write must still be pending"
        # the client reconnects on B before A flushed: B's claim comes first in Redis,
        # then A's write (it syncs when the kick reaches it)
        pub2 = b.client()
        ack = await connect(b, pub2, "q2pub", only=(b,))
        assert isinstance(ack, Connack) and ack.reason_code == 0 and ack.session_present
        assert b.broker.sessions["q2pub"].inbound_qos2 == {7}
        # the DUP resend: acknowledged, not delivered again
        pub2.send(Publish("q2/x", b"once", 2, False, packet_id=7, dup=True))
        await settle(a, b)
        assert [m.payload for m in delivered] == [b"once"]
        assert [(type(p), p.packet_id) for p in pub2.received()] == [(Pubrec, 7)]
        pub2.send(Pubrel(7))
        await settle(b)
        assert [(type(p), p.packet_id, p.reason_code) for p in pub2.received()] == [
            (Pubcomp, 7, 0)]
        assert redis_server.cli("SCARD", "mqttd:{c:q2pub}:i").strip() == "0"
    aio(run)


def test_the_old_owners_writes_after_the_new_owner_loaded_are_fenced(redis_server, aio):
    """The hand-off window closes when the new owner loads: a zombie's later write of an
    inbound QoS 2 id changes nothing, and the zombie lets go of the session (its client
    gets no PUBREC for a write Redis refused)."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        pub = a.client()
        await connect(a, pub, "zq2")
        await settle(a, b)
        alive["A"] = False                 # no kick reaches A: it is a zombie
        pub2 = b.client()
        ack = await connect(b, pub2, "zq2", only=(b,))
        assert ack.session_present
        assert redis_server.cli("HEXISTS", "mqttd:{c:zq2}:s", "hnode").strip() == "0"
        pub.send(Publish("zq2/x", b"late", 2, False, packet_id=9))
        await settle(a)
        assert redis_server.cli("SCARD", "mqttd:{c:zq2}:i").strip() == "0"
        assert "zq2" not in a.broker.sessions
        assert not [p for p in pub.received() if isinstance(p, Pubrec)]
    aio(run)


def test_an_expired_session_of_a_dead_unreaped_owner_is_not_resumed(redis_server, aio):
    """Session Expiry Interval elapsed (on Redis's clock) while its owner is dead and not
    reaped: a CONNECT elsewhere gets Session Present 0, no stale subscriptions or messages,
    and the pending delayed will is published (the session ended)."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        wills = []
        b.broker.subscribe_local("will/#", wills.append)
        await _parked_with_a_delayed_will(a, "stale", "st/#", expiry=600, delay=300)
        a.broker.publish(Message("st/1", b"stale", 1))
        await settle(a)
        key = "mqttd:{c:stale}:s"
        left = int(redis_server.cli("HGET", key, "exp_at")) - _redis_now_ms(redis_server)
        assert 590_000 < left <= 600_000, left
        alive["A"] = False             # A dies; no reaper runs
        # ten minutes pass on Redis's clock
        redis_server.cli("HINCRBY", key, "exp_at", "-600001")
        again = b.client()
        ack = await connect(b, again, "stale")
        assert ack.reason_code == 0 and not ack.session_present
        await settle(b)
        assert b.broker.sessions["stale"].subscriptions == {}
        assert not [p for p in again.received() if isinstance(p, Publish)]
        assert [(m.topic, m.payload) for m in wills] == [("will/stale", b"bye")]
        assert redis_server.cli("HLEN", "mqttd:{c:stale}:o").strip() == "0"
    aio(run)


def test_the_reaper_ends_a_session_that_expired_instead_of_adopting_it(redis_server, aio):
    """A dead node's parked session past its deadline on Redis's clock is ended by the
    reaper (its delayed will published once), not adopted and kept alive."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        wills = []
        b.broker.subscribe_local("will/#", wills.append)
        await _parked_with_a_delayed_will(a, "gone", "g/#", expiry=60, delay=30)
        alive["A"] = False
        redis_server.cli("HINCRBY", "mqttd:{c:gone}:s", "exp_at", "-60001")
        assert await wait(Reaper(b.sessions).reap("A"))
        await settle(b)
        assert "gone" not in b.broker.sessions
        assert redis_server.cli("EXISTS", "mqttd:{c:gone}:s").strip() == "0"
        assert [m.topic for m in wills] == ["will/gone"]
    aio(run)


def test_an_online_session_does_not_expire_and_a_resumed_one_has_no_deadline(redis_server, aio):
    """The deadline exists only while the session is offline: a CONNECT clears it."""
    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        c = a.client()
        await connect(a, c, "dl", expiry=5)
        await settle(a)
        assert redis_server.cli("HEXISTS", "mqttd:{c:dl}:s", "exp_at").strip() == "0"
        assert redis_server.cli("HGET", "mqttd:{c:dl}:s", "exp").strip() == "5000"
        c.conn.connection_lost()
        await settle(a)
        assert redis_server.cli("HEXISTS", "mqttd:{c:dl}:s", "exp_at").strip() == "1"
        again = a.client()
        ack = await connect(a, again, "dl", expiry=5)
        assert ack.session_present
        assert redis_server.cli("HEXISTS", "mqttd:{c:dl}:s", "exp_at").strip() == "0"
    aio(run)


def test_forwarded_messages_respect_max_queued_messages_on_the_new_owner(redis_server, aio):
    """Messages a node that lost the session forwarded to it join the new owner's queue
    under --max-queued-messages (drop-oldest), counted and deleted from Redis like any
    overflow; the queue in Redis never holds more than the limit."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B",
                                  config=BrokerConfig(max_queued_messages=3))
        # B claims behind A's back; A still believes it owns the session
        await claimed_behind_its_back(a, b, "lim", "lim/#")
        for i in range(8):
            a.broker.publish(Message("lim/%d" % i, b"m%d" % i, 1))
        await settle(a)
        assert redis_server.cli("LLEN", "mqttd:{c:lim}:f").strip() == "8"
        await wait(b.sessions.pull("lim"))
        await settle(b)
        session = b.broker.sessions["lim"]
        assert [r.message.payload for r in session.queue] == [b"m5", b"m6", b"m7"]
        assert session.dropped == {"queue-full": 5}
        assert b.broker.stats.dropped.get("queue-full") == 5
        assert redis_server.cli("HLEN", "mqttd:{c:lim}:o").strip() == "3"
        assert redis_server.cli("LLEN", "mqttd:{c:lim}:f").strip() == "0"
        sub3 = b.client()
        ack = await connect(b, sub3, "lim")
        assert ack.session_present
        await settle(b)
        assert [p.payload for p in sub3.received() if isinstance(p, Publish)] == [
            b"m5", b"m6", b"m7"]
    aio(run)


def test_forwarded_messages_over_the_limit_are_dropped_when_the_session_loads(redis_server, aio):
    """The same at a takeover: what was forwarded before the new owner loaded the session
    is queued under the limit before its CONNACK."""
    async def run():
        alive, a, b, c = start_nodes(redis_server.url, "A", "B", "C",
                                     config=BrokerConfig(max_queued_messages=2))
        await claimed_behind_its_back(a, b, "lim2", "l2/#", settle_claim=False)
        alive["B"] = False             # not poked: the messages wait in Redis
        for i in range(5):
            a.broker.publish(Message("l2/%d" % i, b"m%d" % i, 1))
        await settle(a)
        assert redis_server.cli("LLEN", "mqttd:{c:lim2}:f").strip() == "5"
        sub3 = c.client()
        ack = await connect(c, sub3, "lim2")
        assert ack.session_present
        await settle(b, c)
        assert [p.payload for p in sub3.received() if isinstance(p, Publish)] == [
            b"m3", b"m4"]
        assert c.broker.sessions["lim2"].dropped == {"queue-full": 3}
    aio(run)


def test_a_fenced_nodes_client_will_is_published_once_by_it_when_no_one_reaped_it(redis_server, aio):
    """A node that closed its clients while cut off from Redis publishes their wills once
    Redis answers again and it still owns the sessions -- not while fenced, not twice."""
    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        wills = []
        a.broker.subscribe_local("will/#", wills.append)
        fenced = [True]
        a.sessions.is_fenced = lambda: fenced[0]
        clients = {}
        for cid, expiry in (("fw-clean", 0), ("fw-kept", 600)):
            clients[cid] = a.client()
            await connect(a, clients[cid], cid, expiry=expiry,
                          will=Will("will/" + cid, b"lost", 0, False))
        await settle(a)
        for cid, client in clients.items():
            session = a.broker.sessions[cid]
            a.broker.connection_lost(session, client.conn, publish_will=False,
                                     reason=FENCED_REASON)
        await settle(a)
        assert wills == []            # fenced: held back
        assert redis_server.cli("EXISTS", "mqttd:{c:fw-kept}:w").strip() == "0"
        fenced[0] = False
        a.sessions.unfenced()
        assert sorted(m.topic for m in wills) == ["will/fw-clean", "will/fw-kept"]
        a.sessions.unfenced()
        await settle(a)
        assert len(wills) == 2
        assert redis_server.cli("HGET", "mqttd:{c:fw-kept}:s", "online").strip() == "0"
    aio(run)


def test_a_fenced_nodes_client_will_is_published_once_by_the_reaper_that_adopted_it(redis_server, aio):
    """The fenced node was reaped before Redis answered it: the reaper published the wills;
    the recovered node's late disconnect writes are refused and publish nothing."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        wills = []
        a.broker.subscribe_local("will/#", wills.append)
        b.broker.subscribe_local("will/#", wills.append)
        a.sessions.is_fenced = lambda: False
        clients = {}
        for cid, expiry in (("rw-clean", 0), ("rw-kept", 600)):
            clients[cid] = a.client()
            await connect(a, clients[cid], cid, expiry=expiry,
                          will=Will("will/" + cid, b"lost", 0, False))
        await settle(a)
        for cid, client in clients.items():
            a.broker.connection_lost(a.broker.sessions[cid], client.conn,
                                     publish_will=False, reason=FENCED_REASON)
        # A's writes are stuck (Redis unreachable for A): B reaps A meanwhile
        assert a.store._pending
        alive["A"] = False
        assert await wait(Reaper(b.sessions).reap("A"))
        await settle(b)
        assert sorted(m.topic for m in wills) == ["will/rw-clean", "will/rw-kept"]
        await settle(a)                 # A reaches Redis again: its writes are fenced
        a.sessions.unfenced()
        await settle(a, b)
        assert sorted(m.topic for m in wills) == ["will/rw-clean", "will/rw-kept"]
    aio(run)


def test_a_claim_during_the_reapers_adoption_of_the_same_session_keeps_the_newer(redis_server, aio):
    """The subscriber reconnects to the reaping node while that node adopts its session
    (the kill -9 tests did exactly this): the claim waits for the adoption, so the reaper's
    copy never replaces the resumed session -- no kick of the client by its own node, every
    queued message once, the node's epoch Redis's."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        await parked(a, "adopted", "ad/#")
        for i in range(3):
            a.broker.publish(Message("ad/%d" % i, b"m%d" % i, 1))
        await settle(a)
        alive["A"] = False
        again = b.client()
        run_script = b.backend.run

        def run_and_connect(name, keys, args):
            d = run_script(name, keys, args)
            if name == "session_adopt":
                # the client's CONNECT arrives right after the adoption began
                d.addCallback(lambda reply: (again.send(Connect(
                    5, "adopted", False, 0,
                    properties=Properties(session_expiry_interval=600))), reply)[1])
            return d
        b.backend.run = run_and_connect
        reaped = Reaper(b.sessions).reap("A")
        for _ in range(300):
            await asyncio.sleep(0.01)
            b.clock.advance(0)
            if reaped.called:
                break
        assert reaped.called and reaped.result is True
        await settle(b, rounds=60)
        packets = again.received()
        assert isinstance(packets[0], Connack) and packets[0].session_present
        assert not [p for p in packets if type(p).__name__ == "Disconnect"]
        assert [p.payload for p in packets if isinstance(p, Publish)] == [b"m0", b"m1", b"m2"]
        session = b.broker.sessions["adopted"]
        assert session.connection is again.conn
        epoch = int(redis_server.cli("HGET", "mqttd:{c:adopted}:s", "epoch"))
        assert b.store.epochs["adopted"] == epoch
    aio(run)


def test_a_fenced_nodes_delayed_will_waits_its_delay_and_a_resume_cancels_it(redis_server, aio):
    """The will a fenced node takes back for a persistent session with a Will Delay Interval
    is pending (in Redis too), not published at once; the client resuming in time cancels
    it [MQTT-3.1.3-9]."""
    async def run():
        alive, a = start_nodes(redis_server.url, "A")
        wills = []
        a.broker.subscribe_local("will/#", wills.append)
        a.sessions.is_fenced = lambda: False
        client = a.client()
        await connect(a, client, "dw", expiry=600,
                      will=Will("will/dw", b"late", 0, False,
                                properties=Properties(will_delay_interval=60)))
        await settle(a)
        a.broker.connection_lost(a.broker.sessions["dw"], client.conn, publish_will=False,
                                 reason=FENCED_REASON)
        await settle(a)
        assert wills == [] and "dw" in a.broker.wills
        await settle(a)                 # the pending will's own write
        assert redis_server.cli("HGET", "mqttd:{c:dw}:w", "kind").strip() == "pending"
        again = a.client()
        ack = await connect(a, again, "dw", expiry=600)
        assert ack.session_present
        a.clock.advance(61)
        await settle(a)
        assert wills == [] and "dw" not in a.broker.wills
    aio(run)
