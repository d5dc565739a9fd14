"""The Redis backend: URL parsing (pure), and commands, pipelines, scripts and
error kinds against a real redis-server (and the 3-master Redis Cluster)."""
from __future__ import annotations

import asyncio

import pytest

import redis.exceptions as rx

from mqttd.cluster.backend import (
    Backend, RedisReplyError, RedisUnavailable, parse_url, translate)

from .conftest import wait


# --- URLs (no Redis needed) -------------------------------------------------------------

def test_standalone_url_defaults_to_port_6379_and_database_0():
    """A bare redis://host must work as users write it."""
    url = parse_url("redis://localhost")
    assert (url.kind, url.hosts, url.db, url.tls) == ("standalone", (("localhost", 6379),), 0,
                                                     False)


def test_standalone_url_with_password_database_and_timeout_is_parsed_and_redacted():
    """The password never appears in logs (redacted()), the database is kept."""
    url = parse_url("rediss://user:s%40cret@10.0.0.1:6380/3?socket_timeout=2")
    assert url.username == "user" and url.password == "s@cret"
    assert url.db == 3 and url.tls and dict(url.options) == {"socket_timeout": "2"}
    assert "s@cret" not in url.redacted() and "***" in url.redacted()
    assert "s@cret" not in repr(url)


def test_sentinel_url_takes_several_sentinels_and_the_service_name():
    """Sentinel: several hosts, default port 26379, the service in the path."""
    url = parse_url("redis+sentinel://s1,s2:26380/mymaster/2")
    assert url.kind == "sentinel"
    assert url.hosts == (("s1", 26379), ("s2", 26380))
    assert (url.service, url.db) == ("mymaster", 2)


def test_cluster_url_takes_seed_nodes():
    """Redis Cluster: seed nodes, IPv6 in brackets."""
    url = parse_url("redis+cluster://127.0.0.1:7000,[::1]:7001")
    assert url.kind == "cluster" and url.hosts == (("127.0.0.1", 7000), ("::1", 7001))


@pytest.mark.parametrize("bad, why", [
    ("127.0.0.1:6379", "expected a URL"),
    ("http://h:1", "unknown scheme"),
    ("redis://h:notaport", "bad port"),
    ("redis://h:70000", "out of range"),
    ("redis://a:1,b:2", "several hosts"),
    ("redis+sentinel://h:1", "service name"),
    ("redis+cluster://h:1/2", "only database 0"),
    ("redis://h/x", "bad database"),
    ("redis://h?frobnicate=1", "unknown parameter"),
    ("redis://h?socket_timeout=-1", "positive number"),
    ("redis://", "empty host"),
])
def test_bad_urls_are_refused_with_one_line_saying_why(bad, why):
    """--cluster with a wrong URL stops the broker with a line naming the fault."""
    with pytest.raises(ValueError) as info:
        parse_url(bad)
    assert why in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("error, kind", [
    (rx.ConnectionError("refused"), RedisUnavailable),
    (rx.TimeoutError("slow"), RedisUnavailable),
    (rx.BusyLoadingError("loading"), RedisUnavailable),
    (rx.ClusterDownError("down"), RedisUnavailable),
    (rx.ReadOnlyError("replica"), RedisUnavailable),
    (rx.ResponseError("FENCED"), RedisReplyError),
    (rx.NoScriptError("NOSCRIPT"), RedisReplyError),
])
def test_redis_errors_become_outages_or_replies(error, kind):
    """Callers decide retry-later (outage) versus lost-race/bug (reply) from the kind alone."""
    translated = translate(error)
    assert isinstance(translated, kind) and str(error) in str(translated)


# --- against a real Redis -------------------------------------------------------------

