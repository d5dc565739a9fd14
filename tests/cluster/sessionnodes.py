"""In-process cluster nodes for the session tests (``test_sessions*.py``,
``test_takeover_dedup.py``, ``test_reaper_inbox.py``).

Each :class:`Node` is a broker with its own RedisSessionStore and
ClusterSessions against one real redis-server, its own ``task.Clock``;
control messages between nodes are handed over directly (to the nodes whose
``alive`` entry is true).
"""
from __future__ import annotations

import asyncio

from twisted.internet import defer
from twisted.internet.task import Clock

from mqttd.broker import Broker
from mqttd.cluster.backend import Backend
from mqttd.cluster.sessions import ClusterSessions
from mqttd.cluster.store import RedisSessionStore
from mqttd.codec.packets import Connect, Properties

from tests.core.harness import FakeClient
from .conftest import wait


class Node:
    def __init__(self, url, name, nodes, alive, config=None):
        self.name = name
        self.clock = Clock()
        self.backend = Backend(url, name=name)
        self.store = RedisSessionStore(self.backend, name)
        self.broker = Broker(self.clock, store=self.store,
                             **({} if config is None else {"config": config}))
        self.broker.start()
        self.nodes = nodes
        self.alive = alive
        self.sessions = ClusterSessions(self.broker, self.backend, self.store, name,
                                        self.clock, self.send_control, self.is_alive,
                                        takeover_timeout=2.0)
        nodes[name] = self

    def send_control(self, node, fields):
        target = self.nodes.get(node)
        if target is not None and self.alive.get(node):
            asyncio.get_running_loop().call_soon(
                target.sessions.handle_control,
                {k: str(v).encode() for k, v in fields.items()})
        return defer.succeed(None)

    def is_alive(self, node):
        return defer.succeed(bool(self.alive.get(node)))

    def client(self, level=5):
        return FakeClient(self.broker, self.clock, level=level)


def start_nodes(url, *names, config=None):
    """``(alive, node, ...)``: a :class:`Node` per name on the Redis at ``url``, all
    alive (``alive[name] = False`` cuts one off: no control message reaches it);
    ``node.nodes`` is the dict of all of them (for a node started later)."""
    nodes, alive = {}, {name: True for name in names}
    return (alive, *(Node(url, name, nodes, alive, config=config) for name in names))


async def settle(*nodes, rounds=30):
    """Let Redis replies and control messages arrive, then flush every store."""
    for _ in range(rounds):
        await asyncio.sleep(0.01)
        for node in nodes:
            node.clock.advance(0)
    for node in nodes:
        await wait(node.store.sync())
        node.clock.advance(0)


async def connect(node, client, client_id, clean=False, expiry=600, will=None, only=None):
    """CONNECT ``client`` on ``node``; its CONNACK (the later packets stay unread).
    The clocks of every node advance meanwhile, or only those of ``only``:
    another node's pending store writes then stay unflushed until a kick makes
    it sync."""
    client.send(Connect(client.level, client_id, clean, 0, will=will,
                        properties=Properties(session_expiry_interval=expiry)
                        if client.level == 5 else Properties()))
    for _ in range(300):
        await asyncio.sleep(0.01)
        for other in (node.nodes.values() if only is None else only):
            other.clock.advance(0)
        packets = client.received()
        if packets:
            client._unread = packets[1:]
            return packets[0]
    raise AssertionError("no CONNACK")


async def parked(node, client_id, topic_filter, **connect_args):
    """A persistent session of ``client_id`` on ``node``, subscribed to
    ``topic_filter`` at QoS 1, its connection lost (no DISCONNECT) and the store
    flushed: what it is owed from now on is queued.  Returns the gone client."""
    client = node.client()
    await connect(node, client, client_id, **connect_args)
    client.subscribe(topic_filter, qos=1)
    client.conn.connection_lost()
    await settle(node)
    return client


async def claimed_behind_its_back(a, b, client_id, topic_filter, settle_claim=True):
    """``a`` parks a session (:func:`parked`); ``b`` claims it while ``a`` is cut off
    (no kick reaches it) and parks it in turn; then ``a``'s store gets its stale
    epoch back: ``a`` still believes it owns the session, a zombie whose writes
    Redis must refuse.  ``settle_claim=False``: ``b``'s connection is lost before
    its claim's writes were flushed."""
    await parked(a, client_id, topic_filter)
    stale = a.store.epochs[client_id]
    a.alive[a.name] = False
    client = b.client()
    await connect(b, client, client_id)
    if settle_claim:
        await settle(b)
    client.conn.connection_lost()
    await settle(b)
    a.store.epochs[client_id] = stale
