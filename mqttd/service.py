"""Composition: the broker, its store and its listeners as one Twisted service.

This is the embedding entry point (layer L5)::

    from twisted.internet import reactor
    from mqttd import make_broker_service

    service = make_broker_service(reactor, listen=["tcp:1883"], store="file:./mqttd-data")
    service.startService()
    service.broker.publish_message("hello/world", b"hi")

An application that already has a ``MultiService`` adds it with
``service.setServiceParent(application_or_parent)``.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from mqttd import systemd
from mqttd.broker import Broker, BrokerConfig
from mqttd.eventlog import EventLog
from mqttd.persistence.journal import StoreError
from mqttd.protocol import MQTTFactory
from mqttd.systopics import SysTopics
from mqttd.transports.endpoints import tls_options_in
from mqttd.transports.proxy import count_proxy_refusals

log = Logger(namespace="mqttd.service")

#: what a reloader raises when the operator's file or value is wrong (the
#: feature's own errors derive from these: ACLFileError, PasswordFileError,
#: TLSConfigError, BridgeConfigError are ValueErrors, ConfigError a
#: UsageError; a missing or unreadable file is an OSError): one ERROR line
RELOAD_ERRORS = (ValueError, usage.UsageError, OSError)


def _error_text(error: BaseException) -> str:
    """``str(error)``, or the exception's name when it has no message."""
    text = str(error)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


#: listen backlog given to TCP endpoints that do not choose one (Twisted's is 50,
#: too short for a reconnect storm of thousands of clients)
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=1024`` added if it is TCP (also under
    ``haproxy:``, or with ``ssl:``) and sets none."""
    kind = description.split(":", 1)[0]
    if kind == "haproxy":
        kind = description.split(":", 2)[1] if description.count(":") >= 2 else ""
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def _address_info(port) -> dict:
    address = port.getHost()
    info = {"type": type(address).__name__}
    for name in ("host", "port", "name"):
        value = getattr(address, name, None)
        if value is not None:
            info[name] = value.decode() if isinstance(value, bytes) else value
    return info


def _reload_all(tls_options) -> None:
    """Reload every listener's TLS files (a listener whose files are broken keeps
    its previous ones); after trying all, raise one error naming every broken
    listener's certificate (the caller logs it once), or the first unexpected
    exception (a bug) as it is."""
    errors = []
    for options in tls_options:
        try:
            options.reload()
        except Exception as error:
            errors.append((options.certificate, error))
    if errors:
        for _certificate, error in errors:
            if not isinstance(error, RELOAD_ERRORS):
                raise error
        raise ValueError("; ".join(f"TLS files of {certificate}: {_error_text(error)}"
                                   for certificate, error in errors)) from errors[0][1]


class CannotStart(Exception):
    """The service cannot start for a reason the operator must fix; ``str()``
    is the one line ``twistd``/``mqttd run`` print (``mqttd: ...``, exit
    status :attr:`exit_status`) instead of a traceback."""

    #: the process's exit status under ``mqttd run`` / ``twistd -n`` (a
    #: daemonized ``twistd`` parent always exits 1: Twisted decides it)
    exit_status = 1


class CannotOpenStore(CannotStart):
    """The store cannot be opened (data directory in use by another broker,
    unreadable, ...): ``cannot open the store: CAUSE``.  Exit status 2, like
    any other setting the operator must correct (two brokers on one data
    directory); found before any listener opens."""

    exit_status = 2

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__(f"cannot open the store: {_error_text(cause)}")
        log.critical("Cannot open the store: {cause}; stopping", cause=_error_text(cause))


class CannotListen(CannotStart):
    """An endpoint could not listen; ``str()`` is the one line for the operator:
    ``cannot listen on ENDPOINT: CAUSE``."""

    def __init__(self, endpoint: str, cause: BaseException):
        self.endpoint = endpoint
        self.cause = cause
        socket_error = getattr(cause, "socketError", None)
        reason = getattr(socket_error, "strerror", None) or str(socket_error or cause) or \
            type(cause).__name__
        super().__init__(f"cannot listen on {endpoint}: {reason}")
        log.critical("Cannot listen on {endpoint}: {cause}; stopping",
                     endpoint=endpoint, cause=reason)


#: connections a listener accepts per reactor turn at most (Twisted's default
#: grows by 20 per turn without bound during an accept storm)
DEFAULT_MAX_ACCEPTS_PER_TURN = 64


class AcceptLog:
    """The log observer of a listening port's accept loop (``Port._logger``).

    Twisted logs one info line per connection its EMFILE recovery closes (out
    of file descriptors): a remote peer decides how many.  Here each closed
    connection is a counted refusal ``file-descriptors`` logged through the
    broker's log rate limiter with the process's ``RLIMIT_NOFILE``; Twisted's
    other accept lines (``Could not accept new connection (ENOBUFS)``...) go
    through the limiter as WARN lines; the bookkeeping lines are dropped.

    :param broker: the :class:`~mqttd.broker.Broker` (``refused``, ``log_limiter``).
    :param endpoint: the listener's endpoint description, for the lines.
    """

    def __init__(self, broker, endpoint: str):
        self.broker = broker
        self.endpoint = endpoint

    def __call__(self, event: dict) -> None:
        format = event.get("log_format") or ""
        if "Closed socket from" in format:
            address = event.get("address")
            peer = (f"{address[0]}:{address[1]}" if isinstance(address, tuple)
                    and len(address) >= 2 else str(address))
            self.broker.refused(
                "file-descriptors", None, peer,
                f"out of file descriptors (RLIMIT_NOFILE {_nofile_limit()}): connection on "
                f"{self.endpoint} closed at once; raise the limit (LimitNOFILE=) or set "
                f"--max-connections")
        elif "EMFILE" in format:
            return   # "EMFILE encountered", "Re-reserving ...": said by the lines above
        else:
            fields = {k: v for k, v in event.items() if not k.startswith("log_")}
            fields["endpoint"] = self.endpoint
            self.broker.log_limiter.emit(log.warn, (None, "accept"),
                                         "Listener {endpoint}: " + format, **fields)


def _nofile_limit() -> str:
    try:
        import resource
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return str(soft)
    except Exception:   # no resource module (not POSIX)
        return "unknown"


def bound_accepts(port, limit: int = DEFAULT_MAX_ACCEPTS_PER_TURN, broker=None,
                  endpoint: str = "?"):
    """Bound the connections ``port`` accepts per reactor turn to ``limit``.

    Twisted's TCP/UNIX ports accept up to ``numberAccepts`` connections per
    readable event and raise it by 20 each time they all succeed, so during a
    flood of connections one turn of the reactor can accept (and set up)
    thousands of them while established clients wait.  Capping it keeps each
    turn short; the kernel's listen backlog holds the rest.  Ports without
    ``numberAccepts`` are returned unchanged.

    With ``broker``, the port's accept-time log lines go to an
    :class:`AcceptLog` (counted, rate-limited) instead of one line each.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not hasattr(port, "numberAccepts") or not hasattr(port, "doRead"):
        return port
    do_read = port.doRead

    def bounded_do_read():
        if port.numberAccepts > limit:
            port.numberAccepts = limit
        return do_read()

    port.doRead = bounded_do_read
    port.numberAccepts = min(port.numberAccepts, limit)
    if broker is not None and hasattr(port, "_logger"):
        port._logger = Logger(namespace="mqttd.service.accept",
                              observer=AcceptLog(broker, endpoint))
    return port


