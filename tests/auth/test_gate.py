"""Password hashing costs the same for every user name and is bounded (REVIEW finding 24).

The mechanisms, not timings: the dummy verification of unknown users, the
stable made-up SCRAM challenge shaped like real ones, and the
:class:`VerificationGate`'s caps, queue, turns and timeouts (``task.Clock``
and a runner whose Deferreds the test fires).
"""
from __future__ import annotations

import threading

import pytest
import pytest_twisted
from scramp import ScramClient
from twisted.cred import error
from twisted.internet import defer, reactor, task

from mqttd.auth.checkers import (Authenticator, MQTTCredentials, PasswordFileChecker,
                                 ThrottledLogin, make_portal, uniform_verify)
from mqttd.auth.gate import VerificationBusy, VerificationGate, peer_host
from mqttd.auth.passwd import make_entry, update_file
from mqttd.auth.scram import EnhancedAuthenticator, scram_mechanism
from mqttd.codec.packets import Auth, Connack, Connect, Properties
from mqttd.hooks import AuthRequest
from tests.core.harness import FakeClient, make_broker
from tests.auth.gatehelpers import ManualRunner, result as _result

METHOD = "SCRAM-SHA-256"


def _write(path, *users, iterations=1000, scram=False):
    for index, user in enumerate(users):
        update_file(path, user, "pw-" + user, create=index == 0, iterations=iterations,
                    scram=scram)


# --- the same work for unknown users -------------------------------------------------


def test_unknown_user_costs_a_dummy_verification_with_the_files_parameters(tmp_path):
    """An unknown user's password is hashed against a dummy entry shaped like the real ones, then refused."""
    path = str(tmp_path / "pw")
    _write(path, "alice", "bob", iterations=2000)
    runner = ManualRunner()
    checker = PasswordFileChecker(path, gate=VerificationGate(task.Clock(), run=runner))
    d = checker.requestAvatarId(MQTTCredentials("nosuchuser", "pw", "192.0.2.1:1000"))
    assert not d.called  # it waits for the hash, as a known user's check does
    ((fn, args, _),) = runner.calls
    assert fn is uniform_verify and args == (checker.dummy, b"pw", checker.profile)
    real = checker.users["alice"]
    dummy = checker.dummy
    assert (dummy.kind, dummy.iterations, len(dummy.salt), len(dummy.digest)) == \
        (real.kind, real.iterations, len(real.salt), len(real.digest))
    runner.finish()
    assert _result(d).check(error.UnauthorizedLogin)


def test_a_known_user_with_a_wrong_password_takes_the_same_road(tmp_path):
    """Known user, wrong password: one verification through the same gate, refused the same way."""
    path = str(tmp_path / "pw")
    _write(path, "alice")
    runner = ManualRunner()
    checker = PasswordFileChecker(path, gate=VerificationGate(task.Clock(), run=runner))
    d = checker.requestAvatarId(MQTTCredentials("alice", "wrong", "192.0.2.1:1000"))
    ((fn, args, _),) = runner.calls
    assert fn is uniform_verify and args[0] is checker.users["alice"]
    runner.finish()
    assert _result(d).check(error.UnauthorizedLogin)


def test_dummy_entry_follows_the_most_expensive_entry_and_reload(tmp_path):
    """The dummy mimics the file's costliest hash kind and iterations (not the most common), also after SIGHUP."""
    path = str(tmp_path / "pw")
    _write(path, "a", "b", iterations=1500)
    with open(path, "a") as f:
        f.write(make_entry("c", "x", iterations=4096, scram=True).line() + "\n")
    checker = PasswordFileChecker(path)
    assert (checker.dummy.kind, checker.dummy.iterations) == ("scram-sha-256", 4096)
    _write(path, "s1", "s2", iterations=5000, scram=True)
    checker.reload()
    assert (checker.dummy.kind, checker.dummy.iterations) == ("scram-sha-256", 5000)
    assert len(checker.dummy.server_key) == 32


