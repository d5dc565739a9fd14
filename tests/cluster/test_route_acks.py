"""What a SUBACK guarantees across nodes (REVIEW-CLUSTER F1): a route change
that adds routes counts as written -- so the SUBACK waiting for it goes out --
only once every live node's route cache applied it, or after a bounded wait
with a WARN.  In-process: route tables of several "nodes" on one real
redis-server, each on its own ``task.Clock`` advanced by the test."""
from __future__ import annotations

import asyncio

from twisted.internet import task

from mqttd.cluster.backend import Backend
from mqttd.cluster.keys import Keys
from mqttd.cluster.routes import RouteTable

from .conftest import wait

KEYS = Keys()


class Nodes:
    """Route tables of named nodes, members with alive keys as node.py makes them."""

    def __init__(self, redis_server):
        self.url = redis_server.url
        self.redis = redis_server
        self.tables = {}
        self.clocks = []
        self.backends = []

    def member(self, name, alive=True):
        self.redis.cli("SADD", KEYS.nodes(), name)
        if alive:
            self.redis.cli("SET", KEYS.alive(name), "boot-" + name)

    def table(self, name, ack_timeout=2.0):
        self.member(name)
        clock = task.Clock()
        backend = Backend(self.url, name=f"routes-{name}")
        table = RouteTable(backend, clock, name, KEYS, block_ms=50, ack_timeout=ack_timeout)
        self.tables[name] = table
        self.clocks.append(clock)
        self.backends.append(backend)
        return table

    async def pump(self, until, limit=5.0, step=0.002):
        """Let Redis answer and the clocks run until ``until()`` (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not until():
            if loop.time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(step)
            for clock in self.clocks:
                clock.advance(step)

    async def start(self, *names):
        for name in names:
            self.tables[name].joined()
        await self.pump(lambda: all(self.tables[n].loaded for n in names))

    async def stop(self):
        for table in self.tables.values():
            table.stop()
        for clock in self.clocks:
            clock.advance(1)
        await asyncio.sleep(0.1)     # the blocked feed reads return
        for backend in self.backends:
            await wait(backend.close())


def fired(d):
    state = {"done": d is None, "result": None}

    def done(result):
        state["done"] = True
        state["result"] = result
        return None
    if d is not None:
        d.addBoth(done)
    return state


def test_a_new_route_counts_as_written_only_once_every_live_node_routes_to_it(
        redis_server, aio):
    """The F1 example: when the SUBACK of a subscription on B may go out, A's
    cache already sends that topic to B -- a message A takes after the SUBACK
    is not lost to a lagging route feed."""
    async def run():
        nodes = Nodes(redis_server)
        a, b = nodes.table("A"), nodes.table("B")
        try:
            await nodes.start("A", "B")
            seen_by_a = []
            assert b.observe("f1/t", "sub", True) is True
            d = b.sync()
            assert d is not None
            d.addCallback(lambda _: seen_by_a.append(a.lookup("f1/t")[0]))
            await nodes.pump(lambda: seen_by_a)
            assert seen_by_a == [{"B"}]
            assert b.stats["ack_timeouts"] == 0 and b.stats["ack_waits"] >= 1
            assert redis_server.cli("GET", KEYS.route_applied("A")) != ""
        finally:
            await nodes.stop()
    aio(run)


def test_a_silent_live_node_holds_the_route_until_the_bound_then_a_warning(
        redis_server, aio, log_events):
    """A node that is alive but does not apply the feed (stalled) delays the
    SUBACK at most ``ack_timeout``; then it goes out with one WARN naming that
    node and a counted timeout.  A member whose alive key is gone (dead) is not
    waited for at all."""
    async def run():
        nodes = Nodes(redis_server)
        b = nodes.table("B2", ack_timeout=0.3)
        nodes.member("stalled")              # alive, never acknowledges
        nodes.member("dead", alive=False)    # its key expired: not waited for
        try:
            await nodes.start("B2")
            b.observe("f1/slow", "sub", True)
            state = fired(b.sync())
            await nodes.pump(lambda: state["done"], step=0.01)
            assert state["result"] is None           # acknowledged, not failed
            assert b.stats["ack_timeouts"] == 1
            warnings = [e for e in log_events
                        if "did not apply new routes" in e.get("log_format", "")]
            assert len(warnings) == 1 and warnings[0]["nodes"] == "stalled"
            # without the stalled node, the dead member alone holds nothing back
            redis_server.cli("DEL", KEYS.alive("stalled"))
            b.observe("f1/quick", "sub", True)
            state = fired(b.sync())
            await nodes.pump(lambda: state["done"], limit=0.25)
            assert b.stats["ack_timeouts"] == 1
        finally:
            await nodes.stop()
    aio(run)


def test_a_removed_route_waits_for_no_one_and_a_second_subscriber_waits_too(
        redis_server, aio):
    """UNSUBACK needs no one's acknowledgement (a node still sending there finds
    no subscriber); a second subscriber of a route whose first acknowledgement
    is still out waits for it as well."""
    async def run():
        nodes = Nodes(redis_server)
        b = nodes.table("B3", ack_timeout=5.0)
        nodes.member("slow3")
        try:
            await nodes.start("B3")
            assert b.observe("f1/x", "one", True) is True
            first = fired(b.sync())
            await nodes.pump(lambda: b.pending_writes() == 0)
            assert b.observe("f1/x", "two", True) is True      # not applied everywhere yet
            second = fired(b.sync())
            await asyncio.sleep(0.05)
            assert not first["done"] and not second["done"]
            # the slow node catches up: it acknowledges the feed's last entry
            last = redis_server.cli("XREVRANGE", KEYS.route_feed(), "+", "-", "COUNT", "1")
            redis_server.cli("SET", KEYS.route_applied("slow3"), last.split()[0])
            await nodes.pump(lambda: first["done"] and second["done"])
            # a removal: written, acknowledged at once although slow3 lags again
            redis_server.cli("SET", KEYS.route_applied("slow3"), "0-0")
            assert b.observe("f1/x", "one", False) is False
            assert b.observe("f1/x", "two", False) is True
            removed = fired(b.sync())
            await nodes.pump(lambda: removed["done"], limit=1.0)
            assert b.stats["ack_timeouts"] == 0
        finally:
            await nodes.stop()
    aio(run)


def test_a_node_acknowledges_new_routes_only_after_its_earlier_retained_writes(
        redis_server, aio):
    """A retained message A routed (to nobody on B) before it applied B's new
    route must be in Redis before B's SUBACK: B's retained lookup after the
    SUBACK then finds it.  A's acknowledgement waits for its pending writes."""
    async def run():
        nodes = Nodes(redis_server)
        a, b = nodes.table("A5"), nodes.table("B5")
        holds = []

        def pending_retained():
            if holds and not holds[-1].called:
                return holds[-1]
            return None
        a.before_ack = pending_retained
        try:
            await nodes.start("A5", "B5")
            from twisted.internet import defer
            holds.append(defer.Deferred())       # a retained write of A in flight
            b.observe("f1/r", "sub", True)
            state = fired(b.sync())
            await nodes.pump(lambda: a.lookup("f1/r")[0] == {"B5"})
            await asyncio.sleep(0.05)
            assert not state["done"]             # A applied it, but its write is out
            holds[-1].callback(None)             # the write is in Redis
            await nodes.pump(lambda: state["done"])
            assert state["result"] is None and b.stats["ack_timeouts"] == 0
        finally:
            await nodes.stop()
    aio(run)
