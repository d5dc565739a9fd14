"""MQTT over WebSocket, on autobahn (layer L4).

A :class:`MQTTWebSocketFactory` wraps the broker's stream factory: each
WebSocket connection negotiates the subprotocol ``mqtt`` (MQTT 3.1.1 and 5.0,
[MQTT-6.0.0-3], [MQTT-6.0.0-4]) or ``mqttv3.1`` (MQTT 3.1), then becomes the
``ITransport`` of an ordinary :class:`~mqttd.protocol.MQTTProtocol`: every
MQTT write goes out as one binary message, every binary message received is
fed to the MQTT reader, which does not assume packets are aligned on message
boundaries [MQTT-6.0.0-2].  A text frame closes the connection with 1003
[MQTT-6.0.0-1].

Backpressure is Twisted's: the MQTT protocol registers itself as a push
producer on this adapter, which hands it to the TCP (or TLS) transport, so a
browser that reads slowly pauses the broker's writes to it exactly as a TCP
client would; ``pauseProducing``/``resumeProducing`` on the adapter pause the
reads of the socket underneath.

Refusals get an HTTP answer (a text frame: close 1003) and are counted and
logged rate-limited as the broker's refusal ``websocket``: a path other than
the listener's (404), no acceptable subprotocol (400), a request header over
16 KiB (400), an ``Origin`` the listener does not allow (403, below), any other
handshake autobahn fails (a plain HTTP request, a missing or bad WebSocket
header: 400); the opening handshake must finish in 5 s.

Cross-site WebSocket hijacking
    A browser lets any web page open a WebSocket to any address -- loopback
    included -- and tells the server the page's origin in the ``Origin``
    header; it is the server's job to refuse.  The origins a listener accepts
    are autobahn's ``allowedOrigins`` (:func:`origin_patterns`): the listener's
    ``allowedOrigins=`` option, a comma-separated list of origin patterns
    (``https://app.example.com``, ``*.example.com`` -- without a scheme any
    scheme and port, ``*`` matching anything).  Without the option, when the
    broker admits anonymous clients (the loopback default) or the listener
    takes the client certificate as the user name (credentials a browser
    presents by itself), only pages of a loopback origin
    (:data:`LOOPBACK_ORIGINS`) are accepted; otherwise any origin (a page must
    then log in like any other client).  A request without ``Origin`` (MQTT.js
    in Node, paho, every non-browser client) is never refused for it; the
    ``null`` origin (``file:`` pages, sandboxed frames) is refused unless
    listed as ``null``.  A refused origin is HTTP 403 and a ``websocket``
    refusal line naming the origin (REVIEW-SEC2 N16).

autobahn's own log lines about a connection (a failed handshake, a dropped
connection, a protocol violation, a timeout: all of them things a remote peer
can trigger) go through the broker's log rate limiter too
(:class:`PeerRateLimitedLog`), under the same key as the refusal lines: one
peer gets at most the limiter's burst of lines per window whatever it sends.
autobahn's debug and trace lines are dropped.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Optional, Sequence

from mqttd.ratelimit import LogRateLimiter, refusal_key

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mqttd.protocol import is_tls_error, tls_error_text

log = Logger(namespace="mqttd.transports.websocket")

#: subprotocol -> the MQTT it carries
SUBPROTOCOLS = ("mqtt", "mqttv3.1")

#: the path MQTT.js and most browser clients use
DEFAULT_PATH = "/mqtt"

#: largest HTTP opening-handshake request accepted, bytes
MAX_HANDSHAKE_BYTES = 16 * 1024

#: WebSocket close code for a text frame [MQTT-6.0.0-1]
CLOSE_UNSUPPORTED_DATA = 1003


def _forwarded_peer(header: Optional[str], trusted: int):
    """The address ``trusted`` hops from the right of an ``X-Forwarded-For``
    header (each trusted proxy appends the address it saw), or None.

    ``X-Forwarded-For: client, proxy1`` with 2 trusted proxies gives ``client``;
    anything that is not an IP address gives None (the socket's peer is kept).
    """
    if not header:
        return None
    hops = [part.strip() for part in header.split(",") if part.strip()]
    if not hops:
        return None
    candidate = hops[-trusted] if len(hops) >= trusted else hops[0]
    try:
        address = ipaddress.ip_address(candidate.strip("[]"))
    except ValueError:
        return None
    if address.version == 6:
        return IPv6Address("TCP", str(address), 0)
    return IPv4Address("TCP", str(address), 0)


#: the limiter key's reason for WebSocket refusals and autobahn's lines
REFUSAL = "websocket"

#: the origins accepted by default when the broker admits anonymous clients:
#: pages served from this machine's loopback names (autobahn matches them
#: against ``scheme://host:port`` with the default port filled in)
LOOPBACK_ORIGINS = ("http://localhost:*", "https://localhost:*",
                    "http://127.0.0.1:*", "https://127.0.0.1:*",
                    "http://::1:*", "https://::1:*")

#: autobahn's prefix of the reason it fails a handshake with for an origin
_ORIGIN_DENIED = "WebSocket connection denied: origin"


def origin_patterns(value) -> tuple:
    """The origin patterns of an ``allowedOrigins=`` value.

    ``value``: a comma-separated string or a sequence of patterns.  A pattern
    with a scheme (``https://app.example.com``, ``http://*.example.com:8080``)
    is matched against the request's ``scheme://host:port`` (port 80/443 filled
    in when the origin gives none); one without (``app.example.com``,
    ``*.example.com``) allows any scheme and port; ``*`` allows every origin;
    ``null`` allows the ``null`` origin.  ``*`` is the only wildcard.

    :raises ValueError: an empty list or an empty pattern.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = []
    for item in items:
        item = str(item).strip()
        if not item:
            raise ValueError("allowedOrigins: an empty origin pattern")
        if item != "*" and item != "null" and "://" not in item:
            item = f"*://{item}:*"
        patterns.append(item)
    if not patterns:
        raise ValueError("allowedOrigins: no origin pattern")
    return tuple(patterns)


def _compile_origins(patterns: Sequence[str]) -> list:
    """autobahn's ``allowedOriginsPatterns`` for ``patterns`` (like
    ``autobahn.util.wildcards2patterns``, every regex character escaped)."""
    return [re.compile("^" + re.escape(p).replace(r"\*", ".*") + "$")
            for p in patterns if p != "null"]


def _unwrap_broker(factory):
    """The broker behind a chain of wrapping factories (``.wrapped``), or None."""
    for _ in range(8):
        if factory is None:
            return None
        broker = getattr(factory, "broker", None)
        if broker is not None:
            return broker
        factory = getattr(factory, "wrapped", None)
    return None


class PeerRateLimitedLog:
    """The txaio ``ILogger`` autobahn logs a connection's events to, rate-limited.

    Every line at ``info`` level or above goes to ``mqttd.transports.websocket``
    at its own level with its own format and fields plus ``peer``, through
    ``protocol``'s log limiter under the key ``(peer host, "websocket")`` (the
    refusal lines' key); ``debug`` and ``trace`` lines are dropped.

    :param protocol: the :class:`MQTTWebSocketProtocol` the lines are about.
    """

    def __init__(self, protocol: "MQTTWebSocketProtocol"):
        self._protocol = protocol

    def _emit(self, level: str, format: str, **fields) -> None:
        protocol = self._protocol
        peer = protocol._peer_text()
        fields = {k: v for k, v in fields.items() if not k.startswith("log_")}
        fields["peer"] = peer
        protocol.factory.log_limiter().emit(
            getattr(log, level), refusal_key(REFUSAL, None, peer),
            "autobahn, peer {peer}: " + str(format), **fields)

    def critical(self, format: str = "", **fields) -> None:
        self._emit("critical", format, **fields)

    def error(self, format: str = "", **fields) -> None:
        self._emit("error", format, **fields)

    def warn(self, format: str = "", **fields) -> None:
        self._emit("warn", format, **fields)

    def info(self, format: str = "", **fields) -> None:
        self._emit("info", format, **fields)

    def failure(self, format: str = "", failure=None, level: str = "error", **fields) -> None:
        if failure is not None:
            fields["error"] = failure.getErrorMessage()
            format = str(format) + " ({error})"
        self._emit(level if level in ("critical", "error", "warn", "info") else "error",
                   format, **fields)

    def debug(self, format: str = "", **fields) -> None:
        pass

    def trace(self, format: str = "", **fields) -> None:
        pass

    def emit(self, level: str, format: str = "", **fields) -> None:
        if level in ("critical", "error", "warn", "info"):
            self._emit(level, format, **fields)


@implementer(ITransport)
class MQTTWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket connection carrying one MQTT connection."""

    _mqtt = None
    _forwarded_peer = None
    _refusal_logged = False

    @property
    def log(self) -> PeerRateLimitedLog:
        """autobahn's logger for this connection (rate-limited, see :class:`PeerRateLimitedLog`)."""
        limited = self.__dict__.get("_limited_log")
        if limited is None:
            limited = self.__dict__["_limited_log"] = PeerRateLimitedLog(self)
        return limited

    # --- the opening handshake ----------------------------------------------------

    def _connectionMade(self):
        super()._connectionMade()
        # the origins this connection may come from, decided now: the broker's
        # anonymous policy may differ between brokers sharing nothing else
        self.allowedOrigins, self.allowedOriginsPatterns, self.allowNullOrigin = \
            self.factory.origin_policy()

    def processHandshake(self):
        # the header, wherever it ends: complete in one read or not yet ended
        # (bytes after it are the client's first frames, not header)
        end = self.data.find(b"\r\n\r\n")
        header = len(self.data) if end < 0 else end + 4
        if header > MAX_HANDSHAKE_BYTES:
            self._refused(f"request header over {MAX_HANDSHAKE_BYTES} bytes")
            return self.failHandshake("HTTP request header too large")
        return super().processHandshake()

    def failHandshake(self, reason: str, code: int = 400, responseHeaders=None):
        """Every failed opening handshake is a counted, logged refusal (a plain
        HTTP request too), then autobahn answers it with ``code``; an origin
        the listener does not allow is 403 Forbidden (autobahn says 400)."""
        if reason.startswith(_ORIGIN_DENIED):
            code = 403
            if not self._refusal_logged:
                self._refused(f"origin {self.websocket_origin!r} not allowed (allowedOrigins: "
                              f"{','.join(self.allowedOrigins)}; see the listener's "
                              "allowedOrigins= option)")
        if not self._refusal_logged:
            self._refused(f"opening handshake failed ({code}): {reason}")
        return super().failHandshake(reason, code, responseHeaders)

    def onOpenHandshakeTimeout(self):
        """A request not finished in time (5 s) is a counted refusal too."""
        if self.state == self.STATE_CONNECTING and not self._refusal_logged:
            self._refused("opening handshake not finished in time "
                          f"({self.openHandshakeTimeout} s)")
        return super().onOpenHandshakeTimeout()

    def onConnect(self, request):
        trusted = self.factory.trust_x_forwarded_for
        if trusted:
            self._forwarded_peer = _forwarded_peer(request.headers.get("x-forwarded-for"),
                                                   trusted)
        path = self.factory.mqtt_path
        if path is not None and request.path != path:
            self._refused(f"path {request.path!r} is not {path!r}")
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, f"no MQTT endpoint at {request.path}")
        for offered in request.protocols:
            if offered in SUBPROTOCOLS:
                return offered
        self._refused(f"subprotocols {list(request.protocols)} offer none of "
                      f"{list(SUBPROTOCOLS)} [MQTT-6.0.0-3]")
        raise ConnectionDeny(ConnectionDeny.BAD_REQUEST,
                             "the WebSocket subprotocol must be mqtt or mqttv3.1")

    def onOpen(self):
        mqtt = self.factory.wrapped.buildProtocol(self.transport.getPeer())
        if mqtt is None:
            self.sendClose()
            return
        self._mqtt = mqtt
        mqtt.makeConnection(self)

    # --- frames in ----------------------------------------------------------------
    #
    # autobahn's frame-level hooks (IWebSocketChannel): each frame's payload goes
    # straight to the MQTT reader, which takes any chunking, instead of being
    # joined into a message and dispatched through onMessage (a future and an
    # observer round per message: MQTT.js sends each PUBLISH as several
    # messages, so that cost was most of the broker's time over WebSocket).
    # autobahn still counts the message size against maxMessagePayloadSize.

    def onMessageBegin(self, isBinary):
        super().onMessageBegin(isBinary)
        if not isBinary and self._mqtt is not None:
            self._refused("text frame; MQTT needs binary frames [MQTT-6.0.0-1]")
            # sendClose() only takes 1000 and 3000-4999; 1003 is the RFC 6455 code
            self.sendCloseFrame(code=CLOSE_UNSUPPORTED_DATA,
                                reasonUtf8=b"MQTT is carried in binary frames")

    def onMessageFrameData(self, payload):
        mqtt = self._mqtt
        if (mqtt is not None and self.message_is_binary and not self.failedByMe
                and self.state == self.STATE_OPEN):
            mqtt.dataReceived(payload)

    def onMessageFrameEnd(self):
        pass

    def onMessageEnd(self):
        pass

    def connectionLost(self, reason=None):
        """A failed TLS handshake (or a broken TLS stream) of a ``wss:``
        listener is the broker's refusal ``tls``, as on ``mqtts:``: counted in
        ``BrokerStats.refused["tls"]`` and one rate-limited WARN line ``Refused
        tls for - from PEER: TLS failed: REASON`` -- not autobahn's ERROR line
        ``SSL error: ... (in )`` (a client's failure is no server error)."""
        error = getattr(reason, "value", None)
        if is_tls_error(error):
            detail = f"TLS failed: {tls_error_text(error)}"
            self._refused(detail, what="tls")
            # autobahn logs a lost connection at debug level; its TLS branch at ERROR
            reason = Failure(ConnectionLost(detail))
        super().connectionLost(reason)

    def onClose(self, wasClean, code, reason):
        mqtt, self._mqtt = self._mqtt, None
        if mqtt is not None:
            mqtt.connectionLost(None)

    # --- ITransport for the MQTT protocol -------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=False)

    def abortConnection(self) -> None:
        self.dropConnection(abort=True)

    def getPeer(self):
        """The socket's peer, or with ``trustXForwardedFor=N`` the client address
        the trusted reverse proxies reported (port 0: a proxy does not say)."""
        if self._forwarded_peer is not None:
            return self._forwarded_peer
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def getPeerCertificate(self):
        """The TLS peer certificate of a ``wss:`` connection (None for ``ws:``)."""
        get = getattr(self.transport, "getPeerCertificate", None)
        return get() if get is not None else None

    # IPushProducer of the socket underneath: pause/resume reading (inbound limits)
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def _refused(self, detail: str, what: str = REFUSAL) -> None:
        """Count and log (rate-limited per peer host, through the broker when there is one)."""
        self._refusal_logged = True
        broker = getattr(self.factory.wrapped, "broker", None)
        client_id = getattr(getattr(self._mqtt, "connection", None), "client_id", None)
        if broker is not None and hasattr(broker, "refused"):
            broker.refused(what, client_id, self._peer_text(), detail)
        else:
            self.factory.log_limiter().warn(
                log, refusal_key(what, client_id, self._peer_text()),
                "Refused {what} from {peer}: {detail}", what=what,
                peer=self._peer_text(), detail=detail)

    def _peer_text(self) -> str:
        try:
            address = self.transport.getPeer()
            return f"{address.host}:{address.port}"
        except Exception:
            return str(self.peer)


