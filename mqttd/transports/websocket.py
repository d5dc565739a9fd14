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

Refusals get an HTTP answer and one log line: a path other than the
listener's (404), no acceptable subprotocol (400), a request header over
16 KiB (400); the opening handshake must finish in 5 s.
"""
from __future__ import annotations

from typing import Optional

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import ITransport
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="mqttd.transports.websocket")

#: subprotocol -> the MQTT it carries
SUBPROTOCOLS = ("mqtt", "mqttv3.1")

#: the path MQTT.js and most browser clients use
DEFAULT_PATH = "/mqtt"

#: largest HTTP opening-handshake request accepted, bytes
MAX_HANDSHAKE_BYTES = 16 * 1024

#: WebSocket close code for a text frame [MQTT-6.0.0-1]
CLOSE_UNSUPPORTED_DATA = 1003


@implementer(ITransport)
class MQTTWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket connection carrying one MQTT connection."""

    _mqtt = None

    # --- the opening handshake ----------------------------------------------------

    def processHandshake(self):
        if len(self.data) > MAX_HANDSHAKE_BYTES and b"\r\n\r\n" not in self.data:
            log.warn("WebSocket handshake from {peer} refused: request header over "
                     "{limit} bytes", peer=self._peer_text(), limit=MAX_HANDSHAKE_BYTES)
            return self.failHandshake("HTTP request header too large")
        return super().processHandshake()

    def onConnect(self, request):
        path = self.factory.mqtt_path
        if path is not None and request.path != path:
            log.warn("WebSocket handshake from {peer} refused: path {path!r} is not "
                     "{expected!r}", peer=self._peer_text(), path=request.path,
                     expected=path)
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, f"no MQTT endpoint at {request.path}")
        for offered in request.protocols:
            if offered in SUBPROTOCOLS:
                return offered
        log.warn("WebSocket handshake from {peer} refused: subprotocols {offered} offer "
                 "none of {supported} [MQTT-6.0.0-3]", peer=self._peer_text(),
                 offered=list(request.protocols), supported=list(SUBPROTOCOLS))
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

    def onMessage(self, payload, isBinary):
        if self._mqtt is None:
            return
        if not isBinary:
            log.warn("Closing WebSocket of {peer}: text frame, MQTT needs binary frames "
                     "[MQTT-6.0.0-1]", peer=self._peer_text())
            # sendClose() only takes 1000 and 3000-4999; 1003 is the RFC 6455 code
            self.sendCloseFrame(code=CLOSE_UNSUPPORTED_DATA,
                                reasonUtf8=b"MQTT is carried in binary frames")
            return
        self._mqtt.dataReceived(payload)

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
    """

    protocol = MQTTWebSocketProtocol

    def __init__(self, wrapped, path: Optional[str] = DEFAULT_PATH,
                 max_message: Optional[int] = None, secure: bool = False):
        super().__init__(url=("wss" if secure else "ws") + "://localhost",
                         protocols=list(SUBPROTOCOLS), server="mqttd")
        self.wrapped = wrapped
        self.mqtt_path = path
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

    def startFactory(self):
        self.wrapped.doStart()
        super().startFactory()

    def stopFactory(self):
        self.wrapped.doStop()
        super().stopFactory()
