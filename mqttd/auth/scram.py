"""MQTT 5 enhanced authentication [MQTT-4.12]: the mechanism registry and SCRAM-SHA-256.

:class:`EnhancedAuthenticator` maps an Authentication Method name to a
mechanism factory ``f(client) -> IAuthExchange``.  Built in:
``SCRAM-SHA-256`` (RFC 5802 / 7677, on the ``scramp`` library) against the
``$scram-sha-256$`` entries that ``mqttd passwd --scram`` writes into the
password file.

The exchange on the wire (no channel binding; the client's GS2 header is
``n,,``)::

    client  CONNECT  method=SCRAM-SHA-256  data=client-first ("n,,n=alice,r=NONCE")
    server  AUTH 0x18                      data=server-first ("r=...,s=SALT,i=4096")
    client  AUTH 0x18                      data=client-final ("c=biws,r=...,p=PROOF")
    server  CONNACK 0x00                   data=server-final ("v=SIGNATURE")
            (or CONNACK 0x86 Bad user name or password for a wrong proof)

A live connection re-authenticates with AUTH 0x19 carrying a new
client-first; success ends with AUTH 0x00, failure with DISCONNECT 0x87
[MQTT-4.12.1].

An unknown user (or one without SCRAM credentials) gets a made-up challenge
that looks like a real one: the salt is ``HMAC-SHA256(server secret, user
name)`` cut to the real salts' size -- the same on every attempt -- and the
iteration count is the one of the real entries (the most common one in the
file), so the server-first message does not tell which user names exist;
the exchange then fails at the proof (0x86), in the same time as a wrong
password (the server's SCRAM work is a few HMACs either way).

Failed logins (REVIEW-SEC2 N15): with a :class:`~mqttd.auth.guard.LoginGuard`
(the password file's), a wrong proof -- for a known or an unknown name -- is
counted in the same per-name and per-address failure log as a wrong plain
password, with the same budget and WARN line; a client-first for a name over
its budget from an address with recent failures is answered 0x86 (v3: 0x04;
on re-authentication DISCONNECT 0x87) at once, without a challenge -- so the
broker is no faster an oracle for guesses than the plain path.  A success
makes the address known to be good for the name.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Callable, Dict, Optional, Tuple

from scramp import ScramException, ScramMechanism
from zope.interface import implementer

from mqttd.auth.guard import Judgement, LoginGuard
from mqttd.codec.errors import ReasonCode
from mqttd.hooks import AuthOutcome, AuthStep
from mqttd.interfaces import IAuthExchange, IEnhancedAuthenticator


SCRAM_SHA_256 = "SCRAM-SHA-256"


@implementer(IEnhancedAuthenticator)
class EnhancedAuthenticator:
    """Authentication Method name -> mechanism factory ``f(client) -> IAuthExchange``."""

    def __init__(self, mechanisms: Optional[Dict[str, Callable]] = None):
        self.mechanisms: Dict[str, Callable] = dict(mechanisms or {})

    def register(self, method: str, factory: Callable) -> None:
        self.mechanisms[method] = factory

    def start(self, method, client):
        factory = self.mechanisms.get(method)
        return None if factory is None else factory(client)


@implementer(IAuthExchange)
class ScramExchange:
    """One SCRAM-SHA-256 conversation (server side).

    :param lookup: ``f(username) -> PasswordEntry | None`` (a
        ``$scram-sha-256$`` entry; any other kind is treated as unknown).
    :param fake_key: the server secret of the made-up salts (bytes).
    :param shape: ``f() -> (iterations, salt size)`` of the made-up
        challenge (default: 4096 iterations, 16 bytes).
    :param guard: the :class:`~mqttd.auth.guard.LoginGuard` whose failure
        budget applies (None: none).
    :param peer: the client's ``host:port`` (the guard's address key).
    """

    def __init__(self, lookup: Callable, fake_key: bytes,
                 shape: Optional[Callable[[], Tuple[int, int]]] = None,
                 guard: Optional[LoginGuard] = None, peer: Optional[str] = None):
        self._lookup = lookup
        self._fake_key = fake_key
        self._shape = shape
        self._guard = guard
        self._peer = peer
        self._judgement: Optional[Judgement] = None
        self._server = ScramMechanism(SCRAM_SHA_256).make_server(self._auth_info)
        self._username: Optional[str] = None
        self._known = False
        self._stage = 0

    def _auth_info(self, username: str):
        self._username = username
        if self._guard is not None:
            self._judgement = self._guard.judge(username, self._peer)
        entry = self._lookup(username)
        if entry is not None and entry.kind == "scram-sha-256":
            self._known = True
            return entry.salt, entry.digest, entry.server_key, entry.iterations
        return fake_credentials(self._fake_key, username,
                                *(self._shape() if self._shape else (4096, 16)))

    def step(self, data):
        try:
            text = (data or b"").decode("utf-8")
            if self._stage == 0:
                self._stage = 1
                self._server.set_client_first(text)
                judgement = self._judgement
                if judgement is not None and judgement.priority is None:
                    # over the name's failure budget from a failing address:
                    # refused without a challenge, whatever comes next
                    self._stage = 2
                    refusal = self._guard.refuse_unchecked(judgement)
                    return AuthStep(AuthOutcome.FAILURE,
                                    reason_code=ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                                    detail=f"{refusal}; refused without verifying "
                                           f"(user {self._username!r})")
                return AuthStep(AuthOutcome.CONTINUE,
                                self._server.get_server_first().encode("utf-8"))
            if self._stage == 1:
                self._stage = 2
                try:
                    self._server.set_client_final(text)
                    final = self._server.get_server_final().encode("utf-8")
                except (ScramException, UnicodeDecodeError):
                    self._failed()
                    raise
                if not self._known:  # cannot happen (random keys), but never let it in
                    self._failed()
                    return AuthStep(AuthOutcome.FAILURE,
                                    reason_code=ReasonCode.BAD_USER_NAME_OR_PASSWORD)
                if self._judgement is not None:
                    self._guard.succeeded(self._judgement)
                return AuthStep(AuthOutcome.SUCCESS, final, self._username)
        except (ScramException, UnicodeDecodeError) as error:
            # no log line here: the broker logs the refusal once, rate-limited,
            # with this detail
            who = (f"user {self._username!r}" if self._username is not None
                   else "user not known yet")
            return AuthStep(AuthOutcome.FAILURE,
                            reason_code=ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                            detail=f"{error} ({who})")
        return AuthStep(AuthOutcome.FAILURE)

    def _failed(self) -> None:
        """A wrong proof (or garbage instead of it): one failed login."""
        if self._judgement is not None:
            self._guard.failed(self._judgement)


def fake_salt(secret: bytes, username: str, size: int = 16) -> bytes:
    """The made-up salt of an unknown ``username``: ``HMAC-SHA256(secret,
    username)``, repeated to ``size`` bytes (stable for a given secret)."""
    digest = hmac.new(secret, username.encode("utf-8", "surrogateescape"),
                      hashlib.sha256).digest()
    return (digest * (size // len(digest) + 1))[:size]


def fake_credentials(secret: bytes, username: str, iterations: int, salt_size: int):
    """scramp's ``(salt, stored_key, server_key, iterations)`` for an unknown
    user: the stable made-up salt, random keys no proof can match."""
    return fake_salt(secret, username, salt_size), os.urandom(32), os.urandom(32), iterations


def scram_mechanism(lookup: Callable, secret: Optional[bytes] = None,
                    shape: Optional[Callable[[], Tuple[int, int]]] = None,
                    guard: Optional[LoginGuard] = None) -> Callable:
    """A factory for :class:`EnhancedAuthenticator` serving SCRAM-SHA-256 from ``lookup``.

    :param secret: key of the made-up salts of unknown users (default: random
        per call, so stable for the process only; ``PasswordFileChecker.secret``
        is derived from the password file and stable across restarts).
    :param shape: ``f() -> (iterations, salt size)`` of the made-up
        challenges (``PasswordFileChecker.scram_shape``: as the real entries).
    :param guard: the failure budget (``PasswordFileChecker.guard``), applied
        per client address (``client.peer``).
    """
    fake_key = secret if secret is not None else os.urandom(32)
    return lambda client: ScramExchange(lookup, fake_key, shape, guard,
                                        getattr(client, "peer", None))


__all__ = ["EnhancedAuthenticator", "SCRAM_SHA_256", "ScramExchange", "fake_credentials",
           "fake_salt", "scram_mechanism"]
