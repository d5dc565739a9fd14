"""All cores of one machine: ``--workers N`` runs N cluster nodes sharing one port.

``twistd -n mqttd --cluster redis://... --workers N`` does not run a broker in
its own process: it becomes a **supervisor** (:class:`Supervisor`) that starts
N worker processes, each a complete ``twistd -n mqttd`` cluster node with the
same options and its own node id ``<node-id>-w<k>`` (k = 1..N), all against
the same Redis.  Clients see one broker on one address:

* **One port.**  Each worker listens on the same endpoints with
  ``SO_REUSEPORT`` set on its TCP listening sockets (Linux >= 3.9, the BSDs,
  macOS): the kernel spreads incoming connections over the workers by a hash
  of the connection's addresses.  An ephemeral port (``tcp:0``) is resolved
  once by the supervisor, which keeps a bound (not listening) socket on it so
  the port stays the cluster's while workers restart.
* **Or one inherited socket** (``--workers-sockets inherit``; the default
  where ``SO_REUSEPORT`` is missing): the supervisor opens every TCP
  listening socket itself and passes it to each worker (file descriptors 3,
  4, ..., named in ``MQTTD_WORKER_SOCKETS``); a worker's listener on that
  address and port adopts it (``adoptStreamPort``'s mechanism, below TLS,
  WebSocket and PROXY, which work unchanged) instead of binding.  All
  workers accept from one queue; connections that arrive while a worker
  restarts wait in it instead of being reset.
* **Supervision.**  A worker that exits while the supervisor runs is logged
  and started again after a backoff (0.5 s doubling up to 30 s; back to
  0.5 s once a worker stayed up 60 s).  A worker that cannot start at all the
  first time (bad configuration, Redis unreachable at boot, port taken) stops
  the whole supervisor with one error line and exit status 1 instead of a
  restart loop.
* **Clean stop.**  SIGTERM or SIGINT to the supervisor sends SIGTERM to every
  worker; each stops like a single broker (its clients get DISCONNECT 0x8B
  Server shutting down, its routes leave the cluster) and the supervisor
  exits after the last one, SIGKILLing any that is still there after
  ``stop_timeout`` seconds.  Each worker also asks the kernel for SIGTERM
  when its supervisor dies (``PR_SET_PDEATHSIG`` on Linux) and checks its
  parent at start, so even ``kill -9`` of the supervisor leaves no orphan
  broker.  SIGHUP is passed on to every worker (each reloads).
* **Readiness.**  Each worker writes its own ready file
  (``<ready-file>.w<k>``); once all are ready the supervisor writes
  ``--ready-file`` with its own pid, the listeners and ``"workers": [{index,
  pid, node_id, restarts}]`` (rewritten after every restart).

Per-worker state: ``--persistence file:P`` / ``dbm:P`` becomes ``P-w<k>``, and
the default store ``file:mqttd-data`` becomes ``file:mqttd-data-w<k>`` (two
processes never share a data directory: a store is locked by one process;
sessions live in Redis, each worker's own store keeps what is node-local --
its internal bridge sessions); ``--logfile F`` (twistd)
becomes ``F.w<k>``; ``--syslog`` (and its ``--prefix``) is passed on; without
either, workers log to the supervisor's stdout.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

__all__ = ["Supervisor", "WORKER_ENV", "worker_arguments", "resolve_ephemeral_ports",
           "prepare_worker", "make_supervisor", "worker_node_id"]

log = Logger(namespace="mqttd.cluster.workers")

#: environment variable telling a process it is worker ``<k>`` of supervisor ``<pid>``
WORKER_ENV = "MQTTD_WORKER"
#: environment variable naming the listening sockets a worker inherits:
#: ``<fd>=<interface>|<port>`` joined by ``,``
SOCKETS_ENV = "MQTTD_WORKER_SOCKETS"
#: the first file descriptor of the inherited sockets in a worker
FIRST_FD = 3
#: how workers share a port: SO_REUSEPORT, or sockets inherited from the supervisor
SOCKET_MODES = ("auto", "reuseport", "inherit")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: a worker up this long has its backoff reset
STABLE_AFTER = 60.0
#: seconds a worker may take from spawn to its ready file the first time
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
POLL_INTERVAL = 0.1

#: endpoint kinds whose first positional argument is a TCP port
_TCP_KINDS = ("tcp", "ssl", "mqtts", "ws", "wss")


def worker_node_id(node_id: str, index: int) -> str:
    """The node id of worker ``index`` (1-based): ``<node-id>-w<k>``."""
    return f"{node_id}-w{index}"


def worker_env() -> Optional[Tuple[int, int]]:
    """``(index, supervisor pid)`` when this process is a worker, else None."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, parent = value.partition(":")
    try:
        return int(index), int(parent)
    except ValueError:
        return None


