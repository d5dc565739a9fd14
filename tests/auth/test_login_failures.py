"""Failed logins: per-user-name budgets, check priorities, and equal work for every name.

REVIEW-SEC S2 (a wrong-password storm from many addresses delayed an honest
first login by seconds) and S1 (in a mixed password file, an unknown name or
an old-format entry was told apart by the time its check took).  Mechanisms
only: ``task.Clock``, a runner whose Deferreds the test fires, and counted
hash rounds -- no timings.
"""
from __future__ import annotations

import hashlib
import os

import pytest
from twisted.cred import error
from twisted.internet import task

from mqttd.auth.checkers import (
    EmptyPasswordFile, MQTTCredentials, PasswordFileChecker, ThrottledLogin, make_portal,
    Authenticator, scram_shape, work_profile)
from mqttd.auth.gate import FailureLog, VerificationBusy, VerificationGate, address_key
from mqttd.auth.passwd import PasswordEntry, make_entry, update_file
from mqttd.codec.packets import Connect
from tests.core.harness import FakeClient, make_broker
from tests.auth.gatehelpers import ManualRunner, result as _result


def _passwd(tmp_path, *users, iterations=1000):
    path = str(tmp_path / "pw")
    for index, user in enumerate(users):
        update_file(path, user, "pw-" + user, create=index == 0, iterations=iterations)
    return path


def _checker(path, clock, **options):
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1, per_peer=1,
                            per_peer_waiting=4, max_waiting=128, max_wait=5)
    return PasswordFileChecker(path, gate=gate, **options), runner


def _login(checker, user, password, peer):
    return checker.requestAvatarId(MQTTCredentials(user, password, peer))


def _running_args(runner):
    return [args for _fn, args, _d in runner.calls]


def _storm(checker, runner, clock, rounds, hosts):
    """Each round every attacker address tries a wrong password for 'dashboard'
    (if it has no attempt pending), then one check finishes."""
    pending = {}
    for round_ in range(rounds):
        for host in hosts(round_):
            if host not in pending or pending[host].called:
                pending[host] = _login(checker, "dashboard", f"guess-{host}-{round_}",
                                       f"{host}:{1000 + round_}")
                pending[host].addErrback(lambda f: None)
        if runner.calls:
            runner.finish()
        clock.advance(0.01)
    return pending


def _slots_before_start(runner, password):
    """Checks that finish before the one for ``password`` starts."""
    slots = 0
    while not any(args[1] == password for args in _running_args(runner)):
        assert runner.calls, "the honest check was never started"
        runner.finish()
        slots += 1
    return slots


@pytest.mark.parametrize("fresh_addresses", [False, True])
def test_storm_from_40_addresses_does_not_delay_an_honest_first_login(tmp_path, fresh_addresses):
    """40 addresses storming one user name: an honest login of another user starts within one hash slot."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard", "legit2"), clock)
    if fresh_addresses:   # a new source address for every attempt (an IPv4 botnet)
        hosts = lambda r: [f"10.{r % 250}.{r // 250}.{i}" for i in range(40)]  # noqa: E731
    else:
        hosts = lambda r: [f"10.0.0.{i}" for i in range(40)]  # noqa: E731
    _storm(checker, runner, clock, 60, hosts)
    honest = _login(checker, "legit2", "pw-legit2", "198.51.100.1:5000")
    assert _slots_before_start(runner, b"pw-legit2") <= 1
    while not honest.called:
        runner.finish()
    assert _result(honest) == "legit2"


def test_attacked_user_still_gets_a_check_from_a_clean_address(tmp_path):
    """The storm cannot lock out the real user: a right password from an address without failures is checked, before the suspects."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    # (each new address gets one check ranked like a clean address's: past that first wave)
    _storm(checker, runner, clock, 60, lambda r: [f"10.0.0.{i}" for i in range(40)])
    real = _login(checker, "dashboard", "pw-dashboard", "198.51.100.7:5000")
    assert _slots_before_start(runner, b"pw-dashboard") <= 1
    while not real.called:
        runner.finish()
    assert _result(real) == "dashboard"


