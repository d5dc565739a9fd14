"""``$SYS/<brokerId>/...`` topics, as the mosca tutorial's server published them.

Event topics (payloads as mosca sent them):

- ``$SYS/<id>/new/clients``: the client id of each client that connects;
- ``$SYS/<id>/disconnect/clients``: the client id of each client that leaves;
- ``$SYS/<id>/new/subscribes``: ``{"clientId": ..., "topic": ...}`` per subscription;
- ``$SYS/<id>/new/unsubscribes``: the same for each unsubscription.

Every ``interval`` seconds the broker's counters go to ``$SYS/<id>/uptime``,
``clients/connected``, ``clients/sessions``, ``messages/received``,
``messages/sent``, ``messages/dropped``, ``retained/count`` and
``subscriptions/count`` (plain decimal text, not retained).  Clients cannot
publish into ``$SYS``; these are internal publishes.
"""
from __future__ import annotations

import json

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="mqttd.systopics")


class SysTopics:
    def __init__(self, broker, clock, interval: float = 10.0):
        self.broker = broker
        self.clock = clock
        self.interval = interval
        self.prefix = f"$SYS/{broker.config.broker_id}/"
        self._unregister = None
        self._loop = None

    def start(self) -> None:
        self._unregister = self.broker.observe({
            "clientConnected": self._connected,
            "clientDisconnected": self._disconnected,
            "subscribed": self._subscribed,
            "unsubscribed": self._unsubscribed,
        })
        if self.interval > 0:
            self._loop = LoopingCall(self.publish_stats)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _publish(self, suffix: str, payload: str) -> None:
        self.broker.publish_message(self.prefix + suffix, payload.encode("utf-8"))

    def _connected(self, client, **_):
        self._publish("new/clients", client.client_id)

    def _disconnected(self, client, **_):
        if client is not None:
            self._publish("disconnect/clients", client.client_id)

    def _subscribed(self, topic, client, **_):
        self._publish("new/subscribes",
                      json.dumps({"clientId": client.client_id, "topic": topic}))

    def _unsubscribed(self, topic, client, **_):
        self._publish("new/unsubscribes",
                      json.dumps({"clientId": client.client_id, "topic": topic}))

    def publish_stats(self) -> None:
        broker = self.broker
        stats = broker.stats
        connected = sum(1 for s in broker.sessions.values() if s.connection is not None)
        values = {
            "uptime": int(self.clock.seconds() - broker.started_at),
            "clients/connected": connected,
            "clients/sessions": len(broker.sessions),
            "messages/received": stats.messages_received,
            "messages/sent": stats.messages_sent,
            "messages/dropped": stats.dropped_total,
            "retained/count": len(broker.retained),
            "subscriptions/count": sum(len(s.subscriptions)
                                       for s in broker.sessions.values()),
        }
        for suffix, value in values.items():
            self._publish(suffix, str(value))