# --- in the worker ------------------------------------------------------------------

_shared = False


def share_tcp_ports() -> None:
    """Set ``SO_REUSEPORT`` on every TCP listening socket this process opens.

    Workers are separate processes (no shared reactor), so this affects one
    worker only: its MQTT listeners and its admin/metrics listeners share the
    port with the other workers' (an HTTP request then reaches one worker).
    """
    global _shared
    if _shared:
        return
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--workers needs SO_REUSEPORT (Linux >= 3.9, BSD, macOS)")
    from twisted.internet import tcp

    create = tcp.Port.createInternetSocket

    def createInternetSocket(self):
        sock = create(self)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock
    tcp.Port.createInternetSocket = createInternetSocket
    _shared = True


def inherit_tcp_ports(sockets: Dict[Tuple[str, int], int]) -> None:
    """Listen on the sockets the supervisor passed: a TCP listener of this
    process on ``(interface, port)`` in ``sockets`` takes that inherited
    descriptor (already bound and listening) instead of binding its own --
    what ``reactor.adoptStreamPort`` does, applied below every endpoint kind
    (``tcp:``, ``mqtts:``, ``ws:``, ``wss:``, ``haproxy:``, the HTTP
    listeners).  Other listeners bind as usual."""
    global _shared
    if _shared:
        return
    from twisted.internet import fdesc, tcp

    start = tcp.Port.startListening

    def startListening(self):
        fd = sockets.get((self.interface, self.port))
        if fd is not None and self._preexistingSocket is None:
            fdesc.setNonBlocking(fd)
            # a duplicate: the inherited descriptor stays for a later listen
            self._preexistingSocket = socket.fromfd(fd, self.addressFamily,
                                                    self.socketType)
        return start(self)
    tcp.Port.startListening = startListening
    _shared = True


def parse_sockets_env(value: str) -> Dict[Tuple[str, int], int]:
    """``{(interface, port): fd}`` from :data:`SOCKETS_ENV`'s value."""
    out: Dict[Tuple[str, int], int] = {}
    for item in filter(None, value.split(",")):
        fd, _, address = item.partition("=")
        interface, _, port = address.rpartition("|")
        out[(interface, int(port))] = int(fd)
    return out


def _die_with_parent(parent: int) -> None:
    """Ask for SIGTERM when the supervisor dies; exit now if it already has."""
    _set_parent_death_signal()
    if os.getppid() != parent:
        # the supervisor died before prctl took effect: nobody supervises us
        raise SystemExit(f"mqttd: worker's supervisor (pid {parent}) is gone; exiting")