class BrokerService(MultiService):
    """Opens the store, restores state, listens; closes all in reverse order."""

    def __init__(self, reactor, broker: Broker, listen: Iterable[str] = (),
                 ready_file: Optional[str] = None, sys_interval: float = 10.0):
        super().__init__()
        self.reactor = reactor
        self.broker = broker
        self.factory = MQTTFactory(broker)
        self.endpoints = list(listen)
        #: endpoint description -> its own max_connections (a factory each)
        self.listener_max_connections: Dict[str, int] = {}
        self.ready_file = ready_file
        self.ports = []
        #: connections each listener accepts per reactor turn at most
        self.max_accepts_per_turn = DEFAULT_MAX_ACCEPTS_PER_TURN
        self.systopics = SysTopics(broker, broker.clock, sys_interval)
        self.eventlog = EventLog(broker)
        self._started: Optional[defer.Deferred] = None
        #: the :class:`mqttd.bridge.service.BridgeManager` when bridges are
        #: configured (its ``stats`` maps bridge name -> BridgeStats), else None
        self.bridges = None
        #: the :class:`mqttd.cluster.service.ClusterService` under ``--cluster``, else None
        self.cluster = None
        #: the bridges' :class:`mqttd.bridge.mesh.MeshGuard` (``dropped`` counts), set
        #: by the bridge feature under ``twistd mqttd``; None otherwise
        self.mesh_guard = None
        #: name -> callable() run by :meth:`reload` (may return a Deferred)
        self._reloaders: Dict[str, Callable[[], object]] = {}
        #: an ``ILogObserver`` offered to the twistd Application it joins
        #: (``twistd mqttd --log-format/--log-level``); None: twistd's own
        self.log_observer = None
        #: name -> callable() whose JSON-ready result is added to the ready file
        #: (the admin listeners add their ports as "http")
        self.ready_extras: Dict[str, Callable[[], object]] = {}
        #: metric name -> (help, label names, read() -> [(label values, value)]):
        #: gauges features (bridges, cluster) export through the admin metrics
        self.gauges: Dict[str, tuple] = {}
        #: the same for counters (:meth:`add_counter`): exported as ``<name>_total``
        self.counters: Dict[str, tuple] = {}
        #: other listeners ``(kind, endpoint description, factory, check)`` that
        #: start with the MQTT ones, before the store is opened, and fail the
        #: start the same way (the admin and metrics HTTP listeners)
        self.extra_listeners: List[tuple] = []
        #: kind -> the listening ports of :attr:`extra_listeners`
        self.extra_ports: Dict[str, list] = {}
        #: ``check(description, port)`` run on every MQTT listener once bound
        self.bind_checks: List[Callable[[str, object], None]] = []

    def add_listener(self, kind: str, description: str, factory,
                     check: Optional[Callable[[str, object], None]] = None) -> None:
        """Listen on ``description`` with ``factory`` when the service starts.

        Like the MQTT listeners: before the store is opened, and a failure
        stops the start with :class:`CannotListen` (one line, exit status 1).
        The ports are in ``extra_ports[kind]`` and the ready file's ``http``.
        ``check(description, port)``, if given, runs once the port is bound
        and may refuse it by raising ValueError (the port is closed, the start
        stops with :class:`CannotListen`), e.g. "must be bound to loopback".
        """
        self.extra_listeners.append((kind, description, factory, check))

    def add_bind_check(self, check: Callable[[str, object], None]) -> None:
        """Run ``check(description, port)`` for every MQTT listener once it is
        bound; ValueError refuses it as :meth:`add_listener`'s ``check`` does
        (a policy judged on the endpoint strings is checked against the
        addresses really bound, :mod:`mqttd.loopback`)."""
        self.bind_checks.append(check)

    def add_gauge(self, name: str, help: str, labels, read) -> None:
        """Export a gauge ``name`` (``mqttd_...``) read at scrape time:
        ``read()`` returns ``[(label values, value), ...]`` (e.g. a bridge's
        ``[(("edge",), 1)]`` for connected)."""
        self.gauges[name] = (help, tuple(labels), read)

    def add_counter(self, name: str, help: str, labels, read) -> None:
        """Export a counter as :meth:`add_gauge` does a gauge; ``name`` without
        ``_total`` (the exposition adds it), values only ever grow.  One name is
        one metric: a name registered as a gauge is not a counter too."""
        self.gauges.pop(name, None)
        self.counters[name] = (help, tuple(labels), read)

    def setServiceParent(self, parent):
        """Join ``parent``; a twistd ``Application`` also gets :attr:`log_observer`
        as its ``ILogObserver`` (twistd starts logging with it)."""
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    # --- reload (SIGHUP) ------------------------------------------------------------

    def add_reloader(self, name: str, reload: Callable[[], object]) -> None:
        """Register ``reload()`` to run on every :meth:`reload` (e.g. on SIGHUP).

        ``name`` says what it reloads in the log (``password_file``, ``acl_file``,
        ``tls``, ``bridges``...); registering a name again replaces the callable.
        ``reload`` may return a Deferred; if it raises or fails, the old state
        must stay in force (the failure is logged, the others still run).
        """
        self._reloaders[name] = reload

    @defer.inlineCallbacks
    def reload(self):
        """Run every registered reloader in registration order, without dropping
        connections.  Fires with ``{name: True | False}`` (False: it failed and
        was logged; the previous configuration stays in force)."""
        results = {}
        systemd.notify("RELOADING=1")
        for name, reload in list(self._reloaders.items()):
            try:
                yield defer.maybeDeferred(reload)
            except RELOAD_ERRORS as error:
                # the operator's file or value is wrong: one ERROR line saying
                # what and where (the traceback only at debug level)
                log.error("Reloading {what} failed, keeping the previous one: {error}",
                          what=name, error=_error_text(error))
                log.failure("Reloading {what} failed", what=name, level=LogLevel.debug)
                results[name] = False
            except Exception:
                # a bug: the traceback is needed
                log.failure("Reloading {what} failed; keeping the previous one", what=name)
                results[name] = False
            else:
                log.info("Reloaded {what}", what=name)
                results[name] = True
        systemd.notify("READY=1")
        return results

    def startService(self):
        """Lock the store, listen on every endpoint, open the store, restore,
        start the children.

        The data directory's lock comes first: a second broker on a directory
        in use stops before any listener opens (it never accepts a connection
        nor logs "MQTT listening").  Listening comes before reading the store,
        so a broker that cannot listen releases the lock without having read
        (or repaired) anything; no connection is accepted before this returns
        (the reactor is not processing events meanwhile), so clients never see
        a broker that has not restored its state.  Child services (bridges)
        start after the restore and find their sessions restored.

        :raises CannotOpenStore: when the store cannot be locked or opened
            (its data directory is locked by another broker, unreadable):
            nothing listens, ``twistd -n``/``mqttd run`` print one line and
            exit 2.
        :raises CannotListen: when an endpoint cannot listen at once (port in
            use, bad address, no permission; every built-in endpoint type binds
            synchronously).  The ports already listening are closed and the
            store lock released, so ``twistd`` exits 1 (a daemonized
            ``twistd`` reports the line through its status pipe).  An endpoint
            that fails later, asynchronously, logs the same line and stops the
            reactor (``stopService`` then closes the store).
        """
        lock = None if self.broker.started else getattr(self.broker.store, "lock", None)
        if lock is not None:
            try:
                lock()
            except (StoreError, OSError) as error:
                raise CannotOpenStore(error) from None
        listening = defer.ensureDeferred(self._listen())
        if listening.called:
            outcome = []
            listening.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                self._close_ports()
                self._unlock_store()
                outcome[0].raiseException()
        try:
            self.broker.start()  # opens and restores the store once (idempotent)
        except (StoreError, OSError) as error:
            # the data directory is unreadable, its files damaged beyond repair...:
            # the operator's to fix, one line (Broker.start adds a hint for
            # embedders to the message; the original says it all here)
            self._close_ports()
            self._unlock_store()
            cause = error.__cause__ if type(error.__cause__) is type(error) else error
            raise CannotOpenStore(cause) from None
        except BaseException:
            self._close_ports()
            self._unlock_store()
            raise
        super().startService()
        self.eventlog.start()
        self.systopics.start()
        if listening.called:
            self._started = defer.succeed(self._listened(self.ports))
        else:  # an endpoint that listens asynchronously
            listening.addCallbacks(self._listened, self._listen_failed)
            self._started = listening
        return self._started

    async def _listen(self):
        tls = []
        for description in self.endpoints:
            try:
                endpoint = count_proxy_refusals(
                    serverFromString(self.reactor, with_backlog(description)), self.broker)
                tls.extend(tls_options_in(endpoint))
                port = await endpoint.listen(self.factory_for(description))
            except Exception as error:
                raise CannotListen(description, error) from None
            self.ports.append(bound_accepts(port, self.max_accepts_per_turn,
                                            self.broker, description))
            for check in self.bind_checks:
                await self._check_bound(check, description, port)
            log.info("MQTT listening on {endpoint} ({address})",
                     endpoint=description, address=_address_info(port))
        for kind, description, factory, check in self.extra_listeners:
            try:
                port = await serverFromString(self.reactor, description).listen(factory)
            except Exception as error:
                raise CannotListen(description, error) from None
            self.extra_ports.setdefault(kind, []).append(port)
            if check is not None:
                await self._check_bound(check, description, port)
            log.info("{kind} HTTP listening on {endpoint} ({address})", kind=kind,
                     endpoint=description, address=_address_info(port))
        if tls:
            # certificates and CA files are read again on reload (SIGHUP): new
            # connections use them, established ones keep theirs
            self.add_reloader("tls", lambda: _reload_all(tls))
        return self.ports

    async def _check_bound(self, check, description: str, port) -> None:
        """``check(description, port)``; a refusal closes the port and stops the start."""
        try:
            check(description, port)
        except ValueError as error:
            try:
                await defer.maybeDeferred(port.stopListening)
            except Exception:
                pass
            raise CannotListen(description, error) from None

    def _listened(self, ports):
        if self.ready_file:
            self._write_ready_file()
        systemd.notify(f"READY=1\nSTATUS=listening on {', '.join(self.endpoints)}\n"
                       f"MAINPID={os.getpid()}")
        return ports

    def factory_for(self, description: str) -> MQTTFactory:
        """The factory of one listener: :attr:`factory`'s settings, named after
        ``description`` (the ``listener`` label of metrics and the admin API)."""
        factory = MQTTFactory(self.broker, self.factory.clock, self.factory.write_buffer,
                              listener=description,
                              max_connections=self.listener_max_connections.get(description, 0))
        factory.protocol = self.factory.protocol
        factory.start_broker = False  # startService opens the store after listening
        return factory

    def _listen_failed(self, failure):
        if self.reactor.running:
            self.reactor.stop()
        return failure

    def _unlock_store(self) -> None:
        unlock = getattr(self.broker.store, "unlock", None)
        if unlock is not None and not self.broker.started:
            unlock()

    def _close_ports(self) -> None:
        for port in self.ports + [p for ps in self.extra_ports.values() for p in ps]:
            port.stopListening()
        self.ports = []
        self.extra_ports = {}

    def _write_ready_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "broker_id": self.broker.config.broker_id,
            "listeners": [dict(_address_info(p), endpoint=d)
                          for p, d in zip(self.ports, self.endpoints)],
        }
        for name, extra in self.ready_extras.items():
            info[name] = extra()
        if self.extra_ports:
            info["http"] = {kind: [_address_info(p) for p in ports]
                            for kind, ports in self.extra_ports.items()}
        tmp = self.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.ready_file)

    @defer.inlineCallbacks
    def stopService(self):
        systemd.notify("STOPPING=1")
        yield super().stopService()
        for port in self.ports + [p for ps in self.extra_ports.values() for p in ps]:
            yield port.stopListening()
        self.ports = []
        self.extra_ports = {}
        self.systopics.stop()
        self.broker.shutdown()
        self.eventlog.stop()
        # whatever the store: the reactor stops after this, so the clients'
        # DISCONNECT 0x8B must be on the wire first
        yield self.broker.transports_closed()
        yield self.broker.store.close()
        log.info("mqttd stopped")


