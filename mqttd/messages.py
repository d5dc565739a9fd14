"""The application message as the broker routes and stores it (layer L1).

Converting one packet form into another goes through the functions here, so
every path maps properties by what the *target* packet allows (MQTT 5.0
§2.2.2.2, §3.3.2.3):

* inbound PUBLISH -> stored :class:`Message`: :func:`forwarded_properties`
  keeps what the spec forwards to subscribers and drops what belongs to one
  network connection (Topic Alias, Subscription Identifiers);
* will (CONNECT payload) -> PUBLISH: :func:`will_message` (Will Delay Interval
  never reaches a PUBLISH; the will's Message Expiry Interval starts when it is
  published) [MQTT-3.1.3-...], §3.1.3.2;
* stored / queued / retained / in-flight -> outbound PUBLISH:
  :func:`outbound_message` drops an expired message and lowers the Message
  Expiry Interval by the time the message waited [MQTT-3.3.2-5], [MQTT-3.3.2-6].
"""
from __future__ import annotations

import itertools
import math
import sys
from typing import Optional

import attrs

from mqttd.codec.packets import NO_PROPERTIES, Properties

_PYPY = sys.implementation.name == "pypy"

#: ``Message.origin`` of the broker's own ``$SYS`` publications: not counted in
#: the message and byte statistics.  Compared by value (``!=``), so a copy
#: that went through a pickle (the store, a cluster peer) is still recognised.
#: Client ids cannot contain U+0000 [MQTT-1.5.4-2], so no client can be
#: mistaken for it.
SYS_ORIGIN = "\x00$SYS"


@attrs.frozen(slots=True)
class Message:
    """One application message, independent of any connection.

    ``properties`` holds what is forwarded to subscribers unchanged (payload
    format indicator, content type, response topic, correlation data, user
    properties, message expiry).  A topic alias is per connection and never
    stored here; subscription identifiers are per subscriber: only the copy
    made for one subscriber (and queued or stored for it) carries them.
    """

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES
    #: client id of the publisher (for no-local); ``None`` for internal messages
    origin: Optional[str] = None
    #: absolute time (the broker clock's ``seconds()``) after which the message
    #: is no longer delivered; ``None`` means it never expires
    expires_at: Optional[float] = None
    #: cache of :func:`message_size`: unset until first asked (no cost when a
    #: message is never queued), never compared, shown or pickled (a copy made
    #: with ``attrs.evolve`` starts unset and computes its own)
    _size: int = attrs.field(init=False, eq=False, hash=False, repr=False)
    if _PYPY:
        #: ``message_key`` on PyPy (0 until first asked), never compared, shown
        #: or pickled; CPython keys messages by ``id()`` and has no such slot
        _key: int = attrs.field(init=False, default=0, eq=False, hash=False, repr=False)

    # Pickles (the stores, cluster peers) carry the seven fields above and
    # nothing else, exactly as before the size cache existed: old records load,
    # and an older node reads what this one writes.
    def __getstate__(self):
        return {name: getattr(self, name) for name in _STATE}

    def __setstate__(self, state):
        if isinstance(state, tuple):      # attrs before 22.2 pickled a tuple
            state = dict(zip(_STATE, state))
        set_field = object.__setattr__
        for name in _STATE:
            if name in state:
                set_field(self, name, state[name])
        if _PYPY:
            set_field(self, "_key", 0)


#: the fields a Message pickles (all but the size and key caches)
_STATE = ("topic", "payload", "qos", "retain", "properties", "origin", "expires_at")


def properties_size(props: Properties) -> int:
    """Bytes the PUBLISH properties ``props`` take, as encoded in a PUBLISH
    (identifier and length prefixes included; strings counted in characters,
    which is their UTF-8 length for ASCII).  ``NO_PROPERTIES``: 0.

    Only what a PUBLISH carries counts (MQTT 5.0 §3.3.2.3): payload format,
    message expiry, content type, response topic, correlation data,
    subscription identifiers, user properties.
    """
    if props is NO_PROPERTIES:
        return 0
    size = 0
    if props.payload_format_indicator is not None:
        size += 2
    if props.message_expiry_interval is not None:
        size += 5
    for value in (props.content_type, props.response_topic, props.correlation_data):
        if value is not None:
            size += 3 + len(value)
    for identifier in props.subscription_identifiers:
        size += 2 if identifier < 0x80 else 3 if identifier < 0x4000 else \
            4 if identifier < 0x200000 else 5
    for name, value in props.user_properties:
        size += 5 + len(name) + len(value)
    return size


