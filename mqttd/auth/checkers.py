"""Authentication through ``twisted.cred``: the password-file checker and the
:class:`Authenticator` that puts a ``Portal`` behind the anonymous policy.

Any ``ICredentialsChecker`` for ``IUsernamePassword`` plugs in (``strcred``'s
``unix`` and ``memory`` checkers, LDAP, a database...): the broker's
``authenticate`` hook asks the portal with the CONNECT's user name and
password and maps the outcome to CONNACK reason codes:

=================================  ==================  ===============
outcome                            MQTT 5              MQTT 3.1/3.1.1
=================================  ==================  ===============
accepted                           0x00                0x00
wrong password / unknown user      0x86                0x04
no user name, anonymous refused    0x87                0x05
no checker for the credentials     0x87                0x05
too many password checks waiting   0x9F                0x03
=================================  ==================  ===============
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import os
import time
from typing import Callable, Dict, Optional, Tuple

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mqttd.auth.gate import (FailureLog, VerificationBusy, VerificationGate, address_key,
                             peer_host)
from mqttd.auth.passwd import (DEFAULT_ITERATIONS, DEFAULT_SCRAM_ITERATIONS, SALT_BYTES,
                               SCRAM_TAG, PasswordEntry, read_password_file)
from mqttd.codec.errors import ReasonCode
from mqttd.hooks import ANONYMOUS
from mqttd.interfaces import IAuthenticator

log = Logger(namespace="mqttd.auth")

#: failed checks of one user name (within the window) before further checks of
#: it from addresses with recent failures are refused without hashing
DEFAULT_MAX_AUTH_FAILURES = 5
#: seconds without a failure after which a user name's or address's failures
#: are forgotten
DEFAULT_AUTH_FAILURE_WINDOW = 60.0


class ThrottledLogin(error.UnauthorizedLogin):
    """Refused without checking the password: the user name has many recent
    failures and so has the client's address (answered as a wrong password,
    0x86 / v3 0x04)."""


class EmptyPasswordFile(ValueError):
    """A reloaded password file has no users while the previous one had some."""


def _password_text(password: Optional[bytes]) -> str:
    # MQTT passwords are binary data; strcred checkers compare text
    return (password or b"").decode("utf-8", "surrogateescape")


class MQTTCredentials(credentials.UsernamePassword):
    """``IUsernamePassword`` from a CONNECT (password kept as text that
    round-trips any bytes via ``surrogateescape``); ``peer`` is the client's
    ``host:port`` (None if unknown), for checkers that limit work per peer."""

    def __init__(self, username, password, peer: Optional[str] = None):
        super().__init__(username, password)
        self.peer = peer

    def checkPassword(self, password) -> bool:
        if isinstance(password, bytes):
            password = password.decode("utf-8", "surrogateescape")
        return hmac.compare_digest(self.password.encode("utf-8", "surrogateescape"),
                                   password.encode("utf-8", "surrogateescape"))

    @property
    def password_bytes(self) -> bytes:
        return self.password.encode("utf-8", "surrogateescape")


def entry_work(entry: PasswordEntry) -> Tuple[str, int]:
    """``(flavour, rounds)`` of hashing one check of ``entry`` costs: PBKDF2
    iterations of SHA-512 (``$7$``) or SHA-256 (SCRAM), or one SHA-512 (``$6$``)."""
    if entry.kind == "7":
        return "pbkdf2-sha512", entry.iterations
    if entry.kind == "6":
        return "sha512", 1
    return "pbkdf2-sha256", entry.iterations


def work_profile(users: Dict[str, PasswordEntry]) -> Dict[str, int]:
    """``{flavour: rounds}``: for each kind of hashing in the file, the most
    any entry costs.  Every check does this much work (its own entry's, then
    the rest as padding, :func:`uniform_verify`), so no user name -- unknown,
    old-format, or with a minority iteration count -- is told apart by timing.
    An empty file costs what ``mqttd passwd`` writes."""
    profile: Dict[str, int] = {}
    for entry in users.values():
        flavour, rounds = entry_work(entry)
        if rounds > profile.get(flavour, 0):
            profile[flavour] = rounds
    return profile or {"pbkdf2-sha512": DEFAULT_ITERATIONS}


_PAD_SALT = b"mqttd work padding"


def uniform_verify(entry: PasswordEntry, password: bytes, profile: Dict[str, int]) -> bool:
    """``entry.verify(password)``, then hashing of the kinds and amounts of
    ``profile`` that the entry's own check did not do: each call costs the
    same whatever the entry (CPU-heavy: call it off the reactor thread)."""
    ok = entry.verify(password)
    flavour, rounds = entry_work(entry)
    for other, wanted in profile.items():
        rest = wanted - rounds if other == flavour else wanted
        if rest <= 0:
            continue
        if other == "pbkdf2-sha512":
            hashlib.pbkdf2_hmac("sha512", password, _PAD_SALT, rest, 64)
        elif other == "pbkdf2-sha256":
            hashlib.pbkdf2_hmac("sha256", password, _PAD_SALT, rest)
        else:
            hashlib.sha512(password + _PAD_SALT).digest()
    return ok


def dummy_entry(users: Dict[str, PasswordEntry]) -> PasswordEntry:
    """A random entry shaped like the file's most expensive one (kind,
    iterations, salt and hash sizes): an unknown user's password is verified
    against it (with :func:`uniform_verify`'s padding), so an unknown user
    name costs what a known one costs and is not told apart by timing."""
    if users:
        costliest = max(users.values(), key=lambda e: (entry_work(e)[1], e.kind))
        kind, iterations = costliest.kind, costliest.iterations
        salt_size, digest_size = len(costliest.salt), len(costliest.digest)
    else:
        kind, iterations, salt_size, digest_size = "7", DEFAULT_ITERATIONS, SALT_BYTES, 64
    return PasswordEntry("", kind, os.urandom(salt_size), os.urandom(digest_size),
                         iterations, os.urandom(32) if kind == SCRAM_TAG else b"")


def scram_shape(users: Dict[str, PasswordEntry]) -> Tuple[int, int]:
    """``(iterations, salt size)`` of the made-up SCRAM challenge of an unknown
    user (or one without SCRAM credentials): the file's highest SCRAM
    iteration count (with its salt size), so unknown names look like the users
    with the strongest entries; without SCRAM entries
    ``(DEFAULT_SCRAM_ITERATIONS, 16)``, what ``mqttd passwd --scram`` writes.

    SCRAM sends the count to the client (``i=``), so a user whose entry has a
    *different* count than the highest is told apart from unknown names: keep
    one count for all SCRAM entries (``mqttd passwd --scram`` writes one; re-hash
    older entries when migrating)."""
    shapes = [(e.iterations, len(e.salt)) for e in users.values() if e.kind == SCRAM_TAG]
    return max(shapes) if shapes else (DEFAULT_SCRAM_ITERATIONS, 16)


def file_secret(users: Dict[str, PasswordEntry]) -> bytes:
    """A server secret derived from the stored hashes (secret themselves): the
    key of the made-up SCRAM salts, stable across restarts while the file is
    unchanged; random for an empty file."""
    if not users:
        return os.urandom(32)
    digest = hashlib.sha256(b"mqttd fake salt key\0")
    for name in sorted(users):
        entry = users[name]
        digest.update(entry.salt + b"\0" + entry.digest + b"\0" + entry.server_key + b"\n")
    return digest.digest()


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks ``IUsernamePassword`` against a mosquitto password file.

    :param path: the file (see :mod:`mqttd.auth.passwd` for the format).
    :param reactor: runs the PBKDF2 checks (0.1-0.3 s of CPU each at 100,000
        iterations) through a :class:`~mqttd.auth.gate.VerificationGate` of
        its own thread pool, so the reactor thread never blocks and the
        hashing work is bounded overall and per peer; None runs them inline
        (tests) unless ``gate`` is given.
    :param gate: the :class:`~mqttd.auth.gate.VerificationGate` to use
        (default: one on ``reactor`` with its default limits).
    :param cache_size: successful checks remembered (keyed by an HMAC of user
        and password under a per-process random key, and the stored entry) so a
        reconnecting client costs no PBKDF2; cleared by :meth:`reload`.

    Identical checks in flight (same user, password and stored entry) share
    one hash.  An unknown user name costs the same as a known one: its password is
    verified against :attr:`dummy` (a random entry shaped like the file's
    most common one) through the same gate, and then refused.  Credentials
    with a ``peer`` attribute (``host:port``, :class:`MQTTCredentials`) are
    limited per peer host; a check the gate refuses fails with
    :class:`~mqttd.auth.gate.VerificationBusy`.

    The file is read at construction (OSError/PasswordFileError if unreadable)
    and again by :meth:`reload` (SIGHUP), which keeps the old users if the new
    file is unreadable.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: str, reactor=None, cache_size: int = 10000,
                 gate: Optional[VerificationGate] = None,
                 max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES,
                 auth_failure_window: float = DEFAULT_AUTH_FAILURE_WINDOW,
                 clock=None):
        self.path = path
        self.reactor = reactor
        self.cache_size = cache_size
        if gate is None and reactor is not None:
            gate = VerificationGate(reactor)
        self.gate = gate
        if clock is None:
            clock = gate.clock if gate is not None else reactor
        seconds = clock.seconds if clock is not None else time.monotonic
        if max_auth_failures < 0 or auth_failure_window <= 0:
            raise ValueError("max_auth_failures >= 0 and auth_failure_window > 0 are required")
        #: failed checks per user name within the window before that name's
        #: checks from addresses with failures are refused unhashed (0: never)
        self.max_auth_failures = max_auth_failures
        #: recent failures by ("user", name) and ("host", address key)
        self.failures = FailureLog(seconds, auth_failure_window)
        #: successful logins for a name from an address that failed for it recently
        self.suspicious_successes = 0
        #: checks refused without hashing (user name over its failure budget)
        self.throttled = 0
        #: password checks submitted and not answered, per user name
        self._pending: Dict[str, int] = {}
        self._key = os.urandom(32)
        self._cache: "collections.OrderedDict[bytes, bool]" = collections.OrderedDict()
        #: checks in flight: key -> the Deferreds waiting for its answer
        self._inflight: Dict[bytes, list] = {}
        self.users: Dict[str, PasswordEntry] = read_password_file(path)
        self._derive()
        #: key of the made-up SCRAM salts of unknown users (see :func:`file_secret`)
        self.secret = file_secret(self.users)

    def _derive(self) -> None:
        users = self.users
        #: the entry an unknown user's password is verified against
        self.dummy = dummy_entry(users)
        #: the hashing every check costs (see :func:`work_profile`)
        self.profile = work_profile(users)
        self._scram_shape = scram_shape(users)

    def reload(self) -> None:
        """Read the file again; raises (keeping the old users) if it is
        unreadable, and refuses (keeping the old users, :class:`EmptyPasswordFile`)
        a file without any user when the previous one had some: a file
        truncated while it is rewritten must not lock everybody out."""
        users = read_password_file(self.path)
        if not users and self.users:
            raise EmptyPasswordFile(
                f"{self.path} has no users (the previous one had {len(self.users)}); "
                "keeping the previous users -- to refuse everybody, remove --password-file "
                "or leave one disabled entry")
        self.users = users
        self._derive()
        self._cache.clear()
        log.info("Password file {path}: {count} users", path=self.path, count=len(users))

    def scram_lookup(self, username: str) -> Optional[PasswordEntry]:
        """The SCRAM-SHA-256 entry of ``username`` (None: unknown or not SCRAM)."""
        entry = self.users.get(username)
        return entry if entry is not None and entry.kind == SCRAM_TAG else None

    def scram_shape(self) -> Tuple[int, int]:
        """``(iterations, salt size)`` of an unknown user's SCRAM challenge."""
        return self._scram_shape

    def _verify_once(self, key: bytes, peer, entry: PasswordEntry,
                      password: bytes, priority: int = 0,
                      username: str = "") -> defer.Deferred:
        """``entry.verify(password)`` through the gate, once for all the same
        checks in flight (a reconnect wave of one device type, or one wrong
        password sent many times, costs one hash, not one each)."""
        waiters = self._inflight.get(key)
        mine: defer.Deferred = defer.Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._inflight[key] = [mine]
        self._pending[username] = self._pending.get(username, 0) + 1
        if self.gate is None:
            d = defer.maybeDeferred(uniform_verify, entry, password, self.profile)
        else:
            d = self.gate.submit(peer, uniform_verify, entry, password, self.profile,
                                 priority=priority)

        def fan_out(result):
            del self._inflight[key]
            count = self._pending[username] - 1
            if count:
                self._pending[username] = count
            else:
                del self._pending[username]
            for waiter in waiters:
                if not waiter.called:  # not cancelled (hook timeout) meanwhile
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(result)
            return None
        d.addBoth(fan_out)
        return mine

    def requestAvatarId(self, creds):
        username = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "surrogateescape")
        password = getattr(creds, "password_bytes", None)
        if password is None:
            password = creds.password
            if isinstance(password, str):
                password = password.encode("utf-8", "surrogateescape")
        entry = self.users.get(username)
        known = entry is not None
        if not known:
            entry = self.dummy  # the same work as a known user's check, then refused
        key = hmac.new(self._key, username.encode("utf-8", "surrogateescape") + b"\0"
                       + password + b"\0" + entry.digest, hashlib.sha256).digest()
        peer = getattr(creds, "peer", None)
        user_key, host_key = ("user", username), ("host", address_key(peer_host(peer)))
        # The failure budget is judged before the success cache: otherwise an
        # address over the budget would get "wrong" for free for every guess and
        # "right" at once for a cached password - an unthrottled oracle.
        priority = self.priority(username, host_key)
        if priority is None:
            # this name is under attack and this address failed recently: refused
            # without hashing, whatever the password (as a wrong password: nothing
            # tells it apart)
            self.throttled += 1
            return defer.fail(ThrottledLogin(
                f"{self.failures.count(user_key)} recent failed logins for this user name"))
        if known and key in self._cache:
            self._cache.move_to_end(key)
            self._succeeded_after_failures(username, user_key, host_key, peer)
            return defer.succeed(username)
        d = self._verify_once(key, peer, entry, password, priority, username)

        def verified(ok):
            if not (known and ok):
                self._failed(username, user_key, host_key)
            if not known:
                raise error.UnauthorizedLogin("unknown user")
            if not ok:
                raise error.UnauthorizedLogin("wrong password")
            self._succeeded_after_failures(username, user_key, host_key, peer)
            if self.users.get(username) is entry:  # not reloaded meanwhile
                self._cache[key] = True
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return username
        return d.addCallback(verified)


    def priority(self, username: str, host_key) -> Optional[int]:
        """The gate priority of a check for ``username`` from ``host_key``
        (see docs/security.rst, "Failed logins"), or None: refuse unhashed.

        ====  ===================================================================
        0     the address has no recent failure, the name neither (and no check
              of it is waiting): an honest login goes first
        1     the address has no recent failure, but the name has (it may be
              under attack; its real user still gets a check, before suspects)
        2     the address has recent failures (fewer than the budget)
        3     the address has at least ``max_auth_failures`` recent failures
        None  the name is over its budget and the address has recent failures
        ====  ===================================================================
        """
        failures = self.failures
        limit = self.max_auth_failures
        host_failures = failures.count(host_key)
        user_failures = failures.count(("user", username))
        if host_failures:
            if limit and user_failures >= limit:
                return None
            return 3 if limit and host_failures >= limit else 2
        if user_failures or self._pending.get(username):
            return 1
        return 0

    def _succeeded_after_failures(self, username: str, user_key, host_key, peer) -> None:
        """Log (WARN, through the log limiter's window of the failure log) a
        successful login for a name from an address that failed for it recently:
        a guessed password looks like this."""
        failures = self.failures
        if failures.count(host_key) and failures.count(user_key):
            self.suspicious_successes += 1
            log.warn("Login of user name {username!r} from {peer} succeeded after "
                     "{count} recent failed logins from that address",
                     username=username, peer=peer, count=failures.count(host_key))

    def _failed(self, username: str, user_key, host_key) -> None:
        failures = self.failures
        count = failures.note(user_key)
        failures.note(host_key)
        if count == self.max_auth_failures:
            log.warn("{count} failed logins for user name {username!r} within "
                     "{window:g} s: its checks from addresses with recent failures are "
                     "refused without hashing until {window:g} s pass without one",
                     count=count, username=username, window=failures.window)


