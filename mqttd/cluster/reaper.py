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
   entries never read are delivered to the sessions whose subscriptions
   they were routed for (``replay_inbox``, provided by the bus), wherever
   each session is now: the adopted ones and those claimed on this node
   directly, those its client already resumed on another node (a client
   behind a load balancer reconnects before the reaper runs) through the
   session's ``f`` list and a ``poke`` to its owner (as a node that gave a
   session away forwards), so no message a publisher got PUBACK for is
   lost; an entry is acknowledged only once what it caused is in Redis; a
   message delivered twice is the at-least-once duplicate QoS 1 allows;

3. its route set is reset (the others stop routing to it) and, after a
   short settle time for route caches, the inbox is read once more and
   deleted (:class:`InboxReplay`).
"""
from __future__ import annotations

import bisect
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
    :param lock_ms: milliseconds the reaper lock lasts (renewed every third of
        it while the reap makes progress; default 10,000): the longest a lock
        outlives a reaper that died or lost Redis mid-reap, and so the longest
        the dead node id is kept out after that.
    :param retry_delay: seconds after a failed reap (its lock released at
        once) before this node reaps again; doubled after each failure up to
        ``retry_max`` seconds.
    :param stall: seconds a reap may go without progress (a session adopted,
        an inbox entry replayed, a write made durable, a step done) before it
        is abandoned: its lock is no longer renewed but released, an ERROR is
        logged, and the next look (this node's or another's) reaps again --
        each step is idempotent (REVIEW-CLUSTER F15: a hung reap renewed its
        lock forever, so the node was never reaped).
    """

    def __init__(self, sessions, replay_inbox: Optional[Callable] = None,
                 forget_node: Optional[Callable] = None, lock_ms: int = 10000,
                 batch: int = 200, stall: float = 30.0, retry_delay: float = 1.0,
                 retry_max: float = 16.0):
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
        self.stall = stall
        self._reaping = set()
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        #: node -> the next retry's delay / its pending call (after a failed reap)
        self._retry_delays = {}
        self._retry_calls = {}
        self.retries = 0
        #: node being reaped -> the reap's Deferred / when it last made progress
        self._running = {}
        self._progress = {}
        self.abandoned = 0
        #: wills held by recover_own until the node serves (None: publish)
        self._held_wills = None
        #: node being reaped -> the timer renewing its reaper lock
        self._renew_calls = {}
        #: node being reaped -> client ids no longer its (off its session list)
        self._reaped_ids = {}
        #: node being reaped -> the set its adopted sessions join when installed
        self._installing = {}
        #: node being reaped -> the boot id of its live incarnation (b"": none)
        self._live_boots = {}
        self.backend.register("reaper_lock", LOCK)
        self.backend.register("reaper_unlock", UNLOCK)
        self.backend.register("reaper_release", RELEASE)
        self.backend.register("reaper_renew", RENEW)
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
        if node == self.node_id or node in self._reaping or self.sessions.is_fenced():
            # a fenced node reaps no one: it may be the one cut off
            return defer.succeed(False)
        self._reaping.add(node)
        d = self._reap(node)
        if not d.called:
            self._running[node] = d

        def done(result):
            self._reaping.discard(node)
            self._running.pop(node, None)
            self._progress.pop(node, None)
            return result

        def failed(failure):
            if failure.check(defer.CancelledError):
                self.abandoned += 1
                log.error("Reaping node {node} made no progress for {stall:g} s; abandoned "
                          "and its lock released: another look reaps it again",
                          node=node, stall=self.stall)
                self.backend.run("reaper_unlock", [self.lock_key(node)],
                                 [self.node_id]).addErrback(lambda _f: None)
            else:
                log.error("Reaping node {node} failed: {error}; its lock released, retrying "
                          "in {delay:g} s", node=node, error=str(failure.value),
                          delay=self._retry_delay(node))
                # the lock goes with the failed reap: held until its TTL it
                # kept the dead node id out (CONNACK 0x88) and this node's own
                # next look from reaping it (REVIEW-S9-CLUSTER C7)
                self.backend.run("reaper_unlock", [self.lock_key(node)],
                                 [self.node_id]).addErrback(lambda _f: None)
            self._schedule_retry(node)
            return False

        def succeeded(result):
            if result:
                self._forget_retries(node)
            return result
        d.addBoth(done)
        d.addCallbacks(succeeded, failed)
        return d

    def _retry_delay(self, node: str) -> float:
        return self._retry_delays.get(node, self.retry_delay)

    def _schedule_retry(self, node: str) -> None:
        """Reap ``node`` again after a failed or abandoned reap: after
        ``retry_delay`` seconds, doubling up to ``retry_max`` (the periodic look
        for dead members goes on too); a reap that runs, succeeds, or is not
        this node's to do ends the retries."""
        call = self._retry_calls.get(node)
        if call is not None and call.active():
            return
        delay = self._retry_delay(node)
        self._retry_delays[node] = min(delay * 2, self.retry_max)
        self._retry_calls[node] = self.clock.callLater(delay, self._retry, node)

    def _retry(self, node: str) -> None:
        self._retry_calls.pop(node, None)
        if node in self._reaping:
            return
        self.retries += 1
        d = self.reap(node)
        # not ours to do (another node reaps it, or we are fenced): no more retries
        d.addCallback(lambda won: None if won or node in self._retry_calls
                      else self._forget_retries(node))

    def _forget_retries(self, node: str) -> None:
        self._retry_delays.pop(node, None)
        call = self._retry_calls.pop(node, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self) -> None:
        """No more retries (the node is stopping)."""
        for node in list(self._retry_calls):
            self._forget_retries(node)

    def _advanced(self, node: str) -> None:
        """The reap of ``node`` made progress (the lock may be renewed)."""
        if node in self._progress:
            self._progress[node] = self.clock.seconds()

    def _tracked_sync(self, node: str) -> Callable:
        def sync():
            d = defer.maybeDeferred(self.store.sync)
            # a group's message handed on to another node is in Redis too
            router = getattr(self.broker, "router", None)
            handed = router.sync() if router is not None else None
            if handed is not None:
                from mqttd.durability import both
                d = both(d, handed)
            d.addCallback(lambda r: (self._advanced(node), r)[1])
            return d
        return sync

    @defer.inlineCallbacks
    def _reap(self, node: str):
        # the lock and the look at the node's alive key in one script, which
        # only a primary runs: a connection left on a demoted primary (a
        # Sentinel failover) must not make a live node look dead
        won = yield self.backend.run("reaper_lock", [self.lock_key(node),
                                                     self.alive_key(node)],
                                     [self.node_id, self.lock_ms])
        if not won:
            return False
        if self.sessions.is_fenced():
            yield self.backend.run("reaper_unlock", [self.lock_key(node)], [self.node_id])
            return False
        # the node id may be back as a new incarnation: its sessions stay its own
        live_boot = won[1]
        self._live_boots[node] = live_boot or b""
        log.info("Node {node} is dead; reaping it (its wills, sessions and inbox)",
                 node=node)
        self._progress[node] = self.clock.seconds()
        self._renew_calls[node] = self.clock.callLater(self.lock_ms / 3000.0, self._renew,
                                                       node)
        sync = self._tracked_sync(node)
        seen = _SeenSinceAdoption(self.broker, node)
        try:
            adopted, moved = yield self._adopt_all(node, seen.adopted)
            # the dead node's sessions its clients resumed elsewhere before we came
            targets = yield self._moved_targets(node, moved, adopted)
            # ... keep a route to them here before the dead node's routes go
            # (their new owner may still be claiming them: no routes yet)
            yield self._hold_routes(targets, moved)
            # a node id alive again (a new incarnation joined before this
            # reap took the lock) owns its inbox: the entries it read are in
            # its hands, the unread ones its reader takes next, for the
            # sessions its clients resumed there.  Taking them here handed
            # them to the sessions this reap adopted only -- the live node's
            # were lost (REVIEW-CLUSTER F7).  What its previous incarnation's
            # sessions (now adopted here) still get there reaches them
            # through the live node's fenced writes and forwarding.
            live = bool(self._live_boots.get(node))
            marks = yield self._inbox_marks(node, adopted, targets)
            if self.replay_inbox is not None and not live:
                replayed = yield self.replay_inbox(
                    node, self.deliver_once(adopted, targets, node, marks, seen), sync)
                self.replayed += replayed or 0
            yield sync()
            if self.forget_node is not None and not live:
                late = yield self.forget_node(
                    node, self.deliver_once(adopted, targets, node, marks, seen), sync)
                self.replayed += late or 0
            # the dead incarnation's session list goes -- unless the node id is
            # alive again (a new incarnation: its list is its own; only what
            # was reaped leaves it); checked in Redis at the moment of the change
            gone = yield self.backend.run(
                "reaper_release", [self.alive_key(node), node_sessions_key(self.prefix, node)],
                list(self._reaped_ids.get(node, ())))
            if gone:
                # no longer a member: the others stop looking at it (a node
                # that comes back adds itself again: node.py)
                yield self.backend.execute("SREM", f"{self.prefix}nodes", node)
        finally:
            seen.stop()
            self._installing.pop(node, None)
            self._live_boots.pop(node, None)
            self._reaped_ids.pop(node, None)
            call = self._renew_calls.pop(node, None)
            if call is not None and call.active():
                call.cancel()
        yield self.backend.run("reaper_unlock", [self.lock_key(node)], [self.node_id])
        log.info("Reaped node {node}: {adopted} sessions adopted", node=node,
                 adopted=len(adopted))
        return True

    def recover_own(self) -> defer.Deferred:
        """Take over what a previous incarnation of this node id left behind,
        before this node serves (``Node.recover``; REVIEW-CLUSTER F14).

        A node restarted with the same ``--node-id`` right after a kill -9
        re-joins before any reaper noticed the death: the sessions Redis
        still says are this node's (``<prefix>{n:<id>}:sessions``), with
        their routes, and the entries its inbox holds (read and never
        acknowledged, or never read) are the previous incarnation's.  This is
        the reap of that incarnation by the new one, under the same reaper
        lock: every such session is adopted (epoch + 1, loaded, installed, so
        its subscriptions become this node's routes *before* the route set is
        written), the wills of its dead connections are published once the
        node serves, and the inbox is replayed into the adopted sessions and
        acknowledged only once they are durable.  Nothing is wiped that was
        not handed on.

        Fires with the number of sessions adopted; fails (the node stays
        fenced and retries) while another node's reaper holds the lock, when
        Redis fails, or when it made no progress for ``stall`` seconds."""
        node = self.node_id
        d = self._recover_own()
        if d.called:
            return d
        self._running[node] = d
        self._progress[node] = self.clock.seconds()
        self._renew_calls[node] = self.clock.callLater(self.lock_ms / 3000.0, self._renew,
                                                       node)

        def done(result):
            self._running.pop(node, None)
            self._progress.pop(node, None)
            call = self._renew_calls.pop(node, None)
            if call is not None and call.active():
                call.cancel()
            return result
        return d.addBoth(done)

    @defer.inlineCallbacks
    def _recover_own(self):
        from mqttd.cluster.backend import BackendError
        node = self.node_id
        won = yield self.backend.execute("SET", self.lock_key(node), self.node_id, "NX",
                                         "PX", self.lock_ms)
        if not won:
            holder = yield self.backend.execute("GET", self.lock_key(node))
            raise BackendError(f"node {_text(holder or b'?')} is reaping the previous "
                               f"incarnation of {node}")
        boot = self.sessions.boot
        if self._held_wills is None:
            self._held_wills = []    # kept across a retry: ended sessions' wills are here only
        try:
            # sessions already of this incarnation (none yet: it is fenced) stay
            self._live_boots[node] = boot.encode() if isinstance(boot, str) else boot
            adopted, moved = yield self._adopt_all(node)
            targets = yield self._moved_targets(node, moved, adopted)
            # a route to them in the set this node writes when it serves (the
            # previous incarnation's set, theirs included, is replaced then)
            yield self._hold_routes(targets, moved, wait=False)
            if self.replay_inbox is not None:
                marks = yield self._inbox_marks(node, adopted, targets)
                replayed = yield self.replay_inbox(
                    node, self.deliver_once(adopted, targets, node, marks),
                    self._tracked_sync(node))
                self.replayed += replayed or 0
            yield self.store.sync()
            # what moved on or ended leaves this node's session list (it is alive)
            yield self.backend.run(
                "reaper_release", [self.alive_key(node), node_sessions_key(self.prefix, node)],
                list(self._reaped_ids.get(node, ())))
        finally:
            self._live_boots.pop(node, None)
            self._reaped_ids.pop(node, None)
            yield self.backend.run("reaper_unlock", [self.lock_key(node)], [self.node_id])
        if adopted or self._held_wills:
            log.info("Node {node} took over {adopted} sessions of its previous incarnation",
                     node=node, adopted=len(adopted))
        return len(adopted)

    def release_wills(self) -> None:
        """Publish the wills :meth:`recover_own` held until the node serves
        (a will published while fenced would reach no other node)."""
        self._release_wills()

    def _release_wills(self) -> None:
        held, self._held_wills = self._held_wills, None
        for client_id, message in held or ():
            self._publish(client_id, message)

    def _renew(self, node: str) -> None:
        if node not in self._renew_calls:
            return
        last = self._progress.get(node)
        if last is not None and self.clock.seconds() - last >= self.stall:
            # stuck (a call or a sync that never answers): no renewal; the
            # reap is cancelled and its lock released (reap(): failed)
            self._renew_calls.pop(node, None)
            running = self._running.get(node)
            if running is not None:
                running.cancel()
            return
        if self.sessions.is_fenced() and node != self.node_id:
            # cut off from Redis ourselves: let the lock lapse, so the node can
            # re-join (the reap's remaining steps check it is still dead)
            self._renew_calls.pop(node, None)
            return
        self.backend.run("reaper_renew", [self.lock_key(node)],
                         [self.node_id, self.lock_ms]).addErrback(lambda _f: None)
        self._renew_calls[node] = self.clock.callLater(self.lock_ms / 3000.0, self._renew,
                                                        node)

    @defer.inlineCallbacks
    def _adopt_all(self, node: str, installed: Optional[set] = None):
        """``(adopted, moved)``: the sessions of ``node`` adopted here, and
        {client id: owner} of those another node owns now; ``installed``
        gets each adopted client id the moment it is installed here."""
        key = node_sessions_key(self.prefix, node)
        if installed is not None:
            self._installing[node] = installed
        adopted = set()
        moved = {}
        self._reaped_ids[node] = []
        cursor = b"0"
        while True:
            reply = yield self.backend.execute("SSCAN", key, cursor, "COUNT", self.batch)
            cursor, members = reply[0], reply[1]
            for member in members:
                client_id = _text(member)
                # never side by side with a claim of the same client here
                done = yield self.sessions.exclusive(client_id, self._adopt, node, client_id)
                self._advanced(node)
                if done is True:
                    adopted.add(client_id)
                elif isinstance(done, str) and done:
                    if done == self.node_id:
                        # ours already (adopted by an earlier, abandoned reap, or
                        # resumed here): the dead node's entries are due to it
                        if client_id in self.broker.sessions:
                            adopted.add(client_id)
                    elif done != node:
                        moved[client_id] = done
            if _text(cursor) == "0":
                break
        return adopted, moved

    @defer.inlineCallbacks
    def _moved_targets(self, node: str, moved: dict, adopted: set):
        """{client id: subscriptions} of the dead node's sessions that another
        node (or this one, by a CONNECT) owns now: the inbox entries routed to
        the dead node for them must follow them [issue 10 §4]."""
        targets = {}
        for client_id, owner in moved.items():
            if owner == self.node_id:
                # claimed here: delivered into the local session like an adopted one
                if client_id in self.broker.sessions:
                    adopted.add(client_id)
                continue
            keys = session_keys(self.prefix, client_id)
            rec, state = yield self.backend.execute("HMGET", keys[0], "rec", "st")
            if not rec and not state:
                continue   # not persistent (any more): nothing is owed to it
            subs = yield self.backend.execute("HGETALL", keys[6])
            try:
                stored = self.sessions.stored_session(client_id, rec, (), (), (),
                                                      _flat(subs), state or b"")
            except Exception as error:
                log.warn("Unreadable session record of {client_id}: {error}",
                         client_id=client_id, error=str(error))
                continue
            targets[client_id] = {sub.topic_filter: sub
                                  for sub in stored.record.subscriptions}
        return targets

    @defer.inlineCallbacks
    def _hold_routes(self, targets: dict, moved: dict, wait: bool = True):
        """Forward, for a while, what reaches this node for the subscriptions
        of the dead node's sessions that moved to other nodes
        (:meth:`ClusterSessions.forward_moved`), and wait until those routes
        are in Redis: the route feed then has them before the ``reset`` of
        the dead node's routes, so no publisher is left with no route to a
        session whose claim is still in progress elsewhere.  ``wait=False``
        (a node recovering its own previous incarnation, fenced: its route
        set, these routes included, is written when it serves)."""
        forward = getattr(self.sessions, "forward_moved", None)
        if forward is None or not targets:
            return
        since = self.broker.write_count
        held = [client_id for client_id, subscriptions in targets.items()
                if forward(client_id, subscriptions, moved.get(client_id, ""))]
        if held and wait:
            barrier = self.broker.barrier(since)
            if barrier is not None:
                yield barrier

    @defer.inlineCallbacks
    def _adopt(self, node: str, client_id: str):
        reply = yield self.backend.run("session_adopt", session_keys(self.prefix, client_id),
                                       [node, self.node_id, self._live_boots.get(node, b""),
                                        self.sessions.boot])
        status = _text(reply[0])
        if status != "skip" or _text(reply[1]) != node:
            # not (or no longer) the dead node's: off its list
            self._reaped_ids.setdefault(node, []).append(client_id)
        if status == "skip":
            # ours already (adopted by an earlier, abandoned reap, or resumed
            # here) or moved on: its current owner (for the inbox replay;
            # this node's own sessions count as adopted, see _moved_targets)
            return _text(reply[1]) if len(reply) > 1 else ""
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
                                              loaded[5], loaded[7], loaded[8])
        if stored is None:
            return False
        self.store.load_instances(client_id, loaded[5])
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
        installed = self._installing.get(node)
        if installed is not None:
            installed.add(client_id)    # from now on it gets what is published here
        # what a node that lost the session forwarded to it, under the queue limits
        yield self.sessions.pull(client_id)
        self.adopted += 1
        return True

    def _publish(self, client_id: str, message) -> None:
        if self._held_wills is not None:
            self._held_wills.append((client_id, message))
            return
        self.wills += 1
        try:
            self.broker._publish_will_now(client_id, message)
        except Exception:
            log.failure("Publishing the will of {client_id} failed", client_id=client_id)

    @defer.inlineCallbacks
    def _inbox_marks(self, node: str, adopted: set, moved: dict):
        """{client id: position} -- how far into ``node``'s inbox each of the
        sessions the replay serves already took QoS 2 messages (``ib:<node>``
        of the session, written by ``node`` with each QoS 2 record it queued
        from its inbox): what ``node`` read, delivered and had not yet
        acknowledged when it died is not replayed to them as a new message."""
        from mqttd.cluster.bus import position_key
        client_ids = sorted(set(adopted) | set(moved))
        if not client_ids:
            return {}
        field = f"ib:{node}"
        replies = yield self.backend.pipeline(
            [("HGET", session_keys(self.prefix, cid)[0], field) for cid in client_ids])
        return {cid: position_key(reply) for cid, reply in zip(client_ids, replies)
                if reply}

    def deliver_once(self, adopted: set, moved: Optional[dict], node: Optional[str],
                     marks: dict, seen: Optional[_SeenSinceAdoption] = None) -> Callable:
        """``deliver(message, only_shares=None, position=None)``: as
        :meth:`deliver_to`, but a QoS 2 message at an inbox ``position`` a
        session already took (``marks``: :meth:`_inbox_marks`) is not delivered
        to that session again [MQTT-4.3.3]: it has the message (queued, in
        flight -- resent with DUP and its packet id, or its PUBREL -- or
        completed); nor is a message the session got on this node after its
        adoption (``seen``: :class:`_SeenSinceAdoption`)."""
        from mqttd.cluster.bus import position_key
        full = self.deliver_to(adopted, moved, node)
        moved = moved or {}

        def deliver(message, only_shares=None, position=None) -> int:
            done = set()
            if marks and position is not None and message.qos == 2:
                at = position_key(position)
                done = {cid for cid, mark in marks.items() if mark >= at}
            if seen is not None:
                done |= seen.take(set(adopted) - done, message)
            if not done:
                return full(message, only_shares)
            return self.deliver_to(
                set(adopted) - done,
                {cid: subs for cid, subs in moved.items() if cid not in done},
                node)(message, only_shares)
        return deliver

    def deliver_to(self, adopted: set, moved: Optional[dict] = None,
                   node: Optional[str] = None) -> Callable:
        """``deliver(message, only_shares=None)``: one replayed envelope, routed
        by the broker core's own judgement (matching, No Local, overlapping
        subscriptions merged to the highest QoS with every identifier, Retain
        As Published, read permission): into the adopted (local) sessions and
        the shared groups the envelope names (``Broker.deliver_among``), and,
        as a forward (``f`` list of the session, then a ``poke`` to its
        owner), to the sessions of ``moved`` (client id -> {filter:
        subscription record}) now owned by other nodes (``Broker.judge``;
        QoS 0 is not owed to them).  A shared group the envelope names that
        no *connected* member here can take goes to its members on another
        live node (``Router.reroute_share``: online members first, as on one
        broker; an offline session adopted here does not keep it from a
        connected member elsewhere); with no other node it is served here
        (an offline persistent member queues it) or, with no member here
        either, counted as dropped.  A group copy another node handed on to
        the dead node (marked ``~``) is owed to the group the same way.
        Both are in Redis once ``store.sync()`` fired.  ``node``: the reaped
        node (never picked again for a group), whose reap makes progress with
        each envelope (the lock's renewal needs it)."""
        from mqttd.persistence import records as R
        from mqttd.cluster.bus import REROUTED
        from mqttd.cluster.store import Forward
        broker = self.broker
        moved = moved or {}

        reroute = getattr(broker.router, "reroute_share", None)
        online = getattr(broker, "share_online", None)
        tried = (node,) if node is not None and node != self.node_id else ()

        def deliver(message, only_shares=None) -> int:
            if node is not None:
                self._advanced(node)
            receivers = 0
            if only_shares:
                # a group copy handed on to the dead node by another (marked
                # REROUTED) never reached a member there either: it is owed
                # to the group like any other
                only_shares = frozenset(share[len(REROUTED):] if share.startswith(REROUTED)
                                        else share for share in only_shares)
                rest = only_shares
                if reroute is not None and online is not None:
                    # a group with no connected member here goes to a live node
                    # with members (one may be connected there), not into an
                    # offline session adopted here (REVIEW-S9-CLUSTER C6)
                    handed = set(share for share in only_shares if not online(share)
                                 and reroute(share, message, tried, live_only=True))
                    if handed:
                        receivers += len(handed)
                        rest = only_shares - handed
            else:
                rest = only_shares
            served = set() if rest else None
            if adopted or rest:
                receivers += broker.deliver_among(message, adopted, rest, served)
            if rest:
                # a group the dead node was picked for and no member here can
                # take: to its members on another node, once (as the bus does)
                for share in rest:
                    if share not in served:
                        if reroute is not None and reroute(share, message, tried):
                            receivers += 1
                        else:
                            broker.stats.count_drop("shared-no-member")
            for client_id, subscriptions in moved.items():
                # (a group copy handed on above is not owed to them as well)
                judged = broker.judge(message, subscriptions, client_id, rest)
                if judged is None or not judged[1]:
                    continue
                self.store.write(Forward(client_id, R.OutboundRecord(0, *judged)))
                receivers += 1
            return receivers
        return deliver


