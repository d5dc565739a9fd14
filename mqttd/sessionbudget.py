"""The persistent sessions a broker holds, by owner: what ``--max-sessions`` and
``--max-sessions-per-user`` judge (REVIEW-S9 R10).

An *owner* is the user name that created a session (``Session.owner``); every
anonymous session has the one owner ``None``.  :class:`PersistentSessions`
keeps, in O(1) per change, the client ids of the persistent sessions, how many
each owner holds, and each owner's offline sessions in the order they went
offline -- so a CONNECT at a cap finds the owner's longest-offline session
without scanning all sessions.
"""
from __future__ import annotations

import collections
from typing import Dict, Iterator, Mapping, Optional

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

    def went_offline(self, client_id: str) -> None:
        """``client_id``'s (persistent) session lost its connection just now."""
        owner = self._owners.get(client_id, _MISSING)
        if owner is _MISSING:
            return
        order = self._offline.get(owner)
        if order is None:
            order = self._offline[owner] = collections.OrderedDict()
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
                del self._offline[owner]

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
        if order is not None and not order:
            self._offline.pop(owner, None)
        return None
