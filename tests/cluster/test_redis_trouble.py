"""Redis trouble with real processes: a node cut off from Redis fences itself
(CONNECT refused with v3 rc 3 / v5 0x88, clients disconnected, one clear log
line) and recovers by itself when Redis is back."""
from __future__ import annotations

import socket
import time

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Disconnect

pytestmark = pytest.mark.slow

FAST = ["--cluster-heartbeat", "0.2", "--cluster-node-ttl", "1"]


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


def wait_for(predicate, timeout=15.0, what="condition"):
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
    wait_for(lambda: connack_code(node.port, 4) == 0, what="recovery after Redis restart")
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
    wait_for(lambda: connack_code(node.port, 4) == 0, what="join after Redis came up")
