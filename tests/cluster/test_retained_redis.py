"""Retained messages in a real Redis (issue 10): the per-level index walk against
the single-node matcher on random topic trees, on a standalone redis-server and
on a 3-master Redis Cluster; expiry and concurrent writers."""
from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttd.cluster.backend import Backend
from mqttd.cluster.retained import RedisRetained
from mqttd.messages import Message
from mqttd.retained import RetainedIndex

from .conftest import wait

_run = itertools.count(1)

_level = st.sampled_from(["a", "b", "", "$x", "$SYS", "c d", "{t}", "é"])
_topic = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)
_filter_level = st.sampled_from(["a", "b", "", "+", "$x", "$SYS", "{t}"])
_filters = st.lists(st.tuples(st.lists(_filter_level, min_size=1, max_size=4).map("/".join),
                              st.sampled_from(["", "/#", "#"])), min_size=1, max_size=6)


def _filter(levels: str, tail: str) -> str:
    if tail == "#":
        return "#"
    return (levels + tail) or "+"


def check_against_single_node(url, aio, ops, filters):
    """Apply ``ops`` to Redis (under a fresh prefix) and to a RetainedIndex; every
    filter must find the same topics in both."""
    reference = RetainedIndex()
    for topic, keep in ops:
        if keep:
            reference.set(Message(topic, b"v", retain=True))
        else:
            reference.remove(topic)

    async def scenario():
        backend = Backend(url)
        try:
            redis = RedisRetained(backend, prefix=f"test{next(_run)}:")
            for topic, keep in ops:
                await wait(redis.put(Message(topic, b"v" if keep else b"", retain=True)))
            for levels, tail in filters:
                flt = _filter(levels, tail)
                got = sorted(m.topic for m in await wait(redis.match(flt)))
                assert got == sorted(m.topic for m in reference.match(flt)), flt
        finally:
            await wait(backend.close())
    aio(scenario)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(_topic, st.booleans()), max_size=30), filters=_filters)
def test_wildcard_lookups_match_the_single_node_matcher_on_redis(redis_server, aio, ops,
                                                                 filters):
    """Random topic trees ($SYS, empty levels, #, +/#): Redis finds what one node would find."""
    check_against_single_node(redis_server.url, aio, ops, filters)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(_topic, st.booleans()), max_size=30), filters=_filters)
def test_wildcard_lookups_match_the_single_node_matcher_on_redis_cluster(redis_cluster, aio,
                                                                         ops, filters):
    """The same on a 3-master Redis Cluster: index levels and values spread over the slots."""
    check_against_single_node(redis_cluster.url, aio, ops, filters)


def test_concurrent_writers_leave_an_exact_index(redis_server, aio):
    """Two nodes (two connections) creating and clearing the same topics at once: the
    counts converge, wildcard lookups find exactly what is stored."""
    concurrent_writers(redis_server.url, aio)


def test_concurrent_writers_leave_an_exact_index_on_redis_cluster(redis_cluster, aio):
    """The same on Redis Cluster, where a creation or a deletion is a transition in
    idempotent steps that a concurrent writer of the topic may finish."""
    concurrent_writers(redis_cluster.url, aio)


def concurrent_writers(url, aio):
    topics_ = [f"w/{i % 7}/{i % 3}" for i in range(60)]

    async def scenario():
        a, b = Backend(url), Backend(url)
        try:
            # connected first, as a node's backend is (a Redis Cluster client that
            # loads its slot map under 60 concurrent first commands drops some)
            await wait(a.connect())
            await wait(b.connect())
            ra, rb = RedisRetained(a, prefix="cw:"), RedisRetained(b, prefix="cw:")
            writes = []
            for i, topic in enumerate(topics_):
                writer = ra if i % 2 else rb
                writes.append(writer.put(Message(topic, b"" if i % 5 == 0 else b"x",
                                                 retain=True)))
            for d in writes:
                await wait(d)
            stored = sorted(m.topic for m in await wait(ra.match("#")))
            exact = []
            for topic in sorted(set(topics_)):
                if await wait(ra.get(topic)) is not None:
                    exact.append(topic)
            assert stored == exact
            assert await wait(ra.count()) == len(exact)
            root = await wait(a.execute("HGETALL", "cw:ret:c:0:"))
            assert {k: int(v) for k, v in root.items() if b"/" not in k} == (
                {b"w": 2 * len(exact)} if exact else {})
        finally:
            await wait(a.close())
            await wait(b.close())
    aio(scenario)


def test_expired_retained_message_is_not_returned_and_is_removed(redis_server, aio):
    """Message Expiry on read [MQTT-3.3.2-5], and the sweep for unread ones."""
    async def scenario():
        backend = Backend(redis_server.url)
        try:
            redis = RedisRetained(backend, prefix="exp:")
            await wait(redis.put(Message("e/read", b"1", retain=True, expires_at=100.0)))
            await wait(redis.put(Message("e/unread", b"2", retain=True, expires_at=100.0)))
            await wait(redis.put(Message("e/keep", b"3", retain=True)))
            assert [m.topic for m in await wait(redis.match("e/read", now=101.0))] == []
            for _ in range(50):      # the compare-and-delete runs after the answer
                if await wait(backend.execute("GET", "exp:ret:m:e/read")) is None:
                    break
                await asyncio.sleep(0.01)
            assert await wait(backend.execute("GET", "exp:ret:m:e/read")) is None
            assert await wait(redis.sweep(now=101.0)) == 1
            assert sorted(m.topic for m in await wait(redis.match("#", now=101.0))) == [
                "e/keep"]
            assert await wait(redis.count()) == 1
        finally:
            await wait(backend.close())
    aio(scenario)


def test_reindex_after_a_lost_index(redis_server, aio):
    """reindex rebuilds the index from the values with SCAN."""
    async def scenario():
        backend = Backend(redis_server.url)
        try:
            redis = RedisRetained(backend, prefix="ri:")
            for t in ("a/b", "a/c/d", "/x"):
                await wait(redis.put(Message(t, b"v", retain=True)))
            for key in await wait(backend.execute("KEYS", "ri:ret:c:*")):
                await wait(backend.execute("DEL", key))
            assert await wait(redis.match("#")) == []
            assert await wait(redis.reindex()) == 3
            assert sorted(m.topic for m in await wait(redis.match("#"))) == [
                "/x", "a/b", "a/c/d"]
        finally:
            await wait(backend.close())
    aio(scenario)
