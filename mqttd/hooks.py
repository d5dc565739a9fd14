"""The values and helpers of the broker's authentication and authorization hooks (layer L3).

The connection asks the hooks of :class:`mqttd.interfaces.IAuthenticator`,
:class:`~mqttd.interfaces.IAuthorizer` and
:class:`~mqttd.interfaces.IEnhancedAuthenticator`; each may answer with a value
or a Deferred.  This module holds what both sides share: the request and
step values, the normalisation of answers (:func:`auth_outcome`), the
sentinel for a hook that raised or timed out.
"""
from __future__ import annotations

from typing import Optional, Tuple

import attrs
from twisted.python.failure import Failure

from mqttd.codec.errors import ReasonCode


@attrs.frozen
class AuthRequest:
    """What :meth:`IAuthenticator.authenticate` is asked about one CONNECT."""

    client_id: str
    username: Optional[str]
    password: Optional[bytes]
    peer: Optional[str]
    protocol_level: int
    connect: object = None


class AuthOutcome:
    CONTINUE = "continue"
    SUCCESS = "success"
    FAILURE = "failure"


@attrs.frozen
class AuthStep:
    """One answer of an enhanced-authentication exchange [MQTT-4.12].

    ``outcome``: :attr:`AuthOutcome.CONTINUE` (the server sends AUTH 0x18 with
    ``data``), ``SUCCESS`` (CONNACK 0x00, or AUTH 0x00 on re-authentication,
    with ``data``; ``username`` is the authenticated identity) or ``FAILURE``
    (CONNACK / DISCONNECT with ``reason_code``, 0x87 by default).  ``detail``
    says why a FAILURE failed, for the broker's one rate-limited refusal line
    (never a secret); the exchange itself logs nothing a client can trigger.
    """

    outcome: str
    data: Optional[bytes] = None
    username: Optional[str] = None
    reason_code: int = ReasonCode.NOT_AUTHORIZED
    detail: Optional[str] = None


class _HookFailed:
    """A hook raised, failed or timed out: the broker refuses."""

    def __init__(self, name: str = "HOOK_FAILED"):
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __bool__(self) -> bool:
        return False


HOOK_FAILED = _HookFailed()
#: the ``authenticate`` hook (or an enhanced-authentication step) gave no
#: answer within ``hook_timeout``: nothing was decided, the server is busy --
#: CONNACK 0x89 Server busy (MQTT 3.1.1: 0x03 Server unavailable), not a refusal
HOOK_TIMED_OUT = _HookFailed("HOOK_TIMED_OUT")


class _Anonymous:
    """Accepted as an anonymous client: the CONNECT's user name is not taken."""

    def __repr__(self) -> str:
        return "ANONYMOUS"


#: An ``authenticate`` answer: let the client in as anonymous -- its user name,
#: which nobody checked, labels neither its session (ownership) nor its ACL
#: rules.  What :class:`mqttd.auth.Authenticator` answers for a CONNECT with a
#: user name when no checker is configured and anonymous clients are allowed
#: (mosquitto 2 lets such clients in too).
ANONYMOUS = _Anonymous()


def call_hook(hook, *args):
    """``hook(*args)``; an exception becomes a :class:`Failure` value (never raised)."""
    try:
        return hook(*args)
    except Exception:
        return Failure()


def auth_outcome(result, username: Optional[str]) -> Tuple[int, Optional[str]]:
    """Normalise an ``authenticate`` answer to ``(reason_code, username)``.

    ``True``/``0``/``None``: accepted with ``username``; a ``str``: accepted as
    that username; :data:`ANONYMOUS`: accepted without a user name; ``False``:
    0x86 Bad user name or password; an int >= 0x80: that code;
    :data:`HOOK_TIMED_OUT`: 0x89 Server busy; :data:`HOOK_FAILED` or anything
    else: 0x87 Not authorized.
    """
    if result is HOOK_TIMED_OUT:
        return ReasonCode.SERVER_BUSY, username
    if result is True or result is None or (type(result) is int and result == 0):
        return 0, username
    if result is ANONYMOUS:
        return 0, None
    if isinstance(result, str):
        return 0, result
    if result is False:
        return ReasonCode.BAD_USER_NAME_OR_PASSWORD, username
    if isinstance(result, int) and result >= 0x80:
        return result, username
    return ReasonCode.NOT_AUTHORIZED, username


__all__ = ["ANONYMOUS", "AuthOutcome", "AuthRequest", "AuthStep", "HOOK_FAILED",
           "HOOK_TIMED_OUT",
           "auth_outcome", "call_hook"]
