"""Messages between nodes: envelopes in per-node inbox streams.

A message published on node A goes, after A's local delivery, **once to each
other node** whose routes match its topic (:mod:`mqttd.cluster.routes`): one
``XADD mqttd:{n:<B>}:inbox MAXLEN ~ N * e <envelope>`` per node, QoS 0 and
QoS >= 1 alike (one stream keeps the order per publisher and topic).  Node B
reads its inbox with its consumer group, hands each envelope to its broker's
``dispatch`` (the normal matching: each subscriber once, at the lower of its
QoS and the message's, No Local, overlapping subscriptions merged), and
``XACK``\\ s a batch once B's own store made what it queued durable.

**Durability of the hand-off.**  A QoS 1/2 PUBLISH is acknowledged (PUBACK /
PUBREC) only after Redis acknowledged every ``XADD`` it caused: the router
counts the write in the broker's ``write_count`` and the broker's barrier
waits for :meth:`Router.sync`.  If Redis fails, the acknowledgement is never
sent and the publisher is disconnected; it re-sends (at least once).

**Shared subscriptions** across nodes: the publisher's node picks one node
per matching group (its own when it has members there, else the next node
with members in turn) and names the groups each envelope is for; the
receiving node serves only those of its groups, one member each.  A group
it can no longer serve (its last member here just left) is handed on once
to another node with members (:meth:`Router.reroute_share`; the envelope
names the group marked ``~``: served there, never handed on again), so no
message is dropped while the group has members anywhere (REVIEW-CLUSTER F11).

**A stale route cache is not trusted** (REVIEW-CLUSTER F1): while the
route table says its cache may lack a route a SUBACK elsewhere already
vouched for (:meth:`~mqttd.cluster.routes.RouteTable.fresh`: no feed read
completed for ``stale_after`` seconds -- a stalled event loop, a hung link to
Redis), what this node would forward is held, in order, and routed once the
cache caught up (at most ``max_hold`` seconds; then with the cache it has,
and a WARN).  Its own subscribers get it at once; QoS 1/2 publishers get
their PUBACK once the held envelopes are in Redis.

**Exactly once for QoS 2** (REVIEW-S9-CLUSTER C2).  A QoS 2 PUBLISH of a
persistent session carries an *instance*: ``(client id, packet id, instance
id)``, the instance id made with the session's inbound mark
(:mod:`mqttd.cluster.store`).  Its envelopes go out only once Redis applied
that mark, and each goes through one script per inbox that adds it only if
the inbox's node has not taken that instance yet (a ZSET
``mqttd:{n:<B>}:q2seen`` of the instances it took in the last
``qos2_window`` seconds, in the inbox's slot, written by the same script);
the publishing node records the instance in its own set too, for its local
subscribers.  A hand-off whose reply was lost but which Redis applied (a
hung link: the node fences, its publisher re-sends with DUP on any node)
is thereby recognised: the re-send finds the packet id received
[MQTT-4.3.3-10] and :meth:`Router.resend_qos2` hands it, under the same
instance, to every node with routes for it (this one through its own inbox):
nodes that took it already keep one copy, nodes the first hand-off never
reached get it now.

**Targets.**  Each entry names every node the message went to (``n``):
a node that gave a session away and still forwards what reaches it on the
session's filters skips a message that went to the new owner's node too
(:meth:`Router.also_sent_to`), so a resumed session gets it once.

**Order.**  All envelopes of a node are written by one pipeline at a time,
in publish order, so each inbox receives them in that order.

**Bounds.**  Envelopes waiting for Redis are bounded (``max_pending``): above
the high-water mark publishers are held (the broker's backpressure), beyond
the bound QoS 0 messages are dropped and counted.
"""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd.cluster.backend import BackendError
from mqttd.cluster.keys import Keys
from mqttd.codec.packets import NO_PROPERTIES
from mqttd.codec.properties import decode_properties, encode_properties
from mqttd.durability import both, fire_waiters
from mqttd.messages import SYS_ORIGIN, Message
from mqttd.ratelimit import LogRateLimiter
from mqttd.routing import INBOUND_PACKET_ID

log = Logger(namespace="mqttd.cluster.bus")

GROUP = "mqttd"
VERSION = 1
_PUBLISH = 3
_HEAD = struct.Struct("!BBHH")     # version, flags, topic length, origin length
_HEAD_SIZE = _HEAD.size
_EXPIRY = struct.Struct("!d")
_F_RETAIN, _F_ORIGIN, _F_EXPIRY, _F_PROPS = 0x04, 0x08, 0x10, 0x20
SEP = "\x00"
#: prefix of a group named in an envelope handed on by a node that could not
#: serve it (a share filter always starts with ``$share/``): served by the
#: receiving node's members only, never handed on again
REROUTED = "~"
#: inbox batches delivered and waiting for their XACK while the next is read
MAX_UNACKED = 4
#: messages from the inbox handed to the broker in one reactor turn at most
DELIVER_SLICE = 512


class EnvelopeError(ValueError):
    """An inbox entry that is not an envelope of a known version."""