# --- the gate ------------------------------------------------------------------------


def test_gate_caps_concurrent_checks_overall_and_queues_the_rest():
    """No more than max_concurrent checks run at once; the next starts when one ends."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=2, per_peer=1)
    results = [gate.submit(f"192.0.2.{i}:1", lambda i=i: i) for i in range(5)]
    assert len(runner.calls) == 2 and (gate.running, gate.waiting) == (2, 3)
    runner.finish()
    assert len(runner.calls) == 2 and (gate.running, gate.waiting) == (2, 2)
    while runner.calls:
        runner.finish()
    assert [_result(d) for d in results] == [0, 1, 2, 3, 4]
    assert (gate.running, gate.waiting, gate.started) == (0, 0, 5)


def test_gate_caps_one_peer_and_refuses_its_excess_at_once():
    """One address runs per_peer checks, queues per_peer_waiting, and is refused beyond (0x9F)."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=4, per_peer=1,
                            per_peer_waiting=2)
    attacker = [gate.submit("203.0.113.7:%d" % port, lambda: False) for port in range(100)]
    assert len(runner.calls) == 1 and gate.waiting == 2
    refused = [d for d in attacker if d.called]
    assert len(refused) == 97 and all(_result(d).check(VerificationBusy) for d in refused)
    assert gate.refused == 97
    # another address is not held up by the first one's queue
    other = gate.submit("198.51.100.1:5", lambda: True)
    assert len(runner.calls) == 2
    runner.finish(1)
    assert _result(other) is True


def test_gate_bounds_the_overall_queue():
    """Beyond max_waiting queued checks (any peers) a check is refused at once."""
    gate = VerificationGate(task.Clock(), run=ManualRunner(), max_concurrent=1,
                            max_waiting=3)
    pending = [gate.submit(f"192.0.2.{i}:1", lambda: True) for i in range(10)]
    assert gate.running == 1 and gate.waiting == 3
    refused = [d for d in pending if d.called]
    assert len(refused) == 6 == gate.refused
    assert all(_result(d).check(VerificationBusy) for d in refused)


def test_peers_take_turns_in_the_queue():
    """A peer with many waiting checks does not push another peer's login to the back."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=1, per_peer=1,
                            per_peer_waiting=10)
    order = []
    for tag in ["a1", "a2", "a3", "a4"]:
        gate.submit("203.0.113.7:1", lambda tag=tag: order.append(tag))
    gate.submit("198.51.100.1:1", lambda: order.append("b1"))
    while runner.calls:
        runner.finish()
    assert order == ["a1", "a2", "b1", "a3", "a4"]


def test_a_check_waiting_too_long_is_refused_with_connection_rate_exceeded():
    """After max_wait seconds in the queue the check is refused (VerificationBusy), never run."""
    clock = task.Clock()
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1, max_wait=5)
    gate.submit("192.0.2.1:1", lambda: True)
    late = gate.submit("192.0.2.2:1", lambda: True)
    clock.advance(4.9)
    assert not late.called
    clock.advance(0.2)
    assert _result(late).check(VerificationBusy)
    assert (gate.expired, gate.waiting) == (1, 0)
    runner.finish()
    assert runner.calls == [] and gate.running == 0


def test_cancelling_a_waiting_check_frees_its_place():
    """The hook timeout cancels the Deferred: the check leaves the queue and never runs."""
    clock = task.Clock()
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1)
    gate.submit("192.0.2.1:1", lambda: True)
    waiting = gate.submit("192.0.2.2:1", lambda: True)
    waiting.cancel()
    assert _result(waiting).check(defer.CancelledError)
    assert (gate.waiting, gate.cancelled) == (0, 1)
    assert len(clock.getDelayedCalls()) == 1   # only the running check's deadline
    runner.finish()
    assert clock.getDelayedCalls() == []
    assert runner.calls == []


def test_peer_host_drops_the_port():
    """Limits are per address, whatever the client's source port."""
    assert peer_host("203.0.113.7:5000") == "203.0.113.7"
    assert peer_host("::1:5000") == "::1"
    assert peer_host(None) == "-"
    assert peer_host("/run/mqttd.sock") == "/run/mqttd.sock"


