"""The broker's events in the log, under the names mosca's tutorial printed.

One line per event through ``twisted.logger`` with stable format strings and
named fields (``event``, ``client_id``, ``topic``, ``reason``): one line when a
client connects, one when it leaves.  ``published`` (once per message) and
``clientDisconnecting`` (always followed by ``clientDisconnected``) are logged
only with ``--log-level debug``; payloads never.
"""
from __future__ import annotations

from twisted.logger import Logger

from mqttd import debuglog

log = Logger(namespace="mqttd.events")
_VERSIONS = {3: "3.1", 4: "3.1.1", 5: "5.0"}


def _client_id(client) -> str:
    return client.client_id if client is not None else "-"


class EventLog:
    def __init__(self, broker):
        self.broker = broker
        self._unregister = None
        self._unregister_debug = None
        self._unlisten = None

    def start(self) -> None:
        self._unregister = self.broker.observe({
            "clientConnected": self._connected,
            "clientDisconnected": self._disconnected,
            "subscribed": self._subscribed,
            "unsubscribed": self._unsubscribed,
        })
        self._debug_changed(debuglog.enabled)
        self._unlisten = debuglog.on_change(self._debug_changed)

    def _debug_changed(self, enabled: bool) -> None:
        """Per-message observers only with --log-level debug (also after a reload)."""
        if enabled and self._unregister_debug is None:
            self._unregister_debug = self.broker.observe({
                "published": self._published,
                # clientDisconnected says the same, right after
                "clientDisconnecting": self._disconnecting,
            })
        elif not enabled and self._unregister_debug is not None:
            self._unregister_debug()
            self._unregister_debug = None

    def stop(self) -> None:
        for name in ("_unregister", "_unregister_debug", "_unlisten"):
            unregister = getattr(self, name)
            if unregister is not None:
                unregister()
                setattr(self, name, None)

    def _connected(self, client, **_):
        log.info("clientConnected {client_id} from {peer} (MQTT {version}, clean={clean}, "
                 "keepalive={keepalive}, session_present={session_present})",
                 event="clientConnected", client_id=client.client_id, peer=client.peer,
                 version=_VERSIONS.get(client.protocol_level, client.protocol_level),
                 clean=client.clean_start, keepalive=client.keepalive,
                 session_present=client.session_present)

    def _disconnecting(self, client, reason, **_):
        log.debug("clientDisconnecting {client_id}: {reason}", event="clientDisconnecting",
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
