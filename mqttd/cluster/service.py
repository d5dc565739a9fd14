"""``ClusterService``: the cluster's parts wired to one broker (``--cluster URL``).

A child of :class:`mqttd.service.BrokerService`, so it starts after the
store was restored and stops before the store closes.  Until the node has
joined (and whenever it is fenced) the broker refuses CONNECT with v5 0x88 /
v3 rc 3 (``Broker.unavailable``).
"""
from __future__ import annotations

from typing import Callable, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from mqttd.cluster.backend import Backend
from mqttd.cluster.bus import Router
from mqttd.cluster.keys import Keys
from mqttd.cluster.node import Node, default_node_id
from mqttd.cluster.routes import RouteTable
from mqttd.cluster.sessions import FENCED_REASON
from mqttd.cluster.stats import ClusterStats, install_gauges

log = Logger(namespace="mqttd.cluster.service")

#: v5 DISCONNECT reason a fenced node closes its clients with (Server busy)
FENCED_DISCONNECT = 0x89


class ClusterService(MultiService):
    """The cluster membership (and, plugged in by the other modules, routing,
    sessions, retained messages) of one broker.

    :param broker: the :class:`~mqttd.broker.Broker`.
    :param backend: a :class:`~mqttd.cluster.backend.Backend`.
    :param node_id: this node's id.
    :param heartbeat: seconds between heartbeats.
    :param ttl: node TTL, seconds.
    :param wait_replicas: ``--cluster-wait-replicas`` for the router's
        hand-off of QoS >= 1 messages (see :class:`~mqttd.cluster.bus.Router`).
    """

    def __init__(self, broker, backend: Backend, node_id: str, heartbeat: float = 1.0,
                 ttl: float = 5.0, keys: Keys = Keys(), inbox_maxlen: int = 1_000_000,
                 route_resync: float = 30.0, sys_interval: float = 10.0,
                 wait_replicas: int = 0):
        super().__init__()
        self.setName("cluster")
        self.broker = broker
        self.backend = backend
        self.keys = keys
        self.node = Node(backend, broker.clock, node_id, heartbeat, ttl, keys)
        #: this node's routes in Redis and the cache of everyone's
        self.routes = RouteTable(backend, broker.clock, node_id, keys, resync=route_resync)
        #: forwarding to the other nodes, delivering what they send here
        self.router = Router(broker, backend, self.routes, self.node, keys,
                             inbox_maxlen=inbox_maxlen, wait_replicas=wait_replicas)
        #: $SYS/broker/cluster/...: this node and cluster-wide sums
        self.stats = ClusterStats(self, sys_interval)
        self.node.on("fenced", self._fenced)
        self.node.on("unfenced", self._unfenced)
        # a new incarnation: routes and inbox again -- unless the join's answer
        # came too late to count (still fenced: a fresh heartbeat unfences)
        self.node.on("rejoined",
                     lambda old, new: None if self.node.fenced else self._unfenced())
        self._attach()
        self._announced = False
        self._settings_checked = False
        #: callables run (in order) by stopService before the backend closes;
        #: each may return a Deferred
        self.stoppers: List[Callable[[], object]] = []

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def _attach(self) -> None:
        """Plug into the broker's seams: the route observer and the remote router."""
        broker = self.broker
        routes = self.routes

        def observe(topic_filter, key, added):
            if routes.observe(topic_filter, key, added):
                broker.write_count += 1   # the SUBACK waits until the route is in Redis
        broker.route_observer = observe
        for topic_filter, key, value in list(broker._trie.items()):   # already subscribed
            share = getattr(key, "share_filter", None)
            if share is not None:
                for client_id in key.members:
                    routes.observe(share, client_id, True)
            else:
                routes.observe(topic_filter, key, True)
        broker.add_remote_router(self.router)

    def _detach(self) -> None:
        if self.broker.router is self.router:
            self.broker.router = None
        self.broker.route_observer = None

    def startService(self):
        self.broker.unavailable = f"cluster node {self.node_id} is {self.node.fence_reason}"
        super().startService()
        self.node.start()
        self.stats.start()

    @defer.inlineCallbacks
    def stopService(self):
        yield defer.maybeDeferred(super().stopService)
        for stop in reversed(self.stoppers):
            try:
                yield defer.maybeDeferred(stop)
            except Exception:
                log.failure("Stopping a cluster part failed")
        self.stats.stop()
        self.router.stop()
        leave = self.node.joined and not self.node.fenced and not self._persistent_routes()
        if leave:
            # nothing here for a reaper: the others forget this node at once
            yield self.routes.drop()
            try:
                yield self.backend.execute("DEL", self.keys.inbox(self.node_id))
            except Exception as error:
                log.warn("Cannot delete the inbox of {node_id}: {error}",
                         node_id=self.node_id, error=str(error))
        self.routes.stop()
        yield self.node.stop(leave=leave)
        self._detach()
        yield self.backend.close()

    def _persistent_routes(self) -> bool:
        """True if a persistent session has routes here (its messages must keep
        coming to this node's inbox until a reaper adopts it)."""
        sessions = self.broker.sessions
        for keys in self.routes.local.values():
            for key in keys:
                session = sessions.get(key) if isinstance(key, str) else None
                if session is not None and session.persistent:
                    return True
        return False

    # --- fencing ---------------------------------------------------------------------

    def _fenced(self, reason: str) -> None:
        self.routes.fenced()
        self.router.fenced()
        broker = self.broker
        broker.unavailable = f"cluster node {self.node_id} is fenced: {reason}"
        closed = 0
        for session in list(broker.sessions.values()):
            conn = session.connection
            if conn is None:
                continue
            # no will here (it would reach no one while fenced): when Redis
            # answers, whoever owns the session then publishes it -- the
            # reaper that adopted it, or this node if no one did
            # (mqttd.cluster.sessions: Disconnected(take_will=True))
            broker.connection_lost(session, conn, publish_will=False,
                                   reason=FENCED_REASON)
            conn.disconnect(FENCED_DISCONNECT, "cluster node lost Redis")
            closed += 1
        if closed:
            log.warn("Fenced node {node_id} disconnected {count} clients",
                     node_id=self.node_id, count=closed)

    def _unfenced(self) -> None:
        if not self._settings_checked:
            self._settings_checked = True
            check_redis_settings(self.backend)
        loaded = self.routes.joined()
        self.router.joined()
        if not loaded.called:
            # no client before the route cache holds every node's routes: a
            # message published here now would miss the others' subscribers
            self.broker.unavailable = f"cluster node {self.node_id} is loading the routes"
            loaded.addCallback(lambda _: None if self.node.fenced else self._serving())
            return
        self._serving()

    def _serving(self) -> None:
        self.broker.unavailable = None
        parent = self.parent
        if not self._announced and getattr(parent, "ready_file", None):
            # the ready file again, now saying "joined": a node is ready for
            # clients once it is a member (tests and supervisors wait for it)
            self._announced = True
            try:
                parent._write_ready_file()
            except OSError as error:
                log.warn("Cannot rewrite the ready file {path}: {error}",
                         path=parent.ready_file, error=str(error))

    def ready_info(self) -> dict:
        """The ``cluster`` entry of the ready file."""
        return {"node_id": self.node_id, "boot_id": self.node.boot_id,
                "joined": self.node.joined and not self.node.fenced and self.routes.loaded}


