#!/usr/bin/env python3
"""In-process CPU cost of the ACL on the QoS 0 fan-in hot path (with vs without).

The same path as ``bench/hotpath.py`` (PUBLISH bytes -> ClientConnection ->
Broker.publish -> trie -> delivery -> a sink transport, ``task.Clock``, no
sockets), run alternately without an authorizer and with the ACL that
``bench/run --mqttd-security`` uses (100 rules, the granting one last; every
client logged in as ``bench``), so ``authorize_publish`` and
``authorize_forward`` run per message.  CPU time (``time.process_time``), best
of N per mode: far less noisy on a shared machine than ``bench/run``.

    .venv/bin/python bench/acl_hotpath.py [--messages 100000] [--best-of 7] [--json]

Prints deliveries per CPU second for both modes and their ratio (with/without).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from mqttd.auth.acl import ACLAuthorizer, parse_acl  # noqa: E402
from mqttd.broker import Broker, BrokerConfig  # noqa: E402
from mqttd.codec import encode  # noqa: E402
from mqttd.codec.packets import Connect, Publish, Subscribe, Subscription  # noqa: E402
from mqttd.connection import ClientConnection  # noqa: E402

USER = "bench"


def acl_rules() -> str:
    """bench/run's --mqttd-security ACL: 100 rules, the granting one last."""
    rules = ["# 100 rules: 96 for other users, 2 patterns, 2 for the bench user"]
    for i in range(48):
        rules += [f"user other{i}", f"topic readwrite other/{i}/#", f"topic deny other/{i}/secret"]
    rules += ["pattern readwrite clients/%c/#", "pattern read users/%u/#",
              f"user {USER}", "topic deny bench/private/#", "topic readwrite bench/#"]
    return "\n".join(rules) + "\n"


class _Sink(StringTransport):
    def write(self, data):
        pass


def _connect(broker, clock, client_id, username):
    conn = ClientConnection(broker, _Sink(), clock, peer="127.0.0.1:1")
    conn.data_received(encode(Connect(4, client_id, True, 0, username), 4))
    clock.advance(0)
    return conn


def run(messages: int, security: bool, publishers: int = 10) -> float:
    """CPU seconds to route ``messages`` QoS 0 PUBLISHes, 10 publishers -> 1 subscriber."""
    clock = Clock()
    broker = Broker(clock, None, BrokerConfig())
    username = None
    if security:
        broker.authorizer = ACLAuthorizer(parse_acl(acl_rules()))
        username = USER
    sub = _connect(broker, clock, "sub0", username)
    sub.data_received(encode(Subscribe(1, (Subscription("bench/#", 0),)), 4))
    clock.advance(0)
    pubs = [_connect(broker, clock, f"pub{i}", username) for i in range(publishers)]
    packets = [encode(Publish(f"bench/p/{i}", b"x" * 64, 0), 4) for i in range(publishers)]
    before = broker.stats.messages_sent
    started = time.process_time()
    for k in range(messages):
        i = k % publishers
        pubs[i].data_received(packets[i])
    seconds = time.process_time() - started
    assert broker.stats.messages_sent - before == messages, "messages were not delivered"
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--best-of", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    times = {False: [], True: []}
    for _ in range(args.best_of):  # alternate, so drift in machine load hits both
        for security in (False, True):
            times[security].append(run(args.messages, security))
    plain, secured = (args.messages / min(times[m]) for m in (False, True))
    result = {"messages": args.messages, "best_of": args.best_of,
              "plain_deliveries_per_cpu_s": round(plain),
              "acl_deliveries_per_cpu_s": round(secured),
              "ratio": round(secured / plain, 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"without ACL {plain:>10.0f} deliveries per CPU second\n"
              f"with ACL    {secured:>10.0f} deliveries per CPU second\n"
              f"ratio       {secured / plain:.3f} (best of {args.best_of}, "
              f"{args.messages} messages each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
