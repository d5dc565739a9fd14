"""Compose the security of a broker from its options: policy, checkers, ACL, SCRAM.

:func:`install` is the ``twistd mqttd`` feature hook (``mqttd.tap.FEATURES``);
embedders call :func:`configure` with the same choices.

Anonymous policy (as mosquitto 2, see docs/security.rst): clients without a
user name are let in only when nothing else is configured -- no password file,
no checker, no ACL, every listener on loopback (or a UNIX socket) -- or when
``allow_anonymous`` says so.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import attrs
from twisted.logger import Logger

from mqttd.auth.acl import ACLAuthorizer
from mqttd.auth.checkers import (DEFAULT_AUTH_FAILURE_WINDOW, DEFAULT_MAX_AUTH_FAILURES,
                                 Authenticator, CheckerChain, GatedChecker,
                                 PasswordFileChecker, make_portal)
from mqttd.auth.gate import VerificationGate
from mqttd.auth.guard import LoginGuard
from mqttd.auth.scram import SCRAM_SHA_256, EnhancedAuthenticator, scram_mechanism
from mqttd.loopback import check_bound, is_loopback_endpoint

log = Logger(namespace="mqttd.auth")


def anonymous_policy(listen: Iterable[str], authentication_configured: bool,
                     allow_anonymous: Optional[bool]) -> Tuple[bool, str]:
    """``(anonymous allowed, why)`` by mosquitto 2's rules."""
    if allow_anonymous:
        return True, "--allow-anonymous is set"
    if allow_anonymous is False:
        return False, "allow_anonymous is false"
    if authentication_configured:
        return False, "authentication is configured (use --allow-anonymous to let them in)"
    exposed = [d for d in listen if not is_loopback_endpoint(d)]
    if exposed:
        return False, (f"listening beyond loopback on {', '.join(exposed)} "
                       "(use --allow-anonymous to let them in)")
    return True, "every listener is on loopback and no authentication is configured"


@attrs.define
class Security:
    """What :func:`configure` built; :meth:`attach` puts it into a broker service."""

    authenticator: Authenticator
    authorizer: Optional[ACLAuthorizer]
    enhanced: EnhancedAuthenticator
    password_checker: Optional[PasswordFileChecker]
    allow_anonymous: bool
    policy: str
    #: the password checks' gate (None: nothing to hash)
    gate: Optional[VerificationGate] = None

    def attach(self, service) -> None:
        broker = service.broker
        gate = self.gate
        if gate is not None:
            # every check is answered (0x9F "busy" at worst) before the
            # broker's hook timeout would refuse it as a failed hook
            hook_timeout = broker.config.hook_timeout
            gate.deadline = min(gate.deadline, 0.8 * hook_timeout)
            gate.max_wait = min(gate.max_wait, gate.deadline)
        if self.allow_anonymous and self.policy.startswith("every listener is on loopback"):
            # the policy relied on the endpoint strings: the bound addresses must agree
            why = "anonymous clients are allowed only while every listener is on loopback"
            service.add_bind_check(
                lambda description, port: check_bound(description, port, why))
        broker.authenticator = self.authenticator
        broker.enhanced_authenticator = self.enhanced
        if self.authorizer is not None:
            broker.authorizer = self.authorizer
            forget = getattr(self.authorizer, "forget", None)
            if forget is not None:
                # a client's cached ACL decisions go when it does (REVIEW-S10 S9)
                broker.on("clientDisconnected",
                          lambda client=None, **_fields: forget(client.client_id))
        if self.password_checker is not None:
            service.add_reloader("password_file", self.password_checker.reload)
        if self.authorizer is not None and self.authorizer.path is not None:
            authorizer = self.authorizer

            def reload_acl():
                authorizer.reload()
                # the live subscriptions are re-checked in slices (a few
                # thousand per reactor turn); the reload is done when they are
                return broker.recheck_subscriptions().addCallback(
                    lambda removed: log.info(
                        "ACL reloaded; {removed} live subscriptions no longer allowed "
                        "were removed", removed=removed))
            service.add_reloader("acl_file", reload_acl)
        log.info("Anonymous clients are {policy}: {why}",
                 policy="allowed" if self.allow_anonymous else "refused", why=self.policy)


