"""Cluster sessions end to end: real mqttd nodes on one redis-server, raw MQTT clients.

Takeover across nodes (0x8E, promptly), simultaneous CONNECTs of one client id
on two nodes, wills with delay and session expiry when the owner node dies.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import (
    Connack, Connect, Disconnect, Properties, Publish, Subscribe, Subscription, Will)

pytestmark = [pytest.mark.interop]

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2"]


class Raw:
    """One MQTT 5 connection on the project's codec; every read bounded."""

    def __init__(self, node, client_id, clean=False, expiry=600, will=None):
        self.sock = socket.create_connection((node.host, node.port), timeout=10)
        self.reader = PacketReader(level=5)
        self.pending = []
        self.closed = False
        self.sock.sendall(encode(Connect(5, client_id, clean, 0, will=will,
                                         properties=Properties(session_expiry_interval=expiry)),
                                 5))

    def next(self, timeout=10.0):
        self.sock.settimeout(timeout)
        while not self.pending:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def send(self, packet):
        self.sock.sendall(encode(packet, 5))

    def close(self):
        self.sock.close()


def connack(client):
    packet = client.next()
    assert isinstance(packet, Connack), packet
    return packet


def test_takeover_on_another_node_closes_the_old_connection_with_0x8E(
        redis_server, cluster_node_factory):
    """A client online on node 1 connects on node 2: node 1 sends DISCONNECT 0x8E within
    the takeover timeout, node 2 answers session present and serves its subscription."""
    n1 = cluster_node_factory(redis_server.url, node_id="one")
    n2 = cluster_node_factory(redis_server.url, node_id="two")
    old = Raw(n1, "roamer")
    assert connack(old).reason_code == 0
    old.send(Subscribe(1, (Subscription("roam/#", 1),)))
    assert type(old.next()).__name__ == "Suback"
    started = time.monotonic()
    new = Raw(n2, "roamer")
    ack = connack(new)
    assert ack.reason_code == 0 and ack.session_present
    kicked = old.next(timeout=6)
    assert isinstance(kicked, Disconnect) and kicked.reason_code == 0x8E
    assert time.monotonic() - started < 5
    new.send(Publish("roam/x", b"hello", 1, False, packet_id=5))
    got = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            isinstance(p, Publish) for p in got):
        got.append(new.next())
    assert [p.payload for p in got if isinstance(p, Publish)] == [b"hello"]
    old.close()
    new.close()


def test_simultaneous_connects_on_two_nodes_leave_exactly_one(
        redis_server, cluster_node_factory):
    """The same client id connecting at the same moment on two nodes, 5 times:
    each time exactly one connection stays up."""
    n1 = cluster_node_factory(redis_server.url, node_id="left")
    n2 = cluster_node_factory(redis_server.url, node_id="right")
    for trial in range(5):
        client_id = f"twin-{trial}"
        clients = [None, None]
        barrier = threading.Barrier(2)

        def open_on(i, node):
            barrier.wait(5)
            clients[i] = Raw(node, client_id)
        threads = [threading.Thread(target=open_on, args=(i, n)) for i, n in
                   enumerate((n1, n2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        survivors = 0
        for client in clients:
            first = client.next(timeout=10)
            ok = isinstance(first, Connack) and first.reason_code == 0
            if ok:
                # taken over (0x8E) or still up after both claims settled
                try:
                    after = client.next(timeout=1.5)
                except socket.timeout:
                    after = "up"
                ok = after == "up"
            survivors += ok
            client.close()
        assert survivors == 1, trial


def test_dead_nodes_wills_are_published_once_after_their_delay(
        redis_server, cluster_node_factory):
    """kill -9 of the owner node: the surviving node publishes a clean client's will at
    once and a persistent client's delayed will after its delay, each exactly once."""
    n1 = cluster_node_factory(redis_server.url, node_id="doomed", extra_args=FAST)
    n2 = cluster_node_factory(redis_server.url, node_id="heir", extra_args=FAST)
    watcher = Raw(n2, "watcher", clean=True, expiry=0)
    assert connack(watcher).reason_code == 0
    watcher.send(Subscribe(1, (Subscription("last/#", 0),)))
    assert type(watcher.next()).__name__ == "Suback"
    clean = Raw(n1, "short-lived", clean=True, expiry=0,
                will=Will("last/clean", b"bye", 0, False))
    assert connack(clean).reason_code == 0
    delayed = Raw(n1, "long-lived", clean=True, expiry=600,
                  will=Will("last/delayed", b"later", 0, False,
                            Properties(will_delay_interval=3)))
    assert connack(delayed).reason_code == 0
    n1.kill()
    killed = time.monotonic()
    wills = []
    deadline = killed + 20
    while time.monotonic() < deadline and len(wills) < 2:
        try:
            packet = watcher.next(timeout=1)
        except socket.timeout:
            continue
        if isinstance(packet, Publish):
            wills.append((packet.topic, time.monotonic() - killed))
    assert [topic for topic, _ in wills] == ["last/clean", "last/delayed"]
    # the delayed will waited for its Will Delay Interval (3 s after the node died)
    assert wills[1][1] >= 3
    with pytest.raises(socket.timeout):
        extra = watcher.next(timeout=2)
        raise AssertionError(f"a will was published twice: {extra!r}")
    watcher.close()


def test_session_of_a_dead_node_expires_on_the_adopting_node(
        redis_server, cluster_node_factory):
    """A parked session whose node died is adopted and expires after its Session
    Expiry Interval: its keys leave Redis."""
    n1 = cluster_node_factory(redis_server.url, node_id="gone", extra_args=FAST)
    cluster_node_factory(redis_server.url, node_id="stays", extra_args=FAST)
    client = Raw(n1, "brief", clean=True, expiry=4)
    assert connack(client).reason_code == 0
    client.send(Disconnect())
    client.close()
    key = "mqttd:{c:brief}:s"
    deadline = time.monotonic() + 30
    while redis_server.cli("HGET", key, "online").strip() != "0":
        assert time.monotonic() < deadline, "the disconnect never reached Redis"
        time.sleep(0.05)
    n1.kill()
    deadline = time.monotonic() + 20
    owners = set()
    while redis_server.cli("EXISTS", key).strip() == "1":
        owners.add(redis_server.cli("HGET", key, "node").strip())
        assert time.monotonic() < deadline, "the session never expired"
        time.sleep(0.1)
    assert "stays" in owners   # adopted first, then expired there