@defer.inlineCallbacks
def check_redis_settings(backend):
    """Warn (one WARN line per setting and Redis server) when Redis runs with
    settings that void the cluster's guarantees: no AOF (a Redis restart loses
    every acknowledged message, session and route it held) or a
    ``maxmemory-policy`` other than ``noeviction`` (Redis may evict sessions,
    queued messages or a live node's alive key).  Fires with the list of
    warnings (tests); never fails (a Redis that cannot be asked is logged at
    debug level: the heartbeat reports outages)."""
    warnings = []
    try:
        persistence = yield backend.server_info("persistence")
        memory = yield backend.server_info("memory")
    except Exception as error:
        log.debug("Cannot check the Redis settings: {error}", error=str(error))
        return warnings

    def per_server(info):
        if isinstance(info, dict) and info and all(isinstance(v, dict)
                                                   for v in info.values()):
            return info        # Redis Cluster: {server: INFO}
        return {backend.url.redacted(): info or {}}
    for server, info in sorted(per_server(persistence).items()):
        if str(info.get("aof_enabled", "")) != "1":
            warnings.append(("appendonly", server))
            log.warn("Redis at {server} runs without AOF (appendonly no): a Redis restart "
                     "loses the sessions, queued and acknowledged messages and routes it "
                     "holds; run it with appendonly yes (docs/cluster.rst, Redis settings)",
                     server=server)
    for server, info in sorted(per_server(memory).items()):
        policy = info.get("maxmemory_policy")
        policy = policy.decode() if isinstance(policy, bytes) else policy
        if policy and policy != "noeviction":
            warnings.append(("maxmemory-policy", server))
            log.warn("Redis at {server} has maxmemory-policy {policy}: when full it evicts "
                     "keys -- sessions, queued messages, a live node's heartbeat; set "
                     "maxmemory-policy noeviction (docs/cluster.rst, Redis settings)",
                     server=server, policy=policy)
    if backend.is_cluster:
        # Redis's default: one master down (no replica to take over) makes
        # every master refuse every command, and every mqttd node fence
        # itself (REVIEW-CLUSTER F17); with "no" only the sessions and nodes
        # whose keys live on that master are unavailable
        try:
            coverage = yield backend.config_get("cluster-require-full-coverage")
        except Exception as error:
            log.debug("Cannot read cluster-require-full-coverage: {error}",
                      error=str(error))
            coverage = {}
        for server, value in sorted(coverage.items()):
            if value is not None and value.lower() != "no":
                warnings.append(("cluster-require-full-coverage", server))
                log.warn("Redis Cluster master {server} has cluster-require-full-coverage "
                         "{value}: while any master is down every master refuses every "
                         "command and every mqttd node fences itself; set "
                         "cluster-require-full-coverage no, so that only the sessions and "
                         "nodes whose keys live on the failed master are unavailable "
                         "(docs/cluster.rst, Redis settings)", server=server, value=value)
    return warnings


def from_options(service, options) -> Optional[ClusterService]:
    """The ``twistd mqttd`` feature hook (``mqttd.tap.FEATURES``): with
    ``--cluster URL`` run this broker as a cluster node."""
    url = options.get("cluster")
    if not url:
        return None
    node_id = options.get("node-id") or default_node_id()
    backend = Backend(url, name=f"mqttd-{node_id}",
                      clock=getattr(service.broker, "clock", None))
    heartbeat = options.get("cluster-heartbeat") or 1.0
    ttl = options.get("cluster-node-ttl") or 5.0
    sys_interval = options.get("sys-interval")
    cluster = ClusterService(service.broker, backend, node_id, heartbeat, ttl,
                             inbox_maxlen=options.get("cluster-inbox-maxlen") or 1_000_000,
                             sys_interval=10.0 if sys_interval is None else sys_interval,
                             wait_replicas=int(options.get("cluster-wait-replicas") or 0))
    cluster.setServiceParent(service)
    install_gauges(service, cluster)
    service.cluster = cluster
    service.ready_extras["cluster"] = cluster.ready_info
    return cluster
