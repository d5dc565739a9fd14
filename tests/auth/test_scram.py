"""MQTT 5 enhanced authentication with SCRAM-SHA-256 [MQTT-4.12], driven by a scramp client."""
from __future__ import annotations

import pytest
from scramp import ScramClient

from mqttd.auth.checkers import Authenticator
from mqttd.auth.passwd import make_entry
from mqttd.auth.scram import EnhancedAuthenticator, scram_mechanism
from mqttd.codec.packets import Auth, Connack, Connect, Disconnect, Properties
from tests.core.harness import FakeClient, make_broker
from tests.logcapture import logged

METHOD = "SCRAM-SHA-256"


@pytest.fixture
def broker_clock():
    return _scram_broker()


def _scram_broker(**config):
    broker, clock = make_broker(**config)
    users = {"alice": make_entry("alice", "wonderland", iterations=4096, scram=True),
             "plain": make_entry("plain", "pw", iterations=1000)}
    enhanced = EnhancedAuthenticator()
    enhanced.register(METHOD, scram_mechanism(users.get))
    broker.enhanced_authenticator = enhanced
    broker.authenticator = Authenticator(None, allow_anonymous=False)
    return broker, clock


def _auth(code, data):
    return Auth(code, Properties(authentication_method=METHOD, authentication_data=data))


def _connect(client, scram, client_id="c1"):
    client.send(Connect(5, client_id, True, 0, properties=Properties(
        authentication_method=METHOD,
        authentication_data=scram.get_client_first().encode())))
    (challenge,) = client.received()
    assert isinstance(challenge, Auth) and challenge.reason_code == 0x18
    assert challenge.properties.authentication_method == METHOD
    scram.set_server_first(challenge.properties.authentication_data.decode())
    client.send(_auth(0x18, scram.get_client_final().encode()))
    return client.received()


def test_scram_exchange_connects_and_proves_the_server(broker_clock):
    """client-first in CONNECT, AUTH 0x18 both ways, CONNACK 0 with server-final."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    scram = ScramClient([METHOD], "alice", "wonderland")
    (connack,) = _connect(client, scram)
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert connack.properties.authentication_method == METHOD
    scram.set_server_final(connack.properties.authentication_data.decode())  # verifies
    assert broker.sessions["c1"].owner == "alice"


@pytest.mark.parametrize("user,password", [("alice", "wrong"), ("nobody", "x"),
                                           ("plain", "pw")])
def test_wrong_proof_or_unknown_user_is_refused_0x86_and_closed(broker_clock, user, password):
    """A bad proof ends with CONNACK 0x86; unknown users look the same (no enumeration)."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    (connack,) = _connect(client, ScramClient([METHOD], user, password))
    assert isinstance(connack, Connack) and connack.reason_code == 0x86
    assert client.disconnecting
    assert broker.stats.refused["authentication"] == 1


def test_unknown_method_is_0x8c(broker_clock):
    """An Authentication Method the broker does not know: CONNACK 0x8C."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "c", True, 0, properties=Properties(
        authentication_method="KERBEROS")))
    (connack,) = client.received()
    assert connack.reason_code == 0x8C and client.disconnecting


def test_reauthentication_on_a_live_connection(broker_clock):
    """AUTH 0x19 restarts the exchange; success is AUTH 0x00 [MQTT-4.12.1]."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    _connect(client, ScramClient([METHOD], "alice", "wonderland"))
    again = ScramClient([METHOD], "alice", "wonderland")
    client.send(_auth(0x19, again.get_client_first().encode()))
    (challenge,) = client.received()
    assert challenge.reason_code == 0x18
    again.set_server_first(challenge.properties.authentication_data.decode())
    client.send(_auth(0x18, again.get_client_final().encode()))
    (done,) = client.received()
    assert isinstance(done, Auth) and done.reason_code == 0
    again.set_server_final(done.properties.authentication_data.decode())
    assert not client.disconnecting