@pytest_twisted.inlineCallbacks
def test_checks_run_in_the_gates_own_threads_not_the_reactor_thread():
    """The default runner hashes in a small pool of its own (max_concurrent threads), off the reactor thread."""
    gate = VerificationGate(reactor, max_concurrent=2)
    try:
        idents = yield defer.gatherResults(
            [gate.submit(f"192.0.2.{i}:1", threading.get_ident) for i in range(6)])
        assert threading.get_ident() not in idents
        assert len(set(idents)) <= 2
        assert gate._pool.max == 2
    finally:
        gate.stop()


def test_gate_options_are_checked():
    """Nonsense limits are refused when the gate is built."""
    for kwargs in ({"max_concurrent": 0}, {"per_peer": 0}, {"max_waiting": -1},
                   {"max_wait": 0}):
        with pytest.raises(ValueError):
            VerificationGate(task.Clock(), **kwargs)


# --- through the broker: 0x9F / v3 0x03 ----------------------------------------------


@pytest.mark.parametrize("level,code", [(5, 0x9F), (4, 0x03)])
def test_connect_refused_by_the_gate_gets_connection_rate_exceeded(tmp_path, level, code):
    """A CONNECT whose password check cannot get a place: v5 0x9F, v3 0x03, counted as connection-rate."""
    path = str(tmp_path / "pw")
    _write(path, "alice")
    broker, clock = make_broker()
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1, per_peer=1,
                            per_peer_waiting=0)
    broker.authenticator = Authenticator(
        make_portal([PasswordFileChecker(path, gate=gate)]), allow_anonymous=False)
    first = FakeClient(broker, clock, level=level)
    first.send(Connect(level, "first", True, 0, username="alice", password=b"pw-alice"))
    second = FakeClient(broker, clock, level=level)  # same address 127.0.0.1
    second.send(Connect(level, "second", True, 0, username="alice", password=b"other"))
    (connack,) = second.received()
    assert isinstance(connack, Connack) and connack.reason_code == code
    assert second.disconnecting
    assert broker.stats.refused["connection-rate"] == 1
    runner.finish()
    (connack,) = first.received()
    assert connack.reason_code == 0


def test_authenticator_passes_the_peer_to_the_checker(tmp_path):
    """The per-peer limit sees the CONNECT's address (the proxied one behind haproxy:)."""
    path = str(tmp_path / "pw")
    _write(path, "alice")
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=4, per_peer=1,
                            per_peer_waiting=0)
    auth = Authenticator(make_portal([PasswordFileChecker(path, gate=gate)]),
                         allow_anonymous=False)
    ask = lambda peer, password: auth.authenticate(  # noqa: E731
        AuthRequest("c", "alice", password, peer, 4))
    first = ask("203.0.113.7:1", b"wrong1")
    assert _result(ask("203.0.113.7:2", b"wrong2")) == 0x9F
    other = ask("198.51.100.1:1", b"wrong3")
    runner.finish()
    runner.finish()
    assert _result(first) == 0x86 and _result(other) == 0x86


# --- SCRAM: unknown users get a real-looking, stable challenge ------------------------


def _server_first(broker, clock, user):
    client = FakeClient(broker, clock, level=5)
    scram = ScramClient([METHOD], user, "whatever")
    client.send(Connect(5, "c-" + user, True, 0, properties=Properties(
        authentication_method=METHOD,
        authentication_data=scram.get_client_first().encode())))
    (challenge,) = client.received()
    assert isinstance(challenge, Auth) and challenge.reason_code == 0x18
    fields = dict(item.split("=", 1) for item in
                  challenge.properties.authentication_data.decode().split(","))
    return fields["s"], int(fields["i"])


