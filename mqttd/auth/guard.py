"""Who gets a password check, and how soon: failed-login budgets, addresses
known to be good, networks with failures.

One :class:`LoginGuard` serves every way a user name logs in -- the password
file's ``$7$``/``$6$``/SCRAM entries on a plain CONNECT, MQTT 5 SCRAM-SHA-256
exchanges (:mod:`mqttd.auth.scram`), and the blocking ``twisted.cred`` checkers
run through the hashing gate (``--auth unix``) -- so a failure by one way
counts against the others (docs/security.rst, "Failed logins").

It keeps, all bounded:

- the **failure log**: recent failed logins per user name and per address
  (:class:`~mqttd.auth.gate.FailureLog`, forgotten after ``window`` seconds
  without one).  Once a name has ``max_auth_failures`` of them, its logins from
  addresses that failed recently are refused without checking the password
  (:class:`ThrottledLogin`: answered as a wrong password, 0x86 / v3 0x04);
- the **addresses known to be good**: ``(user name, address)`` pairs of recent
  successful logins (at most ``max_known``, least recent forgotten).  Such a
  login is checked first (priority 0) even while its name is under attack:
  a device that logged in before from its address is not queued behind a
  storm of guesses for its name;
- the **networks with failures**: an address's /24 (IPv4) or /48 (IPv6)
  counts too.  An attacker who takes a fresh address for every guess (an
  IPv6 /48 holds 65,536 /64s; a host can use a whole IPv4 /24) has them
  from a few networks: once a network has failed, its new addresses rank as
  suspects (2), behind a new login of the attacked name from elsewhere;
- within priority 1 -- new addresses of a name under attack -- the gate
  serves the **newest address first**
  (:class:`~mqttd.auth.gate.VerificationGate`'s ``newest_first``): guesses
  from a fresh address per attempt spread over many networks (a botnet)
  wait, and time out, behind a login of the name that arrives now, instead
  of the other way round.

Priorities (0 first) of the gate's queue (:meth:`LoginGuard.judge`):

====  =======================================================================
0     the address has no recent failure, and either it is known to be good for
      the name or the name has neither failures nor checks in progress
1     the address and its network have no recent failure, the name has
      failures or checks in progress (a new address; newest first)
2     the address or its network has recent failures (fewer than the
      budget)
3     the address has at least ``max_auth_failures`` recent failures
None  the name is over its budget and the address has recent failures:
      refused without checking
====  =======================================================================
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, Hashable, Optional, Tuple

import attrs
from twisted.cred import error
from twisted.logger import Logger

from mqttd.auth.gate import FailureLog, address_key, peer_host
from mqttd.ratelimit import enclosing_network

log = Logger(namespace="mqttd.auth")

#: failed checks of one user name (within the window) before further checks of
#: it from addresses with recent failures are refused without hashing
DEFAULT_MAX_AUTH_FAILURES = 5
#: seconds without a failure after which a user name's or address's failures
#: are forgotten
DEFAULT_AUTH_FAILURE_WINDOW = 60.0
#: (user name, address) pairs of successful logins remembered
DEFAULT_MAX_KNOWN = 100_000


#: the network an address's failures also count for: its /24 (IPv4,
#: IPv4-mapped IPv6 included) or /48 (IPv6); None for what is no IP address
#: (a UNIX socket's ``-``) -- the broker's one judgement,
#: :func:`mqttd.ratelimit.enclosing_network`
network_key = enclosing_network


class ThrottledLogin(error.UnauthorizedLogin):
    """Refused without checking the password: the user name has many recent
    failures and so has the client's address (answered as a wrong password,
    0x86 / v3 0x04)."""


@attrs.frozen
class Judgement:
    """What :meth:`LoginGuard.judge` decided for one login attempt."""

    username: str
    peer: Optional[str]
    user_key: Tuple[str, str]
    host_key: Tuple[str, str]
    #: ("net", network) of the address, None if it has none
    net_key: Optional[Tuple[str, str]]
    #: the gate priority (0 first), None: refuse without checking
    priority: Optional[int]


class LoginGuard:
    """The failure budget, known-good addresses and failing networks of the
    logins of every checker (see the module docstring).

    :param seconds: ``() -> float``, the clock (a reactor's ``seconds``).
    :param max_auth_failures: failed logins of one user name within the
        window after which its logins from failing addresses are refused
        unchecked (0: never).
    :param auth_failure_window: seconds of quiet after which failures are
        forgotten (> 0).
    :param max_known: (user name, address) pairs of successful logins kept.
    Raises ValueError for values out of range.

    Counters: ``throttled`` (refused unchecked, over budget),
    ``suspicious_successes`` (a success from an address that failed for that
    name recently).
    """

    def __init__(self, seconds: Callable[[], float],
                 max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES,
                 auth_failure_window: float = DEFAULT_AUTH_FAILURE_WINDOW,
                 max_known: int = DEFAULT_MAX_KNOWN):
        if max_auth_failures < 0 or auth_failure_window <= 0:
            raise ValueError("max_auth_failures >= 0 and auth_failure_window > 0 are required")
        if max_known < 0:
            raise ValueError("max_known >= 0 is required")
        self.max_auth_failures = max_auth_failures
        self.max_known = max_known
        #: recent failures by ("user", name), ("host", address key), ("net", network)
        self.failures = FailureLog(seconds, auth_failure_window)
        self._known: "collections.OrderedDict[Tuple[str, Hashable], None]" = \
            collections.OrderedDict()
        #: checks submitted and not answered, per user name
        self._pending: Dict[str, int] = {}
        self.throttled = 0
        self.suspicious_successes = 0

    # --- deciding ------------------------------------------------------------------------

    def judge(self, username: str, peer: Optional[str]) -> Judgement:
        """The :class:`Judgement` of a login of ``username`` from ``peer``
        (``host:port`` or None) now."""
        user_key = ("user", username)
        host = peer_host(peer)
        host_key = ("host", address_key(host))
        network = network_key(host)
        net_key = ("net", network) if network is not None else None
        return Judgement(username, peer, user_key, host_key, net_key,
                         self._priority(username, user_key, host_key, net_key))

    def _priority(self, username: str, user_key, host_key, net_key=None) -> Optional[int]:
        failures = self.failures
        limit = self.max_auth_failures
        host_failures = failures.count(host_key)
        if host_failures:
            if limit and failures.count(user_key) >= limit:
                return None
            return 3 if limit and host_failures >= limit else 2
        if (username, host_key[1]) in self._known:
            return 0
        if not (failures.count(user_key) or self._pending.get(username)):
            return 0
        if net_key is not None and failures.count(net_key):
            return 2
        return 1

    def refuse_unchecked(self, judgement: Judgement) -> ThrottledLogin:
        """Count a throttled attempt; the error to answer it with."""
        self.throttled += 1
        return ThrottledLogin(f"{self.failures.count(judgement.user_key)} recent failed "
                              "logins for this user name")

    # --- checks in progress -------------------------------------------------------------

    def begin(self, judgement: Judgement) -> None:
        """A check of ``judgement`` is submitted (right after :meth:`judge`);
        :meth:`end` when it is answered."""
        username = judgement.username
        self._pending[username] = self._pending.get(username, 0) + 1

    def end(self, judgement: Judgement) -> None:
        """The check :meth:`begin` counted was answered (or failed)."""
        _decrement(self._pending, judgement.username)

    # --- outcomes ------------------------------------------------------------------------

    def failed(self, judgement: Judgement) -> None:
        """Count one failed login (wrong password, unknown name, wrong SCRAM
        proof); the WARN line when the name reaches its budget."""
        failures = self.failures
        count = failures.note(judgement.user_key)
        failures.note(judgement.host_key)
        if judgement.net_key is not None:
            failures.note(judgement.net_key)
        if count == self.max_auth_failures:
            log.warn("{count} failed logins for user name {username!r} within "
                     "{window:g} s: its checks from addresses with recent failures are "
                     "refused without hashing until {window:g} s pass without one",
                     count=count, username=judgement.username, window=failures.window)

    def succeeded(self, judgement: Judgement) -> None:
        """Remember the address as good for the name; log (WARN) a success
        from an address that failed for that name recently: a guessed
        password looks like this."""
        failures = self.failures
        if self.max_known:
            pair = (judgement.username, judgement.host_key[1])
            known = self._known
            known.pop(pair, None)
            while len(known) >= self.max_known:
                known.popitem(last=False)
            known[pair] = None
        if failures.count(judgement.host_key) and failures.count(judgement.user_key):
            self.suspicious_successes += 1
            log.warn("Login of user name {username!r} from {peer} succeeded after "
                     "{count} recent failed logins from that address",
                     username=judgement.username, peer=judgement.peer,
                     count=failures.count(judgement.host_key))

    def pending(self, username: str) -> int:
        """Checks of ``username`` in progress."""
        return self._pending.get(username, 0)


def _decrement(counts: Dict[str, int], key: str) -> None:
    count = counts.get(key, 0) - 1
    if count > 0:
        counts[key] = count
    else:
        counts.pop(key, None)


__all__ = ["DEFAULT_AUTH_FAILURE_WINDOW", "DEFAULT_MAX_AUTH_FAILURES",
           "Judgement", "LoginGuard", "ThrottledLogin",
           "network_key"]
