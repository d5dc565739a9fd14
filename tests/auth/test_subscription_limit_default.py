"""The default per-client subscription limit (REVIEW-SEC2 N9: 200,000 subscriptions by one user
in 4.5 s, +104 MB, with no limit by default)."""
from __future__ import annotations

from mqttd.codec.packets import Suback, Subscribe, Subscription
from mqttd.config import BrokerConfig
from tests.core.harness import FakeClient, make_broker


def test_default_limit_refuses_the_subscription_after_10000():
    """10,000 filters are granted; the 10,001st gets 0x97 (v5), replacing one stays fine."""
    assert BrokerConfig().max_subscriptions_per_client == 10000
    broker, clock = make_broker()
    client = FakeClient(broker, clock, level=5)
    client.connect("many")
    for packet in range(10):
        client.send(Subscribe(packet + 1, tuple(
            Subscription(f"f/{packet}/{i}", 0) for i in range(1000))))
        (suback,) = client.received()
        assert set(suback.reason_codes) == {0}
    assert client.subscribe("f/extra", packet_id=11) == [Suback(11, (0x97,))]
    assert client.subscribe("f/3/7", qos=1, packet_id=12) == [Suback(12, (1,))]
    assert broker.stats.refused["max-subscriptions-per-client"] == 1
    assert len(broker.sessions["many"].subscriptions) == 10000
