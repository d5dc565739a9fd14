"""Redis trouble with real processes: a node cut off from Redis fences itself
(CONNECT refused with v3 rc 3 / v5 0x88, clients disconnected, one clear log
line) and recovers by itself when Redis is back."""
from __future__ import annotations

import socket
import time

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Disconnect, Puback, Publish

from .mqttc import Client, wait_routed

pytestmark = pytest.mark.slow

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2.5"]


def connack_code(port: int, level: int = 4, client_id: str = "probe") -> int:
    """The CONNACK return code / reason code a fresh CONNECT gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode(Connect(level, client_id, True, 0), level))
        reader = PacketReader(level=level)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("closed without CONNACK")
            for packet in reader.feed(data):
                if isinstance(packet, Connack):
                    return packet.reason_code
    raise TimeoutError("no CONNACK")


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


def test_a_node_without_redis_fences_itself_and_recovers_when_redis_is_back(
        redis_server, cluster_node_factory):
    """Fenced: no client is served by a node the others will declare dead; back: it serves again."""
    node = cluster_node_factory(redis_server.url, node_id="fence-a", extra_args=FAST)
    assert connack_code(node.port, 4) == 0
    client = BlockingClient(node.port, "victim", level=5)
    redis_server.stop()
    # the connected v5 client is told 0x89 (Server busy) and closed
    packet = client.next_packet(timeout=10)
    assert isinstance(packet, Disconnect) and packet.reason_code == 0x89
    client.close()
    assert connack_code(node.port, 4) == 3          # v3: Server unavailable
    assert connack_code(node.port, 5) == 0x88       # v5: Server unavailable
    log = node.log_tail(200)
    assert "fences itself" in log and "no heartbeat acknowledged" in log
    redis_server.start(keep_port=True)
    wait_for(lambda: connack_code(node.port, 4) == 0, timeout=60,
             what="recovery after Redis restart")
    assert node.running
    # the membership is back in Redis
    wait_for(lambda: "fence-a" in redis_server.cli("SMEMBERS", "mqttd:nodes"),
             what="membership")


def test_a_node_started_while_redis_is_down_refuses_clients_until_it_can_join(
        redis_server, cluster_node_factory):
    """Starting without Redis is not a crash: the node waits fenced and joins later."""
    url = redis_server.url
    redis_server.stop()
    node = cluster_node_factory(url, node_id="late", extra_args=FAST, joined=False)
    assert connack_code(node.port, 4) == 3
    redis_server.start(keep_port=True)
    wait_for(lambda: connack_code(node.port, 4) == 0, timeout=60,
             what="join after Redis came up")


# --- the bus under Redis trouble --------------------------------------------------------

def _routed_pair(redis_server, cluster_node_factory, extra=()):
    a = cluster_node_factory(redis_server.url, node_id="ta", extra_args=list(extra))
    b = cluster_node_factory(redis_server.url, node_id="tb", extra_args=list(extra))
    sub = Client(b.port, "t-sub")
    sub.subscribe("t/#", 1)
    sub.subscribe("probe/route")
    pub = Client(a.port, "t-pub")
    wait_routed(pub, sub)
    return a, b, pub, sub


def test_no_qos1_publish_is_acknowledged_while_redis_cannot_take_the_hand_off(
        redis_server, cluster_node_factory):
    """No false acknowledgement: without Redis the PUBACK is never sent and the
    publisher is disconnected (it re-sends); after the restart delivery resumes."""
    a, b, pub, sub = _routed_pair(redis_server, cluster_node_factory)
    redis_server.stop()
    pub.send(Publish("t/x", b"lost?", 1, packet_id=77))
    got = []
    try:
        while True:
            got.append(pub._wait_for(object, timeout=15))
    except (ConnectionError, OSError):
        pass
    assert not any(isinstance(p, Puback) for p in got), got
    assert any(isinstance(p, Disconnect) for p in got) or got == []
    assert "Cannot forward" in a.log_tail(200)
    redis_server.start(keep_port=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            pub = Client(a.port, "t-pub2")
            sub = Client(b.port, "t-sub2")
            sub.subscribe("t/#", 1)
            sub.subscribe("probe/route")
            wait_routed(pub, sub, timeout=3)
            break
        except (AssertionError, ConnectionError, OSError):
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.2)
    assert pub.publish("t/x", b"after", qos=1).reason_code == 0
    assert [m.payload for m in sub.collect(1) if m.topic == "t/x"] == [b"after"]


def test_nodes_recover_from_a_redis_restart_that_lost_everything(
        redis_server, cluster_node_factory):
    """A Redis restarted without its data: nodes re-join, write their routes again, deliver."""
    a, b, pub, sub = _routed_pair(redis_server, cluster_node_factory, FAST)
    redis_server.stop()
    for path in redis_server.workdir.glob("appendonly*"):
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        else:
            path.unlink()
    redis_server.start(keep_port=True)
    # the nodes notice (their heartbeat key is gone), fence, re-join as new
    # incarnations and write their routes again: clients connected meanwhile
    # may be closed, so the whole round is retried (bounded)
    deadline = time.monotonic() + 60
    while True:
        try:
            pub = Client(a.port, "t-pub3")
            sub = Client(b.port, "t-sub3")
            sub.subscribe("t/#", 1)
            sub.subscribe("probe/route")
            wait_routed(pub, sub, timeout=3)
            assert pub.publish("t/y", b"again", qos=1).reason_code == 0
            assert [m.payload for m in sub.collect(1) if m.topic == "t/y"] == [b"again"]
            break
        except (AssertionError, ConnectionError, OSError):
            assert time.monotonic() < deadline, "no recovery after an empty Redis"
            time.sleep(0.2)
    assert "lost its membership" in a.log_tail(400) + b.log_tail(400)
    assert a.running and b.running


def test_the_wills_of_a_fenced_nodes_clients_are_published_once_when_redis_is_back(
        redis_server, cluster_node_factory):
    """A node cut off from Redis closes its clients without their wills; when Redis answers
    again and no one reaped the node, it publishes each will -- once (a persistent watcher
    finds exactly one copy queued for it)."""
    from mqttd.codec.packets import Will
    node = cluster_node_factory(redis_server.url, node_id="will-a", extra_args=FAST)
    watcher = Client(node.port, "will-watch", level=4, clean=False)
    watcher.subscribe("wills/#", qos=1)
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(encode(Connect(4, "will-owner", True, 30,
                                    will=Will("wills/owner", b"gone", 1, False)), 4))
        reader = PacketReader(level=4)
        packets = []
        deadline = time.monotonic() + 5
        while not packets and time.monotonic() < deadline:
            packets = reader.feed(sock.recv(4096))
        assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
        redis_server.stop()
        wait_for(lambda: "fences itself" in node.log_tail(200), what="fencing")
        # the fenced node closes its clients and publishes no will meanwhile
        sock.settimeout(10)
        assert sock.recv(4096) == b""
    watcher.sock.close()
    time.sleep(1.0)                  # Redis stays away longer than the node's TTL
    redis_server.start(keep_port=True)
    wait_for(lambda: connack_code(node.port, 4) == 0, timeout=60, what="recovery")
    deadline = time.monotonic() + 20
    wills = []
    while time.monotonic() < deadline:
        again = Client(node.port, "will-watch", level=4, clean=False)
        wills += [p.payload for p in again.quiet(1.5) if p.topic == "wills/owner"]
        again.close()
        if wills:
            break
    time.sleep(1.0)
    again = Client(node.port, "will-watch", level=4, clean=False)
    wills += [p.payload for p in again.quiet(1.5) if p.topic == "wills/owner"]
    again.close()
    assert wills == [b"gone"], node.log_tail(80)
