"""``$SYS`` topics: mosquitto's ``$SYS/broker/...`` tree and mosca's ``$SYS/<brokerId>/...``.

**mosquitto's tree** (the names of ``mosquitto(8)``), refreshed every
``interval`` seconds and *retained in memory* (never written to the store), so
a new ``$SYS`` subscriber gets every value at once.  Payloads are plain
decimal text unless noted:

- ``$SYS/broker/version`` (``mqttd version X``), ``$SYS/broker/uptime``
  (``N seconds``);
- ``$SYS/broker/clients/connected``, ``disconnected`` (offline persistent
  sessions), ``total`` (both), ``maximum`` (most connected at once since
  start), ``expired`` (sessions expired since start);
- ``$SYS/broker/messages/received``, ``messages/sent``,
  ``publish/messages/received``, ``publish/messages/sent``,
  ``publish/messages/dropped``, ``publish/bytes/received``,
  ``publish/bytes/sent`` (payload bytes), ``bytes/received``, ``bytes/sent``
  (wire bytes), ``messages/stored`` and ``store/messages/count`` (queued +
  in-flight + retained), ``store/messages/bytes``;
- ``$SYS/broker/load/{messages,bytes}/{received,sent}/{1min,5min,15min}``,
  ``load/publish/{received,sent,dropped}/...``, ``load/connections/...``:
  per-minute rates as exponentially weighted moving averages (as mosquitto);
- ``$SYS/broker/subscriptions/count``, ``$SYS/broker/retained messages/count``
  (mosquitto's name, with the space), ``$SYS/broker/store/size`` (bytes of
  the data directory), ``$SYS/broker/heap/current`` (resident memory, bytes)
  and ``heap/maximum`` (peak resident memory).

Every ``maximum`` is at least its ``current`` in the same interval
(``heap/maximum`` is the peak of ``getrusage``'s and of every sampled
``heap/current``: the kernel's peak lags its batched RSS counters by a few
pages; ``clients/maximum`` likewise).  ``store/messages/bytes`` counts topic +
payload bytes (as ``--max-queued-bytes`` does) of the queued, in-flight and
retained messages that ``store/messages/count`` counts.

The counts exclude the broker's own ``$SYS`` traffic (its messages carry
``SYS_ORIGIN``).

**mosca's topics** stay as they were: ``$SYS/<id>/new/clients`` (the client id
of each client that connects), ``$SYS/<id>/disconnect/clients``,
``$SYS/<id>/new/subscribes`` and ``new/unsubscribes`` (JSON
``{"clientId", "topic"}``; not retained, so built only while someone can receive
them, see :meth:`~mqttd.broker.Broker.reaches_anyone`), and every interval ``$SYS/<id>/uptime``,
``clients/connected``, ``clients/sessions``, ``messages/received``,
``messages/sent``, ``messages/dropped``, ``retained/count`` and
``subscriptions/count``.  Clients cannot publish into ``$SYS``.
"""
from __future__ import annotations

import json
import math
import os
import resource
from typing import Dict, Optional

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mqttd.messages import SYS_ORIGIN, Message, message_size

log = Logger(namespace="mqttd.systopics")

BROKER = "$SYS/broker/"
_LOAD_MINUTES = (1, 5, 15)


