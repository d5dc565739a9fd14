"""One SUBSCRIBE of N filters (in-process, FakeClient on a task.Clock): how long the
broker's longest reactor turn is, and the whole work (REVIEW finding 12).

With the default ``--max-topic-filters-per-packet`` (1000) the packet is refused
(v5 DISCONNECT 0x97) while it is decoded, after 1001 filters.  With the limit
lifted (0) every filter is handled, ``FILTERS_PER_TURN`` (1000) per turn, and
the retained replays (one cursor per filter) take at most
``REPLAY_STEPS_PER_TURN`` steps per turn; decoding the packet itself is one
turn (the first).  A turn is one call into the broker: the packet's arrival,
the client becoming writable, then each round of the calls due.

    python bench/big_subscribe.py [N ...]        # default 25000 50000 100000
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from core.harness import FakeClient, make_broker  # noqa: E402
from mqttd.codec import encode  # noqa: E402
from mqttd.codec.packets import Disconnect, Subscribe, Subscription  # noqa: E402


def run(n: int, limit=None):
    """(seconds of each turn, refused) for one SUBSCRIBE of ``n`` filters."""
    config = {} if limit is None else {"max_topic_filters_per_packet": limit}
    broker, clock = make_broker(**config)
    client = FakeClient(broker, clock, level=5)
    client.connect("many")
    client.conn.pause_writing()
    data = encode(Subscribe(7, tuple(Subscription("x/%d/+" % i, 1) for i in range(n))), 5)
    turns = []
    start = time.perf_counter()
    client.send_bytes(data)                      # the packet arrives: one turn
    turns.append(time.perf_counter() - start)
    start = time.perf_counter()
    client.conn.resume_writing()                 # the client can take messages: one turn
    turns.append(time.perf_counter() - start)
    refused = any(isinstance(p, Disconnect) for p in client.received())
    while len(turns) < 100_000:  # bounded
        # one turn: the calls due now (those they schedule run in the next one)
        calls = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        if not calls:
            break
        begin = time.perf_counter()
        for call in sorted(calls, key=lambda c: c.getTime()):
            if call.active():
                clock.calls.remove(call)
                call.func(*call.args, **call.kw)
        turns.append(time.perf_counter() - begin)
    refused = refused or any(isinstance(p, Disconnect) for p in client.received())
    session = broker.sessions.get("many")
    assert refused or (len(session.subscriptions) == n and not session.replays)
    return turns, refused


def main(argv) -> int:
    sizes = [int(a) for a in argv] or [25_000, 50_000, 100_000]
    for n in sizes:
        turns, refused = run(n)
        print(f"{n:>8} filters, default limit: {'refused (0x97)' if refused else 'served'} "
              f"in {sum(turns):6.3f} s")
        turns, refused = run(n, limit=0)
        print(f"{n:>8} filters, no limit: first turn (decoding it) {turns[0]:6.3f} s, longest "
              f"later turn {max(turns[1:]):6.3f} s, {len(turns)} turns, {sum(turns):6.2f} s "
              f"in all ({sum(turns) / n * 1e6:5.1f} us per filter)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
