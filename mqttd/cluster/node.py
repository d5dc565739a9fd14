"""Node membership: identity, heartbeat, liveness of the others, self-fencing.

Each node has a stable **node id** (``--node-id``, default ``HOSTNAME-PID``)
and a random **boot id** per incarnation.  Its heartbeat is the key
``mqttd:{n:<id>}:alive`` holding the boot id with a TTL of ``ttl`` seconds
(Redis's own clock expires it: no clock skew between nodes matters), renewed
every ``heartbeat`` seconds.  The set ``mqttd:nodes`` lists the members; a
member whose ``alive`` key is gone is dead (the reaper of
:mod:`mqttd.cluster.reaper` takes over its clients).

**Self-fencing.**  A node that has not had a heartbeat acknowledged for
``ttl - heartbeat`` seconds (measured from when the acknowledged call was
*sent*, so before its key can have expired in Redis) fences itself: the
listeners refuse CONNECT (v5 0x88 Server unavailable, v3 rc 3) and its
clients are disconnected (v5 0x89 Server busy), because the others are about
to declare it dead and adopt its sessions.  The fence is a timer of its own,
re-armed by every acknowledgement: it fires whatever the Redis calls do
(refused, failing or hanging), and the heartbeat ticks every ``heartbeat``
seconds whether or not the previous round trip came back (a round still out
-- each call is bounded by the backend's timeout -- is not doubled).  An
acknowledgement older than the fence delay proves nothing about now and
unfences nothing.  When Redis answers again it re-joins: with the same boot
id if its key survived (a short hiccup), else as a new incarnation (new boot
id) -- once no reaper is taking over its previous incarnation (the join
waits while ``<prefix>{n:<id>}:reaper`` is held) -- telling its listeners to
re-publish what the others may have reaped (routes, inbox consumer group).
Every acknowledged heartbeat also starts a look at the other nodes (not
waited for: their keys live on every master of a Redis Cluster, and one hung
master must not delay this node's own heartbeat into a fence), which checks
its membership in ``mqttd:nodes`` and adds itself back if it is missing, so
the set heals whatever removed it; a peer whose alive key cannot be read is
kept as last seen (neither down nor dead).

Timing: the key of the last acknowledged heartbeat sent at ``t`` lives until
at least ``t + ttl`` (Redis renewed it on receipt, after ``t``); the node
fences at ``t + ttl - heartbeat``; the others reap it only once the key is
gone, so a node is fenced at least ``heartbeat`` seconds before anyone can
reap it.
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd.cluster.backend import BackendError
from mqttd.cluster.keys import Keys
from mqttd.ratelimit import LogRateLimiter

log = Logger(namespace="mqttd.cluster.node")

_NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# The membership scripts start with a shebang (Redis >= 7): Redis then knows
# before running one that it may write, and a replica refuses it (READONLY)
# instead of answering the read-only branch from its own data.  A connection
# left on a demoted primary after a Sentinel failover made a heartbeat read
# "my key is gone" from the replica's stale data set: the node fenced and
# re-joined as a new incarnation although it was alive on the primary.
# The heartbeat and the leave only extend or delete a key: ``allow-oom`` lets
# them run on a full Redis (``maxmemory`` with noeviction), as PEXPIRE and DEL
# do, so a full Redis does not make every node fence itself.

JOIN = """#!lua
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  return {0, cur, redis.call('PTTL', KEYS[1])}
end
if not cur then
  -- a reaper is taking over a previous incarnation of this node id: join
  -- once it is done, so nothing it reaps can be this incarnation's
  local reaper = redis.call('GET', KEYS[3])
  if reaper then return {2, reaper, redis.call('PTTL', KEYS[3])} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local prev = redis.call('HGET', KEYS[2], 'boot')
redis.call('HSET', KEYS[2], 'boot', ARGV[1], 'started', ARGV[3], 'host', ARGV[4],
           'pid', ARGV[5])
return {1, prev or false}
"""

BEAT = """#!lua flags=allow-oom
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then return 0 end
return -1
"""

LEAVE = """#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def check_node_id(value: str) -> str:
    """``value`` if it is a valid node id: 1-64 of ``[A-Za-z0-9._-]``.

    :raises ValueError: one line saying what is allowed.
    """
    if not isinstance(value, str) or not _NODE_ID.match(value):
        raise ValueError(f"a node id is 1 to 64 characters of A-Z a-z 0-9 . _ -, "
                         f"got {value!r}")
    return value


