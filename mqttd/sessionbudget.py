"""The persistent sessions a broker holds, by owner: what ``--max-sessions`` and
``--max-sessions-per-user`` judge (REVIEW-S9 R10).

An *owner* is the user name that created a session (``Session.owner``); every
anonymous session has the one owner ``None``.  :class:`PersistentSessions`
keeps, in O(1) per change, the client ids of the persistent sessions, how many
each owner holds, and each owner's offline sessions in the order they went
offline -- so a CONNECT at a cap finds the owner's longest-offline session
without scanning all sessions -- and, in O(log owners), which owner with an
offline session holds the most: at ``--max-sessions`` a smaller owner's new
session displaces that owner's longest-offline one (:meth:`fair_victim`), so
one owner holding the whole budget does not lock the others out.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

_MISSING = object()


class PersistentSessions:
    """Client ids of the persistent sessions held, counted by owner.

    ``len()``, ``in`` and iteration see the client ids.  Every method is O(1)
    (:meth:`longest_offline` amortised: it drops entries that went stale
    behind the index's back once each).
    """

    def __init__(self) -> None:
        self._owners: Dict[str, Optional[str]] = {}
        self._counts: Dict[Optional[str], int] = {}
        #: owner -> client ids of its offline sessions, longest offline first
        self._offline: Dict[Optional[str], "collections.OrderedDict[str, None]"] = {}
        #: max-heap (by count) of the owners in ``_offline``: ``(-count, mark,
        #: owner)``; an entry is current while ``_marks[owner] == mark`` (older
        #: ones are skipped when they come to the top, and the heap is rebuilt
        #: when they outnumber the current ones)
        self._heap: List[Tuple[int, int, Optional[str]]] = []
        self._marks: Dict[Optional[str], int] = {}
        self._mark = itertools.count()

    def __len__(self) -> int:
        return len(self._owners)

    def __contains__(self, client_id) -> bool:
        return client_id in self._owners

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def count(self, owner: Optional[str]) -> int:
        """Persistent sessions held by ``owner`` (None: anonymous ones)."""
        return self._counts.get(owner, 0)

    def add(self, client_id: str, owner: Optional[str]) -> None:
        """``client_id``'s session is persistent and owned by ``owner`` (again)."""
        old = self._owners.get(client_id, _MISSING)
        if old is not _MISSING:
            if old == owner:
                return
            self._forget(client_id, old)
        self._owners[client_id] = owner
        self._counts[owner] = self._counts.get(owner, 0) + 1
        if owner in self._offline:
            self._rank(owner)

    def discard(self, client_id: str) -> None:
        """``client_id``'s session is gone or no longer persistent."""
        old = self._owners.pop(client_id, _MISSING)
        if old is not _MISSING:
            self._forget(client_id, old)

    def _forget(self, client_id: str, owner: Optional[str]) -> None:
        left = self._counts[owner] - 1
        if left:
            self._counts[owner] = left
        else:
            del self._counts[owner]
        self.went_online(client_id, owner)
        if owner in self._offline:
            self._rank(owner)

    def went_offline(self, client_id: str) -> None:
        """``client_id``'s (persistent) session lost its connection just now."""
        owner = self._owners.get(client_id, _MISSING)
        if owner is _MISSING:
            return
        order = self._offline.get(owner)
        if order is None:
            order = self._offline[owner] = collections.OrderedDict()
            self._rank(owner)
        order.pop(client_id, None)
        order[client_id] = None

    def went_online(self, client_id: str, owner=_MISSING) -> None:
        """``client_id``'s session has a connection again (or is forgotten)."""
        if owner is _MISSING:
            owner = self._owners.get(client_id, _MISSING)
            if owner is _MISSING:
                return
        order = self._offline.get(owner)
        if order is not None:
            order.pop(client_id, None)
            if not order:
                self._no_offline(owner)

    def longest_offline(self, owner: Optional[str], sessions: Mapping[str, object]):
        """The session (from ``sessions``, client id -> Session) of ``owner`` that
        has been offline longest, or None if ``owner`` has no offline
        persistent session."""
        order = self._offline.get(owner)
        while order:
            client_id = next(iter(order))
            session = sessions.get(client_id)
            if (session is not None and getattr(session, "persistent", False)
                    and getattr(session, "connection", None) is None
                    and getattr(session, "owner", None) == owner
                    and self._owners.get(client_id, _MISSING) == owner):
                return session
            del order[client_id]        # stale: repaired once, here
            if session is None:
                self.discard(client_id)
        if order is not None and not order and self._offline.get(owner) is order:
            self._no_offline(owner)
        return None

    def fair_victim(self, owner: Optional[str], sessions: Mapping[str, object]):
        """The session a new persistent session of ``owner`` displaces at the
        global cap (``--max-sessions``), or None (refuse it):

        1. the longest-offline session of the owner that holds the most
           persistent sessions among the owners with one offline, if that
           owner holds at least two more than ``owner`` (with one more, the
           two would only trade places on every CONNECT);
        2. else ``owner``'s own longest-offline session.

        So the owner holding the most can never lock a smaller one out, and
        an owner is never displaced for one holding as many.  O(log owners)
        amortised.
        """
        mine = self._counts.get(owner, 0)
        heap = self._heap
        while heap:
            negative, mark, top = heap[0]
            if self._marks.get(top) != mark:
                heapq.heappop(heap)          # superseded by a newer entry
                continue
            if -negative < mine + 2:
                break
            victim = self.longest_offline(top, sessions)
            if victim is not None:
                return victim
            # top had only stale offline entries: it left the heap; next one
        return self.longest_offline(owner, sessions)

    def largest(self) -> Tuple[Optional[str], int]:
        """``(owner, count)`` of an owner with an offline session holding the
        most persistent sessions (``(None, 0)`` if no owner has one offline);
        for log lines and tests."""
        heap = self._heap
        while heap:
            negative, mark, top = heap[0]
            if self._marks.get(top) == mark:
                return top, -negative
            heapq.heappop(heap)
        return None, 0

    def _rank(self, owner: Optional[str]) -> None:
        """(Re)enter ``owner``, which has an offline session, in the heap with
        its current count."""
        mark = next(self._mark)
        self._marks[owner] = mark
        heap = self._heap
        heapq.heappush(heap, (-self._counts.get(owner, 0), mark, owner))
        if len(heap) > 2 * len(self._marks) + 64:
            marks = self._marks
            heap[:] = [entry for entry in heap if marks.get(entry[2]) == entry[1]]
            heapq.heapify(heap)

    def _no_offline(self, owner: Optional[str]) -> None:
        """``owner`` has no offline session any more: out of the heap (lazily)."""
        del self._offline[owner]
        self._marks.pop(owner, None)