def _identity(message):
    """What tells one message from another for :class:`_SeenSinceAdoption`
    (two messages alike in all of it are the same to every subscriber)."""
    try:
        return hash((message.topic, message.payload, message.origin, message.retain,
                     message.properties))
    except TypeError:
        return hash((message.topic, message.payload, message.origin, message.retain,
                     repr(message.properties)))


class _Installed(set):
    """The sessions adopted so far, each with its place in adoption order."""

    def __init__(self):
        super().__init__()
        self.order: dict = {}

    def add(self, client_id) -> None:
        if client_id not in self.order:
            self.order[client_id] = len(self.order)
        super().add(client_id)


class _SeenSinceAdoption:
    """The messages the sessions adopted from ``dead`` got here *after* their
    adoption although they went to ``dead`` too -- published on this node, or
    dispatched from its inbox, while route caches (this node's included) still
    sent to the dead node: its inbox holds them as well, and replaying them
    delivered them twice (a new message each time, QoS 2 included).  Each such
    message is noted with how many sessions were installed then (O(1) per
    message, however many sessions the reap adopts); the replay skips, per
    session and identity (topic, payload, publisher, retain, properties), as
    many copies as were noted after that session's installation."""

    def __init__(self, broker, dead: str):
        self.dead = dead
        self.router = broker.router
        self.adopted = _Installed()
        #: identity -> the number of installed sessions at each copy noted
        self.noted: dict = {}
        #: (client id, identity) -> copies the replay skipped for it so far
        self.used: dict = {}
        self._unobserve = broker.on("published", self._published)
        observers = getattr(self.router, "dispatch_observers", None)
        self._observers = observers
        if observers is not None:
            observers.append(self._dispatched)

    def stop(self) -> None:
        self._unobserve()
        if self._observers is not None and self._dispatched in self._observers:
            self._observers.remove(self._dispatched)

    def _published(self, message, client=None) -> None:
        also = getattr(self.router, "also_sent_to", None)
        if self.adopted and also is not None and also(self.dead, message):
            self._note(message)

    def _dispatched(self, message, targets) -> None:
        if self.adopted and targets and self.dead in targets:
            self._note(message)

    def _note(self, message) -> None:
        self.noted.setdefault(_identity(message), []).append(len(self.adopted.order))

    def take(self, client_ids, message) -> set:
        """The sessions of ``client_ids`` that got ``message`` here already
        (one copy each is used up)."""
        if not self.noted:
            return set()
        key = _identity(message)
        noted = self.noted.get(key)
        if not noted:
            return set()
        order = self.adopted.order
        taken = set()
        for client_id in client_ids:
            place = order.get(client_id)
            if place is None:
                continue
            # copies noted while this session was installed (counts grow)
            got = len(noted) - bisect.bisect_right(noted, place)
            used = self.used.get((client_id, key), 0)
            if used < got:
                self.used[(client_id, key)] = used + 1
                taken.add(client_id)
        return taken


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
        backend.register("reaper_reset_routes", RESET_ROUTES)
        backend.register("reaper_del_inbox", DEL_INBOX)

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
                if _missing_inbox(error):
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
            try:
                reply = yield self.backend.execute("XREADGROUP", "GROUP", GROUP, self.node_id,
                                                   "COUNT", self.batch, "STREAMS", inbox, ">")
            except Exception as error:
                if _missing_inbox(error):
                    # gone meanwhile (deleted, or re-created without its
                    # group by a late XADD): nothing of the dead node's to read
                    # (REVIEW-S9-CLUSTER C7: NOGROUP failed the reap)
                    return count
                raise
            entries = []
            for _stream, items in (reply or []):
                entries.extend(items)
            if not entries:
                return count
            count += yield self._batch(inbox, entries, deliver, sync)

    @defer.inlineCallbacks
    def _batch(self, inbox, entries, deliver, sync):
        from mqttd.cluster.bus import GROUP, decode_entry, position
        ids = []
        for entry in entries:
            entry_id, fields = entry[0], entry[1]
            ids.append(entry_id)
            if not fields:
                continue
            messages, errors = decode_entry(fields)
            for error in errors:
                log.warn("Dropping an envelope of entry {id} of a dead node's inbox: {error}",
                         id=entry_id, error=error)
            for index, (message, only, _targets) in enumerate(messages):
                try:
                    deliver(message, only, position(entry_id, index))
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
        alive = self.keys.alive(dead)
        # each change checks in Redis, in the same script, that the node id is
        # still dead (the reaper lock keeps it from re-joining meanwhile)
        version = yield self.backend.run("reaper_reset_routes", [
            alive, self.keys.routes(dead), self.keys.route_version(dead),
            self.keys.route_applied(dead)])
        if not version:
            return 0
        yield self.backend.execute("XADD", self.keys.route_feed(), "MAXLEN", "~", 100000,
                                   "*", "n", dead, "v", version, "o", RESET_OP)
        yield _sleep(self.clock, self.settle)
        late = yield self._unread(self.keys.inbox(dead), deliver, sync)
        yield self.backend.run("reaper_del_inbox", [alive, self.keys.inbox(dead)])
        return late


