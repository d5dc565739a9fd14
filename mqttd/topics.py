"""Topic names, topic filters and the subscription trie (layer L1).

Validation raises :class:`~mqttd.codec.errors.MQTTError` carrying the MQTT 5
reason code (``TOPIC_NAME_INVALID`` 0x90 / ``TOPIC_FILTER_INVALID`` 0x8F) and
the normative statement enforced.

:func:`matches` is the straightforward reference matcher.
:class:`SubscriptionTrie` is the one the broker uses on the hot path: it walks
the topic level by level (the topic is split once), with dict lookups for the
exact level plus the ``+`` and ``#`` children, and caches match results per
topic name.

Shared subscriptions (``$share/{ShareName}/{filter}``) are validated and
parsed here; the trie itself only stores plain filters (the broker stores the
inner filter with a key such as ``("$share", group)``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple

from mqttd.codec.errors import MQTTError, ReasonCode

__all__ = [
    "validate_topic_name",
    "validate_topic_filter",
    "parse_shared",
    "is_wildcard",
    "matches",
    "SubscriptionTrie",
    "SHARE_PREFIX",
    "MAX_TOPIC_BYTES",
]

#: prefix of a shared subscription filter [MQTT-4.8.2]
SHARE_PREFIX = "$share/"

#: a UTF-8 encoded string is at most 65535 bytes long [MQTT-1.5.4]
MAX_TOPIC_BYTES = 65535

# every code point takes at most 4 bytes in UTF-8: strings this short
# cannot be too long, so the common case skips the encode.
_SAFE_LEN = MAX_TOPIC_BYTES // 4


def _too_long(s: str) -> Optional[str]:
    """Return an error text if *s* is not encodable or over 65535 bytes."""
    if len(s) <= _SAFE_LEN:
        # still reject lone surrogates, which are not well-formed UTF-8
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return "is not well-formed UTF-8"
        return None
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not well-formed UTF-8"
    if n > MAX_TOPIC_BYTES:
        return f"is {n} bytes long (max {MAX_TOPIC_BYTES})"
    return None


def _name_error(message: str, spec: Optional[str]) -> MQTTError:
    return MQTTError(message, reason_code=ReasonCode.TOPIC_NAME_INVALID, spec=spec)


def _filter_error(message: str, spec: Optional[str]) -> MQTTError:
    return MQTTError(message, reason_code=ReasonCode.TOPIC_FILTER_INVALID, spec=spec)


def validate_topic_name(name: str) -> None:
    """Raise ``MQTTError(TOPIC_NAME_INVALID)`` unless *name* is a valid topic name.

    ``$``-topics are valid names (the server may refuse publishing to them,
    but that is policy, not syntax).
    """
    if not name:
        raise _name_error("topic name is empty", "MQTT-4.7.3-1")
    if "+" in name or "#" in name:
        raise _name_error("topic name contains a wildcard", "MQTT-3.3.2-2")
    if "\x00" in name:
        raise _name_error("topic name contains U+0000", "MQTT-4.7.3-2")
    err = _too_long(name)
    if err is not None:
        raise _name_error("topic name " + err, "MQTT-1.5.4-1")


def _validate_plain_filter(topic_filter: str, what: str = "topic filter") -> None:
    if not topic_filter:
        raise _filter_error(what + " is empty", "MQTT-4.7.3-1")
    if "+" in topic_filter or "#" in topic_filter:
        levels = topic_filter.split("/")
        last = len(levels) - 1
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != last):
                raise _filter_error(
                    what + ": '#' must be alone in the last level", "MQTT-4.7.1-2")
            if "+" in level and level != "+":
                raise _filter_error(
                    what + ": '+' must occupy an entire level", "MQTT-4.7.1-3")


def validate_topic_filter(topic_filter: str) -> None:
    """Raise ``MQTTError(TOPIC_FILTER_INVALID)`` unless *topic_filter* is valid.

    Accepts plain filters and shared subscription filters
    ``$share/{ShareName}/{filter}``.
    """
    if not topic_filter:
        raise _filter_error("topic filter is empty", "MQTT-4.7.3-1")
    if "\x00" in topic_filter:
        raise _filter_error("topic filter contains U+0000", "MQTT-4.7.3-2")
    err = _too_long(topic_filter)
    if err is not None:
        raise _filter_error("topic filter " + err, "MQTT-1.5.4-1")
    if topic_filter.startswith(SHARE_PREFIX):
        share_name, sep, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
        if not share_name:
            raise _filter_error("shared subscription has an empty ShareName",
                                "MQTT-4.8.2-1")
        if "+" in share_name or "#" in share_name:
            raise _filter_error("ShareName contains a wildcard", "MQTT-4.8.2-2")
        if not sep or not inner:
            raise _filter_error("shared subscription has no topic filter",
                                "MQTT-4.8.2-2")
        _validate_plain_filter(inner, "shared subscription topic filter")
        return
    _validate_plain_filter(topic_filter)


def parse_shared(topic_filter: str) -> Tuple[Optional[str], str]:
    """Split ``$share/group/a/b`` into ``("group", "a/b")``.

    Anything not starting with ``$share/`` gives ``(None, topic_filter)``.
    Does not validate: call :func:`validate_topic_filter` first (for the
    invalid ``$share/group`` this returns ``("group", "")``).
    """
    if topic_filter.startswith(SHARE_PREFIX):
        share_name, _, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
        return share_name, inner
    return None, topic_filter


def is_wildcard(topic_filter: str) -> bool:
    """True if the filter contains ``+`` or ``#`` (a shared filter's inner part)."""
    return "+" in topic_filter or "#" in topic_filter


