#!/usr/bin/env python3
"""In-process CPU time of the PUBLISH hot path, for before/after comparisons of core changes.

PUBLISH bytes -> ClientConnection.data_received -> Broker.publish -> trie match ->
per-subscriber delivery -> PublishTemplate -> transport.write (a sink), all in one
process with task.Clock: no sockets, no other process, so the figure is CPU time
(``time.process_time``, best of N) and far less noisy on a shared machine than
``bench/run``.  MQTT 3.1.1 clients, no MQTT 5 feature in use: it measures what the
features cost when unused.

    .venv/bin/python bench/hotpath.py            # 100k/50k/5k messages, best of 9
    .venv/bin/python bench/hotpath.py --quick    # smoke mode

Compare two commits by running it in each (same machine, alternately).
"""
from __future__ import annotations

import argparse
import json
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mqttd.broker import Broker, BrokerConfig
from mqttd.codec import encode
from mqttd.codec.packets import Connect, Publish, Subscribe, Subscription
from mqttd.connection import ClientConnection

#: scenario -> (publishers, subscribers, QoS), as bench/run's scenarios
SCENARIOS = {
    "fanin_qos0": (10, 1, 0),
    "fanin_qos1": (10, 1, 1),
    "fanout_qos0": (1, 100, 0),
}


class _Sink(StringTransport):
    def write(self, data):
        pass


def _connect(broker, clock, client_id):
    conn = ClientConnection(broker, _Sink(), clock, peer="127.0.0.1:1")
    conn.data_received(encode(Connect(4, client_id, True, 0), 4))
    clock.advance(0)
    return conn


def run(scenario: str, messages: int) -> float:
    """CPU seconds to route ``messages`` PUBLISHes in ``scenario``."""
    publishers, subscribers, qos = SCENARIOS[scenario]
    clock = Clock()
    broker = Broker(clock, None, BrokerConfig())
    for i in range(subscribers):
        sub = _connect(broker, clock, f"sub{i}")
        sub.data_received(encode(Subscribe(1, (Subscription("bench/#", qos),)), 4))
        clock.advance(0)
    pubs = [_connect(broker, clock, f"pub{i}") for i in range(publishers)]
    packets = [encode(Publish(f"bench/{i}", b"x" * 64, qos, packet_id=1 if qos else None), 4)
               for i in range(publishers)]
    sessions = [broker.sessions[f"sub{i}"] for i in range(subscribers)]
    started = time.process_time()
    for k in range(messages):
        i = k % publishers
        pubs[i].data_received(packets[i])
        if qos:  # the subscriber acknowledges at once
            for session in sessions:
                for pid in list(session.inflight):
                    broker.puback(session, pid)
    return time.process_time() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--best-of", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    counts = {"fanin_qos0": 100_000, "fanin_qos1": 50_000, "fanout_qos0": 5_000}
    best_of = args.best_of
    if args.quick:
        counts = {name: count // 100 for name, count in counts.items()}
        best_of = 1
    results = {}
    for name, count in counts.items():
        seconds = min(run(name, count) for _ in range(best_of))
        deliveries = count * SCENARIOS[name][1]
        results[name] = {"messages": count, "cpu_seconds": round(seconds, 4),
                         "deliveries_per_cpu_second": round(deliveries / seconds)}
    if args.json:
        print(json.dumps(results))
    else:
        for name, r in results.items():
            print(f"{name:12} {r['deliveries_per_cpu_second']:>10} deliveries per CPU second "
                  f"({r['messages']} messages, best of {best_of})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
