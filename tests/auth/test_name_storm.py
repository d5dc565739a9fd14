"""A storm of guesses against ONE user name from a fresh address per attempt (REVIEW-SEC2 S2 residual).

Fresh addresses have no failures, so each guess ranked like the real user's
login (priority 1) and that login waited behind all of them: 4.2-4.8 s, once
0x03.  Now a name under attack gets at most ``max_unverified_per_name``
checks at once from addresses new to it (more are answered "busy" at once,
unchecked), and an address that logged in as the name before is checked
first.  Mechanisms only: a hand-driven hashing pool, ``task.Clock``.
"""
from __future__ import annotations

import pytest
from twisted.internet import task

from mqttd.auth.checkers import Authenticator, make_portal
from mqttd.auth.gate import VerificationBusy
from mqttd.codec.packets import Connect
from tests.auth.gatehelpers import result as _result
from tests.auth.test_login_failures import (_checker, _login, _passwd, _slots_before_start,
                                            _storm)
from tests.core.harness import FakeClient, make_broker


def _fresh(round_):
    """40 addresses never seen before, every round (a botnet, an IPv6 /48)."""
    return [f"10.{round_ % 250}.{round_ // 250}.{i}" for i in range(40)]


def test_storm_from_fresh_addresses_takes_at_most_the_per_name_places(tmp_path):
    """However many fresh addresses guess one name, at most max_unverified_per_name of its checks are queued or running."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    gate = checker.gate
    peak = [0]
    real_submit = gate.submit

    def submit(*args, **kwargs):
        d = real_submit(*args, **kwargs)
        peak[0] = max(peak[0], gate.running + gate.waiting)
        return d
    gate.submit = submit
    _storm(checker, runner, clock, 60, _fresh)
    # the bound, plus the very first check (ranked 0: the name had no failure yet)
    assert checker.guard.max_unverified_per_name == 2 and peak[0] <= 2 + 1
    assert checker.guard.busy_names > 1000              # the rest: "busy", unchecked
    assert checker.failures.count(("user", "dashboard")) >= 5


def test_login_from_an_address_known_for_the_name_goes_first(tmp_path):
    """The real device (it logged in from its address before) is checked after at most the running check, storm or not."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    first = _login(checker, "dashboard", "pw-dashboard", "198.51.100.7:4000")
    runner.finish()
    assert _result(first) == "dashboard"
    checker.reload()                                     # SIGHUP: the success cache is empty
    _storm(checker, runner, clock, 60, _fresh)
    real = _login(checker, "dashboard", "pw-dashboard", "198.51.100.7:5000")
    assert _slots_before_start(runner, b"pw-dashboard") <= 1
    while not real.called:
        runner.finish()
    assert _result(real) == "dashboard"


def test_login_from_a_new_address_is_answered_within_the_per_name_places(tmp_path):
    """A login of the attacked name from an address never seen: checked after at most 2 checks, or 'busy' at once -- never a long wait."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock)
    _storm(checker, runner, clock, 60, _fresh)
    attempt = _login(checker, "dashboard", "pw-dashboard", "198.51.100.9:5000")
    if attempt.called:
        assert _result(attempt).check(VerificationBusy)
        # a retry once a place is free is checked
        while runner.calls:
            runner.finish()
        attempt = _login(checker, "dashboard", "pw-dashboard", "198.51.100.9:5001")
    slots = 0
    while not attempt.called:
        runner.finish()
        slots += 1
    assert slots <= 2
    assert _result(attempt) == "dashboard"


def test_other_names_from_new_addresses_are_not_bounded_by_an_attacked_name(tmp_path):
    """The per-name bound is per name: a wave of first logins of other names is queued as before."""
    clock = task.Clock()
    checker, runner = _checker(_passwd(tmp_path, "dashboard", *[f"dev{n}" for n in range(6)]),
                               clock)
    _storm(checker, runner, clock, 10, _fresh)
    logins = [_login(checker, f"dev{n}", f"pw-dev{n}", f"198.51.100.{n}:1") for n in range(6)]
    assert not any(d.called for d in logins)
    while runner.calls:
        runner.finish()
    assert [_result(d) for d in logins] == [f"dev{n}" for n in range(6)]


@pytest.mark.parametrize("level,code", [(5, 0x9F), (4, 0x03)])
def test_per_name_bound_is_answered_busy(tmp_path, level, code):
    """Through the broker: one check over the per-name bound gets 0x9F (v3 0x03) at once, logged as connection-rate."""
    broker, clock = make_broker()
    checker, runner = _checker(_passwd(tmp_path, "dashboard"), clock, max_auth_failures=5)
    broker.authenticator = Authenticator(make_portal([checker]), allow_anonymous=False)
    d = _login(checker, "dashboard", "wrong", "10.0.0.1:1")   # the name now has a failure
    runner.finish()
    d.addErrback(lambda f: None)
    for n in range(2):
        _login(checker, "dashboard", f"guess{n}", f"10.0.1.{n}:1").addErrback(lambda f: None)
    client = FakeClient(broker, clock, level=level)
    client.conn.peer = "10.0.2.1:1"
    client.send(Connect(level, "x", True, 0, username="dashboard", password=b"guess"))
    (connack,) = client.received()
    assert connack.reason_code == code
    assert broker.stats.refused["connection-rate"] == 1
    assert len(runner.calls) == 1                      # nothing more was hashed
