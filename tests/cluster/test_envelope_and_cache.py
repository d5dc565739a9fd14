"""Pure logic of the bus and the route cache: the envelope codec and how the
cache applies the route feed (no Redis)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from twisted.internet import task

from mqttd.cluster.bus import (EnvelopeError, decode_entry, decode_envelope, encode_batch,
                               encode_envelope)
from mqttd.cluster.routes import RESET_OP, SEP, RouteTable
from mqttd.codec.packets import Properties
from mqttd.messages import Message

from .fakeredis import FakeBackend

topics_ = st.text(st.characters(blacklist_characters="\x00#+",
                                blacklist_categories=("Cs",)), min_size=1, max_size=40)
strings = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                  max_size=8)


@given(topic=topics_, payload=st.binary(max_size=300), qos=st.integers(0, 2),
       retain=st.booleans(), origin=st.one_of(st.none(), strings),
       expires=st.one_of(st.none(), st.floats(0, 1e10)),
       user=st.lists(st.tuples(strings, strings), max_size=3))
def test_an_envelope_carries_every_field_of_a_message(topic, payload, qos, retain, origin,
                                                      expires, user):
    """What a subscriber on another node gets is what was published (properties included)."""
    props = Properties(user_properties=tuple(user), content_type="a/b") if user else \
        Properties()
    message = Message(topic, payload, qos, retain, props, origin, expires)
    assert decode_envelope(encode_envelope(message)) == message


@pytest.mark.parametrize("data", [b"", b"\x02\x00\x00\x01\x00\x00a", b"\x01\x00\x00\x05ab"])
def test_a_foreign_or_truncated_entry_is_an_envelope_error(data):
    """A bad inbox entry is dropped with a log line, never a crash of the reader."""
    with pytest.raises(EnvelopeError):
        decode_envelope(data)


messages_ = st.builds(Message, topics_, st.binary(max_size=200), st.integers(0, 2),
                      st.booleans(), st.just(Properties()), st.one_of(st.none(), strings),
                      st.one_of(st.none(), st.floats(0, 1e10)))
shares_ = st.one_of(st.none(), st.just(""), st.lists(strings.filter(bool), min_size=1,
                                                      max_size=3).map("\x00".join))


targets_ = st.lists(st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=8),
                    max_size=3).map("\x00".join)


@given(st.lists(st.tuples(messages_, shares_, targets_), min_size=1, max_size=20))
def test_a_batched_entry_carries_its_messages_and_groups_in_order(items):
    """Group commit: many envelopes in one inbox entry come out as they went
    in, in order, each with the shared-subscription groups it is for and the
    nodes it went to (de-duplication after a takeover)."""
    blob = encode_batch([(encode_envelope(m), share, targets) for m, share, targets in items])
    messages, errors = decode_entry({b"b": blob})
    assert errors == []
    expected = [(m, None if share is None else
                 frozenset(share.split("\x00")) if share else frozenset(),
                 frozenset(targets.split("\x00")) if targets else None)
                for m, share, targets in items]
    assert messages == expected
    # the reply of XREADGROUP may also come as a flat list of fields
    assert decode_entry([b"b", blob]) == (expected, [])


def test_a_single_envelope_entry_and_its_groups_are_read_too():
    """Entries of one envelope (field ``e``, groups in ``s``, targets in ``n``) stay readable."""
    message = Message("a/b", b"x", 1)
    assert decode_entry({b"e": encode_envelope(message), b"s": b"g1\x00g2"}) == \
        ([(message, frozenset({"g1", "g2"}), None)], [])
    assert decode_entry({b"e": encode_envelope(message), b"n": b"n1\x00n2"}) == \
        ([(message, None, frozenset({"n1", "n2"}))], [])


def test_a_bad_envelope_in_a_batch_is_skipped_and_a_broken_batch_keeps_its_head():
    """A bad record costs that record (or, with broken framing, the rest of the
    entry), never the reader: the good ones before it are delivered."""
    good = [Message(f"t/{i}", b"p", 0) for i in range(3)]
    blob = encode_batch([(encode_envelope(good[0]), None, "n1"), (b"\x09junk", None, "n1"),
                         (encode_envelope(good[1]), None, "n1")])
    messages, errors = decode_entry({b"b": blob})
    assert [m for m, _, _ in messages] == good[:2] and len(errors) == 1
    blob = encode_batch([(encode_envelope(m), None, "n1") for m in good])
    messages, errors = decode_entry({b"b": blob[:-3]})
    assert [m for m, _, _ in messages] == good[:2] and errors == ["truncated batch"]
    assert decode_entry({b"b": b"\x07"}) == ([], ["unknown batch version 7"])
    assert decode_entry({b"x": b""})[0] == []


def table(node="me"):
    clock = task.Clock()
    return RouteTable(FakeBackend(clock), clock, node)


def test_lookup_finds_other_nodes_by_wildcard_and_shared_groups_with_this_node():
    """Plain routes name the other nodes; $share routes name every node with members."""
    routes = table()
    routes._cache_replace("b", {"home/+/t", "$share/g/home/#"}, 3)
    routes._cache_replace("c", {"home/#", "other"}, 1)
    routes.observe("home/x/t", "local-client", True)
    routes.observe("$share/g/home/#", "member", True)
    nodes, shares = routes.lookup("home/x/t")
    assert nodes == {"b", "c"}
    assert shares == {"$share/g/home/#": {"b", "me"}}
    assert routes.lookup("nothing") == (set(), {})


def test_the_feed_applies_the_next_version_and_reloads_on_a_gap():
    """A missed feed entry must not leave the cache wrong for long: a gap forces a reload."""
    routes = table()
    reloads = []
    routes.reload = lambda node: reloads.append(node) or _done()
    routes._cache_replace("b", {"a"}, 5)
    routes._feed_entry({b"n": b"b", b"v": b"6", b"o": SEP.join(["+", "x/#", "-", "a"]).encode()})
    assert routes.routes["b"] == {"x/#"} and routes.versions["b"] == 6
    assert routes.lookup("x/1")[0] == {"b"} and routes.lookup("a")[0] == set()
    routes._feed_entry({b"n": b"b", b"v": b"6", b"o": b"+\x00late"})   # old: ignored
    assert "late" not in routes.routes["b"]
    routes._feed_entry({b"n": b"b", b"v": b"9", b"o": b"+\x00y"})      # gap
    routes._feed_entry({b"n": b"c", b"v": b"1", b"o": RESET_OP.encode()})
    routes._feed_entry({b"n": b"me", b"v": b"1", b"o": b"+\x00mine"})  # our own: skipped
    assert reloads == ["b", "c"]


def test_local_routes_are_counted_per_subscriber_and_written_once_joined():
    """Two subscribers of one filter are one route; it goes away with the last one."""
    routes = table()
    assert routes.observe("t/#", "a", True) is False      # not joined yet: no write
    routes._online = True
    routes._reset_needed = False
    assert routes.observe("t/#", "b", True) is False      # same route
    assert routes.observe("t/#", "a", False) is False
    assert routes.observe("t/#", "b", False) is True      # last one: '-' queued
    assert routes.observe("u", "a", True) is True
    assert routes._pending == [("-", "t/#"), ("+", "u")]


def _done():
    from twisted.internet import defer
    return defer.succeed(None)
