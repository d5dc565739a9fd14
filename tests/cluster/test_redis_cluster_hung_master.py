"""Redis Cluster with one master *hung* (SIGSTOP): only what lives there is unavailable.

A hung master is worse than a dead one for a client: its connections stay
open and every command sent to it waits for the socket timeout, where a dead
master refuses at once.  REVIEW-S9-CLUSTER C3: with one master hung, mqttd
nodes whose own keys (heartbeat, inbox, routes) live on healthy masters
fenced themselves and were reaped -- a heartbeat round waited on a peer's
alive key on the hung master, and the Redis Cluster client stalled every
command behind a slot-map refresh (or a ``COMMAND GETKEYS``) sent to it.
Only a node whose *own* heartbeat key lives on the hung master may fence
itself; the others keep serving the sessions that live elsewhere, refuse
(0x88) those that live there, and everything recovers on its own after
SIGCONT.
"""
from __future__ import annotations

import socket
import time

import pytest

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect

from .conftest import wait_joined
from .mqttc import Client, wait_routed
from .test_redis_cluster_partial import _pick, partial_cluster  # noqa: F401  (fixture)
from .test_redis_trouble import connack_code, wait_for
from .test_sys import latest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2.5"]


def _connack_within(port: int, client_id: str, timeout: float) -> int:
    """The v5 CONNACK reason code a fresh CONNECT gets within ``timeout`` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encode(Connect(5, client_id, True, 0), 5))
        reader = PacketReader(level=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("closed without CONNACK")
            for packet in reader.feed(data):
                if isinstance(packet, Connack):
                    return packet.reason_code
    raise TimeoutError("no CONNACK")


def _accepted(port: int, client_id: str) -> bool:
    """Whether a fresh v5 CONNECT is accepted now (a refusal or a closed socket: not yet)."""
    try:
        return connack_code(port, 5, client_id) == 0
    except (ConnectionError, OSError, TimeoutError):
        return False


def test_the_redis_cluster_client_waits_on_a_hung_master_only_for_its_own_slots(
        partial_cluster, aio):
    """Backend level: with the master redis-py asks for stream keys (``COMMAND GETKEYS``)
    hung, commands for healthy masters -- XREADGROUP and XREAD included -- are answered
    right after each timeout on the hung one (no inline slot-map refresh through it), and
    ``pipeline_each`` fails only the hung master's share; all of it works after SIGCONT."""
    from mqttd.cluster.backend import Backend, RedisUnavailable

    from .conftest import wait
    cluster = partial_cluster

    async def run():
        backend = Backend(cluster.url, socket_timeout=1.0)
        try:
            await wait(backend.connect())
            parser = backend.client.commands_parser.node
            victim = next(s for s in cluster.servers if s.port == parser.port)
            healthy = [s for s in cluster.servers if s is not victim]
            hung_key = _pick(cluster, "hk-%d", lambda k: k, [victim])[0]
            ok_keys = _pick(cluster, "ok-%d", lambda k: "{%s}s" % k, healthy, count=2)
            streams = ["{%s}s" % k for k in ok_keys]
            for key in streams:
                await wait(backend.execute("XGROUP", "CREATE", key, "g", "$", "MKSTREAM"))
            victim.pause()
            try:
                for round_ in range(4):
                    with pytest.raises(RedisUnavailable):
                        await wait(backend.execute("GET", hung_key))
                    for key in streams:
                        await wait(backend.execute("XADD", key, "*", "m", b"%d" % round_))
                        got = await wait(backend.execute(
                            "XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", key, ">"))
                        assert got and got[0][1][0][1][b"m"] == b"%d" % round_
                        assert await wait(backend.execute("XREAD", "STREAMS", key, "0-0"))
                    replies = await wait(backend.pipeline_each(
                        [("GET", hung_key), ("XLEN", streams[0]), ("XLEN", streams[1])]))
                    assert isinstance(replies[0], RedisUnavailable), replies
                    assert replies[1:] == [round_ + 1, round_ + 1]
            finally:
                victim.resume()
            cluster.wait_ok()
            replies = await wait(backend.pipeline_each(
                [("SET", hung_key, b"v"), ("GET", hung_key), ("XLEN", streams[0])]), 15)
            assert replies == [True, b"v", 4]
        finally:
            await wait(backend.close())
    aio(run, timeout=60)


