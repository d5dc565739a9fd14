"""Retained messages cluster-wide, in Redis, with a per-level child index.

Every node sees the same retained messages [MQTT-3.3.1-5]: a retained
PUBLISH on node A is replayed to a SUBSCRIBE on node B.  A wildcard SUBSCRIBE
costs O(index nodes on the matching paths), not O(all retained topics).

Key layout (``P`` = the cluster's key prefix, ``mqttd:`` by default)::

    P ret:m:<topic>              STRING  the packed message (see pack_message)
    P ret:c:<depth>:<prefix>     HASH    child level name -> 2 x the number of
                                         retained topics in that child's subtree
                                         (the child included), + 1 when the child
                                         is itself a retained topic
    P ret:exp                    ZSET    topic -> expiry time (unix s), only for
                                         messages with a Message Expiry Interval

``<prefix>`` is the first ``<depth>`` levels of a topic joined by ``/``; the
depth in the key tells the root (``c:0:``) apart from a topic whose first level
is empty (``/a`` lives under ``c:1:``).  Every Lua script touches one key, so
all of it works unchanged on Redis Cluster (no hashtag needed; cross-slot
work is a pipeline of independent single-key commands).

**Write.**  ``ret_set`` (``SET ... GET``) answers created (1) or replaced (0);
an empty payload runs ``ret_del`` (1 deleted, 0 there was none)
[MQTT-3.3.1-10, 3.3.1-11].  Only a *transition* (created / deleted) touches
the index: one ``ret_idx`` per level, ``HINCRBY`` +2/-2 (the topic's own
last level +3/-3) and ``HDEL`` at 0, atomic per hash.  On one Redis server
(standalone, Sentinel) value and index are one script (``ret_put_all`` /
``ret_del_all``): a write whose reply is lost (a timeout) either happened
whole or not at all, and the client's re-send finds a consistent state.
Under Redis Cluster the value and the index levels live on different
masters: there they stay separate steps (see *Crash window*).  A topic exists once, so
an odd count says "this child is a retained topic": a walk fetches only
those values.  Replacing a retained message -- the common case, a device
updating its state -- costs one command.  The counts are commutative, so two
nodes creating and deleting one topic concurrently converge to the right
index whatever order the increments arrive in.  One node's writes of one topic
are applied in order (each waits for the previous); across nodes the last
write to reach Redis wins, as for any broker.

**Lookup.**  An exact filter is one ``GET``.  A wildcard filter is walked
breadth first, one pipelined round trip per wildcard level: literal levels
cost nothing (a missing prefix's ``HGETALL`` is empty), ``+`` reads the
children of every candidate prefix, ``#`` reads a whole subtree level by
level, fetching each level's values in the same round trip.  A leading
wildcard never matches a ``$`` topic [MQTT-4.7.2-1]; ``a/#`` matches ``a``
[MQTT-4.7.1-2].  A lookup first waits for this node's own writes issued
before it (a client sees its own retained PUBLISH in its next SUBSCRIBE).

**Expiry.**  Checked on every read [MQTT-3.3.2-5]: an expired message is not
returned and is deleted with a compare-and-delete (only if it is still that
very message), whose winner alone decrements the index.  Expiring messages
are also listed in ``ret:exp``; :meth:`RedisRetained.sweep` (every node runs
it periodically) removes those nobody reads.

**Crash window (Redis Cluster only).**  A node dying between the value
write and its index update, or an index step that fails or times out after
the value was written, leaves a message that exact lookups find and
wildcard lookups do not (or an index entry that leads nowhere, which costs
only a wasted lookup); nothing re-sends an index step by itself, so no count
is applied twice.  :meth:`RedisRetained.reindex` rebuilds the index from the
values (``SCAN``).
"""
from __future__ import annotations

import math
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from mqttd import topics
from mqttd.codec import PacketReader, Publish, encode
from mqttd.messages import Message
from mqttd.retained import RetainedIndex

