"""ACL files in mosquitto's syntax, and the authorizer that applies them.

Syntax (``acl_file`` of mosquitto.conf(5))::

    # comment
    topic read public/#              <- before the first "user": anonymous clients
    user alice
    topic readwrite alice/#          <- "topic FILTER" alone means readwrite
    topic deny alice/secret/#
    pattern write devices/%c/status  <- every client; %c client id, %u username

Access: ``read``, ``write``, ``readwrite`` or ``deny``.  The filter is the
rest of the line (it may contain spaces).  A pattern whose ``%c``/``%u`` value
is missing (anonymous ``%u``) or contains ``+``, ``#`` or ``/`` never matches.
Both are substituted in one pass over the pattern (as mosquitto does): a user
name containing ``%c`` is taken literally, never given the client id.

Decisions, for a client's rules (its ``user`` block, or the anonymous block,
plus every ``pattern``):

- PUBLISH to topic T (and the will topic at CONNECT): refused if a ``deny``
  rule matches T, else allowed if a ``write``/``readwrite`` rule matches T.
- delivery of a message on topic T (live and retained): the same with
  ``read``/``readwrite`` -- so a ``#`` subscriber only receives what it may read.
- SUBSCRIBE to filter F: refused if a ``deny`` rule covers F (every topic F
  matches is denied) or if no ``read``/``readwrite`` rule overlaps F (F could
  never deliver anything).  mosquitto lets every SUBSCRIBE through and only
  filters at delivery; mqttd answers such filters with 0x87 (v3: 0x80), and
  still filters at delivery.
- everything else is refused.  Topics starting with ``$`` are only matched by
  rules that start with ``$`` [MQTT-4.7.2-1].

Decisions are cached per client and topic (bounded; cleared on reload), so
the per-message cost with a 100-rule file is one dict lookup.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from mqttd import topics
from mqttd.interfaces import IAuthorizer

log = Logger(namespace="mqttd.auth.acl")

READ, WRITE, DENY = 1, 2, 4
#: cache key kind of SUBSCRIBE decisions (filters, not topic names)
_SUBSCRIBE = 8
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}


class ACLFileError(ValueError):
    """A line of an ACL file cannot be read (message names file and line)."""


@attrs.frozen
class Rule:
    access: int          # READ | WRITE, or DENY
    topic_filter: str    # may hold %c / %u for patterns
    pattern: bool = False


@attrs.frozen
class ACL:
    """The parsed file: anonymous rules, rules per user, patterns."""

    anonymous: Tuple[Rule, ...] = ()
    users: Dict[str, Tuple[Rule, ...]] = attrs.Factory(dict)
    patterns: Tuple[Rule, ...] = ()

    @property
    def rule_count(self) -> int:
        return len(self.anonymous) + len(self.patterns) + sum(map(len, self.users.values()))

    def rules_for(self, client_id: str, username: Optional[str]) -> List[Rule]:
        """The rules of one client, patterns substituted (unusable ones dropped)."""
        own = self.anonymous if username is None else self.users.get(username, ())
        rules = list(own)
        values = {"%u": username, "%c": client_id}
        for rule in self.patterns:
            text = rule.topic_filter
            user_token, client_token = "%u" in text, "%c" in text
            if user_token and (username is None or _unsafe(username)):
                continue
            if client_token and _unsafe(client_id):
                continue
            if user_token or client_token:
                # one pass over the pattern's own text: a value is never
                # scanned again, so a user name holding "%c" stays literal
                # (REVIEW-SEC2 N10)
                text = _TOKEN.sub(lambda found: values[found.group(0)], text)
            rules.append(Rule(rule.access, text, True))
        return rules


_TOKEN = re.compile("%[cu]")


def _unsafe(value: str) -> bool:
    return not value or "+" in value or "#" in value or "/" in value


def parse_acl(text: str, source: str = "<acl>") -> ACL:
    """Parse mosquitto ACL text; :class:`ACLFileError` on a bad line."""
    anonymous: List[Rule] = []
    users: Dict[str, List[Rule]] = {}
    patterns: List[Rule] = []
    current: List[Rule] = anonymous
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                raise ACLFileError(f"{where}: 'user' without a name")
            current = users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            raise ACLFileError(f"{where}: unknown keyword {keyword!r} "
                               "(expected user, topic or pattern)")
        first, _, remainder = rest.partition(" ")
        if first in _ACCESS:
            access, topic_filter = _ACCESS[first], remainder.strip()
        else:
            access, topic_filter = READ | WRITE, rest
        if not topic_filter:
            raise ACLFileError(f"{where}: {keyword} without a topic filter")
        try:
            topics.validate_topic_filter(topic_filter.replace("%c", "c").replace("%u", "u"))
        except Exception as error:
            raise ACLFileError(f"{where}: invalid topic filter {topic_filter!r}: "
                               f"{error}") from None
        if keyword == "pattern":
            patterns.append(Rule(access, topic_filter, True))
        else:
            current.append(Rule(access, topic_filter))
    return ACL(tuple(anonymous), {u: tuple(r) for u, r in users.items()}, tuple(patterns))


def read_acl_file(path: str) -> ACL:
    with open(path, encoding="utf-8") as f:
        return parse_acl(f.read(), path)


# --- filter algebra -------------------------------------------------------------------

def _dollar_mismatch(a: str, b: str) -> bool:
    """A wildcard-led filter never meets a ``$`` level [MQTT-4.7.2-1]."""
    a0, b0 = a[:1], b[:1]
    return (a0 == "$" and b0 in ("+", "#")) or (b0 == "$" and a0 in ("+", "#"))


def overlaps(first: str, second: str) -> bool:
    """True if some topic name matches both filters."""
    if _dollar_mismatch(first, second):
        return False
    a, b = first.split("/"), second.split("/")
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and x != "+" and y != "+":
            return False
    return True


def covers(outer: str, inner: str) -> bool:
    """True if every topic name matching ``inner`` also matches ``outer``."""
    if inner.startswith("$") and outer[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    o, n = outer.split("/"), inner.split("/")
    for i, level in enumerate(o):
        if level == "#":
            return True
        if i >= len(n):
            return False
        if n[i] == "#":
            return False
        if level != "+" and (n[i] == "+" or n[i] != level):
            return False
    return len(o) == len(n)


# --- the authorizer -------------------------------------------------------------------

#: bytes one cached decision is counted for beyond its topic's characters
#: (a dict slot, the str object's header, the bool)
DECISION_OVERHEAD = 100

@attrs.define(eq=False)
class _ClientView:
    """One client's rules and its cached decisions, one dict per kind of access."""

    username: Optional[str]
    rules: List[Rule]
    write: Dict[str, bool] = attrs.Factory(dict)
    read: Dict[str, bool] = attrs.Factory(dict)
    subscribe: Dict[str, bool] = attrs.Factory(dict)
    #: bytes its cached decisions are counted for (see ACLAuthorizer)
    cached_bytes: int = 0

    def table(self, access: int) -> Dict[str, bool]:
        return self.write if access == WRITE else (
            self.read if access == READ else self.subscribe)