def test_commands_do_not_wait_for_a_slot_map_refresh_through_a_hung_master(
        partial_cluster, aio):
    """After redis-py's own timeout on the hung master it wants a new slot map; the
    commands for healthy masters go on with the map they have while it is fetched in
    the background -- not inline, where ``CLUSTER SLOTS`` sent to the hung master (here
    the only startup node, so the old inline refresh always tried it) failed them."""
    from mqttd.cluster.backend import Backend, RedisUnavailable

    from .conftest import wait
    cluster = partial_cluster

    async def run():
        backend = Backend(cluster.url, socket_timeout=1.0)
        try:
            await wait(backend.connect())
            manager = backend.client.nodes_manager
            if not hasattr(manager, "_dynamic_startup_nodes"):   # pragma: no cover
                pytest.skip("redis-py without dynamic startup nodes")
            shared = {cluster.server_of("mqttd:nodes"), cluster.server_of("mqttd:routefeed")}
            victim = next(s for s in cluster.servers if s not in shared)
            healthy = [s for s in cluster.servers if s is not victim]
            name = f"127.0.0.1:{victim.port}"
            manager.startup_nodes = {name: manager.nodes_cache[name]}
            manager._dynamic_startup_nodes = False
            # redis-py's socket timeout (1 s) fires before the backend's bound
            backend.socket_timeout = 3.0
            hung_key = _pick(cluster, "rk-%d", lambda k: k, [victim])[0]
            ok_key = _pick(cluster, "ok-%d", lambda k: k, healthy)[0]
            await wait(backend.execute("SET", ok_key, b"v"))
            victim.pause()
            try:
                for _round in range(3):
                    with pytest.raises(RedisUnavailable):
                        await wait(backend.execute("GET", hung_key))
                    assert await wait(backend.execute("GET", ok_key)) == b"v"
            finally:
                victim.resume()
            cluster.wait_ok()
            assert await wait(backend.execute("GET", hung_key), 15) is None
        finally:
            await wait(backend.close())
    aio(run, timeout=60)


def test_a_hung_master_fences_only_the_node_whose_heartbeat_lives_there(
        partial_cluster, cluster_node_factory):
    """Nodes whose keys live on healthy masters neither fence nor get reaped while
    another master hangs for 3 TTLs (their sessions keep working, QoS 1 between them
    is delivered, sessions on the hung master get 0x88); the node whose heartbeat
    lives on the hung master fences itself, and all of them serve again after SIGCONT."""
    cluster = partial_cluster
    shared = {cluster.server_of("mqttd:nodes"), cluster.server_of("mqttd:routefeed")}
    victim = next(s for s in cluster.servers if s not in shared)
    healthy = [s for s in cluster.servers if s is not victim]
    alive = "mqttd:{n:%s}:alive"
    ids = _pick(cluster, "hm-%d", lambda n: alive % n, healthy, count=2)
    cut = _pick(cluster, "hm-cut-%d", lambda n: alive % n, [victim])[0]
    a = cluster_node_factory(cluster.url, node_id=ids[0],
                             extra_args=FAST + ["--sys-interval", "0.5"])
    b = cluster_node_factory(cluster.url, node_id=ids[1],
                             extra_args=FAST + ["--sys-interval", "0.5"])
    c = cluster_node_factory(cluster.url, node_id=cut,
                             extra_args=FAST + ["--sys-interval", "0.5"])
    session = "mqttd:{c:%s}:s"
    ok_ids = _pick(cluster, "hm-ok-%d", lambda i: session % i, healthy, count=7)
    watcher = Client(a.port, ok_ids[6])
    watcher.subscribe(f"$SYS/broker/cluster/members/{ids[1]}/messages/sent")
    down_id = _pick(cluster, "hm-down-%d", lambda i: session % i, [victim])[0]
    sub = Client(b.port, ok_ids[0])
    sub.subscribe("hm/#", 1)
    sub.subscribe("probe/route")
    pub = Client(a.port, ok_ids[1])
    wait_routed(pub, sub)

    victim.pause()
    acked = received = 0
    try:
        paused = time.monotonic()
        # 3 TTLs: a node that wrongly fenced (after 2 s) would be reaped meanwhile
        while time.monotonic() - paused < 7.5:
            for node, cid in ((a, ok_ids[2]), (b, ok_ids[3])):
                assert connack_code(node.port, 5, cid) == 0, node.log_tail(60)
            acked += 1
            payload = b"during-%d" % acked
            assert pub.publish("hm/x", payload, qos=1).reason_code == 0
            assert [m.payload for m in sub.collect(1, timeout=10)] == [payload]
            received += 1
            time.sleep(0.2)
        # a new subscription gets its SUBACK: a node that cannot tell whether it applied
        # the route (its keys are on the hung master) is waited for, then given up on
        late = Client(b.port, ok_ids[5])
        assert late.subscribe("hm/new", 1).reason_codes == (1,), b.log_tail(60)
        late.subscribe("probe/route")
        wait_routed(pub, late)
        assert pub.publish("hm/new", b"new", qos=1).reason_code == 0
        assert [m.payload for m in late.collect(1, timeout=10)] == [b"new"]
        # the cluster-wide $SYS of a still counts b, whose figures are on a healthy
        # master (c's, on the hung one, count as last seen)
        topic = f"$SYS/broker/cluster/members/{ids[1]}/messages/sent"
        before = int(latest(watcher, topic, lambda v: True))
        for i in range(3):
            assert pub.publish("hm/x", b"sys-%d" % i, qos=1).reason_code == 0
        sub.collect(3, timeout=10)
        # (each round waits up to one socket timeout for the hung master's share)
        latest(watcher, topic, lambda v: int(v) >= before + 3, timeout=40)
        # a session on the hung master cannot be claimed: refused, not hung forever
        assert _connack_within(a.port, down_id, timeout=15) == 0x88, a.log_tail(60)
    finally:
        victim.resume()
    assert acked == received and acked >= 5
    cluster.wait_ok()
    # the node cut off from its own heartbeat fenced itself (only it) ...
    assert "fences itself" in c.log_tail(400), c.log_tail(100)
    # ... and serves again on its own
    wait_for(lambda: _accepted(c.port, ok_ids[4]), timeout=60,
             what="the cut-off node serving again after SIGCONT")
    wait_for(lambda: _accepted(a.port, down_id), timeout=30,
             what="the session on the resumed master")
    time.sleep(1.0)
    for node in (a, b):
        log = node.log_tail(600)
        assert "fences itself" not in log, log
        assert "lost its membership" not in log, log
    for node in (a, b, c):
        log = node.log_tail(600)
        for live in ids:
            assert f"Node {live} is dead" not in log, log
    wait_for(lambda: set(ids + [cut]) <= set(
        cluster.servers[0].cli("-c", "SMEMBERS", "mqttd:nodes").split()),
        timeout=30, what="every node a member again")
    for node in (a, b, c):
        wait_joined(node)
    # traffic flows again between the nodes, the resumed one included
    late = Client(c.port, ok_ids[4] + "-late")
    late.subscribe("hm/#", 1)
    late.subscribe("probe/route")
    wait_routed(pub, late)
    assert pub.publish("hm/after", b"after", qos=1).reason_code == 0
    assert [m.payload for m in late.collect(1, timeout=10) if m.topic == "hm/after"] == \
        [b"after"]


