"""The mesh guard: each message is accepted once per broker, and never circulates.

No Local (and the bridge bit) stop a message from echoing back over the link
it came in on; they cannot stop it in a cycle of three or more brokers
(A -> B -> C -> A), nor stop a broker that is reachable by two paths from
getting it twice.  The guard closes both holes on MQTT 5 links with two user
properties that travel with the message:

``mqttd-mid``
    ``<broker_id>:<64 random bits>``, stamped once, by the first bridged mqttd
    that accepts the message (a local publish); unpredictable, so nobody can
    name another broker's future message.  Every mqttd with bridges remembers
    the ids it accepted (``window`` entries, oldest forgotten first) and drops
    a message whose id it has seen: a second copy, or one that went round.
``mqttd-path``
    the comma-separated broker ids that accepted it; a message whose path
    holds our own id, or already ``hop_limit`` ids, is dropped.

The two stamps are always the *last two* user properties (``mqttd-mid`` then
``mqttd-path``: the stamp block).  Only a message that arrives over a bridge
(a connection of a bridging broker, or one of this broker's own bridges) and
ends with a stamp block is believed to carry one; every other message (an
ordinary client's, an internal publish, a bridge's without a block) is
stamped afresh, its own user properties -- pairs named ``mqttd-mid`` or
``mqttd-path`` included -- kept unaltered before the block [MQTT-3.3.2-17].
So a client that forges ``mqttd-mid`` can neither make the guard drop another
broker's message nor fill its memory of ids, and loses nothing it sent:
:meth:`~mqttd.broker.Broker.public_form` removes only the trailing block.

Dropped copies are acknowledged as usual (so nothing is re-sent) and counted
in :attr:`MeshGuard.dropped`.  Limits: MQTT 3.1.1 links cannot carry
properties, so a cycle that contains a v3 link relies on No Local / the
bridge bit only and may deliver duplicates — use ``mqttv50`` for meshes, or
trees.  mosquitto forwards the properties unchanged but does not check them.

**MQTT 3.1.1 links** (on by default: ``--bridge-dedup-window S``, default
:data:`DEFAULT_DEDUP_WINDOW` s; ``0`` turns it off): each mqttd remembers, for
``S`` seconds, a fingerprint (topic and payload -- not QoS or retain, which a
topic line or a remote may change on the way round) of every message it
accepted and *the link it came from* (one of its bridges, a bridging broker's
connection, or none: a local publisher).  A message arriving over bridge link
``L`` is dropped when its fingerprint was accepted within ``S`` seconds from
anywhere but ``L`` -- i.e. this broker already forwarded that message out over
``L`` (No Local / the bridge bit keep it from going back where it came from),
so what comes back over ``L`` is a copy that went round a cycle.  A triangle
of default (3.1.1) links therefore delivers each message once.  Repeats over
the *same* link (a sensor sending the same reading every second) are never
taken for copies.  The price: a message published at this broker (or arriving
over another link) and an identical one arriving over ``L`` within ``S``
seconds are taken as one.  A copy that needs longer than ``S`` to go round is
accepted once more (and dropped on its next lap).

The guard is active in every mqttd that runs a bridge or has had a bridging
broker connect to it (bridge bit, or an MQTT 5 CONNECT carrying the user
property ``mqttd-bridge``, which mqttd's bridges send); before that it costs
nothing.
"""
from __future__ import annotations

import collections
import os

import attrs
from twisted.logger import Logger

from mqttd.codec.packets import NO_PROPERTIES, Properties
from mqttd.messages import FORWARDED, Message

log = Logger(namespace="mqttd.bridge.mesh")

MID = "mqttd-mid"
#: seconds of the MQTT 3.1.1 loop guard by default (``--bridge-dedup-window``)
DEFAULT_DEDUP_WINDOW = 2.0
PATH = "mqttd-path"


