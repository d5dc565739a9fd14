"""``--metrics-listen``, ``--admin-listen``: the admin listeners as child services.

:func:`install` is the tap ``FEATURES`` hook: from the options it adds an
:class:`AdminService` to the :class:`~mqttd.service.BrokerService`.  The admin
listener refuses to start beyond loopback without credentials: judged on the
endpoint string at option time (:func:`check_admin_listen`: one line, exit 2)
and on the address really bound at start (:func:`check_admin_bound`), with
the same judgement of "loopback" as the anonymous policy (:mod:`mqttd.loopback`).
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

from twisted.application.service import Service
from twisted.logger import Logger, globalLogPublisher
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from mqttd.admin.api import AccessPolicy, AdminAPI, Dashboard, StatsHistory, TopTopics
from mqttd.admin.metrics import make_registry, metrics_resource
from mqttd.admin.ring import IncidentRing
from mqttd.loopback import check_bound, is_loopback_endpoint

log = Logger(namespace="mqttd.admin")


def endpoint_interface(description: str) -> Optional[str]:
    """The interface a server endpoint string binds, read as Twisted binds it
    (the last of a repeated ``interface=``): ``tcp:8080:interface=127.0.0.1``
    gives ``127.0.0.1``; ``tcp:8080`` gives ``""`` (every interface);
    ``unix:...`` gives ``"unix"``; other kinds None (unknown).  For messages:
    whether that is loopback is :func:`mqttd.loopback.is_loopback_endpoint`'s call."""
    from twisted.internet.endpoints import _parse  # serverFromString's own parser
    try:
        args, options = _parse(description)
    except Exception:
        return None
    kind = str(args[0]).lower() if args else ""
    if kind == "unix":
        return "unix"
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    return options.get("interface", "")


def check_admin_listen(description: str, token: Optional[str], users: Sequence[str]) -> None:
    """Raise ValueError if ``description`` reaches beyond loopback without
    credentials -- judged by :func:`mqttd.loopback.is_loopback_endpoint`, the
    one judgement the anonymous policy uses too (a repeated ``interface=`` is
    read as Twisted binds it: the last one, REVIEW-SEC2 N6)."""
    if token or users:
        return
    if not is_loopback_endpoint(description):
        interface = endpoint_interface(description)
        where = "every interface" if interface == "" else (interface or "an unknown address")
        raise ValueError(f"{description} listens on {where}: beyond loopback the admin API "
                         "needs --admin-token TOKEN (or --admin-user with the broker's "
                         "password file)")


def check_admin_bound(description: str, port) -> None:
    """Once bound: a credential-less admin listener must really be on loopback."""
    check_bound(description, port, "the admin API without --admin-token or --admin-user "
                                   "is served on loopback only")


#: HTTP connections one client address may hold open on one admin or metrics
#: listener (a browser opens ~6, Prometheus 1); more are closed at accept and
#: counted as the refusal ``http-connections``
MAX_HTTP_CONNECTIONS_PER_ADDRESS = 16


#: bytes of request body an admin or metrics request may carry (none of their
#: requests needs one): a larger declared ``Content-Length`` is answered 413
#: from the headers and the connection closed, before any of the body is read;
#: a chunked body is cut off the same way once it passes the bound.  Bodies are
#: kept in memory, never in a temporary file (REVIEW-S10 S7: a 200 MB POST
#: without credentials went to a temp file before the 401)
MAX_HTTP_REQUEST_BODY = 64 * 1024

_TOO_LARGE = (b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n"
              b"Connection: close\r\n\r\n")


class _BoundedRequest(Request):
    """A request whose body is bounded by :data:`MAX_HTTP_REQUEST_BODY`."""

    _body_bytes = 0
    _refused = False

    def gotLength(self, length):
        self.content = io.BytesIO()
        if length is not None and length > MAX_HTTP_REQUEST_BODY:
            self._refuse_body(f"declared body of {length} bytes")

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_HTTP_REQUEST_BODY:
            self._refuse_body(f"body over {MAX_HTTP_REQUEST_BODY} bytes")
            return
        self.content.write(data)

    def requestReceived(self, command, path, version):
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse_body(self, what: str) -> None:
        self._refused = True
        self.content = io.BytesIO()
        channel = self.channel
        site = getattr(channel, "site", None)
        peer = channel.transport.getPeer()
        if site is not None:
            site.broker.refused("http-body", None,
                                f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', 0)}",
                                f"{what}: over the {MAX_HTTP_REQUEST_BODY} byte limit of the "
                                f"admin and metrics listeners; answered 413")
        channel.transport.write(_TOO_LARGE)
        channel.loseConnection()


class _Channel(HTTPChannel):
    """An HTTPChannel that tells its site when it closes (per-address count)."""

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            self.site.channel_closed(self)


