"""Exactly-once QoS 2 across the cluster (REVIEW-S9-CLUSTER C2): the Redis link of
the publisher's node hangs longer than the fence while QoS 2 hand-offs are in
it; Redis applies them when the link comes back.  The publisher (a persistent
session) was disconnected without PUBREC and re-sends with DUP on another
node: the remote QoS 2 subscriber must get each message once
[MQTT-4.3.3-10, MQTT-4.3.3-11]."""
from __future__ import annotations

import socket
import time

import pytest

from mqttd.codec.packets import Publish, Pubcomp, Pubrec, Pubrel

from .mqttc import Client, wait_routed
from .tcpproxy import FreezableProxy

pytestmark = pytest.mark.slow

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2.5"]


def _connect(port, client_id, timeout=30.0, **kwargs):
    """A client that got CONNACK 0 (CONNECT retried while the node refuses)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(port, client_id, **kwargs)
        except (ConnectionError, OSError):
            assert time.monotonic() < deadline, f"{client_id}: no CONNACK 0 in {timeout} s"
            time.sleep(0.2)


def _complete(client, pid, dup=False, topic=None, payload=None, timeout=10.0):
    """Send (or re-send) a QoS 2 PUBLISH and finish its flow; raises on a timeout."""
    if topic is not None:
        client.send(Publish(topic, payload, 2, packet_id=pid, dup=dup))
    client._wait_for(Pubrec, pid, timeout)
    client.send(Pubrel(pid))
    client._wait_for(Pubcomp, pid, timeout)


def _hang_and_resend(redis_server, cluster_node_factory, tag, resend_on):
    """Publisher on node P (Redis behind a proxy), persistent QoS 2 subscriber on
    node S; the proxy freezes while messages are in flight; the publisher re-sends
    what was not PUBREC'd on ``resend_on`` ("other": S, "same": P after it came
    back).  Returns (payloads received by the subscriber, payloads sent)."""
    proxy = FreezableProxy(redis_server.port).start()
    try:
        p = cluster_node_factory(f"redis://127.0.0.1:{proxy.port}", node_id=f"{tag}-p",
                                 extra_args=FAST)
        s = cluster_node_factory(redis_server.url, node_id=f"{tag}-s", extra_args=FAST)
        sub = Client(s.port, f"{tag}-sub", level=4, clean=False)
        sub.subscribe(f"{tag}/#", 2)
        sub.subscribe("probe/route")
        pub = Client(p.port, f"{tag}-pub", level=4, clean=False)
        wait_routed(pub, sub)
        sent = []
        for i in range(3):                       # before the hang: exactly once
            payload = f"m{i}".encode()
            sent.append(payload)
            pub.send(Publish(f"{tag}/x", payload, 2, packet_id=i + 1))
            _complete(pub, i + 1)
        proxy.freeze()
        unacked = {}
        try:
            for i in range(3, 6):                # into the hung link
                payload = f"m{i}".encode()
                sent.append(payload)
                unacked[i + 1] = payload
                pub.send(Publish(f"{tag}/x", payload, 2, packet_id=i + 1))
                time.sleep(0.2)
            # the node fences: the publisher is closed without any PUBREC
            with pytest.raises((ConnectionError, OSError, socket.timeout)):
                while True:
                    packet = pub.next_packet(timeout=10)
                    assert not isinstance(packet, Pubrec), packet
            pub.sock.close()
            time.sleep(3.5)                      # P is reaped meanwhile
            if resend_on == "other":
                pub = _connect(s.port, f"{tag}-pub", level=4, clean=False)
                for pid, payload in unacked.items():
                    _complete(pub, pid, dup=True, topic=f"{tag}/x", payload=payload)
        finally:
            proxy.resume()                       # the hung hand-offs land now
        if resend_on == "same":
            pub = _connect(p.port, f"{tag}-pub", timeout=40, level=4, clean=False)
            for pid, payload in unacked.items():
                _complete(pub, pid, dup=True, topic=f"{tag}/x", payload=payload)
        got = [m.payload for m in sub.collect(len(sent), timeout=20)]
        got += [m.payload for m in sub.quiet(3.0)]
        return got, sent
    finally:
        proxy.stop()


@pytest.mark.parametrize("resend_on", ["other", "same"])
def test_qos2_resent_after_a_hung_hand_off_reaches_a_remote_subscriber_once(
        redis_server, cluster_node_factory, resend_on):
    """The hung link's late hand-off and the publisher's DUP re-send are one message."""
    got, sent = _hang_and_resend(redis_server, cluster_node_factory, f"c2{resend_on[0]}",
                                 resend_on)
    print(f"\nC2 re-send on the {resend_on} node: {len(sent)} sent, "
          f"{len(set(sent) - set(got))} lost, {len(got) - len(set(got))} duplicates")
    assert sorted(got) == sorted(sent), (got, sent)
