"""The two generic seams bridges use: the bridge bit on the server side, publish filters."""
import attrs

from mqttd.codec.packets import Connect, Publish, Puback, Will

from .harness import FakeClient, make_broker


def test_bridge_connection_subscriptions_get_no_local_and_retain_as_published():
    """A CONNECT with the bridge bit: every subscription is No Local + RAP (mosquitto's rule)."""
    broker, clock = make_broker()
    bridge = FakeClient(broker, clock)
    bridge.send(Connect(4, "edge", True, 0, bridge=True))
    bridge.received()
    bridge.subscribe("t/#", qos=1)
    sub = broker.sessions["edge"].subscriptions["t/#"]
    assert sub.no_local and sub.retain_as_published
    assert bridge.conn.info.bridge
    bridge.publish("t/1", b"mine", qos=1)
    assert bridge.received() == [Puback(1)]   # not echoed back: No Local
    other = FakeClient(broker, clock)
    other.connect("other")
    other.publish("t/2", b"kept", retain=True)
    (live,) = bridge.received()
    assert isinstance(live, Publish) and live.retain   # Retain As Published


def test_plain_clients_keep_their_subscription_options():
    """Without the bridge bit nothing is forced."""
    broker, clock = make_broker()
    client = FakeClient(broker, clock)
    client.connect("plain")
    client.subscribe("t/#", qos=1)
    sub = broker.sessions["plain"].subscriptions["t/#"]
    assert not sub.no_local and not sub.retain_as_published


def test_bridge_state_topic_is_the_one_sys_topic_clients_may_publish_and_will():
    """$SYS/broker/connection/<id>/state (bridge notifications) is accepted; other $SYS is not."""
    broker, clock = make_broker()
    bridge = FakeClient(broker, clock)
    will = Will("$SYS/broker/connection/edge/state", b"0", 1, True)
    bridge.send(Connect(4, "edge", True, 0, will=will, bridge=True))
    bridge.received()
    bridge.publish("$SYS/broker/connection/edge/state", b"1", qos=1, retain=True)
    assert broker.retained["$SYS/broker/connection/edge/state"].payload == b"1"
    bridge.publish("$SYS/broker/uptime", b"1", qos=1, packet_id=2)
    assert "$SYS/broker/uptime" not in broker.retained
    bridge.drop()
    assert broker.retained["$SYS/broker/connection/edge/state"].payload == b"0"


def test_publish_filter_can_rewrite_or_drop_messages():
    """Broker.add_publish_filter: a filter's copy is routed; None drops (still acknowledged)."""
    broker, clock = make_broker()
    seen = []
    broker.subscribe_local("#", seen.append)

    def only_even(message, client):
        if message.payload == b"odd":
            return None
        return attrs.evolve(message, payload=message.payload + b"!")
    unregister = broker.add_publish_filter(only_even)
    publisher = FakeClient(broker, clock)
    publisher.connect("p")
    publisher.publish("t", b"odd", qos=1, retain=True)
    publisher.publish("t", b"even", qos=1, packet_id=2)
    assert [m.payload for m in seen] == [b"even!"]
    assert "t" not in broker.retained
    assert publisher.received() == [Puback(1), Puback(2)]
    unregister()
    publisher.publish("t", b"odd", qos=1, packet_id=3)
    assert [m.payload for m in seen] == [b"even!", b"odd"]


def test_mqtt5_bridge_marks_itself_with_a_user_property():
    """MQTT 5 has no bridge bit: CONNECT user property mqttd-bridge marks a bridging broker."""
    from mqttd.codec.packets import Properties
    broker, clock = make_broker()
    bridge = FakeClient(broker, clock, level=5)
    bridge.connect("edge5", properties=Properties(user_properties=(("mqttd-bridge", "A"),)))
    assert bridge.conn.bridge and bridge.conn.info.bridge
    plain = FakeClient(broker, clock, level=5)
    plain.connect("plain5")
    assert not plain.conn.bridge
