"""The public API re-exported from mqttd is pinned: removing a name is a breaking change."""
import mqttd


def test_public_api_is_pinned():
    """mqttd.__all__ lists exactly the documented names, all importable."""
    assert sorted(mqttd.__all__) == sorted([
        "EVENTS", "Broker", "BrokerConfig", "BrokerService", "ClientInfo", "MQTTError",
        "MQTTFactory", "Message", "Properties", "ReasonCode", "make_broker_service",
        "__version__",
    ])
    for name in mqttd.__all__:
        assert getattr(mqttd, name) is not None


def test_event_names_are_moscas():
    """The events keep the names the tutorial's mosca server printed."""
    assert set(mqttd.EVENTS) == {"clientConnected", "published", "subscribed",
                                 "unsubscribed", "clientDisconnecting",
                                 "clientDisconnected"}


def test_codec_has_no_twisted_imports():
    """Layer L0 stays sans-IO: nothing under mqttd/codec imports Twisted."""
    import pathlib
    codec = pathlib.Path(mqttd.__file__).parent / "codec"
    for path in codec.glob("*.py"):
        text = path.read_text()
        assert "import twisted" not in text and "from twisted" not in text, path
