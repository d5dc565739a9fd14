#!/usr/bin/env python3
"""Records lost per flipped byte in a data directory (journal and checkpoint).

    .venv/bin/python bench/corruption.py                    # 300 flips each, file and dbm
    .venv/bin/python bench/corruption.py --flips 1000 --messages 10000 --sessions 20

Builds, in a temporary directory, (a) a journal of ``--records`` records (one
queued QoS 1 message each) and (b) a checkpoint of ``--sessions`` sessions
holding ``--messages`` queued messages in all plus ``--retained`` retained
messages; then, ``--flips`` times each, restores the pristine copy, flips one
random bit of one random byte of the file, opens the store (recovery) and
counts what is missing against the reference.  ``--damage bit`` flips one
bit (repaired by CRC-32 single-bit correction), ``--damage byte`` XORs one
byte with a random value (1 to 8 bits).  Offline, no network.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402
from twisted.logger import globalLogBeginner, globalLogPublisher  # noqa: E402

from mqttd.messages import Message  # noqa: E402
from mqttd.persistence import store_from_spec  # noqa: E402
from mqttd.persistence.records import (  # noqa: E402
    OutboundRecord, PutOutbound, PutRetained, PutSession, SessionRecord, StoredState,
    apply_op)


def sync(f, *args):
    return defer.maybeDeferred(f, *args)


def make(kind, path, **options):
    return store_from_spec(f"{kind}:{path}", task.Clock(), run_in_thread=sync, **options)


def settle(d):
    out = []
    d.addBoth(out.append)
    return out[0] if out else None


def reference(ops):
    state = StoredState()
    for op in ops:
        apply_op(state, op)
    return state


def contents(state):
    return ({(c, q) for c, s in state.sessions.items() for q in s.outbound},
            set(state.sessions), set(state.retained))


def build(kind, path, ops, per_record):
    store = make(kind, path, compact_bytes=10**10)
    store.open()
    if per_record:
        for op in ops:
            store.write(op)
            settle(store.sync())
        # "kill": leave the journal as it is
        for fd in store._retired + [store._fd]:
            os.close(fd)
        store._retired, store._fd = [], None
        store._unlock()
        store._state = "closed"
    else:
        for op in ops:
            store.write(op)
        settle(store.sync())
        settle(store.close())


def measure(kind, ops, per_record, target, flips, rng, workdir, damage="bit"):
    pristine = os.path.join(workdir, "pristine")
    build(kind, pristine, ops, per_record)
    want = contents(reference(ops))
    names = sorted(n for n in os.listdir(pristine) if target(n))
    victim = names[0]
    size = os.path.getsize(os.path.join(pristine, victim))
    losses = []
    live = os.path.join(workdir, "live")
    for _ in range(flips):
        if os.path.exists(live):
            shutil.rmtree(live)
        shutil.copytree(pristine, live)
        path = os.path.join(live, victim)
        offset = rng.randrange(size)
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            mask = (1 << rng.randrange(8)) if damage == "bit" else rng.randrange(1, 256)
            f.write(bytes([byte ^ mask]))
        store = make(kind, live)
        got = contents(store.open())
        settle(store.close())
        losses.append(tuple(len(w - g) for w, g in zip(want, got)))
    shutil.rmtree(live, ignore_errors=True)
    shutil.rmtree(pristine, ignore_errors=True)
    messages = [m for m, _, _ in losses]
    return {
        "file": victim.split(".")[0], "bytes": size, "flips": flips,
        "messages_lost_mean": round(statistics.mean(messages), 3),
        "messages_lost_max": max(messages),
        "flips_losing_nothing_pct": round(100 * sum(1 for x in losses if not any(x)) / flips, 1),
        "sessions_lost_max": max(s for _, s, _ in losses),
        "retained_lost_max": max(r for _, _, r in losses),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=300)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--retained", type=int, default=200)
    parser.add_argument("--kinds", default="file,dbm")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--damage", choices=("bit", "byte"), default="bit",
                        help="flip one random bit, or XOR one byte with a random value")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    globalLogPublisher.addObserver(lambda event: None)
    rng = random.Random(args.seed)
    journal_ops = [PutSession(SessionRecord("c0"))] + [
        PutOutbound("c0", OutboundRecord(i, Message("t/%d" % i, b"x" * 64, 1), 1))
        for i in range(1, args.records + 1)]
    snapshot_ops = []
    per = args.messages // args.sessions
    for c in range(args.sessions):
        snapshot_ops.append(PutSession(SessionRecord(f"c{c}")))
        snapshot_ops += [PutOutbound(f"c{c}", OutboundRecord(i, Message("t", b"x" * 64, 1), 1))
                         for i in range(1, per + 1)]
    snapshot_ops += [PutRetained(Message(f"r/{i}", b"y" * 64, 1, True))
                     for i in range(args.retained)]
    results = []
    with tempfile.TemporaryDirectory(prefix="mqttd-corruption-") as workdir:
        for kind in args.kinds.split(","):
            row = measure(kind, journal_ops, True, lambda n: n.startswith("journal."),
                          args.flips, rng, workdir, args.damage)
            results.append(dict(store=kind, damage=args.damage,
                                what=f"journal, {args.records} records", **row))
            target = (lambda n: n == "snapshot.pkl") if kind == "file" else (
                lambda n: n.endswith(".dat"))
            row = measure(kind, snapshot_ops, False, target, args.flips, rng, workdir,
                          args.damage)
            results.append(dict(store=kind, damage=args.damage, what=f"checkpoint, {args.messages} messages / "
                                f"{args.sessions} sessions / {args.retained} retained", **row))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
