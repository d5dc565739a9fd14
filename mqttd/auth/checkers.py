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
=================================  ==================  ===============
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import os
from typing import Callable, Dict, Optional

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mqttd.auth.passwd import PasswordEntry, read_password_file
from mqttd.codec.errors import ReasonCode
from mqttd.interfaces import IAuthenticator

log = Logger(namespace="mqttd.auth")


def _password_text(password: Optional[bytes]) -> str:
    # MQTT passwords are binary data; strcred checkers compare text
    return (password or b"").decode("utf-8", "surrogateescape")


class MQTTCredentials(credentials.UsernamePassword):
    """``IUsernamePassword`` from a CONNECT (password kept as text that
    round-trips any bytes via ``surrogateescape``)."""

    def checkPassword(self, password) -> bool:
        if isinstance(password, bytes):
            password = password.decode("utf-8", "surrogateescape")
        return hmac.compare_digest(self.password.encode("utf-8", "surrogateescape"),
                                   password.encode("utf-8", "surrogateescape"))

    @property
    def password_bytes(self) -> bytes:
        return self.password.encode("utf-8", "surrogateescape")


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks ``IUsernamePassword`` against a mosquitto password file.

    :param path: the file (see :mod:`mqttd.auth.passwd` for the format).
    :param reactor: its thread pool runs the PBKDF2 checks (0.1-0.3 s of CPU
        each at 100,000 iterations), so the reactor thread never blocks; None
        runs them inline (tests).
    :param cache_size: successful checks remembered (keyed by an HMAC of user
        and password under a per-process random key, and the stored entry) so a
        reconnecting client costs no PBKDF2; cleared by :meth:`reload`.

    The file is read at construction (OSError/PasswordFileError if unreadable)
    and again by :meth:`reload` (SIGHUP), which keeps the old users if the new
    file is unreadable.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: str, reactor=None, cache_size: int = 10000):
        self.path = path
        self.reactor = reactor
        self.cache_size = cache_size
        self._key = os.urandom(32)
        self._cache: "collections.OrderedDict[bytes, bool]" = collections.OrderedDict()
        self.users: Dict[str, PasswordEntry] = read_password_file(path)

    def reload(self) -> None:
        """Read the file again; raises (keeping the old users) if it is unreadable."""
        users = read_password_file(self.path)
        self.users = users
        self._cache.clear()
        log.info("Password file {path}: {count} users", path=self.path, count=len(users))

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
        if entry is None:
            return defer.fail(error.UnauthorizedLogin("unknown user"))
        key = hmac.new(self._key, username.encode("utf-8", "surrogateescape") + b"\0"
                       + password + b"\0" + entry.digest, hashlib.sha256).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return defer.succeed(username)
        if self.reactor is None:
            d = defer.maybeDeferred(entry.verify, password)
        else:
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                          entry.verify, password)

        def verified(ok):
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
        creds = MQTTCredentials(request.username, _password_text(request.password))
        d = self.portal.login(creds, None, IMQTTUser)

        def accepted(result):
            _interface, username, _logout = result
            if self.on_login is not None:
                self.on_login(username)
            return username

        def refused(failure):
            if failure.check(error.UnauthorizedLogin):
                return ReasonCode.BAD_USER_NAME_OR_PASSWORD
            if failure.check(error.UnhandledCredentials):
                return ReasonCode.NOT_AUTHORIZED
            return failure  # a checker crashed: the broker logs it and refuses
        return d.addCallbacks(accepted, refused)


__all__ = ["Authenticator", "IMQTTUser", "MQTTCredentials", "PasswordFileChecker",
           "UsernameRealm", "make_portal"]
