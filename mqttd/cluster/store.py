"""The cluster's IBrokerStore: persistent sessions in Redis, fenced by epoch.

The broker describes every change of durable state as an operation value
(:mod:`mqttd.persistence.records`); :class:`RedisSessionStore` groups the
operations of one reactor turn by client id and applies each group with one
``session_apply`` script call (see :mod:`mqttd.cluster.session_lua`), all of
them in one pipeline.  Each call carries this node's id and the epoch it
claimed the session with; Redis refuses (``F``) the writes of a node that lost
the session to another (a zombie after a takeover, or a node the reaper
declared dead), except queued messages, which are forwarded to the new owner
(its ``f`` list) so a message routed to the old owner is not lost.

``sync()`` fires once Redis acknowledged every operation written before it
(and, with ``wait_replicas`` > 0, once ``WAIT`` saw that many replicas take
them); it fails while Redis is unreachable (:attr:`failure` is then set, and
the broker refuses persistent CONNECTs meanwhile).

**Inbound QoS 2 marks carry an instance id** (REVIEW-S9-CLUSTER C2).  The
mark of a persistent session's inbound QoS 2 packet id [MQTT-4.3.3-10] is
stored as ``<packet id>/<instance>`` (the instance unique per message, made
here), and the bus forwards such a message to other nodes only once Redis
applied its mark (a ``sync()`` after which the mark is not among
:attr:`RedisSessionStore.refused_marks`): a hand-off in Redis
implies the mark, so a re-send (DUP) on any node finds the packet id already
received, with the instance under which every node's inbox took it once
(:mod:`mqttd.cluster.bus`).

Retained messages are not this store's business (``PutRetained`` /
``DeleteRetained`` are ignored): the cluster's retained store keeps them in
Redis itself.  ``open()`` returns no sessions: a session is loaded from Redis
when its client connects (:mod:`mqttd.cluster.sessions`).

**Node-local sessions.**  The internal sessions of features (a bridge's local
end, reserved with ``Broker.reserve_client_id``) belong to this node, not to
the cluster: no client can claim them anywhere, no reaper adopts them.  Their
operations go to the node's own store (``--persistence``) as on a single
node (:attr:`RedisSessionStore.is_local`), and ``open()`` restores them from
it.
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Dict, List, Optional, Set, Tuple

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mqttd.interfaces import IBrokerStore
from mqttd.persistence import records as R
from mqttd.persistence import safepickle
from mqttd.cluster.session_lua import SCRIPTS, session_keys

log = Logger(namespace="mqttd.cluster.store")

__all__ = ["RedisSessionStore", "Disconnected", "Forward", "decode_outbound"]


class Disconnected:
    """Internal op: the session's connection ended (``online`` = 0, the
    offline session's expiry deadline set on Redis's clock; a non-persistent
    session's keys go).

    ``take_will``: the node did not decide on the connection's will (it was
    fenced off from Redis when the connection went): if the session is still
    this node's, the will stored at CONNECT is taken out of Redis and handed
    to :attr:`RedisSessionStore.on_will`; if a reaper adopted the session
    meanwhile, the reaper published it.  Either way exactly once.
    """

    __slots__ = ("client_id", "take_will")

    def __init__(self, client_id: str, take_will: bool = False):
        self.client_id = client_id
        self.take_will = take_will


class Forward:
    """Internal op: hand a queued message to whichever node owns the session now."""

    __slots__ = ("client_id", "record")

    def __init__(self, client_id: str, record: R.OutboundRecord):
        self.client_id = client_id
        self.record = record


def encode_outbound(record: R.OutboundRecord) -> bytes:
    return safepickle.dumps(record)


def decode_outbound(seq, blob: bytes, state: Optional[bytes] = None) -> R.OutboundRecord:
    """The stored OutboundRecord under ``seq`` (the key is authoritative), with
    its stage update ``<packet id>:<stage>`` applied."""
    record = safepickle.loads(blob)
    seq = int(seq)
    changes = {}
    if record.seq != seq:
        changes["seq"] = seq
    if state is not None:
        pid, stage = state.decode().split(":")
        changes["packet_id"] = int(pid) if pid else None
        changes["stage"] = R.OutboundStage(int(stage))
    if changes:
        record = attrs.evolve(record, **changes)
    return record


@implementer(IBrokerStore)
class RedisSessionStore:
    """Persistent sessions in Redis (see the module docstring).

    :param backend: a :class:`mqttd.cluster.backend.Backend`.
    :param node_id: this node's id (the ``node`` of the sessions it owns).
    :param prefix: key prefix (``mqttd:``).
    :param clock: ``IReactorTime``; flushes run on the next reactor turn.
    :param wait_replicas: after each flush, ``WAIT`` for this many replicas
        and fail the flush (no acknowledgement) when fewer took it in
        ``wait_timeout`` (0: none; under Redis Cluster one ``WAIT`` per
        primary written to).
    :param wait_timeout: milliseconds ``WAIT`` may take.
    """

    durable = True
    #: takes PutSubscription / DeleteSubscription / PutSessionState (format 5):
    #: one field of the session's ``b`` hash per changed filter, the record's
    #: other fields without the subscriptions (REVIEW-S9 R15)
    subscription_deltas = True

    def __init__(self, backend, node_id: str, prefix: str = "mqttd:", clock=None,
                 wait_replicas: int = 0, wait_timeout: int = 1000, inner=None):
        #: the node's own store (``--persistence``), kept for what is not a
        #: session: retained messages, unless the cluster's retained store
        #: holds them (then it sees nothing of them)
        self.inner = inner
        self.backend = backend
        self.node_id = node_id
        self.prefix = prefix
        self.clock = clock
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        #: client id -> the epoch this node claimed the session with
        self.epochs: Dict[str, int] = {}
        #: None, or the error of the last failed flush (cleared by a good one)
        self.failure = None
        #: ``fenced(client_id, node, epoch, forwarded)``: a write was refused
        self.on_fenced: Optional[Callable] = None
        #: ``gone(client_id)``: the session's keys were deleted (ended)
        self.on_gone: Optional[Callable] = None
        #: ``will(client_id, fields)``: a ``Disconnected(take_will=True)`` took
        #: the connection's will (``kind``, ``m``, ``delay``) out of Redis
        self.on_will: Optional[Callable] = None
        #: ``is_local(client_id) -> bool``: a node-local (internal) session,
        #: kept in the node's own store rather than in Redis
        self.is_local: Callable[[str], bool] = lambda _client_id: False
        #: the Session Expiry Interval of MQTT 3.x persistent sessions
        #: (``--persistent-client-expiration``; None: never), for the deadline
        #: Redis keeps
        self.v3_expiration: Optional[float] = None
        self._pending: Dict[str, List] = {}
        #: client id -> batches sent and failed, each ``(write id, items)``:
        #: re-sent first, with the same write id (Redis may have applied
        #: them: the outcome of a timeout is unknown), before newer writes
        self._retry: Dict[str, List[Tuple[str, List]]] = {}
        self._wid_prefix = os.urandom(6).hex()
        self._wids = itertools.count(1)
        self._waiters: List[defer.Deferred] = []
        #: client id -> {inbound QoS 2 packet id: its instance id} (see the
        #: module docstring): made by the marks written here, or loaded
        self.instances: Dict[str, Dict[int, str]] = {}
        self._instance_ids = itertools.count(1)
        #: (client id, packet id, instance) of marks written here that Redis
        #: refused (the session is another node's): the bus forwards none of
        #: their messages
        self.refused_marks: Set[Tuple[str, int, Optional[str]]] = set()
        #: ``(node, position)`` of the inbox message being dispatched now (set
        #: by the bus), written with the QoS 2 records it queues (op ``P``)
        self.source: Optional[Tuple[str, str]] = None
        self._flushing = False
        self._scheduled = False
        self.flushes = 0
        self._scripts = {name: backend.register(name, source)
                         for name, source in SCRIPTS.items()}

    # --- IBrokerStore -------------------------------------------------------------

    def open(self) -> R.StoredState:
        if self.inner is None:
            return R.StoredState()
        state = self.inner.open()
        local = {cid: stored for cid, stored in state.sessions.items() if self.is_local(cid)}
        wills = {cid: will for cid, will in state.wills.items() if self.is_local(cid)}
        ignored = len(state.sessions) - len(local), len(state.wills) - len(wills)
        if any(ignored):
            log.warn("Ignoring {sessions} sessions and {wills} delayed wills of the local "
                     "store: in a cluster, sessions live in Redis (only internal sessions, "
                     "such as bridges' local ends, stay in the node's store)",
                     sessions=ignored[0], wills=ignored[1])
        return R.StoredState(sessions=local, retained=state.retained, wills=wills)

    def write(self, op) -> None:
        cls = op.__class__
        if cls in (R.PutRetained, R.DeleteRetained):
            if self.inner is not None:
                self.inner.write(op)
            return
        if self.is_local(op.record.client_id if cls in (R.PutSession, R.PutWill)
                         else op.client_id):
            # a node-local (internal) session: the node's own store, as on one node
            if self.inner is not None and cls not in (Disconnected, Forward):
                self.inner.write(op)
            return
        if cls is R.PutSession:
            # the record without its subscriptions, then one field of the
            # session's ``b`` hash per subscription (see session_lua)
            record = op.record
            cid = record.client_id
            item = ["S", safepickle.dumps(attrs.evolve(record, subscriptions=())),
                    self._expiry_ms(record)]
            for sub in record.subscriptions:
                item += ("B", sub.topic_filter, safepickle.dumps(sub))
        elif cls is R.PutSubscription:
            cid = op.client_id
            item = ("B", op.record.topic_filter, safepickle.dumps(op.record))
        elif cls is R.DeleteSubscription:
            cid = op.client_id
            item = ("E", op.topic_filter)
        elif cls is R.PutSessionState:
            cid = op.client_id
            item = ("T", safepickle.dumps(op), self._expiry_ms(op))
        elif cls is R.PutOutbound:
            cid = op.client_id
            item = ("O", op.record.seq, encode_outbound(op.record))
            source = self.source
            if source is not None and op.record.qos == 2:
                # from an inbox entry: the reaper must not replay it to this session
                item = ("P", source[0], source[1]) + item
        elif cls is R.UpdateOutbound:
            cid = op.client_id
            pid = "" if op.packet_id is None else op.packet_id
            item = ("U", op.seq, f"{pid}:{int(op.stage)}")
        elif cls is R.DeleteOutbound:
            cid = op.client_id
            item = ("R", op.seq)
        elif cls is R.AddInboundQos2:
            cid = op.client_id
            instance = f"{self._wid_prefix}.{next(self._instance_ids)}"
            self.instances.setdefault(cid, {})[op.packet_id] = instance
            item = ("I", f"{op.packet_id}/{instance}")
        elif cls is R.DeleteInboundQos2:
            cid = op.client_id
            instance = self.instances.get(cid, {}).pop(op.packet_id, None)
            item = ("J", op.packet_id if instance is None else f"{op.packet_id}/{instance}")
        elif cls is R.DeleteSession:
            cid = op.client_id
            self.instances.pop(cid, None)
            item = ("D",)
        elif cls is R.PutWill:
            cid = op.record.client_id
            item = ("W", safepickle.dumps(op.record))
        elif cls is R.DeleteWill:
            cid = op.client_id
            item = ("V",)
        elif cls is Disconnected:
            cid = op.client_id
            item = ("Y",) if op.take_will else ("X",)
        elif cls is Forward:
            cid = op.client_id
            item = ("G", encode_outbound(op.record))
        else:
            raise TypeError(f"not a store operation: {op!r}")
        pending = self._pending.get(cid)
        if pending is None:
            pending = self._pending[cid] = []
        pending.extend(item)
        if not self._scheduled and not self._flushing and self.clock is not None:
            # written without a sync (e.g. a stage update): out on the next turn
            self._scheduled = True
            self.clock.callLater(0, self._auto_flush)

    def _expiry_ms(self, record) -> object:
        """The Session Expiry Interval Redis keeps for ``record`` (a SessionRecord
        or PutSessionState): milliseconds, ``""`` = never."""
        expiry = record.expiry_interval
        if expiry is None and record.protocol_level < 5:
            expiry = self.v3_expiration
        return "" if expiry is None else int(expiry * 1000)

    def _auto_flush(self) -> None:
        self._scheduled = False
        if (self._pending or self._retry) and not self._flushing:
            self._flush()

    def sync(self) -> defer.Deferred:
        if self.inner is not None and getattr(self.inner, "durable", False):
            return defer.gatherResults([self.inner.sync(), self._sync()],
                                       consumeErrors=True).addCallbacks(
                lambda _: None, lambda f: f.value.subFailure)
        return self._sync()

    def _sync(self) -> defer.Deferred:
        if not self._pending and not self._retry and not self._flushing:
            if self.failure is not None:
                return defer.fail(self.failure)
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        if not self._flushing:
            self._flush()
        return d

    def close(self) -> defer.Deferred:
        d = self._sync().addErrback(lambda _f: None)
        if self.inner is not None:
            d.addCallback(lambda _: self.inner.close())
        return d

    # --- inbound QoS 2 instances ---------------------------------------------------

    def instance(self, client_id: str, packet_id: int) -> Optional[str]:
        """The instance id of ``client_id``'s inbound QoS 2 packet id (None: not
        a persistent session's, or marked by a node without instance ids)."""
        instances = self.instances.get(client_id)
        return None if instances is None else instances.get(packet_id)

    def load_instances(self, client_id: str, members) -> None:
        """Remember the instances of a session loaded from Redis (``members``: the
        ``i`` set, ``<packet id>[/<instance>]``)."""
        self.instances[client_id] = {pid: instance for pid, instance in
                                     map(parse_inbound, members) if instance}

    def _refused(self, cid: str, items) -> None:
        """Redis refused ``items`` of ``cid`` (fenced): their marks are not applied."""
        refused = self.refused_marks
        if len(refused) > 100_000:
            refused.clear()     # never looked at again: the bus checks them at once
        for pid, instance in _marked(items):
            refused.add((cid, pid, instance))
        instances = self.instances.get(cid)
        if instances is not None and self.epochs.get(cid) is None:
            self.instances.pop(cid, None)

    # --- flushing -----------------------------------------------------------------

    def _flush(self) -> None:
        self._flushing = True
        batch, self._pending = self._pending, {}
        retry, self._retry = self._retry, {}
        waiters, self._waiters = self._waiters, []
        commands = []
        cids = []
        units = []
        for cid in list(retry) + [cid for cid in batch if cid not in retry]:
            for wid, items in retry.get(cid, ()):
                units.append((cid, wid, items))
            if cid in batch:
                units.append((cid, f"{self._wid_prefix}:{next(self._wids)}", batch[cid]))
        script = self._scripts["session_apply"]
        for cid, wid, items in units:
            epoch = self.epochs.get(cid)
            if epoch is None:
                # not (or no longer) ours: only forwards may go out
                if "I" in items:
                    self._refused(cid, items)
                forwards = _only_forwards(items)
                if not forwards:
                    continue
                items, epoch = forwards, 0
            keys = session_keys(self.prefix, cid)
            commands.append(("EVALSHA", script.sha, len(keys), *keys, self.node_id,
                             epoch, "Z", wid, *items))
            cids.append((cid, items, epoch, wid))
        d = self._run(commands, cids)
        d.addCallbacks(self._flushed, self._flush_failed,
                       callbackArgs=(cids, waiters), errbackArgs=(cids, waiters))

    def _run(self, commands, cids) -> defer.Deferred:
        """The batch in one pipeline; with ``wait_replicas`` it ends with
        ``WAIT`` (one per primary under Redis Cluster, see
        :meth:`Backend.pipeline`): fewer replicas is a failure (nothing is
        acknowledged that a failover could lose)."""
        if not commands:
            return defer.succeed([])
        wait = dict(wait_replicas=self.wait_replicas, wait_timeout=self.wait_timeout)
        d = self.backend.pipeline(commands, **wait)

        def noscript(failure):
            # after a Redis restart the script cache is empty: run the batch
            # again with EVAL (the ops are idempotent, except forwards)
            text = str(failure.value)
            if not any(s in text for s in ("NOSCRIPT", "NoScript", "No matching script")):
                return failure
            source = self._scripts["session_apply"].source
            keys = [session_keys(self.prefix, cid) for cid, _items, _epoch, _wid in cids]
            return self.backend.pipeline(
                [("EVAL", source, len(k), *k, self.node_id, epoch, "Z", wid, *items)
                 for k, (_cid, items, epoch, wid) in zip(keys, cids)], **wait)
        d.addErrback(noscript)
        return d

    def _flushed(self, replies, cids, waiters) -> None:
        self._flushing = False
        self.flushes += 1
        if self.failure is not None:
            log.info("Writing sessions to Redis works again")
        self.failure = None
        for (cid, items, epoch, _wid), reply in zip(cids, replies):
            status = _text(reply[0])
            if status == "F":
                if "I" in items:
                    self._refused(cid, items)
                if self.on_fenced is not None:
                    try:
                        self.on_fenced(cid, _text(reply[1]), int(reply[2]), int(reply[3]))
                    except Exception:
                        log.failure("fenced handler failed for {client_id}", client_id=cid)
            else:
                if len(reply) > 2 and self.on_will is not None:
                    try:
                        self.on_will(cid, {_text(reply[i]): reply[i + 1]
                                           for i in range(2, len(reply) - 1, 2)})
                    except Exception:
                        log.failure("will handler failed for {client_id}", client_id=cid)
                if int(reply[1]) == 1:
                    if self.epochs.get(cid) == epoch:
                        del self.epochs[cid]
                    if self.on_gone is not None:
                        self.on_gone(cid)
        for d in waiters:
            d.callback(None)
        self._next()

    def _flush_failed(self, failure, cids, waiters) -> None:
        self._flushing = False
        if self.failure is None:   # one line per outage, not per retry
            log.error("Writing sessions to Redis failed: {error}; acknowledgements that "
                      "need it are not sent; retrying every second", error=str(failure.value))
        self.failure = failure.value
        # the batches are kept (in order, before newer writes) and re-sent
        # with their write ids: what the broker holds in memory must reach
        # Redis eventually, and what Redis applied already is not applied
        # twice (a batch that timed out may have run)
        for cid, items, _epoch, wid in cids:
            self._retry.setdefault(cid, []).append((wid, list(items)))
        for d in waiters:
            d.errback(failure)
        if self._waiters:
            self._flush()
        elif (self._pending or self._retry) and self.clock is not None \
                and not self._scheduled:
            self._scheduled = True
            self.clock.callLater(1.0, self._auto_flush)

    def _next(self) -> None:
        if (self._waiters or self._pending or self._retry) and not self._flushing:
            self._flush()


