"""Fixtures of the cluster tests: real Redis and real mqttd cluster nodes.

``redis_server``
    a standalone ``redis-server`` (own directory, ephemeral 127.0.0.1 port,
    ``--save '' --appendonly yes``), function scope; ``.url``, ``.port``,
    ``.cli(...)``, ``.stop()``, ``.kill()``, ``.start(keep_port=True)``.
``redis_cluster``
    a 3-master Redis Cluster (``redis-cli --cluster create ... --cluster-replicas
    0``, waited for ``cluster_state:ok``), **module scope** (creating one takes
    seconds): give every test its own node ids / client ids.  ``.url`` is the
    ``redis+cluster://`` URL.
``cluster_node_factory``
    ``factory(redis_url, node_id=None, extra_args=(), persistence="memory")``
    starts ``twistd -n mqttd --cluster URL --node-id ID --sys-interval 0`` on
    an ephemeral port and waits until it joined (``joined=False``: does not) (a :class:`brokerproc.BrokerProcess`: ``.host``, ``.port``,
    ``.stop()``, ``.kill()``, ``.log_tail()``); every node is stopped at
    teardown and a failing test shows each node's log tail.
``module_redis``, ``module_nodes``
    one redis-server and three nodes (``ma``, ``mb``, ``mc``) per test module.
``aio``
    ``aio(coroutine_function)`` runs it on a fresh asyncio loop and returns
    its result (bounded by 30 s): in-process tests of
    :class:`mqttd.cluster.backend.Backend` users (await a Deferred with
    ``await d.asFuture(asyncio.get_running_loop())`` or :func:`wait`).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import pytest

from .redisproc import RedisCluster, RedisServer

INTEROP = Path(__file__).resolve().parent.parent / "interop"
if str(INTEROP) not in sys.path:
    sys.path.insert(0, str(INTEROP))

from brokerproc import READY_TIMEOUT, BrokerProcess  # noqa: E402  (tests/interop/brokerproc.py)

_nodes_key = pytest.StashKey[list]()
_counter = itertools.count(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        for node in item.stash.get(_nodes_key, []):
            report.sections.append((f"node log: {node!r}", node.log_tail()))


@pytest.fixture
def redis_server(tmp_path):
    """A standalone redis-server of this test (AOF on), stopped at teardown."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A 3-master Redis Cluster shared by the tests of one module."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_node_factory(request, tmp_path):
    """Start mqttd cluster nodes on demand; all stopped at teardown."""
    started = request.node.stash.setdefault(_nodes_key, [])

    def factory(redis_url, node_id=None, extra_args=(), persistence="memory", joined=True,
                **kwargs):
        n = next(_counter)
        node_id = node_id or f"node-{n}"
        node = BrokerProcess(tmp_path / f"{node_id}-{n}", broker_id=node_id,
                             persistence=persistence,
                             extra_args=["--cluster", redis_url, "--node-id", node_id,
                                         "--sys-interval", "0", *extra_args], **kwargs)
        started.append(node)
        node.start()
        if joined:
            wait_joined(node)
        return node

    yield factory
    for node in started:
        node.stop()


def wait_joined(node, timeout: float = READY_TIMEOUT) -> dict:
    """Wait (bounded) until the node's ready file says it joined the cluster."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = json.loads(node.ready_file.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("cluster", {}).get("joined"):
            return info
        if not node.running:
            raise AssertionError(f"{node!r} exited before joining\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{node!r} did not join in {timeout:.0f} s\n"
                                 f"{node.log_tail()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory):
    """A standalone redis-server shared by the tests of one module."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_nodes(module_redis, tmp_path_factory):
    """Three mqttd nodes (``ma``, ``mb``, ``mc``) on :func:`module_redis`, shared by
    the tests of one module (starting nodes takes seconds): give every test its
    own client ids and topics."""
    nodes = []
    try:
        for name in ("ma", "mb", "mc"):
            node = BrokerProcess(tmp_path_factory.mktemp(name), broker_id=name,
                                 persistence="memory",
                                 extra_args=["--cluster", module_redis.url, "--node-id", name,
                                             "--sys-interval", "0"])
            nodes.append(node)
            node.start()
        for node in nodes:
            wait_joined(node)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def wait(d, timeout: float = 10.0):
    """Await the Deferred ``d`` inside :func:`aio` (bounded)."""
    return await asyncio.wait_for(d.asFuture(asyncio.get_running_loop()), timeout)


@pytest.fixture
def aio():
    """Run ``coroutine_function()`` on a fresh asyncio loop (30 s at most)."""
    def run(coroutine_function, timeout: float = 30.0):
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(coroutine_function(), timeout))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    return run