def test_over_budget_name_from_a_failed_address_is_refused_without_hashing(tmp_path):
    """After max_auth_failures, an address that failed gets 'wrong password' for that name without a hash."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "alice"), clock, max_auth_failures=3)
    for n in range(3):
        d = _login(checker, "alice", "bad%d" % n, "203.0.113.9:%d" % n)
        runner.finish()
        assert _result(d).check(error.UnauthorizedLogin)
    refused = _login(checker, "alice", "pw-alice", "203.0.113.9:77")
    assert runner.calls == []                              # not hashed
    assert _result(refused).check(ThrottledLogin)
    assert issubclass(ThrottledLogin, error.UnauthorizedLogin)  # 0x86 / v3 0x04
    assert checker.throttled == 1
    # other names from that address, and that name from other addresses: checked
    other = _login(checker, "bob", "x", "203.0.113.9:78")
    assert len(runner.calls) == 1
    runner.finish()
    assert _result(other).check(error.UnauthorizedLogin)
    clean = _login(checker, "alice", "pw-alice", "198.51.100.2:1")
    runner.finish()
    assert _result(clean) == "alice"


def test_failure_budget_is_forgotten_after_a_quiet_window(tmp_path):
    """The refusal without hashing lasts until auth_failure_window seconds pass without a failure."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "alice"), clock, max_auth_failures=2,
                               auth_failure_window=60)
    for n in range(2):
        _login(checker, "alice", "bad", "203.0.113.9:%d" % n).addErrback(lambda f: None)
        runner.finish()
    assert _result(_login(checker, "alice", "pw-alice", "203.0.113.9:9")).check(ThrottledLogin)
    clock.advance(61)
    d = _login(checker, "alice", "pw-alice", "203.0.113.9:10")
    runner.finish()
    assert _result(d) == "alice"


def test_zero_budget_never_refuses_unhashed(tmp_path):
    """--max-auth-failures 0 turns the budget off (priorities stay)."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "alice"), clock, max_auth_failures=0)
    for n in range(10):
        d = _login(checker, "alice", "bad", "203.0.113.9:%d" % n)
        runner.finish()
        assert not _result(d).check(ThrottledLogin)


@pytest.mark.parametrize("level,code", [(5, 0x86), (4, 0x04)])
def test_throttled_connect_is_answered_as_a_wrong_password(tmp_path, level, code):
    """Through the broker: v5 0x86, v3 0x04 -- the same as a wrong password, so nothing tells it apart."""
    path = _passwd(tmp_path, "alice")
    broker, clock = make_broker()
    checker = PasswordFileChecker(path, clock=clock, max_auth_failures=1)
    broker.authenticator = Authenticator(make_portal([checker]), allow_anonymous=False)
    first = FakeClient(broker, clock, level=level)
    first.send(Connect(level, "a1", True, 0, username="alice", password=b"wrong"))
    assert first.received()[0].reason_code == code
    second = FakeClient(broker, clock, level=level)
    second.send(Connect(level, "a2", True, 0, username="alice", password=b"pw-alice"))
    assert second.received()[0].reason_code == code
    assert checker.throttled == 1


def test_gate_starts_lower_priority_numbers_first():
    """Waiting checks start by priority, peers taking turns within one."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=1, per_peer=1)
    order = []
    gate.submit("192.0.2.1:1", lambda: order.append("busy"))
    gate.submit("192.0.2.2:1", lambda: order.append("suspect"), priority=3)
    gate.submit("192.0.2.3:1", lambda: order.append("attacked-name"), priority=1)
    gate.submit("192.0.2.4:1", lambda: order.append("honest"), priority=0)
    while runner.calls:
        runner.finish()
    assert order == ["busy", "honest", "attacked-name", "suspect"]


def test_ipv6_addresses_count_by_their_64_network():
    """A new IPv6 address from the same /64 is not a clean address."""
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::7")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("-") == "-"


