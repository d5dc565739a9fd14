"""Asynchronous writes that acknowledgements wait for (layer L1).

The broker's store barrier (``Broker.barrier``) promises that what a client's
acknowledgement covers is durable.  Most durable state goes through the
:class:`~mqttd.interfaces.IBrokerStore`, whose ``sync()`` is that promise; a
seam implementation that keeps its own state elsewhere (a clustered retained
store writing to Redis, a cluster router handing a message to another node)
hands the broker one Deferred per write instead, and :class:`PendingWrites`
turns those into the same promise:

    writes = PendingWrites()
    writes.add(d1); writes.add(d2)
    writes.settled()   # a Deferred: fires when d1 and d2 have, errbacks if
                       # either failed; None when nothing is outstanding

A write that failed before anyone asked is remembered until the next
:meth:`PendingWrites.settled`, so an acknowledgement can never be sent for a
write that failed in the same reactor turn (no false acknowledgement).
No clock, no reactor.

:class:`Durability` is the broker core's side of it, one part of
:class:`mqttd.broker.Broker` (a mixin whose state lives in
``Broker.__init__``): every store operation goes through ``_write`` and is
counted in ``write_count``; :meth:`Durability.barrier` gives an
acknowledgement the Deferred of what it promises, one store ``sync()`` per
reactor turn shared by every packet of the turn, joined with the remote
router's hand-off and the :class:`PendingWrites` of seam implementations.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["Durability", "PendingWrites", "both", "fire_waiters"]


class PendingWrites:
    """Outstanding asynchronous writes and the failures not yet reported."""

    def __init__(self) -> None:
        #: write -> waiters (Deferreds of settled() calls that include it)
        self._pending: Dict[defer.Deferred, List[defer.Deferred]] = {}
        self._failures: List[Failure] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, write: defer.Deferred) -> None:
        """Track ``write`` (its result is consumed: errors are reported by
        :meth:`settled`, never left unhandled)."""
        self._pending[write] = []
        write.addBoth(self._finished, write)

    def _finished(self, result, write: defer.Deferred) -> None:
        waiters = self._pending.pop(write, ())
        if isinstance(result, Failure):
            if waiters:
                for waiter in waiters:
                    waiter.errback(result)
            else:
                self._failures.append(result)
        else:
            for waiter in waiters:
                waiter.callback(None)
        return None

    def settled(self) -> Optional[defer.Deferred]:
        """A Deferred firing (None) once every write added so far completed;
        it errbacks with the first failure among them (or among the failures
        nobody was told of yet).  None when nothing is outstanding or failed."""
        if self._failures:
            failure, self._failures = self._failures[0], []
            return defer.fail(failure)
        if not self._pending:
            return None
        each = []
        for waiters in self._pending.values():
            waiter = defer.Deferred()
            waiters.append(waiter)
            each.append(waiter)
        done = defer.gatherResults(each, consumeErrors=True)
        done.addErrback(lambda failure: failure.value.subFailure)
        done.addCallback(lambda _: None)
        return done


def fire_waiters(waiters: List[Tuple[int, defer.Deferred]], upto: int,
                 failure: Optional[Failure] = None) -> List[Tuple[int, defer.Deferred]]:
    """Fire the ``(seq, Deferred)`` waiters whose write sequence number is at
    most ``upto`` (errback with ``failure`` when given); returns the others,
    in order.  For writers that number their batches (the cluster's router and
    route table): a waiter asked "is everything up to my ``seq`` written?"."""
    keep = []
    for seq, d in waiters:
        if seq <= upto:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)
        else:
            keep.append((seq, d))
    return keep


def both(first: defer.Deferred, second: defer.Deferred) -> defer.Deferred:
    """Fires when both fired; fails with the first failure (the other is consumed)."""
    d = defer.Deferred()
    state = [2, None]

    def one(result):
        if isinstance(result, Failure) and state[1] is None:
            state[1] = result
        state[0] -= 1
        if state[0] == 0:
            if state[1] is not None:
                d.errback(state[1])
            else:
                d.callback(None)
        return None
    first.addBoth(one)
    second.addBoth(one)
    return d


class Durability:
    """Store writes, their count, and the barrier acknowledgements wait for."""

    def _write(self, op) -> None:
        if self._durable:
            self.store.write(op)
            self.write_count += 1

    def track_write(self, write: defer.Deferred) -> None:
        """Count ``write``, an asynchronous write of a seam implementation that
        keeps its state outside the store (a clustered retained store), as a
        store write: the next :meth:`barrier` also waits for it, and fails if
        it fails (no acknowledgement promises what was not stored)."""
        self.write_count += 1
        self.pending_writes.add(write)

    def barrier(self, since: int) -> Optional[defer.Deferred]:
        """A Deferred for the durability of what was written after ``since``.

        ``since`` is a former :attr:`write_count`.  Acknowledgements that
        promise a message is stored wait for it (group committed by the
        store); None means nothing was written since, so nothing to wait for.
        """
        if self.write_count == since:
            return None
        # one store sync per reactor turn, shared by every packet of the turn:
        # a chunk of 100 PUBLISHes waits for one fsync, not two
        if self._turn_sync is None:
            self._turn_sync = []
            self.clock.callLater(0, self._sync_turn)
        d = defer.Deferred()
        self._turn_sync.append(d)
        return d

    def _sync_turn(self) -> None:
        waiting, self._turn_sync = self._turn_sync, None
        self.sync_turns += 1
        done = self.store.sync()
        router = self.router
        if router is not None:
            # a QoS 1/2 message forwarded to other nodes is acknowledged once
            # Redis took it, too
            pending = router.sync()
            if pending is not None:
                done = both(done, pending)
        others = self.pending_writes.settled()
        if others is not None:
            # a retained store kept elsewhere (a cluster's) wrote asynchronously
            done = both(done, others)

        def fire(result):
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
        done.addBoth(fire)

    def flush(self) -> defer.Deferred:
        """A Deferred firing once everything written to the store so far is on
        disk (after :meth:`publish_message`, for example); at once for the
        memory store.  Fails if the store failed (the write is then not durable)."""
        return self.store.sync()
