"""Drive a store until killed: the subprocess half of test_store_crash.py.

    python crash_writer.py KIND PATH [MAX_OPS]

Opens ``KIND:PATH`` (file or dbm) with fsync="always" and a small
compact_bytes (so kills also land mid-compaction), writes PutOutbound ops for
session "crash" -- many per reactor turn, one sync() per op -- and prints
the seq of every op whose sync() has fired, flushing stdout each time.
Stops by itself after MAX_OPS ops or 60 seconds.
"""
import sys

from twisted.internet import reactor

from mqttd.messages import Message
from mqttd.persistence import store_from_spec
from mqttd.persistence.records import OutboundRecord, PutOutbound, PutSession, SessionRecord

PER_TURN = 25


def main(kind, path, max_ops):
    store = store_from_spec(f"{kind}:{path}", reactor, compact_bytes=256 * 1024)
    store.open()
    store.write(PutSession(SessionRecord("crash")))
    next_seq = [0]

    def acked(_, seq):
        sys.stdout.write(f"{seq}\n")
        sys.stdout.flush()

    def step():
        for _ in range(PER_TURN):
            seq = next_seq[0]
            if seq >= max_ops:
                store.close().addBoth(lambda _: reactor.stop())
                return
            next_seq[0] += 1
            store.write(PutOutbound("crash", OutboundRecord(
                seq, Message("crash/test", b"%064d" % seq, 1), 1)))
            store.sync().addCallback(acked, seq)
        reactor.callLater(0, step)

    reactor.callWhenRunning(step)
    reactor.callLater(60, reactor.stop)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10**6)