class BoundedSite(Site):
    """A ``twisted.web`` Site for the admin and metrics listeners, bounded like
    the MQTT listeners: at most :data:`MAX_HTTP_CONNECTIONS_PER_ADDRESS` open
    connections per client address (more are closed at accept, counted and
    logged rate-limited as ``http-connections``), and twisted.web's own
    per-connection lines (``Timing out client``...) go through the broker's
    log rate limiter, keyed by the client's address, instead of one line per
    socket.  A request body is at most :data:`MAX_HTTP_REQUEST_BODY` bytes,
    held in memory (larger: 413, counted and logged as ``http-body``).

    :param broker: the :class:`~mqttd.broker.Broker` (its ``refused`` and
        ``log_limiter``).
    """

    protocol = _Channel

    def __init__(self, resource, broker, max_per_address: int = MAX_HTTP_CONNECTIONS_PER_ADDRESS,
                 **kwargs):
        kwargs.setdefault("requestFactory", _BoundedRequest)
        super().__init__(resource, **kwargs)
        self.broker = broker
        self.max_per_address = max_per_address
        self.open_by_address = {}

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None) or str(addr)
        count = self.open_by_address.get(host, 0)
        if count >= self.max_per_address:
            self.broker.refused("http-connections", None, f"{host}:{getattr(addr, 'port', 0)}",
                                f"already {count} open HTTP connections from this address "
                                f"(the limit per listener)")
            return None
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        self.open_by_address[host] = count + 1
        channel._mqttd_host = host
        limiter = self.broker.log_limiter

        def observe(event, host=host):
            # twisted.web's lines about this socket: rate-limited by address
            if limiter.check((host, "http")) is not None:
                globalLogPublisher(event)
        channel._log = Logger(namespace="twisted.web.http.HTTPChannel", source=channel,
                              observer=observe)
        return channel

    def channel_closed(self, channel) -> None:
        host = getattr(channel, "_mqttd_host", None)
        if host is None:
            return
        left = self.open_by_address.get(host, 0) - 1
        if left > 0:
            self.open_by_address[host] = left
        else:
            self.open_by_address.pop(host, None)


class AdminService(Service):
    """Serves ``/metrics`` and/or the admin API + dashboard for one BrokerService."""

    name = "mqttd-admin"

    def __init__(self, reactor, broker_service, metrics_listen: Sequence[str] = (),
                 admin_listen: Sequence[str] = (), token: Optional[str] = None,
                 users: Sequence[str] = ()):
        self.reactor = reactor
        self.broker_service = broker_service
        broker = broker_service.broker
        self.broker = broker
        self.metrics_listen = list(metrics_listen)
        self.admin_listen = list(admin_listen)
        #: no credentials: the admin listeners must be on loopback (checked when bound)
        self.open = not token and not users
        for description in self.admin_listen:
            check_admin_listen(description, token, users)
        self.ring = IncidentRing(broker.clock)
        self.registry = make_registry(broker, broker_service, self.ring)
        self.history = StatsHistory(broker, broker.clock)
        self.top = TopTopics(broker, broker.clock)
        policy = AccessPolicy(token, users, lambda: broker.authenticator,
                              refused=broker.refused)
        self.api = AdminAPI(broker, self.ring, policy, broker_service, self.history, self.top)

    def sites(self):
        """``[(kind, endpoint description, Site)]`` to listen on."""
        metrics_site = BoundedSite(metrics_resource(self.registry), self.broker)
        admin_site = BoundedSite(Dashboard(self.api), self.broker)
        for site in (metrics_site, admin_site):
            site.displayTracebacks = False
            site.noisy = False
        return ([("metrics", d, metrics_site) for d in self.metrics_listen] +
                [("admin", d, admin_site) for d in self.admin_listen])

    def startService(self):
        super().startService()
        self.ring.attach(self.broker)
        self.history.start()

    def stopService(self):
        super().stopService()
        self.history.stop()
        self.top.stop()
        self.ring.detach()


def install(service, options) -> Optional[AdminService]:
    """The tap FEATURES hook: add the admin listeners the options ask for."""
    metrics = options["metrics-listen"] or []
    admin = options["admin-listen"] or []
    if not metrics and not admin:
        return None
    admin_service = AdminService(service.reactor, service, metrics, admin,
                                 options["admin-token"], options["admin-user"] or [])
    admin_service.setServiceParent(service)
    for kind, description, site in admin_service.sites():
        # listened on with the MQTT listeners (before the store opens); a port
        # in use stops the start with one line, like an MQTT listener
        check = check_admin_bound if kind == "admin" and admin_service.open else None
        service.add_listener(kind, description, site, check=check)
    return admin_service
