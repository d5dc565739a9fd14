"""Wiring of cluster sessions into a node (``--cluster``): the feature hook.

Runs after :func:`mqttd.cluster.service.from_options` (``mqttd.tap.FEATURES``):
the broker's store becomes a :class:`~mqttd.cluster.store.RedisSessionStore`
(wrapping the ``--persistence`` store, which keeps retained messages), the
broker's ``session_registry`` a :class:`~mqttd.cluster.sessions.ClusterSessions`,
control messages (kick/done/poke) travel on each node's control stream, and a
:class:`~mqttd.cluster.reaper.Reaper` reaps the nodes the membership sees die.
"""
from __future__ import annotations

from typing import Dict, Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from mqttd.cluster.reaper import Reaper
from mqttd.cluster.sessions import ClusterSessions
from mqttd.cluster.store import RedisSessionStore

log = Logger(namespace="mqttd.cluster.sessions")

__all__ = ["ControlStream", "from_options"]


class ControlStream:
    """Each node's control stream (``<prefix>{n:<node>}:ctl``): small field
    maps (``op``, ``cid``, ...) to one node, read by that node in order.

    A stream, not pub/sub: a message sent while the reader reconnects is
    still read.  Trimmed to about ``maxlen`` entries.
    """

    def __init__(self, backend, keys, node_id: str, clock, handler, maxlen: int = 10000,
                 block_ms: int = 1000):
        self.backend = backend
        self.keys = keys
        self.node_id = node_id
        self.clock = clock
        self.handler = handler
        self.maxlen = maxlen
        self.block_ms = block_ms
        #: the id of the last entry read ("0-0": everything of a new stream;
        #: never "$", which would skip what arrives between two reads)
        self._last = b"0-0"
        self._running = False
        self._reading = None

    def send(self, node: str, fields: Dict[str, object]) -> defer.Deferred:
        args = []
        for name, value in fields.items():
            args.extend((name, value))
        return self.backend.execute("XADD", self.keys.control(node), "MAXLEN", "~",
                                    self.maxlen, "*", *args)

    def start(self) -> None:
        self._running = True
        d = self.backend.execute("XREVRANGE", self.keys.control(self.node_id), "+", "-",
                                 "COUNT", 1)

        def first(reply):
            if reply:
                self._last = reply[0][0]   # only what comes after our start
            self._read()
        d.addCallbacks(first, lambda f: self._retry(f))

    def stop(self) -> None:
        self._running = False

    def _read(self) -> None:
        if not self._running:
            return
        d = self.backend.execute("XREAD", "COUNT", 100, "BLOCK", self.block_ms, "STREAMS",
                                 self.keys.control(self.node_id), self._last)
        d.addCallbacks(self._got, self._retry)

    def _got(self, reply) -> None:
        for _stream, entries in reply or ():
            for entry_id, raw in entries:
                self._last = entry_id
                if not isinstance(raw, dict):
                    raw = dict(zip(raw[::2], raw[1::2]))
                fields = {(k.decode() if isinstance(k, bytes) else k): v
                          for k, v in raw.items()}
                try:
                    self.handler(fields)
                except Exception:
                    log.failure("Control message {fields!r} failed", fields=fields)
        self._read()

    def _retry(self, failure) -> None:
        if self._running:
            log.warn("Reading the control stream failed ({error}); retrying in 1 s",
                     error=str(failure.value))
            self.clock.callLater(1.0, self._read)


@defer.inlineCallbacks
def check_internal_sessions(broker, backend, keys, node_id: str):
    """Internal sessions (a bridge's local end) are node-local: a bridge
    configured on two nodes forwards every message once per node.  Record
    which node runs each (``<prefix>{c:<client id>}:local``) and log an error
    when another live node runs the same one."""
    for client_id in sorted(getattr(broker, "_reserved_ids", {})):
        key = f"{keys.prefix}{{c:{client_id}}}:local"
        try:
            holder = yield backend.execute("GET", key)
            holder = holder.decode() if isinstance(holder, bytes) else holder
            if holder and holder != node_id and (
                    yield backend.execute("EXISTS", keys.alive(holder))):
                log.error("The internal session {client_id} ({owner}) also runs on node "
                          "{node}: a bridge configured on several nodes forwards every "
                          "message once per node; configure each bridge on one node",
                          client_id=client_id, owner=broker.internal_owner(client_id),
                          node=holder)
            yield backend.execute("SET", key, node_id)
        except Exception as error:
            log.warn("Cannot record the internal session {client_id}: {error}",
                     client_id=client_id, error=str(error))


