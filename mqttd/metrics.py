"""Counters of what the broker does (layer L1; exported by $SYS and metrics)."""
from __future__ import annotations

from typing import Dict

import attrs


@attrs.define
class BrokerStats:
    connections_total: int = 0
    messages_received: int = 0
    messages_sent: int = 0
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
    #: "client-maximum-packet-size", "expired")
    dropped: Dict[str, int] = attrs.Factory(dict)
    #: refused CONNECTs by reason ("max-sessions", "store-unavailable")
    connects_refused: Dict[str, int] = attrs.Factory(dict)
    #: gauge: payload + topic bytes queued in all sessions (--max-queued-bytes-total)
    queued_bytes: int = 0
    #: gauge: persistent sessions held (--max-sessions)
    persistent_sessions: int = 0
    #: refusals and limit hits by kind: "authentication", "anonymous",
    #: "session-owner", "publish", "subscribe", "forward", "will",
    #: "subscription" (removed on reload), "max-connections",
    #: "max-subscriptions-per-client", "max-topic-levels", "inbound-rate"
    refused: Dict[str, int] = attrs.Factory(dict)

    def count_refusal(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1

    def count_refused_connect(self, reason: str) -> None:
        self.connects_refused[reason] = self.connects_refused.get(reason, 0) + 1

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())