class MQTTWebSocketFactory(WebSocketServerFactory):
    """Serve MQTT over WebSocket with ``wrapped`` (an MQTT stream factory).

    :param wrapped: builds the MQTT protocol of each connection (e.g.
        :class:`mqttd.protocol.MQTTFactory`).
    :param path: the only request path answered (``None``: any path).
    :param max_message: largest WebSocket message accepted, bytes; defaults
        to the broker's maximum packet size plus 64 KiB (a message may hold
        several packets).
    :param secure: the listener is ``wss:`` (used in the URL autobahn reports).
    :param trust_x_forwarded_for: number of reverse proxies in front whose
        ``X-Forwarded-For`` is believed (0: ignore the header, the default);
        the client's address then comes from it.
    :param allowed_origins: the origin patterns browsers' requests may come
        from (see :func:`origin_patterns`); None: the default policy of the
        module docstring (loopback origins only while the broker admits
        anonymous clients or ``ambient_credentials``).
    :param ambient_credentials: the listener authenticates by something a
        browser presents by itself (the client certificate as the user name).
    """

    protocol = MQTTWebSocketProtocol

    def __init__(self, wrapped, path: Optional[str] = DEFAULT_PATH,
                 max_message: Optional[int] = None, secure: bool = False,
                 trust_x_forwarded_for: int = 0, allowed_origins=None,
                 ambient_credentials: bool = False):
        super().__init__(url=("wss" if secure else "ws") + "://localhost",
                         protocols=list(SUBPROTOCOLS), server="mqttd")
        self.wrapped = wrapped
        self.mqtt_path = path
        if trust_x_forwarded_for < 0:
            raise ValueError("trustXForwardedFor must be 0 or more")
        self.trust_x_forwarded_for = trust_x_forwarded_for
        self.allowed_origins = (None if allowed_origins is None
                                else origin_patterns(allowed_origins))
        self.ambient_credentials = ambient_credentials
        self._origin_cache: dict = {}
        if max_message is None:
            broker = getattr(wrapped, "broker", None)
            max_packet = getattr(getattr(broker, "config", None), "max_packet_size",
                                 16 * 1024 * 1024)
            max_message = max_packet + 64 * 1024
        self.setProtocolOptions(
            webStatus=False,                  # no autobahn status page on plain GET
            maxMessagePayloadSize=max_message,
            maxFramePayloadSize=max_message,
            openHandshakeTimeout=5,
            closeHandshakeTimeout=1,
            failByDrop=False,
            # permessage-deflate is not offered: MQTT payloads are often
            # compressed already, and inflating is a memory lever for clients
        )

    def origin_policy(self):
        """``(allowedOrigins, allowedOriginsPatterns, allowNullOrigin)`` in force
        for a new connection (autobahn's per-connection options)."""
        origins = self.allowed_origins
        if origins is None:
            origins = LOOPBACK_ORIGINS if self._strict_origins() else ("*",)
        policy = self._origin_cache.get(origins)
        if policy is None:
            policy = self._origin_cache[origins] = (
                list(origins), _compile_origins(origins), "null" in origins or "*" in origins)
        return policy

    def _strict_origins(self) -> bool:
        """The default policy refuses foreign origins: anonymous clients are
        admitted (or may be: an authenticator that does not say), or the
        listener authenticates by the client certificate."""
        if self.ambient_credentials:
            return True
        broker = _unwrap_broker(self.wrapped)
        if broker is None:
            return True
        authenticator = getattr(broker, "authenticator", None)
        return authenticator is None or getattr(authenticator, "allow_anonymous", True) \
            is not False

    def log_limiter(self) -> LogRateLimiter:
        """The broker's log rate limiter, or this factory's own (no broker)."""
        broker = getattr(self.wrapped, "broker", None)
        limiter = getattr(broker, "log_limiter", None)
        if limiter is None:
            limiter = self.__dict__.get("_own_limiter")
            if limiter is None:
                from twisted.internet import reactor
                limiter = self._own_limiter = LogRateLimiter(reactor)
        return limiter

    def startFactory(self):
        self.wrapped.doStart()
        super().startFactory()

    def stopFactory(self):
        self.wrapped.doStop()
        super().stopFactory()
