"""Server endpoints for ``mqtts:``, ``ws:`` and ``wss:`` listeners (layer L4).

The endpoint-string parsers in ``twisted/plugins/mqttd_endpoints.py`` build
these, so the same strings work in ``twistd mqttd --listen``, in
``make_broker_service(listen=[...])`` and in any program that calls
``serverFromString``::

    mqtts:8883:privateKey=key.pem[:certKey=cert.pem][:extraCertChain=chain.pem]
          [:caCerts=ca.pem][:requireCert=yes][:identityAsUsername=yes]
          [:tlsMinimum=1.2][:interface=ADDR][:backlog=N]
    ws:9001[:path=/mqtt][:trustXForwardedFor=N][:allowedOrigins=LIST][:interface=ADDR][:backlog=N]
    wss:9443:privateKey=key.pem[:certKey=cert.pem][... every mqtts: option][:path=/mqtt]
        [:allowedOrigins=LIST]

``path=*`` answers WebSocket requests on any path.  ``allowedOrigins=`` is a
comma-separated list of the origins browser pages may connect from
(``app.example.com,*.example.org``: any scheme and port; ``https\\://app.example.com``
with the colon escaped; ``*``: any origin); the default and the rules are in
:mod:`mqttd.transports.websocket`.  The PROXY protocol
(``haproxy:``) is Twisted's own wrapper and composes with all of them:
``haproxy:tcp:1883``, ``haproxy:mqtts:8883:...``.
"""
from __future__ import annotations

from typing import Iterator, Optional

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mqttd.transports.tls import TLSConfigError, TLSServerOptions, certificate_identity
from mqttd.transports.websocket import DEFAULT_PATH, MQTTWebSocketFactory, origin_patterns

#: listen backlog of these listeners unless ``backlog=`` says otherwise (the
#: same as the broker service gives TCP; Twisted's 50 drops connections in a
#: reconnect storm)
DEFAULT_BACKLOG = 1024

_TRUE = ("yes", "true", "1", "on")
_FALSE = ("no", "false", "0", "off")


def parse_bool(value, name: str) -> bool:
    """``yes/true/1/on`` or ``no/false/0/off`` (any case) as a bool.

    :raises ValueError: anything else, naming the option.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be yes or no, not {value!r}")


class _ConfiguringFactory(Factory):
    """Builds ``wrapped``'s protocols and sets ``attributes`` on each (no extra layer)."""

    def __init__(self, wrapped, **attributes):
        self.wrapped = wrapped
        self.attributes = attributes

    def logPrefix(self):
        prefix = getattr(self.wrapped, "logPrefix", None)
        return prefix() if prefix is not None else type(self.wrapped).__name__

    def doStart(self):
        self.wrapped.doStart()

    def doStop(self):
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is not None:
            for name, value in self.attributes.items():
                setattr(protocol, name, value)
        return protocol


@implementer(IStreamServerEndpoint)
class MQTTServerEndpoint:
    """A TCP listener with optional TLS and optional WebSocket framing.

    :param tls: the listener's :class:`TLSServerOptions` (None: plain TCP).
    :param websocket_path: serve MQTT over WebSocket on this path (``"*"``:
        any path); None: MQTT directly on the stream.
    :param identity_as_username: the client certificate's Common Name is the
        username and no password is checked (mosquitto's
        ``use_identity_as_username``); a client without one gets CONNACK 0x87
        (v3: 0x05).  Needs ``tls`` with client certificates.
    """

    def __init__(self, reactor, port: int, tls: Optional[TLSServerOptions] = None,
                 websocket_path: Optional[str] = None, identity_as_username: bool = False,
                 backlog: int = DEFAULT_BACKLOG, interface: str = "",
                 trust_x_forwarded_for: int = 0, allowed_origins=None):
        if identity_as_username and (tls is None or tls.client_certificates == "none"):
            raise TLSConfigError("identityAsUsername=yes needs caCerts=FILE (client "
                                 "certificates are the identity)")
        self.reactor = reactor
        self.port = port
        #: the listener's TLS options (reloaded by BrokerService.reload / SIGHUP)
        self.tls_options = tls
        self.websocket_path = websocket_path
        self.identity_as_username = identity_as_username
        self.trust_x_forwarded_for = trust_x_forwarded_for
        #: the WebSocket origin patterns (None: the default policy)
        self.allowed_origins = allowed_origins
        self._endpoint = TCP4ServerEndpoint(reactor, port, backlog, interface)

    def listen(self, factory):
        """Listen with the layers in wire order: [PROXY] TLS [WebSocket] MQTT.

        Twisted's ``haproxy:`` wraps the factory it is given, which would put
        the PROXY header *inside* TLS; balancers send it in clear before the
        handshake, so a PROXY wrapper handed in is moved outside TLS.
        """
        proxy = factory if isinstance(factory, HAProxyWrappingFactory) else None
        if proxy is not None:
            factory = proxy.wrappedFactory
        if self.identity_as_username:
            factory = _ConfiguringFactory(factory, transport_identity=certificate_identity)
        if self.websocket_path is not None:
            path = None if self.websocket_path == "*" else self.websocket_path
            factory = MQTTWebSocketFactory(factory, path=path, secure=self.tls_options is not None,
                                           trust_x_forwarded_for=self.trust_x_forwarded_for,
                                           allowed_origins=self.allowed_origins,
                                           ambient_credentials=self.identity_as_username)
        if self.tls_options is not None:
            factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
        if proxy is not None:  # the same wrapper (its class, its broker) outside
            proxy.wrappedFactory = factory
            factory = proxy
        return self._endpoint.listen(factory)


