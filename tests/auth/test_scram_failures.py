"""SCRAM-SHA-256 logins share the password path's failure budget (REVIEW-SEC2 N15).

Before, 300 wrong SCRAM proofs from one address were answered in 0.2 s and
never throttled: the salt and iteration count are public, so the broker was
an online oracle for an offline precomputation.  Now a wrong proof counts in
the same per-name/per-address failure log as a wrong plain password; over
the budget, a failing address's client-first is answered 0x86 at once,
without a challenge.
"""
from __future__ import annotations

import pytest
from scramp import ScramClient

from mqttd.auth.checkers import (Authenticator, MQTTCredentials, PasswordFileChecker,
                                 make_portal)
from mqttd.auth.passwd import update_file
from mqttd.auth.scram import EnhancedAuthenticator, scram_mechanism
from mqttd.codec.packets import Auth, Connack, Connect, Properties
from tests.auth.gatehelpers import result as _result
from tests.core.harness import FakeClient, make_broker

METHOD = "SCRAM-SHA-256"


@pytest.fixture
def setup(tmp_path):
    path = str(tmp_path / "pw")
    update_file(path, "sc", "right", create=True, iterations=4096, scram=True)
    update_file(path, "plain", "pw-plain", iterations=1000)
    broker, clock = make_broker()
    checker = PasswordFileChecker(path, clock=clock, max_auth_failures=5)
    enhanced = EnhancedAuthenticator()
    enhanced.register(METHOD, scram_mechanism(checker.scram_lookup, checker.secret,
                                              checker.scram_shape, guard=checker.guard))
    broker.enhanced_authenticator = enhanced
    broker.authenticator = Authenticator(make_portal([checker]), allow_anonymous=False)
    return broker, clock, checker


def _client(broker, clock, peer):
    client = FakeClient(broker, clock, level=5)
    client.conn.peer = peer
    return client


def _scram_login(broker, clock, user, password, peer, client_id="c"):
    """The CONNACK (or the first answer) of a SCRAM login from ``peer``."""
    client = _client(broker, clock, peer)
    scram = ScramClient([METHOD], user, password)
    client.send(Connect(5, client_id, True, 0, properties=Properties(
        authentication_method=METHOD, authentication_data=scram.get_client_first().encode())))
    (answer,) = client.received()
    if isinstance(answer, Connack):
        return answer
    scram.set_server_first(answer.properties.authentication_data.decode())
    client.send(Auth(0x18, Properties(authentication_method=METHOD,
                                      authentication_data=scram.get_client_final().encode())))
    (connack,) = client.received()
    return connack


def _warnings(log_events):
    return [e for e in log_events if "failed logins for user name" in e.get("log_format", "")]


def test_wrong_scram_proofs_count_and_trip_the_budget(setup, log_events):
    """Five wrong proofs from one address: one WARN line, then that address is answered 0x86 without a challenge."""
    broker, clock, checker = setup
    for n in range(5):
        assert _scram_login(broker, clock, "sc", f"guess{n}", "203.0.113.9:%d" % n).reason_code == 0x86
    assert checker.failures.count(("user", "sc")) == 5
    assert len(_warnings(log_events)) == 1
    client = _client(broker, clock, "203.0.113.9:99")
    scram = ScramClient([METHOD], "sc", "right")     # even the right password
    client.send(Connect(5, "c", True, 0, properties=Properties(
        authentication_method=METHOD, authentication_data=scram.get_client_first().encode())))
    (answer,) = client.received()
    assert isinstance(answer, Connack) and answer.reason_code == 0x86   # no AUTH challenge
    assert checker.throttled == 1
    assert client.disconnecting


def test_real_user_still_logs_in_with_scram_from_a_clean_address(setup):
    """The budget refuses failing addresses only: the owner of the name is not locked out."""
    broker, clock, checker = setup
    for n in range(6):
        _scram_login(broker, clock, "sc", f"guess{n}", "203.0.113.9:%d" % n)
    connack = _scram_login(broker, clock, "sc", "right", "198.51.100.4:1")
    assert connack.reason_code == 0 and broker.sessions["c"].owner == "sc"


def test_scram_and_plain_failures_share_one_budget(setup):
    """Three wrong plain passwords and two wrong proofs: the name is over budget for both ways in."""
    broker, clock, checker = setup
    for n in range(3):
        d = checker.requestAvatarId(MQTTCredentials("sc", f"plain-guess{n}", "203.0.113.9:1"))
        d.addErrback(lambda f: None)
    for n in range(2):
        assert _scram_login(broker, clock, "sc", f"guess{n}", "203.0.113.9:2").reason_code == 0x86
    assert checker.failures.count(("user", "sc")) == 5
    # plain CONNECT from the failing address: refused unhashed, as a wrong password
    plain = _client(broker, clock, "203.0.113.9:3")
    plain.send(Connect(5, "p", True, 0, username="sc", password=b"right"))
    assert plain.received()[0].reason_code == 0x86
    assert checker.throttled == 1
    assert _scram_login(broker, clock, "sc", "right", "203.0.113.9:4").reason_code == 0x86
    assert checker.throttled == 2


def test_unknown_names_count_as_failures_too(setup):
    """Guessing user names over SCRAM fills the failure log like guessing them in plain CONNECTs."""
    broker, clock, checker = setup
    assert _scram_login(broker, clock, "nobody", "x", "203.0.113.9:1").reason_code == 0x86
    assert checker.failures.count(("user", "nobody")) == 1
    assert checker.failures.count(("host", "203.0.113.9")) == 1


def test_scram_success_makes_the_address_known_for_the_plain_path(setup):
    """A SCRAM login's address is known to be good for the name: its plain check goes first while the name is attacked."""
    broker, clock, checker = setup
    assert _scram_login(broker, clock, "sc", "right", "198.51.100.4:1").reason_code == 0
    _scram_login(broker, clock, "sc", "guess", "203.0.113.9:1")
    guard = checker.guard
    assert guard.judge("sc", "198.51.100.4:7").priority == 0
    assert guard.judge("sc", "198.51.100.5:7").priority == 1
    assert _result(checker.requestAvatarId(
        MQTTCredentials("sc", "right", "198.51.100.4:8"))) == "sc"
