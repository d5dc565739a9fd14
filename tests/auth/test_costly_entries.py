"""Password-file entries with huge iteration counts (REVIEW-SEC2 N5).

One entry with 30,000,000 iterations made every uncached login of every user
fail: every check was padded to the costliest entry (the S1 fix), the check
outlived the hook timeout, and the broker answered 0x05 with a CRITICAL
traceback.  Now: counts above ``MAX_ITERATIONS`` are refused at load
(``file:line``; check-config exit 2; a reload keeps the old file), entries far
costlier than the others are not padded to (and warned about), and a check
that outlives the gate's deadline is answered "busy" (0x9F / v3 0x03).
Mechanisms only: counted hash rounds, ``task.Clock``, no timings.
"""
from __future__ import annotations

import hashlib

import pytest
from twisted.internet import task

from mqttd import cli
from mqttd.auth.checkers import (Authenticator, MQTTCredentials, PasswordFileChecker,
                                 costly_entries, make_portal)
from mqttd.auth.gate import VerificationBusy, VerificationGate
from mqttd.auth.passwd import (MAX_ITERATIONS, PasswordFileError, main as passwd_main,
                               make_entry, read_password_file)
from mqttd.codec.packets import Connect
from tests.auth.gatehelpers import ManualRunner, result as _result
from tests.core.harness import FakeClient, make_broker


def _write(path, entries):
    path.write_text("".join(e if isinstance(e, str) else e.line() + "\n" for e in entries))
    return str(path)


def _huge_line(name, iterations, scram=False):
    """A well-formed entry with ``iterations`` (not hashed: that would take hours)."""
    entry = make_entry(name, "x", iterations=1, scram=scram)
    text = entry.line()
    return text.replace("$1$", f"${iterations}$", 1) + "\n"


@pytest.mark.parametrize("scram", [False, True])
def test_entry_above_the_maximum_iterations_is_refused_with_file_and_line(tmp_path, scram):
    """A count no check could finish in time makes the whole file refused, naming file:line."""
    path = _write(tmp_path / "pw", [make_entry("alice", "a", iterations=1000),
                                    "# a comment\n",
                                    _huge_line("slowpoke", 999_999_999_999, scram)])
    with pytest.raises(PasswordFileError) as raised:
        read_password_file(path)
    assert str(raised.value).startswith(f"{path}:3: 999,999,999,999 iterations is above "
                                        f"the maximum {MAX_ITERATIONS:,}")
    # the maximum itself is fine (a mosquitto_passwd -I file within it loads)
    _write(tmp_path / "ok", [_huge_line("strong", MAX_ITERATIONS, scram)])
    assert read_password_file(str(tmp_path / "ok"))["strong"].iterations == MAX_ITERATIONS


def test_check_config_exits_2_for_an_entry_above_the_maximum(tmp_path, capsys):
    """check-config (and so the start) refuses such a file with one line and status 2."""
    path = _write(tmp_path / "pw", [_huge_line("slowpoke", 30_000_000)])
    config = tmp_path / "mqttd.toml"
    config.write_text(f'persistence = "memory"\npassword-file = "{path}"\n')
    assert cli.main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: 30,000,000 iterations is above the maximum" in err


def test_reload_with_an_entry_above_the_maximum_keeps_the_previous_users(tmp_path):
    """SIGHUP with such a file: the reload fails (the service logs it once), the old users stay in force."""
    path = _write(tmp_path / "pw", [make_entry("alice", "pw-alice", iterations=1000)])
    checker = PasswordFileChecker(path)
    _write(tmp_path / "pw", [make_entry("bob", "pw-bob", iterations=1000),
                             _huge_line("slowpoke", 30_000_000)])
    with pytest.raises(PasswordFileError, match=":2: 30,000,000 iterations"):
        checker.reload()
    assert set(checker.users) == {"alice"}
    assert isinstance(PasswordFileError("x"), ValueError)   # the service's one-ERROR-line road
    assert _result(checker.requestAvatarId(
        MQTTCredentials("alice", "pw-alice", "192.0.2.1:1"))) == "alice"


def test_mqttd_passwd_refuses_iterations_above_the_maximum(tmp_path, capsys):
    """mqttd passwd --iterations is bounded like the loader: nothing written, status 2."""
    path = tmp_path / "pw"
    with pytest.raises(SystemExit) as raised:
        passwd_main(["-c", "-b", "--iterations", "30000000", str(path), "slowpoke", "sp"])
    assert raised.value.code == 2
    assert "above the maximum" in capsys.readouterr().err
    assert not path.exists()


def _count_rounds(monkeypatch):
    rounds = []
    real = hashlib.pbkdf2_hmac

    def pbkdf2(name, password, salt, iterations, dklen=None):
        rounds.append(iterations)
        return real(name, password, salt, 1, dklen)
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", pbkdf2)
    return rounds