__all__ = ["RedisRetained", "ClusterRetainedStore", "pack_message", "unpack_message",
           "node_local"]

log = Logger(namespace="mqttd.cluster.retained")

#: commands per pipeline (big walks are split and sent concurrently)
PIPELINE_CHUNK = 2000
#: expired topics removed per sweep at most
SWEEP_BATCH = 500

_FORMAT = b"R1"
_HEADER = struct.Struct(">2sd")

RET_SET = """
local old = redis.call('SET', KEYS[1], ARGV[1], 'GET')
if old then return 0 end
return 1
"""

RET_DEL = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

RET_IDX = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n == 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""

# value and index in one step (one Redis server: standalone or Sentinel)
# KEYS value, level hashes...  ARGV data, field, weight, field, weight...
RET_PUT_ALL = """
local old = redis.call('SET', KEYS[1], ARGV[1], 'GET')
if old then return 0 end
for i = 2, #KEYS do
  local n = redis.call('HINCRBY', KEYS[i], ARGV[2 * i - 2], ARGV[2 * i - 1])
  if n == 0 then redis.call('HDEL', KEYS[i], ARGV[2 * i - 2]) end
end
return 1
"""

# KEYS value, level hashes...  ARGV expected ('' = any), field, weight, ...
RET_DEL_ALL = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
for i = 2, #KEYS do
  local n = redis.call('HINCRBY', KEYS[i], ARGV[2 * i - 2], -tonumber(ARGV[2 * i - 1]))
  if n == 0 then redis.call('HDEL', KEYS[i], ARGV[2 * i - 2]) end
