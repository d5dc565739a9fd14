"""The cluster's route table: which node has subscribers for which filter.

Two levels, as in EMQX: each node writes only **its own** route set
``mqttd:{n:<id>}:routes`` (a SET of topic filters with local subscribers;
shared subscriptions as ``$share/<group>/<filter>``) and a version counter
``mqttd:{n:<id>}:rver``; every change is also appended to the cluster-wide
stream ``mqttd:routefeed`` (node, version, operations).  Every node keeps an
in-memory cache of all routes in a subscription trie (filter -> nodes),
applies the feed in version order, and reloads a node's whole set when it
sees a gap, a ``reset``, or a version mismatch in the periodic resync
(every ``resync`` seconds).  A stale cache is never unsafe for delivery: a
node that receives an envelope it has no subscriber for drops it; it only
has to be fresh enough not to miss one — a SUBACK is sent only after the
route reached Redis (the broker's barrier waits for :meth:`sync`).

Local changes come from the broker's ``route_observer`` seam (every
subscription added to or removed from its index), are batched per reactor
turn and written by one Lua script per batch (one slot: the node's hashtag),
at most one batch in flight, so the versions follow the order of changes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from mqttd import topics
from mqttd.cluster.backend import BackendError
from mqttd.cluster.keys import Keys
from mqttd.durability import fire_waiters
from mqttd.ratelimit import LogRateLimiter
from mqttd.topics import SubscriptionTrie

log = Logger(namespace="mqttd.cluster.routes")

#: route changes of one batch: '+' or '-' then the route, alternating in ARGV
CHANGE = """
for i = 1, #ARGV, 2 do
  if ARGV[i] == '+' then
    redis.call('SADD', KEYS[1], ARGV[i + 1])
  else
    redis.call('SREM', KEYS[1], ARGV[i + 1])
  end