@implementer(IAuthorizer)
class ACLAuthorizer:
    """The broker's ``authorize_*`` hooks from an :class:`ACL`.

    :param acl: the rules (see :func:`read_acl_file`).
    :param path: the file, for :meth:`reload`.
    :param cache_size: decisions cached per client and kind of access (then
        that table starts over).
    :param max_clients: clients with a cache (then all caches start over).
    :param cache_bytes: bytes all cached decisions may take together, each
        counted as its topic's length plus :data:`DECISION_OVERHEAD` (default
        16 MiB; then all caches start over, counted in ``cache_resets``).
    :param max_cached_topic: topics (filters) longer than this many
        characters are decided every time, never cached (default 256).

    The bounds are in bytes, not only in entries, and a client's decisions
    are dropped when it disconnects (:meth:`forget`, wired to the broker's
    ``clientDisconnected`` event by :class:`mqttd.auth.setup.Security`):
    before, 4,096 topics of 16 KB per client id stayed after it left, +60 MB
    of RSS per client id for publishes that were all refused (REVIEW-S10 S9).
    """

    def __init__(self, acl: ACL, path: Optional[str] = None, cache_size: int = 4096,
                 max_clients: int = 100_000, cache_bytes: int = 16 * 1024 * 1024,
                 max_cached_topic: int = 256):
        self.acl = acl
        self.path = path
        self.cache_size = cache_size
        self.max_clients = max_clients
        self.cache_bytes = cache_bytes
        self.max_cached_topic = max_cached_topic
        self._views: Dict[str, _ClientView] = {}
        #: bytes counted for every view's cached decisions
        self.cached_bytes = 0
        #: times the whole cache started over (byte budget or max_clients)
        self.cache_resets = 0

    @classmethod
    def from_file(cls, path: str) -> "ACLAuthorizer":
        return cls(read_acl_file(path), path)

    def reload(self) -> None:
        """Read the file again (raises, keeping the old rules, if it is bad)."""
        acl = read_acl_file(self.path)
        self.acl = acl
        self._views = {}
        self.cached_bytes = 0
        log.info("ACL file {path}: {count} rules", path=self.path, count=acl.rule_count)

    def forget(self, client_id: str) -> None:
        """Drop the cached decisions of ``client_id`` (it disconnected)."""
        view = self._views.pop(client_id, None)
        if view is not None:
            self.cached_bytes -= view.cached_bytes

    def _start_over(self) -> None:
        self._views = {}
        self.cached_bytes = 0
        self.cache_resets += 1

    def _view(self, client) -> _ClientView:
        view = self._views.get(client.client_id)
        if view is None or view.username != client.username:
            if view is not None:
                self.cached_bytes -= view.cached_bytes
            if len(self._views) >= self.max_clients:
                self._start_over()
            view = self._views[client.client_id] = _ClientView(
                client.username, self.acl.rules_for(client.client_id, client.username))
        return view

    def _decide(self, client, access: int, topic: str) -> bool:
        view = self._view(client)
        table = view.table(access)
        decision = table.get(topic)
        if decision is None:
            if access == _SUBSCRIBE:
                decision = self._filter_allowed(view.rules, topic)
            else:
                decision = self._topic_allowed(view.rules, access, topic)
            if len(topic) > self.max_cached_topic:
                return decision       # long topics are decided every time
            cost = len(topic) + DECISION_OVERHEAD
            if len(table) >= self.cache_size:
                freed = sum(len(key) + DECISION_OVERHEAD for key in table)
                view.cached_bytes -= freed
                self.cached_bytes -= freed
                table.clear()
            if self.cached_bytes + cost > self.cache_bytes:
                self._start_over()
                view = self._view(client)
                table = view.table(access)
            table[topic] = decision
            view.cached_bytes += cost
            self.cached_bytes += cost
        return decision

    @staticmethod
    def _topic_allowed(rules: List[Rule], access: int, topic: str) -> bool:
        granted = False
        for rule in rules:
            if not topics.matches(rule.topic_filter, topic):
                continue
            if rule.access & DENY:
                return False
            if rule.access & access:
                granted = True
        return granted

    @staticmethod
    def _filter_allowed(rules: List[Rule], topic_filter: str) -> bool:
        readable = False
        for rule in rules:
            if rule.access & DENY:
                if covers(rule.topic_filter, topic_filter):
                    return False
            elif rule.access & READ and overlaps(rule.topic_filter, topic_filter):
                readable = True
        return readable

    # IAuthorizer (publish and forward run per message: the cached answer first)
    def authorize_publish(self, client, message) -> bool:
        view = self._views.get(client.client_id)
        if view is not None and view.username == client.username:
            decision = view.write.get(message.topic)
            if decision is not None:
                return decision
        return self._decide(client, WRITE, message.topic)

    def authorize_forward(self, client, message) -> bool:
        view = self._views.get(client.client_id)
        if view is not None and view.username == client.username:
            decision = view.read.get(message.topic)
            if decision is not None:
                return decision
        return self._decide(client, READ, message.topic)

    def authorize_subscribe(self, client, topic_filter: str, qos: int) -> bool:
        # a shared subscription $share/{ShareName}/{filter} reads what
        # {filter} matches: the rules apply to that filter
        return self._decide(client, _SUBSCRIBE, topics.parse_shared(topic_filter)[1])

    def revalidate_subscription(self, client, topic_filter: str) -> bool:
        return self._decide(client, _SUBSCRIBE, topics.parse_shared(topic_filter)[1])

__all__ = ["ACL", "ACLAuthorizer", "ACLFileError", "Rule", "covers", "overlaps",
           "parse_acl", "read_acl_file"]