async def _exercise(url: str):
    backend = Backend(url)
    await wait(backend.connect())
    backend.register("incr", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await wait(backend.run("incr", ["{t}a"], [2])) == 2
    # a Redis that forgot its scripts (restart, another shard): EVAL once
    await wait(backend.pipeline([("SCRIPT", "FLUSH")])) if not backend.is_cluster else None
    assert await wait(backend.run("incr", ["{t}a"], [3])) == 5
    replies = await wait(backend.pipeline([("SET", "{t}b", b"\x00\xff"), ("GET", "{t}b"),
                                           ("XADD", "{t}s", "*", "m", b"x"),
                                           ("XLEN", "{t}s")]))
    assert replies[1] == b"\x00\xff" and replies[3] == 1
    with pytest.raises(RedisReplyError):
        await wait(backend.execute("LPUSH", "{t}b", "x"))   # WRONGTYPE: an answer, not an outage
    await wait(backend.close())


@pytest.mark.slow
def test_commands_pipelines_and_scripts_work_on_standalone_redis(redis_server, aio):
    """Binary-safe replies, EVALSHA with the NOSCRIPT fallback, error replies as RedisReplyError."""
    aio(lambda: _exercise(redis_server.url))


@pytest.mark.slow
def test_commands_pipelines_and_scripts_work_on_redis_cluster(redis_cluster, aio):
    """The same through the cluster client (keys of one hashtag share a slot)."""
    aio(lambda: _exercise(redis_cluster.url))


@pytest.mark.slow
def test_a_stopped_redis_is_reported_as_unavailable_and_recovery_needs_no_new_backend(
        redis_server, aio):
    """Redis down: RedisUnavailable (not a crash, not a reply error); back: the same backend works."""
    async def scenario():
        backend = Backend(redis_server.url, socket_timeout=1.0)
        await wait(backend.connect())
        redis_server.stop()
        with pytest.raises(RedisUnavailable):
            await wait(backend.execute("PING"), timeout=20)
        redis_server.start(keep_port=True)
        assert await wait(backend.execute("PING"), timeout=20) in (b"PONG", True)
        await wait(backend.close())
    aio(scenario)


class _HangingClient:
    """A redis.asyncio stand-in whose commands never get an answer (a hung link)."""

    def __init__(self):
        self.cancelled = 0

    async def execute_command(self, *args):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def pipeline(self, transaction=False):
        client = self

        class Pipe:
            def execute_command(self, *args):
                pass

            async def execute(self, raise_on_error=True):
                return await client.execute_command()
        return Pipe()


def test_every_call_is_bounded_even_when_the_link_hangs(aio):
    """REVIEW-CLUSTER F6: a call redis-py never answers fails as RedisUnavailable after
    socket_timeout (plus a BLOCK time), and the call is abandoned (cancelled)."""
    async def run():
        client = _HangingClient()
        backend = Backend("redis://127.0.0.1:1", socket_timeout=0.1, client=client)
        backend.register("s", "return 1")
        assert backend._timeout(("XREAD", "BLOCK", 1000, "STREAMS", "k", "0")) == 1.1
        for d in (backend.execute("GET", "k"), backend.pipeline([("GET", "k")]),
                  backend.run("s"), backend.connect()):
            with pytest.raises(RedisUnavailable, match="no answer from Redis within 0.1 s"):
                await wait(d, timeout=5)
        assert client.cancelled == 4
    aio(run)


#: INCR a counter, then keep Redis busy for ARGV[1] ms (longer than the socket timeout)
_SLOW_INCR = """
local n = redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
local start = t[1] * 1000 + math.floor(t[2] / 1000)
while true do
  t = redis.call('TIME')
  if t[1] * 1000 + math.floor(t[2] / 1000) - start >= tonumber(ARGV[1]) then break end
end
return n
"""


def test_a_command_that_timed_out_is_not_sent_again(redis_server, aio):
    """REVIEW-CLUSTER F13: a timeout says nothing about whether Redis ran the command, so
    the client must not re-send it by itself (an XADD re-sent delivered a QoS 2 message
    twice, a HINCRBY counted twice); only a refused or broken connection is retried."""
    async def run():
        backend = Backend(redis_server.url, socket_timeout=0.3)
        with pytest.raises(rx.TimeoutError):
            # straight to redis-py: its own retry policy is what is tested
            await asyncio.wait_for(backend.client.execute_command(
                "EVAL", _SLOW_INCR, 1, "f13:count", 700), 10)
        await asyncio.sleep(2.0)          # any re-sent copy has run by now
        assert redis_server.cli("GET", "f13:count").strip() == "1"
        retry = backend.client.get_retry()
        assert rx.TimeoutError not in retry._supported_errors
        assert rx.ConnectionError in retry._supported_errors
        await wait(backend.close())
    aio(run)


def test_the_redis_cluster_client_never_resends_by_itself():
    """REVIEW-CLUSTER F13: redis-py's cluster client re-sends a whole pipeline (what one
    master already ran included) on a timeout or a connection error: no automatic retry."""
    backend = Backend("redis+cluster://127.0.0.1:1")
    assert backend.client.retry.get_retries() == 0


def test_a_redis_cluster_url_at_a_standalone_redis_says_so_in_one_line(redis_server, aio):
    """REVIEW-CLUSTER F9: redis+cluster:// pointed at a plain Redis must fail as a
    BackendError naming the mistake (the node logs it rate-limited), not as an
    unexpected exception whose traceback is logged every second."""
    async def run():
        backend = Backend(redis_server.url.replace("redis://", "redis+cluster://"))
        with pytest.raises(RedisReplyError, match="not a Redis Cluster.*use redis://"):
            await wait(backend.execute("GET", "k"), timeout=10)
    aio(run)


def test_redis_without_aof_or_with_eviction_is_warned_about(redis_server, aio):
    """REVIEW-CLUSTER F8: the 'no acknowledged message lost' guarantee needs AOF and
    maxmemory-policy noeviction; a node says so at join when Redis runs otherwise."""
    from mqttd.cluster.service import check_redis_settings

    async def run():
        backend = Backend(redis_server.url)
        assert await wait(check_redis_settings(backend)) == []     # the fixture: AOF on
        redis_server.cli("CONFIG", "SET", "appendonly", "no")
        redis_server.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        assert [kind for kind, _server in await wait(check_redis_settings(backend))] == [
            "appendonly", "maxmemory-policy"]
        await wait(backend.close())
    aio(run)


class _StaleConnection:
    """A pooled connection of redis-py's Sentinel pool, to ``host:port``."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.is_connected = True

    async def disconnect(self):
        self.is_connected = False


class _SentinelPool:
    """redis-py's Sentinel pool as ``follow_primary`` sees it: the Sentinels name
    ``primary``; a connection to the old primary shows up again before every look
    (as during a failover, while some Sentinels still name the old one)."""

    def __init__(self, primary):
        self.primary = primary
        self.master_address = primary
        self._available_connections = []
        self._in_use_connections = set()

    async def get_master_address(self):
        return self.primary


def test_a_sentinel_failover_writes_a_bounded_number_of_lines(aio):
    """REVIEW-S9-CLUSTER C8: 'Closed N connections to <old primary>' came at every
    heartbeat (each second) for as long as a failover lasted; now one line per 10 s
    window, the next one saying how many were suppressed; a primary change is still
    logged once per new primary."""
    from twisted.internet import task
    from twisted.logger import globalLogPublisher

    clock = task.Clock()
    backend = Backend("redis+sentinel://127.0.0.1:1/mm", clock=clock)
    pool = _SentinelPool(("127.0.0.1", 2))
    events = []

    async def run():
        backend._primary = ("127.0.0.1", 1)        # the primary before the failover
        for second in range(15):
            pool._available_connections.append(_StaleConnection("127.0.0.1", 1))
            await backend._follow_primary(pool)
            clock.advance(1.0)
        assert not any(c.is_connected for c in pool._available_connections)

    globalLogPublisher.addObserver(events.append)
    try:
        aio(run)
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "mqttd.cluster.backend"]
    moved = [e for e in mine if "is now" in e["log_format"]]
    closed = [e for e in mine if e["log_format"].startswith("Closed")]
    assert len(moved) == 1
    # t = 1 and t = 11: two lines for 14 looks that closed a stale connection
    assert len(closed) == 2, [e["log_format"] for e in closed]
    assert closed[1]["suppressed"] == 9


class _FakeSentinel:
    """A Sentinel's ``SENTINEL MASTERS``: ``reply``, or no answer at all (``None``)."""

    def __init__(self, reply):
        self.reply = reply
        self.cancelled = False

    async def sentinel_masters(self):
        if self.reply is None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return self.reply


def test_a_hung_sentinel_does_not_hold_back_finding_the_primary(aio):
    """A Sentinel that hangs (partitioned, SIGSTOPped) must not make every new connection
    wait for its socket timeout: the primary is chosen (highest config epoch) among the
    Sentinels that answered within a grace period of the first answer, the hung one's
    question abandoned (the same kind as REVIEW-S9-CLUSTER C3)."""
    from mqttd.cluster.backend import _epoch_sentinel_class

    def state(port, epoch):
        return {"mm": {"ip": "127.0.0.1", "port": port, "config-epoch": epoch,
                       "is_master": True, "is_sdown": False, "is_odown": False,
                       "num-other-sentinels": 1}}

    async def run():
        sentinel = _epoch_sentinel_class()([("127.0.0.1", 1)])
        hung = _FakeSentinel(None)
        sentinel.sentinels = [hung, _FakeSentinel(state(2, 3)), _FakeSentinel(state(4, 5))]
        found = await asyncio.wait_for(sentinel.discover_master("mm"), 5)
        assert found == ("127.0.0.1", 4)
        assert hung.cancelled
    aio(run)


def test_stream_read_keys_are_found_in_the_arguments():
    """XREAD/XREADGROUP keys come from the arguments (redis-py would ask one fixed master
    with COMMAND GETKEYS, REVIEW-S9-CLUSTER C3), a consumer named STREAMS included; what
    does not parse is left to redis-py."""
    from mqttd.cluster.backend import _stream_keys
    assert _stream_keys(("GROUP", "mqttd", "STREAMS", "COUNT", 10, "BLOCK", 500,
                         "STREAMS", "{n:a}:inbox", ">")) == ["{n:a}:inbox"]
    assert _stream_keys(("COUNT", 100, "STREAMS", "a", "b", "0-0", "0-0")) == ["a", "b"]
    assert _stream_keys((b"STREAMS", b"k", b"$")) == [b"k"]
    assert _stream_keys(("COUNT", 1, "STREAMS", "k")) == []
    assert _stream_keys(("WHAT", "STREAMS", "k", "0")) == []


def test_the_redis_cluster_client_routes_stream_reads_without_asking_a_server(aio):
    """The slot of an XREADGROUP is computed locally: no COMMAND GETKEYS to a master that
    may hang (nothing is listening on the seed address here)."""
    from redis.crc import key_slot

    async def run():
        client = Backend("redis+cluster://127.0.0.1:1").client
        slot = await client._determine_slot(
            "XREADGROUP", "GROUP", "mqttd", "n1", "COUNT", 10, "BLOCK", 500, "STREAMS",
            "mqttd:{n:n1}:inbox", ">")
        assert slot == key_slot(b"mqttd:{n:n1}:inbox")
    aio(run)