def _set_parent_death_signal() -> None:
    """Linux: SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass


def prepare_worker() -> Optional[int]:
    """In a worker process (``MQTTD_WORKER`` set): die with the supervisor and
    share the listening ports.  Returns the worker index, or None when this
    process is no worker."""
    spec = worker_env()
    if spec is None:
        return None
    index, parent = spec
    _die_with_parent(parent)
    inherited = os.environ.get(SOCKETS_ENV)
    if inherited is not None:
        inherit_tcp_ports(parse_sockets_env(inherited))
    else:
        share_tcp_ports()
    return index


# --- in the supervisor: the workers' command lines -----------------------------------------

_PORT_POSITIONAL = re.compile(r"^((?:haproxy:)?(?:%s):)0(?=:|$)" % "|".join(_TCP_KINDS))
_PORT_KEYWORD = re.compile(r"(^|:)port=0(?=:|$)")
_INTERFACE = re.compile(r"(?:^|:)interface=((?:[^:\\]|\\.)*)")


def resolve_ephemeral_ports(listen: Sequence[str], reservations: List[socket.socket],
                            reuse_port: bool = True) -> List[str]:
    """``listen`` with every TCP port 0 replaced by one port picked here.

    For each ``tcp:0`` (``ssl:``, ``mqtts:``, ``ws:``, ``wss:``, ``haproxy:tcp:``,
    or ``port=0``) a socket with ``SO_REUSEPORT`` is bound to a free port on the
    endpoint's interface and appended to ``reservations`` (keep it open: it
    holds the port while workers come and go; it never listens, so it takes no
    connection).  Other endpoints are returned unchanged.
    """
    out = []
    for description in listen:
        kind = description.split(":", 1)[0]
        if kind == "haproxy":
            kind = description.split(":", 2)[1]
        zero = (_PORT_POSITIONAL.search(description) is not None
                or (kind in _TCP_KINDS and _PORT_KEYWORD.search(description) is not None))
        if not zero:
            out.append(description)
            continue
        match = _INTERFACE.search(description)
        interface = match.group(1).replace("\\:", ":") if match else ""
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, 0))
        reservations.append(sock)
        port = sock.getsockname()[1]
        if _PORT_POSITIONAL.search(description):
            description = _PORT_POSITIONAL.sub(lambda m: m.group(1) + str(port), description,
                                               count=1)
        else:
            description = _PORT_KEYWORD.sub(lambda m: f"{m.group(1)}port={port}", description,
                                             count=1)
        out.append(description)
    return out


def tcp_address(description: str) -> Optional[Tuple[str, int]]:
    """``(interface, port)`` a TCP-based listener description binds (``tcp:``,
    ``mqtts:``, ``ws:``, ``wss:``, ``ssl:``, behind ``haproxy:``), None for
    other kinds (``unix:`` ...).  The interface is ``""`` when not given (all
    IPv4 addresses, as the endpoints default)."""
    parts = description.split(":")
    if parts and parts[0] == "haproxy":
        parts = parts[1:]
    if not parts or parts[0] not in _TCP_KINDS:
        return None
    port = None
    for part in parts[1:]:
        if part.startswith("port="):
            port = part[len("port="):]
        elif "=" not in part and port is None and part.isdigit():
            port = part
    match = _INTERFACE.search(description)
    interface = match.group(1).replace("\\:", ":") if match else ""
    if port is None:
        return None
    return interface, int(port)


def open_listening_sockets(descriptions: Sequence[str], reservations: List[socket.socket],
                           backlog: int = 1024) -> List[Tuple[str, int, socket.socket]]:
    """Bind and listen on every TCP address of ``descriptions`` (each once);
    the sockets the supervisor passes to its workers (``--workers-sockets
    inherit``).  Ports must be resolved (no 0).

    :raises OSError: an address cannot be bound (one line names it).
    """
    out = []
    seen = set()
    for description in descriptions:
        address = tcp_address(description)
        if address is None or address in seen or address[1] == 0:
            continue
        seen.add(address)
        interface, port = address
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((interface, port))
            sock.listen(backlog)
        except OSError as error:
            sock.close()
            raise OSError(f"cannot listen on {interface or '*'}:{port} for the "
                          f"workers: {error.strerror or error}") from None
        reservations.append(sock)
        out.append((interface, port, sock))
    return out


#: options the supervisor sets itself in each worker's command line
_REPLACED = ("--workers", "--node-id", "--ready-file", "--listen", "--port", "-p",
             "--persistence")


def _strip(args: Sequence[str], names: Sequence[str]) -> List[str]:
    """``args`` without the options ``names`` (``--x V``, ``--x=V``, ``-pV``)."""
    out: List[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = "=" not in arg
            continue
        if any(n.startswith("-") and not n.startswith("--") and arg.startswith(n)
               and len(arg) > len(n) for n in names):
            continue  # -p1883
        out.append(arg)
    return out


def worker_persistence(spec: Optional[str], index: int) -> Optional[str]:
    """The worker's own store: ``file:P`` -> ``file:P-w<k>``; memory unchanged."""
    if not spec or ":" not in spec:
        return spec
    kind, _, path = spec.partition(":")
    if kind in ("file", "dbm") and path:
        return f"{kind}:{path.rstrip('/')}-w{index}"
    return spec


def worker_arguments(raw_args: Sequence[str], index: int, node_id: str,
                     listen: Sequence[str], ready_file: str,
                     persistence: Optional[str]) -> List[str]:
    """The mqttd options of worker ``index``: the supervisor's own options
    without ``--workers``, and this worker's node id, listeners, ready file and
    store (the command line wins over a ``--config`` file for each)."""
    args = _strip(raw_args, _REPLACED)
    args += ["--node-id", worker_node_id(node_id, index), "--ready-file", ready_file]
    for description in listen:
        args += ["--listen", description]
    store = worker_persistence(persistence, index)
    if store:
        args += ["--persistence", store]
    return args


