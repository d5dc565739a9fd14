"""A storm of guesses against ONE user name from a fresh address per attempt (REVIEW-SEC2 S2 residual).

Fresh addresses have no failures, so each guess ranked like the real user's
login (priority 1) and that login waited behind all of them: 4.2-4.8 s, once
0x03.  Now new addresses from networks that failed rank as suspects, new
addresses of an attacked name are served newest first (the storm waits and
times out behind a login that arrives now), and an address that logged in
as the name before is checked first.  Mechanisms only: a hand-driven hashing pool, ``task.Clock``.
"""
from __future__ import annotations

import pytest
from twisted.internet import task

from mqttd.auth.gate import VerificationBusy, VerificationGate
from mqttd.auth.guard import network_key
from tests.auth.gatehelpers import ManualRunner, result as _result
from tests.auth.test_login_failures import (_checker, _login, _passwd, _slots_before_start,
                                            _storm)


def _fresh(round_):
    """40 addresses never seen before, every round, from one /24 per round (a
    host with many addresses, an IPv6 /48)."""
    return [f"10.{round_ % 250}.{round_ // 250}.{i}" for i in range(40)]


def _scattered(round_):
    """40 addresses never seen before, every round, each from a /24 never seen
    before (a botnet)."""
    return [f"10.{(round_ * 40 + i) // 250 % 250}.{(round_ * 40 + i) % 250}.1"
            for i in range(40)]


@pytest.mark.parametrize("hosts", [_fresh, _scattered])
def test_new_login_of_an_attacked_name_is_checked_next_whatever_the_storm(tmp_path, hosts):
    """Fresh-address guesses (one network or a botnet's many): a login of the name that arrives now is checked after at most the running check."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    _storm(checker, runner, clock, 60, hosts)
    assert checker.gate.waiting >= 30                     # the storm is queued...
    attempt = _login(checker, "dashboard", "pw-dashboard", "198.51.100.9:5000")
    assert _slots_before_start(runner, b"pw-dashboard") <= 1   # ...behind the login
    while not attempt.called:
        runner.finish()
    assert _result(attempt) == "dashboard"
    assert checker.failures.count(("user", "dashboard")) >= 5


def test_gate_serves_new_peers_of_newest_first_priorities_first():
    """Within a newest_first priority a peer new to the queue goes to the front; elsewhere to the back."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=1, newest_first=(1,))
    order = []
    gate.submit("192.0.2.1:1", lambda: order.append("running"))
    for n in range(3):
        gate.submit(f"192.0.2.{10 + n}:1", lambda n=n: order.append(f"new{n}"), priority=1)
        gate.submit(f"192.0.2.{20 + n}:1", lambda n=n: order.append(f"old{n}"), priority=2)
    while runner.calls:
        runner.finish()
    assert order == ["running", "new2", "new1", "new0", "old0", "old1", "old2"]


def test_new_login_of_the_name_from_another_network_goes_before_the_storm(tmp_path):
    """The storm's fresh addresses come from networks that failed (rank 2): a login of the name from elsewhere (rank 1) is checked after at most the running check."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    _storm(checker, runner, clock, 60, _fresh)
    attempt = _login(checker, "dashboard", "pw-dashboard", "198.51.100.9:5000")
    assert _slots_before_start(runner, b"pw-dashboard") <= 1
    while not attempt.called:
        runner.finish()
    assert _result(attempt) == "dashboard"


def test_login_from_an_address_known_for_the_name_goes_first(tmp_path):
    """The real device (it logged in from its address before) is checked after at most the running check, even under a botnet's storm."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    first = _login(checker, "dashboard", "pw-dashboard", "198.51.100.7:4000")
    runner.finish()
    assert _result(first) == "dashboard"
    checker.reload()                                     # SIGHUP: the success cache is empty
    _storm(checker, runner, clock, 60, _scattered)
    real = _login(checker, "dashboard", "pw-dashboard", "198.51.100.7:5000")
    assert _slots_before_start(runner, b"pw-dashboard") <= 1
    while not real.called:
        runner.finish()
    assert _result(real) == "dashboard"


def test_other_names_from_new_addresses_are_not_bounded_by_an_attacked_name(tmp_path):
    """First logins of other names during the storm go first (rank 0)."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard", *[f"dev{n}" for n in range(6)]),
                               clock)
    _storm(checker, runner, clock, 10, _scattered)
    logins = [_login(checker, f"dev{n}", f"pw-dev{n}", f"198.51.100.{n}:1") for n in range(6)]
    assert not any(d.called for d in logins)
    for n in range(6):
        assert _slots_before_start(runner, f"pw-dev{n}".encode()) <= 1
    while not all(d.called for d in logins):
        runner.finish()
    assert [_result(d) for d in logins] == [f"dev{n}" for n in range(6)]


def test_network_failures_rank_its_new_addresses_as_suspects(tmp_path):
    """An address whose /24 (IPv6: /48) failed recently ranks 2 for a name under attack; one from another network ranks 1."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    d = _login(checker, "dashboard", "wrong", "203.0.113.9:1")
    runner.finish()
    d.addErrback(lambda f: None)
    guard = checker.guard
    assert guard.judge("dashboard", "203.0.113.77:1").priority == 2
    assert guard.judge("dashboard", "198.51.100.1:1").priority == 1
    assert guard.judge("other", "203.0.113.77:1").priority == 0    # only names under attack
    d = _login(checker, "dashboard", "wrong", "[2001:db8:1:2::1]:1")
    runner.finish()
    d.addErrback(lambda f: None)
    assert guard.judge("dashboard", "[2001:db8:1:ffff::9]:1").priority == 2
    assert guard.judge("dashboard", "[2001:db8:2::9]:1").priority == 1
    assert network_key("::ffff:203.0.113.5") == network_key("203.0.113.200") == "203.0.113.0/24"
    assert network_key("-") is None


def test_full_queue_of_new_addresses_makes_room_for_the_newest():
    """A queue full of one attacked name's new addresses: a new one takes the oldest one's place (that one: busy) instead of being refused."""
    runner = ManualRunner()
    gate = VerificationGate(task.Clock(), run=runner, max_concurrent=1, max_waiting=3,
                            newest_first=(1,))
    gate.submit("192.0.2.1:1", lambda: "running")
    storm = [gate.submit(f"10.0.{n}.1:1", lambda: "guess", priority=1) for n in range(3)]
    honest = gate.submit("198.51.100.1:1", lambda: "honest", priority=1)
    assert _result(storm[0]).check(VerificationBusy) and not honest.called
    # a suspect (rank 2) still finds no room among rank-1 checks
    assert _result(gate.submit("10.9.9.9:1", lambda: 0, priority=2)).check(VerificationBusy)
    runner.finish()
    runner.finish()
    assert _result(honest) == "honest"
