"""Cluster sessions in Redis: subscription changes and reconnects written as deltas
(REVIEW-S9 R15).

A SUBSCRIBE writes one field of the session's ``b`` hash per filter, an UNSUBSCRIBE
deletes one, a reconnect or close writes the record's fields without the subscriptions
(``st``): what goes to Redis per change does not grow with the session's subscriptions.
A session written whole before ``b`` existed (its subscriptions in ``rec``) still loads.
"""
from __future__ import annotations

from mqttd.codec.packets import Unsubscribe
from mqttd.persistence import safepickle
from mqttd.persistence.records import SessionRecord, SubscriptionRecord

from .sessionnodes import connect, settle, start_nodes

BIG = 5_000


class Sent:
    """Counts the bytes of the ``session_apply`` calls a node's store sends."""

    def __init__(self, node):
        self.bytes = 0
        pipeline = node.backend.pipeline

        def counting(commands, **kw):
            for command in commands:
                self.bytes += sum(len(a) if isinstance(a, (bytes, str)) else 8
                                  for a in command[2:])
            return pipeline(commands, **kw)
        node.backend.pipeline = counting


def _subscribe_many(client, n):
    for k in range(0, n, 1000):
        client.subscribe(*[f"dev/{k // 1000}/{i}/+" for i in range(min(1000, n - k))],
                         qos=1, packet_id=k // 1000 + 1)


def test_reconnect_and_subscribe_of_a_big_session_send_o1_bytes_to_redis(redis_server, aio):
    """With 5,000 subscriptions a reconnect + close, a SUBSCRIBE and an UNSUBSCRIBE of
    one filter each send under 2 KB to Redis (the whole record was ~200 KB each); the
    session then resumes on another node with exactly its subscriptions."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        sent = Sent(a)
        client = a.client()
        await connect(a, client, "big")
        _subscribe_many(client, BIG)
        await settle(a)
        client.conn.connection_lost()
        await settle(a)
        before = sent.bytes
        client = a.client()
        ack = await connect(a, client, "big")
        assert ack.session_present
        await settle(a)
        client.conn.connection_lost()
        await settle(a)
        assert sent.bytes - before < 2048
        client = a.client()
        await connect(a, client, "big")
        await settle(a)
        before = sent.bytes
        client.subscribe("dev/0/0/+", qos=2, packet_id=77)     # replaced
        await settle(a)
        assert sent.bytes - before < 2048
        before = sent.bytes
        client.send(Unsubscribe(78, ("dev/4/999/+",)))
        await settle(a)
        assert sent.bytes - before < 2048
        expected = dict(a.broker.sessions["big"].subscriptions)
        assert len(expected) == BIG - 1 and expected["dev/0/0/+"].qos == 2
        client.conn.connection_lost()
        await settle(a)
        moved = b.client()
        ack = await connect(b, moved, "big")
        assert ack.session_present
        await settle(a, b)
        assert b.broker.sessions["big"].subscriptions == expected
    aio(run, timeout=60)


def test_a_session_written_whole_before_deltas_loads_and_takes_deltas(redis_server, aio):
    """A session whose subscriptions are in ``rec`` (written by an mqttd without the
    ``b`` hash) resumes with them; a filter removed later stays removed on another node."""
    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        client = a.client()
        await connect(a, client, "old")
        client.conn.connection_lost()
        await settle(a)
        # what an mqttd without deltas left in Redis: the whole record in rec
        subs = (SubscriptionRecord("o/1", 1), SubscriptionRecord("o/2", 0),
                SubscriptionRecord("o/3", 2))
        record = SessionRecord("old", 5, subs, 600, 1.0, None)
        key = "mqttd:{c:old}:"
        assert redis_server.cli("DEL", key + "b").strip() in ("0", "1")
        redis_server.cli("HDEL", key + "s", "bonly", "st")
        await _hset(a, key + "s", "rec", safepickle.dumps(record))
        moved = b.client()
        ack = await connect(b, moved, "old")
        assert ack.session_present
        await settle(a, b)
        assert list(b.broker.sessions["old"].subscriptions) == ["o/1", "o/2", "o/3"]
        moved.send(Unsubscribe(5, ("o/2",)))
        moved.subscribe("n/1", qos=1, packet_id=6)
        await settle(b)
        moved.conn.connection_lost()
        await settle(b)
        back = a.client()
        ack = await connect(a, back, "old")
        assert ack.session_present
        await settle(a, b)
        assert sorted(a.broker.sessions["old"].subscriptions) == ["n/1", "o/1", "o/3"]
    aio(run, timeout=60)


async def _hset(node, key, field, value):
    from .conftest import wait
    await wait(node.backend.execute("HSET", key, field, value))
