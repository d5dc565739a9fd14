"""The memory store: nothing survives the process (``--persistence memory``)."""
from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from mqttd.interfaces import IBrokerStore

from mqttd.persistence.records import OPERATION_TYPES, StoredState

_OP_TYPES = frozenset(OPERATION_TYPES)


@implementer(IBrokerStore)
class MemoryStore:
    """A store that keeps nothing: the broker's live state is the only copy.

    ``open()`` returns an empty state, ``write()`` only checks its argument,
    ``sync()`` fires at once.  Options given to the durable stores (``fsync``,
    ``compact_bytes``...) are accepted and ignored, so one configuration can
    switch backends.
    """

    durable = False
    #: takes the subscription delta operations (see IBrokerStore)
    subscription_deltas = True
    #: never fails (see IBrokerStore: the optional ``failure``)
    failure = None

    def __init__(self, reactor=None, **ignored_options):
        self._open = False

    def open(self) -> StoredState:
        self._open = True
        return StoredState()

    def write(self, op) -> None:
        if type(op) not in _OP_TYPES:
            raise TypeError(f"not a store operation: {op!r}")

    def sync(self) -> defer.Deferred:
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        self._open = False
        return defer.succeed(None)
