"""Shared subscriptions: groups and member selection (layer L1).

A shared subscription ``$share/{ShareName}/{filter}`` [MQTT 5.0 §4.8.2] makes
its subscribers a *group*: each message matching ``filter`` goes to **one**
member of the group instead of all of them.  MQTT 3.1.1 clients may join too
(as with mosquitto and EMQX: the filter syntax is the same).

:class:`SharedSubscriptions` owns the groups.  Each group is one entry in the
broker's subscription trie (key and value are the :class:`ShareGroup` itself,
filed under the plain ``filter``), so routing finds it with the ordinary match
and asks :meth:`SharedSubscriptions.choose` for the member.

Member selection
    Members that are **online** are preferred; when none is, an **offline
    persistent** member is chosen so the message waits in its queue.  Among
    the candidates the strategy picks (``--shared-subscription-strategy``):

    ``round-robin`` (default)
        each message to the next candidate in turn.
    ``random``
        a uniformly random candidate.
    ``sticky``
        the same member as long as it stays a candidate; another one (in
        round-robin order) when it does not.
    ``hash-clientid``
        by a stable hash (CRC-32) of the publisher's client id: one publisher's
        messages go to the same member while the candidates stay the same.
    ``hash-topic``
        by a stable hash (CRC-32) of the topic name: one topic's messages go to
        the same member while the candidates stay the same.

Read permission
    A member is chosen before the broker's ``authorize_forward`` check (an
    ACL's read rules).  A member that may not read the message is passed over
    for that message and another one chosen (``exclude``), so one member
    subscribed to ``$share/g/#`` without read permission for every topic
    cannot make the group lose messages.

Nothing here does I/O or touches sessions: the broker passes a function
telling each member's availability.
"""
from __future__ import annotations

import random
import zlib
from typing import Callable, Container, Dict, Iterator, Optional

from mqttd.persistence.records import SubscriptionRecord
from mqttd.topics import SHARE_PREFIX, parse_shared

__all__ = [
    "STRATEGIES", "DEFAULT_STRATEGY", "ONLINE", "OFFLINE", "UNAVAILABLE",
    "ShareGroup", "SharedSubscriptions", "is_shared",
]

ROUND_ROBIN, RANDOM, STICKY, HASH_CLIENTID, HASH_TOPIC = (
    "round-robin", "random", "sticky", "hash-clientid", "hash-topic")
#: every strategy name accepted by ``--shared-subscription-strategy``
STRATEGIES = (ROUND_ROBIN, RANDOM, STICKY, HASH_CLIENTID, HASH_TOPIC)
DEFAULT_STRATEGY = ROUND_ROBIN

#: member availability, as the broker reports it
UNAVAILABLE, OFFLINE, ONLINE = 0, 1, 2


def is_shared(topic_filter: str) -> bool:
    """True for a ``$share/{ShareName}/{filter}`` subscription filter."""
    return topic_filter.startswith(SHARE_PREFIX)


class ShareGroup:
    """The members of one shared subscription.

    :ivar share_filter: the full filter, ``$share/{ShareName}/{filter}``
        (what clients subscribe to and what identifies the group).
    :ivar topic_filter: the plain ``filter`` messages are matched against.
    :ivar members: client id -> that member's subscription options, in the
        order the members joined.
    """

    __slots__ = ("share_name", "topic_filter", "share_filter", "members", "_turn", "_sticky")

    def __init__(self, share_filter: str) -> None:
        share_name, topic_filter = parse_shared(share_filter)
        if share_name is None:
            raise ValueError(f"not a shared subscription filter: {share_filter!r}")
        self.share_name = share_name
        self.topic_filter = topic_filter
        self.share_filter = share_filter
        self.members: Dict[str, SubscriptionRecord] = {}
        self._turn = 0
        self._sticky: Optional[str] = None

    @property
    def client_id(self) -> None:
        """A group is no client (what the broker's routing expects of a trie key)."""
        return None

    def __repr__(self) -> str:
        return f"<ShareGroup {self.share_filter!r} members={list(self.members)!r}>"


