"""In-process brokers joined by bridges over twisted.test.iosim, on one task.Clock.

``Net`` owns the clock and the pumps: ``net.broker("A")`` makes a Broker,
``net.bridge("A", "B", topics=[...])`` runs a bridge from A to B (the remote
side is B's real MQTTFactory protocol), ``net.settle()`` moves bytes and
fires due timers until nothing moves (bounded), ``net.down("B")`` cuts every
link into B and refuses new ones until ``net.up("B")``.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from mqttd.bridge.config import BridgeConfig, parse_topic_line
from mqttd.bridge.mesh import DEFAULT_DEDUP_WINDOW, MeshGuard
from mqttd.bridge.service import BridgeManager
from mqttd.broker import Broker, BrokerConfig
from mqttd.protocol import MQTTFactory


@implementer(IStreamClientEndpoint)
class NetEndpoint:
    def __init__(self, net, target: str):
        self.net = net
        self.target = target

    def connect(self, factory):
        net = self.net
        if not net.reachable.get(self.target, False):
            return defer.fail(ConnectionRefusedError(f"{self.target} is down"))
        client = factory.buildProtocol(None)
        server = net.factories[self.target].buildProtocol(None)
        pump = iosim.connect(server, iosim.FakeTransport(server, True),
                             client, iosim.FakeTransport(client, False),
                             greet=False, clock=net.clock)
        net.pumps.append((self.target, pump))
        return defer.succeed(client)


class Net:
    def __init__(self):
        self.clock = Clock()
        self.brokers = {}
        self.factories = {}
        self.reachable = {}
        self.managers = {}
        self.guards = {}
        self.pumps = []

    def broker(self, name: str, **config) -> Broker:
        broker = Broker(self.clock, config=BrokerConfig(broker_id=name, **config))
        self.brokers[name] = broker
        self.factories[name] = MQTTFactory(broker, self.clock)
        self.reachable[name] = True
        return broker

    def guard(self, name: str, dedup_window: float = DEFAULT_DEDUP_WINDOW):
        """Broker ``name``'s mesh guard, as ``twistd mqttd`` installs it on every broker."""
        if name not in self.guards:
            self.guards[name] = MeshGuard(name, dedup_window=dedup_window,
                                          clock=self.clock).attach(self.brokers[name])
        return self.guards[name]

    def bridge(self, local: str, remote: str, topics, start=True, **options) -> BridgeManager:
        options.setdefault("remote_clientid", f"{local}-to-{remote}")
        options.setdefault("restart_timeout", (1.0, 2.0))
        config = BridgeConfig(connection=f"{local}-{remote}", addresses=(("127.0.0.1", 1883),),
                              topics=tuple(parse_topic_line(t) for t in topics), **options)
        manager = BridgeManager(self.brokers[local], self.clock, [config],
                                endpoint_factory=lambda reactor, c: NetEndpoint(self, remote),
                                mesh=self.guards.get(local))
        self.managers.setdefault(local, []).append(manager)
        if start:
            manager.startService()
        return manager

    def settle(self, seconds: float = 0.0, step: float = 0.5) -> None:
        """Pump until quiet, then advance ``seconds`` in ``step``s (pumping each)."""
        self._quiet()
        elapsed = 0.0
        while elapsed < seconds:
            self.clock.advance(step)
            elapsed += step
            self._quiet()

    def _quiet(self) -> None:
        for _ in range(10_000):
            self.clock.advance(0)
            moved = False
            for _target, pump in list(self.pumps):
                if pump.pump(advanceClock=False):
                    moved = True
            self.pumps = [(t, p) for t, p in self.pumps
                          if not (p.clientIO.disconnected and p.serverIO.disconnected)]
            if not moved:
                return
        raise AssertionError("network did not settle")

    def down(self, name: str) -> None:
        """Cut every link to broker ``name`` and refuse new ones."""
        self.reachable[name] = False
        for target, pump in self.pumps:
            if target == name:
                pump.serverIO.loseConnection()
        self._quiet()

    def up(self, name: str) -> None:
        self.reachable[name] = True


class Collector:
    """Counts deliveries to an in-process subscriber: ``[(topic, payload, retain)]``."""

    def __init__(self, broker: Broker, topic_filter: str = "#"):
        self.messages = []
        broker.subscribe_local(topic_filter, self._got)

    def _got(self, message):
        self.messages.append((message.topic, message.payload, message.retain))

    def payloads(self, topic=None):
        return [p for t, p, _ in self.messages if topic is None or t == topic]
