#!/usr/bin/env python3
"""In-process CPU time of the connect path: CONNECT -> CONNACK -> SUBSCRIBE -> SUBACK.

The per-connection work of ``bench/run``'s ``connect_subscribe`` scenario without
sockets: ``ClientConnection`` on a sink transport, ``task.Clock``, the broker with the
observers a running service attaches (the event log and the ``$SYS`` topics), MQTT 3.1.1
clients, clean sessions, one filter each (``bench/c/<i>``), then every connection lost.
CPU time (``time.process_time``, best of N), so far less noisy than ``bench/run`` on a
shared machine; ``--profile`` prints the cProfile of one round (CPython).

    .venv/bin/python bench/connect_hotpath.py              # 10,000 clients, best of 5
    .venv-pypy/bin/python bench/connect_hotpath.py         # the same on PyPy
    .venv/bin/python bench/connect_hotpath.py --profile    # where the time goes

Compare two commits by running it in each (same machine, alternately).
"""
from __future__ import annotations

import argparse
import json
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mqttd.broker import Broker, BrokerConfig
from mqttd.codec import encode
from mqttd.codec.packets import Connect, Subscribe, Subscription
from mqttd.connection import ClientConnection
from mqttd.eventlog import EventLog
from mqttd.systopics import SysTopics


class _Sink(StringTransport):
    """A transport that counts what it is given and keeps nothing."""

    written = 0

    def write(self, data):
        self.written += 1

    def loseConnection(self):
        pass


def run(clients: int) -> tuple:
    """(CPU seconds for ``clients`` connect+subscribe handshakes, CPU seconds to
    tear them down); checks that every client got its CONNACK and SUBACK."""
    clock = Clock()
    broker = Broker(clock, None, BrokerConfig())
    events, sys_topics = EventLog(broker), SysTopics(broker, clock, 0)
    events.start()
    sys_topics.start()
    connects = [encode(Connect(4, f"c{i}", True, 0), 4) for i in range(clients)]
    subscribes = [encode(Subscribe(1, (Subscription(f"bench/c/{i}", 0),)), 4)
                  for i in range(clients)]
    conns = []
    started = time.process_time()
    for i in range(clients):
        transport = _Sink()
        conn = ClientConnection(broker, transport, clock, peer="127.0.0.1:1")
        conn.data_received(connects[i])
        clock.advance(0)
        conn.data_received(subscribes[i])
        clock.advance(0)
        conns.append((conn, transport))
    handshakes = time.process_time() - started
    answered = sum(transport.written >= 2 for _, transport in conns)
    if answered != clients:
        raise SystemExit(f"only {answered} of {clients} clients got CONNACK and SUBACK")
    started = time.process_time()
    for conn, _ in conns:
        conn.connection_lost(None)
    clock.advance(0)
    teardown = time.process_time() - started
    events.stop()
    sys_topics.stop()
    return handshakes, teardown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--best-of", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="200 clients, once (smoke test)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", action="store_true", help="cProfile one round")
    args = parser.parse_args(argv)
    clients, best_of = (200, 1) if args.quick else (args.clients, args.best_of)
    # the broker's info lines go nowhere (a running broker writes them to its log,
    # after the rate limiter: at most 50 per reason and 10 s)
    globalLogPublisher._observers = []
    if args.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.runcall(run, clients)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    rounds = [run(clients) for _ in range(best_of)]
    handshakes = min(r[0] for r in rounds)
    teardown = min(r[1] for r in rounds)
    result = {"clients": clients, "best_of": best_of,
              "connect_subscribe_us": round(handshakes / clients * 1e6, 2),
              "teardown_us": round(teardown / clients * 1e6, 2),
              "connect_subscribe_per_cpu_second": round(clients / handshakes)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"connect+subscribe {result['connect_subscribe_us']:>8} µs CPU per client "
              f"({result['connect_subscribe_per_cpu_second']} per CPU second), teardown "
              f"{result['teardown_us']} µs ({clients} clients, best of {best_of})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
