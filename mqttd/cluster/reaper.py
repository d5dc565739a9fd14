"""When a node dies: its clients' wills, its sessions, its unprocessed inbox.

A node is dead when its heartbeat key expired (:mod:`mqttd.cluster.node`).
Every live node looks; the first to win ``SET <prefix>{n:<dead>}:reaper <me>
NX PX <lock_ms>`` reaps it (renewing the lock while it works), so each dead
node is reaped once:

1. every client id in the dead node's session set goes through
   ``session_adopt`` (one script on that session's keys):

   * a session that moved on (its client reconnected elsewhere) is skipped;
   * a non-persistent session ends: its keys are deleted and the will its
     connection left is published -- by this node only, once; so does a
     persistent session that expired on Redis's clock (its pending will is
     due);
   * a persistent session becomes this node's (epoch + 1, offline): it is
     loaded and installed in the local broker, whose subscriptions make this
     node its route; its expiry timer starts; the will of a connection that
     was online goes out now, or after its Will Delay Interval (pending
     here, and cancelled if the client resumes first [MQTT-3.1.3-9]);

2. the dead node's inbox: entries it read but never acknowledged and
   entries never read are delivered to the adopted sessions
   (``replay_inbox``, provided by the bus), so no message a publisher got
   PUBACK for is lost; a message delivered twice is the at-least-once
   duplicate QoS 1 allows;

3. its route set is reset (the others stop routing to it) and, after a
   short settle time for route caches, the inbox is read once more and
   deleted (:class:`InboxReplay`).
"""
from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from mqttd.persistence import safepickle
from mqttd.cluster.session_lua import node_sessions_key, session_keys

log = Logger(namespace="mqttd.cluster.reaper")

