"""``$SYS`` per node and cluster-wide counts; the cluster's Prometheus gauges.

Every ``interval`` seconds each node writes its own counters to
``mqttd:{n:<id>}:stats`` (a HASH that expires with the node: PX = 3
intervals) and sums those of every live node.  It publishes, retained in
memory like the rest of ``$SYS/broker``:

- this node: ``$SYS/broker/cluster/node/id``, ``.../node/fenced`` (0/1),
  ``.../node/forwarded`` (envelopes sent to other nodes),
  ``.../node/received`` (envelopes received from them), ``.../node/dropped``
  (not forwarded: backlog full or Redis down), ``.../node/routes`` (filters
  with subscribers here), ``.../node/routes/cached`` (other nodes' filters);
- the cluster: ``$SYS/broker/cluster/nodes`` (live nodes, this one
  included), ``.../clients/connected``, ``.../clients/total`` (sessions),
  ``.../messages/received``, ``.../messages/sent``, ``.../subscriptions/count``
  (sums over the live nodes), ``.../retained/count`` (clients' retained
  messages, from the Redis index);
- every live node's own figures, whatever node the subscriber is on:
  ``$SYS/broker/cluster/members/<node id>/<name>`` (the summed names above,
  and ``fenced``), cleared when the node is gone.

``$SYS`` messages themselves are per node: they are never forwarded.
"""
from __future__ import annotations

from typing import Dict

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mqttd.cluster.backend import BackendError
from mqttd.messages import SYS_ORIGIN, Message

log = Logger(namespace="mqttd.cluster.stats")

PREFIX = "$SYS/broker/cluster/"
SUMMED = ("clients_connected", "clients_total", "messages_received", "messages_sent",
          "subscriptions")
#: the per-node figures under ``$SYS/broker/cluster/members/<id>/``
MEMBER_TOPICS = {"clients_connected": "clients/connected", "clients_total": "clients/total",
                 "messages_received": "messages/received", "messages_sent": "messages/sent",
                 "subscriptions": "subscriptions/count"}


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ClusterStats:
    """Publishes the cluster ``$SYS`` topics of one node (see the module doc)."""

    def __init__(self, cluster, interval: float = 10.0):
        self.cluster = cluster
        self.broker = cluster.broker
        self.interval = interval
        #: the last cluster-wide sums (also for the metrics)
        self.totals: Dict[str, int] = {}
        self.nodes_alive = 1
        #: node ids whose members/<id>/ values this node published
        self._members: set = set()
        #: each peer's figures as last read (a peer whose master does not
        #: answer counts as last seen, as the membership keeps it)
        self._last: Dict[str, Dict[str, int]] = {}
        self._loop = None
        self._busy = False

    def start(self) -> None:
        if self.interval > 0:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self.broker.clock
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def local(self) -> Dict[str, int]:
        """This node's counters that are summed cluster-wide."""
        broker = self.broker
        stats = broker.stats
        connected = subscriptions = 0
        for session in broker.sessions.values():
            if session.connection is not None:
                connected += 1
            subscriptions += len(session.subscriptions)
        return {"clients_connected": connected, "clients_total": len(broker.sessions),
                "messages_received": stats.messages_received,
                "messages_sent": stats.messages_sent, "subscriptions": subscriptions}

    def node_values(self) -> Dict[str, str]:
        cluster = self.cluster
        router = cluster.router
        return {
            "node/id": cluster.node_id,
            "node/fenced": "1" if cluster.node.fenced else "0",
            "node/forwarded": str(sum(router.stats["forwarded"])),
            "node/received": str(sum(router.stats["received"])),
            "node/dropped": str(router.stats["dropped"] + router.stats["forward_failed"]),
            "node/routes": str(len(cluster.routes.local)),
            "node/routes/cached": str(cluster.routes.cached_routes()),
        }

    @defer.inlineCallbacks
    def tick(self):
        if self._busy:
            return
        self._busy = True
        try:
            yield self._tick()
        except Exception as error:
            self.cluster.node.log_limiter.emit(log.warn, "stats", "Cluster $SYS update "
                                               "failed: {error}", error=str(error))
        finally:
            self._busy = False

    @defer.inlineCallbacks
    def _tick(self):
        cluster = self.cluster
        values = self.node_values()
        if not cluster.node.fenced:
            keys = cluster.keys
            mine = self.local()
            flat = []
            for name, value in mine.items():
                flat += [name, value]
            ttl_ms = int(max(self.interval * 3, cluster.node.ttl) * 1000)
            key = keys.stats(cluster.node_id)
            yield cluster.backend.pipeline([("HSET", key, *flat), ("PEXPIRE", key, ttl_ms)])
            peers = sorted(cluster.node.peers)
            # the retained count at the same time: a round waits for one
            # socket timeout at most when a master hangs, not one per read
            retained = getattr(cluster, "retained", None)
            counting = None
            if retained is not None:
                counting = defer.maybeDeferred(retained.refresh_count)
                counting.addErrback(self._count_failed, retained)
            # per master (Redis Cluster): a peer whose figures are on a master
            # that hangs or is down counts as last seen, the others are read
            # now -- one hung master no longer stops every node's cluster-wide
            # $SYS (REVIEW-S9-CLUSTER C3)
            replies = yield cluster.backend.pipeline_each(
                [("HMGET", keys.stats(n), *SUMMED) for n in peers])
            totals = dict(mine)
            members = {cluster.node_id: mine}
            last = {}
            for peer, reply in zip(peers, replies):
                if isinstance(reply, BaseException):
                    figures = self._last.get(peer, {})
                else:
                    figures = {name: int(value) for name, value in zip(SUMMED, reply)
                               if value is not None}
                for name, value in figures.items():
                    totals[name] = totals.get(name, 0) + value
                if figures:
                    members[peer] = last[peer] = figures
            self._last = last
            self.totals = totals
            self.nodes_alive = 1 + len(peers)
            values.update({
                "nodes": str(self.nodes_alive),
                "clients/connected": str(totals["clients_connected"]),
                "clients/total": str(totals["clients_total"]),
                "messages/received": str(totals["messages_received"]),
                "messages/sent": str(totals["messages_sent"]),
                "subscriptions/count": str(totals["subscriptions"]),
            })
            if counting is not None:
                count = yield counting
                values["retained/count"] = str(count)
            values.update(self._member_values(members))
        for suffix, payload in values.items():
            self.broker.publish_volatile(Message(PREFIX + suffix, payload.encode("utf-8"), 0,
                                                 True, origin=SYS_ORIGIN))

    def _count_failed(self, failure, retained) -> int:
        """The index root's master does not answer: the count as last read
        (the rest of the round still goes out)."""
        failure.trap(BackendError)
        self.cluster.node.log_limiter.emit(
            log.warn, "stats-retained", "Cluster retained count not read: {error}; "
            "publishing the last one", error=str(failure.value))
        return retained.client_count()

    def _member_values(self, members: Dict[str, Dict[str, int]]) -> Dict[str, str]:
        """``members/<id>/<name>`` for every live node; the retained values of
        the nodes gone since the last tick are forgotten."""
        values = {}
        for node, figures in members.items():
            base = f"members/{node}/"
            for name, topic in MEMBER_TOPICS.items():
                if name in figures:
                    values[base + topic] = str(figures[name])
        for gone in self._members - set(members):
            for topic in MEMBER_TOPICS.values():
                self.broker.retained.remove(f"{PREFIX}members/{gone}/{topic}")
        self._members = set(members)
        return values


