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
node that receives an envelope it has no subscriber for drops it (so nothing
is delivered after an UNSUBACK without waiting for the others).

**Once a client has its SUBACK, a message published afterwards on any live
node reaches it** (REVIEW-CLUSTER F1).  Each node acknowledges how far its
cache applied the feed (``mqttd:{n:<id>}:rfpos``, the last entry id, written
after the entries -- and any reload they caused -- are applied, and after
this node's retained writes issued before are in Redis); a route change that
adds routes counts as written (:meth:`sync`: the broker's barrier, so the
SUBACK, waits for it) only once it is in Redis, its feed entry too, *and*
every live member node acknowledged a position at or past that entry.  The
members are read after the entry was added: a node that joins later loads
the routes after it.  A dead node (alive key gone) is not waited for.  The
wait is bounded (``ack_timeout``): after it the SUBACK goes out anyway,
with one WARN naming the nodes that did not answer (counted as
``ack_timeouts``) -- a node that stalled that long may route a message
published on it right after it resumes with its old cache; if Redis could
not even be asked, the waiters fail (no SUBACK, as for a failed write).

That limit is closed on the publishing side: a node knows how fresh its
cache is (:meth:`fresh`: every feed read tells up to when the cache is
complete -- a read that found nothing, up to the end of its ``BLOCK`` time;
one that found entries, up to when it was sent), and a cache older than
``stale_after`` (``ack_timeout`` - 0.5 s) is not trusted: the bus router holds
what it would forward until the cache caught up (``fresh_listeners``).  A
route a SUBACK elsewhere gave up waiting for was added at least
``ack_timeout`` before any message published after that SUBACK, so a node
whose cache lacks it is stale by more than ``stale_after`` when it routes
one -- whatever order its event loop runs things in after a stall.

Local changes come from the broker's ``route_observer`` seam (every
subscription added to or removed from its index), are batched per reactor
turn and written by one Lua script per batch (one slot: the node's hashtag),
at most one batch in flight, so the versions follow the order of changes.
"""
from __future__ import annotations

import collections
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

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
#: feed entries read at once at most
FEED_READ = 1000
#: seconds a route change waits at most for every live node's acknowledgement
ACK_TIMEOUT = 3.0
#: delays between two looks at the other nodes' acknowledgements (seconds)
POLL_DELAYS = (0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05)


def route_name(topic_filter: str, key) -> str:
    """The route of one index entry: the filter (``$share/g/f`` for a group member)."""
    return topic_filter


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def stream_id(value) -> Tuple[int, int]:
    """A stream entry id (``b"1700000000000-3"``) as ``(ms, seq)``, comparable;
    ``(0, 0)`` for none or a value that is not one."""
    if not value:
        return (0, 0)
    try:
        ms, _sep, seq = _text(value).partition("-")
        return (int(ms), int(seq or 0))
    except ValueError:
        return (0, 0)


class RouteTable:
    """This node's routes in Redis and the cache of every node's routes.

    :param backend: the :class:`~mqttd.cluster.backend.Backend`.
    :param clock: ``IReactorTime``.
    :param node_id: this node.
    :param resync: seconds between full version checks of every node's routes.
    :param ack_timeout: seconds a change that adds routes waits at most for
        every live node's acknowledgement before it counts as written anyway
        (see the module docstring).
    """

    def __init__(self, backend, clock, node_id: str, keys: Keys = Keys(),
                 resync: float = 30.0, block_ms: int = 500,
                 ack_timeout: float = ACK_TIMEOUT):
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
        #: routes without wildcards: topic -> {(node, share)} (one dict lookup);
        #: the rest in a trie whose match cache only wildcard changes clear
        self._exact: Dict[str, Dict[Tuple[str, Optional[str]], None]] = {}
        self._trie = SubscriptionTrie(cache_size=10000)
        self._pending: List[Tuple[str, str]] = []
        self._flushing: Optional[defer.Deferred] = None
        self._flush_call = None
        self._sync_waiters: List[Tuple[int, defer.Deferred]] = []
        self._queued = 0      # changes queued so far (sequence numbers)
        self._written = 0     # changes known to be in Redis
        self._confirmed = 0   # ... and applied by every live node (or given up on)
        self.ack_timeout = ack_timeout
        #: written changes waiting for the others: [entry id or None, upto, deadline]
        self._confirming: Deque[list] = collections.deque()
        self._poll_call = None
        self._polling = False
        self._poll_step = 0
        self._poll_error: Optional[str] = None   # the last look failed: why
        self._laggards: List[str] = []
        #: ``before_ack() -> Deferred | None``: what must be in Redis before this
        #: node acknowledges a feed position (its retained writes issued before)
        self.before_ack: Optional[Callable[[], Optional[defer.Deferred]]] = None
        self._ack_pos: Optional[Tuple[int, int]] = None
        self._ack_wanted = None
        self._acking = False
        #: the cache holds every node's routes (the first load finished)
        self.loaded = False
        #: the cache is complete up to this clock time (None: not loaded)
        self.fresh_as_of: Optional[float] = None
        #: seconds after which the cache is not trusted for routing; a healthy
        #: reader refreshes it every ``block_ms`` plus a round trip
        self.stale_after = max(ack_timeout - 0.5, block_ms / 1000.0 + 0.2)
        #: callables run after each feed read (the router releases what it held)
        self.fresh_listeners: List[Callable[[], None]] = []
        self._loaded_waiters: List[defer.Deferred] = []
        self._online = False  # joined: changes go to Redis
        self._reset_needed = True
        self._feed_id = b"0-0"
        self._reading = False
        self._stopped = True
        self._loading: Dict[str, defer.Deferred] = {}
        self._resync_call = None
        self.log_limiter = LogRateLimiter(clock, interval=10.0, burst=1, reason_burst=None)
        self.stats = {"route_writes": 0, "route_write_failures": 0, "feed_entries": 0,
                      "reloads": 0, "ack_waits": 0, "ack_timeouts": 0, "acks": 0}
        backend.register("routes-change", CHANGE)
        backend.register("routes-reset", RESET)

    # --- local changes (the broker's route_observer) -----------------------------------

    def observe(self, topic_filter: str, key, added: bool) -> bool:
        """The broker added (``added``) or removed ``key``'s subscription to
        ``topic_filter`` in its index.  True if the acknowledgement of the
        change must wait for :meth:`sync`: a write to Redis was queued (the
        route set changed while joined), or the route exists but an earlier
        change is not yet applied everywhere (a second subscriber of a route
        whose first SUBACK still waits)."""
        route = route_name(topic_filter, key)
        keys = self.local.get(route)
        if added:
            if keys is None:
                self.local[route] = {key}
                return self._local_changed("+", route)
            keys.add(key)
            return self._online and self._confirmed != self._queued
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
        and, for changes adding routes, applied by every live node or given
        up on after ``ack_timeout`` (None: nothing pending); fails if writing
        them failed, or if Redis could not be asked about the others."""
        if self._queued == self._confirmed or not self._online:
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
        adds = False
        for op, route in batch:
            args += [op, route]
            adds = adds or op == "+"
        d = self.backend.run("routes-change", [self.keys.routes(self.node_id),
                                               self.keys.route_version(self.node_id)], args)
        # the others learn of it from the feed: written means both are in Redis
        d.addCallback(lambda version: self._feed_append(int(version), SEP.join(args)))

        def written(entry_id):
            self._written = max(self._written, upto)
            self.stats["route_writes"] += 1
            # a removal needs no one's acknowledgement: a node that still
            # sends there finds no subscriber (nothing after the UNSUBACK)
            self._confirm_later(upto, entry_id if adds else None)

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
            entry_id = yield self._feed_append(int(version), RESET_OP)
        except Exception:
            self.stats["route_write_failures"] += 1
            self._failed_write(Failure(), upto)
            return
        self._reset_needed = False
        self._written = max(self._written, upto)
        self.stats["route_writes"] += 1
        # the others' acknowledgement matters to waiting SUBACKs only (a
        # join has none; a rewrite after a failed write has)
        self._confirm_later(upto, entry_id if self._sync_waiters else None)
        log.info("Routes of {node_id} written: {count} filters (version {version})",
                 node_id=self.node_id, count=len(routes), version=version)

    def _feed_append(self, version: int, ops: str) -> defer.Deferred:
        """Append a change to the feed; fires with the entry id.  A failed
        append fails the write (its waiters): the next write is a whole set."""
        return self.backend.execute("XADD", self.keys.route_feed(), "MAXLEN", "~",
                                    FEED_MAXLEN, "*", "n", self.node_id, "v", version,
                                    "o", ops)

    # --- the others' acknowledgements (F1) ------------------------------------------------

    def _confirm_later(self, upto: int, entry_id) -> None:
        """Changes up to ``upto`` are in Redis; with ``entry_id`` (their feed
        entry) they count once every live node applied it, else at once (in
        order after the earlier ones)."""
        eid = None if entry_id is None else stream_id(entry_id)
        self._confirming.append([eid, upto, self.clock.seconds() + self.ack_timeout])
        if eid is not None:
            self.stats["ack_waits"] += 1
            self._poll_step = 0
            if self._poll_call is not None and self._poll_call.active():
                self._poll_call.reset(POLL_DELAYS[0])
        self._advance(None)

    def _confirm(self, upto: int, failure=None) -> None:
        self._confirmed = max(self._confirmed, upto)
        self._fire_waiters(upto, failure)

    def _advance(self, behind) -> None:
        """Confirm, in order, the written changes that need no one or that
        every live node acknowledged (``behind(eid)``: the live nodes whose
        acknowledged position is before ``eid``; None: not looked yet); give
        up on those past their deadline; look again while some wait."""
        confirming = self._confirming
        while confirming:
            eid, upto, deadline = confirming[0]
            if eid is not None:
                lagging = None if behind is None else behind(eid)
                if lagging is None or lagging:
                    if lagging:
                        self._laggards = lagging
                    if deadline > self.clock.seconds():
                        break
                    confirming.popleft()
                    self._give_up(upto)
                    continue
            confirming.popleft()
            self._confirm(upto)
        if confirming:
            self._schedule_poll()
        else:
            self._poll_step = 0

    def _give_up(self, upto: int) -> None:
        if self._poll_error is not None:
            # Redis could not be asked: vouch for nothing (no SUBACK, as for a
            # failed write; the client subscribes again)
            self._confirm(upto, Failure(BackendError(
                f"cannot learn whether the other nodes have the new routes: "
                f"{self._poll_error}")))
            return
        self.stats["ack_timeouts"] += 1
        self.log_limiter.emit(
            log.warn, "route-ack",
            "Nodes {nodes} did not apply new routes of {node_id} within {timeout:g} s; "
            "acknowledging the subscriptions anyway: a message published on those nodes "
            "before they catch up may miss them", nodes=", ".join(self._laggards) or "?",
            node_id=self.node_id, timeout=self.ack_timeout)
        self._confirm(upto)

    def _schedule_poll(self) -> None:
        if self._poll_call is not None or self._polling or not self._online:
            return
        delay = POLL_DELAYS[min(self._poll_step, len(POLL_DELAYS) - 1)]
        self._poll_step += 1
        self._poll_call = self.clock.callLater(delay, self._poll)

    @defer.inlineCallbacks
    def _poll(self):
        """Read the member nodes (now: a node that joins later loads the
        routes after the change), which are alive, and their acknowledged
        feed positions; confirm what every live one applied."""
        self._poll_call = None
        self._polling = True
        behind = None
        try:
            members = yield self.backend.execute("SMEMBERS", self.keys.nodes())
            names = sorted(n for n in (_text(m) for m in members) if n != self.node_id)
            replies = []
            if names:
                commands = []
                for name in names:
                    commands.append(("GET", self.keys.alive(name)))
                    commands.append(("GET", self.keys.route_applied(name)))
                # per master (Redis Cluster): a node whose keys are on a master
                # that hangs or is down is not known to have applied the change
                # -- waited for like a laggard, then given up on with a WARN
                # (it fences itself meanwhile: its heartbeat is there too) --
                # instead of failing every SUBACK while that master hangs
                # (REVIEW-S9-CLUSTER C3)
                replies = yield self.backend.pipeline_each(commands)
            positions = {}
            unknown = (0, 0)
            for i, name in enumerate(names):
                alive, applied = replies[2 * i], replies[2 * i + 1]
                if isinstance(alive, BaseException) or isinstance(applied, BaseException):
                    positions[name] = unknown
                elif alive is not None:     # alive: it may publish
                    positions[name] = stream_id(applied)
            self._poll_error = None

            def behind(eid):
                return [name for name, pos in positions.items() if pos < eid]
        except Exception as error:
            self._poll_error = str(error)
            if not isinstance(error, BackendError):
                log.failure("Reading the route acknowledgements failed")
            else:
                self.log_limiter.emit(log.warn, "route-ack-read",
                                      "Cannot read the other nodes' route acknowledgements: "
                                      "{error}", error=str(error))
        finally:
            self._polling = False
        if self._online:
            self._advance(behind)

    def _acknowledge(self, entry_id, force: bool = False) -> None:
        """Tell the others this node's cache applied the feed up to
        ``entry_id`` (never backwards unless ``force``: a reload starts; one
        write in flight at a time, the newest position wins)."""
        pos = stream_id(entry_id)
        if not force and self._ack_pos is not None and pos <= self._ack_pos:
            return
        self._ack_pos = pos
        self._ack_wanted = entry_id
        if not self._acking:
            self._send_ack()

    def _send_ack(self) -> None:
        entry_id, self._ack_wanted = self._ack_wanted, None
        self._acking = True
        hold = self.before_ack() if self.before_ack is not None else None
        key = self.keys.route_applied(self.node_id)
        if hold is None:
            d = self.backend.execute("SET", key, entry_id)
        else:
            # a retained message published here before is in Redis first: a
            # subscriber acknowledged after this finds it in its lookup
            d = hold.addBoth(lambda _: self.backend.execute("SET", key, entry_id))

        def done(result):
            self._acking = False
            if isinstance(result, Failure):
                self.log_limiter.emit(log.warn, "route-ack-write",
                                      "Cannot acknowledge the route feed position of "
                                      "{node_id}: {error}", node_id=self.node_id,
                                      error=str(result.value))
                if self._ack_wanted is None and not self._stopped:
                    self._ack_wanted = entry_id       # again with the next one, or soon
                    self.clock.callLater(0.5, self._retry_ack)
                    return None
            else:
                self.stats["acks"] += 1
            if self._ack_wanted is not None and not self._stopped:
                self._send_ack()
            return None
        d.addBoth(done)

    def _retry_ack(self) -> None:
        if not self._acking and self._ack_wanted is not None and not self._stopped:
            self._send_ack()

    def fresh(self) -> bool:
        """Whether the cache may be trusted for routing now: complete up to at
        most ``stale_after`` seconds ago (see the module docstring)."""
        as_of = self.fresh_as_of
        return as_of is not None and self.clock.seconds() - as_of <= self.stale_after

    def _fresh(self, as_of: float) -> None:
        if self.fresh_as_of is None or as_of > self.fresh_as_of:
            self.fresh_as_of = as_of
        for listener in list(self.fresh_listeners):
            try:
                listener()
            except Exception:
                log.failure("A route cache listener failed")

    def when_loaded(self) -> defer.Deferred:
        """Fires once the cache holds every node's routes (the first load)."""
        if self.loaded:
            return defer.succeed(None)
        d = defer.Deferred()
        self._loaded_waiters.append(d)
        return d

    def _set_loaded(self) -> None:
        if not self.loaded:
            self.loaded = True
            waiters, self._loaded_waiters = self._loaded_waiters, []
            for d in waiters:
                d.callback(None)

    # --- life cycle ----------------------------------------------------------------------

    def joined(self) -> defer.Deferred:
        """The node (re-)joined: write the whole local set, (re)load the cache.
        Fires once the cache is loaded (at once after the first time)."""
        self._online = True
        self._reset_needed = True
        self._written = self._queued = self._confirmed = max(self._queued, self._written)
        self._schedule_flush()
        if self._stopped:
            self._stopped = False
            self._read_feed_forever()
            self._schedule_resync()
        return self.when_loaded()

    def fenced(self) -> None:
        """Redis is out of reach: hold changes until the next join."""
        self._online = False
        self._pending = []
        self._confirming.clear()
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._poll_call = None
        # nothing to wait for: the node is closing clients
        self._confirm(self._queued)

    def drop(self) -> defer.Deferred:
        """Delete this node's route set (it leaves the cluster): a ``reset`` with
        nothing in it, so the others forget its routes at once."""
        self._online = False
        d = self.backend.run("routes-reset", [self.keys.routes(self.node_id),
                                              self.keys.route_version(self.node_id)], [])
        d.addCallback(lambda version: self._feed_append(int(version), RESET_OP))
        d.addCallback(lambda _: self.backend.execute(
            "DEL", self.keys.route_applied(self.node_id)))
        d.addErrback(lambda f: log.warn("Cannot delete the routes of {node_id}: {error}",
                                        node_id=self.node_id, error=str(f.value)))
        return d

    def stop(self) -> None:
        self._stopped = True
        self._online = False
        for call in (self._flush_call, self._resync_call, self._poll_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._resync_call = self._poll_call = None

    # --- the cache -------------------------------------------------------------------------

    def lookup(self, topic: str) -> Tuple[Set[str], Dict[str, Set[str]]]:
        """``(nodes, shares)`` for a topic name: the other nodes with a plain route
        matching it, and for each matching shared subscription ``$share/g/f``
        the nodes (this one included) with members."""
        nodes: Set[str] = set()
        shares: Dict[str, Set[str]] = {}
        me = self.node_id
        matched = [entry for _filter, entry, _value in self._trie.match(topic)]
        exact = self._exact.get(topic)
        if exact:
            matched.extend(exact)
        for node, share in matched:
            if share is None:
                if node != me:
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
            wild = "+" in topic_filter or "#" in topic_filter
            if op == "+":
                if not wild:
                    topics.validate_topic_filter(topic_filter)
                self.routes.setdefault(node, set()).add(route)
                if wild:
                    self._trie.add(topic_filter, key, None)
                else:
                    self._exact.setdefault(topic_filter, {})[key] = None
            else:
                found = self.routes.get(node)
                if found is not None:
                    found.discard(route)
                if wild:
                    self._trie.remove(topic_filter, key)
                else:
                    keys = self._exact.get(topic_filter)
                    if keys is not None:
                        keys.pop(key, None)
                        if not keys:
                            del self._exact[topic_filter]
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
        """Reload every member node's routes (at start, after a Redis outage);
        meanwhile this node vouches for no feed position."""
        self._acknowledge(b"0-0", force=True)
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
                        started = self.clock.seconds()
                        yield self.load_all()
                        need_load = False
                        self._set_loaded()
                        self._acknowledge(self._feed_id)
                        self._fresh(started)
                    sent = self.clock.seconds()
                    reply = yield self.backend.execute(
                        "XREAD", "COUNT", FEED_READ, "BLOCK", self.block_ms, "STREAMS",
                        self.keys.route_feed(), self._feed_id)
                    others = False
                    reloads = []
                    count = 0
                    for _stream, entries in (reply or []):
                        count += len(entries)
                        for entry_id, fields in entries:
                            self._feed_id = entry_id
                            applied = self._feed_entry(fields)
                            if applied is not None:
                                others = True
                                if isinstance(applied, defer.Deferred):
                                    reloads.append(applied)
                    if reloads:
                        # acknowledged only once the reloads it caused are done
                        try:
                            yield defer.gatherResults(reloads, consumeErrors=True)
                        except defer.FirstError as error:
                            error.subFailure.raiseException()
                    if others:
                        self._acknowledge(self._feed_id)
                    if not count:
                        # nothing was added while Redis blocked the read
                        self._fresh(sent + self.block_ms / 1000.0)
                    elif count < FEED_READ:
                        self._fresh(sent)   # all there was when it was sent, at least
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
        finally:
            self._reading = False

    def _feed_entry(self, fields):
        """Apply one feed entry: None if it is not another node's change
        (ours, or unreadable), True once applied, or the Deferred of the
        reload of that node it caused (or that was already running)."""
        self.stats["feed_entries"] += 1
        if isinstance(fields, list):   # RESP2 flat list
            fields = dict(zip(fields[::2], fields[1::2]))
        node = _text(fields.get(b"n", b""))
        if not node or node == self.node_id:
            return None
        try:
            version = int(fields.get(b"v", b"0"))
        except ValueError:
            return None
        ops = _text(fields.get(b"o", b""))
        known = self.versions.get(node)
        if ops == RESET_OP or known is None or version > known + 1:
            return self.reload(node)
        if version <= known:
            return self._loading.get(node) or True     # already in a reload
        parts = ops.split(SEP)
        for op, route in zip(parts[::2], parts[1::2]):
            self._cache_apply(node, op, route)
        self.versions[node] = version
        return True

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