def configure(reactor, listen: Sequence[str], password_file: Optional[str] = None,
              acl_file: Optional[str] = None, auth: Sequence[str] = (),
              checkers: Sequence = (), allow_anonymous: Optional[bool] = None,
              max_password_checks: Optional[int] = None,
              max_password_checks_per_peer: int = 1,
              max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES,
              auth_failure_window: float = DEFAULT_AUTH_FAILURE_WINDOW) -> Security:
    """Build the :class:`Security` for these choices.

    :param password_file: mosquitto password file (also serves SCRAM-SHA-256).
    :param max_password_checks: its hashes verified at once (None: cores - 1,
        1 to 4); see :class:`~mqttd.auth.gate.VerificationGate`.
    :param max_password_checks_per_peer: of them, for one client address (1).
    :param max_auth_failures: failed logins of one user name (within
        ``auth_failure_window`` seconds) after which its checks from addresses
        with recent failures are refused without hashing (5; 0 = no budget);
        see :mod:`mqttd.auth.guard`.
    :param auth: ``twisted.cred.strcred`` descriptions (``unix``, ``memory:u:p``...);
        all but ``memory`` block (``crypt``, file reads): they run in the
        password checks' thread pool (:class:`~mqttd.auth.checkers.GatedChecker`).
        Several ``IUsernamePassword`` checkers (the password file's, ``checkers``,
        ``auth``'s) are asked in that order (:class:`~mqttd.auth.checkers.CheckerChain`).
    :param checkers: more ``ICredentialsChecker`` objects (embedders).
    :param allow_anonymous: True/False to force; None for the automatic policy.
    Raises OSError / ValueError for unreadable files or bad descriptions.
    """
    from twisted.cred import strcred

    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
    from twisted.cred.credentials import IUsernamePassword

    all_checkers: List = list(checkers)
    password_checker = None
    gate = guard = None
    blocking = []
    for description in auth:
        checker = strcred.makeChecker(description)
        if (IUsernamePassword in checker.credentialInterfaces
                and not isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse)):
            blocking.append(checker)
        else:
            all_checkers.append(checker)
    if password_file or blocking:
        gate = VerificationGate(reactor, max_concurrent=max_password_checks,
                                per_peer=max_password_checks_per_peer)
        guard = LoginGuard(reactor.seconds, max_auth_failures, auth_failure_window)
    if password_file:
        password_checker = PasswordFileChecker(password_file, reactor, gate=gate, guard=guard)
        all_checkers.insert(0, password_checker)
    for checker in blocking:
        all_checkers.append(GatedChecker(checker, gate, guard))
    authorizer = ACLAuthorizer.from_file(acl_file) if acl_file else None
    configured = bool(all_checkers)
    allowed, why = anonymous_policy(listen, configured, allow_anonymous)
    passwords = [c for c in all_checkers if IUsernamePassword in c.credentialInterfaces]
    if len(passwords) > 1:
        # a Portal keeps one checker per interface: chain them, in order
        all_checkers = [c for c in all_checkers if c not in passwords]
        all_checkers.append(CheckerChain(passwords, guard))
    portal = make_portal(all_checkers) if all_checkers else None
    enhanced = EnhancedAuthenticator()
    if password_checker is not None:
        enhanced.register(SCRAM_SHA_256,
                          scram_mechanism(password_checker.scram_lookup,
                                          secret=password_checker.secret,
                                          shape=password_checker.scram_shape,
                                          guard=guard))
    return Security(Authenticator(portal, allowed), authorizer, enhanced,
                    password_checker, allowed, why, gate)


def _given(value, default):
    return default if value is None else value


def install(service, options) -> None:
    """``mqttd.tap.FEATURES`` hook: security (and per-listener connection limits)
    from the ``twistd mqttd`` options."""
    security = configure(
        service.reactor, service.endpoints,
        password_file=options["password-file"], acl_file=options["acl-file"],
        auth=options["auth"] or (), allow_anonymous=True if options["allow-anonymous"] else None,
        max_password_checks=options["max-password-checks"],
        max_password_checks_per_peer=options["max-password-checks-per-peer"] or 1,
        max_auth_failures=_given(options["max-auth-failures"], DEFAULT_MAX_AUTH_FAILURES),
        auth_failure_window=_given(options["auth-failure-window"],
                                   DEFAULT_AUTH_FAILURE_WINDOW))
    security.attach(service)
    limits = {}
    for value in options["listener-max-connections"] or ():
        description, _, count = value.rpartition("=")
        if description not in service.endpoints:
            from twisted.python.usage import UsageError
            raise UsageError(f"--listener-max-connections: {description!r} is not one of "
                             f"the --listen endpoints {service.endpoints}")
        limits[description] = int(count)
    service.listener_max_connections.update(limits)


__all__ = ["Security", "anonymous_policy", "configure", "install", "is_loopback_endpoint"]
