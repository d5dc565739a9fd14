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
- the checks run in a small thread pool of their own
  (:class:`HashThreadPool`, ``max_concurrent`` threads), never on the
  reactor thread, so a CONNECT's hash never delays other clients' traffic.

Cancelling the Deferred of a waiting check (the broker's hook timeout does)
takes it out of the queue; a running check finishes in its thread and its
result is dropped.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Callable, Deque, Dict, Optional

from twisted.cred import error
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


class VerificationBusy(error.LoginFailed):
    """Too many password checks running or waiting: refused, not checked
    (CONNACK 0x9F Connection rate exceeded; MQTT 3.1.1 0x03)."""


def peer_host(peer: Optional[str]) -> str:
    """The host of a ``host:port`` peer (the per-peer key); ``"-"`` if unknown."""
    if not peer:
        return "-"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


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
    __slots__ = ("host", "fn", "args", "deferred", "timer")

    def __init__(self, host, fn, args):
        self.host = host
        self.fn = fn
        self.args = args
        self.deferred: Optional[defer.Deferred] = None
        self.timer = None


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

    Counters (for metrics and tests): ``started``, ``refused`` (queue full),
    ``expired`` (waited ``max_wait``), ``cancelled``; ``running`` and
    ``waiting`` are the current figures.
    """

    def __init__(self, clock, run: Optional[Callable] = None,
                 max_concurrent: Optional[int] = None, per_peer: int = 1,
                 max_waiting: int = 128, per_peer_waiting: int = 16, max_wait: float = 5.0):
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
        # host -> its waiting jobs; the dict's order is the round robin's
        self._queues: "collections.OrderedDict[str, Deque[_Job]]" = collections.OrderedDict()
        self.started = self.refused = self.expired = self.cancelled = 0

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

    def submit(self, peer: Optional[str], fn: Callable, *args) -> defer.Deferred:
        """``fn(*args)`` off the reactor thread once a place is free; a Deferred
        of its result, or failing with :class:`VerificationBusy` (queue full, or
        ``max_wait`` seconds without a place)."""
        host = peer_host(peer)
        job = _Job(host, fn, args)
        job.deferred = defer.Deferred(lambda d: self._cancel(job))
        if self.running < self.max_concurrent and self._running_by_host.get(host, 0) < self.per_peer:
            self._start(job)
            return job.deferred
        queue = self._queues.get(host)
        if self.waiting >= self.max_waiting or (
                queue is not None and len(queue) >= self.per_peer_waiting) or (
                queue is None and self.per_peer_waiting == 0):
            self.refused += 1
            return defer.fail(VerificationBusy(
                f"{self.running} password checks running, {self.waiting} waiting "
                f"({len(queue) if queue else 0} from {host})"))
        if queue is None:
            queue = self._queues[host] = collections.deque()
        queue.append(job)
        self.waiting += 1
        job.timer = self.clock.callLater(self.max_wait, self._expire, job)
        return job.deferred

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

    def _pump(self) -> None:
        """Start waiting jobs while places are free, taking peers in turn."""
        while self.running < self.max_concurrent and self._queues:
            for host, queue in self._queues.items():
                if self._running_by_host.get(host, 0) < self.per_peer:
                    break
            else:
                return  # every waiting peer is at its own limit
            job = queue.popleft()
            self.waiting -= 1
            del self._queues[host]
            if queue:
                self._queues[host] = queue  # to the back of the round robin
            if job.timer is not None and job.timer.active():
                job.timer.cancel()
            self._start(job)

    def _unqueue(self, job: _Job) -> bool:
        queue = self._queues.get(job.host)
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        self.waiting -= 1
        if not queue:
            del self._queues[job.host]
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


__all__ = ["HashThreadPool", "VerificationBusy", "VerificationGate", "default_concurrency",
           "peer_host"]
