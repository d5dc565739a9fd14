"""The public API re-exported from mqttd is pinned: removing a name is a breaking change."""
import mqttd


def test_public_api_is_pinned():
    """mqttd.__all__ lists exactly the documented names, all importable."""
    assert sorted(mqttd.__all__) == sorted([
        "EVENTS", "Broker", "BrokerConfig", "BrokerService", "ClientInfo", "ClientSummary",
        "MQTTError", "MQTTFactory", "Message", "Properties", "ReasonCode",
        "SubscriptionSummary", "make_broker_service", "store_from_spec", "__version__",
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


def test_package_ships_py_typed():
    """PEP 561: type checkers use mqttd's annotations (py.typed is package data)."""
    import configparser
    import pathlib
    root = pathlib.Path(mqttd.__file__).parent
    assert (root / "py.typed").exists()
    config = configparser.ConfigParser()
    config.read(root.parent / "setup.cfg")
    assert "py.typed" in config["options.package_data"]["mqttd"]
    assert "static/*" in config["options.package_data"]["mqttd.admin"]
