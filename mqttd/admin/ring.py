"""A bounded per-client ring of recent drops and refusals, with reasons.

Fed by ``Broker.on_incident`` (every dropped message and every refused
packet, before log rate limiting) and by the broker's disconnect events, so
``mqttd why`` can say "3 messages to a/b were dropped at 12:01:07: queue-full".
Memory is bounded four times: ``per_client`` entries per client,
``max_clients`` clients (the least recently active are forgotten first),
``max_bytes`` for everything kept (8 MiB by default; again the least recently
active clients go first: 50 entries of 1 KiB for 10,000 client ids made
~600 MB of attacker-chosen text, REVIEW-S10 S10), and
each entry's size: its text is cut at :data:`TEXT_LIMIT` characters and a
client id over :data:`mqttd.logs.FIELD_LIMIT` is kept as
``mqttd.logs.bound(client_id)`` (a client may send a 64 KiB id; lookups cut it
the same way).  The text's control characters are escaped as in text log lines
(``mqttd why`` prints it to a terminal).
"""
from __future__ import annotations

import collections
from typing import Deque, Dict, List, Optional

import attrs

from mqttd.logs import bound, escape_controls

#: the most characters of an incident's text kept (the log lines it mirrors
#: bound each field to 256; a text holds a few of them)
TEXT_LIMIT = 1024
#: bytes one incident is counted for beyond its text's characters (the
#: Incident object, its deque slot, the float and the reason string)
INCIDENT_OVERHEAD = 150


@attrs.frozen
class Incident:
    """One drop or refusal: ``at`` is broker clock time (seconds since the epoch)."""

    at: float
    reason: str
    text: str
    #: how many identical incidents (same reason and text) in a row this stands for
    repeated: int = 1

    def to_json(self) -> dict:
        return attrs.asdict(self)


class IncidentRing:
    """Recent incidents per client id (and counts per reason over all clients)."""

    def __init__(self, clock, per_client: int = 50, max_clients: int = 10_000,
                 max_bytes: int = 8 * 1024 * 1024):
        self.clock = clock
        self.per_client = per_client
        self.max_clients = max_clients
        self.max_bytes = max_bytes
        self._rings: "collections.OrderedDict[str, Deque[Incident]]" = collections.OrderedDict()
        #: bytes counted per client's ring (its id + its incidents), and in all
        self._ring_bytes: Dict[str, int] = {}
        self.bytes = 0
        #: incidents by reason since start, over all clients (exported as metrics)
        self.counts: Dict[str, int] = {}
        self._unregister = []

    def attach(self, broker) -> None:
        """Listen to ``broker``'s incidents and disconnects until :meth:`detach`."""
        self._unregister.append(broker.on_incident(self.record))
        self._unregister.append(broker.on("clientDisconnected", self._disconnected))

    def detach(self) -> None:
        for unregister in self._unregister:
            unregister()
        self._unregister = []

    def _disconnected(self, client=None, reason=None, **_):
        if client is not None:
            self.record(client.client_id, "disconnected", f"disconnected: {reason}",
                        count=False)

    def record(self, client_id: Optional[str], reason: str, text: str,
               count: bool = True) -> None:
        """Remember one incident of ``client_id`` (None: not attributable)."""
        if count:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        if client_id is None:
            return
        client_id = bound(client_id)
        text = escape_controls(bound(text, TEXT_LIMIT))
        ring = self._rings.get(client_id)
        if ring is None:
            if len(self._rings) >= self.max_clients:
                self._forget_oldest()
            ring = self._rings[client_id] = collections.deque(maxlen=self.per_client)
            self._ring_bytes[client_id] = size = len(client_id) + INCIDENT_OVERHEAD
            self.bytes += size
        else:
            self._rings.move_to_end(client_id)
        now = self.clock.seconds()
        if ring and ring[-1].reason == reason and ring[-1].text == text:
            ring[-1] = attrs.evolve(ring[-1], at=now, repeated=ring[-1].repeated + 1)
            return
        change = len(text) + INCIDENT_OVERHEAD
        if len(ring) == ring.maxlen:
            change -= len(ring[0].text) + INCIDENT_OVERHEAD  # pushed out by the append
        ring.append(Incident(now, reason, text))
        self._ring_bytes[client_id] += change
        self.bytes += change
        while self.bytes > self.max_bytes and len(self._rings) > 1:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        """Forget the least recently active client's incidents."""
        client_id, _ring = self._rings.popitem(last=False)
        self.bytes -= self._ring_bytes.pop(client_id, 0)

    def recent(self, client_id: str) -> List[Incident]:
        """The client's incidents, oldest first (at most ``per_client``)."""
        return list(self._rings.get(bound(client_id), ()))

    def last(self, client_id: str, reason: str) -> Optional[Incident]:
        for incident in reversed(self._rings.get(bound(client_id), ())):
            if incident.reason == reason:
                return incident
        return None
