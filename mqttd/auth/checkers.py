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
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import attrs
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mqttd.auth.gate import VerificationBusy, VerificationGate
from mqttd.auth.guard import (DEFAULT_AUTH_FAILURE_WINDOW, DEFAULT_MAX_AUTH_FAILURES,
                              Judgement, LoginGuard,
                              ThrottledLogin)
from mqttd.auth.passwd import (DEFAULT_ITERATIONS, DEFAULT_SCRAM_ITERATIONS, SALT_BYTES,
                               SCRAM_TAG, PasswordEntry, read_password_file)
from mqttd.codec.errors import ReasonCode
from mqttd.hooks import ANONYMOUS
from mqttd.interfaces import IAuthenticator

log = Logger(namespace="mqttd.auth")

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


#: an entry costs "far more than the others" of its kind of hashing when its
#: rounds are above ``OUTLIER_FACTOR`` x the median of that kind in the file
#: and above :data:`PADDING_FLOOR` (REVIEW-SEC2 N5)
OUTLIER_FACTOR = 10
#: rounds every check may be padded to whatever the file's median: 4x what
#: ``mqttd passwd`` writes (a file migrated from mosquitto, ``$7$101$``
#: entries and some of mqttd's 100,000, is padded to the 100,000)
PADDING_FLOOR = 4 * DEFAULT_ITERATIONS


def padding_ceilings(users: Dict[str, PasswordEntry]) -> Dict[str, int]:
    """``{flavour: rounds}``: the most rounds of each kind of hashing that
    every check is padded to -- ``max(OUTLIER_FACTOR x median,
    PADDING_FLOOR)`` of the entries of that kind."""
    rounds: Dict[str, List[int]] = {}
    for entry in users.values():
        flavour, count = entry_work(entry)
        rounds.setdefault(flavour, []).append(count)
    return {flavour: max(OUTLIER_FACTOR * statistics.median_low(counts), PADDING_FLOOR)
            for flavour, counts in rounds.items()}


def costly_entries(users: Dict[str, PasswordEntry]) -> List[PasswordEntry]:
    """The entries whose hashing costs far more than the others' (above
    their kind's :func:`padding_ceilings`), costliest first: their checks are
    not padded to (each costs its own time, so these names are told apart by
    timing), and the broker warns about them at load."""
    ceilings = padding_ceilings(users)
    costly = [entry for entry in users.values()
              if entry_work(entry)[1] > ceilings[entry_work(entry)[0]]]
    return sorted(costly, key=lambda e: -entry_work(e)[1])


