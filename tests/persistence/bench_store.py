"""Store benchmarks (not collected by pytest): run with the venv python.

    python tests/persistence/bench_store.py [file|dbm ...] [--messages N]

Prints, per backend: PutOutbound ops/s with fsync="always" and group commit
(1000 writes then one sync, repeated), the longest reactor stall while a
checkpoint of N messages is written in the background, restart (open) time
from the journal alone and from a checkpoint, and the disk size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mqttd.messages import Message  # noqa: E402
from mqttd.persistence import store_from_spec  # noqa: E402
from mqttd.persistence.records import (  # noqa: E402
    OutboundRecord, PutOutbound, PutSession, SessionRecord)


def du(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def op(seq):
    return PutOutbound("bench-client", OutboundRecord(
        seq, Message("bench/topic/with/some/levels", os.urandom(64), 1, origin="publisher"), 1))


@defer.inlineCallbacks
def bench(kind, messages, batch=1000):
    path = tempfile.mkdtemp(prefix=f"mqttd-bench-{kind}-")
    spec = f"{kind}:{path}/data"
    try:
        store = store_from_spec(spec, reactor)
        store.open()
        store.write(PutSession(SessionRecord("bench-client")))
        yield store.sync()
        ops = [op(seq) for seq in range(messages)]
        started = time.perf_counter()
        for start in range(0, messages, batch):
            for o in ops[start:start + batch]:
                store.write(o)
            yield store.sync()
        elapsed = time.perf_counter() - started
        print(f"{kind}: {messages} PutOutbound (64-byte payload), fsync=always, "
              f"{batch} writes per sync: {messages / elapsed:,.0f} ops/s "
              f"({store.fsync_count} fsyncs)")
        journal_size = du(f"{path}/data")

        # a checkpoint of everything, in the background, while the reactor ticks
        gaps, last = [], [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now
        ticker = task.LoopingCall(tick)
        ticker.start(0.001)
        t0 = time.perf_counter()
        yield store._start_compaction(final=False)
        checkpoint_time = time.perf_counter() - t0
        ticker.stop()
        print(f"{kind}: background checkpoint of {messages} messages took {checkpoint_time:.2f}s, "
              f"longest reactor stall {max(gaps) * 1000:.0f} ms")

        # restart from the journal alone: copy the journal-only state aside first
        yield store.close()
        size_checkpoint = du(f"{path}/data")

        store = store_from_spec(spec, reactor)
        t0 = time.perf_counter()
        state = store.open()
        open_checkpoint = time.perf_counter() - t0
        assert len(state.sessions["bench-client"].outbound) == messages
        # rebuild a journal-only directory: replay cost
        store._compacting = None
        yield store.close()

        jpath = f"{path}/journal-only"
        store = store_from_spec(f"{kind}:{jpath}", reactor, compact_bytes=1 << 40)
        store.open()
        store.write(PutSession(SessionRecord("bench-client")))
        for start in range(0, messages, batch):
            for o in ops[start:start + batch]:
                store.write(o)
            yield store.sync()
        # "kill": drop the store without its closing checkpoint
        for fd in store._retired + [store._fd]:
            os.close(fd)
        store._stop_threads()
        store._unlock()
        store._state = "closed"
        store = store_from_spec(f"{kind}:{jpath}", reactor)
        t0 = time.perf_counter()
        state = store.open()
        open_journal = time.perf_counter() - t0
        assert len(state.sessions["bench-client"].outbound) == messages
        store._state = "closed"
        store._stop_threads()
        store._unlock()
        print(f"{kind}: restart with {messages} messages: {open_checkpoint:.2f}s from checkpoint "
              f"({size_checkpoint / 1e6:.1f} MB on disk), {open_journal:.2f}s from journal "
              f"alone ({journal_size / 1e6:.1f} MB on disk)")
    finally:
        shutil.rmtree(path)


@defer.inlineCallbacks
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kinds", nargs="*", default=["file", "dbm"])
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    try:
        for kind in args.kinds:
            yield bench(kind, args.messages)
    finally:
        reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(main)
    reactor.run()
