"""Hypothesis strategies for valid packets and properties, per protocol level."""
from __future__ import annotations

from functools import lru_cache

from hypothesis import strategies as st

from mqttd.codec import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback,
    Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback,
    Unsubscribe, Will,
)
from mqttd.codec.properties import (
    BINARY, BYTE, PROPERTIES, STRING_PAIR, U16, U32, UTF8, VARINT, WILL_PROPERTIES,
)
from mqttd.codec.packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
)

# MQTT strings: no U+0000 [MQTT-1.5.4-2], no lone surrogates [MQTT-1.5.4-1].
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=12)
topic_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1, max_size=12)
binaries = st.binary(max_size=16)
packet_ids = st.integers(1, 65535)
u16 = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
reason_codes = st.integers(0, 255)


def valid_reason_codes(ptype):
    """The reason codes a PUBACK/PUBREC/PUBREL/PUBCOMP/DISCONNECT/AUTH may carry
    ([MQTT-3.4.2-1] and the like: any other value is refused by the reader)."""
    from mqttd.codec.reader import VALID_REASON_CODES
    return st.sampled_from(sorted(VALID_REASON_CODES[ptype][0]))

_NON_ZERO = {0x0B, 0x21, 0x23, 0x27}          # subscription id, receive max, alias, max size
_BOOLEAN = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}


def _value_strategy(spec):
    if spec.identifier in _BOOLEAN:
        return st.integers(0, 1)
    lo = 1 if spec.identifier in _NON_ZERO else 0
    return {
        BYTE: st.integers(lo, 255),
        U16: st.integers(lo, 65535),
        U32: st.integers(lo, 2**32 - 1),
        VARINT: st.integers(lo, 268_435_455),
        UTF8: texts,
        BINARY: binaries,
        STRING_PAIR: st.tuples(texts, texts),
    }[spec.wire_type]


@lru_cache(maxsize=None)
def properties(packet_type: int) -> st.SearchStrategy[Properties]:
    """Valid Properties for ``packet_type`` (or WILL_PROPERTIES)."""
    fields = {}
    for spec in PROPERTIES.values():
        if packet_type not in spec.packet_types:
            continue
        value = _value_strategy(spec)
        if spec.name == "user_properties":
            fields[spec.name] = st.lists(value, max_size=3).map(tuple)
        elif spec.name == "subscription_identifiers":
            max_size = 3 if packet_type == PUBLISH else 1
            fields[spec.name] = st.lists(value, max_size=max_size).map(tuple)
        else:
            fields[spec.name] = st.none() | value
    return st.fixed_dictionaries({}, optional=fields).map(_consistent).map(
        lambda d: Properties(**d))


def _consistent(fields: dict) -> dict:
    # Authentication Data without an Authentication Method is a Protocol Error
    # (MQTT 5.0 §3.1.2.11.10): the reader refuses it, so valid packets never carry it.
    if fields.get("authentication_method") is None:
        fields.pop("authentication_data", None)
    return fields


def _props(level, packet_type):
    from mqttd.codec import NO_PROPERTIES
    return properties(packet_type) if level == 5 else st.just(NO_PROPERTIES)


@st.composite
def connects(draw, level):
    will = None
    if draw(st.booleans()):
        will = Will(draw(topic_names), draw(binaries), draw(st.integers(0, 2)),
                    draw(st.booleans()), draw(_props(level, WILL_PROPERTIES)))
    username = draw(st.none() | texts)
    password = draw(st.none() | binaries)
    if level != 5 and username is None:
        password = None                      # [MQTT-3.1.2-22] before MQTT 5
    return Connect(level, draw(texts), draw(st.booleans()), draw(u16), username,
                   password, will, draw(_props(level, CONNECT)))


@st.composite
def publishes(draw, level):
    qos = draw(st.integers(0, 2))
    props = draw(_props(level, PUBLISH))
    topic = draw(topic_names)
    if level == 5 and props.topic_alias is not None and draw(st.booleans()):
        topic = ""                           # alias-only PUBLISH
    return Publish(topic, draw(st.binary(max_size=64)), qos, draw(st.booleans()),
                   draw(st.booleans()) if qos else False,
                   draw(packet_ids) if qos else None, props)


def _acks(level, cls, ptype):
    if level == 5:
        return st.builds(cls, packet_ids, valid_reason_codes(ptype), properties(ptype))
    return st.builds(cls, packet_ids)


def subscriptions(level):
    if level == 5:
        return st.builds(Subscription, texts, st.integers(0, 2), st.booleans(),
                         st.booleans(), st.integers(0, 2))
    return st.builds(Subscription, texts, st.integers(0, 2))


@lru_cache(maxsize=None)
def packets(level: int, include_connect: bool = True) -> st.SearchStrategy:
    """Any valid packet that can be written and read at ``level``."""
    choices = [
        publishes(level),
        st.builds(Connack, st.booleans() if level != 3 else st.just(False),
                  reason_codes, _props(level, CONNACK)),
        _acks(level, Puback, PUBACK), _acks(level, Pubrec, PUBREC),
        _acks(level, Pubrel, PUBREL), _acks(level, Pubcomp, PUBCOMP),
        st.builds(Subscribe, packet_ids,
                  st.lists(subscriptions(level), min_size=1, max_size=4).map(tuple),
                  _props(level, SUBSCRIBE)),
        st.builds(Suback, packet_ids,
                  st.lists(reason_codes, min_size=1, max_size=4).map(tuple),
                  _props(level, SUBACK)),
        st.builds(Unsubscribe, packet_ids,
                  st.lists(texts, min_size=1, max_size=4).map(tuple),
                  _props(level, UNSUBSCRIBE)),
        st.builds(Unsuback, packet_ids,
                  st.lists(reason_codes, max_size=4).map(tuple) if level == 5 else st.just(()),
                  _props(level, UNSUBACK)),
        st.just(Pingreq()), st.just(Pingresp()),
        st.builds(Disconnect, valid_reason_codes(DISCONNECT) if level == 5 else st.just(0),
                  _props(level, DISCONNECT)),
    ]
    if level == 5:
        choices.append(st.builds(Auth, valid_reason_codes(AUTH), properties(AUTH)))
    if include_connect:
        choices.append(connects(level))
    return st.one_of(choices)