def test_full_queue_turns_away_a_suspect_rather_than_a_clean_address():
    """With the waiting queue full of suspects' checks, a better-ranked check takes the place of the newest worst one."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=1, per_peer=1,
                            max_waiting=3)
    gate.submit("192.0.2.1:1", lambda: "running")
    suspects = [gate.submit(f"192.0.2.{n}:1", lambda: "suspect", priority=3)
                for n in range(2, 5)]
    honest = gate.submit("198.51.100.1:1", lambda: "honest", priority=0)
    assert not honest.called and suspects[-1].called
    assert _result(suspects[-1]).check(VerificationBusy)
    # an equal or worse check still finds the queue full
    assert _result(gate.submit("192.0.2.9:1", lambda: 0, priority=3)).check(VerificationBusy)
    runner.finish()
    runner.finish()
    assert _result(honest) == "honest"


def test_failure_log_is_bounded():
    """At most max_entries user names and addresses are remembered."""
    clock = task.Clock()
    log = FailureLog(clock.seconds, 60, max_entries=100)
    for n in range(1000):
        log.note(("user", f"u{n}"))
    assert len(log) == 100 and log.count(("user", "u999")) == 1


# --- S1: the same hashing for every user name ------------------------------------------


def _mixed_file(tmp_path):
    """A file migrated from mosquitto: $7$101, $6$, $7$ with mqttd's count, SCRAM 4096."""
    path = str(tmp_path / "mixed")
    salt = os.urandom(12)
    lines = [
        make_entry("alice", "pw-alice", iterations=101).line(),
        PasswordEntry("carol", "6", salt, hashlib.sha512(b"pw-carol" + salt).digest()).line(),
        make_entry("dan", "pw-dan", iterations=3000).line(),
        make_entry("sam", "pw-sam", iterations=4096, scram=True).line(),
        make_entry("sam2", "pw-sam2", iterations=2000, scram=True).line(),
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_every_user_name_costs_the_same_hashing_in_a_mixed_file(tmp_path, monkeypatch):
    """Unknown names, old $7$101/$6$ entries and minority counts all do the same PBKDF2 rounds per kind."""
    checker = PasswordFileChecker(_mixed_file(tmp_path), max_auth_failures=0)
    rounds = []
    real_pbkdf2, real_sha512 = hashlib.pbkdf2_hmac, hashlib.sha512

    def pbkdf2(name, password, salt, iterations, dklen=None):
        rounds.append((name, iterations))
        return real_pbkdf2(name, password, salt, 1, dklen)

    def sha512(data=b""):
        rounds.append(("sha512", 1))
        return real_sha512(data)
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", pbkdf2)
    monkeypatch.setattr(hashlib, "sha512", sha512)

    def work(user, password):
        del rounds[:]
        _result(checker.requestAvatarId(MQTTCredentials(user, password, "192.0.2.1:1")))
        total = {}
        for name, n in rounds:
            total[name] = total.get(name, 0) + n
        return total
    expected = {"sha512": 3000 + 1, "sha256": 4096}
    for user in ("alice", "carol", "dan", "sam", "sam2", "nobody", "x" * 50):
        assert work(user, "wrong") == expected, user
    assert work("alice", "pw-alice") == expected       # a success too (then cached)
    assert checker.profile == {"pbkdf2-sha512": 3000, "sha512": 1, "pbkdf2-sha256": 4096}


def test_unknown_names_get_the_highest_scram_iteration_count():
    """The made-up SCRAM challenge uses the file's highest count, not the most common one."""
    users = {f"u{n}": make_entry(f"u{n}", "p", iterations=4096, scram=True) for n in range(3)}
    users["strong"] = make_entry("strong", "p", iterations=8192, scram=True)
    assert scram_shape(users) == (8192, 16)
    assert scram_shape({}) == (100_000, 16)
    assert work_profile({}) == {"pbkdf2-sha512": 100_000}


def test_empty_password_file_on_reload_keeps_the_previous_users(tmp_path):
    """A file truncated while it is rewritten must not lock everybody out: refused, the old users stay."""
    path = _passwd(tmp_path, "alice", "bob")
    checker = PasswordFileChecker(path)
    open(path, "w").close()
    with pytest.raises(EmptyPasswordFile, match="no users .*previous one had 2"):
        checker.reload()
    assert set(checker.users) == {"alice", "bob"}
    assert isinstance(EmptyPasswordFile("x"), ValueError)   # the service's one-ERROR-line road


def test_cached_right_password_is_refused_from_an_address_over_the_budget(tmp_path):
    """The failure budget is judged before the success cache: an address over it gets no free oracle (REVIEW-SEC2 N3)."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "victim"), clock, max_auth_failures=3)
    device = _login(checker, "victim", "pw-victim", "198.51.100.5:1")   # the device: now cached
    runner.finish()
    assert _result(device) == "victim"
    for n in range(3):
        d = _login(checker, "victim", "guess%d" % n, "203.0.113.9:%d" % n)
        runner.finish()
        assert _result(d).check(error.UnauthorizedLogin)
    guessed = _login(checker, "victim", "pw-victim", "203.0.113.9:99")
    assert runner.calls == []                      # answered without hashing...
    assert _result(guessed).check(ThrottledLogin)  # ...and refused, right password or not
    again = _login(checker, "victim", "pw-victim", "198.51.100.5:2")  # the device itself
    assert _result(again) == "victim"              # still served from the cache


def test_success_after_failures_from_the_same_address_is_logged(tmp_path):
    """A login that succeeds for a name from an address that failed for it recently is counted and logged (a guessed password looks so)."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "alice"), clock, max_auth_failures=5)
    d = _login(checker, "alice", "bad", "203.0.113.9:1")
    runner.finish()
    assert _result(d).check(error.UnauthorizedLogin)
    ok = _login(checker, "alice", "pw-alice", "203.0.113.9:2")
    runner.finish()
    assert _result(ok) == "alice"
    assert checker.suspicious_successes == 1
    clean = _login(checker, "alice", "pw-alice", "198.51.100.3:1")
    assert _result(clean) == "alice"
    assert checker.suspicious_successes == 1
