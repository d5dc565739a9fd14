"""The bridges of one broker as a Twisted service, with SIGHUP reload.

:class:`BridgeManager` runs one :class:`~mqttd.bridge.runtime.Bridge` per
configured ``[[bridge]]``, installs the :class:`~mqttd.bridge.mesh.MeshGuard`
and publishes the per-bridge counters:

``BrokerService.bridges.stats``
    ``{connection name: BridgeStats}`` with ``connected`` (bool),
    ``messages_in``, ``messages_out``, ``queued`` (live: queue + in flight
    of the bridge's local session), ``unmapped``, ``refused``, ``too_large``,
    ``reconnects``, ``last_error`` -- what a Prometheus collector reads.
``BrokerService.bridges.mesh.dropped``
    ``{"duplicate"|"loop"|"hop-limit": count}``.

Reload (``BrokerService.reload()`` / SIGHUP, registered as ``"bridges"``)
re-reads the TOML file, and stops removed bridges, restarts changed ones and
starts new ones; unchanged bridges keep their connection.  A bad file keeps
the running bridges (the error, with its line, is logged).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mqttd.bridge.config import BridgeConfig, BridgeConfigError, bridges_from_toml
from mqttd.bridge.mesh import MeshGuard
from mqttd.bridge.runtime import Bridge

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = Logger(namespace="mqttd.bridge")


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Connect to the first address, then the next after each failed attempt.

    With ``round_robin`` false (mosquitto's default) the first address is the
    *primary*: every connection made resets to it, so a bridge that fell back
    to a secondary returns to the primary at its next reconnect, and while it
    is on a secondary the bridge probes the primary (:meth:`probe_primary`,
    every :attr:`~mqttd.bridge.runtime.Bridge.primary_retry` seconds, as
    mosquitto does) and moves back as soon as it answers.  With
    ``round_robin`` true it stays on the address that worked.

    A connection made whose CONNECT is then refused, or that is lost before
    the CONNACK, counts as a failed attempt too (:meth:`attempt_failed`): the
    next address is tried.
    """

    def __init__(self, endpoints: List, round_robin: bool = False):
        self.endpoints = list(endpoints)
        self.round_robin = round_robin
        #: index of the address the next connect() tries
        self.index = 0
        #: index of the address of the last connection made (None: none yet)
        self.connected_index: Optional[int] = None

    def connect(self, factory):
        index = self.index
        endpoint = self.endpoints[index]

        def failed(failure):
            self.index = (index + 1) % len(self.endpoints)
            return failure

        def made(protocol):
            self.connected_index = index
            if not self.round_robin:
                self.index = 0
            return protocol
        return endpoint.connect(factory).addCallbacks(made, failed)

    @property
    def on_secondary(self) -> bool:
        """Connected (last) through an address other than the primary."""
        return bool(self.connected_index)

    def attempt_failed(self) -> None:
        """The connection last made did not become an MQTT session: next address."""
        if self.connected_index is not None:
            self.index = (self.connected_index + 1) % len(self.endpoints)

    def probe_primary(self, clock, timeout: float = 10.0) -> defer.Deferred:
        """Whether the primary address accepts a connection now (a Deferred
        firing True/False; the probe connection is closed at once -- the
        check mosquitto makes).  Gives up (False) after ``timeout`` seconds."""
        from twisted.internet.protocol import Factory, Protocol

        def answered(protocol):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()
            return True
        d = self.endpoints[0].connect(Factory.forProtocol(Protocol))
        d.addTimeout(timeout, clock)
        return d.addCallbacks(answered, lambda _failure: False)


def endpoint_for(reactor, config: BridgeConfig):
    """The client endpoint of ``config``'s addresses (TLS if ``bridge_cafile``)."""
    endpoints = []
    for host, port in config.addresses:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=30)
        if config.tls:
            endpoint = wrapClientTLS(_tls_options(config, host), endpoint)
        endpoints.append(endpoint)
    if len(endpoints) == 1:
        return endpoints[0]
    return FailoverEndpoint(endpoints, config.round_robin)


