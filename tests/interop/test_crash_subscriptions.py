"""Subscription deltas across SIGKILL: what was acknowledged is what comes back (REVIEW-S9 R15).

Format 5 journals a persistent session's subscriptions one filter at a time and its
reconnects without them; a broker killed right after a SUBACK/UNSUBACK restarts with
exactly the subscriptions acknowledged -- each with its granted QoS, none removed come back.
"""
from __future__ import annotations

import socket
import time

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import (
    Puback, Publish, Suback, Subscribe, Subscription, Unsuback, Unsubscribe)

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]


def _ack(client, packet, kind):
    client.send(packet)
    reply = client.next_packet()
    assert isinstance(reply, kind) and reply.packet_id == packet.packet_id, reply
    return reply


def test_subscription_changes_acknowledged_before_a_sigkill_are_restored(
        mqttd_broker_factory):
    """SUBSCRIBE, UNSUBSCRIBE, a QoS change and a reconnect, then SIGKILL: after the
    restart the session delivers to exactly the acknowledged filters, at their QoS."""
    broker = mqttd_broker_factory(persistence=None)   # the default durable store
    sub = BlockingClient(broker.port, "deltas", clean=False)
    assert _ack(sub, Subscribe(1, (Subscription("a/#", 1), Subscription("b/+", 0),
                                   Subscription("c", 2))), Suback).reason_codes == (1, 0, 2)
    _ack(sub, Unsubscribe(2, ("b/+",)), Unsuback)
    assert _ack(sub, Subscribe(3, (Subscription("c", 1),)), Suback).reason_codes == (1,)
    sub.sock.close()                                   # gone without DISCONNECT
    sub = BlockingClient(broker.port, "deltas", clean=False)
    assert sub.connack.session_present
    assert _ack(sub, Subscribe(4, (Subscription("d/1", 1),)), Suback).reason_codes == (1,)
    broker.kill()                                      # SIGKILL right after the SUBACK
    sub.sock.close()
    broker.start()
    sub = BlockingClient(broker.port, "deltas", clean=False)
    assert sub.connack.session_present
    pub = BlockingClient(broker.port, "deltas-pub")
    for n, topic in enumerate(["a/x", "b/x", "c", "d/1"], start=1):
        _ack(pub, Publish(topic, topic.encode(), 1, packet_id=n), Puback)
    pub.close()
    got = {}
    deadline = time.monotonic() + 30
    while "d/1" not in got and time.monotonic() < deadline:
        try:
            packet = sub.next_packet(timeout=10)
        except socket.timeout:
            break
        if isinstance(packet, Publish):
            got[packet.topic] = packet.qos
            if packet.qos:
                sub.send(Puback(packet.packet_id))
    sub.close()
    assert got == {"a/x": 1, "c": 1, "d/1": 1}