def matches(topic_filter: str, topic_name: str) -> bool:
    """Reference matcher: does the plain *topic_filter* match *topic_name*?

    Both arguments are assumed valid.  ``#`` also matches the parent level
    (``sport/#`` matches ``sport``) [MQTT-4.7.1-2]; ``+`` matches an empty
    level; leading and trailing ``/`` make real (empty) levels.  A filter
    starting with a wildcard does not match a ``$`` topic [MQTT-4.7.2-1].
    """
    if topic_name.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    flevels = topic_filter.split("/")
    tlevels = topic_name.split("/")
    for i, flevel in enumerate(flevels):
        if flevel == "#":
            return True
        if i >= len(tlevels):
            return False
        if flevel != "+" and flevel != tlevels[i]:
            return False
    return len(flevels) == len(tlevels)


class _Node:
    """One level of the trie.

    ``children`` maps a level string (including ``"+"`` and ``"#"``) to a
    node; ``subs`` maps subscriber key to value for the filter ending here;
    both are ``None`` while empty to keep leaf and inner nodes small.
    """

    __slots__ = ("children", "subs", "topic_filter")

    def __init__(self) -> None:
        self.children: Optional[Dict[str, _Node]] = None
        self.subs: Optional[Dict[Hashable, Any]] = None
        self.topic_filter: Optional[str] = None


Match = Tuple[str, Hashable, Any]

#: topic names longer than this many characters are never kept as keys of
#: caches (the match cache, the merged-matches cache, the outbound topic
#: alias table): a client chooses them, up to 65,535 bytes each
CACHED_NAME_LIMIT = 256