end
return redis.call('INCR', KEYS[2])
"""

#: a node's whole route set is replaced: delete it, bump the version
RESET = """
redis.call('DEL', KEYS[1])
return redis.call('INCR', KEYS[2])
"""

SEP = "\x00"   # never in a topic filter [MQTT-4.7.3-2]
RESET_OP = "reset"
#: routes per SADD when a whole set is written
CHUNK = 5000
FEED_MAXLEN = 100_000


def route_name(topic_filter: str, key) -> str:
    """The route of one index entry: the filter (``$share/g/f`` for a group member)."""
    return topic_filter


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RouteTable:
    """This node's routes in Redis and the cache of every node's routes.

    :param backend: the :class:`~mqttd.cluster.backend.Backend`.
    :param clock: ``IReactorTime``.
    :param node_id: this node.
    :param resync: seconds between full version checks of every node's routes.
    """

    def __init__(self, backend, clock, node_id: str, keys: Keys = Keys(),
                 resync: float = 30.0, block_ms: int = 2000):
        self.backend = backend
        self.clock = clock
        self.node_id = node_id
        self.keys = keys
        self.resync_interval = resync
        self.block_ms = block_ms
        #: local routes: route -> the index keys (client ids, groups...) behind it
        self.local: Dict[str, Set] = {}
        #: cache: node -> its routes; node -> the version they are at
        self.routes: Dict[str, Set[str]] = {}
        self.versions: Dict[str, int] = {}
        self._trie = SubscriptionTrie(cache_size=10000)
        self._pending: List[Tuple[str, str]] = []
        self._flushing: Optional[defer.Deferred] = None
        self._flush_call = None
        self._sync_waiters: List[Tuple[int, defer.Deferred]] = []
        self._queued = 0      # changes queued so far (sequence numbers)
        self._written = 0     # changes known to be in Redis
        self._online = False  # joined: changes go to Redis
        self._reset_needed = True
        self._feed_id = b"0-0"
        self._reading = False
        self._stopped = True
        self._loading: Dict[str, defer.Deferred] = {}
        self._resync_call = None
        self.log_limiter = LogRateLimiter(clock, interval=10.0, burst=1, reason_burst=None)
        self.stats = {"route_writes": 0, "route_write_failures": 0, "feed_entries": 0,
                      "reloads": 0}
        backend.register("routes-change", CHANGE)
        backend.register("routes-reset", RESET)

    # --- local changes (the broker's route_observer) -----------------------------------

    def observe(self, topic_filter: str, key, added: bool) -> bool:
        """The broker added (``added``) or removed ``key``'s subscription to
        ``topic_filter`` in its index.  True if a write to Redis was queued
        (the route set changed while joined)."""
        route = route_name(topic_filter, key)
        keys = self.local.get(route)
        if added:
            if keys is None:
                self.local[route] = {key}
                return self._local_changed("+", route)
            keys.add(key)
        elif keys is not None:
            keys.discard(key)
            if not keys:
                del self.local[route]
                return self._local_changed("-", route)
        return False

    def _local_changed(self, op: str, route: str) -> bool:
        self._cache_apply(self.node_id, op, route)
        if not self._online:
            return False        # written as a whole set when the node joins
        self._pending.append((op, route))
        self._queued += 1
        self._schedule_flush()
        return True

    def _schedule_flush(self) -> None:
        if self._flush_call is None and self._flushing is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def pending_writes(self) -> int:
        """Route changes not yet acknowledged by Redis."""
        return self._queued - self._written

    def sync(self) -> Optional[defer.Deferred]:
        """A Deferred firing once every route change made so far is in Redis
        (None: nothing pending); fails if writing them failed."""
        if self._queued == self._written or not self._online:
            return None
        d = defer.Deferred()
        self._sync_waiters.append((self._queued, d))
        return d

    def _fire_waiters(self, upto: int, failure=None) -> None:
        self._sync_waiters = fire_waiters(self._sync_waiters, upto, failure)

    def _flush(self) -> None:
        self._flush_call = None
        if self._flushing is not None or not self._online:
            return
        if self._reset_needed:
            d = self._write_reset()
        elif self._pending:
            d = self._write_changes()
        else:
            return
        self._flushing = d

        def done(_):
            self._flushing = None
            if self._pending or self._reset_needed:
                self._schedule_flush()
        d.addBoth(done)

    def _write_changes(self) -> defer.Deferred:
        batch, self._pending = self._pending, []
        upto = self._queued
        args = []
        for op, route in batch:
            args += [op, route]
        d = self.backend.run("routes-change", [self.keys.routes(self.node_id),
                                               self.keys.route_version(self.node_id)], args)

        def written(version):
            self._feed_append(int(version), SEP.join(args))
            self._written = max(self._written, upto)
            self.stats["route_writes"] += 1
            self._fire_waiters(upto)

        def failed(failure):
            self.stats["route_write_failures"] += 1
            self._failed_write(failure, upto)
            # the next write is a whole set: Redis may or may not have taken this one
            self._reset_needed = True
        d.addCallbacks(written, failed)
        return d

    def _failed_write(self, failure, upto) -> None:
        if not failure.check(BackendError):
            log.failure("Writing routes of {node_id} failed", failure, node_id=self.node_id)
        else:
            self.log_limiter.emit(log.warn, "route-write",
                                  "Cannot write the routes of {node_id} to Redis: {error}; "
                                  "subscribers here wait for their SUBACK",
                                  node_id=self.node_id, error=str(failure.value))
        self._fire_waiters(upto, failure)

    @defer.inlineCallbacks
    def _write_reset(self):
        """Write the whole local route set (on join, re-join, after a failed write)."""
        self._pending = []
        upto = self._queued
        routes = sorted(self.local)
        key = self.keys.routes(self.node_id)
        try:
            version = yield self.backend.run(
                "routes-reset", [key, self.keys.route_version(self.node_id)], [])
            for start in range(0, len(routes), CHUNK):
                yield self.backend.execute("SADD", key, *routes[start:start + CHUNK])
        except Exception:
            self.stats["route_write_failures"] += 1
            from twisted.python.failure import Failure
            self._failed_write(Failure(), upto)
            return
        self._reset_needed = False
        self._feed_append(int(version), RESET_OP)
        self._written = max(self._written, upto)
        self.stats["route_writes"] += 1
        self._fire_waiters(upto)
        log.info("Routes of {node_id} written: {count} filters (version {version})",
                 node_id=self.node_id, count=len(routes), version=version)

    def _feed_append(self, version: int, ops: str) -> None:
        d = self.backend.execute("XADD", self.keys.route_feed(), "MAXLEN", "~", FEED_MAXLEN,
                                 "*", "n", self.node_id, "v", version, "o", ops)
        # a lost feed entry is a gap for the others: they reload this node's set
        d.addErrback(lambda f: self.log_limiter.emit(
            log.warn, "feed-write", "Cannot append to the route feed: {error}",
            error=str(f.value)))

    # --- life cycle ----------------------------------------------------------------------

    def joined(self) -> None:
        """The node (re-)joined: write the whole local set, (re)load the cache."""
        self._online = True
        self._reset_needed = True
        self._written = self._queued = max(self._queued, self._written)
        self._schedule_flush()
        if self._stopped:
            self._stopped = False
            self._read_feed_forever()
            self._schedule_resync()

    def fenced(self) -> None:
        """Redis is out of reach: hold changes until the next join."""
        self._online = False
        self._pending = []
        self._fire_waiters(self._queued)   # nothing to wait for: the node is closing clients

    def drop(self) -> defer.Deferred:
        """Delete this node's route set (it leaves the cluster): a ``reset`` with
        nothing in it, so the others forget its routes at once."""
        self._online = False
        d = self.backend.run("routes-reset", [self.keys.routes(self.node_id),
                                              self.keys.route_version(self.node_id)], [])
        d.addCallback(lambda version: self._feed_append(int(version), RESET_OP))
        d.addErrback(lambda f: log.warn("Cannot delete the routes of {node_id}: {error}",
                                        node_id=self.node_id, error=str(f.value)))
        return d

    def stop(self) -> None:
        self._stopped = True
        self._online = False
        for call in (self._flush_call, self._resync_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._resync_call = None

    # --- the cache -------------------------------------------------------------------------

    def lookup(self, topic: str) -> Tuple[Set[str], Dict[str, Set[str]]]:
        """``(nodes, shares)`` for a topic name: the other nodes with a plain route
        matching it, and for each matching shared subscription ``$share/g/f``
        the nodes (this one included) with members."""
        nodes: Set[str] = set()
        shares: Dict[str, Set[str]] = {}
        for _filter, (node, share), _value in self._trie.match(topic):
            if share is None:
                if node != self.node_id:
                    nodes.add(node)
            else:
                found = shares.get(share)
                if found is None:
                    shares[share] = {node}
                else:
                    found.add(node)
        return nodes, shares

    def _cache_apply(self, node: str, op: str, route: str) -> None:
        share = None
        topic_filter = route
        if route.startswith(topics.SHARE_PREFIX):
            share = route
            _name, topic_filter = topics.parse_shared(route)
        key = (node, share)
        try:
            if op == "+":
                self.routes.setdefault(node, set()).add(route)
                self._trie.add(topic_filter, key, None)
            else:
                found = self.routes.get(node)
                if found is not None:
                    found.discard(route)
                self._trie.remove(topic_filter, key)
        except Exception as error:   # a corrupt route in Redis: never crash the reader
            self.log_limiter.emit(log.warn, "bad-route", "Ignoring route {route!r} of "
                                  "{node}: {error}", route=route, node=node, error=str(error))

    def _cache_replace(self, node: str, routes: Set[str], version: int) -> None:
        for route in list(self.routes.get(node, ())):
            if route not in routes:
                self._cache_apply(node, "-", route)
        for route in routes:
            if route not in self.routes.get(node, ()):
                self._cache_apply(node, "+", route)
        self.routes.setdefault(node, set())
        self.versions[node] = version

    def forget(self, node: str) -> None:
        """Drop ``node``'s routes from the cache (its set was deleted)."""
        self._cache_replace(node, set(), 0)
        self.routes.pop(node, None)
        self.versions.pop(node, None)

    def cached_routes(self) -> int:
        """Routes of the other nodes in the cache."""
        return sum(len(r) for n, r in self.routes.items() if n != self.node_id)

    # --- loading and the feed -----------------------------------------------------------

    def reload(self, node: str) -> defer.Deferred:
        """Load ``node``'s whole route set and version (one at a time per node)."""
        running = self._loading.get(node)
        if running is not None:
            return running
        self.stats["reloads"] += 1
        d = self.backend.pipeline([("GET", self.keys.route_version(node)),
                                   ("SMEMBERS", self.keys.routes(node))])

        def loaded(replies):
            version, members = replies
            self._cache_replace(node, {_text(m) for m in members}, int(version or 0))

        d.addCallback(loaded)

        def done(result):
            self._loading.pop(node, None)
            return result
        d.addBoth(done)
        self._loading[node] = d
        return d

    @defer.inlineCallbacks
    def load_all(self):
        """Reload every member node's routes (at start, after a Redis outage)."""
        last = yield self.backend.execute("XREVRANGE", self.keys.route_feed(), "+", "-",
                                          "COUNT", 1)
        if last:
            self._feed_id = last[0][0]
        members = yield self.backend.execute("SMEMBERS", self.keys.nodes())
        for member in sorted(_text(m) for m in members):
            if member != self.node_id:
                yield self.reload(member)

    @defer.inlineCallbacks
    def _read_feed_forever(self):
        """Follow the route feed while running; a failure waits and reloads all."""
        if self._reading:
            return
        self._reading = True
        need_load = True
        try:
            while not self._stopped:
                try:
                    if need_load:
                        yield self.load_all()
                        need_load = False
                    reply = yield self.backend.execute(
                        "XREAD", "COUNT", 1000, "BLOCK", self.block_ms, "STREAMS",
                        self.keys.route_feed(), self._feed_id)
                except Exception as error:
                    if not isinstance(error, BackendError):
                        log.failure("Reading the route feed failed")
                    else:
                        self.log_limiter.emit(log.warn, "feed-read",
                                              "Cannot read the route feed: {error}; retrying",
                                              error=str(error))
                    need_load = True
                    yield _sleep(self.clock, 0.5)
                    continue
                for _stream, entries in (reply or []):
                    for entry_id, fields in entries:
                        self._feed_id = entry_id
                        self._feed_entry(fields)
        finally:
            self._reading = False

    def _feed_entry(self, fields) -> None:
        self.stats["feed_entries"] += 1
        if isinstance(fields, list):   # RESP2 flat list
            fields = dict(zip(fields[::2], fields[1::2]))
        node = _text(fields.get(b"n", b""))
        if not node or node == self.node_id:
            return
        try:
            version = int(fields.get(b"v", b"0"))
        except ValueError:
            return
        ops = _text(fields.get(b"o", b""))
        known = self.versions.get(node)
        if ops == RESET_OP or known is None or version > known + 1:
            self.reload(node).addErrback(lambda f: None)
            return
        if version <= known:
            return        # already in a reload
        parts = ops.split(SEP)
        for op, route in zip(parts[::2], parts[1::2]):
            self._cache_apply(node, op, route)
        self.versions[node] = version

    def _schedule_resync(self) -> None:
        if not self._stopped and self.resync_interval > 0:
            self._resync_call = self.clock.callLater(self.resync_interval, self._resync)

    @defer.inlineCallbacks
    def _resync(self):
        """Backstop: reload every node whose version in Redis differs from ours."""
        self._resync_call = None
        try:
            members = yield self.backend.execute("SMEMBERS", self.keys.nodes())
            names = sorted(_text(m) for m in members if _text(m) != self.node_id)
            versions = yield self.backend.pipeline(
                [("GET", self.keys.route_version(n)) for n in names])
            for name, version in zip(names, versions):
                if int(version or 0) != self.versions.get(name):
                    yield self.reload(name)
            for name in list(self.routes):
                if name != self.node_id and name not in names:
                    self.forget(name)    # reaped: its set is gone
        except Exception as error:
            self.log_limiter.emit(log.warn, "resync", "Route resync failed: {error}",
                                  error=str(error))
        finally:
            self._schedule_resync()


def _sleep(clock, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
