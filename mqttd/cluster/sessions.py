"""Session ownership across the cluster: claim, takeover, resume on any node.

:class:`ClusterSessions` is the broker's ``session_registry`` (the session
seam, :meth:`mqttd.broker.Broker.claim_session`).  On every CONNECT:

1. ``session_claim`` (one script on the session's keys) makes this node the
   owner with the next **epoch**, wipes the session on Clean Start, takes the
   will the previous connection left, and answers who owned it before;
2. if another node that is alive owned it, it gets a ``kick`` on its control
   stream; it closes that client with DISCONNECT 0x8E Session taken over
   (publishing its will as MQTT 5 says), writes what it still had (its writes
   are fenced now: queued messages are forwarded to the new owner), and
   answers ``done``.  The claimant waits for it at most ``takeover_timeout``;
   a node that does not answer is a zombie the epoch fences;
3. a dead previous owner cannot publish its client's will: the claimant does
   (no delay, Clean Start, or MQTT 3.x), or drops it (a resumed session
   cancels a delayed will [MQTT-3.1.3-9]);
4. a present session is loaded (``session_load``: subscriptions, queued and
   in-flight messages with their packet ids, inbound QoS 2 ids) and installed
   in the broker, which then resumes it as any stored session: DUP resends,
   the queue, live traffic.

Two simultaneous CONNECTs of one client id on two nodes are serialized by
Redis: the later claim wins and kicks the earlier (which may not even have
answered its client yet: its claim then answers "taken over", and the client
is refused with 0x88 / v3 0x03).  Exactly one stays.

After a node gave a session away it keeps, for ``forward_grace`` seconds,
in-process subscriptions on the session's filters: a message that still
reaches it (other nodes' route caches lag) is forwarded to the new owner
(``f`` list + a ``poke``), never dropped -- unless the message also went to
the new owner's node directly (the publisher's routes already had it:
:meth:`mqttd.cluster.bus.Router.also_sent_to`), which then delivers it itself:
once per session, for QoS 2 too.  What the new owner's node received
directly while its claim was taking the session over (kick sent, session not
installed yet) is kept and delivered into the session once it is installed.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd.cluster.backend import BackendError, RedisReplyError
from mqttd.codec.errors import ReasonCode
from mqttd.messages import will_message
from mqttd.persistence import records as R
from mqttd.persistence import safepickle
from mqttd.cluster.session_lua import node_sessions_key, session_keys
from mqttd.cluster.store import Disconnected, Forward, decode_outbound, parse_inbound

log = Logger(namespace="mqttd.cluster.sessions")

__all__ = ["ClusterSessions"]

#: how many forwarded messages one pull moves (and seq numbers it reserves)
PULL_BATCH = 10000

#: messages kept at most while a takeover from a live node runs (see _open_window)
WINDOW_MAX = 100000

#: the ``clientDisconnected`` reason of the clients a fenced node closes
#: (:mod:`mqttd.cluster.service`): their wills are decided once Redis answers
FENCED_REASON = "cluster node fenced"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _identity(message) -> tuple:
    """What tells one publish from another in a takeover's two copies: the
    stored copy may differ from the routed one in retain flag (Retain As
    Published), QoS (downgraded) and per-subscriber properties."""
    return (message.topic, message.payload, message.origin, message.expires_at)


def _pairs(flat) -> Dict[str, bytes]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class ClusterSessions:
    """The cluster's session registry (see the module docstring).

    :param broker: the local :class:`~mqttd.broker.Broker`.
    :param backend: the :class:`~mqttd.cluster.backend.Backend`.
    :param store: the :class:`~mqttd.cluster.store.RedisSessionStore` of the broker.
    :param node_id: this node's id.
    :param clock: ``IReactorTime``.
    :param send_control: ``send_control(node, fields: dict) -> Deferred``: put
        a control message on ``node``'s control stream.
    :param is_alive: ``is_alive(node) -> Deferred[bool]``.
    :param takeover_timeout: seconds a claimant waits for the old owner's ``done``.
    :param forward_grace: seconds a node forwards messages of a session it
        gave away.
    """

    def __init__(self, broker, backend, store, node_id: str, clock,
                 send_control: Callable, is_alive: Callable, prefix: str = "mqttd:",
                 takeover_timeout: float = 5.0, forward_grace: float = 10.0,
                 allow_other_user: bool = False, boot=""):
        self.broker = broker
        self.backend = backend
        self.store = store
        self.node_id = node_id
        self.clock = clock
        self.prefix = prefix
        self.send_control = send_control
        self.is_alive = is_alive
        self.takeover_timeout = takeover_timeout
        self.forward_grace = forward_grace
        self.allow_other_user = allow_other_user
        #: this incarnation's boot id: the reaper of a node id that came back
        #: adopts only the sessions of its dead incarnation
        self.boot = boot
        #: client id -> highest epoch a kick announced (a claim below it lost)
        self._kicked: Dict[str, int] = {}
        #: connection -> epoch of its claim in progress (None until claimed)
        self._claims: Dict[object, Optional[int]] = {}
        #: connection -> the Deferred its CONNECT waits on (see :meth:`refuse_claims`)
        self._answers: Dict[object, defer.Deferred] = {}
        #: connections gone while their claim was in progress
        self._gone_early: set = set()
        #: connection -> epoch of a claim that answered a refusal
        self._refused: Dict[object, int] = {}
        #: (client id, epoch) -> Deferred waiting for the old owner's done
        self._done: Dict[Tuple[str, int], defer.Deferred] = {}
        #: client id -> the lock its claims and adoptions on this node take
        self._locks: Dict[str, defer.DeferredLock] = {}
        #: client id -> unsubscribe functions of the forwarding subscriptions
        self._forwarding: Dict[str, list] = {}
        #: client id -> messages the previous owner queued during the hand-off
        #: (from session_load), until the takeover window is delivered
        self._handed: Dict[str, list] = {}
        #: client id -> bases of pulls whose reply was lost (see pull)
        self._lost_pulls: Dict[str, list] = {}
        self.takeovers = 0
        self.forwarded = 0
        #: ``also_sent_to(node, message) -> bool`` (the bus router; None: never)
        self.also_sent_to: Optional[Callable] = None
        #: the bus router (its ``dispatch_observers``), None without one
        self.router = None
        #: wills taken back from Redis while this node cannot publish
        #: cluster-wide (fenced): published when it can (see :meth:`unfenced`)
        self._owed_wills: list = []
        #: ``is_fenced() -> bool`` (set by the wiring; default: never fenced)
        self.is_fenced: Callable[[], bool] = lambda: False
        self.wills_published = 0
        store.on_fenced = self._fenced
        store.on_gone = self._gone
        store.on_will = self._will_taken
        store.v3_expiration = broker.config.persistent_client_expiration
        self._unobserve = broker.on("clientDisconnected", self._disconnected)
        broker.session_registry = self

    def stop(self) -> None:
        self._unobserve()
        if self.broker.session_registry is self:
            self.broker.session_registry = None
        for unsubscribers in self._forwarding.values():
            for unsubscribe in unsubscribers:
                unsubscribe()
        self._forwarding.clear()

    def _keys(self, client_id: str):
        return session_keys(self.prefix, client_id)

    # --- the seam -------------------------------------------------------------------

    def claim(self, connection, client_id: str, clean_start: bool, persistent: bool,
              will, username: Optional[str]) -> defer.Deferred:
        """The session seam (:meth:`mqttd.broker.Broker.claim_session`).  A claim
        still in progress when this node fences itself answers at once with a
        refusal (v5 0x88 Server unavailable / v3 0x03): its CONNACK never waits
        on Redis calls that cannot complete (each of them is bounded as well)."""
        self._claims[connection] = None
        d = self.exclusive(client_id, self._claim, client_id, clean_start, persistent, will,
                           username, connection)

        def finished(result):
            epoch = self._claims.pop(connection, None)
            if connection in self._gone_early:
                # the client went (or was refused, fenced) while we claimed:
                # its session is offline here
                self._gone_early.discard(connection)
                self._offline(client_id, epoch)
            elif result is not None and epoch is not None:
                self._refused[connection] = epoch   # claim_abandoned follows
            return result
        d.addBoth(finished)
        answer = defer.Deferred(lambda _answer: d.cancel())
        self._answers[connection] = answer

        def answered(result):
            self._answers.pop(connection, None)
            if isinstance(result, Failure) and result.check(BackendError):
                # Redis down or slow: an expected outage, not a bug -- a refusal
                # (v5 0x88 / v3 0x03) with the connection's rate-limited WARN
                # line, no traceback (REVIEW-CLUSTER F16)
                result = (ReasonCode.SERVER_UNAVAILABLE,
                          f"Redis unavailable for the session claim: "
                          f"{result.getErrorMessage()}", "unavailable")
            if not answer.called:
                answer.callback(result)
        d.addBoth(answered)
        return answer

    def exclusive(self, client_id: str, f: Callable, *args) -> defer.Deferred:
        """``f(*args)`` once no other claim or adoption of ``client_id`` runs on
        this node; fires with its result.

        A claim and the reaper's adoption of one session both read it from
        Redis and install it in the broker over several round trips; run side
        by side, the later install replaced the earlier one (a resumed client
        kicked by its own node, or a stale copy of the session kept in memory
        while Redis had the newer one).  Kicks from other nodes do not take the
        lock (two nodes claiming at once would wait for each other)."""
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = defer.DeferredLock()
        d = lock.run(f, *args)

        def unlock(result):
            if not lock.locked and not lock.waiting and self._locks.get(client_id) is lock:
                del self._locks[client_id]
            return result
        d.addBoth(unlock)
        return d

    def _claim(self, client_id, clean_start, persistent, will, username, connection=None):
        window = []      # [messages] while a takeover from a live node runs
        # kept from before the claim runs: a message this node gets while the
        # claim script is on its way must not fall between "not ours yet" and
        # the window (the old owner, once kicked, does not forward what was
        # also sent here); used only if the claim turns out a takeover from a
        # live node, else dropped.  Only a resume of a session this node does
        # not own can be one (each open window sees every QoS >= 1 message of
        # the node: a clean start or a resume here costs nothing)
        early = []
        d = self._claim_in(window, client_id, clean_start, persistent, will, username,
                           connection, early)

        def delivered(result):
            if not window:
                for opened in early:
                    self._close_window(opened)
            else:
                messages = self._close_window(window[0])
                if result is None and self.store.epochs.get(client_id) is not None:
                    self._deliver_window(client_id, messages)
            self._handed.pop(client_id, None)
            return result
        return d.addBoth(delivered)

    @defer.inlineCallbacks
    def _claim_in(self, window, client_id, clean_start, persistent, will, username,
                  connection=None, early=None):
        broker = self.broker
        store = self.store
        # what this node still has to write of this client goes out first
        yield store.sync()
        if early is not None and not clean_start and client_id not in store.epochs:
            # opened as late as possible: what it keeps that the old owner
            # delivered before the claim took effect would arrive twice
            early.append(self._open_window(client_id))
        will_blob = b""
        delay = 0
        if will is not None:
            will_blob = safepickle.dumps(will_message(will, client_id))
            delay = will.properties.will_delay_interval or 0
        reply = yield self.backend.run("session_claim", self._keys(client_id), [
            self.node_id, int(clean_start), int(persistent),
            username or "", int(username is not None), int(self.allow_other_user),
            will_blob, delay, self.boot])
        if _text(reply[0]) == "OWNER":
            return (ReasonCode.NOT_AUTHORIZED, "client id owned by another user",
                    "session-owner")
        old_node, old_epoch = _text(reply[1]), int(reply[2])
        epoch, present, old_online = int(reply[3]), reply[4] == 1, _text(reply[5]) == "1"
        # expired on Redis's clock (its owner, maybe dead and not reaped, did
        # not end it yet): gone, as after a Clean Start -- its will is due
        expired = reply[6] == 1
        # another user's offline session: discarded as by a Clean Start,
        # never resumed (session ownership, REVIEW-S9 R17)
        replaced = reply[7] == 1
        ended = clean_start or expired or replaced
        old_will = _pairs(reply[8:])
        store.epochs[client_id] = epoch
        if connection in self._claims:
            self._claims[connection] = epoch
        self._stop_forwarding(client_id)
        yield self.backend.execute("SADD", node_sessions_key(self.prefix, self.node_id),
                                   client_id)
        if old_node and old_node != self.node_id:
            self.takeovers += 1
            alive = yield self.is_alive(old_node)
            if alive:
                # what reaches this node directly while the old owner lets go
                # is not forwarded by it: kept for the session until installed
                if present and not ended:
                    window.append(early.pop() if early else self._open_window(client_id))
                yield self._kick(old_node, client_id, epoch, ended)
            else:
                self._dead_owners_will(client_id, old_will, old_online, ended)
        elif expired and broker.sessions.get(client_id) is None \
                and client_id not in broker.wills:
            # ours by Redis, unknown here (an earlier incarnation's): its will
            # is due; a session still held here ends below (its own will)
            self._dead_owners_will(client_id, old_will, old_online, True)
        if self._kicked.get(client_id, 0) > epoch:
            return self._lost(client_id, epoch)
        local = broker.sessions.get(client_id)
        if present and not (old_node == self.node_id and local is not None):
            ok = yield self._load(client_id, epoch)
            if not ok:
                return self._lost(client_id, epoch)
        elif local is not None and (old_node != self.node_id or (
                not present and not clean_start and local.connection is None)):
            # Redis says the session is gone (expired, or someone else's):
            # the copy here must not be resumed
            broker.release_session(client_id, ended)
        if replaced and broker.sessions.get(client_id) is None:
            # (a copy still held here is discarded, counted and logged by open_session)
            broker.stats.sessions_replaced += 1
            broker.log_limiter.warn(
                log, (client_id, "session-replaced"),
                "Discarding offline session of {client_id} owned by another user: client "
                "id now used by {username!r} (session ownership)",
                client_id=client_id, username=username)
        if self._kicked.get(client_id, 0) > epoch or store.epochs.get(client_id) != epoch:
            return self._lost(client_id, epoch)
        if self._kicked.get(client_id, 0) <= epoch:
            self._kicked.pop(client_id, None)
        if old_node and old_node != self.node_id:
            # what the old owner forwarded after our load (its poke may have
            # come before the session was installed here)
            self.clock.callLater(1.0, self.pull, client_id)
        return None

    def refuse_claims(self, reason: str) -> int:
        """This node fenced itself: every CONNECT whose claim is in progress is
        refused now (v5 0x88 / v3 0x03); each claim finishes in the
        background and leaves its session offline (as for a client gone
        meanwhile).  Returns how many were refused."""
        answers, self._answers = self._answers, {}
        refused = 0
        for answer in answers.values():
            if not answer.called:
                refused += 1
                answer.callback((ReasonCode.SERVER_UNAVAILABLE,
                                 f"cluster node fenced: {reason}", "unavailable"))
        return refused

    def _lost(self, client_id: str, epoch: int):
        log.info("CONNECT of {client_id} lost its claim (epoch {epoch}) to a newer one "
                 "on another node", client_id=client_id, epoch=epoch)
        return (ReasonCode.SERVER_UNAVAILABLE, "session taken over on another node meanwhile",
                "claim-lost")

    def abandoned(self, client_id: str, connection) -> None:
        """The claiming connection went (or was refused) before its session opened."""
        if connection in self._claims:
            self._gone_early.add(connection)   # the claim finishes first
            return
        self._offline(client_id, self._refused.pop(connection, None))

    def _offline(self, client_id: str, epoch: Optional[int]) -> None:
        """Mark the session offline in Redis, if that claim still owns it and no
        newer connection of this node uses it."""
        if epoch is None or self.store.epochs.get(client_id) != epoch:
            return
        session = self.broker.sessions.get(client_id)
        if session is not None and session.connection is not None:
            return
        self.store.write(Disconnected(client_id))

    # --- takeover ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def _kick(self, node: str, client_id: str, epoch: int, clean_start: bool):
        d = self._done[(client_id, epoch)] = defer.Deferred()
        timer = self.clock.callLater(self.takeover_timeout, d.callback, False)
        try:
            yield self.send_control(node, {"op": "kick", "cid": client_id, "epoch": epoch,
                                           "from": self.node_id, "clean": int(clean_start)})
            answered = yield d
        finally:
            self._done.pop((client_id, epoch), None)
            if timer.active():
                timer.cancel()
        if answered is False:
            log.warn("Node {node} did not hand over the session of {client_id} within "
                     "{timeout} s; its writes are fenced (epoch {epoch})", node=node,
                     client_id=client_id, timeout=self.takeover_timeout, epoch=epoch)

    def handle_control(self, fields: Dict[str, object]) -> None:
        """A control message for this node (``kick``, ``done``, ``poke``)."""
        op = _text(fields.get("op", b""))
        client_id = _text(fields.get("cid", b""))
        if op == "kick":
            self._on_kick(client_id, int(fields["epoch"]), _text(fields["from"]),
                          _text(fields.get("clean", b"0")) == "1")
        elif op == "done":
            d = self._done.get((client_id, int(fields["epoch"])))
            if d is not None and not d.called:
                d.callback(True)
        elif op == "poke":
            self.pull(client_id)

    def _on_kick(self, client_id: str, epoch: int, claimant: str, clean: bool) -> None:
        store = self.store
        if self._kicked.get(client_id, 0) < epoch:
            self._kicked[client_id] = epoch
            # only a claim in progress now can be overtaken by this kick
            self.clock.callLater(60.0, self._forget_kick, client_id, epoch)
        mine = store.epochs.get(client_id)
        if mine is not None and mine >= epoch:
            return  # a stale kick: we claimed it again since
        session = self.broker.sessions.get(client_id)
        subscriptions = dict(session.subscriptions) if session is not None else {}
        if session is not None:
            log.info("Session {client_id} taken over by node {node}", client_id=client_id,
                     node=claimant)
            self.broker.release_session(client_id, clean)
            if subscriptions and not clean:
                self._forward(client_id, subscriptions, claimant)
        d = store.sync()

        def done(_):
            store.epochs.pop(client_id, None)
            return self.send_control(claimant, {"op": "done", "cid": client_id,
                                                "epoch": epoch, "from": self.node_id})
        d.addBoth(done)
        d.addErrback(lambda f: log.warn("Answering the kick of {client_id} failed: {error}",
                                        client_id=client_id, error=str(f.value)))
        self.backend.execute("SREM", node_sessions_key(self.prefix, self.node_id),
                             client_id).addErrback(lambda _f: None)

    def _forget_kick(self, client_id: str, epoch: int) -> None:
        if self._kicked.get(client_id) == epoch:
            del self._kicked[client_id]

    def _dead_owners_will(self, client_id, will: Dict[str, bytes], old_online: bool,
                          clean_start: bool) -> None:
        """The previous owner died: its client's will is ours to decide."""
        kind = _text(will.get("kind", b""))
        if not kind:
            return
        if kind == "conn" and old_online:
            delay = float(will.get("delay", b"0") or 0)
            if clean_start or not delay:
                self._publish_will(client_id, safepickle.loads(will["m"]))
        elif kind == "pending":
            record = safepickle.loads(will["m"])
            if clean_start or record.publish_at <= self.clock.seconds():
                self._publish_will(client_id, record.message)

    def _publish_will(self, client_id: str, message) -> None:
        try:
            self.broker._publish_will_now(client_id, message)
        except Exception:
            log.failure("Publishing the will of {client_id} failed", client_id=client_id)

    # --- loading ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _load(self, client_id: str, epoch: int):
        """Load the session from Redis and install it here; False if fenced."""
        reply = yield self.backend.run("session_load", self._keys(client_id),
                                       [self.node_id, epoch])
        if _text(reply[0]) == "F":
            return False
        stored = self.stored_session(client_id, reply[1], reply[3], reply[4], reply[5],
                                     reply[7], reply[8])
        self.store.load_instances(client_id, reply[5] if stored is not None else ())
        if stored is None:
            self.broker.release_session(client_id)
            return True
        # what the old owner queued after our claim: a message this node kept
        # for the session meanwhile may be one of them (see _deliver_window)
        handed = []
        for blob in (reply[6] if len(reply) > 6 else ()):
            try:
                handed.append(safepickle.loads(blob).message)
            except Exception as error:
                log.warn("Unreadable hand-off record of {client_id}: {error}",
                         client_id=client_id, error=str(error))
        self._handed[client_id] = handed
        self.broker.install_session(stored)
        # messages forwarded to the session by a node that lost it: queued
        # after what the session held, under this node's queue limits
        yield self.pull(client_id)
        return True

    @staticmethod
    def stored_session(client_id, rec, outbound, states, inbound, subs=(),
                       state=b"") -> Optional[R.StoredSession]:
        """A StoredSession from ``session_load``'s reply parts (None: no record).

        The record is ``rec`` (the pickled SessionRecord last written whole),
        then ``state`` (a pickled ``PutSessionState``, the fields written on
        (re)connect and close) and ``subs`` (the ``b`` hash as flat pairs:
        filter, pickled SubscriptionRecord -- or ``b''``, removed) applied by
        :func:`~mqttd.persistence.records.apply_op`, as a store replays its
        journal (see :mod:`mqttd.cluster.session_lua`).  An unreadable
        subscription is left out with a WARN line."""
        if not rec and not state:
            return None
        view = R.StoredState()
        if rec:
            R.apply_op(view, R.PutSession(safepickle.loads(rec)))
        if state:
            op = safepickle.loads(state)
            if not isinstance(op, R.PutSessionState):
                raise TypeError(f"not a session state: {type(op).__name__}")
            R.apply_op(view, op)
        if len(view.sessions) != 1:
            raise ValueError(f"session record and state of {client_id} disagree")
        stored = next(iter(view.sessions.values()))
        cid = stored.record.client_id
        for topic_filter, blob in _pairs(subs).items():
            if not blob:
                R.apply_op(view, R.DeleteSubscription(cid, topic_filter))
                continue
            try:
                sub = safepickle.loads(blob)
                if not isinstance(sub, R.SubscriptionRecord):
                    raise TypeError(f"not a subscription: {type(sub).__name__}")
            except Exception as error:
                log.warn("Unreadable subscription {filter!r} of {client_id}: {error}",
                         filter=topic_filter, client_id=client_id, error=str(error))
                continue
            R.apply_op(view, R.PutSubscription(cid, sub))
        states = _pairs(states)
        for seq, blob in _pairs(outbound).items():
            out = decode_outbound(seq, blob, states.get(seq))
            stored.outbound[out.seq] = out
        stored.inbound_qos2.update(parse_inbound(member)[0] for member in inbound)
        return stored

    # --- forwarding what still reaches a node that gave a session away -------------------

    def forward_moved(self, client_id: str, subscriptions, owner: str) -> bool:
        """Forward to ``owner`` what reaches this node for ``client_id``'s
        ``subscriptions`` ({filter: subscription record}) for
        ``forward_grace`` seconds (at least twice ``takeover_timeout``: the
        claim may wait that long for the dead owner), as a node that gave
        the session away does.

        The reaper of a dead node calls it for each of the node's sessions
        another node owns now, before it resets the dead node's routes: a
        claim still in progress there (waiting for the dead owner's answer
        to its kick) has not installed the session yet, so without these
        routes no node had any for it and what publishers sent meanwhile was
        acknowledged and dropped (REVIEW-S9-CLUSTER C4/C5).  What the new
        owner's node also got directly is not forwarded again.  False (and
        nothing done) if the session is installed here or this node already
        forwards it."""
        if not owner or owner == self.node_id or client_id in self._forwarding \
                or client_id in self.broker.sessions:
            return False
        self._forward(client_id, subscriptions, owner,
                      max(self.forward_grace, 2 * self.takeover_timeout))
        return True

    def _forward(self, client_id: str, subscriptions, claimant: str = "",
                 grace: Optional[float] = None) -> None:
        unsubscribers = []
        installing = [True]
        also_sent_to = self.also_sent_to

        def forward(message, sub=None):
            if installing[0]:
                return  # retained messages replayed by subscribe_local itself
            qos = min(sub.qos, message.qos)
            if not qos:
                return
            if claimant and also_sent_to is not None and also_sent_to(claimant, message):
                return  # the new owner's node got it directly: no second copy
            self.forwarded += 1
            record = R.OutboundRecord(0, message, qos)
            self.store.write(Forward(client_id, record))
        for topic_filter, sub in subscriptions.items():
            if topic_filter.startswith("$share/"):
                continue
            unsubscribers.append(self.broker.subscribe_local(
                topic_filter, lambda m, sub=sub: forward(m, sub), qos=sub.qos))
        installing[0] = False
        self._forwarding[client_id] = unsubscribers
        self.clock.callLater(self.forward_grace if grace is None else grace,
                             self._stop_forwarding, client_id, unsubscribers)

    def _open_window(self, client_id: str):
        """Start keeping what this node delivers (messages published here, and
        inbox entries) until ``client_id``'s session is installed here:
        ``(messages, stop functions)``."""
        from mqttd.messages import SYS_ORIGIN
        messages = []
        stops = []
        sessions = self.broker.sessions

        def keep(message, *_args, **_fields):
            if message.qos and message.origin is not SYS_ORIGIN \
                    and client_id not in sessions and len(messages) < WINDOW_MAX:
                messages.append(message)
        stops.append(self.broker.on("published", lambda message=None, **_f: keep(message)))
        router = self.router
        if router is not None:
            router.dispatch_observers.append(keep)
            stops.append(lambda: router.dispatch_observers.remove(keep)
                         if keep in router.dispatch_observers else None)
        return messages, stops

    @staticmethod
    def _close_window(window) -> list:
        messages, stops = window
        for stop in stops:
            stop()
        return messages

    def _deliver_window(self, client_id: str, messages) -> None:
        """Deliver into the session installed here what reached this node
        directly during the takeover (the old owner did not forward those):
        once, at the highest QoS of its matching subscriptions."""
        from mqttd import topics
        broker = self.broker
        handed = self._handed.pop(client_id, [])
        session = broker.sessions.get(client_id)
        if session is None or not messages:
            return
        # a message the old owner still queued during the hand-off and this
        # node kept too is in the session already: each queued copy cancels
        # one kept copy of the same publish (topic, payload, publisher,
        # expiry), so identical messages published twice still arrive twice
        already = Counter(_identity(m) for m in handed)
        for message in messages:
            key = _identity(message)
            if already[key] > 0:
                already[key] -= 1
                continue
            best = None
            for topic_filter, sub in session.subscriptions.items():
                if topic_filter.startswith(topics.SHARE_PREFIX):
                    continue   # a group's copy went to one member already
                if sub.no_local and message.origin == client_id:
                    continue
                if topics.matches(topic_filter, message.topic) and (
                        best is None or sub.qos > best.qos):
                    best = sub
            if best is None:
                continue
            qos = min(best.qos, message.qos)
            if not qos:
                continue
            out = message
            if message.retain and not best.retain_as_published:
                import attrs
                out = attrs.evolve(message, retain=False)
            broker._deliver(session, out, qos)
        if session.connection is not None:
            broker.drain(session)

    def _stop_forwarding(self, client_id: str, only=None) -> None:
        unsubscribers = self._forwarding.get(client_id)
        if unsubscribers is None or (only is not None and unsubscribers is not only):
            return
        del self._forwarding[client_id]
        for unsubscribe in unsubscribers:
            unsubscribe()

    def _fenced(self, client_id: str, node: str, epoch: int, forwarded: int) -> None:
        """Redis refused a write: another node owns the session now."""
        mine = self.store.epochs.get(client_id)
        if node == self.node_id and mine is not None and mine == epoch:
            return  # our own newer claim overtook an older batch (same node)
        if mine is not None and mine < epoch:
            self.store.epochs.pop(client_id, None)
            session = self.broker.sessions.get(client_id)
            if session is not None:
                log.warn("Session {client_id} is owned by node {node} (epoch {epoch}); "
                         "closing it here", client_id=client_id, node=node, epoch=epoch)
                self._let_go(client_id, node)
        if forwarded and node:
            self.send_control(node, {"op": "poke", "cid": client_id}).addErrback(
                lambda f: log.warn("Poking {node} failed: {error}", node=node,
                                   error=str(f.value)))

    def _let_go(self, client_id: str, owner: str) -> bool:
        """Release ``client_id``'s session here: ``owner`` (another node, or
        '' when the session is gone) holds it now.  Like a node that was
        kicked, this one forwards what still reaches it for the session's
        filters for ``forward_grace`` seconds -- inbox entries and publishers
        whose route cache still names this node -- instead of dropping them
        (REVIEW-CLUSTER F7: a node back from a Redis outage whose session a
        reaper adopted meanwhile dropped a window of acknowledged messages).
        True if a session was installed here."""
        session = self.broker.sessions.get(client_id)
        if session is None:
            return False
        subscriptions = dict(session.subscriptions) if session.persistent else {}
        self.broker.release_session(client_id)
        if subscriptions and owner and owner != self.node_id \
                and client_id not in self._forwarding:
            self._forward(client_id, subscriptions, owner)
        return True

    def _gone(self, client_id: str) -> None:
        self.backend.execute("SREM", node_sessions_key(self.prefix, self.node_id),
                             client_id).addErrback(lambda _f: None)

    # --- the owner takes what was forwarded ---------------------------------------------

    def pull(self, client_id: str) -> Optional[defer.Deferred]:
        """Move messages forwarded to ``client_id``'s session into it (owner only).

        A pull whose reply was lost (a timeout: Redis may have moved the
        messages into the session's queue under the seqs reserved for it) is
        not simply forgotten: the next pull first takes, from the queue in
        Redis, the messages under those seqs that the session does not know
        (REVIEW-CLUSTER F13's kind: they stayed there, undelivered, until the
        session's next load)."""
        session = self.broker.sessions.get(client_id)
        epoch = self.store.epochs.get(client_id)
        if session is None or epoch is None:
            return None
        lost = self._lost_pulls.pop(client_id, None)
        if lost:
            d = self._recover_pulls(client_id, session, lost)
            d.addErrback(lambda f: (self._lost_pulls.setdefault(client_id, []).extend(lost),
                                    log.warn("Recovering forwarded messages of {client_id} "
                                             "failed: {error}", client_id=client_id,
                                             error=str(f.value))))
            return d.addCallback(lambda _: self._pull(client_id, session, epoch))
        return self._pull(client_id, session, epoch)

    @defer.inlineCallbacks
    def _recover_pulls(self, client_id: str, session, bases):
        keys = self._keys(client_id)
        fields = yield self.backend.execute("HKEYS", keys[1])
        known = {r.seq for r in session.queue} | {r.seq for r in session.inflight.values()}
        seqs = sorted(int(f) for f in fields if any(
            base <= int(f) < base + PULL_BATCH for base in bases) and int(f) not in known)
        if not seqs:
            return 0
        blobs = yield self.backend.execute("HMGET", keys[1], *seqs)
        if self.broker.sessions.get(client_id) is not session:
            return 0
        found = 0
        for seq, blob in zip(seqs, blobs):
            if blob is not None:
                self._queue_forwarded(session, decode_outbound(seq, blob))
                found += 1
        if found and session.connection is not None:
            self.broker.drain(session)
        return found

    def _pull(self, client_id: str, session, epoch: int) -> defer.Deferred:
        base = session.next_seq()
        session.restore_seq(base + PULL_BATCH)
        d = self.backend.run("session_pull", self._keys(client_id),
                             [self.node_id, epoch, base, PULL_BATCH])

        def pulled(reply):
            if _text(reply[0]) != "OK" or self.broker.sessions.get(client_id) is not session:
                return
            items = reply[1:]
            for i in range(0, len(items) - 1, 2):
                self._queue_forwarded(session, decode_outbound(items[i], items[i + 1]))
            if session.connection is not None:
                self.broker.drain(session)
            if len(items) // 2 >= PULL_BATCH:
                return self.pull(client_id)
        d.addCallback(pulled)

        def failed(failure):
            log.warn("Taking forwarded messages of {client_id} failed: {error}",
                     client_id=client_id, error=str(failure.value))
            if failure.check(BackendError) and not failure.check(RedisReplyError):
                # the outcome is unknown: the messages may be in the queue now
                self._lost_pulls.setdefault(client_id, []).append(base)
                self.clock.callLater(1.0, self.pull, client_id)
        d.addErrback(failed)
        return d

    def _queue_forwarded(self, session, out) -> None:
        """Queue one pulled message (already stored under ``out.seq``) as the
        broker queues a routed one: ``--max-queued-messages``,
        ``--max-queued-bytes`` and ``--max-queued-bytes-total`` with the
        overflow policy; a message dropped is counted and logged as on one
        node (``queue-full`` / ``queued-bytes-total``) and deleted from Redis."""
        broker = self.broker
        victim = session.enqueue(out, broker._limits)
        if victim is None:
            return
        if session.overflow == "queued-bytes-total":
            broker._total_cap_hit()
        broker.count_dropped(session, session.overflow, victim.message)
        session.wire.pop(victim.seq, None)
        if victim.qos and session.persistent:
            broker._write(R.DeleteOutbound(session.client_id, victim.seq))

    @defer.inlineCallbacks
    def recheck_ownership(self):
        """After this node was away from Redis (a new incarnation): let go of
        every session another node adopted meanwhile."""
        cids = list(self.store.epochs)
        if not cids:
            return 0
        replies = yield self.backend.pipeline(
            [("HMGET", self._keys(cid)[0], "node", "epoch") for cid in cids])
        released = 0
        for cid, (node, epoch) in zip(cids, replies):
            if _text(node or b"") != self.node_id or int(epoch or 0) != \
                    self.store.epochs.get(cid):
                self.store.epochs.pop(cid, None)
                if self._let_go(cid, _text(node or b"")):
                    released += 1
        if released:
            log.warn("{count} sessions were adopted by other nodes while this node was "
                     "away from Redis; released here", count=released)
        return released

    # --- connections ending -------------------------------------------------------------

    def _disconnected(self, client=None, reason=None, **_fields) -> None:
        if client is None or reason == "takeover":
            return
        client_id = client.client_id
        if client_id in self.store.epochs:
            # a fenced node closed the connection without deciding on its
            # will: whoever owns the session when Redis answers does
            self.store.write(Disconnected(client_id, take_will=reason == FENCED_REASON))

    # --- wills of connections a fenced node closed -----------------------------------

    def _will_taken(self, client_id: str, will: Dict[str, bytes]) -> None:
        """A ``Disconnected(take_will=True)`` reached Redis while this node still
        owned the session: the will of the connection it closed when fenced is
        this node's to publish -- at once, or, for a persistent session, after
        its Will Delay Interval counted from the disconnect (pending like any
        delayed will: cancelled if the client resumes first [MQTT-3.1.3-9])."""
        if _text(will.get("kind", b"")) != "conn":
            return
        message = safepickle.loads(will["m"])
        delay = float(will.get("delay", b"0") or 0)
        session = self.broker.sessions.get(client_id)
        if session is not None and session.persistent and delay > 0:
            if session.expiry_interval is not None:
                delay = min(delay, session.expiry_interval)
            if session.disconnected_at is not None:
                delay -= self.clock.seconds() - session.disconnected_at
            if delay > 0 and session.connection is None:
                self.broker.wills.schedule(client_id, message, delay, durable=True)
                return
            if session.connection is not None:
                return   # resumed before its delay ran out: cancelled
        self._owed_wills.append((client_id, message))
        if not self.is_fenced():
            self.unfenced()

    def unfenced(self) -> None:
        """This node reaches Redis and the others again: publish the wills due
        that it took back while it could not forward them."""
        owed, self._owed_wills = self._owed_wills, []
        for client_id, message in owed:
            self.wills_published += 1
            self._publish_will(client_id, message)