__all__ = ["Reaper"]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Reaper:
    """Reaps dead nodes (see the module docstring).

    :param sessions: the node's :class:`~mqttd.cluster.sessions.ClusterSessions`.
    :param replay_inbox: ``replay_inbox(dead_node, deliver, sync) -> Deferred``
        firing with how many envelopes it replayed: hand every unacknowledged
        and unread envelope of the dead node's inbox to ``deliver(message)``
        and acknowledge (or delete) them only once the Deferred of ``sync()``
        fired (the deliveries are then in Redis); None: no inbox to replay.
    :param forget_node: ``forget_node(dead_node, deliver, sync) -> Deferred``
        firing with how many late envelopes it still delivered: drop the dead
        node's routes and inbox (None: nothing).
    :param lock_ms: milliseconds the reaper lock lasts (renewed while reaping).
    """

    def __init__(self, sessions, replay_inbox: Optional[Callable] = None,
                 forget_node: Optional[Callable] = None, lock_ms: int = 30000,
                 batch: int = 200):
        self.sessions = sessions
        self.broker = sessions.broker
        self.backend = sessions.backend
        self.store = sessions.store
        self.node_id = sessions.node_id
        self.prefix = sessions.prefix
        self.clock = sessions.clock
        self.replay_inbox = replay_inbox
        self.forget_node = forget_node
        self.lock_ms = lock_ms
        self.batch = batch
        self._reaping = set()
        self._live_boot = b""
        self.backend.register("reaper_unlock", UNLOCK)
        self.adopted = 0
        self.ended = 0
        self.wills = 0
        self.replayed = 0

    def lock_key(self, node: str) -> str:
        return f"{self.prefix}{{n:{node}}}:reaper"

    def alive_key(self, node: str) -> str:
        return f"{self.prefix}{{n:{node}}}:alive"

    def reap(self, node: str) -> defer.Deferred:
        """Reap ``node`` if no one else does; fires with True if this node did."""
        if node == self.node_id or node in self._reaping:
            return defer.succeed(False)
        self._reaping.add(node)
        d = self._reap(node)

        def done(result):
            self._reaping.discard(node)
            return result
        d.addBoth(done)
        d.addErrback(lambda f: (log.error("Reaping node {node} failed: {error}; another "
                                          "look will retry", node=node,
                                          error=str(f.value)), False)[1])
        return d

    @defer.inlineCallbacks
    def _reap(self, node: str):
        won = yield self.backend.execute("SET", self.lock_key(node), self.node_id, "NX",
                                         "PX", self.lock_ms)
        if not won:
            return False
        # the node id may be back as a new incarnation: its sessions stay its own
        live_boot = yield self.backend.execute("GET", self.alive_key(node))
        self._live_boot = live_boot or b""
        log.info("Node {node} is dead; reaping it (its wills, sessions and inbox)",
                 node=node)
        renew = self.clock.callLater(self.lock_ms / 3000.0, self._renew, node)
        self._renew_calls = {node: renew}
        try:
            adopted = yield self._adopt_all(node)
            if self.replay_inbox is not None:
                replayed = yield self.replay_inbox(node, self.deliver_to(adopted),
                                                   self.store.sync)
                self.replayed += replayed or 0
            yield self.store.sync()
            if self.forget_node is not None:
                late = yield self.forget_node(node, self.deliver_to(adopted),
                                              self.store.sync)
                self.replayed += late or 0
            if not self._live_boot:
                # no longer a member: the others stop looking at it
                yield self.backend.execute("SREM", f"{self.prefix}nodes", node)
            yield self.backend.execute("DEL", node_sessions_key(self.prefix, node))
        finally:
            call = self._renew_calls.pop(node, None)
            if call is not None and call.active():
                call.cancel()
        yield self.backend.run("reaper_unlock", [self.lock_key(node)], [self.node_id])
        log.info("Reaped node {node}: {adopted} sessions adopted", node=node,
                 adopted=len(adopted))
        return True

    def _renew(self, node: str) -> None:
        self.backend.execute("SET", self.lock_key(node), self.node_id, "PX",
                             self.lock_ms).addErrback(lambda _f: None)
        self._renew_calls[node] = self.clock.callLater(self.lock_ms / 3000.0, self._renew,
                                                        node)

    @defer.inlineCallbacks
    def _adopt_all(self, node: str):
        key = node_sessions_key(self.prefix, node)
        adopted = set()
        cursor = b"0"
        while True:
            reply = yield self.backend.execute("SSCAN", key, cursor, "COUNT", self.batch)
            cursor, members = reply[0], reply[1]
            for member in members:
                client_id = _text(member)
                # never side by side with a claim of the same client here
                done = yield self.sessions.exclusive(client_id, self._adopt, node, client_id)
                if done:
                    adopted.add(client_id)
            if _text(cursor) == "0":
                break
        return adopted

    @defer.inlineCallbacks
    def _adopt(self, node: str, client_id: str):
        reply = yield self.backend.run("session_adopt", session_keys(self.prefix, client_id),
                                       [node, self.node_id, self._live_boot,
                                        self.sessions.boot])
        status = _text(reply[0])
        if status == "skip":
            return False
        if status == "ended":
            self.ended += 1
            will = _pairs(reply[1:])
            if _text(will.get("kind", b"")) == "conn":
                self._publish(client_id, safepickle.loads(will["m"]))
            elif will.get("m"):
                self._publish(client_id, safepickle.loads(will["m"]).message)
            return False
        epoch, online = int(reply[1]), _text(reply[2]) == "1"
        will = _pairs(reply[3:])
        self.store.epochs[client_id] = epoch
        yield self.backend.execute("SADD", node_sessions_key(self.prefix, self.node_id),
                                   client_id)
        loaded = yield self.backend.run("session_load", session_keys(self.prefix, client_id),
                                        [self.node_id, epoch])
        if _text(loaded[0]) == "F" or self.store.epochs.get(client_id) != epoch:
            # claimed meanwhile (a kick from another node): not ours to install
            if self.store.epochs.get(client_id) == epoch:
                del self.store.epochs[client_id]
            return False
        stored = self.sessions.stored_session(client_id, loaded[1], loaded[3], loaded[4],
                                              loaded[5])
        if stored is None:
            return False
        pending = None
        kind = _text(will.get("kind", b""))
        if kind == "conn" and online:
            message = safepickle.loads(will["m"])
            delay = int(will.get("delay", b"0") or 0)
            expiry = stored.record.expiry_interval
            if expiry is not None:
                delay = min(delay, expiry)
            if delay <= 0:
                self._publish(client_id, message)
            else:
                from mqttd.persistence.records import WillRecord, PutWill
                pending = WillRecord(client_id, message, self.clock.seconds() + delay, True)
                self.store.write(PutWill(pending))
        elif kind == "pending":
            pending = safepickle.loads(will["m"])
            from mqttd.persistence.records import PutWill
            self.store.write(PutWill(pending))
        if online:
            import attrs
            stored.record = attrs.evolve(stored.record,
                                         disconnected_at=self.clock.seconds())
        self.broker.install_session(stored, pending)
        # what a node that lost the session forwarded to it, under the queue limits
        yield self.sessions.pull(client_id)
        self.adopted += 1
        return True

    def _publish(self, client_id: str, message) -> None:
        self.wills += 1
        try:
            self.broker._publish_will_now(client_id, message)
        except Exception:
            log.failure("Publishing the will of {client_id} failed", client_id=client_id)

    def deliver_to(self, adopted: set) -> Callable:
        """``deliver(message)``: one replayed envelope to the adopted sessions
        whose subscriptions match it (once per session, at the highest QoS of
        its matching subscriptions, at most the message's)."""
        from mqttd import topics
        broker = self.broker

        def deliver(message, only_shares=None) -> int:
            receivers = 0
            for client_id in adopted:
                session = broker.sessions.get(client_id)
                if session is None:
                    continue
                best = None
                for topic_filter, sub in session.subscriptions.items():
                    if topic_filter.startswith(topics.SHARE_PREFIX):
                        # a group's copy went to the node the publisher picked
                        if only_shares is None or topic_filter not in only_shares:
                            continue
                        _group, plain = topics.parse_shared(topic_filter)
                    else:
                        if only_shares is not None and not only_shares:
                            continue   # an entry for shared groups only
                        plain = topic_filter
                    if sub.no_local and message.origin == client_id:
                        continue
                    if topics.matches(plain, message.topic) and (
                            best is None or sub.qos > best.qos):
                        best = sub
                if best is None:
                    continue
                qos = min(best.qos, message.qos)
                out = message
                if message.retain and not best.retain_as_published:
                    import attrs
                    out = attrs.evolve(message, retain=False)
                broker._deliver(session, out, qos)
                receivers += 1
            return receivers
        return deliver


