"""The mesh guard: each message is accepted once per broker, and never circulates.

No Local (and the bridge bit) stop a message from echoing back over the link
it came in on; they cannot stop it in a cycle of three or more brokers
(A -> B -> C -> A), nor stop a broker that is reachable by two paths from
getting it twice.  The guard closes both holes on MQTT 5 links with two user
properties that travel with the message:

``mqttd-mid``
    ``<broker_id>:<boot>:<n>``, stamped once, by the first bridged mqttd that
    accepts the message (a local publish).  Every mqttd with bridges remembers
    the ids it accepted (``window`` entries, oldest forgotten first) and drops
    a message whose id it has seen: a second copy, or one that went round.
``mqttd-path``
    the comma-separated broker ids that accepted it; a message whose path
    holds our own id, or already ``hop_limit`` ids, is dropped.

Dropped copies are acknowledged as usual (so nothing is re-sent) and counted
in :attr:`MeshGuard.dropped`.  Limits: MQTT 3.1.1 links cannot carry
properties, so a cycle that contains a v3 link relies on No Local / the
bridge bit only and may deliver duplicates — use ``mqttv50`` for meshes, or
trees.  mosquitto forwards the properties unchanged but does not check them.
"""
from __future__ import annotations

import collections
import os

import attrs
from twisted.logger import Logger

from mqttd.messages import Message

log = Logger(namespace="mqttd.bridge.mesh")

MID = "mqttd-mid"
PATH = "mqttd-path"


class MeshGuard:
    """A broker publish filter (see :meth:`mqttd.broker.Broker.add_publish_filter`)."""

    def __init__(self, broker_id: str, hop_limit: int = 8, window: int = 100_000):
        self.broker_id = broker_id
        self.hop_limit = hop_limit
        self.window = window
        self._boot = os.urandom(4).hex()
        self._counter = 0
        self._seen: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        #: messages dropped by reason: "duplicate", "loop", "hop-limit"
        self.dropped = {"duplicate": 0, "loop": 0, "hop-limit": 0}

    def __call__(self, message: Message, client) -> "Message | None":
        if message.topic.startswith("$"):
            return message
        props = message.properties
        user = props.user_properties
        mid = path = None
        if user:
            for name, value in user:
                if name == MID:
                    mid = value
                elif name == PATH:
                    path = value
        if mid is None:
            self._counter += 1
            mid = f"{self.broker_id}:{self._boot}:{self._counter}"
            self._remember(mid)
            return attrs.evolve(message, properties=attrs.evolve(
                props, user_properties=tuple(user) + ((MID, mid), (PATH, self.broker_id))))
        hops = path.split(",") if path else []
        if mid in self._seen:
            return self._drop("duplicate", message, mid)
        if self.broker_id in hops:
            return self._drop("loop", message, mid)
        if len(hops) >= self.hop_limit:
            return self._drop("hop-limit", message, mid)
        self._remember(mid)
        hops.append(self.broker_id)
        rest = tuple((n, v) for n, v in user if n != PATH)
        return attrs.evolve(message, properties=attrs.evolve(
            props, user_properties=rest + ((PATH, ",".join(hops)),)))

    def _remember(self, mid: str) -> None:
        seen = self._seen
        seen[mid] = None
        if len(seen) > self.window:
            seen.popitem(last=False)

    def _drop(self, reason: str, message: Message, mid: str):
        self.dropped[reason] += 1
        log.debug("Mesh guard dropped {topic} ({mid}): {reason}",
                  topic=message.topic, mid=mid, reason=reason)
        return None