# --- the supervisor ------------------------------------------------------------------------

class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", worker: "_Worker"):
        self.supervisor = supervisor
        self.worker = worker

    def processEnded(self, reason):
        self.supervisor._ended(self.worker, reason)


class _Worker:
    __slots__ = ("index", "node_id", "ready_file", "transport", "pid", "started_at",
                 "ready", "ever_ready", "backoff", "restart_call", "restarts")

    def __init__(self, index: int, node_id: str, ready_file: str):
        self.index = index
        self.node_id = node_id
        self.ready_file = ready_file
        self.transport = None
        self.pid: Optional[int] = None
        self.started_at = 0.0
        self.ready = False
        self.ever_ready = False
        self.backoff = BACKOFF_FIRST
        self.restart_call = None
        self.restarts = 0


class Supervisor(Service):
    """Starts, watches and stops N worker processes (see the module docstring).

    :param reactor: ``IReactorProcess`` + ``IReactorTime``.
    :param count: number of workers (>= 1).
    :param command: ``command(index) -> (argv, env)`` of worker ``index``
        (1-based); ``argv[0]`` is the executable.
    :param node_ids: the node id of each worker, by index.
    :param ready_files: each worker's ready file, by index.
    :param ready_file: the supervisor's own ready file (written once every
        worker is ready, and after each restart), or None.
    :param listen: the listeners' descriptions (for the ready file).
    """

    name = "mqttd-workers"
    #: under twistd: the process exits with status 1 after a failed start
    exit_on_failure = False

    def __init__(self, reactor, count: int, command: Callable[[int], Tuple[list, dict]],
                 node_ids: Dict[int, str], ready_files: Dict[int, str],
                 ready_file: Optional[str] = None, listen: Sequence[str] = (),
                 broker_id: str = "mqttd", stop_timeout: float = STOP_TIMEOUT,
                 ready_timeout: float = READY_TIMEOUT):
        self.reactor = reactor
        self.command = command
        self.workers = [_Worker(k, node_ids[k], ready_files[k]) for k in range(1, count + 1)]
        self.ready_file = ready_file
        self.listen = list(listen)
        self.broker_id = broker_id
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        #: sockets holding resolved ephemeral ports (closed at stop)
        self.reservations: List[socket.socket] = []
        #: ``(interface, port, socket)`` listening sockets every worker inherits
        #: (``--workers-sockets inherit``; empty with SO_REUSEPORT)
        self.inherited: List[Tuple[str, int, socket.socket]] = []
        self.stopping = False
        self.failed = False
        #: a directory of the supervisor's own (worker ready files) removed at stop
        self.cleanup_dir: Optional[str] = None
        self._poll = None
        self._stopped: Optional[defer.Deferred] = None
        self._listeners: list = []

    # --- life cycle ---------------------------------------------------------------

    #: an ``ILogObserver`` for the twistd Application (as BrokerService's)
    log_observer = None

    def setServiceParent(self, parent):
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    def startService(self):
        super().startService()
        self._started_at = self.reactor.seconds()
        for worker in self.workers:
            self._spawn(worker)
        self._poll = self.reactor.callLater(POLL_INTERVAL, self._check_ready)

    def _spawn(self, worker: _Worker) -> None:
        worker.restart_call = None
        try:
            os.unlink(worker.ready_file)
        except FileNotFoundError:
            pass
        argv, env = self.command(worker.index)
        worker.ready = False
        worker.started_at = self.reactor.seconds()
        child_fds = {0: "w", 1: 1, 2: 2}
        if self.inherited:
            mapping = []
            for n, (interface, port, sock) in enumerate(self.inherited):
                child_fds[FIRST_FD + n] = sock.fileno()
                mapping.append(f"{FIRST_FD + n}={interface}|{port}")
            env = dict(env, **{SOCKETS_ENV: ",".join(mapping)})
        worker.transport = self.reactor.spawnProcess(
            _WorkerProcess(self, worker), argv[0], argv, env=env, childFDs=child_fds)
        worker.pid = worker.transport.pid
        log.info("Started worker {index} (pid {pid}, node {node_id})",
                 index=worker.index, pid=worker.pid, node_id=worker.node_id)

    def _check_ready(self) -> None:
        self._poll = None
        if self.stopping:
            return
        changed = False
        now = self.reactor.seconds()
        for worker in self.workers:
            if worker.pid is None or worker.ready:
                continue
            info = _read_json(worker.ready_file)
            # a cluster node is ready once it joined (its ready file says so)
            if (info is not None and info.get("pid") == worker.pid
                    and info.get("cluster", {}).get("joined", True)):
                worker.ready = worker.ever_ready = True
                self._listeners = info.get("listeners", self._listeners)
                changed = True
                log.info("Worker {index} (pid {pid}) is ready", index=worker.index,
                         pid=worker.pid)
            elif not worker.ever_ready and now - worker.started_at > self.ready_timeout:
                self._give_up(worker, f"not ready after {self.ready_timeout:.0f} s")
                return
        if changed and all(w.ready for w in self.workers):
            self._write_ready_file()
        if any(not w.ready for w in self.workers):
            self._poll = self.reactor.callLater(POLL_INTERVAL, self._check_ready)

    def _ended(self, worker: _Worker, reason) -> None:
        pid, worker.pid, worker.transport = worker.pid, None, None
        worker.ready = False
        if self.stopping:
            self._maybe_stopped()
            return
        status = _describe_exit(reason)
        if not worker.ever_ready:
            self._give_up(worker, f"exited before it was ready ({status})")
            return
        uptime = self.reactor.seconds() - worker.started_at
        if uptime >= STABLE_AFTER:
            worker.backoff = BACKOFF_FIRST
        delay = worker.backoff
        worker.backoff = min(BACKOFF_MAX, worker.backoff * 2)
        worker.restarts += 1
        log.error("Worker {index} (pid {pid}, node {node_id}) {status} after {uptime:.1f} s; "
                  "restarting it in {delay:.1f} s (restart {restarts})",
                  index=worker.index, pid=pid, node_id=worker.node_id, status=status,
                  uptime=uptime, delay=delay, restarts=worker.restarts)
        worker.restart_call = self.reactor.callLater(delay, self._restart, worker)

    def _restart(self, worker: _Worker) -> None:
        if self.stopping:
            return
        self._spawn(worker)
        if self._poll is None:
            self._poll = self.reactor.callLater(POLL_INTERVAL, self._check_ready)

    def _give_up(self, worker: _Worker, why: str) -> None:
        """A worker cannot start at all: stop everything (no restart loop)."""
        if self.failed:
            return
        self.failed = True
        log.error("Worker {index} (node {node_id}) {why}; stopping all workers "
                  "(see the worker's lines above for the cause)",
                  index=worker.index, node_id=worker.node_id, why=why)
        if self.exit_on_failure:
            # twistd has no exit status of its own: 1 once it has cleaned up
            atexit.register(_exit_status, 1)
        if self.reactor.running:
            self.reactor.stop()

    def reload(self):
        """SIGHUP every worker (each reloads its files); returns {worker: sent}."""
        sent = {}
        for worker in self.workers:
            sent[worker.index] = self._signal(worker, "HUP")
        return sent

    def stopService(self):
        """SIGTERM every worker; fires once all exited (SIGKILL after the timeout)."""
        super().stopService()
        self.stopping = True
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            worker.restart_call = None
            self._signal(worker, "TERM")
        self._stopped = defer.Deferred()
        self._kill_call = self.reactor.callLater(self.stop_timeout, self._kill_rest)
        self._maybe_stopped()
        return self._stopped

    def _signal(self, worker: _Worker, name: str) -> bool:
        if worker.transport is None:
            return False
        try:
            worker.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            return False
        return True

    def _kill_rest(self) -> None:
        for worker in self.workers:
            if worker.transport is not None:
                log.warn("Worker {index} (pid {pid}) still running {timeout:.0f} s after "
                         "SIGTERM; killing it", index=worker.index, pid=worker.pid,
                         timeout=self.stop_timeout)
                self._signal(worker, "KILL")

    def _maybe_stopped(self) -> None:
        if self._stopped is None or any(w.transport is not None for w in self.workers):
            return
        if self._kill_call.active():
            self._kill_call.cancel()
        for sock in self.reservations:
            sock.close()
        self.reservations = []
        for worker in self.workers:
            try:
                os.unlink(worker.ready_file)
            except FileNotFoundError:
                pass
        if self.cleanup_dir:
            shutil.rmtree(self.cleanup_dir, ignore_errors=True)
        if self.ready_file:
            try:
                os.unlink(self.ready_file)
            except FileNotFoundError:
                pass
        log.info("All {count} workers stopped", count=len(self.workers))
        done, self._stopped = self._stopped, None
        done.callback(None)

    def _write_ready_file(self) -> None:
        if not self.ready_file:
            return
        info = {
            "pid": os.getpid(),
            "broker_id": self.broker_id,
            "listeners": self._listeners,
            "workers": [{"index": w.index, "pid": w.pid, "node_id": w.node_id,
                         "restarts": w.restarts, "ready_file": w.ready_file}
                        for w in self.workers],
        }
        tmp = self.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.ready_file)