def encode_envelope(message: Message) -> bytes:
    """The bytes of ``message`` in an inbox entry (shares travel beside them).

    Layout: version (1), flags (qos | retain | origin | expiry | properties),
    topic length (2), origin length (2), topic, origin, [expiry (8, float
    seconds on the publisher's clock)], [properties (MQTT 5 PUBLISH property
    block)], payload (the rest).
    """
    topic = message.topic.encode("utf-8")
    origin = message.origin.encode("utf-8") if isinstance(message.origin, str) else b""
    flags = message.qos
    if message.retain:
        flags |= _F_RETAIN
    if isinstance(message.origin, str):
        flags |= _F_ORIGIN
    parts = [b"", topic, origin]
    if message.expires_at is not None:
        flags |= _F_EXPIRY
        parts.append(_EXPIRY.pack(message.expires_at))
    if message.properties:
        flags |= _F_PROPS
        parts.append(encode_properties(message.properties, _PUBLISH))
    parts[0] = _HEAD.pack(VERSION, flags, len(topic), len(origin))
    parts.append(message.payload)
    return b"".join(parts)


def decode_envelope(data: bytes) -> Message:
    """The :class:`Message` of an inbox entry.

    :raises EnvelopeError: not an envelope of version 1, or truncated.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise EnvelopeError(f"bad envelope: {type(data).__name__}, not bytes")
    return _decode_at(data, 0, len(data))


def _decode_at(data: bytes, offset: int, end: int) -> Message:
    """The envelope in ``data[offset:end]`` (no copy of the envelope itself)."""
    try:
        version, flags, topic_len, origin_len = _HEAD.unpack_from(data, offset)
        if version != VERSION:
            raise EnvelopeError(f"unknown envelope version {version}")
        offset += _HEAD_SIZE
        stop = offset + topic_len
        topic = data[offset:stop].decode("utf-8")
        offset = stop
        origin = None
        if flags & _F_ORIGIN:
            stop = offset + origin_len
            origin = data[offset:stop].decode("utf-8")
            offset = stop
        expires_at = None
        if flags & _F_EXPIRY:
            (expires_at,) = _EXPIRY.unpack_from(data, offset)
            offset += 8
        properties = NO_PROPERTIES
        if flags & _F_PROPS:
            properties, offset = decode_properties(data, offset, _PUBLISH, end)
        if offset > end or not topic:
            raise EnvelopeError("truncated envelope")
    except EnvelopeError:
        raise
    except Exception as error:
        raise EnvelopeError(f"bad envelope: {error}") from None
    return Message(topic, data[offset:end], flags & 0x03, bool(flags & _F_RETAIN),
                   properties, origin, expires_at)


#: an inbox entry carrying several envelopes: field ``b``, version byte then
#: records of (envelope length, share length + 1 or 0 for none, targets length,
#: envelope, share, targets) -- targets: the nodes the message went to, joined
#: by NUL (see :meth:`Router.also_sent_to`)
BATCH_VERSION = 2
_REC = struct.Struct("!III")
#: envelopes in one inbox entry at most, and their bytes at most (a longer
#: run for one node is split over several entries, in order)
ENTRY_MESSAGES = 128
ENTRY_BYTES = 512 * 1024


def encode_batch(items: Sequence[Tuple[bytes, Optional[str], str]]) -> bytes:
    """The ``b`` field of an inbox entry carrying ``items``: ``(envelope,
    shares, targets)`` in order (``shares``: None, or the groups joined by NUL;
    ``targets``: the nodes the message went to, joined by NUL)."""
    parts = [bytes((BATCH_VERSION,))]
    pack = _REC.pack
    for data, share, targets in items:
        raw_targets = targets.encode("utf-8") if targets else b""
        if share is None:
            parts.append(pack(len(data), 0, len(raw_targets)))
            parts.append(data)
        else:
            raw = share.encode("utf-8")
            parts.append(pack(len(data), len(raw) + 1, len(raw_targets)))
            parts.append(data)
            parts.append(raw)
        parts.append(raw_targets)
    return b"".join(parts)


def encode_record(data: bytes, share: Optional[str], targets: str) -> bytes:
    """One record of a batch (:func:`encode_batch` of one item, without the
    version byte): the once-only script joins the records it adds."""
    raw_targets = targets.encode("utf-8") if targets else b""
    if share is None:
        return b"".join((_REC.pack(len(data), 0, len(raw_targets)), data, raw_targets))
    raw = share.encode("utf-8")
    return b"".join((_REC.pack(len(data), len(raw) + 1, len(raw_targets)), data, raw,
                     raw_targets))


#: the inbox's node takes each QoS 2 instance once (see the module docstring).
#: KEYS inbox, seen  ARGV maxlen, window_ms (0: do not trim the seen set this
#: time -- the router trims each node's about once a second), batch version
#: byte, then pairs (instance, record): a record '' only records the instance
#: (the publishing node's own subscribers got it).  -> the number of records added
PUT_ONCE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local parts = {ARGV[3]}
for i = 4, #ARGV, 2 do
  if redis.call('ZADD', KEYS[2], 'NX', now, ARGV[i]) == 1 and ARGV[i + 1] ~= '' then
    parts[#parts + 1] = ARGV[i + 1]
  end
end
if ARGV[2] ~= '0' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if #parts > 1 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'b', table.concat(parts))
end
return #parts - 1
"""


def _only(share) -> Optional[frozenset]:
    if share is None:
        return None
    if isinstance(share, bytes):
        share = share.decode("utf-8")
    return frozenset(share.split(SEP)) if share else frozenset()


def _targets(raw) -> Optional[frozenset]:
    if not raw:
        return None     # an entry of an older node names none
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return frozenset(raw.split(SEP))


