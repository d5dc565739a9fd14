"""mosquitto password files: read, verify, write (and the ``mqttd passwd`` command).

One entry per line, ``username:HASH``; blank lines and lines starting with
``#`` are ignored.  HASH is one of

``$7$ITERATIONS$SALT$HASH``
    PBKDF2-HMAC-SHA512, 64-byte key, SALT and HASH base64 (mosquitto >= 2.0's
    default, ``mosquitto_passwd -H sha512-pbkdf2``).  ``mqttd passwd`` writes
    this form with :data:`DEFAULT_ITERATIONS` iterations (mosquitto: 101).
``$6$SALT$HASH``
    SHA-512 of password + salt (mosquitto <= 1.6, ``-H sha512``); read only.
``$scram-sha-256$ITERATIONS$SALT$STORED_KEY$SERVER_KEY``
    SCRAM-SHA-256 credentials (RFC 7677) written by ``mqttd passwd --scram``:
    usable both for MQTT 5 enhanced authentication (method ``SCRAM-SHA-256``)
    and for a plain CONNECT password.  mqttd's extension: mosquitto does not
    read such lines.

A file mosquitto reads works unchanged with mqttd.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import sys
import tempfile
from typing import Dict, List, Optional

import attrs

#: PBKDF2-SHA512 iterations written by ``mqttd passwd`` (mosquitto writes 101,
#: ~1000x fewer).  One check costs 0.1-0.3 s of one core on the 2-core
#: development machine; checks run in a bounded pool of their own, never on the
#: reactor thread (mqttd.auth.gate), and successful ones are cached (see
#: PasswordFileChecker).
DEFAULT_ITERATIONS = 100_000
#: SCRAM-SHA-256 iterations written by ``mqttd passwd --scram`` (RFC 7677
#: requires >= 4096; every SCRAM login costs one such PBKDF2 on the client)
DEFAULT_SCRAM_ITERATIONS = 100_000
#: the most PBKDF2 iterations an entry may have (``$7$`` and SCRAM alike):
#: 20x what ``mqttd passwd`` writes, ~2 s of one core per check on the 2-core
#: development machine.  A check must end well within the broker's hook
#: timeout (10 s) on a loaded machine; a file with a higher count is refused
#: at load (``file:line``) -- one such entry would make every check of it
#: time out and tie up a hashing thread for as long (REVIEW-SEC2 N5).
#: mosquitto_passwd accepts any ``-I`` >= 1; its default is 101.
MAX_ITERATIONS = 2_000_000
SALT_BYTES = 12
SCRAM_TAG = "scram-sha-256"


class PasswordFileError(ValueError):
    """A password file line cannot be read; the message names file and line."""


@attrs.frozen
class PasswordEntry:
    """One user's stored secret (never the password itself)."""

    username: str
    #: "7" (PBKDF2-SHA512), "6" (SHA-512) or "scram-sha-256"
    kind: str
    salt: bytes
    digest: bytes
    iterations: int = 0
    #: SCRAM ServerKey (the digest is the StoredKey)
    server_key: bytes = b""

    def line(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
        if self.kind == "7":
            return f"{self.username}:$7${self.iterations}${b64(self.salt)}${b64(self.digest)}"
        if self.kind == "6":
            return f"{self.username}:$6${b64(self.salt)}${b64(self.digest)}"
        return (f"{self.username}:${SCRAM_TAG}${self.iterations}${b64(self.salt)}$"
                f"{b64(self.digest)}${b64(self.server_key)}")

    def verify(self, password: bytes) -> bool:
        """True if ``password`` matches; constant-time comparison.  CPU-heavy
        for $7$ and SCRAM entries: call it off the reactor thread."""
        if self.kind == "7":
            candidate = hashlib.pbkdf2_hmac("sha512", password, self.salt,
                                            self.iterations, len(self.digest))
        elif self.kind == "6":
            candidate = hashlib.sha512(password + self.salt).digest()
        else:
            salted = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations)
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            candidate = hashlib.sha256(client_key).digest()
        return hmac.compare_digest(candidate, self.digest)


