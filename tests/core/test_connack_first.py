"""No DISCONNECT before a CONNACK: a connection closed by the server while its
CONNACK still waits (for the store, or a cluster claim) is refused with
CONNACK 0x88 / v3 0x03 [MQTT-3.2.0-1, MQTT-3.14.0-1] (REVIEW-CLUSTER F2)."""
from __future__ import annotations

import pytest

from mqttd.codec.packets import Connack, Connect, Disconnect, Properties

from core.harness import FakeClient, make_broker
from core.test_connection import SlowStore


def _waiting_connect(level):
    store = SlowStore()
    broker, clock = make_broker(store=store)
    client = FakeClient(broker, clock, level=level)
    client.send(Connect(level, "twice", False, 0,
                        properties=Properties(session_expiry_interval=600)
                        if level == 5 else Properties()))
    clock.advance(0)
    assert client.received() == []   # the CONNACK waits for the stored session
    return broker, clock, store, client


@pytest.mark.parametrize("level, code", [(5, 0x88), (4, 0x03)])
def test_session_taken_over_elsewhere_before_its_connack_is_refused_by_connack(level, code):
    """The loser of two simultaneous CONNECTs on two cluster nodes (its session released
    before its CONNACK went out) gets CONNACK 0x88 (v3 0x03), never DISCONNECT 0x8E."""
    broker, clock, store, client = _waiting_connect(level)
    broker.release_session("twice")
    store.fire()
    clock.advance(0)
    packets = client.received()
    assert [type(p) for p in packets] == [Connack]
    assert packets[0].reason_code == code and not packets[0].session_present
    assert client.conn.transport.disconnecting


def test_takeover_on_one_node_before_the_first_connack_refuses_the_first():
    """A second CONNECT of the client id before the first one's CONNACK: the first
    connection gets CONNACK 0x88 and is closed; the second gets CONNACK 0x00."""
    broker, clock, store, first = _waiting_connect(5)
    second = FakeClient(broker, clock, level=5)
    second.send(Connect(5, "twice", False, 0,
                        properties=Properties(session_expiry_interval=600)))
    for _ in range(5):
        clock.advance(0)
        store.fire()
    packets = first.received()
    assert [type(p) for p in packets] == [Connack] and packets[0].reason_code == 0x88
    assert not [p for p in packets if isinstance(p, Disconnect)]
    answer = second.received()
    assert isinstance(answer[0], Connack) and answer[0].reason_code == 0