def make_broker_service(reactor, listen: Iterable[str] = ("tcp:1883",), store="memory",
                        config: Optional[BrokerConfig] = None,
                        ready_file: Optional[str] = None, sys_interval: float = 10.0,
                        authenticator=None, authorizer=None,
                        store_options: Optional[dict] = None,
                        enhanced_authenticator=None,
                        bridges=(), bridge_config_path: Optional[str] = None) -> BrokerService:
    """Build a :class:`BrokerService`.

    :param listen: Twisted server endpoint strings (``tcp:1883``,
        ``tcp:0:interface=127.0.0.1``, ``unix:/run/mqttd.sock``, ``ssl:8883:...``,
        and mqttd's ``mqtts:8883:...``, ``ws:9001``, ``wss:9443:...``,
        ``haproxy:tcp:1883``; see docs/transports.rst).
    :param store: an :class:`~mqttd.interfaces.IBrokerStore`, or a spec string:
        ``memory``, ``file:PATH``, ``dbm:PATH``.
    :param authenticator: an :class:`~mqttd.interfaces.IAuthenticator` (the
        ``authenticate`` hook); None lets every client in.  ``twistd mqttd``
        installs :class:`mqttd.auth.Authenticator` with the anonymous policy;
        an embedder builds the same with :func:`mqttd.auth.configure`.
    :param authorizer: an :class:`~mqttd.interfaces.IAuthorizer`
        (``authorize_publish`` / ``_subscribe`` / ``_forward``), e.g.
        :class:`mqttd.auth.ACLAuthorizer`; None allows everything.
    :param enhanced_authenticator: an
        :class:`~mqttd.interfaces.IEnhancedAuthenticator` (MQTT 5 AUTH).
    :param bridges: :class:`mqttd.bridge.config.BridgeConfig` values; each runs
        as a bridge (see docs/bridge.rst); ``bridge_config_path`` is the TOML
        file a reload re-reads them from.
    """
    if isinstance(store, str):
        from mqttd.persistence import store_from_spec
        store = store_from_spec(store, reactor, **(store_options or {}))
    broker = Broker(reactor, store, config or BrokerConfig(),
                    authenticator=authenticator, authorizer=authorizer,
                    enhanced_authenticator=enhanced_authenticator)
    service = BrokerService(reactor, broker, listen, ready_file, sys_interval)
    if bridges:
        from mqttd.bridge.service import install
        install(service, list(bridges), bridge_config_path)
    return service