def test_failed_reauthentication_disconnects_0x87(broker_clock):
    """A wrong proof on re-authentication: DISCONNECT 0x87 and close [MQTT-4.12.1-2]."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    _connect(client, ScramClient([METHOD], "alice", "wonderland"))
    again = ScramClient([METHOD], "alice", "nope")
    client.send(_auth(0x19, again.get_client_first().encode()))
    again.set_server_first(client.received()[0].properties.authentication_data.decode())
    client.send(_auth(0x18, again.get_client_final().encode()))
    (disconnect,) = client.received()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x87
    assert client.disconnecting


def test_client_that_stops_mid_exchange_is_closed_after_connect_timeout(broker_clock):
    """An unfinished AUTH exchange during CONNECT is bounded by connect_timeout."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    scram = ScramClient([METHOD], "alice", "wonderland")
    client.send(Connect(5, "c", True, 0, properties=Properties(
        authentication_method=METHOD, authentication_data=scram.get_client_first().encode())))
    assert client.received()[0].reason_code == 0x18
    clock.advance(broker.config.connect_timeout)
    assert client.disconnecting


def test_reauthentication_with_another_method_is_a_protocol_error(broker_clock):
    """The method of re-authentication must be the CONNECT's [MQTT-4.12.1-1]."""
    broker, clock = broker_clock
    client = FakeClient(broker, clock, level=5)
    _connect(client, ScramClient([METHOD], "alice", "wonderland"))
    client.send(Auth(0x19, Properties(authentication_method="OTHER")))
    assert client.received()[0].reason_code == 0x82


def test_garbage_scram_logins_log_one_rate_limited_line_each(broker_clock):
    """120 malformed client-first messages (new client id each): every one refused 0x86, at most the limiter's lines."""
    from twisted.logger import LogLevel
    broker, clock = broker_clock
    with logged(LogLevel.info) as lines:
        for i in range(120):
            client = FakeClient(broker, clock, level=5)
            client.send(Connect(5, "s%d" % i, True, 0, properties=Properties(
                authentication_method=METHOD, authentication_data=b"garbage")))
            (connack,) = client.received()
            assert connack.reason_code == 0x86
    assert broker.stats.refused == {"authentication": 120}
    assert not [e for e in lines if e.get("log_namespace") == "mqttd.auth.scram"]
    refusals = [e for e in lines if "Refused" in e.get("log_format", "")]
    assert refusals and len(lines) == len(refusals) <= 50      # the reason bound per 10 s
    assert "user not known yet" in refusals[0]["detail"]
    assert "CONNACK 0x86" in refusals[0]["detail"]


@pytest.mark.parametrize("kind", ["anonymous", "method"])
def test_a_refused_connect_is_logged_once(broker_clock, kind):
    """Each refused CONNECT writes one line (the refusal with its CONNACK code), not two."""
    from twisted.logger import LogLevel
    broker, clock = broker_clock
    with logged(LogLevel.warn) as lines:
        client = FakeClient(broker, clock, level=5)
        props = Properties(authentication_method="NOPE") if kind == "method" else Properties()
        client.send(Connect(5, "x", True, 0, properties=props))
        (connack,) = client.received()
        assert connack.reason_code in (0x86, 0x87, 0x8C)
    assert len(lines) == 1, [e["log_format"] for e in lines]
    assert "CONNACK 0x%02X" % connack.reason_code in lines[0]["detail"]


def test_publishes_pipelined_with_the_final_auth_are_rate_limited():
    """PUBLISHes read together with the AUTH that completes the login are charged (REVIEW-S10 S1)."""
    from mqttd.codec import encode
    broker, clock = _scram_broker(max_inbound_rate=10)
    sub = FakeClient(broker, clock, level=5)
    assert _connect(sub, ScramClient([METHOD], "alice", "wonderland"), "sub")[0].reason_code == 0
    sub.subscribe("t")
    client = FakeClient(broker, clock, level=5)
    scram = ScramClient([METHOD], "alice", "wonderland")
    client.send(Connect(5, "c1", True, 0, properties=Properties(
        authentication_method=METHOD,
        authentication_data=scram.get_client_first().encode())))
    (challenge,) = client.received()
    scram.set_server_first(challenge.properties.authentication_data.decode())
    tiny = bytes((0x30, 4, 0, 1, ord("t"), 0))             # v5 QoS 0 PUBLISH, no properties
    client.send_bytes(encode(_auth(0x18, scram.get_client_final().encode()), 5) + tiny * 500)
    assert client.received()[0].reason_code == 0
    assert sum(1 for p in sub.received() if p.__class__.__name__ == "Publish") == 10
    assert client.conn.input_blocked and not client.disconnecting