class IMQTTUser(Interface):
    """The avatar interface of MQTT logins: the avatar is the username (str)."""


@implementer(portal.IRealm)
class UsernameRealm:
    """A realm whose avatar for an MQTT login is the authenticated username."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8", "surrogateescape")
        return IMQTTUser, avatarId, lambda: None


def make_portal(checkers) -> portal.Portal:
    """A Portal with :class:`UsernameRealm` and ``checkers``."""
    return portal.Portal(UsernameRealm(), list(checkers))


@implementer(IAuthenticator)
class Authenticator:
    """The broker's ``authenticate`` hook: anonymous policy, then a cred ``Portal``.

    :param portal: a ``twisted.cred.portal.Portal`` (None: no checker: a
        client with a user name is let in as anonymous when anonymous clients are
        allowed -- the name, which nobody can check, is dropped: it owns no
        session and picks no ACL ``user`` block -- and refused with 0x86 / v3
        0x04 otherwise, as an unknown user).
    :param allow_anonymous: whether a CONNECT without a user name is let in.
    :param on_login: optional ``f(username)`` called on each success.
    """

    def __init__(self, portal: Optional[portal.Portal], allow_anonymous: bool,
                 on_login: Optional[Callable[[str], None]] = None):
        self.portal = portal
        self.allow_anonymous = allow_anonymous
        self.on_login = on_login

    def authenticate(self, request):
        if request.username is None:
            if self.allow_anonymous:
                return True
            return ReasonCode.NOT_AUTHORIZED  # v3: 0x05, as mosquitto
        if self.portal is None:
            # Nothing can check the name: as mosquitto 2 without a password file,
            # let the client in while anonymous clients are, as anonymous (an
            # unchecked name must not pick another user's ACL rules or session).
            return ANONYMOUS if self.allow_anonymous else ReasonCode.BAD_USER_NAME_OR_PASSWORD
        creds = MQTTCredentials(request.username, _password_text(request.password),
                                request.peer)
        d = self.portal.login(creds, None, IMQTTUser)

        def accepted(result):
            _interface, username, _logout = result
            if self.on_login is not None:
                self.on_login(username)
            return username

        def refused(failure):
            if failure.check(error.UnauthorizedLogin):
                return ReasonCode.BAD_USER_NAME_OR_PASSWORD
            if failure.check(VerificationBusy):  # bounded hashing: try again later
                return ReasonCode.CONNECTION_RATE_EXCEEDED
            if failure.check(error.UnhandledCredentials):
                return ReasonCode.NOT_AUTHORIZED
            return failure  # a checker crashed: the broker logs it and refuses
        return d.addCallbacks(accepted, refused)


__all__ = ["Authenticator", "EmptyPasswordFile", "IMQTTUser", "MQTTCredentials",
           "PasswordFileChecker", "ThrottledLogin", "UsernameRealm", "dummy_entry", "file_secret",
           "make_portal", "scram_shape", "uniform_verify", "work_profile"]
