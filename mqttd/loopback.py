"""Is a listener reachable from this host only?  The one judgement of "loopback".

Two places decide what a listener on loopback may skip: the anonymous policy
(:func:`mqttd.auth.setup.anonymous_policy`: anonymous clients while every MQTT
listener is on loopback) and the admin API (no credentials on loopback).  Both
judge the endpoint *string* before listening and the *bound address* after:

- :func:`is_loopback_endpoint` reads a description with Twisted's own
  parser, as ``serverFromString`` binds it (for a repeated ``key=`` the last
  value -- REVIEW-SEC S3, REVIEW-SEC2 N6);
- :func:`check_bound` then checks the port Twisted really opened
  (``IListeningPort.getHost()``): a listener judged loopback that is bound
  to any other address stops the start, whatever the string said.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Optional

__all__ = ["is_loopback_host", "is_loopback_endpoint", "bound_host", "check_bound"]

_LOOPBACK_NAME = re.compile(r"^(localhost|localhost6|ip6-localhost|ip6-loopback)$", re.I)


def is_loopback_host(host: Optional[str]) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, ::ffff:127.x) or ``localhost``;
    False for anything else, ``""`` (every interface) and None."""
    if not host:
        return False
    host = host.strip("[]")
    if _LOOPBACK_NAME.match(host):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped is not None and mapped.is_loopback)


def is_loopback_endpoint(description: str) -> bool:
    """True for a listener reachable from this host only.

    UNIX sockets, and TCP-like endpoints (also ``ws:...``) whose
    ``interface=`` is a loopback address.  Any other listener -- no
    ``interface=`` means all interfaces -- is not, and neither is a listener
    that carries other hosts' clients through a proxy on this host: a
    ``haproxy:`` (PROXY protocol) listener, or one that trusts
    ``X-Forwarded-For`` (``trustXForwardedFor=N``, N > 0).  The description
    is read as Twisted reads it (the last of a repeated option); one it
    cannot parse is not loopback.
    """
    from twisted.internet.endpoints import _parse  # serverFromString's own parser
    try:
        args, options = _parse(description)
    except Exception:
        return False  # not even parseable: certainly not known to be loopback
    kind = str(args[0]).lower() if args else ""
    if kind == "haproxy":
        return False  # the balancer in front forwards remote clients
    for key, value in options.items():
        if key.lower() == "trustxforwardedfor":
            try:
                if int(value) > 0:
                    return False  # a reverse proxy on loopback forwards remote clients
            except ValueError:
                return False
    if kind == "unix":
        return True
    return is_loopback_host(options.get("interface"))


def bound_host(port) -> Optional[str]:
    """The address a listening port is bound to: ``"unix"`` for a UNIX
    socket, the IP address otherwise, None if the port does not say."""
    try:
        address = port.getHost()
    except Exception:
        return None
    if getattr(address, "name", None) is not None and not hasattr(address, "host"):
        return "unix"  # twisted.internet.address.UNIXAddress
    host = getattr(address, "host", None)
    return str(host) if host is not None else None


def check_bound(description: str, port, why: str) -> None:
    """Raise ValueError if ``port`` (listening for ``description``) is not
    bound to loopback although ``why`` (the policy) relies on it."""
    host = bound_host(port)
    if host == "unix" or is_loopback_host(host):
        return
    raise ValueError(f"it is bound to {host or 'an unknown address'}, not loopback, "
                     f"but {why}")
