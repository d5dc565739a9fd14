"""Counters of what the broker does (layer L1; exported by $SYS and metrics)."""
from __future__ import annotations

import bisect
from typing import Dict, List, Sequence

import attrs

#: upper bounds (seconds) of the store latency histograms
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """Cumulative-export histogram of durations in seconds (cheap ``observe``).

    ``counts[i]`` counts observations ``<= buckets[i]`` but above the bucket
    before; the last slot counts those above every bucket (``+Inf``).
    """

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts: List[int] = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> List[tuple]:
        """``[(upper bound as str, cumulative count), ..., ("+Inf", count)]``."""
        out, running = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@attrs.define
class BrokerStats:
    connections_total: int = 0
    messages_acked: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    subscriptions_total: int = 0
    protocol_errors: int = 0
    #: congestion episodes in which a subscriber held publishers back
    publisher_holds: int = 0
    #: subscribers that used up --max-publisher-pause without draining
    slow_subscribers_demoted: int = 0
    #: dropped messages by reason ("queue-full", "queued-bytes-total",
    #: "client-maximum-packet-size", "expired", "not-authorized": queued
    #: before a reload took the read permission away; "held-input": PUBLISHes
    #: a client sent that were held, unhandled, when its connection ended)
    dropped: Dict[str, int] = attrs.Factory(dict)
    #: gauge: bytes (topic + payload + properties) the messages queued in all
    #: sessions hold, a message queued for several sessions counted once
    #: (--max-queued-bytes-total; mqttd.session.QueueLedger)
    queued_bytes: int = 0
    #: message_key(message) -> queue entries holding it (QueueLedger)
    queued_held: Dict[int, int] = attrs.Factory(dict)
    #: gauge: persistent sessions held (--max-sessions)
    persistent_sessions: int = 0
    #: indexed by QoS (the broker's own $SYS messages are not counted):
    #: PUBLISHes routed (received or published in-process) and their payload
    #: bytes; PUBLISHes sent to clients and their packet bytes
    messages_in: List[int] = attrs.Factory(lambda: [0, 0, 0])
    payload_in: List[int] = attrs.Factory(lambda: [0, 0, 0])
    messages_out: List[int] = attrs.Factory(lambda: [0, 0, 0])
    bytes_out: List[int] = attrs.Factory(lambda: [0, 0, 0])
    #: CONNECTs refused (any reason) and by authentication/authorization
    connects_refused: int = 0
    #: the most clients connected at once since start
    clients_maximum: int = 0
    #: sessions that expired while offline
    sessions_expired: int = 0
    #: offline sessions of another user discarded by a CONNECT with their
    #: client id (session ownership, REVIEW-S9 R17)
    sessions_replaced: int = 0
    #: offline persistent sessions discarded to make room for a new one of
    #: the same owner (--max-sessions, --max-sessions-per-user)
    sessions_evicted: int = 0
    #: refusals and limit hits by kind: "authentication", "anonymous",
    #: "session-owner", "publish", "subscribe", "forward", "will",
    #: "subscription" (removed on reload), "max-connections",
    #: "max-subscriptions-per-client", "max-topic-filters-per-packet",
    #: "max-topic-levels", "inbound-rate", "max-pending-connections",
    #: "max-user-properties", "max-inflight-bytes" (a limit hit: a
    #: subscriber's queue waits on its in-flight byte window, once per episode),
    #: "max-sessions", "max-sessions-per-user", "store-unavailable" (CONNECTs
    #: refused for them)
    refused: Dict[str, int] = attrs.Factory(dict)

    def count_refusal(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1

    @property
    def messages_received(self) -> int:
        """PUBLISHes routed, every QoS ($SYS excluded)."""
        return sum(self.messages_in)

    @property
    def messages_sent(self) -> int:
        """PUBLISHes sent to clients, every QoS ($SYS excluded)."""
        return sum(self.messages_out)

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())
