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
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["PendingWrites", "fire_waiters"]


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
