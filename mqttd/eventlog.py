"""The broker's events in the log, under the names mosca's tutorial printed.

One line per event through ``twisted.logger`` with stable format strings and
named fields (``event``, ``client_id``, ``topic``, ``reason``): one line when a
client connects, one when it leaves.  ``published`` (once per message) and
``clientDisconnecting`` (always followed by ``clientDisconnected``) are logged
only with ``--log-level debug``; payloads never.

Every info line is one a client triggers, so each goes through the broker's
log rate limiter (:mod:`mqttd.ratelimit`, key ``(client id, event)``: 3 lines
per client and event per 10 s; a later line reports how many were
suppressed).  The ``subscribed``/``unsubscribed`` events of one reactor turn
(one SUBSCRIBE or UNSUBSCRIBE packet, whatever its number of filters) make
one line per client: ``subscribed c1 to t/1`` or, for several filters,
``subscribed c1 to 3 filters: t/1, t/2, t/3`` (fields ``topic``: the first,
``topics``: at most :data:`MAX_TOPICS_PER_LINE`, ``count``: all).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from twisted.logger import Logger

from mqttd import debuglog

log = Logger(namespace="mqttd.events")
_VERSIONS = {3: "3.1", 4: "3.1.1", 5: "5.0"}

#: filters named in one coalesced subscribed/unsubscribed line
MAX_TOPICS_PER_LINE = 10


def _client_id(client) -> str:
    return client.client_id if client is not None else "-"


class EventLog:
    """Log ``broker``'s events (see the module docstring).

    :param broker: the :class:`~mqttd.broker.Broker`; its ``clock`` schedules
        the end-of-turn line of coalesced subscriptions, its ``log_limiter``
        bounds the lines.
    """

    def __init__(self, broker):
        self.broker = broker
        self._unregister = None
        self._unregister_debug = None
        self._unlisten = None
        #: (event, client id) -> [count, first topics] of this turn's (un)subscriptions
        self._pending: Dict[Tuple[str, str], list] = {}
        self._flush_call = None

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
        self._flush()
        for name in ("_unregister", "_unregister_debug", "_unlisten"):
            unregister = getattr(self, name)
            if unregister is not None:
                unregister()
                setattr(self, name, None)

    def _emit(self, method, client_id: str, event: str, format: str, **fields) -> None:
        self.broker.log_limiter.emit(method, (client_id, event), format, event=event,
                                     client_id=client_id, **fields)

    def _connected(self, client, **_):
        self._flush()
        client_id = client.client_id
        limiter = self.broker.log_limiter
        # the limiter first: in a connection storm most lines are suppressed,
        # and their fields are then never built
        suppressed = limiter.check((client_id, "clientConnected"))
        if suppressed is None:
            return
        limiter.log(log.info, "clientConnected {client_id} from {peer} (MQTT {version}, "
                    "clean={clean}, keepalive={keepalive}, session_present={session_present})",
                    suppressed, event="clientConnected", client_id=client_id, peer=client.peer,
                    version=_VERSIONS.get(client.protocol_level, client.protocol_level),
                    clean=client.clean_start, keepalive=client.keepalive,
                    session_present=client.session_present)

    def _disconnecting(self, client, reason, **_):
        self._flush()
        log.debug("clientDisconnecting {client_id}: {reason}", event="clientDisconnecting",
                  client_id=_client_id(client), reason=reason)

    def _disconnected(self, client, reason, **_):
        self._flush()
        client_id = _client_id(client)
        limiter = self.broker.log_limiter
        suppressed = limiter.check((client_id, "clientDisconnected"))
        if suppressed is None:
            return
        limiter.log(log.info, "clientDisconnected {client_id}: {reason}", suppressed,
                    event="clientDisconnected", client_id=client_id, reason=reason)

    def _subscribed(self, topic, client, **_):
        self._coalesce("subscribed", _client_id(client), topic)

    def _unsubscribed(self, topic, client, **_):
        self._coalesce("unsubscribed", _client_id(client), topic)

    def _coalesce(self, event: str, client_id: str, topic: str) -> None:
        entry = self._pending.get((event, client_id))
        if entry is None:
            entry = self._pending[(event, client_id)] = [0, []]
        entry[0] += 1
        topics: List[str] = entry[1]
        if len(topics) < MAX_TOPICS_PER_LINE:
            topics.append(topic)
        if self._flush_call is None:
            self._flush_call = self.broker.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        """Log this turn's coalesced (un)subscriptions, one line per client and event."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._pending:  # every connect and disconnect comes here first
            return
        pending, self._pending = self._pending, {}
        for (event, client_id), (count, topics) in pending.items():
            verb = "to" if event == "subscribed" else "from"
            if count == 1:
                format = event + " {client_id} " + verb + " {topic}"
            else:
                format = (event + " {client_id} " + verb + " {count} filters: {listed}"
                          + (", ..." if count > len(topics) else ""))
            self._emit(log.info, client_id, event, format, topic=topics[0], topics=topics,
                       count=count, listed=", ".join(topics))

    def _published(self, message, client, **_):
        # debug only (an operator's explicit request to see every message): not limited
        log.debug("published {topic} by {client_id} (QoS {qos}, {size} bytes)",
                  event="published", client_id=_client_id(client), topic=message.topic,
                  qos=message.qos, size=len(message.payload))
