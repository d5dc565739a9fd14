"""MQTT 5 topic aliases, one table per direction and per network connection (layer L1).

A topic alias is a number (1..Topic Alias Maximum) that stands for a topic name
on one network connection; the mappings never outlive the connection
[MQTT-3.3.2-7].

- :class:`InboundAliases` resolves the aliases a client sends.  The server
  announces its maximum in CONNACK (``--max-topic-alias``, default 10) and
  accepts every alias up to it [MQTT-3.3.2-12]; an alias of 0 or above it is
  answered with DISCONNECT 0x94 Topic Alias invalid [MQTT-3.3.2-8,
  MQTT-3.3.2-9], an unknown alias with an empty topic name is
  a Protocol Error (0x82).
- :class:`OutboundAliases` chooses the aliases the server sends, at most the
  client's own Topic Alias Maximum from its CONNECT [MQTT-3.3.2-11]: the connection's most recently used topics keep an alias
  (least recently used replaced first), so a subscriber that receives the
  same few topics again and again gets them as a 2-byte number.

Nothing here does I/O; the connection calls these per PUBLISH.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Tuple

from mqttd.codec.errors import MQTTError, ProtocolError, ReasonCode

__all__ = ["InboundAliases", "OutboundAliases", "DEFAULT_MAX_TOPIC_ALIAS"]

#: Topic Alias Maximum the server announces unless configured otherwise
DEFAULT_MAX_TOPIC_ALIAS = 10


class InboundAliases:
    """Aliases set by the client on one connection.

    :param maximum: the Topic Alias Maximum announced in CONNACK (0..65535;
        0 means the client may not use aliases at all [MQTT-3.2.2-17]).
    """

    __slots__ = ("maximum", "_topics")

    def __init__(self, maximum: int) -> None:
        if not 0 <= maximum <= 65535:
            raise ValueError(f"topic alias maximum must be 0..65535, got {maximum}")
        self.maximum = maximum
        self._topics: Dict[int, str] = {}

    def resolve(self, topic: str, alias: int) -> str:
        """The topic name of a PUBLISH carrying Topic Alias ``alias``.

        A non-empty ``topic`` (re)binds the alias to it; an empty one uses the
        existing binding.

        :raises MQTTError: 0x94 for an alias of 0 or above the maximum
            [MQTT-3.3.2-8, MQTT-3.3.2-9]; ProtocolError (0x82) for an empty
            topic name with an alias that has no mapping on this connection.
        """
        if alias == 0 or alias > self.maximum:
            raise MQTTError(
                f"topic alias {alias} outside 1..{self.maximum} (the Topic Alias Maximum "
                f"announced in CONNACK)", ReasonCode.TOPIC_ALIAS_INVALID,
                spec="MQTT-3.3.2-9" if alias else "MQTT-3.3.2-8")
        if topic:
            self._topics[alias] = topic
            return topic
        known = self._topics.get(alias)
        if known is None:
            raise ProtocolError(f"topic alias {alias} used with an empty topic name before "
                                f"it was set on this connection", spec="MQTT 5.0 §3.3.2.3.4")
        return known

    def __len__(self) -> int:
        return len(self._topics)


class OutboundAliases:
    """Aliases the server assigns to the topics it sends on one connection.

    :param maximum: the client's Topic Alias Maximum from CONNECT (1..65535);
        the server never sends an alias above it [MQTT-3.3.2-11].

    Least recently used replacement: the ``maximum`` topics sent most recently
    hold the aliases; a new topic takes the alias of the least recently used
    one (sent with its full name, so the client rebinds it).
    """

    __slots__ = ("maximum", "_aliases")

    def __init__(self, maximum: int) -> None:
        if not 0 < maximum <= 65535:
            raise ValueError(f"topic alias maximum must be 1..65535, got {maximum}")
        self.maximum = maximum
        #: topic -> alias, least recently used first
        self._aliases: "OrderedDict[str, int]" = OrderedDict()

    def alias_for(self, topic: str) -> Tuple[int, bool]:
        """``(alias, known)`` to send ``topic`` with; changes nothing.

        ``known`` True: the client already maps ``alias`` to ``topic``, send an
        empty topic name; False: send the full topic name with the alias so the
        client (re)binds it.  Call :meth:`sent` once the PUBLISH is written (a
        PUBLISH that is not sent must not change the table).
        """
        aliases = self._aliases
        alias = aliases.get(topic)
        if alias is not None:
            return alias, True
        if len(aliases) < self.maximum:
            return len(aliases) + 1, False
        return next(iter(aliases.values())), False    # the least recently used

    def sent(self, topic: str, alias: int, known: bool) -> None:
        """Record that ``topic`` went out with ``alias`` (as :meth:`alias_for` said)."""
        aliases = self._aliases
        if known:
            aliases.move_to_end(topic)
            return
        if len(aliases) >= self.maximum:
            aliases.popitem(last=False)
        aliases[topic] = alias

    def lookup(self, topic: str) -> Optional[int]:
        """The alias ``topic`` currently has, without touching the LRU order."""
        return self._aliases.get(topic)

    def __len__(self) -> int:
        return len(self._aliases)