def resident_memory() -> Optional[int]:
    """Resident set size of this process in bytes (Linux ``/proc``), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_memory() -> int:
    """Peak resident set size in bytes (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def directory_size(path: Optional[str]) -> Optional[int]:
    """Bytes of the regular files directly in ``path`` (a store directory)."""
    if not path:
        return None
    try:
        return sum(entry.stat().st_size for entry in os.scandir(path)
                   if entry.is_file(follow_symlinks=False))
    except OSError:
        return None


class LoadAverage:
    """mosquitto's load figures: a per-minute rate, exponentially smoothed over
    1, 5 and 15 minutes, fed with a monotonically growing counter."""

    def __init__(self):
        self.values: Dict[int, float] = {m: 0.0 for m in _LOAD_MINUTES}
        self._last: Optional[float] = None

    def update(self, counter: float, interval: float) -> None:
        if self._last is None or interval <= 0:
            self._last = counter
            return
        per_minute = (counter - self._last) * 60.0 / interval
        self._last = counter
        for minutes in _LOAD_MINUTES:
            k = math.exp(-interval / (60.0 * minutes))
            self.values[minutes] = self.values[minutes] * k + per_minute * (1.0 - k)


class SysTopics:
    def __init__(self, broker, clock, interval: float = 10.0):
        self.broker = broker
        self.clock = clock
        self.interval = interval
        self.prefix = f"$SYS/{broker.config.broker_id}/"
        self._unregister = None
        self._loop = None
        self._loads: Dict[str, LoadAverage] = {}
        self._last_tick: Optional[float] = None
        #: highest resident memory seen (getrusage's peak or a sample), bytes
        self._heap_peak = 0

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
            self.publish_broker_tree()  # retained at once for the first subscriber

    def stop(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _publish(self, suffix: str, payload: str) -> None:
        self.broker.publish(Message(self.prefix + suffix, payload.encode("utf-8"),
                                    origin=SYS_ORIGIN), client=None)

    # The per-client events are published only when someone can get them (they are
    # not retained, so a message nobody matches is lost anyway): a storm of
    # connections without a $SYS subscriber builds no message and no JSON.

    def _connected(self, client, **_):
        if self.broker.reaches_anyone(self.prefix + "new/clients"):
            self._publish("new/clients", client.client_id)

    def _disconnected(self, client, **_):
        if client is not None and self.broker.reaches_anyone(self.prefix + "disconnect/clients"):
            self._publish("disconnect/clients", client.client_id)

    def _subscribed(self, topic, client, **_):
        if self.broker.reaches_anyone(self.prefix + "new/subscribes"):
            self._publish("new/subscribes",
                          json.dumps({"clientId": client.client_id, "topic": topic}))

    def _unsubscribed(self, topic, client, **_):
        if self.broker.reaches_anyone(self.prefix + "new/unsubscribes"):
            self._publish("new/unsubscribes",
                          json.dumps({"clientId": client.client_id, "topic": topic}))

    # --- the periodic values ----------------------------------------------------------

    def publish_stats(self) -> None:
        """Publish mosca's counters and mosquitto's ``$SYS/broker`` tree once."""
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
            "retained/count": _retained_count(broker),
            "subscriptions/count": sum(len(s.subscriptions)
                                       for s in broker.sessions.values()),
        }
        for suffix, value in values.items():
            self._publish(suffix, str(value))
        self.publish_broker_tree()

    def broker_tree(self) -> Dict[str, str]:
        """``{topic: payload}`` of mosquitto's ``$SYS/broker/...`` values now."""
        from mqttd import __version__
        broker = self.broker
        stats = broker.stats
        now = self.clock.seconds()
        connected = disconnected = subscriptions = stored = stored_bytes = 0
        for session in broker.sessions.values():
            if session.connection is not None:
                connected += 1
            else:
                disconnected += 1
            subscriptions += len(session.subscriptions)
            stored += len(session.queue) + len(session.inflight)
            stored_bytes += session.queued_bytes
            for record in session.inflight.values():
                stored_bytes += _message_bytes(getattr(record, "message", None))
        retained, retained_bytes = _retained_count_and_bytes(broker)
        stored += retained
        stored_bytes += retained_bytes
        publish_received = sum(stats.messages_in)
        publish_sent = sum(stats.messages_out)
        counters = {
            "messages/received": stats.messages_received,
            "messages/sent": stats.messages_sent,
            "bytes/received": stats.bytes_received,
            "bytes/sent": stats.bytes_sent,
            "publish/received": publish_received,
            "publish/sent": publish_sent,
            "publish/dropped": stats.dropped_total,
            "connections": stats.connections_total,
        }
        interval = (now - self._last_tick) if self._last_tick is not None else 0.0
        self._last_tick = now
        for name, counter in counters.items():
            self._loads.setdefault(name, LoadAverage()).update(counter, interval)
        values = {
            "version": f"mqttd version {__version__}",
            "uptime": f"{int(now - broker.started_at)} seconds",
            "clients/connected": connected,
            "clients/disconnected": disconnected,
            "clients/total": connected + disconnected,
            "clients/maximum": max(getattr(stats, "clients_maximum", 0), connected),
            "clients/expired": getattr(stats, "sessions_expired", 0),
            "messages/received": stats.messages_received,
            "messages/sent": stats.messages_sent,
            "messages/stored": stored,
            "store/messages/count": stored,
            "store/messages/bytes": stored_bytes,
            "publish/messages/received": publish_received,
            "publish/messages/sent": publish_sent,
            "publish/messages/dropped": stats.dropped_total,
            "publish/bytes/received": sum(stats.payload_in),
            "publish/bytes/sent": sum(stats.bytes_out),
            "bytes/received": stats.bytes_received,
            "bytes/sent": stats.bytes_sent,
            "subscriptions/count": subscriptions,
            "retained messages/count": _retained_count(broker),
        }
        rss = resident_memory()
        self._heap_peak = max(self._heap_peak, peak_resident_memory(), rss or 0)
        values["heap/maximum"] = self._heap_peak
        if rss is not None:
            values["heap/current"] = rss
        size = directory_size(getattr(broker.store, "path", None))
        if size is not None:
            values["store/size"] = size
        for name, load in self._loads.items():
            for minutes, value in load.values.items():
                values[f"load/{name}/{minutes}min"] = f"{value:.2f}"
        return {BROKER + key: str(value) for key, value in values.items()}

    def publish_broker_tree(self) -> None:
        """Publish (retained in memory) every ``$SYS/broker/...`` value."""
        for topic, payload in self.broker_tree().items():
            self.broker.publish_volatile(Message(topic, payload.encode("utf-8"), 0, True,
                                                 origin=SYS_ORIGIN))


def _retained_count(broker) -> int:
    """Retained messages of clients (the volatile ``$SYS`` ones not counted;
    in a cluster: all nodes' together)."""
    from mqttd.retained import client_retained_count
    return client_retained_count(broker.retained)


def _message_bytes(message) -> int:
    """Topic + payload + properties bytes of ``message`` (0 for None), as the
    queue limits count them (:func:`~mqttd.messages.message_size`)."""
    if message is None:
        return 0
    return message_size(message)


def _retained_count_and_bytes(broker):
    """``(count, topic + payload + properties bytes)`` of the clients' retained messages."""
    count = size = 0
    for topic, message in list(broker.retained.items()):
        if not topic.startswith("$SYS"):
            count += 1
            size += _message_bytes(message)
    return count, size