def tls_options_in(endpoint) -> Iterator[TLSServerOptions]:
    """The :class:`TLSServerOptions` of ``endpoint`` and of endpoints it wraps.

    Walks wrappers such as Twisted's PROXY-protocol endpoint
    (``haproxy:mqtts:...``).
    """
    seen = set()
    while endpoint is not None and id(endpoint) not in seen:
        seen.add(id(endpoint))
        options = getattr(endpoint, "tls_options", None)
        if options is not None:
            yield options
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)


# --- the endpoint-string parsers (used by twisted/plugins/mqttd_endpoints.py) --------

_TLS_OPTIONS = ("privateKey", "certKey", "extraCertChain", "caCerts", "requireCert",
                "tlsMinimum", "identityAsUsername")


def _options(prefix: str, args, kwargs: dict, allowed) -> dict:
    """Check every option's name first, so a typo is reported as such."""
    if args:
        raise ValueError(f"{prefix}: unexpected positional argument(s) {list(args)}")
    unknown = sorted(set(kwargs) - set(allowed) - {"backlog", "interface"})
    if unknown:
        raise ValueError(f"{prefix}: unknown option(s) {unknown}; known: "
                         f"{sorted(set(allowed) | {'backlog', 'interface'})}")
    return dict(kwargs)


def _tls(options: dict) -> TLSServerOptions:
    private_key = options.get("privateKey")
    if not private_key:
        raise TLSConfigError("privateKey=FILE is required (PEM, unencrypted)")
    return TLSServerOptions(
        private_key=private_key,
        certificate=options.get("certKey"),
        extra_chain=options.get("extraCertChain"),
        ca_certs=options.get("caCerts"),
        require_certificate=parse_bool(options.get("requireCert", "no"), "requireCert"),
        minimum=str(options.get("tlsMinimum", "1.2")))


def _listener(reactor, port, options: dict, tls=None, path=None) -> MQTTServerEndpoint:
    identity = parse_bool(options.get("identityAsUsername", "no"), "identityAsUsername")
    try:
        forwarded = int(options.get("trustXForwardedFor", 0))
    except ValueError:
        raise ValueError("trustXForwardedFor must be a number of proxies") from None
    if forwarded < 0:
        raise ValueError("trustXForwardedFor must be 0 or more")
    origins = options.get("allowedOrigins")
    if origins is not None:
        origins = origin_patterns(origins)  # ValueError: refused at start-up
    return MQTTServerEndpoint(
        reactor, int(port), tls=tls, websocket_path=path, identity_as_username=identity,
        trust_x_forwarded_for=forwarded, allowed_origins=origins,
        backlog=int(options.get("backlog", DEFAULT_BACKLOG)),
        interface=options.get("interface", ""))


def parse_mqtts(reactor, port, *args, **kwargs) -> MQTTServerEndpoint:
    """``mqtts:PORT:privateKey=...``: MQTT over TLS (see the module docstring)."""
    options = _options("mqtts", args, kwargs, _TLS_OPTIONS)
    return _listener(reactor, port, options, tls=_tls(options))


def parse_ws(reactor, port, *args, **kwargs) -> MQTTServerEndpoint:
    """``ws:PORT[:path=/mqtt]``: MQTT over WebSocket."""
    options = _options("ws", args, kwargs, ("path", "trustXForwardedFor", "allowedOrigins"))
    return _listener(reactor, port, options, path=options.get("path", DEFAULT_PATH))


def parse_wss(reactor, port, *args, **kwargs) -> MQTTServerEndpoint:
    """``wss:PORT:privateKey=K[:certKey=C]...``: MQTT over WebSocket over TLS."""
    options = _options("wss", args, kwargs,
                       _TLS_OPTIONS + ("path", "trustXForwardedFor", "allowedOrigins"))
    return _listener(reactor, port, options, tls=_tls(options),
                     path=options.get("path", DEFAULT_PATH))
