"""mosquitto password files, the cred checker over them, and ``mqttd passwd``."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mqttd.hooks import ANONYMOUS
from twisted.cred import error
from twisted.cred.credentials import UsernamePassword

from mqttd import cli
from mqttd.auth.checkers import Authenticator, MQTTCredentials, PasswordFileChecker, make_portal
from mqttd.auth.passwd import (
    PasswordFileError, make_entry, parse_line, read_password_file, update_file)
from mqttd.hooks import AuthRequest

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
needs_mosquitto_passwd = pytest.mark.skipif(
    MOSQUITTO_PASSWD is None, reason="mosquitto_passwd (package mosquitto) not installed")


def _result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


@needs_mosquitto_passwd
@pytest.mark.parametrize("algorithm,kind", [("sha512-pbkdf2", "7"), ("sha512", "6")])
def test_file_written_by_mosquitto_passwd_verifies(tmp_path, algorithm, kind):
    """A mosquitto user's file works unchanged: right password yes, wrong no."""
    path = tmp_path / "pw"
    subprocess.run([MOSQUITTO_PASSWD, "-H", algorithm, "-c", "-b", str(path), "alice", "s3cret"],
                   check=True, capture_output=True, timeout=30)
    entry = read_password_file(str(path))["alice"]
    assert entry.kind == kind
    assert entry.verify(b"s3cret")
    assert not entry.verify(b"s3cret ")


def test_written_entry_is_7_with_strong_iterations_and_round_trips():
    """mqttd writes $7$ (PBKDF2-SHA512) with 100k iterations; the line parses back."""
    entry = make_entry("bob", "pw", iterations=100_000)
    line = entry.line()
    assert line.startswith("bob:$7$100000$")
    again = parse_line(line)
    assert again == entry and again.verify(b"pw") and not again.verify(b"pW")


def test_scram_entry_also_verifies_a_plain_password():
    """A --scram entry serves plain CONNECT passwords too (StoredKey comparison)."""
    entry = parse_line(make_entry("c", "pw", iterations=4096, scram=True).line())
    assert entry.kind == "scram-sha-256"
    assert entry.verify(b"pw") and not entry.verify(b"px")


@pytest.mark.parametrize("line", [
    "alice:plaintext", "alice", ":$7$1$AAAA$AAAA", "alice:$7$x$AAAA$AAAA",
    "alice:$7$10$not base64!$AAAA", "alice:$5$AAAA$AAAA",
])
def test_malformed_lines_are_refused_with_the_location(line, tmp_path):
    """A bad line is an error naming file:line -- never a silently skipped user."""
    path = tmp_path / "pw"
    path.write_text("# users\n" + line + "\n")
    with pytest.raises(PasswordFileError, match=f"{path}:2"):
        read_password_file(str(path))


def test_update_file_adds_replaces_and_deletes_keeping_comments(tmp_path):
    """Like mosquitto_passwd: -c creates, a user is replaced in place, -D deletes."""
    path = str(tmp_path / "pw")
    update_file(path, "a", "1", create=True, iterations=1000)
    with open(path, "a") as f:
        f.write("# keep me\n")
    update_file(path, "b", "2", iterations=1000)
    update_file(path, "a", "3", iterations=1000)
    users = read_password_file(path)
    assert users["a"].verify(b"3") and users["b"].verify(b"2")
    update_file(path, "b", None)
    assert set(read_password_file(path)) == {"a"}
    assert "# keep me" in open(path).read()
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(KeyError):
        update_file(path, "nobody", None)


def test_mqttd_passwd_command_batch_delete_create(tmp_path, capsys):
    """mqttd passwd -c -b FILE USER PASS / -b / -D / --scram, registered in the CLI."""
    path = str(tmp_path / "pw")
    assert cli.main(["passwd", "-c", "-b", "--iterations", "1000", path, "u1", "p1"]) == 0
    assert cli.main(["passwd", "-b", "--scram", "--iterations", "4096", path, "u2", "p2"]) == 0
    users = read_password_file(path)
    assert users["u1"].kind == "7" and users["u2"].kind == "scram-sha-256"
    assert cli.main(["passwd", "-D", path, "u1"]) == 0
    assert set(read_password_file(path)) == {"u2"}
    assert cli.main(["passwd", "-D", path, "u1"]) == 1
    assert "not in" in capsys.readouterr().err
    assert cli.main(["passwd", "-b", path, "bad:name", "x"]) == 1