def decode_entry(fields) -> Tuple[List[Tuple[Message, Optional[frozenset],
                                             Optional[frozenset]]], List[str]]:
    """The messages of one inbox entry, in order: ``([(message, only_shares,
    targets), ...], [error, ...])``.  ``fields`` is the entry's field dict (or
    flat list): ``e`` (+ ``s``, ``n``) for one envelope, ``b`` for a batch
    (:func:`encode_batch`).  ``targets``: the nodes the message went to (None:
    not named, an older node's entry).  A bad envelope is skipped and named in
    the errors; a batch whose framing is broken yields what came before the break."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2]))
    out: List[Tuple[Message, Optional[frozenset], Optional[frozenset]]] = []
    errors: List[str] = []
    blob = fields.get(b"b")
    if blob is None:
        try:
            out.append((decode_envelope(fields.get(b"e")), _only(fields.get(b"s")),
                        _targets(fields.get(b"n"))))
        except (EnvelopeError, TypeError, UnicodeDecodeError) as error:
            errors.append(str(error))
        return out, errors
    if not blob or blob[0] != BATCH_VERSION:
        return out, [f"unknown batch version {blob[0] if blob else None}"]
    offset, end = 1, len(blob)
    unpack = _REC.unpack_from
    size = _REC.size
    append = out.append
    while offset < end:
        if offset + size > end:
            errors.append("truncated batch")
            break
        data_len, share_len, targets_len = unpack(blob, offset)
        offset += size
        stop = offset + data_len
        share_stop = stop + share_len - 1 if share_len else stop
        targets_stop = share_stop + targets_len
        if targets_stop > end:
            errors.append("truncated batch")
            break
        try:
            message = _decode_at(blob, offset, stop)
            append((message, _only(blob[stop:share_stop]) if share_len else None,
                    _targets(blob[share_stop:targets_stop])))
        except (EnvelopeError, UnicodeDecodeError) as error:
            errors.append(str(error))
        offset = targets_stop
    return out, errors


class _Congestion:
    """The router as a 'session' of the broker's SlowConsumerGuard while
    publishers are held for it (the guard only needs this attribute)."""

    congested_since: Optional[float] = None


class Router:
    """Forwards messages to other nodes and delivers those sent to this one.

    :param broker: the local :class:`~mqttd.broker.Broker`.
    :param backend: the :class:`~mqttd.cluster.backend.Backend`.
    :param routes: the :class:`~mqttd.cluster.routes.RouteTable`.
    :param node: the :class:`~mqttd.cluster.node.Node` (live peers for shares).
    :param inbox_maxlen: approximate length an inbox is trimmed to.
    :param max_pending: envelopes waiting for Redis at most (then QoS 0 drops).
    :param batch: inbox entries read at once (``XREADGROUP COUNT``); each
        carries up to ``ENTRY_MESSAGES`` envelopes.
    :param block_ms: ``XREADGROUP BLOCK`` milliseconds.
    :param wait_replicas: a flush carrying QoS >= 1 envelopes counts as
        written (PUBACK/PUBREC) only once this many replicas have it
        (``--cluster-wait-replicas``; ``WAIT`` after the XADDs).
    :param max_hold: seconds messages wait at most for a stale route cache
        to catch up before they are routed with it as it is (a WARN).
    :param qos2_window: seconds a node remembers the QoS 2 instances its
        inbox took (a publisher's re-send later than that, after a hand-off
        whose outcome its node never learnt, may be delivered twice).
    """

    def __init__(self, broker, backend, routes, node, keys: Keys = Keys(),
                 inbox_maxlen: int = 1_000_000, max_pending: int = 100_000,
                 batch: int = 64, block_ms: int = 1000, wait_replicas: int = 0,
                 max_hold: float = 5.0, qos2_window: float = 600.0):
        self.broker = broker
        self.backend = backend
        self.routes = routes
        self.node = node
        self.node_id = node.node_id
        self.keys = keys
        self.inbox_maxlen = inbox_maxlen
        self.max_pending = max_pending
        self.high_water = max(1, max_pending // 2)
        self.batch = batch
        self.block_ms = block_ms
        self.wait_replicas = wait_replicas
        self.clock = broker.clock
        self.log_limiter = LogRateLimiter(self.clock, interval=10.0, burst=1,
                                          reason_burst=None)
        #: envelopes waiting: (node, data, shares, qos, all target nodes,
        #: QoS 2 instance ``(client id, packet id, instance id)`` or None)
        self._pending: List[Tuple[str, bytes, Optional[str], int, str,
                                  Optional[Tuple[str, int, str]]]] = []
        self.qos2_window_ms = int(qos2_window * 1000)
        #: node -> when its seen set was last trimmed (and its TTL renewed)
        self._trimmed: Dict[str, float] = {}
        #: the target nodes of the inbox entry being dispatched now (None: none is)
        self._dispatching: Optional[frozenset] = None
        #: ``observer(message, targets)`` for every inbox entry dispatched here
        self.dispatch_observers: list = []
        self._flushing = False
        self._flush_call = None
        self._queued = 0
        self._written = 0
        self._waiters: List[Tuple[int, defer.Deferred]] = []
        self._turns: Dict[str, int] = {}
        self._online = False
        self._stopped = True
        self._reading = False
        self._congestion = _Congestion()
        #: messages held while the route cache is stale: (message, groups served here)
        self._held: List[Tuple[Message, frozenset, Optional[Tuple[str, int, str]]]] = []
        #: the write sequence number of the first QoS >= 1 message held (None: none)
        self._held_seq: Optional[int] = None
        self._hold_call = None
        self.max_hold = max_hold
        routes.fresh_listeners.append(self._release)
        self.stats = {"forwarded": [0, 0, 0], "forward_failed": 0, "dropped": 0,
                      "received": [0, 0, 0], "bad_envelopes": 0, "batches": 0, "entries": 0,
                      "acked": 0, "rerouted": 0, "qos2_resent": 0, "qos2_refused": 0}

    # --- forwarding (the broker's router seam) --------------------------------------------

    def forward(self, message: Message, cache: dict) -> int:
        """Called by ``Broker.publish`` for every message published on this node;
        returns the number of other nodes it goes to.  Puts into ``cache`` the
        shared-subscription groups this node must not serve itself."""
        if not self._online or message.origin is SYS_ORIGIN:
            return 0     # fenced (clients are being closed) or $SYS (per node)
        once = None
        marked = False
        if message.qos == 2:
            pid = cache.get(INBOUND_PACKET_ID)
            if pid is not None:
                once = self._instance(message.origin, pid)
                if once is not None and self.broker.subscribed_here(message.topic):
                    # this node's subscribers get it now: recorded with the hand-off
                    self._pending.append((self.node_id, b"", None, 2, "", once))
                    marked = True
        routes = self.routes
        # RouteTable.fresh() inline (the hot path): a stale cache is not trusted
        as_of = routes.fresh_as_of
        if self._held or as_of is None or self.clock.seconds() - as_of > routes.stale_after:
            return self._hold(message, cache, once)
        nodes, shares = routes.lookup(message.topic)
        per_node: Optional[Dict[str, List[str]]] = None
        if shares:
            skip = None
            per_node = {}
            for share, members in shares.items():
                chosen = self._choose(share, members)
                if chosen != self.node_id:
                    per_node.setdefault(chosen, []).append(share)
                    if self.node_id in members:
                        if skip is None:
                            skip = set()
                        skip.add(share)
            if skip:
                from mqttd.broker import SKIP_SHARES
                cache[SKIP_SHARES] = skip
            nodes = nodes | set(per_node)
        if not nodes:
            if marked:                # the PUBREC waits for the record
                self._queued += 1
                self.broker.write_count += 1
                self._schedule()
            return 0
        if len(self._pending) >= self.max_pending and message.qos == 0:
            self._backlog_full(message, len(nodes))
            return 0
        self._append(message, nodes, per_node, once)
        if message.qos:
            self._queued += 1
            self.broker.write_count += 1    # the PUBACK waits for sync()
        return len(nodes)

    def _instance(self, client_id, packet_id: int) -> Optional[Tuple[str, int, str]]:
        """The QoS 2 instance of ``client_id``'s inbound ``packet_id`` (None: not
        a persistent session's, see the module docstring)."""
        instance = getattr(self.broker.store, "instance", None)
        if instance is None or not isinstance(client_id, str):
            return None
        w = instance(client_id, packet_id)
        return None if w is None else (client_id, packet_id, w)

    def _schedule(self) -> None:
        if not self._flushing and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def resend_qos2(self, message: Message, packet_id: int) -> int:
        """A QoS 2 PUBLISH re-sent under a packet id its persistent session
        received already (:meth:`mqttd.broker.Broker.inbound_qos2_resent`):
        its first hand-off may not have completed (its node was cut off from
        Redis before the PUBREC), so it goes again, under the same instance,
        to every node with routes for it -- this one through its own inbox,
        never to its subscribers directly -- and each inbox adds it only if
        its node did not take it yet.  Returns the nodes it went to (0: not a
        persistent session's instance, or this node is fenced); the PUBREC
        waits until Redis took them."""
        if not self._online or message.origin is SYS_ORIGIN:
            return 0
        once = self._instance(message.origin, packet_id)
        if once is None:
            return 0
        nodes, shares = self.routes.lookup(message.topic)
        per_node: Optional[Dict[str, List[str]]] = None
        if shares:
            per_node = {}
            for share, members in shares.items():
                per_node.setdefault(self._choose(share, members), []).append(share)
            nodes = nodes | set(per_node)
        nodes = set(nodes) | {self.node_id}
        self.stats["qos2_resent"] += 1
        self._append(message, nodes, per_node, once)
        self._queued += 1
        self.broker.write_count += 1
        return len(nodes)

    def _backlog_full(self, message: Message, nodes: int) -> None:
        self.stats["dropped"] += nodes
        self.broker.stats.count_drop("cluster-backlog")
        self.log_limiter.emit(log.warn, "backlog",
                              "Cluster backlog full ({count} envelopes wait for Redis): "
                              "QoS 0 message to {topic} not forwarded",
                              count=len(self._pending) + len(self._held), topic=message.topic)

    def _append(self, message: Message, nodes, per_node, once=None) -> None:
        """Queue one envelope per node in ``nodes`` (``per_node``: the groups
        each serves, None when no group matched; ``once``: the QoS 2 instance)
        and schedule a flush."""
        data = encode_envelope(message)
        qos = message.qos
        pending = self._pending
        # this node delivers it too (its own subscribers): a target as well
        targets = SEP.join(set(nodes) | {self.node_id})
        for node in nodes:
            share = None
            if per_node is not None:
                groups = per_node.get(node)
                share = SEP.join(groups) if groups else ""
            pending.append((node, data, share, qos, targets, once))
        self.stats["forwarded"][qos] += len(nodes)
        if len(pending) >= self.high_water:
            self._congested()
        if not self._flushing and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    # --- holding while the route cache is stale ---------------------------------------

    def _hold(self, message: Message, cache: dict, once=None) -> int:
        """Keep ``message`` until the route cache caught up (see the module
        docstring); the groups with members here are served here now."""
        if message.qos == 0 and len(self._pending) + len(self._held) >= self.max_pending:
            self._backlog_full(message, 1)
            return 0
        _nodes, shares = self.routes.lookup(message.topic)
        here = frozenset(share for share, members in shares.items()
                         if self._serves_here(share, members))
        if len(here) != sum(1 for members in shares.values() if self.node_id in members):
            # members here, all offline: routed with the rest once released
            from mqttd.broker import SKIP_SHARES
            cache[SKIP_SHARES] = set(share for share, members in shares.items()
                                     if self.node_id in members and share not in here)
        self._held.append((message, here, once))
        if once is not None:
            self._schedule()      # the record of this node's own delivery
        if message.qos:
            self._queued += 1
            if self._held_seq is None:
                self._held_seq = self._queued
            self.broker.write_count += 1    # the PUBACK waits until it went out
        if self._hold_call is None:
            as_of = self.routes.fresh_as_of
            self.log_limiter.emit(
                log.warn, "hold", "The route cache of {node_id} is {age} s old: holding "
                "messages for other nodes until it caught up (at most {limit:g} s)",
                node_id=self.node_id, limit=self.max_hold,
                age="?" if as_of is None else f"{self.clock.seconds() - as_of:.1f}")
            self._hold_call = self.clock.callLater(self.max_hold, self._release, True)
        if len(self._held) >= self.high_water:
            self._congested()
        # where it goes is not known yet: never "no matching subscribers" (0x10
        # only when the server knows there are none [MQTT 5.0 3.4.2.1])
        return 1

    def _release(self, force: bool = False) -> None:
        """Route what was held, in order, once the cache is fresh (``force``:
        after ``max_hold`` seconds, with the cache as it is)."""
        if not self._held or not self._online or not (force or self.routes.fresh()):
            return
        if force:
            self.log_limiter.emit(log.warn, "hold-expired",
                                  "The route cache of {node_id} did not catch up within "
                                  "{limit:g} s: forwarding {count} held messages with it as "
                                  "it is", node_id=self.node_id, limit=self.max_hold,
                                  count=len(self._held))
        held, self._held, self._held_seq = self._held, [], None
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        me = self.node_id
        for message, here, once in held:
            nodes, shares = self.routes.lookup(message.topic)
            per_node: Optional[Dict[str, List[str]]] = None
            if shares:
                per_node = {}
                for share, members in shares.items():
                    if share in here:
                        continue          # served here when it was published
                    chosen = self._choose(share, members)
                    if chosen == me:      # a member here since: served here now
                        self.broker.dispatch_shares(message, (share,))
                    else:
                        per_node.setdefault(chosen, []).append(share)
                nodes = nodes | set(per_node)
            if nodes:
                self._append(message, nodes, per_node, once)
        if not self._flushing and self._flush_call is None:
            # nothing to send: the held QoS >= 1 messages count as written
            self._flush_call = self.clock.callLater(0, self._flush)

    def _writable(self) -> int:
        """The write sequence number a flush now covers: everything queued but
        the held messages (whose numbers start at ``_held_seq``)."""
        return self._queued if self._held_seq is None else self._held_seq - 1

    def _drop_held(self) -> None:
        """Fenced or stopping: held messages are not forwarded (their
        publishers get no acknowledgement; they are being disconnected)."""
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        if self._held:
            self._held, self._held_seq = [], None
            self._written = self._queued
            self._fire(self._queued, Failure(BackendError(
                "the node fenced itself while messages waited for its route cache")))

    def also_sent_to(self, node: str, message: Message) -> bool:
        """Whether ``message``, being delivered here now, also went (or goes) to
        ``node`` directly: an inbox entry names its targets; a message published
        on this node goes where this node's routes send it (looked up in the
        same turn as :meth:`forward` does)."""
        if self._dispatching is not None:
            return node in self._dispatching
        if not self._online or message.origin is SYS_ORIGIN:
            return False
        nodes, _shares = self.routes.lookup(message.topic)
        return node in nodes

    def reroute_share(self, share: str, message: Message, tried=(),
                      live_only: bool = False) -> int:
        """Hand ``message``, owed to the shared group ``share`` that has no
        member (or no connected member) left on this node, to another node
        with members (the live ones in turn), as an envelope for that group
        only; 1 if one was found, else 0.  ``tried``: nodes not to pick;
        ``live_only``: only a live node (else, when none is, a node not yet
        seen dead -- its inbox is replayed by its reaper).  Counted in the
        broker's write count like any forward: a QoS >= 1 acknowledgement
        (or the inbox entry it came in) waits until Redis has it."""
        if not self._online:
            return 0
        _nodes, shares = self.routes.lookup(message.topic)
        members = shares.get(share, set()) - {self.node_id} - set(tried)
        if not members:
            return 0
        if live_only:
            peers = self.node.peers
            members = {node for node in members if node in peers}
            if not members:
                return 0
        node = self._choose(share, members)
        self._pending.append((node, encode_envelope(message), REROUTED + share,
                              message.qos, node, None))
        self.stats["rerouted"] += 1
        self.stats["forwarded"][message.qos] += 1
        if message.qos:
            self._queued += 1
            self.broker.write_count += 1
        if not self._flushing and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return 1

    def _dispatch_entry(self, broker, message: Message, only) -> None:
        """Deliver one message of an inbox entry here; a group this node was
        picked for but cannot serve goes on to another node (once)."""
        if only and next(iter(only)).startswith(REROUTED):
            # handed on by a node whose members left: this node's members only
            shares = [share[len(REROUTED):] for share in only]
            served = broker.dispatch_shares(message, shares)
            for share in shares:
                if share not in served:
                    self._group_lost(share, message)
            return
        if only:
            # a group whose members here are all offline goes to a node that
            # may have a connected one (marked: served there, not handed on)
            handed = None
            for share in only:
                if not broker.share_online(share) and self.reroute_share(
                        share, message, live_only=True):
                    if handed is None:
                        handed = set()
                    handed.add(share)
            if handed:
                only = only - handed
        served = set() if only else None
        broker.dispatch(message, only_shares=only, served=served)
        for observer in list(self.dispatch_observers):
            observer(message, self._dispatching)
        if only:
            for share in only:
                if share not in served and not self.reroute_share(share, message):
                    self._group_lost(share, message)

    def _group_lost(self, share: str, message: Message) -> None:
        self.broker.stats.count_drop("shared-no-member")
        self.log_limiter.emit(log.warn, "shared-lost",
                              "No member of {share} left on any node for a message to "
                              "{topic}: dropped", share=share, topic=message.topic)

    def _serves_here(self, share: str, members: Set[str]) -> bool:
        """Whether this node serves ``share`` for a message itself: it has
        members of the group and one of them is connected, or no other live
        node has members (its offline persistent members then queue it).
        Online members first cluster-wide, as on one broker: a node whose
        members are all offline -- a persistent session adopted from a dead
        node, or one whose client went away -- does not keep the group's
        messages from a connected member elsewhere (REVIEW-S9-CLUSTER C6)."""
        me = self.node_id
        if me not in members:
            return False
        if len(members) == 1 or self.broker.share_online(share):
            return True
        peers = self.node.peers
        for node in members:
            if node != me and node in peers:
                return False
        return True

    def _choose(self, share: str, members: Set[str]) -> str:
        """The node that serves ``share`` for one message: this one if it
        serves it itself (:meth:`_serves_here`), else the other live nodes
        with members in turn."""
        me = self.node_id
        if me in members:
            # _serves_here inline (the hot path: a member here, connected)
            if len(members) == 1 or self.broker.share_online(share) or \
                    self._serves_here(share, members):
                return me
        peers = self.node.peers
        live = sorted(n for n in members if n != me and n in peers) or sorted(
            n for n in members if n != me) or [me]
        turn = self._turns.get(share, -1) + 1
        self._turns[share] = turn
        return live[turn % len(live)]

    def sync(self) -> Optional[defer.Deferred]:
        """The broker's barrier waits for this: a Deferred firing once Redis took
        every QoS >= 1 envelope forwarded and every route change made so far
        (None: nothing pending); fails if one of them could not be written."""
        mine = None
        if self._queued != self._written:
            mine = defer.Deferred()
            self._waiters.append((self._queued, mine))
        routes = self.routes.sync()
        if routes is None:
            return mine
        if mine is None:
            return routes
        return both(mine, routes)

    def _fire(self, upto: int, failure: Optional[Failure] = None) -> None:
        self._waiters = fire_waiters(self._waiters, upto, failure)

    def _flush(self) -> None:
        self._flush_call = None
        if self._flushing:
            return
        upto = self._writable()
        if not self._pending:
            if upto > self._written:      # released messages no other node needed
                self._written = upto
                self._fire(upto)
            if not self._held and self._congestion.congested_since is not None:
                self._decongested()
            return
        batch, self._pending = self._pending, []
        self._flushing = True
        wait = 0
        if self.wait_replicas and upto != self._written:
            wait = self.wait_replicas     # a QoS >= 1 publisher waits for this batch
        marks = self._marks(batch)
        if marks is None:
            d = self.backend.pipeline(self._commands(batch), wait_replicas=wait)
        else:
            # QoS 2 instances go out only once Redis applied their marks: a
            # hand-off in Redis then implies the mark (see the module docstring)
            d = marks.addCallback(self._marked, batch, wait)

        def written(_):
            self.stats["batches"] += 1
            self._written = max(self._written, upto)
            self._fire(upto)

        def failed(failure):
            self.stats["forward_failed"] += len(batch)
            self._written = max(self._written, upto)   # those are lost, not pending
            dropped_qos0 = sum(1 for b in batch if b[3] == 0)
            if dropped_qos0:
                self.broker.stats.count_drop("cluster-redis-down")
            if failure.check(BackendError):
                self.log_limiter.emit(
                    log.warn, "forward",
                    "Cannot forward {count} messages to other nodes: {error}; QoS 1/2 "
                    "publishers are not acknowledged (they re-send), QoS 0 ones are lost",
                    count=len(batch), error=str(failure.value))
            else:
                log.failure("Forwarding to other nodes failed", failure)
            self._fire(upto, failure)

        def done(_):
            self._flushing = False
            if self._pending or self._writable() > self._written:
                self._flush()
            elif self._congestion.congested_since is not None:
                self._decongested()
        d.addCallbacks(written, failed)
        d.addBoth(done)

    def _marks(self, batch) -> Optional[defer.Deferred]:
        """None when ``batch`` forwards no QoS 2 instance made here; else a
        Deferred firing, once the store applied everything written so far,
        with the instances whose marks Redis refused (the session is another
        node's); it fails when the store could not write (then the batch is
        not sent and its publishers are not acknowledged)."""
        store = self.broker.store
        if not hasattr(store, "refused_marks"):
            return None
        for item in batch:
            if item[5] is not None and item[1]:
                break
        else:
            return None

        def refused(_):
            marks = store.refused_marks
            if not marks:
                return set()
            out = {item[5] for item in batch if item[5] is not None and item[5] in marks}
            marks.difference_update(out)
            return out
        return store.sync().addCallback(refused)

    def _marked(self, refused, batch, wait) -> defer.Deferred:
        if refused:
            # not received for the cluster: never handed on (the publisher
            # gets no PUBREC and re-sends; its new owner decides afresh)
            batch = [item for item in batch if item[5] not in refused]
            self.stats["qos2_refused"] += len(refused)
        d = self.backend.pipeline(self._commands(batch), wait_replicas=wait)
        if refused:
            def fail(_):
                raise BackendError(f"the inbound QoS 2 marks of {len(refused)} messages "
                                   "were not applied")
            d.addCallback(fail)
        return d

    def _commands(self, batch) -> List[list]:
        """The XADDs for ``batch``: one entry per node for each run of up to
        ``ENTRY_MESSAGES`` envelopes (``ENTRY_BYTES``), in publish order
        (group commit: one Redis command carries many messages).  A run of
        QoS 2 instances is one call of the once-only script instead."""
        per_node: Dict[str, List[tuple]] = {}
        for node, data, share, _qos, targets, once in batch:
            items = per_node.get(node)
            if items is None:
                items = per_node[node] = []
            items.append((data, share, targets, once))
        commands = []
        maxlen = self.inbox_maxlen
        for node, items in per_node.items():
            key = self.keys.inbox(node)
            start = 0
            total = len(items)
            while start < total:
                if items[start][3] is not None:
                    stop = start
                    while stop < total and items[stop][3] is not None and \
                            stop - start < ENTRY_MESSAGES:
                        stop += 1
                    commands.append(self._put_once(node, key, items[start:stop]))
                    start = stop
                    continue
                stop = start
                size = 0
                while stop < total and stop - start < ENTRY_MESSAGES and (
                        size < ENTRY_BYTES or stop == start) and items[stop][3] is None:
                    size += len(items[stop][0])
                    stop += 1
                if stop - start == 1:
                    data, share, targets, _once = items[start]
                    command = ["XADD", key, "MAXLEN", "~", maxlen, "*", "e", data,
                               "n", targets]
                    if share is not None:
                        command += ["s", share]
                else:
                    command = ["XADD", key, "MAXLEN", "~", maxlen, "*", "b",
                               encode_batch([item[:3] for item in items[start:stop]])]
                commands.append(command)
                start = stop
        self.stats["entries"] += len(commands)
        return commands

    def _put_once(self, node: str, key: str, items) -> list:
        """One call of :data:`PUT_ONCE` for a run of QoS 2 instances to ``node``."""
        now = self.clock.seconds()
        window = 0
        if now - self._trimmed.get(node, -1.0) >= 1.0:
            self._trimmed[node] = now
            window = self.qos2_window_ms
        args = [self.inbox_maxlen, window, bytes((BATCH_VERSION,))]
        for data, share, targets, (client_id, packet_id, instance) in items:
            args.append(f"{client_id}\x00{packet_id}\x00{instance}")
            args.append(encode_record(data, share, targets) if data else b"")
        return ["EVAL", PUT_ONCE, 2, key, self.keys.qos2_seen(node), *args]

    def _congested(self) -> None:
        flow = self.broker.flow
        token = self._congestion
        if token.congested_since is None and getattr(flow, "enabled", True):
            token.congested_since = self.clock.seconds()
            flow.holding.add(token)
        self.broker.backpressure = True

    def _decongested(self) -> None:
        self.broker.flow.decongested(self._congestion)

    # --- receiving --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def joined(self):
        """The node (re-)joined: make sure the inbox group exists, read it."""
        self._online = True
        try:
            yield self.backend.execute("XGROUP", "CREATE", self.keys.inbox(self.node_id),
                                       GROUP, "$", "MKSTREAM")
        except BackendError as error:
            if "BUSYGROUP" not in str(error):
                self.log_limiter.emit(log.warn, "group", "Cannot create the inbox group of "
                                      "{node_id}: {error}", node_id=self.node_id,
                                      error=str(error))
        if self._stopped:
            self._stopped = False
            self._read_forever()

    def fenced(self) -> None:
        self._online = False
        self._drop_held()

    def stop(self) -> None:
        self._stopped = True
        self._online = False
        self._drop_held()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    @defer.inlineCallbacks
    def _read_forever(self):
        if self._reading:
            return
        self._reading = True
        start = b"0"       # first what was delivered to us before and never acked
        unacked: List[defer.Deferred] = []
        delivering: Optional[defer.Deferred] = None
        try:
            while not self._stopped:
                try:
                    reply = yield self.backend.execute(
                        "XREADGROUP", "GROUP", GROUP, self.node_id, "COUNT", self.batch,
                        "BLOCK", self.block_ms, "STREAMS", self.keys.inbox(self.node_id),
                        start)
                except Exception as error:
                    if self._stopped:
                        break   # e.g. UNBLOCKED: a stopping node deleted its inbox
                    if "NOGROUP" in str(error):
                        yield self.joined()
                    elif not isinstance(error, BackendError):
                        log.failure("Reading the inbox of {node_id} failed",
                                    node_id=self.node_id)
                    else:
                        self.log_limiter.emit(log.warn, "inbox",
                                              "Cannot read the inbox of {node_id}: {error}; "
                                              "retrying", node_id=self.node_id,
                                              error=str(error))
                    yield _sleep(self.clock, 0.5)
                    start = b"0"
                    continue
                entries = []
                for _stream, items in (reply or []):
                    entries.extend(items)
                if start == b"0" and not entries:
                    start = b">"     # the backlog of the previous run is done
                    continue
                if not entries:
                    continue
                if delivering is not None and not delivering.called:
                    # the previous batch is still being handed over in slices:
                    # its messages go first (order per publisher and topic)
                    yield delivering
                delivering, acked = self._deliver(entries)
                if start == b"0":
                    # re-reading from 0 returns what is not acknowledged yet
                    yield acked
                    continue
                # new entries: read on while earlier batches wait for their
                # acknowledgement (at most MAX_UNACKED batches)
                unacked.append(acked)
                acked.addBoth(lambda _, d=acked: unacked.remove(d) if d in unacked else None)
                if len(unacked) >= MAX_UNACKED:
                    yield unacked[0]
        finally:
            self._reading = False

    def _deliver(self, entries) -> Tuple[defer.Deferred, defer.Deferred]:
        """Hand the messages of ``entries`` to the broker, at most
        ``DELIVER_SLICE`` per reactor turn (other clients are served between
        slices); ``(delivered, acked)``: fires when every message was handed
        over, and when the entries were acknowledged to Redis (after the
        local store made what they queued durable)."""
        broker = self.broker
        since = broker.write_count
        ids = [entry_id for entry_id, _fields in entries]
        delivered: defer.Deferred = defer.Deferred()
        acked: defer.Deferred = defer.Deferred()
        received = self.stats["received"]
        pending = iter(entries)
        here = frozenset((self.node_id,))
        store = broker.store if hasattr(broker.store, "source") else None
        node_id = self.node_id

        def step():
            budget = DELIVER_SLICE
            for entry_id, fields in pending:
                if fields is None:
                    continue    # trimmed away before we read it (pending list only)
                messages, errors = decode_entry(fields)
                if errors:
                    self.stats["bad_envelopes"] += len(errors)
                    self.log_limiter.emit(log.warn, "envelope", "Dropping {count} envelopes "
                                          "of inbox entry {id} of {node_id}: {error}",
                                          count=len(errors), id=entry_id, error=errors[0],
                                          node_id=self.node_id)
                for index, (message, only, targets) in enumerate(messages):
                    received[message.qos] += 1
                    # an entry of an older node names no targets: as if it went here only
                    self._dispatching = targets or here
                    if store is not None and message.qos == 2:
                        # the QoS 2 records it queues say so (the reaper's replay
                        # of an entry read and not acknowledged skips them)
                        store.source = (node_id, position(entry_id, index))
                    try:
                        self._dispatch_entry(broker, message, only)
                    except Exception:
                        log.failure("Delivering a message from another node to {topic} "
                                    "failed", topic=message.topic)
                    finally:
                        self._dispatching = None
                        if store is not None:
                            store.source = None
                budget -= len(messages)
                if budget <= 0:
                    if self._stopped:
                        # the rest stays unacknowledged: read again after a
                        # restart, or by the reaper
                        delivered.callback(None)
                        acked.callback(None)
                        return
                    self.clock.callLater(0, step)
                    return
            delivered.callback(None)
            barrier = broker.barrier(since)
            if barrier is None:
                self._ack(ids).chainDeferred(acked)
                return
            # acknowledged to Redis once what we queued for it is durable here
            barrier.addCallback(lambda _: self._ack(ids))
            barrier.addErrback(lambda f: self.log_limiter.emit(
                log.warn, "inbox-ack", "Not acknowledging {count} inbox entries: the store "
                "failed ({error}); they are delivered again", count=len(ids),
                error=str(f.value)))
            barrier.chainDeferred(acked)
        step()
        return delivered, acked

    def _ack(self, ids) -> defer.Deferred:
        d = self.backend.execute("XACK", self.keys.inbox(self.node_id), GROUP, *ids)

        def acked(_):
            self.stats["acked"] += len(ids)
        d.addCallback(acked)
        d.addErrback(lambda f: self.log_limiter.emit(
            log.warn, "xack", "Cannot acknowledge {count} inbox entries: {error} (they are "
            "delivered again after a restart)", count=len(ids), error=str(f.value)))
        return d


def position(entry_id, index: int) -> str:
    """The position of the ``index``-th message of inbox entry ``entry_id``:
    ``<ms>-<seq>-<index>``, growing in the inbox's order (see :func:`position_key`)."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return f"{entry_id}-{index}"


def position_key(text) -> Tuple[int, ...]:
    """A position (:func:`position`) as a comparable tuple; () for garbage."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        return tuple(int(part) for part in text.split("-"))
    except (ValueError, AttributeError):
        return ()


def _sleep(clock, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
