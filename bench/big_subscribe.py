"""Broker time for one SUBSCRIBE of N filters from a client that is not writable
meanwhile, then its retained replays drained (in-process, FakeClient).

Shows whether the work grows linearly with N (it grew quadratically while
``Session.replays`` was a plain dict: each replay taken from its front scanned
the entries deleted before it).

    python bench/big_subscribe.py [N ...]        # default 25000 50000 100000
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from core.harness import FakeClient, make_broker  # noqa: E402
from mqttd.codec.packets import Subscribe, Subscription  # noqa: E402


def run(n: int) -> float:
    broker, clock = make_broker()
    client = FakeClient(broker, clock)
    client.connect("many")
    client.conn.pause_writing()
    packet = Subscribe(7, tuple(Subscription("x/%d/+" % i, 1) for i in range(n)))
    start = time.perf_counter()
    client.send(packet)
    client.conn.resume_writing()
    elapsed = time.perf_counter() - start
    assert not broker.sessions["many"].replays
    return elapsed


def main(argv) -> int:
    sizes = [int(a) for a in argv] or [25_000, 50_000, 100_000]
    for n in sizes:
        elapsed = run(n)
        print(f"{n:>8} filters: {elapsed:6.2f} s  ({elapsed / n * 1e6:5.1f} us per filter)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