def test_a_hung_master_holding_the_route_feed_fences_no_node(
        partial_cluster, cluster_node_factory):
    """The master of ``mqttd:routefeed`` hangs for 3 TTLs (REVIEW-S9-CLUSTER C3's idle
    repro): no node fences or is reaped; QoS 1 between existing routes is still
    acknowledged and delivered (held at most ``max_hold`` while the route cache cannot be
    refreshed), and after SIGCONT new subscriptions work again on their own."""
    cluster = partial_cluster
    victim = cluster.server_of("mqttd:routefeed")
    if cluster.server_of("mqttd:nodes") is victim:   # pragma: no cover - slot layout
        pytest.skip("mqttd:nodes and mqttd:routefeed on one master")
    healthy = [s for s in cluster.servers if s is not victim]
    alive = "mqttd:{n:%s}:alive"
    ids = _pick(cluster, "hf-%d", lambda n: alive % n, healthy, count=2)
    a = cluster_node_factory(cluster.url, node_id=ids[0], extra_args=FAST)
    b = cluster_node_factory(cluster.url, node_id=ids[1], extra_args=FAST)
    session = "mqttd:{c:%s}:s"
    ok_ids = _pick(cluster, "hf-ok-%d", lambda i: session % i, healthy, count=5)
    sub = Client(b.port, ok_ids[0])
    sub.subscribe("hf/#", 1)
    sub.subscribe("probe/route")
    pub = Client(a.port, ok_ids[1])
    wait_routed(pub, sub)

    victim.pause()
    acked = []
    try:
        paused = time.monotonic()
        while time.monotonic() - paused < 7.5:
            for node, cid in ((a, ok_ids[2]), (b, ok_ids[3])):
                assert connack_code(node.port, 5, cid) == 0, node.log_tail(60)
            payload = b"during-%d" % len(acked)
            assert pub.publish("hf/x", payload, qos=1, timeout=20).reason_code == 0
            acked.append(payload)
            time.sleep(0.3)
    finally:
        victim.resume()
    got = [m.payload for m in sub.collect(len(acked), timeout=20) if m.topic == "hf/x"]
    assert sorted(got) == sorted(acked) and len(acked) >= 3
    cluster.wait_ok()
    late = Client(a.port, ok_ids[4])
    wait_for(lambda: _subscribed(late, "hf/late/#"), timeout=30,
             what="a SUBACK once the feed's master answers again")
    sub2 = Client(b.port, ok_ids[2] + "-pub")
    wait_routed(sub2, late, topic="hf/late/probe")
    for node in (a, b):
        log = node.log_tail(600)
        assert "fences itself" not in log, log
        assert "lost its membership" not in log, log
        for live in ids:
            assert f"Node {live} is dead" not in log, log


def _subscribed(client, topic_filter) -> bool:
    try:
        return client.subscribe(topic_filter, 1).reason_codes[0] == 1
    except (TimeoutError, ConnectionError, OSError):
        return False
