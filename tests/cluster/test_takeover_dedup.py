"""A takeover across live nodes delivers each message once (REVIEW-CLUSTER F4).

In-process (as tests/cluster/test_sessions.py).  The old owner skips forwarding
what the publisher's node also sent to the new owner's node; what reaches the
new owner's node directly while its claim is still taking the session over
(kick sent, session not installed) must then be kept for the session, not lost.
"""
from __future__ import annotations

from mqttd.codec.packets import Publish
from mqttd.messages import Message

from .sessionnodes import Node, connect, settle


class FakeRouter:
    """The bus router's side the sessions use: dispatch observers."""

    def __init__(self, node):
        self.node = node
        self.dispatch_observers = []

    def dispatch(self, message):
        """An inbox entry sent to this node and to ``targets``."""
        self.node.broker.dispatch(message)
        for observer in list(self.dispatch_observers):
            observer(message, frozenset(("A", "B")))



async def parked_on_a(url, client_id, topic_filter):
    """Nodes A and B (B with a :class:`FakeRouter`; A skips forwarding what the
    publisher also sent to B) and ``client_id``'s persistent session parked on A
    with ``topic_filter``: ``(a, b, router)``."""
    nodes, alive = {}, {"A": True, "B": True}
    a, b = Node(url, "A", nodes, alive), Node(url, "B", nodes, alive)
    router = FakeRouter(b)
    b.sessions.router = router
    a.sessions.also_sent_to = lambda node, message: node == "B"
    sub = a.client()
    await connect(a, sub, client_id)
    sub.subscribe(topic_filter, qos=1)
    sub.conn.connection_lost()
    await settle(a)
    return a, b, router

def test_message_reaching_the_new_owner_during_the_takeover_is_delivered_once(
        redis_server, aio):
    """A message the publisher sent to both nodes while the session moves from A to B:
    A does not forward it (B got it), B got it before the session was installed there;
    B keeps it and delivers it into the session once -- not lost, not twice."""
    async def run():
        a, b, router = await parked_on_a(redis_server.url, "mover", "mv/#")
        sent = b.sessions.send_control

        def send_control(node, fields):
            if fields.get("op") == "kick":
                # in flight to both nodes as A lets go: B's copy arrives first
                router.dispatch(Message("mv/1", b"during", 1))
            return sent(node, fields)
        b.sessions.send_control = send_control
        again = b.client()
        ack = await connect(b, again, "mover")
        assert ack.reason_code == 0 and ack.session_present
        a.broker.dispatch(Message("mv/1", b"during", 1))    # A's copy: not forwarded
        got = []
        for _ in range(5):
            await settle(a, b)
            got += [p.payload for p in again.received() if isinstance(p, Publish)]
        assert got == [b"during"]
        assert b.sessions.router.dispatch_observers == []
    aio(run)


def test_message_the_old_owner_queued_during_the_takeover_and_the_new_node_kept_is_delivered_once(
        redis_server, aio):
    """The last F4 edge: a message sent to both nodes while the session moves from A to B,
    that A still delivered into the session (before the kick reached it: a hand-off write)
    *and* B kept for the session (its claim was already running): B loads the session
    with it queued, and must not deliver its own copy on top."""
    async def run():
        a, b, router = await parked_on_a(redis_server.url, "mover2", "mv2/#")
        # two identical messages before the takeover: queued on A, delivered once each
        a.broker.dispatch(Message("mv2/0", b"same", 1))
        a.broker.dispatch(Message("mv2/0", b"same", 1))
        await settle(a)
        sent = b.sessions.send_control

        def send_control(node, fields):
            if fields.get("op") == "kick":
                # in flight to both nodes: B's copy first (kept by the claim), then A's,
                # which A still delivers into the session it owns until the kick
                router.dispatch(Message("mv2/1", b"during", 1))
                a.broker.dispatch(Message("mv2/1", b"during", 1))
                # and one that reached B only (its publisher's node had no route to A
                # any more): kept by B, nothing of it at A
                router.dispatch(Message("mv2/2", b"only-b", 1))
            return sent(node, fields)
        b.sessions.send_control = send_control
        again = b.client()
        ack = await connect(b, again, "mover2")
        assert ack.reason_code == 0 and ack.session_present
        got = []
        for _ in range(5):
            await settle(a, b)
            got += [p.payload for p in again.received() if isinstance(p, Publish)]
        assert sorted(got) == [b"during", b"only-b", b"same", b"same"], got
    aio(run)


def test_message_reaching_the_new_owner_while_its_claim_runs_is_not_lost(redis_server, aio):
    """B's copy of a message arrives while B's claim is on its way (before the takeover
    window used to open), A's copy after A let the session go (A skips it: B got it):
    B must keep it for the session -- it was dropped (acknowledged QoS 1/2 messages lost
    when a live subscriber moved between nodes under a publisher's stream)."""
    async def run():
        a, b, router = await parked_on_a(redis_server.url, "mover3", "mv3/#")
        is_alive = b.sessions.is_alive

        def alive_check(node):
            # the claim script ran; B reads its copy before it looks at the old owner
            router.dispatch(Message("mv3/1", b"early", 1))
            return is_alive(node)
        b.sessions.is_alive = alive_check
        again = b.client()
        ack = await connect(b, again, "mover3")
        assert ack.reason_code == 0 and ack.session_present
        a.broker.dispatch(Message("mv3/1", b"early", 1))    # A's copy, after the kick
        got = []
        for _ in range(5):
            await settle(a, b)
            got += [p.payload for p in again.received() if isinstance(p, Publish)]
        assert got == [b"early"]
    aio(run)