def _missing_inbox(error) -> bool:
    """Whether a Redis error says the inbox stream or its group is not there."""
    text = str(error)
    return "NOGROUP" in text or "no such key" in text.lower()


def _sleep(clock, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


#: the end of a reap (KEYS alive, the dead node's session list; ARGV the
#: client ids reaped): if the node id is not alive the list goes and 1 says
#: "remove it from the members"; if it is alive again (a new incarnation) only
#: the reaped ids leave its list and 0 keeps it a member
RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return 1
end
for i = 1, #ARGV, 500 do
  redis.call('SREM', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
return 0
"""

#: KEYS alive, routes, route version, route feed position: a dead node's
#: routes (and its acknowledged feed position) go, and its version is bumped
#: for the ``reset`` feed entry, only if it is still dead; false if it is
#: alive again
RESET_ROUTES = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('DEL', KEYS[2], KEYS[4])
return redis.call('INCR', KEYS[3])
"""

#: KEYS alive, inbox: a dead node's inbox goes only if it is still dead
DEL_INBOX = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('DEL', KEYS[2])
"""

#: renew the reaper lock only if we still hold it (never take over another's)
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS lock, alive  ARGV me, ms: take the reaper lock; false if someone holds
#: it, else {1, the node id's live boot id or ''} (a shebang: replicas refuse it)
LOCK = """#!lua
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return {1, redis.call('GET', KEYS[2]) or ''}
"""

#: release the reaper lock only if we still hold it
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _pairs(flat):
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _flat(reply) -> list:
    """An ``HGETALL`` reply (a dict, or a flat list) as a flat list of pairs."""
    if isinstance(reply, dict):
        return [x for pair in reply.items() for x in pair]
    return list(reply or ())