def _tls_options(config: BridgeConfig, host: str):
    """The client TLS options of one bridge: trust ``bridge_cafile``, present
    ``bridge_certfile``/``bridge_keyfile`` if given (a certfile may hold the
    chain after the certificate), check the host name unless ``bridge_insecure``.

    The client certificate and key reach pyOpenSSL as ``cryptography`` objects
    (Twisted's ``PrivateCertificate`` would hand it the deprecated X509/PKey).

    :raises BridgeConfigError: a file is unreadable or holds no usable PEM.
    """
    try:
        from twisted.internet import ssl

        from mqttd.transports.tls import TLSConfigError, load_certificates, load_private_key
    except ImportError as error:  # pragma: no cover - pyOpenSSL missing
        raise BridgeConfigError(f"bridge_cafile needs TLS support: {error}")
    client: dict = {}
    try:
        with open(config.cafile, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        if config.certfile is not None:
            chain = load_certificates(config.certfile, "bridge_certfile")
            client = {"certificate": chain[0], "extraCertChain": chain[1:],
                      "privateKey": load_private_key(config.keyfile)}
    except (OSError, TLSConfigError, Exception) as error:
        raise BridgeConfigError(f"bridge {config.connection!r}: cannot load TLS files: "
                                f"{error}")
    if config.insecure:
        # bridge_insecure: trust the CA but do not check the host name
        return ssl.CertificateOptions(trustRoot=trust, **client)
    return ssl.optionsForClientTLS(host, trustRoot=trust, extraCertificateOptions=client)


def load_bridges(path: str) -> List[BridgeConfig]:
    """The ``[[bridge]]`` tables of the TOML file ``path`` (raises BridgeConfigError)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise BridgeConfigError(f"cannot read {path}: {error}")
    return bridges_from_toml(data.get("bridge", []), raw.decode("utf-8"), path)


class BridgeManager(MultiService):
    """All bridges of one broker (a child of :class:`~mqttd.service.BrokerService`).

    :param endpoint_factory: ``(reactor, config) -> endpoint`` (tests inject one).
    """

    def __init__(self, broker, reactor, configs: List[BridgeConfig],
                 config_path: Optional[str] = None,
                 endpoint_factory: Callable = endpoint_for, mesh: Optional[MeshGuard] = None):
        super().__init__()
        self.broker = broker
        self.reactor = reactor
        self.config_path = config_path
        self.endpoint_factory = endpoint_factory
        self.bridges: Dict[str, Bridge] = {}
        hop_limit = max([c.hop_limit for c in configs] or [8])
        self._own_mesh = mesh is None
        self.mesh = mesh if mesh is not None else MeshGuard(broker.config.broker_id, hop_limit)
        self.mesh.hop_limit = max(self.mesh.hop_limit, hop_limit)
        for config in configs:
            self._add(config)

    @property
    def stats(self) -> dict:
        """``{name: BridgeStats}`` of the running bridges."""
        return {name: bridge.stats for name, bridge in self.bridges.items()}

    def _add(self, config: BridgeConfig) -> Bridge:
        endpoint = self.endpoint_factory(self.reactor, config)
        bridge = Bridge(config, self.broker, self.reactor, endpoint)
        bridge.setName(config.connection)
        bridge.setServiceParent(self)
        self.bridges[config.connection] = bridge
        return bridge

    def startService(self):
        self.mesh.attach(self.broker)
        if self.bridges:
            self.mesh.activate()
        super().startService()

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self._own_mesh:
            self.mesh.detach()

    @defer.inlineCallbacks
    def reload(self, configs: Optional[List[BridgeConfig]] = None):
        """Apply a new bridge list (default: re-read ``config_path``)."""
        if configs is None:
            if self.config_path is None:
                return
            configs = load_bridges(self.config_path)   # raises: old bridges stay
        wanted = {c.connection: c for c in configs}
        for name, bridge in list(self.bridges.items()):
            if name not in wanted or wanted[name] != bridge.config:
                log.info("Bridge {name}: {what} by reload", name=name,
                         what="removed" if name not in wanted else "restarted")
                del self.bridges[name]
                yield defer.maybeDeferred(bridge.disownServiceParent)
        for name, config in wanted.items():
            if name not in self.bridges:
                self._add(config)   # setServiceParent starts it if we run
        if self.bridges and self.running:
            self.mesh.activate()


def install(service, configs: List[BridgeConfig], config_path: Optional[str] = None,
            endpoint_factory: Callable = endpoint_for,
            mesh: Optional[MeshGuard] = None) -> BridgeManager:
    """Add a :class:`BridgeManager` to a :class:`~mqttd.service.BrokerService`.

    Sets ``service.bridges`` and registers the ``"bridges"`` reloader.
    """
    manager = BridgeManager(service.broker, service.reactor, configs, config_path,
                            endpoint_factory, mesh)
    manager.setName("bridges")
    manager.setServiceParent(service)
    service.bridges = manager
    service.add_reloader("bridges", manager.reload)
    _export_gauges(service, manager)
    return manager


#: Prometheus gauges (``BrokerService.add_gauge``, read at scrape time):
#: name -> (help, BridgeStats attribute)
GAUGES = {
    "mqttd_bridge_connected": ("1 while the bridge is connected to its remote", "connected"),
    "mqttd_bridge_messages_in": ("Messages received from the remote and published here",
                                 "messages_in"),
    "mqttd_bridge_messages_out": ("Messages sent to the remote (re-sends not counted)",
                                  "messages_out"),
    "mqttd_bridge_queued": ("Messages waiting for the remote (queued + in flight)", "queued"),
    "mqttd_bridge_reconnects": ("Connection attempts that ended", "reconnects"),
    "mqttd_bridge_refused": ("Messages the remote refused (MQTT 5 reason >= 0x80)", "refused"),
    "mqttd_bridge_too_large": ("Messages over the remote's Maximum Packet Size, dropped",
                               "too_large"),
}


def _export_gauges(service, manager: BridgeManager) -> None:
    add_gauge = getattr(service, "add_gauge", None)
    if add_gauge is None:   # a service without the metrics seam
        return
    for name, (doc, attribute) in GAUGES.items():
        def read(attribute=attribute):
            return [((bridge,), int(getattr(stats, attribute)))
                    for bridge, stats in manager.stats.items()]
        add_gauge(name, doc, ("bridge",), read)
    add_gauge("mqttd_bridge_mesh_dropped", "Messages the mesh guard dropped, by reason",
              ("reason",), lambda: sorted(manager.mesh.dropped.items()))


def from_options(service, options) -> None:
    """The ``twistd mqttd`` feature hook (``mqttd.tap.FEATURES``): run the
    ``[[bridge]]`` tables of ``--config``; SIGHUP re-reads them."""
    configs = options.get("bridges") or []
    broker = service.broker
    # every broker gets the mesh guard: it turns itself on when it runs a
    # bridge or a bridging broker connects (a hub of a mesh needs it too)
    mesh = MeshGuard(broker.config.broker_id, max([c.hop_limit for c in configs] or [8]),
                     dedup_window=float(options.get("bridge-dedup-window") or 0.0),
                     clock=broker.clock).attach(broker)
    service.mesh_guard = mesh
    if configs:
        install(service, configs, options["config"], mesh=mesh)
