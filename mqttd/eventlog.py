"""The broker's events in the log, under the names mosca's tutorial printed.

One line per event through ``twisted.logger`` with stable format strings and
named fields (``event``, ``client_id``, ``topic``, ``reason``); ``published``
is logged at debug level only (it runs once per message), never with payloads.
"""
from __future__ import annotations

from twisted.logger import Logger

from mqttd import debuglog

log = Logger(namespace="mqttd.events")


def _client_id(client) -> str:
    return client.client_id if client is not None else "-"


class EventLog:
    def __init__(self, broker):
        self.broker = broker
        self._unregister = []

    def start(self) -> None:
        on = self.broker.on
        self._unregister = [
            on("clientConnected", self._connected),
            on("clientDisconnecting", self._disconnecting),
            on("clientDisconnected", self._disconnected),
            on("subscribed", self._subscribed),
            on("unsubscribed", self._unsubscribed),
        ]
        if debuglog.enabled:  # once per message: only with --log-level debug
            self._unregister.append(on("published", self._published))

    def stop(self) -> None:
        for unregister in self._unregister:
            unregister()
        self._unregister = []

    def _connected(self, client, **_):
        log.info("clientConnected {client_id} from {peer} (protocol level {protocol_level})",
                 event="clientConnected", client_id=client.client_id, peer=client.peer,
                 protocol_level=client.protocol_level)

    def _disconnecting(self, client, reason, **_):
        log.info("clientDisconnecting {client_id}: {reason}", event="clientDisconnecting",
                 client_id=_client_id(client), reason=reason)

    def _disconnected(self, client, reason, **_):
        log.info("clientDisconnected {client_id}: {reason}", event="clientDisconnected",
                 client_id=_client_id(client), reason=reason)

    def _subscribed(self, topic, client, **_):
        log.info("subscribed {client_id} to {topic}", event="subscribed",
                 client_id=_client_id(client), topic=topic)

    def _unsubscribed(self, topic, client, **_):
        log.info("unsubscribed {client_id} from {topic}", event="unsubscribed",
                 client_id=_client_id(client), topic=topic)

    def _published(self, message, client, **_):
        log.debug("published {topic} by {client_id} (QoS {qos}, {size} bytes)",
                  event="published", client_id=_client_id(client), topic=message.topic,
                  qos=message.qos, size=len(message.payload))