def make_entry(username: str, password: str, iterations: int = DEFAULT_ITERATIONS,
               scram: bool = False, salt: Optional[bytes] = None) -> PasswordEntry:
    """A new $7$ (or, with ``scram``, SCRAM-SHA-256) entry for ``password``."""
    validate_username(username)
    secret = password.encode("utf-8")
    if scram:
        salt = salt or os.urandom(16)
        salted = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        return PasswordEntry(username, SCRAM_TAG, salt, hashlib.sha256(client_key).digest(),
                             iterations, server_key)
    salt = salt or os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, 64)
    return PasswordEntry(username, "7", salt, digest, iterations)


def validate_username(username: str) -> None:
    """Refuse a user name the password file could not give back as written.

    :raises PasswordFileError: empty; contains ``:`` (the separator) or a
        control or line-separator character; starts with ``#`` (the line
        would be read as a comment: the user could never log in); starts or
        ends with white space (stripped when the file is read)."""
    if not username or ":" in username or any(
            ord(c) < 0x20 or ord(c) == 0x7F or c in "\x85\u2028\u2029" for c in username):
        raise PasswordFileError(f"invalid username {username!r}: empty or contains ':' "
                                "or a control character")
    if username.startswith("#"):
        raise PasswordFileError(f"invalid username {username!r}: a line starting with '#' "
                                "is a comment in a password file")
    if username != username.strip():
        raise PasswordFileError(f"invalid username {username!r}: leading or trailing "
                                "white space is stripped when the file is read")


def _iterations(text: str, where: str) -> int:
    """The iteration count of an entry: 1 to :data:`MAX_ITERATIONS`."""
    iterations = int(text)  # ValueError: reported as a malformed hash
    if iterations < 1:
        raise ValueError("iterations < 1")
    if iterations > MAX_ITERATIONS:
        raise PasswordFileError(
            f"{where}: {iterations:,} iterations is above the maximum {MAX_ITERATIONS:,} "
            "(every check of this entry would take longer than a login may wait); "
            "re-hash the password with mqttd passwd (or mosquitto_passwd -I) "
            "with fewer iterations")
    return iterations


def parse_line(line: str, where: str = "") -> PasswordEntry:
    """Parse one ``username:HASH`` line; :class:`PasswordFileError` if malformed."""
    username, sep, secret = line.partition(":")
    if not sep or not username or not secret.startswith("$"):
        raise PasswordFileError(f"{where}: not 'username:$hash' (a plain-text password? "
                                "hash it with mqttd passwd or mosquitto_passwd -U)")
    parts = secret.split("$")
    try:
        if parts[1] == "7" and len(parts) == 5:
            iterations = _iterations(parts[2], where)
            return PasswordEntry(username, "7", base64.b64decode(parts[3], validate=True),
                                 base64.b64decode(parts[4], validate=True), iterations)
        if parts[1] == "6" and len(parts) == 4:
            return PasswordEntry(username, "6", base64.b64decode(parts[2], validate=True),
                                 base64.b64decode(parts[3], validate=True))
        if parts[1] == SCRAM_TAG and len(parts) == 6:
            return PasswordEntry(username, SCRAM_TAG,
                                 base64.b64decode(parts[3], validate=True),
                                 base64.b64decode(parts[4], validate=True),
                                 _iterations(parts[2], where),
                                 base64.b64decode(parts[5], validate=True))
    except PasswordFileError:
        raise
    except ValueError as error:  # binascii.Error is a ValueError
        raise PasswordFileError(f"{where}: malformed hash: {error}") from None
    raise PasswordFileError(f"{where}: unknown hash type ${parts[1]}$ "
                            "(known: $7$, $6$, $scram-sha-256$)")