class SharedSubscriptions:
    """Every shared-subscription group of a broker.

    :param trie: the broker's :class:`~mqttd.topics.SubscriptionTrie`; a group
        is added when its first member joins and removed with its last.
    :param strategy: one of :data:`STRATEGIES`; ``ValueError`` otherwise.
    :param rng: a ``random.Random`` for the ``random`` strategy (tests pass a
        seeded one).
    """

    def __init__(self, trie, strategy: str = DEFAULT_STRATEGY,
                 rng: Optional[random.Random] = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown shared subscription strategy {strategy!r}; "
                             f"known: {', '.join(STRATEGIES)}")
        self._trie = trie
        self.strategy = strategy
        self._rng = rng if rng is not None else random.Random()
        self._groups: Dict[str, ShareGroup] = {}
        self._pick = {
            ROUND_ROBIN: self._round_robin,
            RANDOM: self._random,
            STICKY: self._sticky,
            HASH_CLIENTID: self._hash_clientid,
            HASH_TOPIC: self._hash_topic,
        }[strategy]

    # --- membership ----------------------------------------------------------

    def add(self, client_id: str, record: SubscriptionRecord) -> bool:
        """``client_id`` joins (or changes its options in) the group of
        ``record.topic_filter``; True if it was not a member yet."""
        share_filter = record.topic_filter
        group = self._groups.get(share_filter)
        if group is None:
            group = self._groups[share_filter] = ShareGroup(share_filter)
            self._trie.add(group.topic_filter, group, group)
        new = client_id not in group.members
        group.members[client_id] = record
        return new

    def remove(self, client_id: str, share_filter: str) -> bool:
        """``client_id`` leaves the group; False if it was no member.  The
        last member leaving removes the group."""
        group = self._groups.get(share_filter)
        if group is None or group.members.pop(client_id, None) is None:
            return False
        if group._sticky == client_id:
            group._sticky = None
        if not group.members:
            del self._groups[share_filter]
            self._trie.remove(group.topic_filter, group)
        return True

    def group(self, share_filter: str) -> Optional[ShareGroup]:
        """The group of ``$share/{ShareName}/{filter}``, or None."""
        return self._groups.get(share_filter)

    def __iter__(self) -> Iterator[ShareGroup]:
        return iter(list(self._groups.values()))

    def __len__(self) -> int:
        return len(self._groups)

    # --- selection -------------------------------------------------------------

    def choose(self, group: ShareGroup, topic: str, origin: Optional[str],
               availability: Callable[[str], int],
               exclude: Optional[Container[str]] = None) -> Optional[str]:
        """The client id of the member that gets one message, or None.

        ``availability(client_id)`` says :data:`ONLINE`, :data:`OFFLINE`
        (persistent session, can queue) or :data:`UNAVAILABLE`.  Online
        members first; offline ones only when no member is online.
        ``exclude``: members not to choose for this message (those that may
        not read it: the broker asks again without them).
        """
        online = []
        offline = []
        for client_id in group.members:
            if exclude and client_id in exclude:
                continue
            state = availability(client_id)
            if state == ONLINE:
                online.append(client_id)
            elif state == OFFLINE:
                offline.append(client_id)
        candidates = online or offline
        if not candidates:
            return None
        if len(candidates) == 1:
            group._sticky = candidates[0]
            return candidates[0]
        return self._pick(group, candidates, topic, origin)

    def _round_robin(self, group: ShareGroup, candidates, topic, origin) -> str:
        turn = group._turn
        group._turn = turn + 1
        return candidates[turn % len(candidates)]

    def _random(self, group: ShareGroup, candidates, topic, origin) -> str:
        return self._rng.choice(candidates)

    def _sticky(self, group: ShareGroup, candidates, topic, origin) -> str:
        current = group._sticky
        if current is None or current not in candidates:
            current = group._sticky = self._round_robin(group, candidates, topic, origin)
        return current

    def _hash_clientid(self, group: ShareGroup, candidates, topic, origin) -> str:
        key = (origin or "").encode("utf-8", "surrogatepass")
        return candidates[zlib.crc32(key) % len(candidates)]

    def _hash_topic(self, group: ShareGroup, candidates, topic, origin) -> str:
        return candidates[zlib.crc32(topic.encode("utf-8", "surrogatepass")) % len(candidates)]
