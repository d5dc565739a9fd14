"""A small blocking MQTT client for the cluster tests (on mqttd's own codec,
through :class:`mqttd.blockingclient.BlockingClient`): subscribe, publish with
the acknowledgement awaited, and collect messages, every wait bounded."""
from __future__ import annotations

import itertools
import socket
import time
from typing import List

from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import (
    Puback, Publish, Pubrec, Pubrel, Pubcomp, Suback, Subscribe, Subscription, Unsuback,
    Unsubscribe)


#: topics of route probes (see wait_routed): never counted as test messages
PROBE = "probe/"


class Client(BlockingClient):
    def __init__(self, port: int, client_id: str, level: int = 5, clean: bool = True,
                 **kwargs):
        super().__init__(port, client_id, clean=clean, level=level, timeout=10.0, **kwargs)
        self.client_id = client_id
        self._ids = itertools.count(1)
        #: PUBLISH packets received and not yet taken
        self.inbox: List[Publish] = []
        #: other packets received while waiting for something else
        self.others: list = []

    def _next(self, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("nothing from the broker in time")
        packet = self.next_packet(timeout=left)
        if isinstance(packet, Publish):
            if packet.qos == 1:
                self.send(Puback(packet.packet_id))
            elif packet.qos == 2:
                self.send(Pubrec(packet.packet_id))
            self.inbox.append(packet)
            return None
        if isinstance(packet, Pubrel):
            self.send(Pubcomp(packet.packet_id))
            return None
        return packet

    def _wait_for(self, kind, packet_id=None, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        for i, packet in enumerate(self.others):
            if isinstance(packet, kind) and (packet_id is None or packet.packet_id == packet_id):
                return self.others.pop(i)
        while True:
            packet = self._next(deadline)
            if packet is None:
                continue
            if isinstance(packet, kind) and (packet_id is None or packet.packet_id == packet_id):
                return packet
            self.others.append(packet)

    def subscribe(self, topic_filter: str, qos: int = 0, **options) -> Suback:
        pid = next(self._ids)
        self.send(Subscribe(pid, (Subscription(topic_filter, qos, **options),)))
        return self._wait_for(Suback, pid)

    def unsubscribe(self, topic_filter: str) -> Unsuback:
        pid = next(self._ids)
        self.send(Unsubscribe(pid, (topic_filter,)))
        return self._wait_for(Unsuback, pid)

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                wait: bool = True, timeout: float = 10.0):
        pid = next(self._ids) if qos else None
        if pid is not None and pid > 65535:
            self._ids = itertools.count(1)
            pid = next(self._ids)
        self.send(Publish(topic, payload, qos, retain, packet_id=pid))
        if qos and wait:
            return self._wait_for(Puback if qos == 1 else Pubrec, pid, timeout)
        return pid

    def _drop_probes(self) -> None:
        self.inbox = [p for p in self.inbox if not p.topic.startswith(PROBE)]

    def collect(self, count: int, timeout: float = 10.0) -> List[Publish]:
        """Exactly ``count`` messages, route probes left out (TimeoutError if
        fewer arrive in time)."""
        deadline = time.monotonic() + timeout
        self._drop_probes()
        while len(self.inbox) < count:
            packet = self._next(deadline)
            if packet is not None:
                self.others.append(packet)
            self._drop_probes()
        taken, self.inbox = self.inbox[:count], self.inbox[count:]
        return taken

    def quiet(self, seconds: float = 0.3, probes: bool = False) -> List[Publish]:
        """Whatever else arrives within ``seconds`` (to check nothing more does);
        route probes only with ``probes``."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                packet = self._next(deadline)
                if packet is not None:
                    self.others.append(packet)
        except (TimeoutError, socket.timeout):
            pass
        if not probes:
            self._drop_probes()
        taken, self.inbox = self.inbox, []
        return taken


def wait_routed(publisher: Client, subscriber: Client, topic: str = "probe/route",
                timeout: float = 10.0):
    """Publish QoS 0 probes on ``topic`` until ``subscriber`` gets one: the
    publisher's node knows the subscriber's routes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        publisher.publish(topic, b"probe")
        got = subscriber.quiet(0.1, probes=True)
        if any(p.topic == topic for p in got):
            return
    raise AssertionError(f"no route to {topic} from {publisher.client_id} within {timeout} s")
