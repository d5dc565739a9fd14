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
from typing import Callable, Dict, Optional, Tuple

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mqttd.auth.gate import VerificationBusy, VerificationGate
from mqttd.auth.passwd import (DEFAULT_ITERATIONS, DEFAULT_SCRAM_ITERATIONS, SALT_BYTES,
                               SCRAM_TAG, PasswordEntry, read_password_file)
from mqttd.codec.errors import ReasonCode
from mqttd.interfaces import IAuthenticator

log = Logger(namespace="mqttd.auth")


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


def _most_common(values, default):
    counts = collections.Counter(values)
    return counts.most_common(1)[0][0] if counts else default


def dummy_entry(users: Dict[str, PasswordEntry]) -> PasswordEntry:
    """A random entry shaped like the file's most common one (kind, iterations,
    salt and hash sizes): verifying a password against it costs what a known
    user's check costs, so an unknown user name is not told apart by timing."""
    kind, iterations, salt_size, digest_size = _most_common(
        ((e.kind, e.iterations, len(e.salt), len(e.digest)) for e in users.values()),
        ("7", DEFAULT_ITERATIONS, SALT_BYTES, 64))
    return PasswordEntry("", kind, os.urandom(salt_size), os.urandom(digest_size),
                         iterations, os.urandom(32) if kind == SCRAM_TAG else b"")


def scram_shape(users: Dict[str, PasswordEntry]) -> Tuple[int, int]:
    """``(iterations, salt size)`` of the file's most common SCRAM entry (the
    made-up challenge of an unknown user looks the same); without SCRAM
    entries ``(DEFAULT_SCRAM_ITERATIONS, 16)``, what ``mqttd passwd --scram``
    writes."""
    return _most_common(((e.iterations, len(e.salt)) for e in users.values()
                         if e.kind == SCRAM_TAG), (DEFAULT_SCRAM_ITERATIONS, 16))


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
                 gate: Optional[VerificationGate] = None):
        self.path = path
        self.reactor = reactor
        self.cache_size = cache_size
        if gate is None and reactor is not None:
            gate = VerificationGate(reactor)
        self.gate = gate
        self._key = os.urandom(32)
        self._cache: "collections.OrderedDict[bytes, bool]" = collections.OrderedDict()
        #: checks in flight: key -> the Deferreds waiting for its answer
        self._inflight: Dict[bytes, list] = {}
        self.users: Dict[str, PasswordEntry] = read_password_file(path)
        #: the entry an unknown user's password is verified against
        self.dummy = dummy_entry(self.users)
        self._scram_shape = scram_shape(self.users)
        #: key of the made-up SCRAM salts of unknown users (see :func:`file_secret`)
        self.secret = file_secret(self.users)

    def reload(self) -> None:
        """Read the file again; raises (keeping the old users) if it is unreadable."""
        users = read_password_file(self.path)
        self.users = users
        self.dummy = dummy_entry(users)
        self._scram_shape = scram_shape(users)
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
                      password: bytes) -> defer.Deferred:
        """``entry.verify(password)`` through the gate, once for all the same
        checks in flight (a reconnect wave of one device type, or one wrong
        password sent many times, costs one hash, not one each)."""
        waiters = self._inflight.get(key)
        mine: defer.Deferred = defer.Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._inflight[key] = [mine]
        if self.gate is None:
            d = defer.maybeDeferred(entry.verify, password)
        else:
            d = self.gate.submit(peer, entry.verify, password)

        def fan_out(result):
            del self._inflight[key]
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
        if known and key in self._cache:
            self._cache.move_to_end(key)
            return defer.succeed(username)
        d = self._verify_once(key, getattr(creds, "peer", None), entry, password)

        def verified(ok):
            if not known:
                raise error.UnauthorizedLogin("unknown user")
            if not ok:
                raise error.UnauthorizedLogin("wrong password")
            if self.users.get(username) is entry:  # not reloaded meanwhile
                self._cache[key] = True
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return username
        return d.addCallback(verified)


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

    :param portal: a ``twisted.cred.portal.Portal`` (None: no checker; every
        client with a user name is refused with 0x87 / v3 0x05).
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
            return ReasonCode.NOT_AUTHORIZED
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


__all__ = ["Authenticator", "IMQTTUser", "MQTTCredentials", "PasswordFileChecker",
           "UsernameRealm", "dummy_entry", "file_secret", "make_portal", "scram_shape"]
