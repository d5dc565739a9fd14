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


#: the broker core: the broker and the parts it is composed of, the connection and the
#: parts it is composed of, the session
CORE_MODULES = ("broker", "config", "lifecycle", "subscriptions", "routing", "delivery",
                "retaining", "durability", "connection", "connstate", "connecting",
                "publishing", "subscribing", "inflow", "outbound", "session")
#: feature packages: they plug into the core's seams and events, never the reverse
FEATURE_PACKAGES = ("mqttd.cluster", "mqttd.bridge", "mqttd.auth", "mqttd.transports",
                    "mqttd.admin")


def test_core_never_imports_a_feature_package():
    """Features plug into the core, not the reverse (docs/architecture.rst): an
    import of a feature package from the core, even inside a function, fails here."""
    import ast
    import pathlib
    root = pathlib.Path(mqttd.__file__).parent
    for name in CORE_MODULES:
        path = root / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for module in imported:
                assert not module.startswith(FEATURE_PACKAGES), \
                    f"{path.name}:{node.lineno} imports {module}"


def test_broker_module_keeps_its_import_surface():
    """Everything embedders and features imported from mqttd.broker before it was
    split into modules along its seams is still importable from there."""
    from mqttd import broker
    for name in ("Broker", "BrokerConfig", "ClientInfo", "EVENTS", "SKIP_SHARES",
                 "ONLY_SHARES", "SHUTDOWN_FLUSH_TIMEOUT", "LocalSubscription",
                 "MAX_PACKET_SIZE", "MIN_PACKET_SIZE", "NEVER_EXPIRES",
                 "with_subscription_ids", "with_user_properties"):
        assert hasattr(broker, name), name


def test_connection_module_keeps_its_import_surface():
    """Everything features, tests and benchmarks imported from mqttd.connection before
    it was split into modules along its seams is still importable from there."""
    from mqttd import connection
    for name in ("ClientConnection", "BRIDGE_PROPERTY", "FILTERS_PER_TURN", "template_key",
                 "log", "_CONNECTING", "_CONNECTED", "_CLOSED", "_peer_host", "_InboundAck",
                 "_Refused", "_ACK_FIRST_BYTE", "_OPTIONAL_PROPERTIES", "_CONNACK_DEFAULTS",
                 "_NO_HANDLERS", "_PACKETS"):
        assert hasattr(connection, name), name
    assert connection.__all__ == ["ClientConnection"]


def test_connection_parts_keep_the_instance_slotted():
    """Every part ClientConnection is composed of declares empty __slots__: the
    instance keeps its one slot table and gets no __dict__ of its own until a rare
    attribute is set (the memory of an idle connection, docs/architecture.rst)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from mqttd.broker import Broker, BrokerConfig
    from mqttd.connection import ClientConnection
    parts = ClientConnection.__mro__[1:-1]
    assert len(parts) >= 5
    for part in parts:
        assert part.__dict__.get("__slots__") == (), part
    clock = Clock()
    conn = ClientConnection(Broker(clock, None, BrokerConfig()), StringTransport(), clock,
                            "127.0.0.1:1")
    assert conn.__dict__ == {}
    # a rare attribute lands in the instance dict, not in a new slot of a part
    conn.over_listener_limit = 3
    assert conn.__dict__ == {"over_listener_limit": 3}


def test_hypothesis_runs_without_deadlines_and_with_bounded_examples():
    """tests/conftest.py's profile: a loaded CI machine never fails a property test on
    time, and no test runs an unbounded number of examples."""
    from hypothesis import settings
    assert settings.default.deadline is None
    assert 0 < settings.default.max_examples <= 1000
