"""Durability of acknowledged messages across SIGKILL and graceful restarts.

A persistent QoS 1 subscriber registers and leaves; a publisher streams
thousands of QoS 1 messages with a window of 100; the broker is killed (or
stopped) mid-stream and started again on the same data directory; the
subscriber comes back: every message whose PUBACK the publisher received must
be delivered [issue "Durable storage", item 4: acknowledge only what is safe].
"""
from __future__ import annotations

import socket
import time

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec import encode
from mqttd.codec.packets import Puback, Publish, Suback, Subscribe, Subscription

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]

TOTAL = 5000
WINDOW = 100


def register_subscriber(port):
    sub = BlockingClient(port, "crash-sub", clean=False)
    sub.sock.sendall(encode(Subscribe(1, (Subscription("crash/t", 1),)), 4))
    assert sub.next_packet() == Suback(1, (1,))
    sub.close()


def publish_retained(port, count):
    """``count`` retained QoS 1 messages on crash/r/<n>, each acknowledged."""
    pub = BlockingClient(port, "crash-retain")
    for n in range(count):
        pub.send(Publish(f"crash/r/{n}", b"kept %d" % n, 1, retain=True, packet_id=n + 1))
        assert pub.next_packet() == Puback(n + 1)
    pub.close()


def retained_after_restart(port, count):
    sub = BlockingClient(port, "crash-retained-check")
    sub.send(Subscribe(1, (Subscription("crash/r/#", 0),)))
    got = {}
    deadline = time.monotonic() + 30
    while len(got) < count and time.monotonic() < deadline:
        packet = sub.next_packet(timeout=10)
        if isinstance(packet, Publish):
            assert packet.retain
            got[packet.topic] = packet.payload
    sub.close()
    return got


def stream_until(port, interrupt_after, interrupt):
    """Publish up to TOTAL QoS 1 messages; call interrupt() after that many PUBACKs.

    Returns the set of payload numbers whose PUBACK arrived.
    """
    pub = BlockingClient(port, "crash-pub")
    acked, sent, unacked = set(), 0, {}
    interrupted = False
    deadline = time.monotonic() + 60
    try:
        while len(acked) < TOTAL and time.monotonic() < deadline:
            batch = []
            while sent < TOTAL and len(unacked) < WINDOW:
                pid = sent % 65535 + 1
                unacked[pid] = sent
                batch.append(encode(Publish("crash/t", b"%d" % sent, 1, packet_id=pid), 4))
                sent += 1
            if batch:
                pub.sock.sendall(b"".join(batch))
            packet = pub.next_packet()
            if isinstance(packet, Puback):
                acked.add(unacked.pop(packet.packet_id))
            if not interrupted and len(acked) >= interrupt_after:
                interrupted = True
                interrupt()
    except (ConnectionError, OSError):
        pass  # the broker went away mid-stream
    finally:
        pub.sock.close()
    assert interrupted, "the stream ended before the broker was interrupted"
    return acked


def drain_subscriber(port, expected):
    sub = BlockingClient(port, "crash-sub", clean=False)
    assert sub.connack.session_present
    got = set()
    deadline = time.monotonic() + 60
    while not expected <= got and time.monotonic() < deadline:
        try:
            packet = sub.next_packet(timeout=5)
        except socket.timeout:
            break
        if isinstance(packet, Publish):
            got.add(int(packet.payload))
            sub.sock.sendall(encode(Puback(packet.packet_id), 4))
    sub.close()
    return got


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_every_acknowledged_message_survives_a_broker_crash(mqttd_broker_factory, how):
    """SIGKILL (or SIGTERM) mid-stream, restart: every PUBACKed message reaches the subscriber."""
    broker = mqttd_broker_factory(persistence=None)   # the default durable store
    register_subscriber(broker.port)
    publish_retained(broker.port, 20)
    stop = broker.kill if how == "sigkill" else broker.stop
    acked = stream_until(broker.port, interrupt_after=TOTAL // 3, interrupt=stop)
    assert TOTAL // 3 <= len(acked) < TOTAL
    broker.start()
    got = drain_subscriber(broker.port, acked)
    missing = acked - got
    print(f"{how}: acked {len(acked)}, delivered after restart {len(got)}, "
          f"missing {len(missing)}")
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:10]}"
    retained = retained_after_restart(broker.port, 20)
    assert retained == {f"crash/r/{n}": b"kept %d" % n for n in range(20)}