def _exit_status(code: int) -> None:
    """At interpreter exit: end with ``code`` (after flushing the log)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover - a closed stream
            pass
    os._exit(code)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe_exit(reason) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"


# --- twistd mqttd --workers N -----------------------------------------------------------------

def _twistd_arguments(parent) -> List[str]:
    """The twistd options a worker repeats: the reactor, and ``--syslog`` with its
    ``--prefix`` (a worker logs where the supervisor does, through the same
    bounded observer; the per-worker log file is added by the caller)."""
    if parent is None:
        return []
    args = []
    reactor_name = parent.get("reactor")
    if reactor_name:
        args.append(f"--reactor={reactor_name}")
    if parent.get("syslog"):
        args.append("--syslog")
        prefix = parent.get("prefix")
        if prefix:
            args.append(f"--prefix={prefix}")
    return args


def make_supervisor(options, reactor=None) -> Supervisor:
    """The :class:`Supervisor` for ``twistd mqttd --workers N`` options.

    :raises ConfigError: ``--workers`` > 1 without ``--cluster`` (separate
        brokers on one port would not see each other's clients).
    """
    from mqttd.options import ConfigError
    if reactor is None:
        from twisted.internet import reactor
    count = options["workers"]
    if not options.get("cluster"):
        raise ConfigError("--workers: needs --cluster (workers are cluster nodes sharing "
                          "Redis; without it they would be separate brokers on one port)")
    mode = options.get("workers-sockets") or "auto"
    if mode == "auto":
        mode = "reuseport" if hasattr(socket, "SO_REUSEPORT") else "inherit"
    if mode == "reuseport" and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("--workers-sockets reuseport: this platform has no SO_REUSEPORT "
                          "(use inherit)")
    node_id = options.get("node-id") or _default_node_id()
    reservations: List[socket.socket] = []
    listen = resolve_ephemeral_ports(options["listen"], reservations,
                                     reuse_port=mode == "reuseport")
    inherited: List[Tuple[str, int, socket.socket]] = []
    if mode == "inherit":
        shared = list(listen) + list(options.get("admin-listen") or ()) + \
            list(options.get("metrics-listen") or ())
        for sock in reservations:    # the ephemeral ports' holders become the listeners
            sock.close()
        reservations = []
        try:
            inherited = open_listening_sockets(shared, reservations)
        except OSError as error:
            raise ConfigError(f"--workers: {error}") from None
    ready_file = options["ready-file"]
    private = None if ready_file else tempfile.mkdtemp(prefix="mqttd-workers-")
    base = ready_file or os.path.join(private, "ready.json")
    ready_files = {k: f"{base}.w{k}" for k in range(1, count + 1)}
    node_ids = {k: worker_node_id(node_id, k) for k in range(1, count + 1)}
    raw = list(getattr(options, "raw_args", ()) or ())
    parent = options.parent
    logfile = parent.get("logfile") if parent is not None else None
    # no --persistence: the default store, which every worker would share
    # (its lock stops the second one): each gets its own, like file:P
    from mqttd.tap import DEFAULT_STORE
    persistence = options["persistence"] or DEFAULT_STORE
    twistd_args = _twistd_arguments(parent)

    def command(index: int):
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile="]
        argv += twistd_args
        if logfile and logfile != "-":
            argv.append(f"--logfile={logfile}.w{index}")
        argv.append("mqttd")
        argv += worker_arguments(raw, index, node_id, listen, ready_files[index],
                                 persistence)
        env = dict(os.environ)
        env[WORKER_ENV] = f"{index}:{os.getpid()}"
        return argv, env

    supervisor = Supervisor(reactor, count, command, node_ids, ready_files,
                            ready_file=ready_file, listen=listen,
                            broker_id=options.get("broker-id") or "mqttd")
    supervisor.reservations = reservations
    supervisor.inherited = inherited
    supervisor.cleanup_dir = private
    supervisor.exit_on_failure = parent is not None
    return supervisor


def _default_node_id() -> str:
    from mqttd.cluster.node import default_node_id
    return default_node_id()