def from_options(service, options) -> Optional[ClusterSessions]:
    """The ``twistd mqttd`` feature hook: cluster sessions for ``--cluster``."""
    cluster = getattr(service, "cluster", None)
    if cluster is None:
        return None
    return install(cluster, takeover_timeout=options.get("cluster-takeover-timeout") or 5.0,
                   wait_replicas=int(options.get("cluster-wait-replicas") or 0))


def settle_after_reset(stale_after: Optional[float], least: float = 2.0) -> float:
    """Seconds the reaper waits after resetting a dead node's routes before it
    reads the dead inbox a last time and deletes it: longer than a route cache
    may lag and still be trusted (``stale_after``; an older one holds what it
    would forward), so no publisher still routes to the dead node when its
    inbox goes -- an XADD after the delete re-creates a stream nobody reads."""
    if stale_after is None:
        return least
    return max(least, stale_after + 0.5)


def install(cluster, takeover_timeout: float = 5.0, wait_replicas: int = 0) -> ClusterSessions:
    """Plug sessions, control stream and reaper into a ClusterService."""
    broker = cluster.broker
    backend = cluster.backend
    keys = cluster.keys
    node_id = cluster.node_id
    clock = broker.clock
    store = RedisSessionStore(backend, node_id, prefix=keys.prefix, clock=clock,
                              inner=broker.store, wait_replicas=wait_replicas)
    broker.store = store
    broker._durable = True
    # a node may die: a QoS 2 PUBLISH leaves once Redis has its packet id
    broker.qos2_sent_after_store = True
    # internal sessions (a bridge's local end) stay in this node's own store
    store.is_local = lambda client_id: broker.internal_owner(client_id) is not None

    def is_alive(node):
        return backend.execute("EXISTS", keys.alive(node)).addCallback(bool)

    control = ControlStream(backend, keys, node_id, clock, lambda f: sessions.handle_control(f))
    sessions = ClusterSessions(broker, backend, store, node_id, clock, control.send, is_alive,
                               prefix=keys.prefix, takeover_timeout=takeover_timeout,
                               boot=cluster.node.boot_id)
    from mqttd.cluster.reaper import InboxReplay
    routes = getattr(cluster, "routes", None)
    inbox = InboxReplay(backend, keys, node_id, clock,
                        settle=settle_after_reset(getattr(routes, "stale_after", None)))
    reaper = Reaper(sessions, replay_inbox=inbox.replay, forget_node=inbox.forget)
    cluster.sessions = sessions
    cluster.reaper = reaper
    router = getattr(cluster, "router", None)
    if router is not None:
        # de-duplicates the forwarding of a node that gave a session away
        sessions.also_sent_to = router.also_sent_to
        sessions.router = router
    node = cluster.node
    sessions.is_fenced = lambda: node.fenced
    # a restart with the same node id: first reap the previous incarnation
    node.recover = reaper.recover_own
    node.on("unfenced", sessions.unfenced)
    node.on("unfenced", reaper.release_wills)
    node.on("fenced", sessions.refuse_claims)
    node.on("peer_down", lambda peer, _boot=None: reaper.reap(peer))

    def look():
        if node.fenced:
            return
        d = node.dead_members()
        d.addCallback(lambda dead: [reaper.reap(peer) for peer in dead])
        d.addErrback(lambda f: log.debug("Looking for dead nodes failed: {error}",
                                         error=str(f.value)))
    sweeper = task.LoopingCall(look)
    sweeper.clock = clock
    started = []

    def start():
        control.start()
        sweeper.start(max(node.ttl, 1.0), now=False)
        started.append(True)
        check_internal_sessions(broker, backend, keys, node_id)
    node.on("unfenced", lambda: None if started else start())

    def rejoined(_old_boot=None, new_boot=None):
        sessions.boot = new_boot or node.boot_id
        sessions.recheck_ownership()
    node.on("rejoined", rejoined)

    def stop():
        # a clean stop: the clients go now (v5 0x8B) and Redis hears it
        # before this node leaves -- else the reaper would publish their wills
        broker.unavailable = f"cluster node {node_id} is stopping"
        broker.shutdown()
        control.stop()
        if sweeper.running:
            sweeper.stop()
        reaper.stop()
        sessions.stop()
        return store._sync().addErrback(lambda _f: None)
    cluster.stoppers.append(stop)
    return sessions
