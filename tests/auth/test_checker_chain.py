"""``--password-file`` together with ``--auth`` (or an embedder's checker): both are asked.

A twisted.cred Portal keeps one checker per credentials interface -- the last
registered -- so ``--password-file pw --auth memory:bob:pw`` silently ignored
the password file (nobody in it could log in).  Now the configured
``IUsernamePassword`` checkers form a :class:`CheckerChain`: the first that
accepts wins, and the failure budget counts one failure per refused login,
not one per checker (a user of the second checker is never throttled by the
first one's "unknown user").
"""
from __future__ import annotations

from twisted.cred import credentials, error
from twisted.internet import defer, task
from zope.interface import implementer
from twisted.cred.checkers import ICredentialsChecker

from mqttd.auth.checkers import (Authenticator, CheckerChain, MQTTCredentials,
                                 PasswordFileChecker)
from mqttd.auth.guard import ThrottledLogin
from mqttd.auth.passwd import update_file
from mqttd.auth.setup import configure
from mqttd.codec.packets import Connect
from tests.auth.gatehelpers import result as _result
from tests.core.harness import FakeClient, make_broker


def _passwd(tmp_path):
    path = str(tmp_path / "pw")
    update_file(path, "alice", "pw-alice", create=True, iterations=1000)
    return path


def test_password_file_and_memory_checker_both_log_in(tmp_path):
    """alice (file) and bob (memory:) both get in; a wrong password for either, or an unknown name, is 0x86."""
    clock = task.Clock()
    security = configure(clock, ["tcp:1883:interface=127.0.0.1"],
                         password_file=_passwd(tmp_path), auth=["memory:bob:pw-bob"])
    security.password_checker.gate = None            # hash inline (no thread pool in a test)
    broker, clock = make_broker()
    broker.authenticator = security.authenticator
    for user, password, code in (("alice", b"pw-alice", 0), ("bob", b"pw-bob", 0),
                                 ("alice", b"pw-bob", 0x86), ("bob", b"pw-alice", 0x86),
                                 ("nobody", b"x", 0x86)):
        client = FakeClient(broker, clock, level=5)
        client.send(Connect(5, f"c-{user}", True, 0, username=user, password=password))
        assert client.received()[0].reason_code == code, (user, password)


@implementer(ICredentialsChecker)
class Second:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def requestAvatarId(self, creds):
        if creds.username == "carol" and creds.checkPassword("pw-carol"):
            return defer.succeed("carol")
        return defer.fail(error.UnauthorizedLogin())


def _chain(tmp_path, **options):
    first = PasswordFileChecker(_passwd(tmp_path), clock=task.Clock(), **options)
    return CheckerChain([first, Second()], first.guard), first


def test_user_of_the_second_checker_is_never_throttled_by_the_first(tmp_path):
    """carol is unknown to the password file: her logins are not failures, however many."""
    chain, first = _chain(tmp_path, max_auth_failures=2)
    for n in range(5):
        creds = MQTTCredentials("carol", "pw-carol", "198.51.100.1:%d" % n)
        assert _result(chain.requestAvatarId(creds)) == "carol"
    assert first.failures.count(("user", "carol")) == 0


def test_one_refused_login_is_one_failure_and_the_budget_applies_to_the_chain(tmp_path):
    """A wrong password refused by both checkers counts once; over budget the failing address is refused unchecked."""
    chain, first = _chain(tmp_path, max_auth_failures=2)
    for n in range(2):
        refused = _result(chain.requestAvatarId(
            MQTTCredentials("carol", "guess%d" % n, "203.0.113.9:1")))
        assert refused.check(error.UnauthorizedLogin)
    assert first.failures.count(("user", "carol")) == 2
    throttled = _result(chain.requestAvatarId(
        MQTTCredentials("carol", "pw-carol", "203.0.113.9:2")))
    assert throttled.check(ThrottledLogin)
    assert _result(chain.requestAvatarId(
        MQTTCredentials("carol", "pw-carol", "198.51.100.1:1"))) == "carol"


def test_a_single_password_checker_is_not_wrapped(tmp_path):
    """Only several IUsernamePassword checkers make a chain."""
    security = configure(task.Clock(), ["tcp:1883:interface=127.0.0.1"],
                         password_file=_passwd(tmp_path))
    (only,) = set(security.authenticator.portal.checkers.values())
    assert only is security.password_checker and only.accounting
    assert isinstance(security.authenticator, Authenticator)