def parse_inbound(member) -> Tuple[int, Optional[str]]:
    """``(packet id, instance or None)`` of a member of a session's ``i`` set."""
    text = _text(member)
    pid, _, instance = text.partition("/")
    return int(pid), instance or None


#: arguments of each op of a session batch: the same table as the ``arity`` of
#: :data:`mqttd.cluster.session_lua.APPLY` (a test keeps the two equal)
_ARITY = {"S": 2, "D": 0, "O": 2, "U": 2, "R": 1, "I": 1, "J": 1, "W": 1, "V": 0,
          "X": 0, "Y": 0, "G": 1, "P": 2, "B": 2, "E": 1, "T": 2}


def _marked(items: list) -> List[Tuple[int, Optional[str]]]:
    """The ``(packet id, instance)`` an op list marks (``I``)."""
    out = []
    i = 0
    while i < len(items):
        op = items[i]
        if op == "I":
            out.append(parse_inbound(items[i + 1]))
        i += 1 + _ARITY[op]
    return out


def _only_forwards(items: list) -> list:
    """The ``G`` forwards and the queued messages (``O``) of an op list, as forwards."""
    arity = _ARITY
    out = []
    i = 0
    while i < len(items):
        op = items[i]
        if op == "O":
            out.extend(("G", items[i + 2]))
        elif op == "G":
            out.extend(("G", items[i + 1]))
        i += 1 + arity[op]
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
