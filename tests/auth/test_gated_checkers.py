"""Blocking twisted.cred checkers (``--auth unix``: crypt; ``file:``) run in the password checks' pool.

Twisted's UNIX checker calls ``crypt`` (yescrypt: tens of ms) on the calling
thread: on the reactor thread a wrong-password storm for a real account
stalled every client.  Now such checkers go through the same bounded gate as
the password file's hashes, with the same failure budget.
"""
from __future__ import annotations

from twisted.cred import credentials, error
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task
from zope.interface import implementer
from twisted.cred.checkers import ICredentialsChecker

from mqttd.auth.checkers import GatedChecker, MQTTCredentials
from mqttd.auth.gate import VerificationGate
from mqttd.auth.guard import LoginGuard, ThrottledLogin
from mqttd.auth.setup import configure
from tests.auth.gatehelpers import ManualRunner, result as _result


@implementer(ICredentialsChecker)
class BlockingChecker:
    """Stands for strcred's unix checker: answers synchronously, records its calls."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self):
        self.calls = []

    def requestAvatarId(self, creds):
        self.calls.append(creds.username)
        if creds.checkPassword("right"):
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin())


def _gated(clock, **guard_options):
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1)
    inner = BlockingChecker()
    guard = LoginGuard(clock.seconds, **guard_options)
    return GatedChecker(inner, gate, guard), inner, runner


def test_blocking_checker_runs_in_the_gate_not_on_the_calling_thread():
    """The check is handed to the gate's pool; the reactor thread only waits for its Deferred."""
    clock = task.Clock()
    checker, inner, runner = _gated(clock)
    d = checker.requestAvatarId(MQTTCredentials("root", "right", "192.0.2.1:1"))
    assert inner.calls == [] and not d.called       # nothing ran on this thread
    runner.finish()
    assert inner.calls == ["root"] and _result(d) == "root"


def test_blocking_checker_failures_count_in_the_budget():
    """Wrong passwords through a gated checker fill the failure log; over budget the failing address is refused unchecked."""
    clock = task.Clock()
    checker, inner, runner = _gated(clock, max_auth_failures=2)
    for n in range(2):
        d = checker.requestAvatarId(MQTTCredentials("root", f"guess{n}", "203.0.113.9:1"))
        runner.finish()
        assert _result(d).check(error.UnauthorizedLogin)
    refused = checker.requestAvatarId(MQTTCredentials("root", "right", "203.0.113.9:2"))
    assert _result(refused).check(ThrottledLogin) and len(inner.calls) == 2
    clean = checker.requestAvatarId(MQTTCredentials("root", "right", "198.51.100.1:1"))
    runner.finish()
    assert _result(clean) == "root"


def test_configure_gates_unix_and_file_checkers_but_not_memory(tmp_path):
    """--auth unix / file: are wrapped in the gate (sharing the password file's pool); memory: is not."""
    clock = task.Clock()
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    security = configure(clock, ["tcp:1883:interface=127.0.0.1"],
                         auth=["unix", f"file:{users}"])
    (chain,) = set(security.authenticator.portal.checkers.values())
    checkers = chain.checkers                          # two checkers: asked in turn
    assert len(checkers) == 2 and all(isinstance(c, GatedChecker) for c in checkers)
    assert security.gate is not None and checkers[0].gate is security.gate
    memory = configure(clock, ["tcp:1883:interface=127.0.0.1"], auth=["memory:bob:pw"])
    (only,) = set(memory.authenticator.portal.checkers.values())
    assert isinstance(only, InMemoryUsernamePasswordDatabaseDontUse)
    assert memory.gate is None
