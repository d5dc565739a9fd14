"""The MQTT 5 feature options of ``twistd mqttd`` (tap.py) reach BrokerConfig."""
from __future__ import annotations

import pytest
from twisted.python import usage

from mqttd import tap


def _parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_feature_options_reach_the_broker_config():
    """Every new option maps onto its BrokerConfig field."""
    config = _parse("--shared-subscription-strategy", "sticky", "--max-topic-alias", "20",
                    "--max-inflight-incoming", "50", "--max-qos", "1",
                    "--retain-available", "false",
                    "--response-information", "replies/").broker_config()
    assert config.shared_subscription_strategy == "sticky"
    assert config.max_topic_alias == 20
    assert config.max_inflight_incoming == 50
    assert config.max_qos == 1
    assert config.retain_available is False
    assert config.response_information == "replies/"


def test_feature_defaults():
    """Without options: round-robin, 10 aliases, Receive Maximum 65535, QoS 2, retain on."""
    config = _parse().broker_config()
    assert (config.shared_subscription_strategy, config.max_topic_alias,
            config.max_inflight_incoming, config.max_qos, config.retain_available,
            config.response_information) == ("round-robin", 10, 65535, 2, True, None)


def test_feature_options_from_toml(tmp_path):
    """The same keys work in the TOML file, booleans as TOML booleans."""
    path = tmp_path / "mqttd.toml"
    path.write_text('retain_available = false\nmax-qos = 0\n'
                    'shared_subscription_strategy = "hash-topic"\n')
    config = _parse("--config", str(path)).broker_config()
    assert (config.retain_available, config.max_qos,
            config.shared_subscription_strategy) == (False, 0, "hash-topic")


@pytest.mark.parametrize("argv", [
    ("--shared-subscription-strategy", "fastest"),
    ("--max-qos", "3"),
    ("--max-topic-alias", "70000"),
    ("--max-inflight-incoming", "0"),
    ("--retain-available", "maybe"),
])
def test_bad_feature_option_values_are_usage_errors(argv):
    """Out-of-range or unknown values are refused before the broker starts."""
    with pytest.raises(usage.UsageError):
        _parse(*argv)


@pytest.mark.parametrize("asked, granted", [(3600, 60), (0xFFFFFFFF, 60), (30, None), (60, None)])
def test_capped_session_expiry_is_told_in_the_connack(asked, granted):
    """--max-session-expiry: the CONNACK carries the Session Expiry Interval used when it is not the client's [MQTT-3.2.2.3.2]."""
    from mqttd.codec.packets import Connack, Connect, Properties
    from tests.core.harness import FakeClient, make_broker
    broker, clock = make_broker(max_session_expiry=60)
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "se", False, 0,
                        properties=Properties(session_expiry_interval=asked)))
    (connack,) = [p for p in client.received() if isinstance(p, Connack)]
    assert connack.reason_code == 0
    assert connack.properties.session_expiry_interval == granted


@pytest.mark.parametrize("on_disconnect", [0xFFFFFFFF, 61, 3600])
def test_max_session_expiry_caps_the_disconnect_interval_too(on_disconnect):
    """A DISCONNECT may change the Session Expiry Interval (MQTT 5.0 §3.14.2.2.2), not past
    --max-session-expiry: CONNECT with 2 s then DISCONNECT with 0xFFFFFFFF made a session that
    never expired (REVIEW-S9 R16)."""
    from mqttd.codec.packets import Connect, Disconnect, Properties
    from tests.core.harness import FakeClient, make_broker
    broker, clock = make_broker(max_session_expiry=60)
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "se", False, 0, properties=Properties(session_expiry_interval=2)))
    client.received()
    client.send(Disconnect(properties=Properties(session_expiry_interval=on_disconnect)))
    assert broker.sessions["se"].expiry_interval == 60
    clock.advance(59)
    assert "se" in broker.sessions
    clock.advance(2)
    assert "se" not in broker.sessions
