"""Retained messages: the index by topic, wildcard lookup and expiry (layer L1).

:class:`RetainedIndex` is the broker's only view of retained messages
(one per topic name [MQTT-3.3.1-5]).  Besides the topic -> message mapping it
keeps the topic names in a trie by level, so a SUBSCRIBE's filter finds its
retained messages by walking only the matching branches instead of testing
every retained topic, and a min-heap of expiry times so expired messages
[MQTT-3.3.2-5] are removed without a scan.

:meth:`RetainedIndex.cursor` walks the matches lazily: the broker replays
retained messages to a subscriber from such a cursor under flow control
(``Broker.drain``), so a client that does not read never has every retained
message queued for it at once, and a repeated SUBSCRIBE replaces its cursor.

No I/O, no clock: times are passed in (the broker clock's ``seconds()``).
"""
from __future__ import annotations

import heapq
from typing import Dict, Iterator, List, Optional, Tuple

from mqttd.messages import Message

__all__ = ["RetainedIndex", "client_retained_count"]


def client_retained_count(store) -> int:
    """How many retained messages of clients ``store`` holds (the broker's own
    volatile ``$SYS`` values not counted): what ``$SYS/broker/retained
    messages/count``, the admin API and the metrics show.  A store that holds
    them elsewhere (the cluster's, in Redis) answers with its
    ``client_count()``."""
    counter = getattr(store, "client_count", None)
    if counter is not None:
        return counter()
    return sum(1 for topic in list(store) if not topic.startswith("$SYS"))


class _Level:
    """One topic level: child levels and the message whose topic ends here."""

    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: Dict[str, _Level] = {}
        self.message: Optional[Message] = None


def _children(node: "_Level", names: List[str], depth: int, skip_dollar: bool):
    """``(child, depth)`` for each of ``names`` still a child of ``node`` when
    reached (one at a time); ``skip_dollar``: not the ``$`` topics."""
    children = node.children
    for name in names:
        if skip_dollar and name.startswith("$"):
            continue
        child = children.get(name)
        if child is not None:
            yield child, depth