def work_profile(users: Dict[str, PasswordEntry]) -> Dict[str, int]:
    """``{flavour: rounds}``: for each kind of hashing in the file, the most
    any entry costs -- leaving out the :func:`costly_entries`, so one entry
    with a huge iteration count does not make every check cost as much.
    Every check does this much work (its own entry's, then the rest as
    padding, :func:`uniform_verify`), so no user name -- unknown,
    old-format, or with a minority iteration count -- is told apart by timing
    (except the costly entries themselves).  An empty file costs what
    ``mqttd passwd`` writes."""
    ceilings = padding_ceilings(users)
    profile: Dict[str, int] = {}
    for entry in users.values():
        flavour, rounds = entry_work(entry)
        if profile.get(flavour, 0) < rounds <= ceilings[flavour]:
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
    iterations, salt and hash sizes; the :func:`costly_entries` left out): an
    unknown user's password is verified against it (with
    :func:`uniform_verify`'s padding), so an unknown user name costs what a
    known one costs and is not told apart by timing."""
    costly = {id(entry) for entry in costly_entries(users)}
    candidates = [entry for entry in users.values() if id(entry) not in costly]
    if candidates:
        costliest = max(candidates, key=lambda e: (entry_work(e)[1], e.kind))
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
    :param guard: the :class:`~mqttd.auth.guard.LoginGuard` (failure budget,
        known-good addresses, networks) shared with the SCRAM mechanism
        and other checkers; default: one of its own from
        ``max_auth_failures`` and ``auth_failure_window``.

    Identical checks in flight (same user, password and stored entry) share
    one hash.  An unknown user name costs the same as a known one: its password is
    verified against :attr:`dummy` (a random entry shaped like the file's
    costliest ordinary one) through the same gate, and then refused.  Every
    check is padded to :attr:`profile` (:func:`work_profile`); entries that
    cost far more than the others (:func:`costly_entries`) are warned about
    at load and cost only their own checks.  Credentials
    with a ``peer`` attribute (``host:port``, :class:`MQTTCredentials`) are
    limited per peer host; a check the gate or the guard refuses fails with
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
                 clock=None, guard: Optional[LoginGuard] = None):
        self.path = path
        self.reactor = reactor
        self.cache_size = cache_size
        if gate is None and reactor is not None:
            gate = VerificationGate(reactor)
        self.gate = gate
        if guard is None:
            if clock is None:
                clock = gate.clock if gate is not None else reactor
            seconds = clock.seconds if clock is not None else time.monotonic
            guard = LoginGuard(seconds, max_auth_failures, auth_failure_window)
        #: the failure budget, known-good addresses, failing networks
        self.guard = guard
        #: False in a :class:`CheckerChain`: the chain judges, counts failures
        #: and successes once for all its checkers
        self.accounting = True
        self._key = os.urandom(32)
        self._cache: "collections.OrderedDict[bytes, bool]" = collections.OrderedDict()
        #: checks in flight: key -> the Deferreds waiting for its answer
        self._inflight: Dict[bytes, list] = {}
        lines: Dict[str, int] = {}
        self.users: Dict[str, PasswordEntry] = read_password_file(path, lines)
        self._derive(lines)
        #: key of the made-up SCRAM salts of unknown users (see :func:`file_secret`)
        self.secret = file_secret(self.users)

    # the guard's figures, as the checker's (metrics, tests)
    @property
    def failures(self):
        return self.guard.failures

    @property
    def max_auth_failures(self) -> int:
        return self.guard.max_auth_failures

    @property
    def throttled(self) -> int:
        return self.guard.throttled

    @property
    def suspicious_successes(self) -> int:
        return self.guard.suspicious_successes

    def _derive(self, lines: Dict[str, int]) -> None:
        users = self.users
        #: the entry an unknown user's password is verified against
        self.dummy = dummy_entry(users)
        #: the hashing every check costs (see :func:`work_profile`)
        self.profile = work_profile(users)
        self._scram_shape = scram_shape(users)
        costly = costly_entries(users)
        if costly:
            shown = costly[:5]
            ceilings = padding_ceilings(users)
            log.warn(
                "Password file {path}: {count} {noun} far more hashing than the "
                "others ({entries}{more}): checks are padded to at most {profile} "
                "rounds, so a check of these entries takes longer than any other and "
                "tells their names apart by timing; re-hash them with mqttd passwd "
                "(default {default:,} iterations)",
                path=self.path, count=len(costly),
                noun="entry costs" if len(costly) == 1 else "entries cost",
                entries=", ".join(
                    f"{e.username!r} at line {lines.get(e.username, '?')}: "
                    f"{entry_work(e)[1]:,} rounds of {entry_work(e)[0]} "
                    f"(over {ceilings[entry_work(e)[0]]:,})" for e in shown),
                more=f", and {len(costly) - len(shown)} more" if len(costly) > len(shown) else "",
                profile=", ".join(f"{rounds:,} {flavour}"
                                  for flavour, rounds in sorted(self.profile.items())),
                default=DEFAULT_ITERATIONS)

    def reload(self) -> None:
        """Read the file again; raises (keeping the old users) if it is
        unreadable or has an entry over :data:`~mqttd.auth.passwd.MAX_ITERATIONS`,
        and refuses (keeping the old users, :class:`EmptyPasswordFile`)
        a file without any user when the previous one had some: a file
        truncated while it is rewritten must not lock everybody out."""
        lines: Dict[str, int] = {}
        users = read_password_file(self.path, lines)
        if not users and self.users:
            raise EmptyPasswordFile(
                f"{self.path} has no users (the previous one had {len(self.users)}); "
                "keeping the previous users -- to refuse everybody, remove --password-file "
                "or leave one disabled entry")
        self.users = users
        self._derive(lines)
        self._cache.clear()
        log.info("Password file {path}: {count} users", path=self.path, count=len(users))

    def scram_lookup(self, username: str) -> Optional[PasswordEntry]:
        """The SCRAM-SHA-256 entry of ``username`` (None: unknown or not SCRAM)."""
        entry = self.users.get(username)
        return entry if entry is not None and entry.kind == SCRAM_TAG else None

    def scram_shape(self) -> Tuple[int, int]:
        """``(iterations, salt size)`` of an unknown user's SCRAM challenge."""
        return self._scram_shape

    def _verify_once(self, key: bytes, judgement: Judgement, entry: PasswordEntry,
                     password: bytes) -> defer.Deferred:
        """``entry.verify(password)`` through the gate, once for all the same
        checks in flight (a reconnect wave of one device type, or one wrong
        password sent many times, costs one hash, not one each)."""
        waiters = self._inflight.get(key)
        mine: defer.Deferred = defer.Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        self.guard.begin(judgement)
        waiters = self._inflight[key] = [mine]
        if self.gate is None:
            d = defer.maybeDeferred(uniform_verify, entry, password, self.profile)
        else:
            d = self.gate.submit(judgement.peer, uniform_verify, entry, password,
                                 self.profile, priority=judgement.priority)

        def fan_out(result):
            del self._inflight[key]
            self.guard.end(judgement)
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
        guard = self.guard
        accounting = self.accounting
        judgement = _judge(guard, username, creds, accounting)
        # The failure budget is judged before the success cache: otherwise an
        # address over the budget would get "wrong" for free for every guess and
        # "right" at once for a cached password - an unthrottled oracle.
        if judgement.priority is None:
            # this name is under attack and this address failed recently: refused
            # without hashing, whatever the password (as a wrong password: nothing
            # tells it apart)
            return defer.fail(guard.refuse_unchecked(judgement))
        if known and key in self._cache:
            self._cache.move_to_end(key)
            if accounting:
                guard.succeeded(judgement)
            return defer.succeed(username)
        d = self._verify_once(key, judgement, entry, password)

        def verified(ok):
            if not (known and ok) and accounting:
                guard.failed(judgement)
            if not known:
                raise error.UnauthorizedLogin("unknown user")
            if not ok:
                raise error.UnauthorizedLogin("wrong password")
            if accounting:
                guard.succeeded(judgement)
            if self.users.get(username) is entry:  # not reloaded meanwhile
                self._cache[key] = True
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return username
        return d.addCallback(verified)

    def priority(self, username: str, host_key) -> Optional[int]:
        """The gate priority of a check for ``username`` from ``host_key``
        (see :mod:`mqttd.auth.guard`), or None: refuse unhashed."""
        return self.guard._priority(username, ("user", username), host_key)


