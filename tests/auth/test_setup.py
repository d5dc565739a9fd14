"""Composing security from options: anonymous policy, listener limits, tap options."""
from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mqttd import tap
from mqttd.auth.checkers import Authenticator
from mqttd.auth.passwd import update_file
from mqttd.auth.setup import anonymous_policy, configure, is_loopback_endpoint
from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connect
from mqttd.hooks import AuthRequest
from mqttd.protocol import MQTTFactory
from tests.core.harness import make_broker


@pytest.mark.parametrize("description,loopback", [
    ("tcp:1883:interface=127.0.0.1", True), ("tcp:0:interface=127.0.0.2", True),
    ("tcp6:1883:interface=\\:\\:1", True), ("unix:/run/mqttd.sock", True),
    ("tcp:1883", False), ("tcp:1883:interface=0.0.0.0", False),
    ("tcp:1883:interface=192.168.1.5", False), ("ssl:8883:privateKey=k.pem", False),
    # a proxy on loopback forwards other hosts' clients: not loopback-only
    ("haproxy:tcp:1883:interface=127.0.0.1", False),
    ("ws:8080:interface=127.0.0.1:trustXForwardedFor=1", False),
    ("ws:8080:interface=127.0.0.1:trustXForwardedFor=0", True),
    # a repeated key: decided as Twisted binds it, on the last value (REVIEW-SEC S3)
    ("tcp:1883:interface=127.0.0.1:interface=0.0.0.0", False),
    ("tcp:1883:interface=0.0.0.0:interface=127.0.0.1", True),
    ("ws:8080:interface=127.0.0.1:trustXForwardedFor=0:trustXForwardedFor=2", False),
    ("tcp:1883:interface=127.0.0.1:interface=", False),
])
def test_loopback_listeners_are_recognised(description, loopback):
    """Only loopback addresses and UNIX sockets count as local; no interface= is all."""
    assert is_loopback_endpoint(description) is loopback


def test_anonymous_policy_follows_mosquitto_2():
    """Loopback only and no authentication: in; authentication or exposure: out; flag: in."""
    local = ["tcp:1883:interface=127.0.0.1"]
    assert anonymous_policy(local, False, None)[0] is True
    assert anonymous_policy(local, True, None) == (
        False, "authentication is configured (use --allow-anonymous to let them in)")
    allowed, why = anonymous_policy(local + ["tcp:8883"], False, None)
    assert not allowed and "tcp:8883" in why
    assert anonymous_policy(["tcp:1883"], True, True)[0] is True


def test_configure_with_memory_checker_and_exposed_listener(tmp_path):
    """strcred memory checker logs users in; anonymous refused because of the listener."""
    security = configure(None, ["tcp:1883"], auth=["memory:ann:pw"])
    assert not security.allow_anonymous
    results = []
    security.authenticator.authenticate(
        AuthRequest("c", "ann", b"pw", None, 4)).addBoth(results.append)
    security.authenticator.authenticate(
        AuthRequest("c", "ann", b"no", None, 4)).addBoth(results.append)
    assert results == ["ann", 0x86]
    assert security.authenticator.authenticate(AuthRequest("c", None, None, None, 4)) == 0x87


def test_tap_options_build_the_security_of_the_service(tmp_path):
    """--password-file, --acl-file, --allow-anonymous, --listener-max-connections reach the broker."""
    pw = tmp_path / "pw"
    update_file(str(pw), "u", "p", create=True, iterations=1000)
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n")
    options = tap.Options()
    options.parseOptions(["--persistence", "memory", "--password-file", str(pw),
                          "--acl-file", str(acl), "--allow-anonymous",
                          "--listen", "tcp:0:interface=127.0.0.1",
                          "--listener-max-connections", "tcp:0:interface=127.0.0.1=5",
                          "--max-connections", "100", "--max-topic-levels", "8"])
    service = tap.makeService(options)
    broker = service.broker
    assert isinstance(broker.authenticator, Authenticator)
    assert broker.authenticator.allow_anonymous
    assert broker.authorize_forward is not None
    assert broker.enhanced_authenticator.mechanisms.keys() == {"SCRAM-SHA-256"}
    assert set(service._reloaders) >= {"password_file", "acl_file"}
    assert service.listener_max_connections == {"tcp:0:interface=127.0.0.1": 5}
    assert broker.config.max_connections == 100 and broker.config.max_topic_levels == 8


@pytest.mark.parametrize("args", [
    ["--password-file", "/nonexistent/pw"], ["--acl-file", "/nonexistent/acl"],
    ["--auth", "nosuchchecker"], ["--listener-max-connections", "tcp:1883"],
    ["--max-connections", "-1"],
])
def test_bad_security_options_are_one_line_usage_errors(args):
    """A missing file or a malformed value stops the broker before it starts."""
    with pytest.raises(tap.usage.UsageError):
        tap.Options().parseOptions(["--persistence", "memory", *args])


@pytest.mark.parametrize("option", ["--listen", "--metrics-listen", "--admin-listen"])
def test_repeated_endpoint_option_is_refused_at_startup(option):
    """tcp:1883:interface=127.0.0.1:interface=0.0.0.0 binds 0.0.0.0 in Twisted: refused, one line naming the key."""
    with pytest.raises(tap.usage.UsageError, match="interface= more than once"):
        tap.Options().parseOptions(["--persistence", "memory", option,
                                    "tcp:1883:interface=127.0.0.1:interface=0.0.0.0"])


def test_admin_listener_interface_is_read_as_twisted_binds_it():
    """The admin API's loopback check uses the last interface= too."""
    from mqttd.admin.service import endpoint_interface
    assert endpoint_interface("tcp:8080:interface=127.0.0.1:interface=0.0.0.0") == "0.0.0.0"
    assert endpoint_interface("tcp6:8080:interface=\\:\\:1") == "::1"
    assert endpoint_interface("unix:/run/a.sock") == "unix"


def test_listener_limit_closes_sockets_beyond_it_at_accept():
    """A factory with max_connections closes the extra sockets at accept: no slot held until a CONNECT (REVIEW-SEC S6)."""
    broker, _clock = make_broker()
    factory = MQTTFactory(broker, clock=MemoryReactorClock(), max_connections=1)
    transports = []
    for level in (4, 5, 4):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(encode(Connect(level, f"c{len(transports)}", True, 0), level))
        transports.append((transport, level))
    (first, _), *others = transports
    assert PacketReader(level=4).feed(first.value())[0].reason_code == 0
    assert all(t.disconnecting and t.value() == b"" for t, _level in others)
    assert broker.stats.refused["max-connections"] == 2
    assert not [c for c in broker.sessions if c != "c0"]
