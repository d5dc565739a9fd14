"""Bounded password hashing: at most N checks at once, per peer and overall.

A ``$7$`` check with 100,000 PBKDF2 iterations costs 0.1-0.3 s of one core.
Unbounded, a few dozen wrong-password CONNECTs per second keep every core
busy and real first logins wait seconds (REVIEW finding 24: 100 parallel wrong
passwords delayed another user's login by 5.9 s).  :class:`VerificationGate`
bounds that work:

- at most ``max_concurrent`` checks run at once (overall), at most
  ``per_peer`` of them for one peer address (host, without the port);
- the others wait in a queue: at most ``max_waiting`` overall and
  ``per_peer_waiting`` per peer; peers take turns (round robin), so one
  busy address cannot push the others' logins to the back;
- a check that cannot queue, or has waited ``max_wait`` seconds without
  starting, fails with :class:`VerificationBusy` -- the broker answers
  CONNACK 0x9F Connection rate exceeded (MQTT 3.1.1: 0x03 Server
  unavailable) and logs the refusal (rate-limited) as ``connection-rate``;
- every check has a **priority** (0 first) given by the caller: the password
  checker puts checks from addresses and for user names without recent
  failures first and addresses with many failures last (see
  :class:`~mqttd.auth.checkers.PasswordFileChecker`), so a storm of wrong
  passwords from many addresses does not delay an honest first login beyond
  the check that is running; within one priority, peers take turns (in
  priority 1 -- new addresses of a user name under attack -- a peer new to
  the queue goes first: a storm of guesses from a fresh address per attempt
  waits, and times out, behind a login that arrives now);
- the checks run in a small thread pool of their own
  (:class:`HashThreadPool`, ``max_concurrent`` threads), never on the
  reactor thread, so a CONNECT's hash never delays other clients' traffic.

- a check not answered within ``deadline`` seconds of its submission
  (default 8, below the broker's hook timeout, 10) is answered with
  :class:`VerificationBusy` too, even while it runs (an entry whose hashing
  takes longer than the machine can give it): the client gets "busy, try
  again" (0x9F / 0x03) and one WARN line, never a hook timeout; its thread
  still counts as a running check until the hash ends.

Cancelling the Deferred of a waiting check (the broker's hook timeout does)
takes it out of the queue; a running check finishes in its thread and its
result is dropped.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Callable, Deque, Dict, Hashable, Optional, Tuple

from twisted.cred import error
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mqttd.ratelimit import network_key, peer_host


class VerificationBusy(error.LoginFailed):
    """Too many password checks running or waiting: refused, not checked
    (CONNACK 0x9F Connection rate exceeded; MQTT 3.1.1 0x03)."""


#: the host of a ``host:port`` peer, and the key under which an address's
#: failures are counted (an IPv6 address's /64): the broker's own judgements
#: (:mod:`mqttd.ratelimit`), so a failure budget and a rate limit see one
#: client host the same way
address_key = network_key


class FailureLog:
    """Recent failed logins counted per key (a user name, an address).

    A key's count grows by one per failure and is forgotten once ``window``
    seconds passed since its last failure.  Bounded: at most ``max_entries``
    keys (the longest quiet forgotten first).

    :param now: ``() -> float`` seconds (a clock's ``seconds``).
    :param window: seconds of quiet after which a key's failures are forgotten.
    """

    def __init__(self, now: Callable[[], float], window: float = 60.0,
                 max_entries: int = 10_000):
        self.now = now
        self.window = window
        self.max_entries = max_entries
        #: key -> (failures, time of the last one); insertion order is age order
        self._entries: "collections.OrderedDict[Hashable, Tuple[int, float]]" = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        if entry is None:
            return 0
        if self.now() - entry[1] >= self.window:
            del self._entries[key]
            return 0
        return entry[0]

    def note(self, key: Hashable) -> int:
        """Count one failure for ``key``; returns its count now."""
        count = self.count(key) + 1
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self.max_entries:
            entries.popitem(last=False)
        entries[key] = (count, self.now())
        return count

    def clear(self) -> None:
        self._entries.clear()


def default_concurrency() -> int:
    """Checks run at once by default: the cores less one for the reactor, 1..4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class _DaemonThread(threading.Thread):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


class HashThreadPool(ThreadPool):
    """The password checks' own thread pool (daemon threads: a process that
    exits without stopping the reactor is not held up by an idle worker)."""

    threadFactory = _DaemonThread


class _Job:
    __slots__ = ("host", "fn", "args", "deferred", "timer", "priority", "deadline")

    def __init__(self, host, fn, args, priority=0):
        self.host = host
        self.fn = fn
        self.args = args
        self.priority = priority
        self.deferred: Optional[defer.Deferred] = None
        self.timer = None
        self.deadline = None


class VerificationGate:
    """Runs password checks with bounded concurrency and a bounded queue.

    :param clock: ``IReactorTime`` for the ``max_wait`` timers.
    :param run: ``f(fn, *args) -> Deferred`` that runs ``fn`` off the reactor
        thread (default: a :class:`HashThreadPool` of ``max_concurrent``
        threads on ``clock``, which must then be a reactor).  Tests inject
        one whose Deferreds they fire.
    :param max_concurrent: checks running at once overall (default: cores - 1,
        1..4).
    :param per_peer: checks running at once for one peer host (default 1).
    :param max_waiting: checks waiting overall (default 128).
    :param per_peer_waiting: checks waiting for one peer host (default 16).
    :param max_wait: seconds a check may wait before it is refused (default
        5; below the broker's ``hook_timeout``, 10, so the client gets 0x9F
        rather than a hook failure).
    :param deadline: seconds from submission within which a check is
        answered, waiting and running together (default 8, at least
        ``max_wait``; below the broker's ``hook_timeout``).
    :param newest_first: priorities whose peers take turns newest first (a
        peer new to the queue goes to the front of its priority's turns, not
        to the back); default ``(1,)``, the new addresses of a user name under
        attack (see :mod:`mqttd.auth.guard`).

    Counters (for metrics and tests): ``started``, ``refused`` (queue full),
    ``expired`` (waited ``max_wait``), ``overran`` (still running at its
    ``deadline``), ``cancelled``; ``running`` and ``waiting`` are the current
    figures.  Raises ValueError for limits out of range.
    """

    def __init__(self, clock, run: Optional[Callable] = None,
                 max_concurrent: Optional[int] = None, per_peer: int = 1,
                 max_waiting: int = 128, per_peer_waiting: int = 16, max_wait: float = 5.0,
                 deadline: float = 8.0, newest_first: Tuple[int, ...] = (1,)):
        if max_concurrent is None:
            max_concurrent = default_concurrency()
        for name, value in (("max_concurrent", max_concurrent), ("per_peer", per_peer)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        for name, value in (("max_waiting", max_waiting),
                            ("per_peer_waiting", per_peer_waiting)):
            if value < 0:
                raise ValueError(f"{name} must be 0 or more, not {value}")
        if max_wait <= 0:
            raise ValueError(f"max_wait must be above 0, not {max_wait}")
        if deadline < max_wait:
            raise ValueError(f"deadline ({deadline}) must be at least max_wait ({max_wait})")
        self.deadline = deadline
        self.newest_first = frozenset(newest_first)
        self.clock = clock
        self.max_concurrent = max_concurrent
        self.per_peer = per_peer
        self.max_waiting = max_waiting
        self.per_peer_waiting = per_peer_waiting
        self.max_wait = max_wait
        self._pool: Optional[HashThreadPool] = None
        self._run = run if run is not None else self._run_in_pool
        self.running = 0
        self.waiting = 0
        self._running_by_host: Dict[str, int] = {}
        self._waiting_by_host: Dict[str, int] = {}
        # priority -> host -> its waiting jobs; a dict's order is its round robin's
        self._queues: "Dict[int, collections.OrderedDict[str, Deque[_Job]]]" = {}
        self.started = self.refused = self.expired = self.cancelled = self.overran = 0

    # --- the thread pool ----------------------------------------------------------------

    def _run_in_pool(self, fn, *args) -> defer.Deferred:
        if self._pool is None:
            pool = self._pool = HashThreadPool(0, self.max_concurrent, "mqttd-password-checks")
            pool.start()
            self.clock.addSystemEventTrigger("during", "shutdown", self.stop)
        return threads.deferToThreadPool(self.clock, self._pool, fn, *args)

    def stop(self) -> None:
        """Stop the thread pool (at reactor shutdown; idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    # --- the gate -----------------------------------------------------------------------

    def submit(self, peer: Optional[str], fn: Callable, *args,
               priority: int = 0) -> defer.Deferred:
        """``fn(*args)`` off the reactor thread once a place is free; a Deferred
        of its result, or failing with :class:`VerificationBusy` (queue full, or
        ``max_wait`` seconds without a place).  Waiting checks of a lower
        ``priority`` number start first; within one, peers take turns."""
        host = peer_host(peer)
        job = _Job(host, fn, args, priority)
        job.deferred = defer.Deferred(lambda d: self._cancel(job))
        if self.running < self.max_concurrent and self._running_by_host.get(host, 0) < self.per_peer:
            self._watch(job)
            self._start(job)
            return job.deferred
        mine = self._waiting_by_host.get(host, 0)
        if self.waiting >= self.max_waiting and mine < self.per_peer_waiting:
            self._make_room(priority)
        if self.waiting >= self.max_waiting or mine >= self.per_peer_waiting:
            self.refused += 1
            return defer.fail(VerificationBusy(
                f"{self.running} password checks running, {self.waiting} waiting "
                f"({mine} from {host})"))
        queues = self._queues.get(priority)
        if queues is None:
            queues = self._queues[priority] = collections.OrderedDict()
            self._queues = dict(sorted(self._queues.items()))
        queue = queues.get(host)
        if queue is None:
            queue = queues[host] = collections.deque()
            if priority in self.newest_first:
                queues.move_to_end(host, last=False)
        queue.append(job)
        self.waiting += 1
        self._waiting_by_host[host] = mine + 1
        job.timer = self.clock.callLater(self.max_wait, self._expire, job)
        self._watch(job)
        return job.deferred

    def _watch(self, job: _Job) -> None:
        """Answer ``job`` busy if it has no answer ``deadline`` seconds from now."""
        job.deadline = self.clock.callLater(self.deadline, self._overrun, job)

        def answered(result):
            if job.deadline is not None and job.deadline.active():
                job.deadline.cancel()
            job.deadline = None
            return result
        job.deferred.addBoth(answered)

    def _overrun(self, job: _Job) -> None:
        job.deadline = None
        if job.deferred.called:
            return
        if self._unqueue(job):  # (only when max_wait == deadline)
            self.expired += 1
        else:
            self.overran += 1
        job.deferred.errback(VerificationBusy(
            f"no answer within {self.deadline:g} s ({self.running} checks running, "
            f"{self.waiting} waiting); the hashing continues in its thread"))

    def _start(self, job: _Job) -> None:
        self.running += 1
        self.started += 1
        self._running_by_host[job.host] = self._running_by_host.get(job.host, 0) + 1
        try:
            result = self._run(job.fn, *job.args)
        except Exception:
            result = defer.fail()

        def done(outcome):
            self._finished(job.host)
            if job.deferred.called:  # cancelled meanwhile: the result is dropped
                return None
            if isinstance(outcome, Failure):
                job.deferred.errback(outcome)
            else:
                job.deferred.callback(outcome)
            return None
        result.addBoth(done)

    def _finished(self, host: str) -> None:
        self.running -= 1
        count = self._running_by_host[host] - 1
        if count:
            self._running_by_host[host] = count
        else:
            del self._running_by_host[host]
        self._pump()

    def _make_room(self, priority: int) -> None:
        """The queue is full: refuse the newest waiting check of the worst
        priority worse than ``priority`` (if any), so checks from addresses
        without failures are never turned away by a queue full of suspects;
        in a ``newest_first`` priority, the oldest waiting check of
        ``priority`` itself makes room (the newest goes first there, so the
        oldest would time out anyway)."""
        for worst in sorted(self._queues, reverse=True):
            if worst < priority or (worst == priority and priority not in self.newest_first):
                return
            queues = self._queues[worst]
            if not queues:
                continue
            host = next(reversed(queues))
            # the back of a newest_first priority holds its oldest peer: its
            # oldest check goes; elsewhere the newest check of the last peer
            job = queues[host][0] if worst in self.newest_first else queues[host][-1]
            self._unqueue(job)
            self.refused += 1
            job.deferred.errback(VerificationBusy(
                f"{self.waiting} password checks waiting; a check with a better priority "
                f"(or a newer one of a newest-first priority) took this one's place"))
            return

    def _next(self):
        """``(queues, host, queue)`` of the next job to start, or None: the
        first priority with a peer below its own limit, that peer's turn."""
        for queues in self._queues.values():
            for host, queue in queues.items():
                if self._running_by_host.get(host, 0) < self.per_peer:
                    return queues, host, queue
        return None

    def _pump(self) -> None:
        """Start waiting jobs while places are free: by priority, peers in turn."""
        while self.running < self.max_concurrent and self.waiting:
            found = self._next()
            if found is None:
                return  # every waiting peer is at its own limit
            queues, host, queue = found
            job = queue.popleft()
            self._left_queue(job)
            del queues[host]
            if queue:
                queues[host] = queue  # to the back of the round robin
            if job.timer is not None and job.timer.active():
                job.timer.cancel()
            self._start(job)

    def _left_queue(self, job: _Job) -> None:
        self.waiting -= 1
        count = self._waiting_by_host[job.host] - 1
        if count:
            self._waiting_by_host[job.host] = count
        else:
            del self._waiting_by_host[job.host]

    def _unqueue(self, job: _Job) -> bool:
        queues = self._queues.get(job.priority)
        queue = queues.get(job.host) if queues is not None else None
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        self._left_queue(job)
        if not queue:
            del queues[job.host]
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        return True

    def _expire(self, job: _Job) -> None:
        job.timer = None
        if self._unqueue(job):
            self.expired += 1
            job.deferred.errback(VerificationBusy(
                f"no password check place within {self.max_wait:g} s "
                f"({self.running} running, {self.waiting} waiting)"))

    def _cancel(self, job: _Job) -> None:
        if self._unqueue(job):
            self.cancelled += 1


__all__ = ["FailureLog", "HashThreadPool", "VerificationBusy", "VerificationGate",
           "address_key", "default_concurrency", "peer_host"]