def _run_checker(checker, creds):
    """``checker.requestAvatarId(creds)`` in a hashing thread: its answer (a
    blocking checker's Deferred has fired by the time it returns), raised if
    a failure."""
    box: list = []
    defer.maybeDeferred(checker.requestAvatarId, creds).addBoth(box.append)
    if not box:
        raise RuntimeError(f"{type(checker).__name__} answered asynchronously; it does "
                           "not need to run in a hashing thread")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@implementer(ICredentialsChecker)
class GatedChecker:
    """A blocking ``IUsernamePassword`` checker run in the password checks'
    bounded thread pool, under the same failure budget and priorities.

    ``twisted.cred``'s ``unix`` checker (``--auth unix``) calls ``crypt`` --
    yescrypt or SHA-crypt, tens of milliseconds each -- and reads the shadow
    file on the calling thread; ``file:`` reads its file on every check.  On
    the reactor thread a storm of wrong passwords would stall every client.
    Here each check goes through ``gate``
    (:class:`~mqttd.auth.gate.VerificationGate`: bounded concurrency, queue
    and wait, per peer) with the priority ``guard`` gives it, and its outcome
    is counted in ``guard``'s failure log (see :mod:`mqttd.auth.guard`).

    :param checker: an ``ICredentialsChecker`` for ``IUsernamePassword``
        whose ``requestAvatarId`` answers synchronously.
    :param gate: the gate (its thread pool runs the checks).
    :param guard: the :class:`~mqttd.auth.guard.LoginGuard`.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, checker, gate: VerificationGate, guard: LoginGuard):
        self.checker = checker
        self.gate = gate
        self.guard = guard
        #: False in a :class:`CheckerChain` (see PasswordFileChecker.accounting)
        self.accounting = True

    def requestAvatarId(self, creds):
        username = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "surrogateescape")
        guard = self.guard
        accounting = self.accounting
        judgement = _judge(guard, username, creds, accounting)
        if judgement.priority is None:
            return defer.fail(guard.refuse_unchecked(judgement))
        guard.begin(judgement)
        d = self.gate.submit(judgement.peer, _run_checker, self.checker, creds,
                             priority=judgement.priority)

        def ended(result):
            guard.end(judgement)
            return result

        def accepted(avatar_id):
            if accounting:
                guard.succeeded(judgement)
            return avatar_id

        def refused(failure):
            # not VerificationBusy: checked
            if failure.check(error.UnauthorizedLogin) and accounting:
                guard.failed(judgement)
            return failure
        return d.addBoth(ended).addCallbacks(accepted, refused)


def _judge(guard: LoginGuard, username: str, creds, accounting: bool) -> Judgement:
    """The guard's judgement of a login; in a chain (``accounting`` False)
    the chain has refused throttled logins already, so a None priority (the
    budget tripped meanwhile) only ranks last."""
    judgement = guard.judge(username, getattr(creds, "peer", None))
    if judgement.priority is None and not accounting:
        judgement = attrs.evolve(judgement, priority=3)
    return judgement


@implementer(ICredentialsChecker)
class CheckerChain:
    """Several ``IUsernamePassword`` checkers as one: the first that accepts
    the credentials wins; a refusal (``UnauthorizedLogin``) or
    ``UnhandledCredentials`` passes them to the next; the login fails as a
    wrong password when every checker refused.  A ``twisted.cred`` Portal
    keeps one checker per credentials interface (the last registered), so
    without a chain ``--password-file`` together with ``--auth ...`` (or an
    embedder's checker) silently used only one of them.

    :param checkers: in order (``--password-file``, then an embedder's
        checkers, then the ``--auth`` ones).
    :param guard: the :class:`~mqttd.auth.guard.LoginGuard` (or None): the
        chain judges once (over budget from a failing address: refused
        unchecked), counts one failure when every checker refused and one
        success otherwise; checkers with an ``accounting`` attribute are set
        to leave that to the chain.
    A "busy" answer (:class:`~mqttd.auth.gate.VerificationBusy`) or another
    error ends the chain with it.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, checkers, guard: Optional[LoginGuard] = None):
        self.checkers = list(checkers)
        self.guard = guard
        for checker in self.checkers:
            if hasattr(checker, "accounting"):
                checker.accounting = False

    def requestAvatarId(self, creds):
        guard = self.guard
        judgement = None
        if guard is not None:
            username = creds.username
            if isinstance(username, bytes):
                username = username.decode("utf-8", "surrogateescape")
            judgement = guard.judge(username, getattr(creds, "peer", None))
            if judgement.priority is None:
                return defer.fail(guard.refuse_unchecked(judgement))
        checkers = iter(self.checkers)
        result: defer.Deferred = defer.Deferred()
        first_refusal: list = []

        def next_checker(_=None):
            checker = next(checkers, None)
            if checker is None:
                if guard is not None:
                    guard.failed(judgement)
                result.errback(first_refusal[0] if first_refusal
                               else Failure(error.UnauthorizedLogin("no checker accepted")))
                return
            defer.maybeDeferred(checker.requestAvatarId, creds).addCallbacks(
                accepted, refused)

        def accepted(avatar_id):
            if guard is not None:
                guard.succeeded(judgement)
            result.callback(avatar_id)

        def refused(failure):
            if failure.check(error.UnauthorizedLogin, error.UnhandledCredentials) \
                    and not failure.check(VerificationBusy):
                if not first_refusal and failure.check(error.UnauthorizedLogin):
                    first_refusal.append(failure)
                next_checker()
            else:
                result.errback(failure)
        next_checker()
        return result


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


__all__ = ["Authenticator", "DEFAULT_AUTH_FAILURE_WINDOW", "DEFAULT_MAX_AUTH_FAILURES",
           "CheckerChain", "EmptyPasswordFile", "GatedChecker", "IMQTTUser", "MQTTCredentials", "PasswordFileChecker",
           "ThrottledLogin", "UsernameRealm", "costly_entries", "dummy_entry", "file_secret",
           "make_portal", "padding_ceilings", "scram_shape", "uniform_verify", "work_profile"]