def _scram_broker(path):
    checker = PasswordFileChecker(path)
    broker, clock = make_broker()
    enhanced = EnhancedAuthenticator()
    enhanced.register(METHOD, scram_mechanism(checker.scram_lookup, secret=checker.secret,
                                              shape=checker.scram_shape))
    broker.enhanced_authenticator = enhanced
    broker.authenticator = Authenticator(None, allow_anonymous=False)
    return broker, clock


def test_scram_challenge_of_unknown_user_looks_like_a_real_one_and_is_stable(tmp_path):
    """Unknown and non-SCRAM users get the real entries' iteration count, a same-size salt, the same salt every time and after a restart."""
    import base64

    path = str(tmp_path / "pw")
    _write(path, "sc", "sc2", iterations=6000, scram=True)
    update_file(path, "dash", "pw", iterations=1000)  # a $7$ user: no SCRAM credentials
    broker, clock = _scram_broker(path)
    real_salt, real_iterations = _server_first(broker, clock, "sc")
    assert real_iterations == 6000
    for user in ("nouser", "dash"):
        salt, iterations = _server_first(broker, clock, user)
        assert iterations == real_iterations
        assert len(base64.b64decode(salt)) == len(base64.b64decode(real_salt))
        assert _server_first(broker, clock, user) == (salt, iterations)
    other_salt = _server_first(broker, clock, "nouser2")[0]
    assert other_salt != _server_first(broker, clock, "nouser")[0]
    # a restart (a new checker on the same file) gives the same made-up salt
    restarted, clock2 = _scram_broker(path)
    assert _server_first(restarted, clock2, "nouser") == _server_first(broker, clock, "nouser")


def test_identical_checks_in_flight_share_one_hash(tmp_path):
    """The same user and password asked 20 times at once: one hash, 20 answers (a reconnect wave, a repeated wrong password)."""
    path = str(tmp_path / "pw")
    _write(path, "alice")
    runner = ManualRunner()
    checker = PasswordFileChecker(path, gate=VerificationGate(
        task.Clock(), run=runner, max_concurrent=2, per_peer_waiting=0))
    right = [checker.requestAvatarId(MQTTCredentials("alice", "pw-alice", "192.0.2.1:%d" % i))
             for i in range(20)]
    wrong = [checker.requestAvatarId(MQTTCredentials("alice", "nope", "192.0.2.2:%d" % i))
             for i in range(20)]
    assert len(runner.calls) == 2
    runner.finish()
    runner.finish()
    assert [_result(d) for d in right] == ["alice"] * 20
    assert all(_result(d).check(error.UnauthorizedLogin) for d in wrong)
    # answered: the next wrong one is a new check (failures are not cached) ...
    checker.requestAvatarId(MQTTCredentials("alice", "nope", "192.0.2.3:99"))
    assert len(runner.calls) == 1
    # ... except from the address that just failed 20 times for a name over its budget
    refused = checker.requestAvatarId(MQTTCredentials("alice", "nope", "192.0.2.2:99"))
    assert _result(refused).check(ThrottledLogin) and len(runner.calls) == 1


@pytest.mark.parametrize("level,code", [(4, 0x04), (5, 0x86)])
def test_refusal_line_names_the_connack_code_on_the_wire(tmp_path, level, code):
    """A v3.1.1 wrong password is logged as CONNACK 0x04 (what the client got), not the v5 0x86."""
    path = str(tmp_path / "pw")
    _write(path, "alice")
    broker, clock = make_broker()
    broker.authenticator = Authenticator(make_portal([PasswordFileChecker(path)]),
                                         allow_anonymous=False)
    details = []
    broker.refused = lambda what, client_id, peer, detail, **fields: details.append(detail)
    client = FakeClient(broker, clock, level=level)
    client.send(Connect(level, "c", True, 0, username="alice", password=b"wrong"))
    (connack,) = client.received()
    assert connack.reason_code == code
    assert details == ["username 'alice' (CONNACK 0x%02X)" % code]