class RetainedIndex:
    """Retained messages by topic name, matched by topic filter.

    The single-node :class:`~mqttd.interfaces.IRetainedStore` (declared by the
    broker core, so this L1 module imports nothing above it).

    The hot path of ``publish`` only reaches :meth:`set` / :meth:`remove` for
    messages with the RETAIN flag; lookups by exact topic are dict lookups.
    """

    def __init__(self, pause_every: int = 0) -> None:
        #: default of :meth:`cursor`'s ``pause_every`` (the broker sets it)
        self.pause_every = pause_every
        self._by_topic: Dict[str, Message] = {}
        self._root = _Level()
        #: (expires_at, topic) of messages with an expiry; stale entries are
        #: skipped when popped (the topic's message was replaced or removed)
        self._expiries: List[Tuple[float, str]] = []

    # --- mapping ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_topic)

    def __contains__(self, topic: object) -> bool:
        return topic in self._by_topic

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_topic)

    def get(self, topic: str) -> Optional[Message]:
        return self._by_topic.get(topic)

    def __getitem__(self, topic: str) -> Message:
        return self._by_topic[topic]

    def items(self):
        return self._by_topic.items()

    def values(self):
        return self._by_topic.values()

    def set(self, message: Message) -> None:
        """Make ``message`` the retained message of its topic [MQTT-3.3.1-5]."""
        topic = message.topic
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Level()
            node = child
        node.message = message
        self._by_topic[topic] = message
        if message.expires_at is not None:
            heapq.heappush(self._expiries, (message.expires_at, topic))

    def remove(self, topic: str) -> Optional[Message]:
        """Forget the retained message of ``topic``; returns it (None if none)."""
        message = self._by_topic.pop(topic, None)
        if message is None:
            return None
        path = []
        node = self._root
        for level in topic.split("/"):
            path.append((node, level))
            node = node.children[level]
        node.message = None
        # prune levels that hold nothing any more
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.message is not None or child.children:
                break
            del parent.children[level]
        return message

    def clear(self) -> None:
        self._by_topic.clear()
        self._root = _Level()
        self._expiries.clear()

    # --- expiry ---------------------------------------------------------------

    def next_expiry(self) -> Optional[float]:
        """The earliest time a retained message expires (None: no expiring ones)."""
        expiries = self._expiries
        while expiries:
            at, topic = expiries[0]
            message = self._by_topic.get(topic)
            if message is not None and message.expires_at == at:
                return at
            heapq.heappop(expiries)  # stale
        return None

    def expire(self, now: float) -> List[str]:
        """Remove every message expired at ``now`` [MQTT-3.3.2-5]; returns their topics."""
        removed = []
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            at, topic = heapq.heappop(expiries)
            message = self._by_topic.get(topic)
            if message is not None and message.expires_at == at:
                self.remove(topic)
                removed.append(topic)
        return removed

    # --- matching ---------------------------------------------------------------

    def cursor(self, topic_filter: str, now: Optional[float] = None,
               pause_every: Optional[int] = None) -> Iterator[Optional[Message]]:
        """Lazily yield the retained messages matching the plain ``topic_filter``.

        A filter starting with a wildcard does not match ``$`` topics
        [MQTT-4.7.2-1]; ``a/#`` also matches ``a`` [MQTT-4.7.1-2].  Messages
        expired at ``now`` (if given) are skipped.  Safe while the index
        changes: each level's children are copied when the walk reaches it,
        and a message is read when it is yielded (a replaced message is
        yielded in its newest form, a removed one not at all).

        :param pause_every: when > 0, also yield ``None`` after visiting that
            many index nodes without a message to yield, so that one step of
            the cursor costs a bounded amount of work however wide the index
            is around the filter (``+/x`` over a million topics, a ``#``
            subtree of expired messages); the broker's replay counts it.
            Default: :attr:`pause_every`.
        """
        if pause_every is None:
            pause_every = self.pause_every
        levels = topic_filter.split("/")
        last = len(levels)
        visited = 0
        # depth-first over frames: iterators of (node, depth), depth = index of the
        # next filter level; a "+" level's children are taken one at a time from a
        # copy of their names (no object per child made up front: a level of a
        # million topics costs one list, not a million tuples for the collector)
        frames = [iter(((self._root, 0),))]
        while frames:
            item = next(frames[-1], None)
            if item is None:
                frames.pop()
                continue
            node, depth = item
            if pause_every:
                visited += 1
                if visited >= pause_every:
                    visited = 0
                    yield None
            if depth == last:
                message = node.message
                if message is not None and (now is None or message.expires_at is None
                                            or message.expires_at > now):
                    yield message
                continue
            level = levels[depth]
            if level == "#":
                # this level (the parent, "a/#" matches "a") and everything below
                yield from self._subtree(node, now, root=depth == 0,
                                         include_self=depth > 0, pause_every=pause_every)
                continue
            if level == "+":
                # [MQTT-4.7.2-1]: a leading wildcard does not match "$" topics
                frames.append(_children(node, list(node.children), depth + 1, depth == 0))
                continue
            child = node.children.get(level)
            if child is not None:
                frames.append(iter(((child, depth + 1),)))

    def _subtree(self, node: _Level, now: Optional[float], root: bool,
                 include_self: bool, pause_every: int = 0) -> Iterator[Optional[Message]]:
        if include_self:
            message = node.message
            if message is not None and (now is None or message.expires_at is None
                                        or message.expires_at > now):
                yield message
        # pre-order, depth-first, children in insertion order, each level's names
        # copied when the walk reaches it (see cursor)
        frames = [_children(node, list(node.children), 0, root)]  # [MQTT-4.7.2-1]
        visited = 0
        while frames:
            item = next(frames[-1], None)
            if item is None:
                frames.pop()
                continue
            current = item[0]
            if pause_every:
                visited += 1
                if visited >= pause_every:
                    visited = 0
                    yield None
            message = current.message
            if message is not None and (now is None or message.expires_at is None
                                        or message.expires_at > now):
                yield message
            if current.children:
                frames.append(_children(current, list(current.children), 0, False))

    def match(self, topic_filter: str, now: Optional[float] = None) -> List[Message]:
        """All retained messages matching ``topic_filter`` (see :meth:`cursor`)."""
        return [m for m in self.cursor(topic_filter, now, 0) if m is not None]