def install_gauges(service, cluster) -> None:
    """The cluster's gauges in the admin metrics (``--metrics-listen``)."""
    router = cluster.router
    node = cluster.node
    routes = cluster.routes
    stats = cluster.stats
    service.add_gauge("mqttd_cluster_fenced", "1 while this node is fenced off from Redis",
                      (), lambda: [((), 1 if node.fenced else 0)])
    service.add_gauge("mqttd_cluster_nodes", "Live cluster nodes (this one included)", (),
                      lambda: [((), 1 + len(node.peers))])
    service.add_gauge("mqttd_cluster_forwarded", "Envelopes sent to other nodes, by QoS",
                      ("qos",), lambda: [((str(q),), n)
                                         for q, n in enumerate(router.stats["forwarded"])])
    service.add_gauge("mqttd_cluster_received", "Envelopes received from other nodes, by QoS",
                      ("qos",), lambda: [((str(q),), n)
                                         for q, n in enumerate(router.stats["received"])])
    service.add_gauge("mqttd_cluster_not_forwarded", "Envelopes not forwarded (backlog full "
                      "or Redis down)", (),
                      lambda: [((), router.stats["dropped"] + router.stats["forward_failed"])])
    service.add_gauge("mqttd_cluster_backlog", "Envelopes waiting for Redis", (),
                      lambda: [((), len(router._pending))])
    service.add_gauge("mqttd_cluster_routes", "Route filters: local (this node's) and "
                      "cached (the other nodes')", ("kind",),
                      lambda: [(("local",), len(routes.local)),
                               (("cached",), routes.cached_routes())])
    service.add_gauge("mqttd_cluster_route_ack_timeouts", "Route changes acknowledged "
                      "(SUBACK) without every live node having applied them in time", (),
                      lambda: [((), routes.stats["ack_timeouts"])])
    service.add_gauge("mqttd_cluster_shared_rerouted", "Shared-group messages handed on to "
                      "another node whose members could take them", (),
                      lambda: [((), router.stats["rerouted"])])
    service.add_gauge("mqttd_cluster_heartbeat_failures", "Heartbeats Redis did not "
                      "acknowledge", (), lambda: [((), node.stats["heartbeat_failures"])])
    service.add_gauge("mqttd_cluster_clients_connected", "Clients connected to all live "
                      "nodes (at the last $SYS interval)", (),
                      lambda: [((), stats.totals.get("clients_connected", 0))])
