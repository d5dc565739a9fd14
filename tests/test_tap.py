"""The twistd plugin: options, TOML config, service construction."""
import pytest
from twisted.python import usage

from mqttd import tap


def _parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_plugin_is_found_by_twistd():
    """`twistd mqttd` finds the lazy ServiceMaker in twisted/plugins."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    names = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "mqttd" in names
    assert names["mqttd"].module == "mqttd.tap" or names["mqttd"].moduleName == "mqttd.tap"


def test_port_and_listen_options_combine():
    """--port N is tcp:N; --listen is repeatable; no option means loopback tcp:1883
    (secure by default, as mosquitto 2)."""
    assert _parse()["listen"] == ["tcp:1883:interface=127.0.0.1"]
    assert _parse("--port", "1884")["listen"] == ["tcp:1884"]
    assert _parse("--listen", "tcp:1", "--listen", "unix:/tmp/x")["listen"] == ["tcp:1", "unix:/tmp/x"]


def test_toml_config_uses_the_same_keys_and_the_command_line_wins(tmp_path):
    """Every option is also a TOML key; the command line overrides the file."""
    config = tmp_path / "mqttd.toml"
    config.write_text('listen = ["tcp:0:interface=127.0.0.1"]\n'
                      'broker-id = "from-file"\n'
                      'max_queued_messages = 7\n'
                      'queue-qos0 = true\n'
                      'persistence = "memory"\n')
    options = _parse("--config", str(config), "--max-inflight", "3")
    assert options["listen"] == ["tcp:0:interface=127.0.0.1"]
    config_obj = options.broker_config()
    assert config_obj.broker_id == "from-file"
    assert config_obj.max_queued_messages == 7
    assert config_obj.max_inflight == 3
    assert config_obj.queue_qos0 is True
    assert _parse("--config", str(config), "--broker-id", "cli").broker_config().broker_id == "cli"


def test_unknown_toml_key_is_a_usage_error(tmp_path):
    """A typo in the config file is reported, not ignored."""
    config = tmp_path / "bad.toml"
    config.write_text("max_queue = 1\n")
    with pytest.raises(usage.UsageError, match="unknown key"):
        _parse("--config", str(config))


def test_publisher_pause_options_reach_the_config_and_are_checked():
    """Both reach BrokerConfig; a negative pause is a usage error."""
    options = _parse("--max-publisher-pause", "2", "--publisher-pause-recovery", "10")
    config = options.broker_config()
    assert (config.max_publisher_pause, config.publisher_pause_recovery) == (2.0, 10.0)
    with pytest.raises(usage.UsageError, match="max-publisher-pause"):
        _parse("--max-publisher-pause", "-1")


def test_bad_overflow_policy_is_a_usage_error():
    """--overflow-policy accepts only the documented values."""
    with pytest.raises(usage.UsageError):
        _parse("--overflow-policy", "drop-everything")


def test_make_service_builds_a_broker_service():
    """makeService wires the options into a BrokerService with a memory store."""
    service = tap.makeService(_parse("--persistence", "memory", "--broker-id", "x",
                                     "--listen", "tcp:0:interface=127.0.0.1"))
    assert service.broker.config.broker_id == "x"
    assert service.endpoints == ["tcp:0:interface=127.0.0.1"]
    assert service.broker.store.durable is False


def test_tcp_listeners_get_a_deep_backlog_unless_they_choose_one():
    """tcp endpoints without backlog= get 1024; others are left alone."""
    from mqttd.service import with_backlog
    assert with_backlog("tcp:1883") == "tcp:1883:backlog=1024"
    assert with_backlog("tcp:1883:backlog=10") == "tcp:1883:backlog=10"
    assert with_backlog("unix:/tmp/s") == "unix:/tmp/s"


def test_log_level_is_reloaded_only_from_a_config_file(tmp_path):
    """SIGHUP says "Reloaded log_level" only when a --config file can change it."""
    service = tap.makeService(_parse("--persistence", "memory"))
    assert "log_level" not in service._reloaders
    config = tmp_path / "mqttd.toml"
    config.write_text('log-level = "info"\n')
    service = tap.makeService(_parse("--persistence", "memory", "--config", str(config)))
    assert "log_level" in service._reloaders
    service = tap.makeService(_parse("--persistence", "memory", "--config", str(config),
                                     "--log-level", "warn"))
    assert "log_level" not in service._reloaders


def test_log_level_reload_ignores_a_broken_bridge_table(tmp_path):
    """A broken [[bridge]] at SIGHUP fails the bridges reloader only; the log level still reloads."""
    config = tmp_path / "mqttd.toml"
    config.write_text('log-level = "info"\n')
    options = _parse("--persistence", "memory", "--config", str(config))
    service = tap.makeService(options)
    config.write_text('log-level = "warn"\n[[bridge]]\nconnection = "x"\n'
                      'address = "127.0.0.1:1"\ntopic = ["# sideways 1"]\n')
    service._reloaders["log_level"]()          # does not raise for the bridge table
    assert service.log_settings.level == "warn"


def test_start_up_heap_is_frozen_out_of_full_collections():
    """CPython: the objects alive at start-up are moved out of the collector's reach, so
    the full collections of a connection storm do not walk them again (PyPy: no-op)."""
    import gc
    before = gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else 0
    try:
        frozen = tap.freeze_startup_heap()
        assert frozen == hasattr(gc, "freeze")
        if frozen:
            assert gc.get_freeze_count() > before
    finally:
        if hasattr(gc, "unfreeze"):
            gc.unfreeze()


def test_start_up_heap_is_frozen_only_in_a_broker_process(monkeypatch):
    """makeService freezes the heap under twistd (a process of its own), never when a
    test or an embedder builds the service inside a longer-lived process."""
    calls = []
    monkeypatch.setattr(tap, "freeze_startup_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(tap, "install_signal_handlers", lambda reactor, service: None)
    tap.makeService(_parse("--persistence", "memory"))
    assert calls == []
    options = _parse("--persistence", "memory")
    options.parent = {"syslog": True}
    tap.makeService(options)
    assert calls == [1]