def read_password_file(path: str,
                       line_numbers: Optional[Dict[str, int]] = None
                       ) -> Dict[str, PasswordEntry]:
    """``{username: entry}`` of the file; raises OSError or PasswordFileError
    (the whole file is refused if any line is malformed or has more than
    :data:`MAX_ITERATIONS` iterations, so a typo never silently locks a user
    out or leaves an old password in force).  ``line_numbers``, if given, is
    filled with ``{username: line number}`` (for warnings naming
    ``file:line``)."""
    entries: Dict[str, PasswordEntry] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            entry = parse_line(line, f"{path}:{number}")
            entries[entry.username] = entry
            if line_numbers is not None:
                line_numbers[entry.username] = number
    return entries


def write_password_file(path: str, lines: List[str]) -> None:
    """Write atomically (temp file, fsync, rename), mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".passwd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def update_file(path: str, username: str, password: Optional[str], create: bool = False,
                iterations: int = DEFAULT_ITERATIONS, scram: bool = False) -> None:
    """Add or replace ``username``'s entry (``password`` None: delete it).

    ``create`` starts a new file (overwriting one that exists, as
    ``mosquitto_passwd -c``).  Comments and other users' lines are kept.
    Raises KeyError when deleting a user that is not there.
    """
    validate_username(username)
    lines = [] if create else _read_lines(path)
    kept = [line for line in lines if line.partition(":")[0] != username
            or line.lstrip().startswith("#")]
    if password is None:
        if len(kept) == len(lines):
            raise KeyError(username)
    else:
        kept.append(make_entry(username, password, iterations, scram).line())
    write_password_file(path, kept)


def main(argv: List[str]) -> int:
    """``mqttd passwd [-c | -D] [-b] [--scram] [--iterations N] FILE USER [PASSWORD]``."""
    parser = argparse.ArgumentParser(
        prog="mqttd passwd",
        description="Manage a mosquitto-format password file ($7$ PBKDF2-SHA512 entries; "
                    "--scram: SCRAM-SHA-256 credentials for MQTT 5 enhanced authentication).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-c", dest="create", action="store_true",
                       help="create a new file (overwrites an existing one)")
    group.add_argument("-D", dest="delete", action="store_true", help="delete USER")
    parser.add_argument("-b", dest="batch", action="store_true",
                        help="batch mode: PASSWORD on the command line")
    parser.add_argument("--scram", action="store_true",
                        help="store SCRAM-SHA-256 credentials (also valid for plain CONNECT)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"PBKDF2 iterations, 1 to {MAX_ITERATIONS:,} (--scram: 4096 to "
                             f"{MAX_ITERATIONS:,}) [{DEFAULT_ITERATIONS}; --scram: "
                             f"{DEFAULT_SCRAM_ITERATIONS}]")
    parser.add_argument("file")
    parser.add_argument("username")
    parser.add_argument("password", nargs="?")
    args = parser.parse_args(argv)
    if args.batch != (args.password is not None) or (args.delete and args.password):
        parser.error("a PASSWORD argument goes with -b (and not with -D)")
    iterations = args.iterations or (DEFAULT_SCRAM_ITERATIONS if args.scram
                                     else DEFAULT_ITERATIONS)
    if iterations < (4096 if args.scram else 1):
        parser.error("--iterations too small (SCRAM needs >= 4096)")
    if iterations > MAX_ITERATIONS:
        parser.error(f"--iterations {iterations:,} is above the maximum {MAX_ITERATIONS:,}: "
                     "mqttd refuses such entries (each check would take longer than a "
                     "login may wait)")
    try:
        if args.delete:
            update_file(args.file, args.username, None)
            return 0
        password = args.password
        if password is None:
            password = getpass.getpass("Password: ")
            if password != getpass.getpass("Reenter password: "):
                print("Error: Passwords do not match.", file=sys.stderr)
                return 1
        update_file(args.file, args.username, password, create=args.create,
                    iterations=iterations, scram=args.scram)
    except KeyError:
        print(f"Error: user {args.username!r} not in {args.file}", file=sys.stderr)
        return 1
    except (OSError, PasswordFileError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["DEFAULT_ITERATIONS", "MAX_ITERATIONS", "PasswordEntry", "PasswordFileError", "main",
           "make_entry", "parse_line", "read_password_file", "update_file"]