end
return 1
"""


def pack_message(message: Message) -> bytes:
    """The stored form of a retained message: ``R1``, the absolute expiry time
    (a double, NaN for none) and the message as an MQTT 5 PUBLISH (topic,
    QoS, payload and the forwarded properties, through the codec)."""
    expires = message.expires_at
    header = _HEADER.pack(_FORMAT, math.nan if expires is None else float(expires))
    packet = Publish(message.topic, message.payload, message.qos, True,
                     packet_id=1 if message.qos else None, properties=message.properties)
    return header + encode(packet, 5)


def unpack_message(data: bytes) -> Message:
    """Inverse of :func:`pack_message`.

    :raises ValueError: not a stored retained message of a known format.
    """
    if len(data) < _HEADER.size or data[:2] != _FORMAT:
        raise ValueError("not a retained message of format R1")
    _tag, expires = _HEADER.unpack_from(data)
    packets = PacketReader(5).feed(data[_HEADER.size:])
    if len(packets) != 1 or not isinstance(packets[0], Publish):
        raise ValueError("retained message does not hold one PUBLISH")
    p = packets[0]
    return Message(p.topic, p.payload, p.qos, True, p.properties,
                   expires_at=None if math.isnan(expires) else expires)


def node_local(topic: str) -> bool:
    """``$SYS`` values are per node (each node publishes its own statistics);
    a bridge's state topic is cluster-wide like any client's message."""
    return topic.startswith("$SYS") and not topics.is_bridge_state_topic(topic)


def _expired(message: Message, now: Optional[float]) -> bool:
    return now is not None and message.expires_at is not None and message.expires_at <= now


class RedisRetained:
    """The retained messages in Redis (see the module docstring).

    :param backend: a :class:`mqttd.cluster.backend.Backend` (``execute``,
        ``pipeline``, ``register``/``run``).
    :param prefix: the cluster's key prefix.

    Every method returns a Deferred; Redis errors arrive as the backend's
    :class:`~mqttd.cluster.backend.BackendError`.
    """

    def __init__(self, backend, prefix: str = "mqttd:"):
        self.backend = backend
        self.prefix = prefix
        backend.register("ret_set", RET_SET)
        backend.register("ret_del", RET_DEL)
        backend.register("ret_idx", RET_IDX)
        backend.register("ret_put_all", RET_PUT_ALL)
        backend.register("ret_del_all", RET_DEL_ALL)
        #: value and index written by one script (every key on one server);
        #: under Redis Cluster they live on different masters: two steps
        self.atomic = not getattr(backend, "is_cluster", False)
        #: this node's writes not yet done, by topic (each waits for the previous)
        self._tails: Dict[str, defer.Deferred] = {}
        #: counters for $SYS / metrics / tests
        self.lookups = 0
        self.commands = 0
        self.expired = 0

    # --- keys ---------------------------------------------------------------------

    def value_key(self, topic: str) -> str:
        return f"{self.prefix}ret:m:{topic}"

    def index_key(self, levels: Sequence[str], depth: int) -> str:
        return f"{self.prefix}ret:c:{depth}:{'/'.join(levels[:depth])}"

    def expiry_key(self) -> str:
        return f"{self.prefix}ret:exp"

    def index_entries(self, topic: str) -> List[Tuple[str, str, int]]:
        """``(hash key, field, weight)`` of every level of ``topic``: a created
        topic adds the weight, a deleted one subtracts it (2 per level the
        topic passes through, 3 for its own last level)."""
        levels = topic.split("/")
        last = len(levels) - 1
        return [(self.index_key(levels, depth), levels[depth], 3 if depth == last else 2)
                for depth in range(len(levels))]

    # --- writes -----------------------------------------------------------------------

    def pending(self) -> Optional[defer.Deferred]:
        """Fires once every write issued so far is done (None: none pending);
        never fails (the writes' own Deferreds report their errors)."""
        if not self._tails:
            return None
        return defer.DeferredList(list(self._tails.values()), consumeErrors=True)

    def _serialized(self, topic: str, write) -> defer.Deferred:
        """Run ``write()`` after this node's previous write of ``topic``."""
        previous = self._tails.get(topic)
        if previous is None:
            done = write()
        else:
            done = defer.Deferred()
            previous.addBoth(lambda _: write().chainDeferred(done))
        tail = defer.Deferred()
        self._tails[topic] = tail

        def finished(result):
            if self._tails.get(topic) is tail:
                del self._tails[topic]
            tail.callback(None)
            return result
        done.addBoth(finished)
        return done

    def put(self, message: Message) -> defer.Deferred:
        """Make ``message`` the retained message of its topic (an empty payload
        deletes it).  Fires with True when the topic is new (or, deleting,
        when there was one), False otherwise, once value and index are written."""
        if not message.payload:
            return self.delete(message.topic)
        data = pack_message(message)
        topic = message.topic

        def write():
            if self.atomic:
                entries = self.index_entries(topic)
                d = self.backend.run(
                    "ret_put_all", [self.value_key(topic)] + [k for k, _f, _w in entries],
                    [data] + [a for _k, f, w in entries for a in (f, w)])
            else:
                d = self.backend.run("ret_set", [self.value_key(topic)], [data])
            self.commands += 1

            @d.addCallback
            def indexed(created):
                steps = []
                if int(created) and not self.atomic:
                    steps.append(self._index(topic, +1))
                if message.expires_at is not None:
                    steps.append(self.backend.execute("ZADD", self.expiry_key(),
                                                      repr(message.expires_at), topic))
                    self.commands += 1
                if not steps:
                    return False
                return _gather(steps).addCallback(lambda _: bool(int(created)))
            return d
        return self._serialized(topic, write)

    def delete(self, topic: str, expected: Optional[bytes] = None) -> defer.Deferred:
        """Delete the retained message of ``topic`` (only if its stored form is
        ``expected``, when given).  Fires with True if this call deleted it."""
        def write():
            if self.atomic:
                entries = self.index_entries(topic)
                d = self.backend.run(
                    "ret_del_all", [self.value_key(topic)] + [k for k, _f, _w in entries],
                    [expected or b""] + [a for _k, f, w in entries for a in (f, w)])
            else:
                d = self.backend.run("ret_del", [self.value_key(topic)], [expected or b""])
            self.commands += 1

            @d.addCallback
            def unindexed(deleted):
                if not int(deleted):
                    return False
                if self.atomic:
                    return True
                return self._index(topic, -1).addCallback(lambda _: True)
            return d
        return self._serialized(topic, write)

    def _index(self, topic: str, delta: int) -> defer.Deferred:
        steps = [self.backend.run("ret_idx", [key], [field, delta * weight])
                 for key, field, weight in self.index_entries(topic)]
        self.commands += len(steps)
        return _gather(steps)

    # --- reads ------------------------------------------------------------------------

    def get(self, topic: str, now: Optional[float] = None) -> defer.Deferred:
        """The retained message of ``topic`` (None if none or expired at ``now``)."""
        return self.match(topic, now).addCallback(lambda found: found[0] if found else None)

    def match(self, topic_filter: str, now: Optional[float] = None) -> defer.Deferred:
        """The retained messages matching the plain ``topic_filter`` (a list,
        in no particular order), skipping those expired at ``now``."""
        self.lookups += 1
        pending = self.pending()
        if pending is None:
            return self._match(topic_filter, now)
        return pending.addCallback(lambda _: self._match(topic_filter, now))

    @defer.inlineCallbacks
    def _match(self, topic_filter: str, now: Optional[float]):
        levels = topic_filter.split("/")
        found: List[Tuple[str, ...]] = []        # topics (as level tuples) to GET
        values: List[Optional[bytes]] = []       # ... fetched during a # walk
        candidates: List[Tuple[str, ...]] = [()]
        depth = 0
        walked = False
        while depth < len(levels) and candidates:
            level = levels[depth]
            if level == "+":
                children = yield self._read([("HGETALL", self.index_key(c, depth))
                                             for c in candidates])
                # a child is kept if it can match: itself a topic for a last
                # level, anything for "+/#" (# matches the parent), else
                # topics below it
                following = levels[depth + 1] if depth + 1 < len(levels) else None
                candidates = [c + (name,) for c, fields in zip(candidates, children)
                              for name, leaf, below in _present(fields, root=depth == 0)
                              if (leaf if following is None else
                                  (following == "#" or below))]
            elif level == "#":
                # the parent level too ("a/#" matches "a") [MQTT-4.7.1-2]
                frontier = candidates if depth > 0 else []
                if frontier:
                    replies = yield self._read([("GET", self.value_key("/".join(c)))
                                                for c in frontier])
                    found.extend(frontier)
                    values.extend(replies)
                frontier, at = candidates, depth
                while frontier:
                    # this level's children, and the values of the previous
                    # level's topics, in one round trip
                    hashes = yield self._read([("HGETALL", self.index_key(c, at))
                                               for c in frontier])
                    children = [(c + (name,), leaf, below)
                                for c, fields in zip(frontier, hashes)
                                for name, leaf, below in _present(fields, root=at == 0)]
                    frontier = [c for c, _leaf, below in children if below]
                    leaves = [c for c, leaf, _below in children if leaf]
                    at += 1
                    if leaves:
                        replies = yield self._read([("GET", self.value_key("/".join(c)))
                                                    for c in leaves])
                        found.extend(leaves)
                        values.extend(replies)
                walked = True
                candidates = []
                break
            else:
                candidates = [c + (level,) for c in candidates]
            depth += 1
        if not walked and candidates:
            found = candidates
            values = yield self._read([("GET", self.value_key("/".join(c)))
                                       for c in candidates])
        out = []
        for levels_of, raw in zip(found, values):
            if raw is None:
                continue  # an inner level, no message of its own
            topic = "/".join(levels_of)
            try:
                message = unpack_message(raw)
            except ValueError as error:
                log.warn("Skipping the unreadable retained message of {topic}: {error}",
                         topic=topic, error=str(error))
                continue
            if _expired(message, now):   # [MQTT-3.3.2-5]
                self._expire(topic, raw)
                continue
            out.append(message)
        return out

    def _read(self, commands: List[tuple]) -> defer.Deferred:
        """Pipelined reads, in chunks sent together; fires with all replies."""
        self.commands += len(commands)
        if len(commands) <= PIPELINE_CHUNK:
            return self.backend.pipeline(commands)
        chunks = [self.backend.pipeline(commands[i:i + PIPELINE_CHUNK])
                  for i in range(0, len(commands), PIPELINE_CHUNK)]
        return _gather(chunks).addCallback(lambda parts: [r for part in parts for r in part])

    def _expire(self, topic: str, raw: bytes) -> None:
        """Delete an expired message if it is still that one (one node wins)."""
        def done(deleted):
            if deleted:
                self.expired += 1
        self.delete(topic, expected=raw).addCallbacks(done, lambda failure: log.warn(
            "Removing the expired retained message of {topic} failed: {error}",
            topic=topic, error=failure.getErrorMessage()))

    # --- maintenance ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def sweep(self, now: float, batch: int = SWEEP_BATCH):
        """Delete up to ``batch`` retained messages expired at ``now`` that no
        lookup removed yet; fires with how many this call deleted."""
        due = yield self.backend.execute("ZRANGEBYSCORE", self.expiry_key(), "-inf",
                                         repr(now), "LIMIT", 0, batch)
        if not due:
            return 0
        names = [t.decode("utf-8") if isinstance(t, bytes) else t for t in due]
        raws = yield self._read([("GET", self.value_key(t)) for t in names])
        removed = 0
        done = []
        for topic, raw in zip(names, raws):
            message = None
            if raw is not None:
                try:
                    message = unpack_message(raw)
                except ValueError:
                    message = None
            if message is not None and not _expired(message, now):
                if message.expires_at is None:
                    done.append(topic)   # replaced by a message that never expires
                continue                 # replaced by one expiring later: ZADD moved it
            if raw is not None:
                deleted = yield self.delete(topic, expected=raw)
                removed += int(bool(deleted))
            done.append(topic)
        if done:
            yield self.backend.execute("ZREM", self.expiry_key(), *done)
        self.expired += removed
        return removed

    @defer.inlineCallbacks
    def count(self, clients_only: bool = False):
        """How many retained messages the cluster holds (from the index root,
        one ``HGETALL``); ``clients_only``: not those under ``$SYS`` (bridge
        states), as ``$SYS/broker/retained messages/count`` counts."""
        fields = yield self.backend.execute("HGETALL", self.index_key((), 0))
        return sum(n // 2 for name, n in _counts(fields)
                   if not (clients_only and name == "$SYS"))

    @defer.inlineCallbacks
    def reindex(self, scan_count: int = 1000):
        """Rebuild the index from the stored values (after a crash between a
        value write and its index update).  Fires with the number of topics.
        Run it while no retained message is being written."""
        keys = yield self._scan(f"{self.prefix}ret:c:*", scan_count)
        for i in range(0, len(keys), PIPELINE_CHUNK):
            yield self._write_all([("DEL", k) for k in keys[i:i + PIPELINE_CHUNK]])
        values = yield self._scan(f"{self.prefix}ret:m:*", scan_count)
        start = len(self.value_key(""))
        counts: Dict[Tuple[str, str], int] = {}
        for key in values:
            topic = (key.decode("utf-8") if isinstance(key, bytes) else key)[start:]
            for hash_key, field, weight in self.index_entries(topic):
                counts[hash_key, field] = counts.get((hash_key, field), 0) + weight
        commands = [("HSET", key, field, n) for (key, field), n in counts.items()]
        for i in range(0, len(commands), PIPELINE_CHUNK):
            yield self._write_all(commands[i:i + PIPELINE_CHUNK])
        return len(values)

    def _write_all(self, commands):
        self.commands += len(commands)
        return self.backend.pipeline(commands)

    @defer.inlineCallbacks
    def _scan(self, pattern: str, count: int):
        """Every key matching ``pattern`` (every master of a Redis Cluster)."""
        client = self.backend.client
        from mqttd.cluster.backend import as_deferred

        async def scan():
            return [key async for key in client.scan_iter(match=pattern, count=count)]
        keys = yield as_deferred(scan())
        return keys


def _counts(fields) -> Iterable[Tuple[str, int]]:
    """(name, count) pairs of an HGETALL reply (a dict or a flat list)."""
    if isinstance(fields, dict):
        items = fields.items()
    else:
        items = zip(fields[::2], fields[1::2])
    for name, count in items:
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        yield name, int(count)


def _present(fields, root: bool) -> List[Tuple[str, bool, bool]]:
    """(name, is a retained topic, has retained topics below) of the children
    with retained topics; at the root level not the ``$`` ones (a leading
    wildcard never matches them) [MQTT-4.7.2-1]."""
    out = []
    for name, count in _counts(fields):
        if count <= 0 or (root and name.startswith("$")):
            continue
        leaf = bool(count & 1)
        out.append((name, leaf, count > 3 if leaf else True))
    return out


def _gather(ds: List[defer.Deferred]) -> defer.Deferred:
    d = defer.gatherResults(ds, consumeErrors=True)
    d.addErrback(lambda failure: failure.value.subFailure)
    return d


class ClusterRetainedStore:
    """The broker's :class:`~mqttd.interfaces.IRetainedStore` in a cluster.

    Retained messages live in Redis (:class:`RedisRetained`); ``set``,
    ``remove``, ``cursor`` and ``match`` answer with Deferreds (the broker
    waits: see ``Broker.send_retained`` and ``Broker.track_write``).  The
    node's own ``$SYS`` values stay in memory here (each node has its own
    statistics) and are merged into the lookups of filters that start with
    ``$SYS``.  ``get``, ``len``, iteration and ``in`` answer for those local
    values only; the cluster-wide views are :meth:`client_count` (the count
    of the last :meth:`refresh_count`), :meth:`fetch` and :meth:`listing`
    (Deferreds), which the admin API, ``why``, the metrics and ``$SYS`` use.

    :param redis: a :class:`RedisRetained`.
    :param clock: ``IReactorTime`` (``seconds()``: wall-clock time, the same
        on every node within the clocks' skew).
    """

    def __init__(self, redis: RedisRetained, clock):
        self.redis = redis
        self.clock = clock
        self.local = RetainedIndex()
        self._sweeper = None
        #: retained messages of clients cluster-wide, as of the last refresh
        self.cluster_count: Optional[int] = None

    # --- cluster-wide views (admin API, why, metrics, $SYS) -----------------------------

    def refresh_count(self) -> defer.Deferred:
        """Read the cluster-wide count of clients' retained messages from the
        index root (one command); fires with it and keeps it for
        :meth:`client_count`."""
        def keep(count):
            self.cluster_count = count
            return count
        return self.redis.count(clients_only=True).addCallback(keep)

    def client_count(self) -> int:
        """Clients' retained messages of the whole cluster as of the last
        :meth:`refresh_count` (every ``--sys-interval``); before the first,
        0."""
        return self.cluster_count or 0

    def fetch(self, topic: str) -> defer.Deferred:
        """The retained message of ``topic`` wherever it is (this node's
        ``$SYS`` values, else Redis); fires with None if there is none."""
        if node_local(topic):
            return defer.succeed(self.local.get(topic))
        return self.redis.get(topic, self.clock.seconds())

    def listing(self, prefix: str = "") -> defer.Deferred:
        """Every retained message whose topic starts with ``prefix`` (a
        string prefix, not a filter): walks the index below the prefix's
        complete levels, so the cost follows that subtree -- an empty prefix
        reads them all (an admin's listing, not a client path)."""
        levels = prefix.split("/")
        base = "/".join(levels[:-1])
        filters = [base + "/#"] if len(levels) > 1 else ["#", "$SYS/#"]
        now = self.clock.seconds()
        lookups = []
        for topic_filter in filters:
            found = self.cursor(topic_filter, now)
            lookups.append(found if isinstance(found, defer.Deferred)
                           else defer.succeed(list(found)))
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure)

        def merge(results):
            return [m for found in results for m in found
                    if m is not None and m.topic.startswith(prefix)]
        return d.addCallback(merge)

    # --- IRetainedStore -----------------------------------------------------------------

    def set(self, message: Message) -> Optional[defer.Deferred]:
        if node_local(message.topic):
            self.local.set(message)
            return None
        return self.redis.put(message)

    def remove(self, topic: str):
        if node_local(topic):
            return self.local.remove(topic)
        return self.redis.delete(topic).addCallback(lambda deleted: None)

    def cursor(self, topic_filter: str, now: Optional[float] = None):
        if topic_filter.startswith("$SYS"):
            local = self.local.match(topic_filter, now)
            if not _may_match_shared_sys(topic_filter):
                return iter(local)
            return self.redis.match(topic_filter, now).addCallback(lambda found: local + found)
        return self.redis.match(topic_filter, now)

    def match(self, topic_filter: str, now: Optional[float] = None):
        found = self.cursor(topic_filter, now)
        if isinstance(found, defer.Deferred):
            return found
        return list(found)

    def get(self, topic: str) -> Optional[Message]:
        return self.local.get(topic)

    def next_expiry(self) -> Optional[float]:
        return self.local.next_expiry()

    def expire(self, now: float) -> List[str]:
        return self.local.expire(now)

    def values(self):
        return self.local.values()

    def items(self):
        return self.local.items()

    def __len__(self) -> int:
        return len(self.local)

    def __iter__(self):
        return iter(self.local)

    def __contains__(self, topic) -> bool:
        return topic in self.local

    # --- expiry sweep -------------------------------------------------------------------

    def start(self, interval: float = 30.0) -> None:
        """Sweep expired retained messages every ``interval`` seconds."""
        from twisted.internet.task import LoopingCall
        if self._sweeper is not None:
            return
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(interval, now=False)

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None

    def _sweep(self):
        d = self.redis.sweep(self.clock.seconds())
        d.addErrback(lambda failure: log.warn(
            "Sweeping expired retained messages failed: {error}",
            error=failure.getErrorMessage()))
        return d


def _may_match_shared_sys(topic_filter: str) -> bool:
    """Could ``topic_filter`` (starting with ``$SYS``) match a cluster-wide
    bridge state topic ``$SYS/broker/connection/<id>/state``?"""
    levels = topic_filter.split("/")
    want = ["$SYS", "broker", "connection", None, "state"]
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(want):
            return False
        if level != "+" and want[i] is not None and level != want[i]:
            return False
    return len(levels) == len(want)


#: seconds between two sweeps of expired retained messages on each node
SWEEP_INTERVAL = 30.0


def install(service, options) -> Optional[ClusterRetainedStore]:
    """The ``twistd mqttd`` feature hook (``mqttd.tap.FEATURES``, after the
    cluster's): with ``--cluster``, the broker keeps its retained messages in
    Redis, shared by every node.  Returns the store (None without a cluster)."""
    cluster = getattr(service, "cluster", None)
    if cluster is None:
        return None
    broker = service.broker
    redis = RedisRetained(cluster.backend, prefix=cluster.keys.prefix)
    store = ClusterRetainedStore(redis, broker.clock)
    broker.use_retained_store(store)
    store.start(SWEEP_INTERVAL)
    cluster.stoppers.append(store.stop)
    cluster.retained = store
    return store