class InboxReplay:
    """The dead node's inbox, replayed into the sessions the reaper adopted.

    Entries the dead node read but never acknowledged are claimed with
    ``XAUTOCLAIM`` (group ``mqttd``), entries it never read are read with
    ``XREADGROUP ... >`` as this node; each batch is delivered, made durable
    (``sync``) and only then acknowledged.  Then the dead node's route set is
    reset (a ``reset`` feed entry: the others stop sending to it), and after
    ``settle`` seconds -- what publishers with a route cache not yet updated
    still sent -- the inbox is read once more and deleted.
    """

    def __init__(self, backend, keys, node_id: str, clock, batch: int = 500,
                 settle: float = 2.0):
        self.backend = backend
        self.keys = keys
        self.node_id = node_id
        self.clock = clock
        self.batch = batch
        self.settle = settle

    @defer.inlineCallbacks
    def replay(self, dead: str, deliver, sync):
        from mqttd.cluster.bus import GROUP
        inbox = self.keys.inbox(dead)
        count = 0
        cursor = b"0-0"
        while True:
            try:
                reply = yield self.backend.execute("XAUTOCLAIM", inbox, GROUP, self.node_id,
                                                   0, cursor, "COUNT", self.batch)
            except Exception as error:
                if "NOGROUP" in str(error) or "no such key" in str(error):
                    return count   # no inbox (it never joined, or was deleted)
                raise
            cursor, entries = reply[0], reply[1]
            count += yield self._batch(inbox, entries, deliver, sync)
            if _text(cursor) == "0-0":
                break
        count += yield self._unread(inbox, deliver, sync)
        return count

    @defer.inlineCallbacks
    def _unread(self, inbox, deliver, sync):
        from mqttd.cluster.bus import GROUP
        count = 0
        while True:
            reply = yield self.backend.execute("XREADGROUP", "GROUP", GROUP, self.node_id,
                                               "COUNT", self.batch, "STREAMS", inbox, ">")
            entries = []
            for _stream, items in (reply or []):
                entries.extend(items)
            if not entries:
                return count
            count += yield self._batch(inbox, entries, deliver, sync)

    @defer.inlineCallbacks
    def _batch(self, inbox, entries, deliver, sync):
        from mqttd.cluster.bus import GROUP, SEP, EnvelopeError, decode_envelope
        ids = []
        for entry in entries:
            entry_id, fields = entry[0], entry[1]
            ids.append(entry_id)
            if not fields:
                continue
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2]))
            try:
                message = decode_envelope(fields.get(b"e"))
            except (EnvelopeError, TypeError) as error:
                log.warn("Dropping entry {id} of a dead node's inbox: {error}",
                         id=entry_id, error=str(error))
                continue
            share = fields.get(b"s")
            only = None
            if share is not None:
                share = share.decode("utf-8")
                only = frozenset(share.split(SEP)) if share else frozenset()
            try:
                deliver(message, only)
            except Exception:
                log.failure("Replaying a message to {topic} failed", topic=message.topic)
        if ids:
            yield sync()
            yield self.backend.execute("XACK", inbox, GROUP, *ids)
        return len(ids)

    @defer.inlineCallbacks
    def forget(self, dead: str, deliver, sync):
        """Reset the dead node's routes, wait, take what still came, delete its inbox.

        A node id that is alive again (restarted meanwhile: its heartbeat key
        is back) keeps its routes and its inbox: they are its new
        incarnation's."""
        from mqttd.cluster.routes import RESET_OP
        if (yield self._back(dead)):
            return 0
        version = yield self.backend.execute("INCR", self.keys.route_version(dead))
        yield self.backend.execute("DEL", self.keys.routes(dead))
        yield self.backend.execute("XADD", self.keys.route_feed(), "MAXLEN", "~", 100000,
                                   "*", "n", dead, "v", version, "o", RESET_OP)
        yield _sleep(self.clock, self.settle)
        late = yield self._unread(self.keys.inbox(dead), deliver, sync)
        if not (yield self._back(dead)):
            yield self.backend.execute("DEL", self.keys.inbox(dead))
        return late

    def _back(self, node: str) -> defer.Deferred:
        return self.backend.execute("EXISTS", self.keys.alive(node)).addCallback(bool)


def _sleep(clock, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


#: release the reaper lock only if we still hold it
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _pairs(flat):
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