def message_size(message: Message) -> int:
    """The bytes ``message`` holds: topic + payload + properties
    (:func:`properties_size`).

    Every byte limit and figure of queued or stored messages uses it
    (``--max-queued-bytes``, ``--max-queued-bytes-total``, the slow-consumer
    high-water mark in bytes, ``queued_bytes``, ``$SYS/broker/store/messages/bytes``),
    so MQTT 5 properties (User Properties, Correlation Data... up to the
    packet size) are never free.  The common case (no properties) is two
    ``len`` calls, nothing cached (a cache miss raises and catches
    AttributeError, which costs more: this runs for every QoS 1/2 delivery
    under ``--max-inflight-bytes``); with properties it is computed once per
    message object and cached on it.
    """
    props = message.properties
    if props is NO_PROPERTIES:
        return len(message.topic) + len(message.payload)
    try:
        return message._size
    except AttributeError:
        pass
    size = len(message.topic) + len(message.payload) + properties_size(props)
    object.__setattr__(message, "_size", size)
    return size


# message_key(message) -> int: a number naming a message *object* while the
# caller holds it.  The store's message table and the queue ledger count a
# message that many sessions hold (one object) once, keyed by it.  On CPython
# it is id(): free, and valid because the table or the queues keep the object
# alive while it is counted.  On PyPy id() of an object of the moving GC costs
# a side-table entry (0.8 us, measured), so there it is a number from a
# counter kept in the message's ``_key`` slot (0 until first asked: an
# AttributeError per new key costs PyPy's JIT more than the default costs each
# Message), set on first ask (a copy made with attrs.evolve gets its own).
if _PYPY:
    _keys = itertools.count(1)

    def message_key(message: Message) -> int:
        key = message._key
        if not key:
            key = next(_keys)
            object.__setattr__(message, "_key", key)
        return key
else:
    message_key = id


#: the properties a server forwards from a PUBLISH (or a will) to the
#: subscribers' PUBLISH packets (MQTT 5.0 §3.3.2.3.2-§3.3.2.3.9)
FORWARDED = ("payload_format_indicator", "message_expiry_interval", "content_type",
             "response_topic", "correlation_data", "user_properties")

_FORWARDED = frozenset(FORWARDED)
_NOT_FORWARDED = tuple(a.name for a in attrs.fields(Properties) if a.name not in _FORWARDED)


def forwarded_properties(props: Properties) -> Properties:
    """The part of ``props`` that may travel on in a subscriber's PUBLISH.

    Everything else (Will Delay Interval, Topic Alias, Subscription
    Identifiers, any CONNECT/CONNACK property) is dropped.  Returns ``props``
    itself when nothing has to go (the common case costs no allocation).
    """
    if props is NO_PROPERTIES:
        return props
    for name in _NOT_FORWARDED:
        value = getattr(props, name)
        if value is not None and value != ():
            break
    else:
        return props
    kept = Properties(**{name: getattr(props, name) for name in FORWARDED})
    return NO_PROPERTIES if kept == NO_PROPERTIES else kept


def will_message(will, client_id: Optional[str]) -> Message:
    """The application message a will becomes (not yet timed: ``expires_at`` None).

    ``will`` is a :class:`~mqttd.codec.packets.Will`.  Use :func:`published_at`
    when it is actually published, so its Message Expiry Interval counts from
    then (MQTT 5.0 §3.1.3.2.4).
    """
    return Message(will.topic, will.payload, will.qos, will.retain,
                   forwarded_properties(will.properties), origin=client_id)


def published_at(message: Message, now: float) -> Message:
    """``message`` as published at ``now``: its expiry starts counting."""
    interval = message.properties.message_expiry_interval
    if interval is None:
        return message
    return attrs.evolve(message, expires_at=now + interval)


def remaining_interval(expires_at: float, now: float) -> int:
    """Whole seconds left before ``expires_at`` (at least 1, rounded up)."""
    return max(1, math.ceil(expires_at - now - 1e-6))


def outbound_message(message: Message, now: float) -> Optional[Message]:
    """``message`` as sent at ``now``: None if expired [MQTT-3.3.2-5], else with
    its Message Expiry Interval lowered by the time it waited [MQTT-3.3.2-6].

    Returns ``message`` itself when it does not expire or nothing changed, so
    PUBLISH bytes cached for it stay valid.
    """
    expires_at = message.expires_at
    if expires_at is None:
        return message
    if expires_at <= now:
        return None
    interval = remaining_interval(expires_at, now)
    props = message.properties
    if props.message_expiry_interval == interval:
        return message
    return attrs.evolve(message, properties=attrs.evolve(
        props, message_expiry_interval=interval))


def with_user_properties(message: Message, user: tuple) -> Message:
    """A copy of ``message`` whose user properties are ``user`` (name, value pairs)."""
    return attrs.evolve(message, properties=attrs.evolve(
        message.properties, user_properties=tuple(user)))


def with_subscription_ids(message: Message, ids: tuple) -> Message:
    """A copy of ``message`` whose Subscription Identifiers are ``ids``
    (``()``: none), for one subscriber [MQTT-3.3.4-3, MQTT-3.3.4-5]."""
    return attrs.evolve(message, properties=attrs.evolve(
        message.properties, subscription_identifiers=tuple(ids)))