class SubscriptionTrie:
    """Topic filters -> subscribers, matched by topic name.

    A subscriber is a hashable *key* (a client id, ``("$share", group)``...)
    with an arbitrary *value* (its subscription options).  Filters are plain
    (not ``$share/...``) and are validated on :meth:`add`; topic names given
    to :meth:`match` must be valid (:func:`validate_topic_name`).

    :param cache_size: how many topic names keep their :meth:`match` result
        (bounded, least recently used evicted first); ``0`` disables it.
        Bounded in bytes too: names longer than :data:`CACHED_NAME_LIMIT`
        characters are matched every time, never kept, and the kept results
        hold at most ``cache_matches`` (filter, key, value) entries in all
        (REVIEW-S10 S14: 10,000 names of 60 KB pinned ~600 MB).
        Adding or removing a filter without wildcards drops only the one
        cached topic it can match; a wildcard filter clears the cache.
    """

    __slots__ = ("_root", "_count", "_cache", "_cache_size", "_cache_matches",
                 "_cached_matches")

    def __init__(self, cache_size: int = 10000, cache_matches: int = 1_000_000) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._root = _Node()
        self._count = 0
        self._cache_size = cache_size
        self._cache_matches = cache_matches
        #: (filter, key, value) entries in the cached results
        self._cached_matches = 0
        self._cache: Optional["OrderedDict[str, List[Match]]"] = (
            OrderedDict() if cache_size else None)

    # -- mutation ---------------------------------------------------------

    def _invalidate(self, topic_filter: str) -> None:
        cache = self._cache
        if cache:
            if "+" in topic_filter or "#" in topic_filter:
                cache.clear()
                self._cached_matches = 0
            else:
                # a filter without wildcards matches exactly one topic name
                dropped = cache.pop(topic_filter, None)
                if dropped is not None:
                    self._cached_matches -= len(dropped)

    def add(self, topic_filter: str, key: Hashable, value: Any) -> bool:
        """Subscribe *key* to *topic_filter* with *value*.

        Returns True if (filter, key) is new; otherwise replaces the value
        and returns False.  Raises ``MQTTError(TOPIC_FILTER_INVALID)`` for
        an invalid filter.
        """
        validate_topic_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(level)
            if child is None:
                child = children[level] = _Node()
            node = child
        subs = node.subs
        if subs is None:
            subs = node.subs = {}
            node.topic_filter = topic_filter
        new = key not in subs
        subs[key] = value
        if new:
            self._count += 1
        self._invalidate(topic_filter)
        return new

    def remove(self, topic_filter: str, key: Hashable) -> bool:
        """Unsubscribe *key* from *topic_filter*; False if it was not subscribed.

        Nodes left without subscribers or children are pruned.
        """
        path: List[Tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            children = node.children
            child = children.get(level) if children is not None else None
            if child is None:
                return False
            path.append((node, level))
            node = child
        subs = node.subs
        if not subs or key not in subs:
            return False
        del subs[key]
        self._count -= 1
        if not subs:
            node.subs = None
            node.topic_filter = None
            # prune upwards while nodes are empty
            for parent, level in reversed(path):
                if node.subs is not None or node.children:
                    break
                children = parent.children
                del children[level]
                if not children:
                    parent.children = None
                node = parent
        self._invalidate(topic_filter)
        return True

    def clear(self) -> None:
        """Remove every subscription."""
        self._root = _Node()
        self._count = 0
        if self._cache is not None:
            self._cache.clear()
            self._cached_matches = 0

    # -- queries ----------------------------------------------------------

    def get(self, topic_filter: str, key: Hashable) -> Any:
        """The value stored for (*topic_filter*, *key*), or None."""
        node = self._root
        for level in topic_filter.split("/"):
            children = node.children
            if children is None:
                return None
            node = children.get(level)
            if node is None:
                return None
        subs = node.subs
        if subs is None:
            return None
        return subs.get(key)

    def __len__(self) -> int:
        """Number of (filter, key) entries."""
        return self._count

    def __contains__(self, topic_filter: object) -> bool:
        """True if some key is subscribed to exactly *topic_filter*."""
        if not isinstance(topic_filter, str):
            return False
        node = self._root
        for level in topic_filter.split("/"):
            children = node.children
            if children is None:
                return False
            node = children.get(level)
            if node is None:
                return False
        return node.subs is not None

    def _nodes(self) -> Iterator[_Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(node.children.values())

    def filters(self) -> Iterator[str]:
        """Each distinct filter with at least one subscriber (no order)."""
        for node in self._nodes():
            if node.subs:
                yield node.topic_filter  # type: ignore[misc]

    def items(self) -> Iterator[Match]:
        """Every (filter, key, value) entry (no order)."""
        for node in self._nodes():
            if node.subs:
                f = node.topic_filter
                for key, value in node.subs.items():
                    yield (f, key, value)  # type: ignore[misc]

    def node_count(self) -> int:
        """Number of trie nodes, root included (1 when empty)."""
        return sum(1 for _ in self._nodes())

    def match(self, topic_name: str) -> List[Match]:
        """Every (filter, key, value) whose filter matches *topic_name*.

        The same key may appear several times with different filters; the
        caller merges overlapping subscriptions [MQTT-3.3.5-1].  The list may
        be shared with the cache: treat it as read-only.
        """
        cache = self._cache
        if cache is not None:
            result = cache.get(topic_name)
            if result is not None:
                cache.move_to_end(topic_name)
                return result
            result = self._match(topic_name)
            if len(topic_name) > CACHED_NAME_LIMIT:
                return result     # a long name is matched every time, never kept
            while cache and (len(cache) >= self._cache_size or
                             self._cached_matches + len(result) > self._cache_matches):
                self._cached_matches -= len(cache.popitem(last=False)[1])
            if len(result) <= self._cache_matches:
                cache[topic_name] = result
                self._cached_matches += len(result)
            return result
        return self._match(topic_name)

    def _match(self, topic_name: str) -> List[Match]:
        out: List[Match] = []
        children = self._root.children
        if children is None:
            return out
        levels = topic_name.split("/")
        nodes: List[_Node] = []
        # first level: wildcards do not match '$' topics [MQTT-4.7.2-1]
        if topic_name[:1] != "$":
            node = children.get("#")
            if node is not None and node.subs:
                f = node.topic_filter
                out.extend([(f, k, v) for k, v in node.subs.items()])
            node = children.get("+")
            if node is not None:
                nodes.append(node)
        node = children.get(levels[0])
        if node is not None:
            nodes.append(node)
        for i in range(1, len(levels)):
            if not nodes:
                return out
            level = levels[i]
            nxt: List[_Node] = []
            for parent in nodes:
                children = parent.children
                if children is None:
                    continue
                node = children.get("#")
                if node is not None and node.subs:
                    f = node.topic_filter
                    out.extend([(f, k, v) for k, v in node.subs.items()])
                node = children.get(level)
                if node is not None:
                    nxt.append(node)
                node = children.get("+")
                if node is not None:
                    nxt.append(node)
            nodes = nxt
        # nodes consumed every level: their own subscribers match, and so do
        # those of a '#' child ("sport/#" matches "sport") [MQTT-4.7.1-2]
        for parent in nodes:
            subs = parent.subs
            if subs:
                f = parent.topic_filter
                out.extend([(f, k, v) for k, v in subs.items()])
            children = parent.children
            if children is not None:
                node = children.get("#")
                if node is not None and node.subs:
                    f = node.topic_filter
                    out.extend([(f, k, v) for k, v in node.subs.items()])
        return out


def is_bridge_state_topic(topic: str) -> bool:
    """True for ``$SYS/broker/connection/<id>/state``: the one ``$SYS`` topic a
    bridging broker (connected with the bridge bit) may publish to, as mosquitto
    bridges do with ``notifications true``."""
    parts = topic.split("/")
    return (len(parts) == 5 and parts[0] == "$SYS" and parts[1] == "broker"
            and parts[2] == "connection" and parts[3] != "" and parts[4] == "state"
            and "+" not in parts[3] and "#" not in parts[3])