def test_one_costly_entry_does_not_make_every_check_cost_as_much(tmp_path, monkeypatch):
    """Checks are padded to the costliest ordinary entry, not to an outlier's count."""
    users = [make_entry(f"u{n}", f"pw-u{n}", iterations=1000) for n in range(5)]
    path = _write(tmp_path / "pw", users + [_huge_line("slowpoke", 1_500_000)])
    checker = PasswordFileChecker(path, max_auth_failures=0)
    assert [e.username for e in costly_entries(checker.users)] == ["slowpoke"]
    assert checker.profile == {"pbkdf2-sha512": 1000}
    rounds = _count_rounds(monkeypatch)

    def work(user, password):
        del rounds[:]
        _result(checker.requestAvatarId(MQTTCredentials(user, password, "192.0.2.1:1")))
        return sum(rounds)
    for user in ("u0", "u4", "nobody"):
        assert work(user, "wrong") == 1000, user
    assert work("u1", "pw-u1") == 1000
    assert work("slowpoke", "wrong") == 1_500_000   # its own cost, nobody else's


def test_a_file_migrated_from_mosquitto_is_still_padded_to_its_new_entries(tmp_path):
    """$7$101 entries next to mqttd's 100,000 are not 'costly': every check still costs 100,000 (S1 holds)."""
    path = _write(tmp_path / "pw", [_huge_line("alice", 101), _huge_line("bob", 101),
                                    _huge_line("carol", 101), _huge_line("dan", 100_000)])
    checker = PasswordFileChecker(path)
    assert costly_entries(checker.users) == []
    assert checker.profile == {"pbkdf2-sha512": 100_000}
    assert checker.dummy.iterations == 100_000


def test_costly_entries_are_warned_about_at_load_and_reload(tmp_path, log_events):
    """One WARN line names the costly entries with their line and rounds, at start and on every reload."""
    users = [make_entry(f"u{n}", "p", iterations=1000) for n in range(3)]
    path = _write(tmp_path / "pw", users + [_huge_line("slowpoke", 1_500_000)])
    checker = PasswordFileChecker(path)

    def warnings():
        return [e for e in log_events
                if e.get("log_level").name == "warn" and "far more hashing" in e["log_format"]]
    (first,) = warnings()
    assert first["count"] == 1 and first["path"] == path
    assert "'slowpoke' at line 4: 1,500,000 rounds" in first["entries"]
    checker.reload()
    assert len(warnings()) == 2
    _write(tmp_path / "pw", users)
    checker.reload()
    assert len(warnings()) == 2                     # fixed file: no more warning


def test_check_still_running_at_its_deadline_is_answered_busy():
    """A hash that outlives the gate's deadline is answered VerificationBusy; its thread keeps its place until it ends."""
    clock = task.Clock()
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1, deadline=8.0)
    slow = gate.submit("192.0.2.1:1", lambda: True)
    clock.advance(7.9)
    assert not slow.called
    clock.advance(0.2)
    assert _result(slow).check(VerificationBusy)
    assert (gate.overran, gate.running) == (1, 1)
    queued = gate.submit("192.0.2.2:1", lambda: "next")
    assert not queued.called                         # the thread is still busy
    runner.finish()                                   # the late result is dropped
    assert gate.running == 1 and runner.calls        # ...and the next check starts
    runner.finish()
    assert _result(queued) == "next" and clock.getDelayedCalls() == []


@pytest.mark.parametrize("level,code", [(5, 0x9F), (4, 0x03)])
def test_check_outliving_the_deadline_is_a_busy_connack_not_a_hook_failure(
        tmp_path, log_events, level, code):
    """Through the broker: 0x9F (v3 0x03) and one WARN refusal line before the hook timeout -- no CRITICAL traceback."""
    path = _write(tmp_path / "pw", [make_entry("alice", "pw-alice", iterations=1000)])
    broker, clock = make_broker()
    runner = ManualRunner()
    gate = VerificationGate(clock, run=runner, max_concurrent=1,
                            deadline=0.8 * broker.config.hook_timeout)
    checker = PasswordFileChecker(path, gate=gate)
    broker.authenticator = Authenticator(make_portal([checker]), allow_anonymous=False)
    client = FakeClient(broker, clock, level=level)
    client.send(Connect(level, "a1", True, 0, username="alice", password=b"pw-alice"))
    assert client.received() == []
    clock.advance(0.8 * broker.config.hook_timeout)
    (connack,) = client.received()
    assert connack.reason_code == code
    levels = [e["log_level"].name for e in log_events if e.get("log_namespace", "").startswith(
        "mqttd")]
    assert "critical" not in levels and "error" not in levels
    refusals = [e for e in log_events if e.get("what") == "connection-rate"]
    assert len(refusals) == 1 and refusals[0]["log_level"].name == "warn"
    runner.finish()                                   # the hash ends later: nothing breaks
    assert broker.stats.refused["connection-rate"] == 1


def test_gate_answers_before_the_configured_hook_timeout(tmp_path):
    """--hook-timeout 5: the password gate's deadline (and wait) shrink to 4 s, so an overload is 'busy', never a failed hook."""
    from mqttd import tap
    path = _write(tmp_path / "pw", [make_entry("u", "p", iterations=1000)])
    options = tap.Options()
    options.parseOptions(["--persistence", "memory", "--password-file", path,
                          "--listen", "tcp:0:interface=127.0.0.1", "--hook-timeout", "5"])
    service = tap.makeService(options)
    (checker,) = {c for c in service.broker.authenticator.portal.checkers.values()}
    assert (checker.gate.deadline, checker.gate.max_wait) == (4.0, 4.0)