def default_node_id() -> str:
    """``HOSTNAME-PID`` with characters outside ``[A-Za-z0-9._-]`` as ``-``
    (unique per process on a machine; give ``--node-id`` for a stable name)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname() or "mqttd")
    suffix = f"-{os.getpid()}"
    return host[:64 - len(suffix)] + suffix


class Node:
    """This node's membership in the cluster.

    :param backend: a :class:`~mqttd.cluster.backend.Backend`.
    :param clock: ``IReactorTime``.
    :param node_id: this node's id (see :func:`check_node_id`).
    :param heartbeat: seconds between heartbeats (> 0).
    :param ttl: seconds a heartbeat keeps the node alive (>= 2 heartbeats).

    Listeners (lists of callables, called in the reactor thread):
    ``fenced(reason)``, ``unfenced()``, ``rejoined(old_boot, new_boot)``
    (this node lost its membership and joined as a new incarnation),
    ``peer_up(node, boot)``, ``peer_down(node, boot)`` (a peer's alive key
    vanished or its boot id changed: that incarnation is dead).
    """

    def __init__(self, backend, clock, node_id: str, heartbeat: float = 1.0,
                 ttl: float = 5.0, keys: Keys = Keys()):
        if heartbeat <= 0 or ttl < 2 * heartbeat:
            raise ValueError("heartbeat > 0 and ttl >= 2 * heartbeat are required")
        self.backend = backend
        self.clock = clock
        self.node_id = check_node_id(node_id)
        self.heartbeat = float(heartbeat)
        self.ttl = float(ttl)
        self.keys = keys
        self.boot_id = _new_boot()
        #: the boot id of this node id's previous incarnation (None: first start)
        self.previous_boot: Optional[bytes] = None
        #: fenced: not a member that may serve clients (True until joined)
        self.fenced = True
        self.fence_reason = "joining the cluster"
        self.joined = False
        #: other nodes' boot ids, of those alive at the last look
        self.peers: Dict[str, bytes] = {}
        #: counters for $SYS and metrics
        self.stats = {"heartbeats": 0, "heartbeat_failures": 0, "fences": 0, "rejoins": 0,
                      "membership_repairs": 0}
        self.log_limiter = LogRateLimiter(clock, interval=10.0, burst=1, reason_burst=None)
        self.listeners: Dict[str, List[Callable]] = {
            "fenced": [], "unfenced": [], "rejoined": [], "peer_up": [], "peer_down": []}
        self._last_ok_sent: Optional[float] = None
        self._call = None
        self._fence_call = None
        self._busy = False
        self._looking = False
        self._following: Optional[defer.Deferred] = None
        self._stopped = False
        self._blocked_since: Optional[float] = None
        #: ``recover() -> Deferred``, run once after the first join of this
        #: process, before the node serves (it stays fenced until it fired):
        #: takes over what a previous incarnation of this node id left behind
        #: (its sessions, its inbox) when no reaper did -- e.g. a restart after
        #: kill -9 with the same --node-id.  A failure is retried after the
        #: next acknowledged heartbeat.
        self.recover: Optional[Callable[[], defer.Deferred]] = None
        self._recovered = False
        self._recovering = False
        #: the boot id this node had before it lost its membership (until re-joined)
        self._rejoining: Optional[str] = None
        backend.register("node-join", JOIN)
        backend.register("node-beat", BEAT)
        backend.register("node-leave", LEAVE)

    @property
    def fence_after(self) -> float:
        """Seconds without an acknowledged heartbeat after which this node fences."""
        return self.ttl - self.heartbeat

    def on(self, event: str, callback: Callable) -> None:
        self.listeners[event].append(callback)

    def _tell(self, event: str, *args) -> None:
        for callback in list(self.listeners[event]):
            try:
                callback(*args)
            except Exception:
                log.failure("Cluster node listener {callback!r} failed on {event}",
                            callback=callback, event=event)

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start joining and heartbeating (the first tick runs at once)."""
        self._stopped = False
        self._schedule(0)

    def stop(self, leave: bool = True) -> defer.Deferred:
        """Stop heartbeating and delete the alive key, so the others see this
        node gone at once, not after the TTL.  ``leave``: also stop being a
        member (nothing of this node is left for a reaper to adopt); else it
        stays a dead member until the reaper took over its sessions."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        self._fence_call = None
        if not self.joined:
            return defer.succeed(None)
        self.joined = False
        d = self.backend.run("node-leave", [self.keys.alive(self.node_id)], [self.boot_id])
        if leave:
            d.addCallback(lambda _: self.backend.execute("SREM", self.keys.nodes(),
                                                         self.node_id))
        d.addCallback(lambda _: log.info("Node {node_id} {what} the cluster",
                                         node_id=self.node_id,
                                         what="left" if leave else "stopped; it stays a "
                                         "member for the reaper to adopt its sessions from"))
        d.addErrback(lambda f: log.warn("Node {node_id} could not leave the cluster cleanly "
                                        "({error}); the others see it dead after {ttl} s",
                                        node_id=self.node_id, error=str(f.value),
                                        ttl=self.ttl))
        return d

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._call = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        # the next tick comes whatever this round does: a call that hangs
        # delays neither the ticks nor the fence (its own timer)
        self._schedule(self.heartbeat)
        self._check_fence()
        if not self._busy:   # else the previous round trip is still out (bounded)
            self._busy = True
            d = self._join() if not self.joined else self._beat()
            d.addErrback(self._failed)
            d.addBoth(self._round_done)

    def _round_done(self, _):
        self._busy = False
        self._check_fence()

    def _look(self) -> None:
        """Look at the other nodes, started right after an acknowledged
        heartbeat (or join) but not waited for by it: the look reads keys of
        every node, which under Redis Cluster live on every master, and one
        hung master must not hold back this node's own heartbeat
        (REVIEW-S9-CLUSTER C3: nodes whose keys were all on healthy masters
        fenced themselves, then were reaped).  One look at a time; none while
        fenced (a node that may be cut off reaps no one, so the change is
        seen -- and acted on -- at the first look after the fence)."""
        if self._looking or not self.joined or self.fenced or self._stopped:
            return
        self._looking = True
        d = self._look_at_peers()

        def failed(failure):
            if not failure.check(BackendError):
                log.failure("Looking at the other cluster nodes failed", failure)
                return None
            self.log_limiter.emit(
                log.warn, "peers", "Node {node_id} cannot look at the other nodes: {error} "
                "(its own heartbeat goes on; their state is kept as last seen)",
                node_id=self.node_id, error=str(failure.value))
            return None

        def done(_):
            self._looking = False
        d.addErrback(failed)
        d.addBoth(done)

    # --- joining --------------------------------------------------------------------

    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    @defer.inlineCallbacks
    def _join(self):
        keys = [self.keys.alive(self.node_id), self.keys.info(self.node_id),
                self.keys.reaper(self.node_id)]
        sent = self.clock.seconds()
        reply = yield self.backend.run(
            "node-join", keys, [self.boot_id, self._ttl_ms(), int(time.time()),
                                socket.gethostname(), os.getpid()])
        if reply[0] == 2:
            self.log_limiter.emit(
                log.warn, "node-being-reaped",
                "Node {node_id} is being reaped by {reaper} (its previous incarnation was "
                "declared dead); joining when that is done (at most {pttl} ms)",
                node_id=self.node_id, reaper=_text(reply[1]), pttl=reply[2])
            return
        if reply[0] == 0:
            holder, pttl = reply[1], reply[2]
            now = self.clock.seconds()
            if self._blocked_since is None:
                self._blocked_since = now
            # the previous incarnation's key outlives a kill -9 by < ttl; longer
            # means a running node has this id
            if now - self._blocked_since > self.ttl + self.heartbeat:
                self.log_limiter.emit(
                    log.error, "node-id-in-use",
                    "Node id {node_id} is in use by another running node (boot {holder}); "
                    "this node stays fenced: give each node its own --node-id",
                    node_id=self.node_id, holder=_text(holder))
            else:
                self.log_limiter.emit(
                    log.info, "node-id-wait",
                    "Node id {node_id} still alive as boot {holder} (a previous run of this "
                    "node?); waiting up to {pttl} ms for it to expire",
                    node_id=self.node_id, holder=_text(holder), pttl=pttl)
            return
        self._blocked_since = None
        yield self.backend.execute("SADD", self.keys.nodes(), self.node_id)
        if not self.joined:
            prev = reply[1] if len(reply) > 1 else None
            if prev and prev != self.boot_id.encode():
                self.previous_boot = prev
        self.joined = True
        self._ok(sent)
        log.info("Node {node_id} joined the cluster at {url} (boot {boot})",
                 node_id=self.node_id, url=self.backend.url.redacted(), boot=self.boot_id)
        if self._rejoining is not None:
            old, self._rejoining = self._rejoining, None
            self._tell("rejoined", old, self.boot_id)
        self._look()

    # --- heartbeat ------------------------------------------------------------------

    @defer.inlineCallbacks
    def _beat(self):
        sent = self.clock.seconds()
        following = self._follow()   # Sentinel: the primary may have moved
        if following is not None:
            yield following
        reply = yield self.backend.run("node-beat", [self.keys.alive(self.node_id)],
                                       [self.boot_id, self._ttl_ms()])
        if reply != 1:
            # our key expired (we were out of touch longer than the TTL and the
            # others may have reaped us) or another process took our id
            old = self.boot_id
            self.boot_id = _new_boot()
            self.joined = False
            self.stats["rejoins"] += 1
            self._fence("this node's membership expired in Redis; re-joining as a new "
                        "incarnation")
            log.warn("Node {node_id} lost its membership (boot {old} {why}); re-joining as "
                     "boot {new}", node_id=self.node_id, old=old, new=self.boot_id,
                     why="expired" if reply == 0 else "taken by another process")
            self._rejoining = old
            yield self._join()
            return
        self._ok(sent)
        self._look()

    def _follow(self) -> Optional[defer.Deferred]:
        """Sentinel: ask which server is the primary now, so that this beat
        goes to it; None when there is nothing to wait for (not Sentinel, or
        answered at once).  Waited for at most half a heartbeat, never
        failing: the Sentinels are not this node's heartbeat, and one that
        hangs (each is asked, at once) must not hold the beat back until the
        node fences itself (the kind of REVIEW-S9-CLUSTER C3).  The question
        stays out meanwhile (one at a time); the next beat follows its answer."""
        if self._following is None:
            d = self.backend.follow_primary()
            if d is None:
                return None
            self._following = d

            def done(result):
                self._following = None
                if isinstance(result, Failure):
                    if result.check(BackendError):
                        # no Sentinel answers: go on with the primary we know
                        self.log_limiter.emit(
                            log.warn, "sentinel", "Cannot ask the Redis Sentinels for the "
                            "primary: {error}", error=str(result.value))
                    else:
                        log.failure("Asking the Redis Sentinels for the primary failed",
                                    result)
                return None
            d.addBoth(done)
            if self._following is None:     # answered at once
                return None
        waiter = defer.Deferred()

        def release(_=None):
            if timer.active():
                timer.cancel()
            if not waiter.called:
                waiter.callback(None)
        timer = self.clock.callLater(self.heartbeat / 2, release)
        self._following.addBoth(lambda result: (release(), result)[1])
        return waiter

    def _ok(self, sent: float) -> None:
        """Redis acknowledged the heartbeat (or join) call sent at ``sent``."""
        self.stats["heartbeats"] += 1
        if self._last_ok_sent is None or sent > self._last_ok_sent:
            self._last_ok_sent = sent
        left = self._last_ok_sent + self.fence_after - self.clock.seconds()
        if left <= 0:
            # a late answer (the link hung): it proves nothing about now
            self._check_fence()
            return
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.reset(left)
        else:
            self._fence_call = self.clock.callLater(left, self._fence_due)
        if self.fenced and self.joined and not self._recovered and not self._recovering:
            self._start_recovery()
        if self.fenced and self.joined and self._recovered:
            self._unfence()

    def _unfence(self) -> None:
        if self.fenced:
            was = self.fence_reason
            self.fenced = False
            self.fence_reason = None
            if self.stats["fences"]:
                log.info("Node {node_id} reaches Redis again; accepting clients (was fenced: "
                         "{reason})", node_id=self.node_id, reason=was)
            self._tell("unfenced")

    def _start_recovery(self) -> None:
        if self.recover is None:
            self._recovered = True
            return
        self._recovering = True
        self.fence_reason = "taking over what its previous incarnation left"
        d = defer.maybeDeferred(self.recover)

        def done(_):
            self._recovering = False
            self._recovered = True
            if not self._stopped and self.fenced and self.joined:
                # unfence now if the last acknowledgement is recent enough
                last = self._last_ok_sent
                if last is not None and self.clock.seconds() - last < self.fence_after:
                    self._unfence()

        def failed(failure):
            self._recovering = False
            self.log_limiter.emit(
                log.warn, "recover", "Node {node_id} cannot take over what its previous "
                "incarnation left yet ({error}); staying fenced, retrying",
                node_id=self.node_id, error=str(failure.value))
        d.addCallbacks(done, failed)

    def _failed(self, failure) -> None:
        self.stats["heartbeat_failures"] += 1
        error = failure.value
        if not isinstance(error, BackendError):
            log.failure("Cluster heartbeat of {node_id} failed", failure,
                        node_id=self.node_id)
            return None
        since = (self.clock.seconds() - self._last_ok_sent) if self._last_ok_sent else None
        self.log_limiter.emit(
            log.warn, "heartbeat",
            "Cluster heartbeat of {node_id} failed: {error} ({since}; fencing after "
            "{fence_after:g} s)", node_id=self.node_id, error=str(error),
            since=("never joined" if since is None else f"last acknowledged {since:.1f} s ago"),
            fence_after=self.fence_after)
        return None

    def _fence_due(self) -> None:
        self._fence_call = None
        self._check_fence()

    def _check_fence(self) -> None:
        if self.fenced or self._last_ok_sent is None:
            return
        silent = self.clock.seconds() - self._last_ok_sent
        if silent >= self.fence_after:
            self._fence(f"no heartbeat acknowledged by Redis for {silent:.1f} s")

    def _fence(self, reason: str) -> None:
        if self.fenced:
            return
        self.fenced = True
        self.fence_reason = reason
        self.stats["fences"] += 1
        log.error("Node {node_id} fences itself: {reason}; refusing CONNECT (0x88) and "
                  "disconnecting its clients until Redis answers again",
                  node_id=self.node_id, reason=reason)
        self._tell("fenced", reason)

    # --- peers ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _look_at_peers(self):
        members = yield self.backend.execute("SMEMBERS", self.keys.nodes())
        names = sorted(_text(m) for m in members if _text(m) != self.node_id)
        if self.joined and len(names) == len(members):
            # not a member although alive (removed by a reaper that judged an
            # older view, or by hand): back in, so it is looked after if it dies
            yield self.backend.execute("SADD", self.keys.nodes(), self.node_id)
            self.stats["membership_repairs"] += 1
            self.log_limiter.emit(
                log.warn, "membership", "Node {node_id} was missing from {key} while alive; "
                "added it back", node_id=self.node_id, key=self.keys.nodes())
        # each master answers for the keys it holds: a peer whose alive key
        # is on a master that hangs or is down is kept as last seen (not
        # dead: nobody knows), the others are learned now
        boots = yield self.backend.pipeline_each([("GET", self.keys.alive(n)) for n in names])
        unknown = [n for n, b in zip(names, boots) if isinstance(b, BaseException)]
        alive = {n: b for n, b in zip(names, boots)
                 if b is not None and not isinstance(b, BaseException)}
        before = self.peers
        for name in unknown:
            if name in before:
                alive[name] = before[name]
        self.peers = alive
        for name, boot in before.items():
            if alive.get(name) != boot:
                self._tell("peer_down", name, boot)
        for name, boot in alive.items():
            if before.get(name) != boot:
                self._tell("peer_up", name, boot)
        if unknown:
            error = next(b for b in boots if isinstance(b, BaseException))
            self.log_limiter.emit(
                log.warn, "peers-unknown", "Cannot read whether nodes {nodes} are alive: "
                "{error}; they are kept as last seen", nodes=", ".join(unknown),
                error=str(error))

    def dead_members(self) -> defer.Deferred:
        """Fires with the member node ids whose alive key is gone (for the
        reaper); a node whose key cannot be read (its master hangs or is
        down) is not among them."""
        d = self.backend.execute("SMEMBERS", self.keys.nodes())

        def check(members):
            names = sorted(_text(m) for m in members if _text(m) != self.node_id)
            p = self.backend.pipeline_each([("EXISTS", self.keys.alive(n)) for n in names])
            p.addCallback(lambda found: [n for n, e in zip(names, found)
                                         if not isinstance(e, BaseException) and not e])
            return p
        d.addCallback(check)
        return d


def _new_boot() -> str:
    return os.urandom(8).hex()


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