def test_checker_accepts_right_password_refuses_wrong_and_unknown(tmp_path):
    """The ICredentialsChecker answers avatar ids or UnauthorizedLogin."""
    path = tmp_path / "pw"
    update_file(str(path), "alice", "pw", create=True, iterations=1000)
    checker = PasswordFileChecker(str(path))
    assert _result(checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))) == "alice"
    assert _result(checker.requestAvatarId(MQTTCredentials("alice", "pw"))) == "alice"
    assert _result(checker.requestAvatarId(UsernamePassword(b"alice", b"x"))).check(
        error.UnauthorizedLogin)
    assert _result(checker.requestAvatarId(UsernamePassword(b"bob", b"pw"))).check(
        error.UnauthorizedLogin)


def test_checker_caches_successes_and_reload_picks_up_changes(tmp_path):
    """A reconnect costs no PBKDF2; SIGHUP's reload applies new and removed users."""
    path = str(tmp_path / "pw")
    update_file(path, "alice", "pw", create=True, iterations=1000)
    checker = PasswordFileChecker(path)
    calls = []
    entry = checker.users["alice"]
    original = type(entry).verify

    def counting(self, password):
        calls.append(password)
        return original(self, password)
    type(entry).verify = counting
    try:
        for _ in range(3):
            assert _result(checker.requestAvatarId(MQTTCredentials("alice", "pw"))) == "alice"
    finally:
        type(entry).verify = original
    assert len(calls) == 1
    update_file(path, "alice", "new", iterations=1000)
    checker.reload()
    assert _result(checker.requestAvatarId(MQTTCredentials("alice", "pw"))).check(
        error.UnauthorizedLogin)
    with open(path, "a") as f:
        f.write("garbage\n")
    with pytest.raises(PasswordFileError):
        checker.reload()
    assert _result(checker.requestAvatarId(MQTTCredentials("alice", "new"))) == "alice"


def test_authenticator_maps_outcomes_to_reason_codes(tmp_path):
    """Bad password 0x86, anonymous refused 0x87, anonymous allowed True; with no checker
    a user name is let in as anonymous where anonymous clients are, else 0x86 (unknown)."""
    path = str(tmp_path / "pw")
    update_file(path, "alice", "pw", create=True, iterations=1000)
    auth = Authenticator(make_portal([PasswordFileChecker(path)]), allow_anonymous=False)
    ask = lambda user, pw: auth.authenticate(AuthRequest("c", user, pw, None, 4))  # noqa: E731
    assert _result(ask("alice", b"pw")) == "alice"
    assert _result(ask("alice", b"nope")) == 0x86
    assert ask(None, None) == 0x87
    assert Authenticator(None, allow_anonymous=True).authenticate(
        AuthRequest("c", None, None, None, 4)) is True
    assert Authenticator(None, allow_anonymous=False).authenticate(
        AuthRequest("c", "alice", b"pw", None, 4)) == 0x86
    assert Authenticator(None, allow_anonymous=True).authenticate(
        AuthRequest("c", "alice", b"pw", None, 4)) is ANONYMOUS


@pytest.mark.parametrize("name", ["#comment", "# admin", " bob", "bob ", "a\tb", "a\x0bb",
                                  "a\u2028b", "a:b", ""])
def test_passwd_refuses_user_names_the_file_would_not_give_back(name, tmp_path, capsys):
    """A name starting with '#' would be read back as a comment (the user silently never logs in);
    white space at the ends is stripped; control and line-separator characters split the line."""
    from mqttd.auth.passwd import main
    path = tmp_path / "pw"
    assert main(["-c", "-b", "--iterations", "1000", str(path), "ok", "pw"]) == 0
    assert main(["-b", "--iterations", "1000", str(path), name, "pw"]) == 1
    assert "invalid username" in capsys.readouterr().err
    assert set(read_password_file(str(path))) == {"ok"}
