#!/usr/bin/env python3
"""In-process CPU cost of a cluster node's publish path for shared-subscription groups.

PUBLISH bytes -> ClientConnection -> Broker.publish -> the cluster bus router's
``forward`` (route cache lookup, the node picked per group, envelopes encoded and
flushed to a Redis stand-in that answers at once) -> local delivery to a sink
transport; ``task.Clock``, no sockets, no Redis.  Scenarios (QoS 0, 64-byte
payloads, one publisher):

``group-here``
    ``$share/g/jobs/#`` has a connected member on this node and members on two
    other live nodes: the node serves the group itself (after looking for a
    connected member here: REVIEW-S9-CLUSTER C6, "online members first").
``group-elsewhere``
    the group's members are on the two other nodes only: round-robin between them.
``plain``
    no group; a plain subscriber on another node.

CPU time (``time.process_time``), best of N, scenarios alternated so drift in
machine load hits all of them.  ``--root DIR`` imports mqttd from another
checkout (a baseline) instead of this one.

    .venv/bin/python bench/cluster_shared.py [--messages 50000] [--best-of 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = "$share/g/jobs/#"
SCENARIOS = ("group-here", "group-elsewhere", "plain")


def _import(root):
    sys.path.insert(0, root)
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mqttd.broker import Broker, BrokerConfig
    from mqttd.cluster.bus import Router
    from mqttd.cluster.routes import RouteTable
    from mqttd.codec import encode
    from mqttd.codec.packets import Connect, Publish, Subscribe, Subscription
    from mqttd.connection import ClientConnection
    return SimpleNamespace(**locals())


class _Redis:
    """What the router and the route table need of a backend: every call answered."""

    def __init__(self, defer):
        self.defer = defer
        self.commands = 0

    def register(self, name, source):
        pass

    def pipeline(self, commands, wait_replicas=0, wait_timeout=1000):
        self.commands += len(commands)
        return self.defer.succeed([b"1-0"] * len(commands))

    def execute(self, *args):
        return self.defer.succeed(None)

    def run(self, *args):
        return self.defer.succeed(None)


def run(m, scenario: str, messages: int) -> float:
    """CPU seconds for ``messages`` PUBLISHes in ``scenario``."""
    class Sink(m.StringTransport):
        def write(self, data):
            pass

    clock = m.Clock()
    broker = m.Broker(clock, None, m.BrokerConfig())
    redis = _Redis(m.defer)
    routes = m.RouteTable(redis, clock, "B")
    node = SimpleNamespace(node_id="B", peers={"C": b"1", "D": b"1"})
    router = m.Router(broker, redis, routes, node)
    router._online = True
    broker.add_remote_router(router)

    def connect(client_id):
        conn = m.ClientConnection(broker, Sink(), clock, peer="127.0.0.1:1")
        conn.data_received(m.encode(m.Connect(4, client_id, True, 0), 4))
        clock.advance(0)
        return conn

    if scenario == "plain":
        routes._cache_replace("C", {"jobs/#"}, 1)
    else:
        routes._cache_replace("C", {GROUP}, 1)
        routes._cache_replace("D", {GROUP}, 1)
    if scenario == "group-here":
        member = connect("member")
        member.data_received(m.encode(m.Subscribe(1, (m.Subscription(GROUP, 0),)), 4))
        clock.advance(0)
        routes._cache_replace("B", {GROUP}, 1)
    pub = connect("pub")
    packet = m.encode(m.Publish("jobs/1", b"x" * 64, 0), 4)
    before = router.stats["forwarded"][0]
    started = time.process_time()
    for k in range(messages):
        routes.fresh_as_of = clock.seconds()
        pub.data_received(packet)
        if k % 100 == 99:
            clock.advance(0)          # the router's flush
    clock.advance(0)
    seconds = time.process_time() - started
    forwarded = router.stats["forwarded"][0] - before
    expected = 0 if scenario == "group-here" else messages
    assert forwarded == expected, (scenario, forwarded)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--best-of", type=int, default=5)
    parser.add_argument("--root", default=ROOT, help="import mqttd from this checkout")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    m = _import(os.path.abspath(args.root))
    times = {scenario: [] for scenario in SCENARIOS}
    for _ in range(args.best_of):
        for scenario in SCENARIOS:
            times[scenario].append(run(m, scenario, args.messages))
    result = {scenario: round(min(times[scenario]) / args.messages * 1e6, 3)
              for scenario in SCENARIOS}
    if args.json:
        print(json.dumps({"us_cpu_per_message": result, "messages": args.messages,
                          "best_of": args.best_of, "root": args.root}))
    else:
        for scenario in SCENARIOS:
            print(f"{scenario:<16} {result[scenario]:>7.2f} us CPU per message "
                  f"(best of {args.best_of}, {args.messages} messages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
