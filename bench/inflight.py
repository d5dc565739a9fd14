#!/usr/bin/env python3
"""What a subscriber that reads but never acknowledges costs the broker: --max-inflight-bytes.

A QoS 1 subscriber on ``inflight/#`` reads every PUBLISH and sends no PUBACK; a publisher
sends ``--messages`` QoS 1 messages of ``--size`` bytes.  Reported: the PUBLISHes the
subscriber got (its in-flight window), and the broker's RSS growth once the publisher's
messages are all PUBACKed and the subscriber has seen nothing for a second.  Without a
byte bound the window holds ``--max-inflight`` (1,000) messages of any size, counted by no
queue limit; with it, at most ``--max-inflight-bytes`` (16 MiB) are in flight and the
rest waits in the queue under ``--max-queued-bytes`` (64 MiB).

    .venv/bin/python bench/inflight.py                          # this checkout
    .venv/bin/python bench/inflight.py --broker-root /tmp/base  # another checkout
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import rss_kib, start_mqttd, stop_process  # noqa: E402
from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec.packets import Publish, Suback, Subscribe, Subscription  # noqa: E402


def run(messages: int, size: int, broker_root=None, extra=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_mqttd(Path(tmp), extra=extra, broker_root=broker_root)
        try:
            sub = BlockingClient(port, "inflight-sub", timeout=30)
            sub.send(Subscribe(1, (Subscription("inflight/#", 1),)))
            assert isinstance(sub.next_packet(30), Suback)
            time.sleep(0.5)
            before = rss_kib(proc.pid)
            got = []

            def read():                    # reads everything, acknowledges nothing
                try:
                    while True:
                        packet = sub.next_packet(1.0)
                        if isinstance(packet, Publish):
                            got.append(len(packet.payload))
                except (socket.timeout, ConnectionError, OSError):
                    pass
            pub = BlockingClient(port, "inflight-pub", timeout=120)
            payload = b"x" * size
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            for i in range(messages):
                pub.send(Publish("inflight/t", payload, 1, packet_id=i % 65535 + 1))
            acked = 0
            deadline = time.monotonic() + 120
            while acked < messages and time.monotonic() < deadline:
                if pub.next_packet(120).__class__.__name__ == "Puback":
                    acked += 1
            reader.join(130)
            after = rss_kib(proc.pid)
            sub.sock.close()
            pub.close()
            return {"messages": messages, "size": size, "publisher_acked": acked,
                    "in_flight_received": len(got),
                    "rss_growth_mib": round((after - before) / 1024, 1)}
        finally:
            stop_process(proc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=1_000_000, help="payload bytes")
    parser.add_argument("--broker-root", default=None, help="measure another checkout")
    parser.add_argument("--broker-arg", action="append", default=[],
                        help="one more mqttd option word (repeatable)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.messages, args.size, args.broker_root, args.broker_arg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