class MeshGuard:
    """A broker publish filter (see :meth:`mqttd.broker.Broker.add_publish_filter`).

    :param window: message ids remembered (the oldest are forgotten first).
    :param dedup_window: seconds of v3 fingerprints kept (0: off); ``clock``
        (default: the attached broker's clock) measures them.
    """

    def __init__(self, broker_id: str, hop_limit: int = 8, window: int = 100_000,
                 dedup_window: float = DEFAULT_DEDUP_WINDOW, clock=None):
        self.broker_id = broker_id
        self.hop_limit = hop_limit
        self.window = window
        self.dedup_window = dedup_window
        self.clock = clock
        self.broker = None
        self.active = False
        self._boot = os.urandom(4).hex()
        self._counter = 0
        self._seen: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._prints: "collections.OrderedDict[tuple, float]" = collections.OrderedDict()
        self._unregister = None
        self._unobserve = None
        self._unprivate = None
        #: messages dropped by reason: "duplicate", "loop", "hop-limit", "v3-duplicate"
        self.dropped = {"duplicate": 0, "loop": 0, "hop-limit": 0, "v3-duplicate": 0}

    def attach(self, broker) -> "MeshGuard":
        """Watch ``broker``: activate when a bridging broker connects."""
        if self.broker is None:
            self.broker = broker
            if self.clock is None:
                self.clock = getattr(broker, "clock", None)
            self._unobserve = broker.on("clientConnected", self._connected)
        return self

    def _connected(self, client=None, **_):
        if client is not None and getattr(client, "bridge", False) and not self.active:
            log.info("Mesh guard on: bridging broker {client_id} connected",
                     client_id=client.client_id)
            self.activate()

    def activate(self) -> None:
        if not self.active and self.broker is not None:
            self.active = True
            if self.dedup_window:
                log.info("Mesh guard on: MQTT 5 links by mqttd-mid/mqttd-path; MQTT 3.1.1 "
                         "links by a {window} s dedup window (a message coming back over a "
                         "bridge it was forwarded to is dropped; --bridge-dedup-window)",
                         window=self.dedup_window)
            else:
                log.warn("Mesh guard on: MQTT 5 links only; the MQTT 3.1.1 dedup window is "
                         "off (--bridge-dedup-window 0): a cycle of 3.1.1 bridges "
                         "circulates messages")
            self._unregister = self.broker.add_publish_filter(self)
            # the stamps are bookkeeping between brokers: subscribers that are
            # not bridges get the publisher's user properties unaltered
            self._unprivate = self.broker.add_private_user_properties((MID, PATH))

    def detach(self) -> None:
        for undo in (self._unregister, self._unobserve, self._unprivate):
            if undo is not None:
                undo()
        self._unregister = self._unobserve = self._unprivate = None
        self.active = False
        self.broker = None

    def __call__(self, message: Message, client) -> "Message | None":
        if message.topic.startswith("$"):
            return message
        props = message.properties
        user = tuple(props.user_properties or ())
        mid = path = None
        if (len(user) >= 2 and user[-2][0] == MID and user[-1][0] == PATH
                and client is not None and getattr(client, "bridge", False)):
            # a bridge's message ends with the stamp block of the mqttd that sent it
            mid, path = user[-2][1], user[-1][1]
            user = user[:-2]
        # anything else -- a client's own pairs named mqttd-mid/mqttd-path
        # included -- is the publisher's and travels unaltered [MQTT-3.3.2-17];
        # a message without a stamp block is stamped afresh below
        if self.dedup_window:
            from_bridge = client is not None and getattr(client, "bridge", False)
            link = client.client_id if from_bridge else None
            # topic and payload only: a copy that went round may come back at
            # the links' QoS (topic lines downgrade it) and without its retain
            # flag (a remote without the bridge bit clears it)
            key = (message.topic, message.payload)
            if self.clock is None:   # used without attach(): the global reactor's time
                from twisted.internet import reactor
                self.clock = reactor
            now = self.clock.seconds()
            prints = self._prints
            while prints:
                oldest, (at, _link) = next(iter(prints.items()))
                if now - at < self.dedup_window and len(prints) < self.window:
                    break
                del prints[oldest]
            if mid is None and from_bridge:
                seen = prints.get(key)
                if seen is not None and seen[1] != link:
                    # accepted from elsewhere, so forwarded out over this link:
                    # this is that message coming back round a cycle
                    return self._drop("v3-duplicate", message, "-")
            prints.pop(key, None)
            prints[key] = (now, link)
        if mid is None:
            self._counter += 1
            mid = f"{self.broker_id}:{os.urandom(8).hex()}"
            self._remember(mid)
            return _with_user_properties(message, user + ((MID, mid), (PATH, self.broker_id)))
        hops = path.split(",") if path else []
        if mid in self._seen:
            return self._drop("duplicate", message, mid)
        if self.broker_id in hops:
            return self._drop("loop", message, mid)
        if len(hops) >= self.hop_limit:
            return self._drop("hop-limit", message, mid)
        self._remember(mid)
        hops.append(self.broker_id)
        return _with_user_properties(message, user + ((MID, mid), (PATH, ",".join(hops))))

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


_MESSAGE_FIELDS = tuple(a.name for a in attrs.fields(Message) if a.init)
_FAST = _MESSAGE_FIELDS == ("topic", "payload", "qos", "retain", "properties", "origin",
                            "expires_at")
_KEPT = tuple(name for name in FORWARDED if name != "user_properties")


def _with_user_properties(message: Message, user: tuple) -> Message:
    """``message`` with its user properties replaced (per message: no attrs.evolve)."""
    props = message.properties
    if props is NO_PROPERTIES:
        props = Properties(user_properties=user)
    else:
        kwargs = {name: getattr(props, name) for name in _KEPT}
        if props.subscription_identifiers:
            kwargs["subscription_identifiers"] = props.subscription_identifiers
        props = Properties(user_properties=user, **kwargs)
    if not _FAST:   # Message grew a field: stay correct
        return attrs.evolve(message, properties=props)
    return Message(message.topic, message.payload, message.qos, message.retain, props,
                   message.origin, message.expires_at)
