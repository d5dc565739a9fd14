"""Prometheus metrics of a broker, collected lazily at scrape time.

:class:`BrokerCollector` is a ``prometheus_client`` custom collector: nothing
is updated per message on the hot path; each scrape reads the broker's
counters (:class:`~mqttd.metrics.BrokerStats`), walks the sessions once for
the gauges, and reads the store's latency histograms.  Every metric is
prefixed ``mqttd_``; the list with their labels is in ``docs/admin.rst``.

:func:`metrics_resource` is the ``twisted.web`` resource serving the text
exposition format at ``/metrics`` (``--metrics-listen``).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource

from mqttd.retained import client_retained_count

_LEVELS = {3: "3.1", 4: "3.1.1", 5: "5.0"}
_QOS = ("0", "1", "2")


class BrokerCollector:
    """Collects ``mqttd_*`` metrics from a broker (and its service, if given).

    :param broker: the :class:`~mqttd.broker.Broker`.
    :param service: its :class:`~mqttd.service.BrokerService` (for the gauges
        and counters features register with ``add_gauge``/``add_counter``), or None.
    :param ring: the admin :class:`~mqttd.admin.ring.IncidentRing` (refusals
        by reason), or None.
    """

    def __init__(self, broker, service=None, ring=None):
        self.broker = broker
        self.service = service
        self.ring = ring

    def describe(self):
        return []  # collected lazily; no registration-time scrape

    def collect(self) -> Iterable:
        broker = self.broker
        stats = broker.stats
        from mqttd import __version__
        info = InfoMetricFamily("mqttd_build", "mqttd version and broker id")
        info.add_metric([], {"version": __version__, "broker_id": broker.config.broker_id})
        yield info
        uptime = GaugeMetricFamily("mqttd_uptime_seconds", "Seconds since the broker started")
        uptime.add_metric([], broker.clock.seconds() - broker.started_at)
        yield uptime

        # --- one pass over the sessions for every gauge ---------------------------------
        connections: Dict[Tuple[str, str], int] = {}
        online = offline = persistent = subscriptions = 0
        queued = queued_bytes = inflight = inflight_bytes = 0
        max_queue = 0
        for session in list(broker.sessions.values()):
            conn = session.connection
            if conn is not None:
                online += 1
                key = (str(getattr(conn, "listener", None) or "embedded"),
                       _LEVELS.get(getattr(conn, "protocol_level", None), "unknown"))
                connections[key] = connections.get(key, 0) + 1
            else:
                offline += 1
            if session.persistent:
                persistent += 1
            subscriptions += len(session.subscriptions)
            depth = len(session.queue)
            queued += depth
            queued_bytes += session.queued_bytes
            inflight += len(session.inflight)
            inflight_bytes += session.inflight_bytes
            if depth > max_queue:
                max_queue = depth
        g = GaugeMetricFamily("mqttd_connections", "Connected clients by listener and "
                              "protocol version", labels=["listener", "protocol"])
        for (listener, protocol), n in sorted(connections.items()):
            g.add_metric([listener, protocol], n)
        yield g
        yield _counter("mqttd_connections_total", "CONNECTs accepted since start",
                       stats.connections_total)
        g = GaugeMetricFamily("mqttd_sessions", "Sessions by state", labels=["state"])
        g.add_metric(["online"], online)
        g.add_metric(["offline"], offline)
        yield g
        yield _gauge("mqttd_sessions_persistent", "Sessions that outlive their connection",
                     persistent)
        yield _gauge("mqttd_clients_maximum", "Most clients connected at once since start",
                     getattr(stats, "clients_maximum", 0))
        yield _counter("mqttd_sessions_expired_total", "Offline sessions that expired",
                       getattr(stats, "sessions_expired", 0))
        yield _counter("mqttd_sessions_replaced_total", "Offline sessions of another user "
                       "discarded by a CONNECT with their client id",
                       getattr(stats, "sessions_replaced", 0))
        yield _counter("mqttd_sessions_evicted_total", "Offline persistent sessions discarded "
                       "for a new one of the same owner (--max-sessions, "
                       "--max-sessions-per-user)", getattr(stats, "sessions_evicted", 0))
        yield _gauge("mqttd_subscriptions", "Subscriptions of all sessions", subscriptions)
        yield _gauge("mqttd_retained_messages", "Retained messages held (in a cluster: by "
                     "all nodes together)", client_retained_count(broker.retained))
        yield _gauge("mqttd_queued_messages", "Messages waiting in session queues", queued)
        yield _gauge("mqttd_queued_bytes", "Bytes (topic + payload + properties) waiting in session queues",
                     queued_bytes)
        yield _gauge("mqttd_queued_bytes_held", "Bytes the queued messages hold, a message "
                     "queued for several sessions counted once (what "
                     "--max-queued-bytes-total caps)", getattr(stats, "queued_bytes", 0))
        yield _gauge("mqttd_queue_depth_max", "Messages in the longest session queue",
                     max_queue)
        yield _gauge("mqttd_inflight_messages", "Outbound QoS 1/2 messages awaiting "
                     "acknowledgement", inflight)
        yield _gauge("mqttd_inflight_bytes", "Bytes (topic + payload + properties) of the "
                     "outbound QoS 1/2 messages awaiting acknowledgement "
                     "(--max-inflight-bytes per client)", inflight_bytes)

        # --- traffic counters ---------------------------------------------------------------
        for name, doc, values in (
                ("mqttd_messages_received_total", "PUBLISHes received, by QoS "
                 "(in-process publishes included, $SYS excluded)", stats.messages_in),
                ("mqttd_messages_sent_total", "PUBLISHes sent to clients, by QoS "
                 "($SYS excluded)", stats.messages_out),
                ("mqttd_payload_bytes_received_total", "Payload bytes of PUBLISHes "
                 "received, by QoS", stats.payload_in),
                ("mqttd_publish_bytes_sent_total", "Bytes of the PUBLISH packets sent, by QoS",
                 stats.bytes_out)):
            c = CounterMetricFamily(name, doc, labels=["qos"])
            for qos, value in zip(_QOS, values):
                c.add_metric([qos], value)
            yield c
        yield _counter("mqttd_bytes_received_total", "Bytes read from client connections",
                       stats.bytes_received)
        yield _counter("mqttd_bytes_sent_total", "Bytes written to client connections",
                       stats.bytes_sent)
        c = CounterMetricFamily("mqttd_messages_dropped_total", "Messages not delivered to a "
                                "session, by reason", labels=["reason"])
        for reason, n in sorted(stats.dropped.items()):
            c.add_metric([reason], n)
        yield c
        yield _counter("mqttd_protocol_errors_total", "Connections closed for a protocol "
                       "error", stats.protocol_errors)
        limiter = getattr(broker, "log_limiter", None)
        if limiter is not None:
            yield _counter("mqttd_log_lines_suppressed_total", "Client-triggered log lines "
                           "suppressed by the rate limit (each is counted in a later line)",
                           limiter.suppressed)
        if self.ring is not None:
            c = CounterMetricFamily("mqttd_refusals_total", "Refused client packets and "
                                    "other incidents, by reason (connect-refused covers "
                                    "authentication failures, publish-refused and "
                                    "subscribe-refused ACL refusals)", labels=["reason"])
            for reason, n in sorted(self.ring.counts.items()):
                c.add_metric([reason], n)
            yield c
        refused = getattr(stats, "refused", None)
        if refused is not None:
            c = CounterMetricFamily("mqttd_auth_refusals_total", "Refusals by the security "
                                    "layer and limits, by kind (authentication, anonymous, "
                                    "publish, subscribe, forward, max-connections...)",
                                    labels=["kind"])
            for kind, n in sorted(refused.items()):
                c.add_metric([kind], n)
            yield c
        yield _counter("mqttd_publisher_holds_total", "Congestion episodes in which a slow "
                       "subscriber held its publishers back",
                       getattr(stats, "publisher_holds", 0))
        yield _counter("mqttd_slow_subscribers_demoted_total", "Subscribers that used up "
                       "--max-publisher-pause", getattr(stats, "slow_subscribers_demoted", 0))
        held = _held_publishers(broker)
        if held is not None:
            yield _gauge("mqttd_publishers_held", "Publishers paused right now", held)

        # --- store latency ----------------------------------------------------------------------
        store = broker.store
        for attr, name, doc in (
                ("write_latency", "mqttd_store_write_seconds",
                 "Time to write one batch of store operations"),
                ("fsync_latency", "mqttd_store_fsync_seconds",
                 "Time of one fsync of the store (group commit)")):
            histogram = getattr(store, attr, None)
            if histogram is not None:
                h = HistogramMetricFamily(name, doc)
                h.add_metric([], histogram.cumulative(), histogram.total)
                yield h

        # --- features' gauges and counters (bridges, cluster...) -------------------------
        # (a feature exports its own metrics through the service's seam; this
        # package knows no feature, so no metric is exported twice)
        seen = set()
        for attribute, family in (("gauges", GaugeMetricFamily),
                                  ("counters", CounterMetricFamily)):
            metrics: Dict[str, tuple] = getattr(self.service, attribute, {}) or {}
            for name, (doc, labels, read) in sorted(metrics.items()):
                if name in seen:
                    continue   # one name, one metric family (a valid exposition)
                seen.add(name)
                metric = family(name, doc, labels=list(labels))
                try:
                    for label_values, value in read():
                        metric.add_metric([str(v) for v in label_values], value)
                except Exception:
                    continue  # a feature's failing metric must not break the scrape
                yield metric


def _held_publishers(broker) -> Optional[int]:
    flow = getattr(broker, "flow", None)
    for holder in (flow, broker):
        held = getattr(holder, "_held", None) if holder is not None else None
        if held is not None:
            try:
                return len(held)
            except TypeError:
                return None
    return None


def _gauge(name: str, doc: str, value) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _counter(name: str, doc: str, value) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def make_registry(broker, service=None, ring=None) -> CollectorRegistry:
    """A registry with the broker's collector and the process collector (RSS, CPU, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, service, ring))
    # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux /proc;
    # elsewhere it yields nothing and the broker metrics still work)
    registry.register(ProcessCollector(registry=None))
    return registry


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text exposition format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


def metrics_resource(registry: CollectorRegistry) -> Resource:
    """A root resource serving ``/metrics`` (and ``/`` with a pointer to it)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"", _Index())
    return root


class _Index(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"mqttd metrics: /metrics\n"
