"""The persistent sessions a broker holds, by owner: what ``--max-sessions`` and
``--max-sessions-per-user`` judge (REVIEW-S9 R10).

An *owner* is whose budget a session spends (:func:`budget_owner`): the user
name that created it (``Session.owner``), or for an anonymous session the
address it connected from (an IPv6 /64) -- the anonymous clients of one
address are one owner, those of another address another (REVIEW-S10 S6: as
one owner, any anonymous client evicted every other's offline sessions and
their queued messages).  :class:`PersistentSessions`
keeps, in O(1) per change, the client ids of the persistent sessions, how many
each owner holds, and each owner's offline sessions in the order they went
offline, those that owe no message apart -- so a CONNECT at a cap finds the
owner's session to evict (:meth:`longest_offline`: the longest-offline one
that owes nothing, else the longest-offline one) without scanning all
sessions -- and, in O(log owners), which owner with an offline session holds
the most: at ``--max-sessions`` a smaller owner's new session displaces one of
that owner's (:meth:`fair_victim`), so one owner holding the whole budget does
not lock the others out.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from typing import Dict, Hashable, Iterator, List, Mapping, Optional, Tuple

from mqttd.ratelimit import address_key

_MISSING = object()


class _Offline:
    """One owner's offline sessions, each order longest offline first: those
    that owed nothing when they went offline (or were last looked at) and
    those that owe messages."""

    __slots__ = ("idle", "owing")

    def __init__(self) -> None:
        self.idle: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.owing: "collections.OrderedDict[str, None]" = collections.OrderedDict()


#: the first item of an anonymous budget owner, ``(ANONYMOUS, address)``
ANONYMOUS = "anonymous"


def budget_owner(owner: Optional[str], peer=None) -> Hashable:
    """Whose session budget a session of the user ``owner`` (None: anonymous,
    or a name no one checked) connected from ``peer`` (``"host:port"``)
    spends: the user name itself, or ``("anonymous", address)`` with
    :func:`mqttd.ratelimit.address_key` of ``peer`` (IPv4 host, IPv6 /64;
    ``"-"`` when unknown: a session restored from the store until it
    reconnects)."""
    return owner if owner is not None else (ANONYMOUS, address_key(peer))


def owner_name(key: Hashable) -> str:
    """A budget owner as log lines name it: the user name, or
    ``anonymous@ADDRESS``."""
    if isinstance(key, tuple):
        return f"{key[0]}@{key[1]}"
    return str(key)


class PersistentSessions:
    """Client ids of the persistent sessions held, counted by owner.

    ``len()``, ``in`` and iteration see the client ids.  Every method is O(1)
    (:meth:`longest_offline` amortised: it drops entries that went stale
    behind the index's back once each).
    """

    def __init__(self) -> None:
        self._owners: Dict[str, Hashable] = {}
        self._counts: Dict[Hashable, int] = {}
        #: owner -> client ids of its offline sessions (present while it has one)
        self._offline: Dict[Hashable, _Offline] = {}
        #: max-heap (by count) of the owners in ``_offline``: ``(-count, mark,
        #: owner)``; an entry is current while ``_marks[owner] == mark`` (older
        #: ones are skipped when they come to the top, and the heap is rebuilt
        #: when they outnumber the current ones)
        self._heap: List[Tuple[int, int, Hashable]] = []
        self._marks: Dict[Hashable, int] = {}
        self._mark = itertools.count()

    def __len__(self) -> int:
        return len(self._owners)

    def __contains__(self, client_id) -> bool:
        return client_id in self._owners

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def count(self, owner: Hashable) -> int:
        """Persistent sessions held by ``owner`` (a :func:`budget_owner`)."""
        return self._counts.get(owner, 0)

    def owner_of(self, client_id: str) -> Hashable:
        """The budget owner ``client_id``'s persistent session is counted for
        (None if it is not counted)."""
        return self._owners.get(client_id)

    def add(self, client_id: str, owner: Hashable) -> None:
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

    def _forget(self, client_id: str, owner: Hashable) -> None:
        left = self._counts[owner] - 1
        if left:
            self._counts[owner] = left
        else:
            del self._counts[owner]
        self.went_online(client_id, owner)
        if owner in self._offline:
            self._rank(owner)

    def went_offline(self, client_id: str, owing: bool = False) -> None:
        """``client_id``'s (persistent) session lost its connection just now;
        ``owing``: it has queued or in-flight messages (a session that owes
        nothing is evicted before any that does, see :meth:`longest_offline`)."""
        owner = self._owners.get(client_id, _MISSING)
        if owner is _MISSING:
            return
        offline = self._offline.get(owner)
        if offline is None:
            offline = self._offline[owner] = _Offline()
            self._rank(owner)
        offline.idle.pop(client_id, None)
        offline.owing.pop(client_id, None)
        (offline.owing if owing else offline.idle)[client_id] = None

    def went_online(self, client_id: str, owner=_MISSING) -> None:
        """``client_id``'s session has a connection again (or is forgotten)."""
        if owner is _MISSING:
            owner = self._owners.get(client_id, _MISSING)
            if owner is _MISSING:
                return
        offline = self._offline.get(owner)
        if offline is not None:
            offline.idle.pop(client_id, None)
            offline.owing.pop(client_id, None)
            if not (offline.idle or offline.owing):
                self._no_offline(owner)

    def longest_offline(self, owner: Hashable, sessions: Mapping[str, object]):
        """The offline persistent session (from ``sessions``, client id ->
        Session) of ``owner`` to evict first, or None if it has none: the
        longest-offline one that owes nothing (no queued or in-flight
        message: only its subscriptions go), else the longest-offline one
        that owes messages (REVIEW-S10 S6: a flood of empty throwaway sessions
        makes its own room before it costs another client its queued
        messages).  A session found owing that was filed as owing nothing
        (messages queued for it while offline) moves to the owing ones, once:
        amortised O(1)."""
        while True:
            offline = self._offline.get(owner)
            if offline is None:
                return None
            order = offline.idle if offline.idle else offline.owing
            if not order:
                self._no_offline(owner)
                return None
            client_id = next(iter(order))
            session = sessions.get(client_id)
            if (session is not None and getattr(session, "persistent", False)
                    and getattr(session, "connection", None) is None
                    and self._owners.get(client_id, _MISSING) == owner):
                if order is offline.idle and (getattr(session, "queue", ())
                                              or getattr(session, "inflight", None)):
                    del order[client_id]
                    offline.owing[client_id] = None
                    continue
                return session
            del order[client_id]        # stale: repaired once, here
            if session is None:
                self.discard(client_id)  # (may end owner's offline entry: fetched again)
            elif not (offline.idle or offline.owing) and self._offline.get(owner) is offline:
                self._no_offline(owner)

    def fair_victim(self, owner: Hashable, sessions: Mapping[str, object]):
        """The session a new persistent session of ``owner`` displaces at the
        global cap (``--max-sessions``), or None (refuse it):

        1. the :meth:`longest_offline` session of the owner that holds the most
           persistent sessions among the owners with one offline, if that
           owner holds at least two more than ``owner`` (with one more, the
           two would only trade places on every CONNECT);
        2. else ``owner``'s own :meth:`longest_offline` session.

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

    def largest(self) -> Tuple[Hashable, int]:
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

    def _rank(self, owner: Hashable) -> None:
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

    def _no_offline(self, owner: Hashable) -> None:
        """``owner`` has no offline session any more: out of the heap (lazily)."""
        del self._offline[owner]
        self._marks.pop(owner, None)
